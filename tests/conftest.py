"""Shared test setup: every test runs in its own empty working directory (so a default
``./dpfl-runs.sqlite`` never leaks between tests) with fixed seeds."""

from __future__ import annotations

import random

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DPFL_STORE", raising=False)
    random.seed(0)
    np.random.seed(0)
    yield


@pytest.fixture
def store_path(tmp_path):
    return tmp_path / "runs.sqlite"
