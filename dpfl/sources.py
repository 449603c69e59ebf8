"""Where a run's data and model come from: a built-in name, a local file, or an import string.

Torch-free, so that :mod:`dpfl.config` checks ``data.name`` / ``data.path`` and ``model.name`` /
``model.path`` when a config is built (before any run is created), and normalizes them so that a
stored or forwarded config says what was really used:

* ``data.path`` unset: ``data.name`` is a built-in data set (``digits``, ``mnist-5k``).
* ``data.path`` set: the data are read from it, and ``data.name`` becomes the reader: ``npz``,
  ``folder`` or ``csv``. ``auto`` (or a built-in name, as the embedded defaults carry) infers the
  reader from the path (``.npz``, ``.csv``, a directory); a reader that does not fit the path is
  refused. The path is made absolute (relative to the current directory), so that a federation's
  clients, which get the config as Flower's flat ``run_config``, read the same file.
* ``model.path`` an import string ``package.module:factory`` (Flower's form for app components):
  the model is what the factory returns, and ``model.name`` becomes ``factory``.
* ``model.path`` anything else: a checkpoint file (a ``state_dict`` saved with ``torch.save``)
  loaded into the built-in model that ``model.name`` names; made absolute like ``data.path``.
"""

from __future__ import annotations

import os
import re

from dpfl.errors import ConfigError

__all__ = [
    "BUILTIN_DATASETS",
    "BUILTIN_MODELS",
    "DATA_READERS",
    "FACTORY",
    "is_import_string",
    "resolve_data_source",
    "resolve_model_source",
]

#: text tasks' embedded data set (read by dpfl.tasks.text, not dpfl.data)
TEXT_DATASETS = ("rotten-tomatoes", "shakespeare")
#: ``data.path = "hf:NAME"``: a Hugging Face ``datasets`` name (loaded by ``datasets``)
HUB_DATA_PREFIX = "hf:"
#: ``model.path = "owner/name"`` that is not a local path: a Hugging Face hub model
_HUB_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: every name in dpfl.data.DATASETS (a test keeps the two equal)
BUILTIN_DATASETS = ("digits", "mnist-5k")
#: readers of a local ``data.path``
DATA_READERS = ("npz", "folder", "csv", "jsonl", "datasets")
_AUTO = "auto"
#: every name in dpfl.models.MODELS (a test keeps the two equal)
BUILTIN_MODELS = ("cnn", "mlp")
#: ``model.name`` of a model built by the factory named in ``model.path``
FACTORY = "factory"
DEFAULT_LABEL_COLUMN = "label"

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_IMPORT_STRING = re.compile(rf"^{_IDENT}(\.{_IDENT})*:{_IDENT}(\.{_IDENT})*$")
_SUFFIXES = {".npz": "npz", ".csv": "csv"}


def is_import_string(text: str) -> bool:
    """``package.module:attribute`` (dotted identifiers on both sides of one colon)."""
    return bool(_IMPORT_STRING.match(text))


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _infer_reader(path: str) -> str:
    suffix = os.path.splitext(path)[1].lower()
    if suffix in _SUFFIXES:
        return _SUFFIXES[suffix]
    if os.path.isdir(path):
        return "folder"
    if not os.path.exists(path):
        raise ConfigError(
            f"data.path {path}: no such file or folder (an .npz or .csv file, or a folder with "
            "one sub-folder of images per class; text tasks: a .csv / .jsonl file or hf:NAME)"
        )
    raise ConfigError(
        f"data.path {path}: cannot tell the format from the name; rename it to .npz or .csv, "
        "or set data.name to npz or csv"
    )


def resolve_data_source(name: str, path: str | None, label_column: str) -> tuple[str, str | None]:
    """The (``data.name``, ``data.path``) to record: reader and absolute path when a path is set.

    Raises:
        ConfigError: a reader without a path, an unknown reader, a reader that does not fit the
            path, a missing path, or ``data.label-column`` set for data that are not a CSV file.
    """
    key = name.lower()
    if path is None:
        if key in DATA_READERS or key == _AUTO:
            raise ConfigError(
                f"data.name={name!r} reads a local file: set data.path (or use a built-in data "
                f"set: {', '.join(BUILTIN_DATASETS)})"
            )
        if label_column != DEFAULT_LABEL_COLUMN:
            raise ConfigError("data.label-column is for CSV files: set data.path to one")
        return name, None
    if not path.strip():
        raise ConfigError("data.path cannot be empty (none unsets it)")
    if path.startswith(HUB_DATA_PREFIX):
        hub = path[len(HUB_DATA_PREFIX) :].strip()
        if not hub or key not in (_AUTO, "datasets", *BUILTIN_DATASETS, *TEXT_DATASETS):
            raise ConfigError(
                f"data.path {path!r}: a Hugging Face data set is hf:NAME with data.name auto"
            )
        return "datasets", HUB_DATA_PREFIX + hub
    if key == "datasets":
        raise ConfigError("data.name='datasets' reads data.path = hf:NAME (a datasets name)")
    path = _absolute(path)
    if key in BUILTIN_DATASETS or key in TEXT_DATASETS or key == _AUTO:
        if os.path.splitext(path)[1].lower() in (".jsonl", ".gz"):
            reader = "jsonl"
        else:
            reader = _infer_reader(path)
    elif key in DATA_READERS:
        reader = key
        if reader == "folder" and os.path.isfile(path):
            raise ConfigError(
                f"data.name='folder' but data.path {path} is a file; set data.name to npz or "
                "csv (or auto)"
            )
        if reader != "folder" and os.path.isdir(path):
            raise ConfigError(
                f"data.name={reader!r} but data.path {path} is a folder; set data.name='folder' "
                "(or auto)"
            )
        inferred = _SUFFIXES.get(os.path.splitext(path)[1].lower())
        if inferred is not None and inferred != reader:
            raise ConfigError(
                f"data.name={reader!r} contradicts data.path {path} (a .{inferred} file); set "
                f"data.name={inferred!r} (or auto)"
            )
    else:
        raise ConfigError(
            f"data.name={name!r} with data.path set: the name says how to read the path; valid: "
            f"{', '.join((_AUTO, *DATA_READERS))}"
        )
    if not os.path.exists(path):
        raise ConfigError(f"data.path {path}: no such file or folder")
    if label_column != DEFAULT_LABEL_COLUMN and reader not in ("csv", "jsonl"):
        raise ConfigError(
            f"data.label-column is for CSV files, and data.path {path} is read as {reader}"
        )
    return reader, path


def resolve_model_source(name: str, path: str | None) -> tuple[str, str | None]:
    """The (``model.name``, ``model.path``) to record.

    Raises:
        ConfigError: ``factory`` without an import string, a checkpoint that is not a file, or
            a checkpoint with ``model.name='factory'``.
    """
    if path is None:
        if name.lower() == FACTORY:
            raise ConfigError(
                "model.name='factory' builds the model from model.path: set it to an import "
                "string 'package.module:factory'"
            )
        return name, None
    if not path.strip():
        raise ConfigError("model.path cannot be empty (none unsets it)")
    if is_import_string(path):
        return FACTORY, path
    if name.lower() == FACTORY:
        raise ConfigError(
            f"model.name='factory' needs model.path to be an import string "
            f"'package.module:factory', got {path!r}"
        )
    full = _absolute(path)
    if os.path.isdir(full) and os.path.isfile(os.path.join(full, "config.json")):
        return "hf", full  # a local Hugging Face model directory (text tasks)
    if not os.path.exists(full) and _HUB_MODEL.match(path):
        return "hf", path  # a hub name (owner/name): transformers loads it, if it can reach it
    if not os.path.isfile(full):
        hint = ""
        if ":" in path:
            hint = (
                "; an import string is package.module:factory (dotted module names, no slashes "
                "or .py, importable from where dpfl runs)"
            )
        raise ConfigError(
            f"model.path {path!r} is neither an import string 'package.module:factory' nor a "
            f"checkpoint file ({full} does not exist){hint}"
        )
    return name, full
