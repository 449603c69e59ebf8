"""Strict JSON for everything dpfl prints or exports.

JSON has no NaN or infinity. dpfl writes NaN as ``null`` and infinities as the strings ``"inf"``
and ``"-inf"`` (an infinite epsilon is a meaningful answer: no privacy), so every output parses
with any strict JSON reader.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["dumps", "jsonable"]


def jsonable(obj: Any) -> Any:
    """A copy of ``obj`` with non-finite floats replaced (see the module docstring)."""
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, bytes):
        return None
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    return json.dumps(jsonable(obj), allow_nan=False, default=str, **kwargs)
