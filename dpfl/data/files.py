"""Users' own data from a local ``data.path``: an ``.npz`` file, an image folder, or a CSV file.

Every reader returns float32 records of shape ``[channels, image_size, image_size]`` and int64
labels ``0 .. K-1``, like the built-in data sets, so the same models, partitions and private step
apply:

* ``npz``: arrays ``x`` (``[N, S, S]`` grey, ``[N, C, S, S]`` or ``[N, S, S, C]`` images, or
  ``[N, F]`` features) and ``y`` (``[N]``); optionally ``x_test`` / ``y_test`` as the test split.
  ``uint8`` is divided by 255; any other numeric dtype is used as it is.
* ``folder``: one sub-folder of PNG / JPEG images per class (the class names, sorted, are the
  labels), or ``train/`` and ``test/`` folders laid out so. Pixels / 255; grey (1 channel) when
  every image is greyscale, otherwise RGB (alpha dropped). All images must have one square size.
* ``csv``: a header row, numeric feature columns and a label column (``data.label-column``,
  default ``label``). A row of F features is a record ``[F, 1, 1]`` (channels = F,
  image_size = 1): use the ``mlp`` model or an own model that flattens its input. Features are used
  as they are.

Labels: integers or, in a CSV file or an ``.npz`` string array, class names; the distinct values,
sorted, are mapped to ``0 .. K-1`` (``ImageData.classes`` keeps them). The set of classes is
taken as public: it sets the model's output size. Nothing else is computed from the records
before training (no standardization, whose statistics the DP guarantee would not cover).

All records are read into memory (float32). Without a given test split, a stratified split
(``data.test-fraction`` of each class, at least one record per class on each side) is drawn with
the run seed.
"""

from __future__ import annotations

import csv
import math
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from dpfl.errors import ConfigError

__all__ = ["read_csv", "read_folder", "read_npz", "stratified_split"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}

#: (train, test, channels, image_size, classes)
Loaded = tuple[TensorDataset, TensorDataset, int, int, tuple[str, ...]]


def _fail(path: str | os.PathLike, problem: str) -> ConfigError:
    return ConfigError(f"data.path {path}: {problem}")


# -- labels and the split --------------------------------------------------------------------------
def _class_ids(path, labels: Sequence) -> tuple[np.ndarray, tuple[str, ...]]:
    """Maps labels (ints, integral floats or names) to 0..K-1 in sorted order."""
    values = np.asarray(labels)
    if values.dtype.kind in "biu":
        keys = values.astype(np.int64)
    elif values.dtype.kind == "f":
        bad = ~np.isfinite(values) | (values != np.round(values))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise _fail(
                path,
                f"label {values[i]!r} (record {i}) is not a class: labels are integers or class "
                "names (this is classification, not regression)",
            )
        keys = values.astype(np.int64)
    elif values.dtype.kind in "US":
        keys = values.astype(str)
    else:
        raise _fail(path, f"labels of dtype {values.dtype} are not integers or class names")
    classes, ids = np.unique(keys, return_inverse=True)
    if len(classes) < 2:
        raise _fail(
            path,
            f"{len(classes)} class ({', '.join(map(str, classes))}) found; classification needs at "
            "least 2",
        )
    return ids.reshape(-1).astype(np.int64), tuple(str(c) for c in classes)


def stratified_split(
    labels: np.ndarray,
    test_fraction: float,
    seed: int,
    path="data",
    classes: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split: round(n_c * f) test records of each class, at least one on each
    side. Returns (train, test) indices, the train indices shuffled.

    Raises:
        ConfigError: a class has fewer than 2 records.
    """
    rng = np.random.default_rng(seed)
    test: list[int] = []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        name = classes[int(label)] if classes is not None else str(label)
        if len(idx) < 2:
            raise _fail(
                path,
                f"class {name!r} has {len(idx)} record; the test split (data.test-fraction) "
                "needs at least 2 records per class: add records, or give a test split",
            )
        rng.shuffle(idx)
        k = min(max(1, round(len(idx) * test_fraction)), len(idx) - 1)
        test.extend(idx[:k].tolist())
    mask = np.zeros(len(labels), dtype=bool)
    mask[test] = True
    train = np.flatnonzero(~mask)
    rng.shuffle(train)
    return train, np.flatnonzero(mask)


def _datasets(
    path,
    x: np.ndarray,
    ids: np.ndarray,
    classes: tuple[str, ...],
    n_train: int | None,
    test_fraction: float,
    seed: int,
) -> tuple[TensorDataset, TensorDataset]:
    """Tensors of the records; split unless the first ``n_train`` are the train split."""
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(ids)
    if n_train is not None:
        return TensorDataset(xt[:n_train], yt[:n_train]), TensorDataset(xt[n_train:], yt[n_train:])
    train, test = stratified_split(ids, test_fraction, seed, path, classes)
    return TensorDataset(xt[train], yt[train]), TensorDataset(xt[test], yt[test])


def _check_finite(path, x: np.ndarray, what: str = "x") -> None:
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        raise _fail(
            path,
            f"{what} has {int((~np.isfinite(x)).sum())} NaN/Inf values (first at record "
            f"{int(bad[0])}); remove or impute them before training",
        )


# -- npz -------------------------------------------------------------------------------------------
def _records(path, x: np.ndarray, name: str) -> tuple[np.ndarray, int, int]:
    """``[N, C, S, S]`` float records from an array's layout, with (channels, image_size)."""
    if x.dtype.kind not in "biuf":
        raise _fail(path, f"array {name!r} has dtype {x.dtype}; it must be numeric")
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    x = x.astype(np.float32) / scale if scale != 1.0 else x.astype(np.float32)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim == 2:  # features
        return x[:, :, None, None], x.shape[1], 1
    if x.ndim == 3:  # [N, S, S] grey
        if x.shape[1] != x.shape[2]:
            raise _fail(path, f"{name!r} has non-square images {x.shape[1]}x{x.shape[2]}")
        return x[:, None], 1, x.shape[1]
    if x.ndim == 4:
        if x.shape[2] == x.shape[3]:  # channels first (PyTorch's layout), also when ambiguous
            return x, x.shape[1], x.shape[2]
        if x.shape[1] == x.shape[2]:  # channels last
            return np.transpose(x, (0, 3, 1, 2)), x.shape[3], x.shape[1]
    raise _fail(
        path,
        f"array {name!r} has shape {list(x.shape)}; use [N, F] features, [N, S, S] grey images, "
        "or [N, C, S, S] / [N, S, S, C] square images",
    )


def read_npz(path: str, test_fraction: float, seed: int) -> Loaded:
    """Reads ``x``, ``y`` (and optionally ``x_test``, ``y_test``) from an ``.npz`` file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise _fail(path, "no such file") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise _fail(
            path, f"not a readable .npz of numeric arrays ({e}); save with numpy.savez(x=, y=)"
        ) from None
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise _fail(
            path,
            f"no array {' or '.join(map(repr, missing))} (found: {', '.join(arrays) or 'none'}); "
            "save it as numpy.savez(path, x=records, y=labels)",
        )
    has_test = ("x_test" in arrays, "y_test" in arrays)
    if any(has_test) and not all(has_test):
        raise _fail(path, "give both x_test and y_test, or neither")
    parts = [("x", "y")] + ([("x_test", "y_test")] if all(has_test) else [])
    xs, ys = [], []
    shape = None
    for xk, yk in parts:
        x, y = arrays[xk], arrays[yk]
        if y.ndim != 1 or len(y) != len(x):
            raise _fail(
                path,
                f"{yk!r} must be one label per record of {xk!r}: shape [{len(x)}], got "
                f"{list(y.shape)}",
            )
        if len(x) == 0:
            raise _fail(path, f"{xk!r} has no records")
        _check_finite(path, x, xk)
        records, channels, size = _records(path, x, xk)
        if shape is not None and records.shape[1:] != shape:
            raise _fail(
                path, f"x_test records {list(records.shape[1:])} differ from x's {list(shape)}"
            )
        shape = records.shape[1:]
        xs.append(records)
        ys.append(y)
    try:
        labels = np.concatenate(ys)
    except (TypeError, ValueError):
        raise _fail(path, "y and y_test hold different kinds of labels") from None
    ids, classes = _class_ids(path, labels)
    n_train = len(xs[0]) if len(xs) == 2 else None
    if n_train is not None and len(np.unique(ids[:n_train])) < len(classes):
        absent = sorted(set(ids[n_train:].tolist()) - set(ids[:n_train].tolist()))
        raise _fail(path, f"y_test has classes that y lacks: {[classes[i] for i in absent]}")
    train, test = _datasets(path, np.concatenate(xs), ids, classes, n_train, test_fraction, seed)
    return train, test, channels, size, classes


# -- image folder ----------------------------------------------------------------------------------
def _skipped(name: str) -> bool:
    """Hidden folders and the resource forks a macOS zip leaves are no classes."""
    return name.startswith(".") or name == "__MACOSX"


def _class_folders(root: Path) -> dict[str, list[Path]]:
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not _skipped(d.name))
    out: dict[str, list[Path]] = {}
    for d in folders:
        images = sorted(
            p
            for p in d.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        if not images:
            raise _fail(root, f"class folder {d.name!r} holds no PNG or JPEG image")
        out[d.name] = images
    return out


def _read_images(root: Path, files: list[Path]) -> tuple[np.ndarray, int, int]:
    from PIL import Image, UnidentifiedImageError

    images, size = [], None
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                im = im.copy()
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise _fail(root, f"cannot read image {f}: {e}") from None
        if im.width != im.height:
            raise _fail(
                root,
                f"image {f} is {im.width}x{im.height}; dpfl trains on square images of one "
                "size: crop or resize them (e.g. all to 32x32)",
            )
        if size is None:
            size = (im.width, f)
        elif im.width != size[0]:
            raise _fail(
                root,
                f"image {f} is {im.width}x{im.width} but {size[1]} is {size[0]}x{size[0]}; "
                "resize every image to one size",
            )
        images.append(im)
    grey = all(im.mode in _GREY_MODES for im in images)
    mode = "L" if grey else "RGB"
    arrays = [np.asarray(im.convert(mode), dtype=np.float32) / 255.0 for im in images]
    x = np.stack(arrays)
    x = x[:, None] if grey else np.transpose(x, (0, 3, 1, 2))
    return x, x.shape[1], x.shape[2]


def read_folder(path: str, test_fraction: float, seed: int) -> Loaded:
    """Reads ``<path>/<class>/*.png|jpg`` (or ``<path>/train/<class>/...`` and ``test/``)."""
    root = Path(path)
    if not root.is_dir():
        raise _fail(path, "not a folder")
    subdirs = {d.name for d in root.iterdir() if d.is_dir() and not _skipped(d.name)}
    split = subdirs == {"train", "test"}
    parts = [root / "train", root / "test"] if split else [root]
    found = [_class_folders(p) for p in parts]
    if not found[0]:
        raise _fail(
            path,
            "no class sub-folders; lay the images out as <folder>/<class name>/<image>.png",
        )
    classes = tuple(found[0])
    if split:
        extra = sorted(set(found[1]) - set(classes))
        if extra:
            raise _fail(path, f"test/ has classes that train/ lacks: {extra}")
    xs, ids = [], []
    for per_class in found:
        files = [f for c in per_class for f in per_class[c]]
        x, channels, size = _read_images(root, files)
        xs.append(x)
        ids.append(np.asarray([classes.index(c) for c in per_class for _ in per_class[c]]))
    if split and xs[0].shape[1:] != xs[1].shape[1:]:
        raise _fail(
            path,
            f"test/ images {list(xs[1].shape[1:])} differ from train/ images "
            f"{list(xs[0].shape[1:])} (size or grey/colour)",
        )
    if len(classes) < 2:
        raise _fail(path, f"1 class folder ({classes[0]!r}); classification needs at least 2")
    n_train = len(xs[0]) if split else None
    train, test = _datasets(
        path,
        np.concatenate(xs),
        np.concatenate(ids).astype(np.int64),
        classes,
        n_train,
        test_fraction,
        seed,
    )
    return train, test, xs[0].shape[1], xs[0].shape[2], classes


# -- csv -------------------------------------------------------------------------------------------
def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def read_csv(path: str, label_column: str, test_fraction: float, seed: int) -> Loaded:
    """Reads a comma-separated file with a header: numeric features and a label column."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if any(cell.strip() for cell in r)]
    except FileNotFoundError:
        raise _fail(path, "no such file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise _fail(path, f"not a readable UTF-8 CSV file ({e})") from None
    if not rows:
        raise _fail(path, "empty file; a CSV needs a header row and one row per record")
    header = [h.strip() for h in rows[0]]
    if label_column not in header:
        hint = " (dpfl reads comma-separated files)" if any(c in rows[0][0] for c in ";\t") else ""
        raise _fail(
            path,
            f"no label column {label_column!r} in the header (columns: {', '.join(header)}); "
            f"name it with data.label-column{hint}",
        )
    if len(header) < 2:
        raise _fail(path, "no feature columns besides the label")
    li = header.index(label_column)
    features = [i for i in range(len(header)) if i != li]
    body = rows[1:]
    if not body:
        raise _fail(path, "no records below the header")
    x = np.empty((len(body), len(features)), dtype=np.float64)
    labels: list[str] = []
    for r, row in enumerate(body):
        line = r + 2  # 1-based, after the header
        if len(row) != len(header):
            raise _fail(path, f"line {line} has {len(row)} fields, the header {len(header)}")
        for j, i in enumerate(features):
            v = _number(row[i].strip())
            if v is None:
                raise _fail(
                    path,
                    f"line {line}, column {header[i]!r}: {row[i]!r} is not a number (features "
                    "must be numeric: encode categories as numbers, fill missing values)",
                )
            if not math.isfinite(v):
                raise _fail(
                    path,
                    f"line {line}, column {header[i]!r}: {row[i].strip()} (NaN/Inf); remove or "
                    "impute it before training",
                )
            x[r, j] = v
        label = row[li].strip()
        if not label:
            raise _fail(path, f"line {line} has an empty {label_column!r}; every record needs one")
        labels.append(label)
    nums = [_number(s) for s in labels]
    if all(v is not None for v in nums):
        values = np.asarray(nums, dtype=np.float64)
        if np.isfinite(values).all() and (values == np.round(values)).all():
            label_array: np.ndarray = values.astype(np.int64)
        else:
            label_array = values  # _class_ids names the first one that is not a class
    else:
        label_array = np.asarray(labels, dtype=str)
    ids, classes = _class_ids(path, label_array)
    train, test = _datasets(path, x[:, :, None, None], ids, classes, None, test_fraction, seed)
    return train, test, len(features), 1, classes
