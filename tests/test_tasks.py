"""The task seam (issue 11, step 1): what gets trained is built through ``get_task(cfg)``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from flwr.app import Message
from typer.testing import CliRunner

from dpfl.cli.main import app
from dpfl.clients.client_app import train as dpfl_train
from dpfl.config import load_config
from dpfl.data import load_dataset
from dpfl.errors import ConfigError
from dpfl.models import create_model
from dpfl.server.loop import run_rounds
from dpfl.simulation.inprocess import InProcessGrid
from dpfl.tasks import ImageClassification, get_task


def test_the_default_task_is_image_classification_built_as_before():
    cfg = load_config(None, [])
    task = get_task(cfg)
    assert isinstance(task, ImageClassification) and task.metric == "accuracy"
    data = task.load_data()
    ref = load_dataset(cfg.data, cfg.seed)
    assert torch.equal(data.train.tensors[0], ref.train.tensors[0])
    assert torch.equal(data.test.tensors[1], ref.test.tensors[1])
    torch.manual_seed(0)
    model = task.build_model(data)
    torch.manual_seed(0)
    same = create_model(cfg.model, channels=1, image_size=8, num_classes=10)
    for a, b in zip(model.state_dict().values(), same.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    x, y = data.test.tensors
    out = model(x[:7])
    assert torch.equal(
        task.per_sample_loss(out, y[:7]), F.cross_entropy(out, y[:7], reduction="none")
    )
    m = task.evaluate(model, data.test)
    with torch.no_grad():
        full = model(x)
    assert m["loss"] == pytest.approx(float(F.cross_entropy(full, y)), rel=1e-5)
    assert m["accuracy"] == pytest.approx(float((full.argmax(1) == y).float().mean()))
    assert (task.labels(data.train) == ref.train.tensors[1].numpy()).all()


def test_trainable_state_round_trips_to_identical_outputs():
    cfg = load_config(None, [])
    task = get_task(cfg)
    data = task.load_data()
    torch.manual_seed(1)
    a = task.build_model(data)
    torch.manual_seed(2)
    b = task.build_model(data)
    x = data.test.tensors[0][:5]
    assert not torch.equal(a(x), b(x))
    task.load_trainable_state(b, task.trainable_state(a))
    assert torch.equal(a(x), b(x))


def test_federation_messages_hold_exactly_the_tasks_trainable_state():
    cfg = load_config(
        None,
        [
            "data.name='digits'",
            "federation.num-clients=2",
            "federation.rounds=1",
            "federation.local-steps=2",
            "data.batch-size=32",
        ],
    )
    task = get_task(cfg)
    expected = set(task.trainable_state(task.build_model(task.load_data())))
    sent, received = [], []

    def spy(msg: Message, ctx):
        sent.append(set(msg.content.array_records["arrays"].keys()))
        reply = dpfl_train(msg, ctx)
        received.append(set(reply.content.array_records["arrays"].keys()))
        return reply

    from flwr.clientapp import ClientApp

    client = ClientApp()

    @client.train()
    def _train(msg, context):
        return spy(msg, context)

    result = run_rounds(InProcessGrid(client, 2), cfg)
    assert result.rounds_completed == 1
    assert sent and all(keys == expected for keys in sent + received)


def test_an_unknown_task_is_one_line():
    with pytest.raises(ConfigError, match="task must be one of image-classification"):
        load_config(None, ["task='sentiment'"])
    result = CliRunner().invoke(app, ["train", "--set", "task='sentiment'"])
    assert result.exit_code == 2 and result.stderr.startswith("dpfl: error: task must be one of")
