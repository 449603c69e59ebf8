"""The text-classification task end to end on a tiny random BERT and a word-level tokenizer
written to a temporary directory (no downloads, seconds)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast
from typer.testing import CliRunner

from dpfl.cli.main import app
from dpfl.config import load_config
from dpfl.store import RunStore
from dpfl.tasks import get_task

WORDS = ["good", "great", "fine", "fun", "bad", "awful", "dull", "boring", "the", "film", "was"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]",
    )  # fmt: skip
    model_dir = root / "model"
    fast.save_pretrained(model_dir)
    cfg = BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(240):
        positive = i % 2 == 0
        pool = WORDS[:4] if positive else WORDS[4:8]
        words = [pool[int(j)] for j in torch.randint(0, 4, (4,), generator=g)]
        rows.append(
            {"text": "the film was " + " ".join(words), "label": "pos" if positive else "neg"}
        )
    csv_path = root / "reviews.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)
    jsonl = root / "reviews.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    return {"model": str(model_dir), "csv": str(csv_path), "jsonl": str(jsonl), "root": root}


def sets(tiny, *extra):
    return [
        "task='text-classification'",
        f"model.path='{tiny['model']}'",
        f"data.path='{tiny['csv']}'",
        "data.batch-size=32",
        "lora.r=4",
        *extra,
    ]


def test_text_task_builds_lora_and_exchanges_only_adapters_and_head(tiny):
    cfg = load_config(None, sets(tiny))
    task = get_task(cfg)
    data = task.load_data()
    assert data.info["classes"] == ["neg", "pos"] and len(data.train) + len(data.test) == 240
    x, y = data.train[0]
    assert set(x) == {"input_ids", "attention_mask"} and x["input_ids"].shape == (64,)
    model = task.build_model(data)
    state = task.trainable_state(model)
    assert state and all("lora_" in k or "classifier" in k for k in state)
    total = sum(p.numel() for p in model.parameters())
    assert sum(v.numel() for v in state.values()) < total / 5
    other = task.build_model(data)
    task.load_trainable_state(other, state)
    batch = {k: v[None] for k, v in x.items()}
    model.eval(), other.eval()
    assert torch.equal(model(**batch).logits, other(**batch).logits)


def test_jsonl_and_csv_read_the_same_records(tiny):
    a = get_task(load_config(None, sets(tiny))).load_data()
    b = get_task(load_config(None, sets(tiny, f"data.path='{tiny['jsonl']}'"))).load_data()
    assert torch.equal(a.train.input_ids, b.train.input_ids)
    assert torch.equal(a.test.labels, b.test.labels)


def test_dpfl_train_fine_tunes_privately_end_to_end(tiny, tmp_path):
    store, out = tmp_path / "s.sqlite", tmp_path / "adapter"
    args = ["train", "--epochs", "10", "--json", "--store", str(store), "--output", str(out)]
    extra = ("optimizer.name='adam'", "optimizer.lr=0.05", "privacy.noise-multiplier=0.5")
    for s in sets(tiny, *extra):
        args += ["--set", s]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["accuracy"] > 0.8 and 0 < summary["epsilon"] < 100  # 0.94 here; chance 0.5
    assert "Loading" not in result.stderr and "Warning" not in result.stderr
    with RunStore(store) as s:
        events = s.privacy_events(summary["run"])
        stored = {a["name"]: a["data"] for a in s.artifacts(summary["run"], with_data=True)}
    assert len(events) == summary["steps"]
    # the adapter in peft's format loads back onto the base model with identical outputs
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    assert (out / "adapter_config.json").exists()
    assert stored["adapter_config.json"] == (out / "adapter_config.json").read_bytes()
    base = AutoModelForSequenceClassification.from_pretrained(tiny["model"], num_labels=2)
    loaded = PeftModel.from_pretrained(base, out).eval()
    cfg = load_config(None, sets(tiny))
    task = get_task(cfg)
    data = task.load_data()
    m = task.evaluate(loaded, data.test)
    assert m["accuracy"] == pytest.approx(summary["accuracy"])
    assert m["loss"] == pytest.approx(summary["test_loss"], rel=1e-5)


def test_bad_text_inputs_are_one_line(tiny, tmp_path):
    no_text = tmp_path / "bad.csv"
    no_text.write_text("review,label\nnice,1\nbad,0\n")
    cases = [
        (sets(tiny, f"data.path='{no_text}'"), "no 'text' column"),
        (sets(tiny, "lora.r=-1"), "lora.r must be an integer >= 0"),
        (sets(tiny, f"model.path='{tmp_path / 'nowhere'}'"), "model.path"),
        (sets(tiny, "data.path='missing.csv'"), "missing.csv"),
    ]
    for extra, fragment in cases:
        args = ["train", "--store", str(tmp_path / "s.sqlite")]
        for s in extra:
            args += ["--set", s]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (extra, result.output)
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("dpfl: error:") and fragment in lines[0]


def test_a_federation_fine_tunes_text_and_moves_only_the_adapters(tiny):
    from flwr.clientapp import ClientApp

    from dpfl.clients.client_app import train as dpfl_train
    from dpfl.server.loop import run_rounds
    from dpfl.simulation.inprocess import InProcessGrid

    extra = (
        "optimizer.name='adam'", "optimizer.lr=0.05", "privacy.noise-multiplier=0.5",
        "federation.num-clients=3", "federation.rounds=5", "federation.local-epochs=4",
        "data.batch-size=16", "federation.partition='dirichlet'",
    )  # fmt: skip
    cfg = load_config(None, sets(tiny, *extra))
    task = get_task(cfg)
    trainable = set(task.trainable_state(task.build_model(task.load_data())))
    seen = []
    client = ClientApp()

    @client.train()
    def _train(msg, context):
        seen.append(set(msg.content.array_records["arrays"].keys()))
        reply = dpfl_train(msg, context)
        seen.append(set(reply.content.array_records["arrays"].keys()))
        return reply

    result = run_rounds(InProcessGrid(client, 3), cfg)
    assert result.stopped == "completed" and result.rounds_completed == 5, result.message
    assert seen and all(keys == trainable for keys in seen)
    assert result.accuracy > 0.7
    assert set(result.epsilon) == {"client-0", "client-1", "client-2"}
    # bytes per round: the adapters and head only, down to each sampled client and back
    per_client = sum(v.numel() * v.element_size() for v in task.trainable_state(
        task.build_model(task.load_data())).values())  # fmt: skip
    full = sum(v.numel() * v.element_size() for v in task.build_model(task.load_data())
               .state_dict().values())  # fmt: skip
    assert per_client < full / 3
    for row in result.history:
        assert row["bytes-down"] == 3 * per_client and row["bytes-up"] == 3 * per_client


def test_freeze_a_trains_only_b_and_the_head_and_still_exchanges_a(tiny):
    from torch.utils.data import DataLoader

    from dpfl.privacy import make_private

    cfg = load_config(None, sets(tiny, "lora.freeze-a=true"))
    task = get_task(cfg)
    data = task.load_data()
    torch.manual_seed(0)
    model = task.build_model(data)
    state = task.trainable_state(model)
    a_names = [n for n in state if ".lora_A." in n]
    assert a_names and all(not dict(model.named_parameters())[n].requires_grad for n in a_names)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    pt = make_private(model, opt, DataLoader(data.train, batch_size=16), noise_multiplier=1.0,
                      clip_norm=1.0, seed=0)  # fmt: skip
    try:
        for x, y in pt.data_loader:
            pt.train_step(x, y, task.per_sample_loss)
            break
    finally:
        pt.detach()
    after = task.trainable_state(model)
    assert all(torch.equal(after[n], state[n]) for n in a_names)  # A never moves
    assert any(not torch.equal(after[n], state[n]) for n in after if ".lora_B." in n)
    # another learner's own random A is replaced by the shared one
    torch.manual_seed(1)
    other = task.build_model(data)
    task.load_trainable_state(other, after)
    assert all(torch.equal(task.trainable_state(other)[n], state[n]) for n in a_names)


def test_non_private_text_training_takes_dict_batches(tiny, tmp_path):
    args = ["train", "--non-private", "--epochs", "5", "--json", "--store", str(tmp_path / "s")]
    for s in sets(tiny, "optimizer.name='adam'", "optimizer.lr=0.05"):
        args += ["--set", s]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["accuracy"] > 0.8


def test_natural_partition_keeps_each_owner_on_one_client(tiny, tmp_path):
    import numpy as np

    from dpfl.clients.federated import client_datasets
    from dpfl.data.partition import partition_indices
    from dpfl.errors import ConfigError

    # the partition itself: owners never split, every record once, K owners -> one each
    groups = np.array(["a", "b", "a", "c", "b", "c", "d", "d"])
    parts = partition_indices(np.zeros(8), 4, "natural", groups=groups, seed=1, min_size=1)
    assert sorted(np.concatenate(parts).tolist()) == list(range(8))
    assert sorted(len(set(groups[p])) for p in parts) == [1, 1, 1, 1]
    with pytest.raises(ConfigError, match="4 groups for 5 clients"):
        partition_indices(np.zeros(8), 5, "natural", groups=groups, min_size=1)
    with pytest.raises(ConfigError, match="needs data whose records name their owner"):
        partition_indices(np.zeros(8), 2, "natural")
    # through the text task: a 'group' column names the owners
    from pathlib import Path

    rows = [json.loads(line) for line in Path(tiny["jsonl"]).read_text().splitlines()]
    for i, r in enumerate(rows):
        r["group"] = f"movie-{i % 6}"
    path = tmp_path / "grouped.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = load_config(
        None,
        sets(tiny, f"data.path='{path}'", "federation.num-clients=3",
             "federation.partition='natural'", "federation.client-test-fraction=0"),
    )  # fmt: skip
    task = get_task(cfg)
    seen = []
    for pid in range(3):
        train, _ = client_datasets(cfg, pid)
        owners = set(task.groups(train).tolist())
        assert len(owners) == 2  # 6 movies dealt to 3 clients
        seen.append(owners)
    assert set().union(*seen) == {f"movie-{i}" for i in range(6)}


def test_mean_pooling_trains_privately_and_its_export_reloads(tiny, tmp_path):
    """model.pooling='mean' (the embedded minilm's head): the encoder's adapter loads with
    PeftModel.from_pretrained onto AutoModel, and load_mean_pool_classifier rebuilds the whole
    classifier with identical held-out results."""
    from peft import PeftModel
    from transformers import AutoModel

    from dpfl.clients.central import train_central
    from dpfl.tasks.text import MeanPoolClassifier, load_mean_pool_classifier

    out = tmp_path / "adapter"
    extra = ("model.pooling='mean'", "optimizer.name='adam'", "optimizer.lr=0.05",
             "privacy.noise-multiplier=0.5", "training.epochs=10")  # fmt: skip
    cfg = load_config(None, sets(tiny, *extra))
    result = train_central(cfg, output=out)
    assert result.accuracy > 0.8  # chance 0.5
    task = get_task(cfg)
    data = task.load_data()
    assert isinstance(task.build_model(data), MeanPoolClassifier)
    loaded = load_mean_pool_classifier(tiny["model"], out)
    m = task.evaluate(loaded, data.test)
    assert m["accuracy"] == pytest.approx(result.accuracy)
    assert m["loss"] == pytest.approx(result.test_loss, rel=1e-5)
    encoder = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny["model"]), out)
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in encoder.named_parameters())


def test_the_embedded_minilm_pools_by_mean_and_other_models_by_cls(tiny):
    from dpfl.tasks.text import MeanPoolClassifier

    assert get_task(load_config(None, ["task='text-classification'", "model.name='minilm'"])
                    ).pooling() == "mean"  # fmt: skip
    task = get_task(load_config(None, sets(tiny)))
    assert task.pooling() == "cls"
    assert not isinstance(task.build_model(task.load_data()), MeanPoolClassifier)
