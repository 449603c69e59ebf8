"""``dpfl finetune`` on a tiny random BERT (the text-classification fixture): flags, resume of a
killed run, the federated mode, and bad input as one line."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from dpfl.cli.finetune import infer_task
from dpfl.cli.main import app
from dpfl.clients import central
from dpfl.config import Config
from dpfl.store import RunStore
from tests.reference import rdp_epsilon
from tests.tasks.test_text_classification import tiny  # noqa: F401 - the fixture

BASE = [
    "--set",
    "data.batch-size=32",
    "--set",
    "optimizer.name='adam'",
    "--set",
    "optimizer.lr=0.05",
]


def finetune(tiny, store, *args):  # noqa: F811
    argv = ["finetune", "--model", tiny["model"], "--data", tiny["csv"], "--store", str(store)]
    return CliRunner().invoke(app, [*argv, *BASE, *args], catch_exceptions=False)


def test_flags_become_config_keys_and_the_run_is_a_finetune_run(tiny, tmp_path):  # noqa: F811
    store = tmp_path / "s.sqlite"
    r = finetune(tiny, store, "--lora-r", "3", "--epsilon", "40", "--epochs", "8", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    with RunStore(store) as s:
        row = s.get_run(summary["run"])
        events = s.privacy_events(summary["run"])
    cfg = Config.from_dict(row["config"])
    assert row["kind"] == "finetune" and cfg.task == "text-classification"
    assert cfg.lora.r == 3 and cfg.privacy.target_epsilon == 40 and cfg.training.epochs == 8
    assert cfg.model.name == "hf" and cfg.data.name == "csv"
    assert cfg.optimizer.schedule == "cosine"  # the embedded central recipe
    assert summary["epsilon"] <= 40 and len(events) == summary["steps"]
    assert summary["tokens_per_second"] > 0 and summary["trainable_parameters"] > 0


def test_a_killed_run_resumes_from_its_last_epoch_bit_identically(tiny, tmp_path, monkeypatch):  # noqa: F811
    whole, killed = tmp_path / "whole.sqlite", tmp_path / "killed.sqlite"
    args = ("--noise-multiplier", "0.5", "--epochs", "10", "--lora-r", "4", "--json")
    r = finetune(tiny, whole, *args)
    assert r.exit_code == 0, r.output
    reference = json.loads(r.stdout)

    real = central.train_private

    def dies_in_epoch_three(pt, **kw):
        inner = kw["on_step"]

        def on_step(step, loss):
            inner(step, loss)
            if pt.optimizer.steps >= int(6.5 * len(pt.data_loader)):
                raise KeyboardInterrupt  # the process is killed mid-epoch 7

        return real(pt, **{**kw, "on_step": on_step})

    monkeypatch.setattr(central, "train_private", dies_in_epoch_three)
    r = finetune(tiny, killed, *args)
    assert r.exit_code == 130
    monkeypatch.setattr(central, "train_private", real)
    with RunStore(killed) as s:
        (run,) = s.list_runs()
        spent_before = len(s.privacy_events(run["id"]))
    assert run["status"] in ("interrupted", "killed")
    r = CliRunner().invoke(
        app, ["finetune", "--resume", run["id"][:8], "--store", str(killed), "--json"],
        catch_exceptions=False,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    resumed = json.loads(r.stdout)
    # the same model, bit for bit: checkpointed optimizer, noise and sampler generators
    assert resumed["accuracy"] == reference["accuracy"]
    assert resumed["test_loss"] == reference["test_loss"]
    assert resumed["steps"] == reference["steps"]
    with RunStore(killed) as s:
        events = s.privacy_events(run["id"])
        checkpoints = [a for a in s.artifacts(run["id"]) if a["kind"] == "checkpoint"]
    # every step spent counts, the killed attempt's steps after the checkpoint included
    assert len(events) > reference["steps"] and len(events) > spent_before
    assert resumed["epsilon"] > reference["epsilon"]
    assert len(checkpoints) == 1  # a central run keeps only its latest checkpoint


def test_resume_refuses_new_flags_and_other_runs(tiny, tmp_path):  # noqa: F811
    store = tmp_path / "s.sqlite"
    r = finetune(
        tiny, store, "--noise-multiplier", "0.5", "--epochs", "10", "--lora-r", "4", "--json"
    )
    assert r.exit_code == 0, r.output
    run = json.loads(r.stdout)["run"]
    cases = [
        (["--resume", run, "--lora-r", "2"], "drop --lora-r"),
        (["--resume", run], "already completed"),
    ]
    for argv, fragment in cases:
        r = CliRunner().invoke(app, ["finetune", *argv, "--store", str(store)])
        assert r.exit_code == 2 and fragment in r.stderr, r.output
        assert len(r.stderr.strip().splitlines()) == 1


def test_federated_finetune_moves_adapters_and_accounts_each_client(tiny, tmp_path):  # noqa: F811
    store, out = tmp_path / "s.sqlite", tmp_path / "adapter"
    r = finetune(
        tiny, store, "--federated", "--clients", "3", "--rounds", "2", "--noise-multiplier",
        "2.0", "--set", "federation.partition='iid'", "--output", str(out), "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["rounds"] == 2 and (out / "adapter_config.json").exists()
    with RunStore(store) as s:
        row = s.get_run(summary["run"])
        events = s.privacy_events(summary["run"])
        models = [a for a in s.artifacts(summary["run"]) if a["kind"] == "model"]
    assert row["kind"] == "finetune-federated" and models
    cfg = Config.from_dict(row["config"])
    torch.manual_seed(cfg.seed)
    from dpfl.tasks import get_task

    task = get_task(cfg)
    model = task.build_model(task.load_data())
    adapter_bytes = sum(v.numel() * v.element_size() for v in task.trainable_state(model).values())
    full = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    # each round: the adapters down to each of 3 clients and back, never the base model
    assert summary["bytes_per_round"] == pytest.approx(6 * adapter_bytes)
    assert summary["bytes_per_round"] < full
    # each client's epsilon is the accountant's for the steps it took: every client ran
    # local-epochs / q steps in each of the 2 rounds (fraction 1), q = batch / its records
    from dpfl.accountants import steps_for_epochs
    from dpfl.clients.federated import client_datasets

    assert len(summary["epsilon_per_client"]) == 3
    for pid in range(3):
        n = len(client_datasets(cfg, pid)[0])
        q = 32 / n
        steps = 2 * steps_for_epochs(cfg.federation.local_epochs, q)
        mine = [e for e in events if e["participant"] == f"client-{pid}"]
        assert sum(e["steps"] for e in mine) == steps
        assert {e["noise_multiplier"] for e in mine} == {2.0}
        ref = rdp_epsilon(2.0, q, steps, 1e-5)  # dp_accounting's RDP (agrees to 0.1% here)
        assert summary["epsilon_per_client"][f"client-{pid}"] == pytest.approx(ref, rel=2e-3)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--lora-r", "0"], "--lora-r must be >= 1"),
        (["--lora-r", "-3"], "--lora-r must be >= 1"),
        (["--full", "--lora-r", "4"], "choose one"),
        (["--epsilon", "3", "--noise-multiplier", "1"], "give one"),
        (["--epsilon", "0"], "epsilon"),
        (["--clients", "3"], "--federated"),
        (["--task", "causal-lm", "--model", "minilm"], "contradicts"),
        (["--set", "nope.key=1"], "nope"),
    ],
)
def test_bad_input_is_one_line_exit_2(tiny, tmp_path, argv, fragment):  # noqa: F811
    r = CliRunner().invoke(
        app, ["finetune", "--model", tiny["model"], "--data", tiny["csv"], *argv,
              "--store", str(tmp_path / "s.sqlite")],
    )  # fmt: skip
    assert r.exit_code == 2, r.output
    assert fragment in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.output


def test_bad_model_and_data_are_one_line(tiny, tmp_path):  # noqa: F811
    no_text = tmp_path / "bad.csv"
    no_text.write_text("review,label\nnice,1\nbad,0\n")
    cases = [
        (["--model", str(tmp_path / "nowhere")], "nowhere"),
        (["--data", str(tmp_path / "missing.csv")], "missing.csv"),
        (["--data", str(no_text)], "no 'text' column"),
        (["--model", "not a model"], "model.path"),
    ]
    for argv, fragment in cases:
        full = ["finetune", "--model", tiny["model"], "--data", tiny["csv"], *argv]
        r = CliRunner().invoke(app, [*full, "--store", str(tmp_path / "s.sqlite")])
        assert r.exit_code == 2, (argv, r.output)
        assert fragment in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    with RunStore(tmp_path / "s.sqlite") as s:
        assert s.list_runs() == []  # refused before any run existed


def test_the_task_follows_the_model_and_data():
    assert infer_task(None, None, None) == "text-classification"
    assert infer_task("smollm2", None, None) == "causal-lm"
    assert infer_task(None, "shakespeare", None) == "causal-lm"
    assert infer_task("minilm", "rotten-tomatoes", "text-classification") == "text-classification"


def test_non_private_uses_the_baselines_recipe_unless_set(tiny, tmp_path):  # noqa: F811
    store = tmp_path / "s.sqlite"
    argv = ["finetune", "--model", tiny["model"], "--data", tiny["csv"], "--store", str(store)]
    r = CliRunner().invoke(
        app, [*argv, "--non-private", "--set", "training.max-steps=2", "--json"],
        catch_exceptions=False,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    r2 = CliRunner().invoke(
        app, [*argv, "--non-private", "--set", "optimizer.lr=0.01", "--set",
              "training.max-steps=2", "--json"], catch_exceptions=False,
    )  # fmt: skip
    assert r2.exit_code == 0, r2.output
    with RunStore(store) as s:
        a = Config.from_dict(s.get_run(json.loads(r.stdout)["run"])["config"])
        b = Config.from_dict(s.get_run(json.loads(r2.stdout)["run"])["config"])
    assert not a.privacy.enabled and a.optimizer.name == "adam" and a.optimizer.lr == 0.002
    assert a.data.batch_size == 32 and a.training.epochs == 1.0
    assert b.optimizer.lr == 0.01  # an explicit --set wins over the recipe


def test_federated_finetune_with_fedsvd_uploads_only_b_and_exports_orthonormal_a(tiny, tmp_path):  # noqa: F811
    store, out = tmp_path / "s.sqlite", tmp_path / "adapter"
    r = finetune(
        tiny, store, "--federated", "--clients", "3", "--rounds", "2", "--epsilon", "5",
        "--set", "federation.strategy='fedsvd'", "--set", "federation.partition='iid'",
        "--set", "optimizer.name='sgd'", "--set", "optimizer.lr=0.5",
        "--output", str(out), "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert all(e <= 5.0 for e in summary["epsilon_per_client"].values())
    with RunStore(store) as s:
        cfg = Config.from_dict(s.get_run(summary["run"])["config"])
        rows = [m for m in s.metrics(summary["run"]) if m["name"] == "bytes-up"]
    assert cfg.federation.strategy == "fedsvd"
    assert cfg.optimizer.schedule == "constant"  # clients: no central lr schedule
    from dpfl.tasks import get_task

    task = get_task(cfg)
    state = task.trainable_state(task.build_model(task.load_data()))
    b_only = sum(v.numel() * v.element_size() for k, v in state.items() if "lora_A" not in k)
    everything = sum(v.numel() * v.element_size() for v in state.values())
    assert rows and all(m["value"] == 3 * b_only for m in rows)
    assert summary["bytes_per_round"] == pytest.approx(3 * b_only + 3 * everything)
    # the exported adapter's A came out of the last re-factorization: orthonormal rows
    from safetensors.torch import load_file

    weights = load_file(out / "adapter_model.safetensors")
    a_keys = [k for k in weights if "lora_A" in k]
    assert a_keys
    for k in a_keys:
        a = weights[k].double()
        assert torch.allclose(a @ a.T, torch.eye(a.shape[0], dtype=torch.float64), atol=1e-5)
