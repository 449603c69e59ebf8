"""Users' own data (``data.path``: .npz, image folder, CSV) and models (``model.path``: an import
string or a checkpoint), through the config, the loaders, ``dpfl train`` and ``dpfl simulate``.

Expected values come from the files the tests write (counts of a stratified split, pixel values
/ 255, the classes sorted), not from the loaders. Every test runs in its own tmp_path (conftest).
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dpfl.cli.main import app
from dpfl.config import load_config
from dpfl.data import load_dataset
from dpfl.errors import ConfigError
from dpfl.models import create_model
from dpfl.store import RunStore
from tests.cli.test_cli import assert_one_line_error

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def data_of(*overrides, seed=0):
    cfg = load_config(None, list(overrides))
    return cfg, load_dataset(cfg.data, seed)


def model_for(cfg, data):
    return create_model(
        cfg.model, channels=data.channels, image_size=data.image_size, num_classes=data.num_classes
    )


def one_line_config_error(fragment, fn, *args):
    with pytest.raises(ConfigError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message, message
    assert fragment in message, message
    return message


# -- files the tests write ------------------------------------------------------------------------
def write_npz(path, n_per_class=20, labels=(3, 7), **extra):
    """Grey 8x8 uint8 images; record i is the constant image i (so it can be found again)."""
    n = n_per_class * len(labels)
    x = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, 8, 8)).copy()
    y = np.repeat(np.asarray(labels), n_per_class)
    np.savez(path, x=x, y=y, **extra)
    return x, y


def learnable_images(n_per_class, size=8, channels=None, seed=0):
    """uint8 images of 2 classes a CNN tells apart in a few steps: the bright half is the top
    (class 0) or the bottom (class 1), under noise. [N, S, S] or [N, S, S, channels]."""
    rng = np.random.default_rng(seed)
    shape = (2 * n_per_class, size, size) + (() if channels is None else (channels,))
    x = rng.integers(0, 60, shape)
    y = np.repeat([0, 1], n_per_class)
    x[y == 0, : size // 2] += 190
    x[y == 1, size // 2 :] += 190
    return x.astype(np.uint8), y


def write_folder(root, classes=("cat", "dog"), per_class=3, size=8, mode="L"):
    x, _ = learnable_images(per_class, size, None if mode == "L" else 3)
    pixels = {}
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            a = x[k * per_class + i]
            Image.fromarray(a, mode=mode).save(root / c / f"{i}.png")
            pixels[(c, i)] = a
    return pixels


def write_csv(path, rows, header="a,b,label"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def csv_rows(n=20):
    """a = i, b = 2i, label yes for odd i (for the loaders' checks)."""
    return [f"{i},{2 * i},{'yes' if i % 2 else 'no'}" for i in range(n)]


def learnable_csv_rows(n=200, seed=0):
    """Two features around (+1, -1) for label 1 and (-1, +1) for label 0."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 2)) * 0.3 + np.where(y[:, None] == 1, [1, -1], [-1, 1])
    return [f"{a:.4f},{b:.4f},{label}" for (a, b), label in zip(x, y, strict=True)]


# -- npz ------------------------------------------------------------------------------------------
def test_npz_images_are_split_stratified_scaled_and_relabelled(tmp_path):
    # Prepare: 2 classes x 20 uint8 records, labels 3 and 7
    x, y = write_npz(tmp_path / "d.npz")

    # Execute
    cfg, data = data_of("data.path=d.npz")  # relative to the working directory

    # Assert: the reader and the absolute path are recorded
    assert (cfg.data.name, cfg.data.path) == ("npz", str(tmp_path / "d.npz"))
    assert (data.channels, data.image_size, data.num_classes) == (1, 8, 2)
    assert data.classes == ("3", "7")
    # round(20 * 0.2) = 4 test records per class
    assert (len(data.train), len(data.test)) == (32, 8)
    xs = torch.cat([data.train.tensors[0], data.test.tensors[0]])
    ys = torch.cat([data.train.tensors[1], data.test.tensors[1]])
    assert xs.shape == (40, 1, 8, 8) and xs.dtype == torch.float32
    index = torch.round(xs[:, 0, 0, 0] * 255).long()  # record i is the constant i / 255
    assert sorted(index.tolist()) == list(range(40))
    assert torch.allclose(xs, torch.from_numpy(x[index.numpy()]).float()[:, None] / 255)
    assert ys.tolist() == [0 if y[i] == 3 else 1 for i in index.tolist()]
    assert sorted(data.test.tensors[1].tolist()) == [0] * 4 + [1] * 4


def test_npz_split_is_seeded(tmp_path):
    write_npz(tmp_path / "d.npz")
    a = data_of("data.path=d.npz")[1].test.tensors[0]
    b = data_of("data.path=d.npz")[1].test.tensors[0]
    c = data_of("data.path=d.npz", seed=1)[1].test.tensors[0]
    assert len(a) == 8 and torch.equal(a, b) and not torch.equal(a, c)


def test_npz_given_test_split_and_channels_last(tmp_path):
    # Prepare: float RGB records [N, 4, 4, 3] (channels last), labels 0..2, a given test split
    rng = np.random.default_rng(1)
    x = rng.normal(size=(9, 4, 4, 3))
    xt = rng.normal(size=(3, 4, 4, 3))
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(9) % 3, x_test=xt, y_test=np.arange(3))

    # Execute
    _, data = data_of(f"data.path={tmp_path / 'd.npz'}")

    # Assert: nothing split off, records channels first, float used as it is
    assert (data.channels, data.image_size, data.num_classes) == (3, 4, 3)
    assert torch.allclose(
        data.test.tensors[0], torch.tensor(xt, dtype=torch.float32).permute(0, 3, 1, 2)
    )
    assert data.test.tensors[1].tolist() == [0, 1, 2]
    assert len(data.train) == 9


def test_npz_features_are_tabular_records_for_the_mlp(tmp_path):
    x = np.arange(40, dtype=np.float64).reshape(20, 2)
    np.savez(tmp_path / "f.npz", x=x, y=np.arange(20) % 2)
    cfg, data = data_of("data.path=f.npz", "model.name=mlp")
    assert (data.channels, data.image_size) == (2, 1)
    assert data.train.tensors[0].shape[1:] == (2, 1, 1)
    assert model_for(cfg, data)(data.train.tensors[0]).shape == (len(data.train), 2)


@pytest.mark.parametrize(
    "arrays, fragment",
    [
        ({"x": np.zeros((4, 8, 8))}, "no array 'y'"),
        ({"x": np.full((4, 2), np.nan), "y": np.array([0, 1, 0, 1])}, "NaN/Inf"),
        ({"x": np.zeros((4, 2)), "y": np.array([0.0, 0.5, 1.0, 1.0])}, "not a class"),
        ({"x": np.zeros((4, 2)), "y": np.array([1, 1, 1, 1])}, "at least 2"),
        ({"x": np.zeros((4, 2)), "y": np.array([0, 1, 1])}, "one label per record"),
        (
            {"x": np.zeros((4, 2)), "y": np.array([0, 1, 0, 1]), "x_test": np.zeros((2, 2))},
            "x_test and y_test",
        ),
        ({"x": np.zeros((4, 8, 6)), "y": np.array([0, 1, 0, 1])}, "non-square"),
        ({"x": np.zeros((4, 2, 3, 4, 5)), "y": np.array([0, 1, 0, 1])}, "shape"),
        ({"x": np.zeros((3, 2)), "y": np.array([0, 1, 1])}, "at least 2 records per class"),
        (
            {
                "x": np.zeros((4, 2)),
                "y": np.array([0, 1, 0, 1]),
                "x_test": np.zeros((2, 2)),
                "y_test": np.array([0, 2]),
            },
            "y_test has classes that y lacks",
        ),
    ],
)
def test_npz_bad_content_is_one_line_naming_the_file(tmp_path, arrays, fragment):
    np.savez(tmp_path / "bad.npz", **arrays)
    message = one_line_config_error(fragment, data_of, "data.path=bad.npz")
    assert message.startswith(f"data.path {tmp_path / 'bad.npz'}: ")


def test_npz_that_is_not_an_npz(tmp_path):
    (tmp_path / "bad.npz").write_text("not a zip")
    one_line_config_error("numpy.savez", data_of, "data.path=bad.npz")


# -- image folder ---------------------------------------------------------------------------------
def test_image_folder_classes_are_sorted_folder_names_and_pixels_scaled(tmp_path):
    # Prepare: 2 classes x 3 grey 8x8 PNGs
    pixels = write_folder(tmp_path / "imgs", classes=("dog", "cat"), per_class=3)

    # Execute
    cfg, data = data_of("data.path=imgs")

    # Assert
    assert cfg.data.name == "folder"
    assert (data.channels, data.image_size, data.num_classes) == (1, 8, 2)
    assert data.classes == ("cat", "dog")
    assert (len(data.train), len(data.test)) == (4, 2)  # round(3 * 0.2) = 1 test per class
    got = {tuple(t.flatten().tolist()): int(y) for t, y in zip(*data.train.tensors, strict=True)}
    got |= {tuple(t.flatten().tolist()): int(y) for t, y in zip(*data.test.tensors, strict=True)}
    want = {
        tuple((a.astype(np.float32) / 255).flatten().tolist()): ("cat", "dog").index(c)
        for (c, _), a in pixels.items()
    }
    assert got == want


def test_image_folder_colour_and_train_test_layout(tmp_path):
    write_folder(tmp_path / "imgs" / "train", per_class=2, mode="RGB")
    write_folder(tmp_path / "imgs" / "test", per_class=1, mode="RGB")
    (tmp_path / "imgs" / "__MACOSX").mkdir()  # left by macOS zips: no class, no split
    (tmp_path / "imgs" / "train" / ".cache").mkdir()
    _, data = data_of("data.path=imgs")
    assert (data.channels, data.image_size) == (3, 8)
    assert (len(data.train), len(data.test)) == (4, 2)
    assert sorted(data.test.tensors[1].tolist()) == [0, 1]


def _resave(path, size):
    Image.fromarray(np.zeros(size[::-1], dtype=np.uint8)).save(path)


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda r: _resave(r / "cat" / "0.png", (8, 6)), "8x6"),
        (lambda r: _resave(r / "cat" / "0.png", (6, 6)), "resize every image to one size"),
        (lambda r: (r / "cat" / "0.png").write_bytes(b"not a png"), "cannot read image"),
        (lambda r: (r / "empty").mkdir(), "holds no PNG or JPEG"),
        (
            lambda r: [p.unlink() for p in (r / "dog").iterdir()] and (r / "dog").rmdir(),
            "at least 2",
        ),
    ],
)
def test_image_folder_bad_content_is_one_line(tmp_path, damage, fragment):
    write_folder(tmp_path / "imgs")
    damage(tmp_path / "imgs")
    one_line_config_error(fragment, data_of, "data.path=imgs")


def test_image_folder_without_class_folders(tmp_path):
    (tmp_path / "imgs").mkdir()
    _resave(tmp_path / "imgs" / "a.png", (8, 8))
    one_line_config_error("no class sub-folders", data_of, "data.path=imgs")


# -- csv ------------------------------------------------------------------------------------------
def test_csv_features_labels_and_label_column(tmp_path):
    # Prepare: 20 rows a, b, label in {no, yes}; and the same with the label column named y
    write_csv(tmp_path / "t.csv", csv_rows())
    write_csv(tmp_path / "u.csv", csv_rows(), header="a,b,y")

    # Execute
    cfg, data = data_of("data.path=t.csv", "model.name=mlp")
    _, other = data_of("data.path=u.csv", "data.label-column=y")

    # Assert: records [2, 1, 1] used as they are, labels no -> 0, yes -> 1
    assert cfg.data.name == "csv" and data.classes == ("no", "yes")
    assert (data.channels, data.image_size, data.num_classes) == (2, 1, 2)
    assert (len(data.train), len(data.test)) == (16, 4)
    for xs, ys in (data.train.tensors, data.test.tensors):
        i = xs[:, 0, 0, 0]
        assert torch.equal(xs[:, 1, 0, 0], 2 * i)
        assert torch.equal(ys, (i.long() % 2))
    assert torch.equal(other.train.tensors[0], data.train.tensors[0])
    assert model_for(cfg, data)(data.test.tensors[0]).shape == (4, 2)


def test_csv_integer_labels_are_mapped_to_0_to_k_minus_1(tmp_path):
    write_csv(tmp_path / "t.csv", [f"{i},{i},{10 + 5 * (i % 3)}" for i in range(12)])
    _, data = data_of("data.path=t.csv")
    assert data.classes == ("10", "15", "20")
    ys = torch.cat([data.train.tensors[1], data.test.tensors[1]])
    assert sorted(ys.tolist()) == [0] * 4 + [1] * 4 + [2] * 4


@pytest.mark.parametrize(
    "header, rows, fragment",
    [
        ("a,b,class", csv_rows(), "no label column 'label' in the header (columns: a, b, class)"),
        ("a;b;label", ["1;2;0", "3;4;1"], "comma-separated"),
        ("a,b,label", ["1,2,0", "x,4,1"], "line 3, column 'a': 'x' is not a number"),
        ("a,b,label", ["1,2,0", "1,nan,1"], "NaN/Inf"),
        ("a,b,label", ["1,2,0", "1,inf,1"], "NaN/Inf"),
        ("a,b,label", ["1,2,0", "1,2"], "line 3 has 2 fields"),
        ("a,b,label", ["1,2,0", "1,2, "], "empty 'label'"),
        ("a,b,label", ["1,2,0.5", "1,2,1"], "not a class"),
        ("a,b,label", ["1,2,1", "1,2,1"], "at least 2"),
        ("label", ["0", "1"], "no feature columns"),
        ("a,b,label", [], "no records"),
    ],
)
def test_csv_bad_content_is_one_line(tmp_path, header, rows, fragment):
    write_csv(tmp_path / "t.csv", rows, header=header)
    one_line_config_error(fragment, data_of, "data.path=t.csv")


# -- data.name vs data.path -----------------------------------------------------------------------
def test_a_path_replaces_the_builtin_name_and_is_made_absolute(tmp_path):
    write_npz(tmp_path / "d.npz")
    cfg = load_config(None, ["data.name=mnist-5k", "data.path=./d.npz", "data.name=auto"])
    assert (cfg.data.name, cfg.data.path) == ("npz", str(tmp_path / "d.npz"))
    cfg = load_config(None, ["data.name=mnist-5k", "data.path=d.npz"])  # as simulate's default
    assert cfg.data.name == "npz"
    # what the federation's clients get (Flower's flat run_config) reads the same file
    assert type(cfg).from_flat(cfg.to_flat()).data == cfg.data


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["data.name=csv", "data.path=d.npz"], "data.name='csv' contradicts"),
        (["data.name=folder", "data.path=d.npz"], "is a file"),
        (["data.name=npz", "data.path=imgs"], "is a folder"),
        (["data.name=npz"], "set data.path"),
        (["data.name=auto"], "set data.path"),
        (["data.name=cifar", "data.path=d.npz"], "valid: auto, npz, folder, csv"),
        (["data.path=missing.npz", "data.name=npz"], "no such file"),
        (["data.path=missing.csv"], "no such file"),
        (["data.path=missing"], "no such file or folder"),
        (["data.path=d.bin"], "cannot tell the format"),
        (["data.path=d.npz", "data.label-column=y"], "data.label-column is for CSV files"),
        (["data.label-column=y"], "data.label-column is for CSV files"),
        (["data.path=' '"], "cannot be empty"),
    ],
)
def test_contradictions_are_refused_when_the_config_is_built(tmp_path, overrides, fragment):
    write_npz(tmp_path / "d.npz")
    (tmp_path / "d.bin").write_bytes(b"")
    (tmp_path / "imgs").mkdir()
    one_line_config_error(fragment, load_config, None, overrides)


def test_builtin_names_are_the_registries():
    from dpfl.data import DATASETS
    from dpfl.models import MODELS
    from dpfl.sources import BUILTIN_DATASETS, BUILTIN_MODELS

    assert sorted(BUILTIN_DATASETS) == DATASETS.names()
    assert sorted(BUILTIN_MODELS) == MODELS.names()


# -- model.path: an import string -----------------------------------------------------------------
FACTORIES = """
import torch
from torch import nn

seen = {}

def build(channels, image_size, num_classes):
    seen.update(channels=channels, image_size=image_size, num_classes=num_classes)
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * image_size**2, num_classes))

def bare():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 2))

def partial(num_classes, hidden=8):
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
    )

def anything(**kwargs):
    seen.update(kwargs)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, kwargs["num_classes"]))

class Net(nn.Module):
    def __init__(self, channels=1, num_classes=10):
        super().__init__()
        self.fc = nn.Linear(channels * 64, num_classes)
    def forward(self, x):
        return self.fc(x.flatten(1))

def with_batchnorm(channels, num_classes):
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 64, num_classes),
    )

def needs_depth(num_classes, depth):
    return nn.Linear(1, num_classes)

def raises(num_classes):
    raise ValueError("no such width")

def not_a_module():
    return "a string"

def wrong_outputs():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

def wrong_input():
    return nn.Linear(3, 2)

not_callable = 3
"""


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """``ownmodels`` on sys.path, fresh for each test."""
    pkg = tmp_path / "lib"
    pkg.mkdir()
    (pkg / "ownmodels.py").write_text(textwrap.dedent(FACTORIES))
    (pkg / "broken.py").write_text("def f(:\n")
    (pkg / "needs_dep.py").write_text("import not_installed_anywhere\n")
    monkeypatch.syspath_prepend(str(pkg))
    for name in ("ownmodels", "broken", "needs_dep"):
        monkeypatch.delitem(__import__("sys").modules, name, raising=False)
    write_npz(tmp_path / "d.npz", labels=(0, 1))
    return pkg


def test_factory_gets_the_data_shape_as_keyword_arguments(factories):
    cfg, data = data_of("data.path=d.npz", "model.path=ownmodels:build")
    model = model_for(cfg, data)
    import ownmodels

    assert cfg.model.name == "factory" and cfg.model.path == "ownmodels:build"
    assert ownmodels.seen == {"channels": 1, "image_size": 8, "num_classes": 2}
    assert model(data.test.tensors[0]).shape == (len(data.test), 2)


@pytest.mark.parametrize(
    "spec, hidden",
    [
        ("ownmodels:bare", None),
        ("ownmodels:partial", 8),
        ("ownmodels:anything", None),
        ("ownmodels:Net", None),
    ],
)
def test_factory_is_called_with_what_it_accepts(factories, spec, hidden):
    cfg, data = data_of("data.path=d.npz", f"model.path={spec}")
    model = model_for(cfg, data)
    assert isinstance(model, torch.nn.Module)
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 2)


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("nowhere_to_be_found:build", "no module named 'nowhere_to_be_found'"),
        ("ownmodels:missing", "module ownmodels has no attribute 'missing'"),
        ("ownmodels:not_callable", "not callable"),
        ("ownmodels:needs_depth", "requires 'depth'"),
        ("ownmodels:raises", "the factory raised ValueError: no such width"),
        ("ownmodels:not_a_module", "returned a str, not a torch.nn.Module"),
        ("ownmodels:wrong_outputs", "[2, 2] for 2 records, got [2, 10]"),
        ("ownmodels:wrong_input", "the model fails on a batch of records [1, 8, 8]"),
        ("broken:f", "importing broken failed: SyntaxError"),
        ("needs_dep:f", "importing needs_dep failed: No module named 'not_installed_anywhere'"),
    ],
)
def test_factory_errors_are_one_line_naming_the_import_string(factories, spec, fragment):
    cfg, data = data_of("data.path=d.npz", f"model.path={spec}")
    message = one_line_config_error(fragment, model_for, cfg, data)
    assert message.startswith(f"model.path {spec!r}: ")


def test_module_in_the_working_directory_gets_a_hint(tmp_path):
    (tmp_path / "mymodel.py").write_text("def build():\n    pass\n")
    cfg = load_config(None, ["model.path=mymodel:build"])
    shape = {"channels": 1, "image_size": 8, "num_classes": 10}
    one_line_config_error("PYTHONPATH", lambda: create_model(cfg.model, **shape))


# -- model.path: a checkpoint ---------------------------------------------------------------------
def _cnn_state(num_classes=2, seed=3):
    from dpfl.models import SmallCNN

    torch.manual_seed(seed)
    return SmallCNN(1, num_classes, 8).state_dict()


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "opacus"])
def test_checkpoint_loads_into_the_named_model(tmp_path, wrap):
    # Prepare: a SmallCNN's weights, saved as users save them
    write_npz(tmp_path / "d.npz", labels=(0, 1))
    state = _cnn_state()
    saved = {
        "plain": state,
        "state_dict": {"state_dict": state, "epoch": 3},
        "opacus": {f"_module.{k}": v for k, v in state.items()},
    }[wrap]
    torch.save(saved, tmp_path / "w.pt")

    # Execute
    cfg, data = data_of("data.path=d.npz", "model.path=w.pt")
    model = model_for(cfg, data)

    # Assert
    assert cfg.model.name == "cnn" and cfg.model.path == str(tmp_path / "w.pt")
    got = model.state_dict()
    assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)


def test_checkpoint_of_another_shape_names_the_keys(tmp_path):
    write_npz(tmp_path / "d.npz", labels=(0, 1))
    torch.save(_cnn_state(num_classes=10), tmp_path / "w.pt")  # 10 classes, the data have 2
    cfg, data = data_of("data.path=d.npz", "model.path=w.pt")
    message = one_line_config_error("classifier.3.weight [10, 64] vs [2, 64]", model_for, cfg, data)
    assert "classifier.3.bias" in message


def test_checkpoint_with_other_keys(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "w.pt")
    cfg = load_config(None, ["model.path=w.pt"])
    message = one_line_config_error(
        "keys the model lacks: fc.weight", model_for, cfg, load_dataset(cfg.data)
    )
    assert "keys the model has and the file lacks: classifier.1.bias" in message


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"not a checkpoint", "not a torch.save file"),
        ("whole-model", "(it holds a dpfl.models.cnn.SmallCNN), which dpfl does not unpickle"),
        ("tensor", "not a state_dict of tensors"),
    ],
)
def test_checkpoint_that_is_not_a_state_dict(tmp_path, content, fragment):
    path = tmp_path / "w.pt"
    if content == "whole-model":
        from dpfl.models import SmallCNN

        torch.save(SmallCNN(), path)
    elif content == "tensor":
        torch.save(torch.zeros(3), path)
    else:
        path.write_bytes(content)
    cfg = load_config(None, ["model.path=w.pt"])
    one_line_config_error(fragment, model_for, cfg, load_dataset(cfg.data))


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["model.path=missing.pt"], "neither an import string"),
        (["model.path=models/net.py:build"], "no slashes or .py"),
        (["model.name=factory"], "set it to an import string"),
        (["model.name=factory", "model.path=w.pt"], "needs model.path to be an import string"),
    ],
)
def test_model_path_contradictions_are_refused_when_the_config_is_built(
    tmp_path, overrides, fragment
):
    torch.save(_cnn_state(), tmp_path / "w.pt")
    one_line_config_error(fragment, load_config, None, overrides)


def test_cnn_on_tabular_data_points_to_the_mlp(tmp_path):
    write_csv(tmp_path / "t.csv", csv_rows())
    cfg, data = data_of("data.path=t.csv")
    one_line_config_error("set model.name='mlp'", model_for, cfg, data)


# -- dpfl train and dpfl simulate -----------------------------------------------------------------
FAST = ["--set", "training.max-steps=5", "--set", "data.batch-size=64", "--json"]


@pytest.mark.parametrize(
    "sets, reader, model",
    [
        (["data.path=d.npz"], "npz", "cnn"),
        (["data.path=imgs"], "folder", "cnn"),
        (["data.path=t.csv", "model.name=mlp"], "csv", "mlp"),
        (["data.path=d.npz", "model.path=ownmodels:build"], "npz", "factory"),
        (["data.path=d.npz", "model.path=w.pt"], "npz", "cnn"),
    ],
)
def test_train_on_own_data_and_models(tmp_path, store_path, factories, sets, reader, model):
    # Prepare: data with a signal that 5 private steps pick up
    x, y = learnable_images(100)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    write_folder(tmp_path / "imgs", per_class=100)
    write_csv(tmp_path / "t.csv", learnable_csv_rows())
    torch.save(_cnn_state(), tmp_path / "w.pt")
    args = [a for s in sets for a in ("--set", s)]

    csv_labels = [int(r.rsplit(",", 1)[1]) for r in learnable_csv_rows()]
    n_train = {  # n_c - round(0.2 n_c) per class
        "csv": sum(n - round(0.2 * n) for n in np.bincount(csv_labels)),
        "npz": 2 * (100 - 20),
        "folder": 2 * (100 - 20),
    }

    # Execute
    result = invoke("train", *args, *FAST, "--store", store_path)

    # Assert: the run read the own data (q = B / N) with the own model
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 5 and 0 <= summary["accuracy"] <= 1
    with RunStore(store_path) as store:
        run = store.get_run(summary["run"])
        events = store.privacy_events(run["id"])
    assert (run["config"]["data"]["name"], run["config"]["model"]["name"]) == (reader, model)
    assert events[0]["sample_rate"] == pytest.approx(64 / n_train[reader])


def test_train_refuses_an_own_model_with_batchnorm(store_path, factories):
    result = invoke(
        "train",
        "--set",
        "data.path=d.npz",
        "--set",
        "model.path=ownmodels:with_batchnorm",
        *FAST,
        "--set",
        "data.batch-size=16",
        "--store",
        store_path,
    )
    assert_one_line_error(result, "BatchNorm2d")


def test_train_bad_own_data_is_one_line(tmp_path, store_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 2)))
    result = invoke("train", "--set", "data.path=d.npz", *FAST, "--store", store_path)
    assert_one_line_error(result, "no array 'y'")


def test_federation_clients_read_the_own_data(tmp_path, factories):
    from dpfl.clients.federated import client_datasets

    cfg = load_config(None, ["data.path=d.npz", "federation.num-clients=3"])
    parts = [client_datasets(cfg, i) for i in range(3)]
    assert sum(len(a) + len(b) for a, b in parts) == 32  # the 40 records less 8 held out
    assert all(torch.equal(a.dataset.tensors[0], parts[0][0].dataset.tensors[0]) for a, _ in parts)
    assert parts[0][0].dataset.tensors[0].shape[1:] == (1, 8, 8)


def test_simulate_on_own_data_and_model(store_path, factories):
    result = invoke(
        "simulate",
        *("--set", "data.path=d.npz", "--set", "model.path=ownmodels:build"),
        *("--set", "federation.num-clients=2", "--set", "federation.rounds=1"),
        *("--set", "federation.local-steps=2", "--set", "data.batch-size=8"),
        "--json",
        "--store",
        store_path,
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    with RunStore(store_path) as store:
        run = store.get_run(summary["run"])
    assert run["status"] == "completed"
    assert run["config"]["data"]["name"] == "npz" and run["config"]["model"]["name"] == "factory"
