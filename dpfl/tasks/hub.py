"""Hugging Face ``datasets`` names as text data (``data.path = "hf:NAME"``, or
``hf:NAME:SPLIT``). The real loading path for users with hub access; nothing embedded uses it
(these machines have no internet), and ``datasets`` is an optional package."""

from __future__ import annotations

from dpfl.errors import ConfigError
from dpfl.sources import HUB_DATA_PREFIX

__all__ = ["dataset_rows"]


def dataset_rows(path: str, columns: tuple[str, ...]) -> list[tuple]:
    """The ``columns`` of every row of the data set's split (default ``train``)."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"data.path {path!r} is a Hugging Face data set: pip install datasets (or give a "
            "local .csv / .jsonl file)"
        ) from None
    name, _, split = path[len(HUB_DATA_PREFIX) :].partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # noqa: BLE001 - offline, unknown name, gated: one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"data.path {path!r}: cannot load it with datasets ({first})") from None
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ConfigError(
            f"data.path {path!r}: no {' or '.join(repr(c) for c in missing)} column (it has "
            f"{', '.join(ds.column_names)})"
        )
    rows = list(zip(*(ds[c] for c in columns), strict=True))
    if not rows:
        raise ConfigError(f"data.path {path!r}: no records")
    return rows
