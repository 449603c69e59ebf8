"""The causal-LM task end to end on tiny random GPT-2 and Llama configs with a word-level
tokenizer written to a temporary directory (no downloads, seconds)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from typer.testing import CliRunner

from dpfl.cli.main import app
from dpfl.config import Config, load_config
from dpfl.store import RunStore
from dpfl.tasks import get_task
from dpfl.tasks.causal_lm import BLOCK, IGNORE, _blocks

WORDS = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler"]


def _tokenizer():
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )
    return fast, len(vocab)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny_lm(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"tiny-{request.param}")
    fast, vocab = _tokenizer()
    model_dir = root / "model"
    fast.save_pretrained(model_dir)
    torch.manual_seed(0)
    if request.param == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab, n_positions=128, bos_token_id=2, eos_token_id=2, n_embd=16,
            n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0,
        )  # fmt: skip
        GPT2LMHeadModel(cfg).save_pretrained(model_dir)
    else:
        cfg = LlamaConfig(
            vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
            pad_token_id=0,
        )  # fmt: skip
        LlamaForCausalLM(cfg).save_pretrained(model_dir)
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(160):  # a learnable pattern: "to be or not to be ..." from a random offset
        start, n = int(torch.randint(0, 4, (1,), generator=g)), 6 + i % 5
        rows.append({"text": " ".join(WORDS[(start + j) % 4] for j in range(n))})
    jsonl = root / "lines.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    return {"model": str(model_dir), "jsonl": str(jsonl), "arch": request.param}


def sets(tiny, *extra):
    return [
        "task='causal-lm'",
        f"model.path='{tiny['model']}'",
        f"data.path='{tiny['jsonl']}'",
        "data.batch-size=16",
        "lora.r=4",
        *extra,
    ]


def test_records_mask_padding_and_the_loss_is_each_records_own_hf_loss(tiny_lm):
    task = get_task(load_config(None, sets(tiny_lm)))
    data = task.load_data()
    x, y = data.train[0]
    assert x["input_ids"].shape == (128,) and y.shape == (128,)
    assert torch.equal(y == IGNORE, x["attention_mask"] == 0)  # labels ignored on padding only
    model = task.build_model(data).eval()
    xs = [data.train[i] for i in range(6)]
    batch = {k: torch.stack([r[0][k] for r in xs]) for k in ("input_ids", "attention_mask")}
    labels = torch.stack([r[1] for r in xs])
    with torch.no_grad():
        ours = task.per_sample_loss(model(**batch), labels)
        # reference: transformers' own shifted LM loss, one record at a time
        ref = torch.stack(
            [
                model(**{k: v[i : i + 1] for k, v in batch.items()}, labels=labels[i : i + 1]).loss
                for i in range(6)
            ]
        )
    assert ours.shape == (6,)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_perplexity_is_exp_of_the_token_weighted_mean_loss(tiny_lm):
    task = get_task(load_config(None, sets(tiny_lm)))
    data = task.load_data()
    model = task.build_model(data).eval()
    m = task.evaluate(model, data.test)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(len(data.test)):
            x, y = data.test[i]
            n = int((y[1:] != IGNORE).sum())
            loss = model(**{k: v[None] for k, v in x.items()}, labels=y[None]).loss
            total, tokens = total + float(loss) * n, tokens + n
    assert m["loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert m["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-5)


def test_a_corpus_is_cut_into_blocks_that_are_records():
    ids = list(range(5 * BLOCK + 7))
    blocks = _blocks(ids, BLOCK)
    assert blocks.shape == (5, BLOCK) and blocks.flatten().tolist() == ids[: 5 * BLOCK]


def test_finetune_trains_a_causal_lm_privately_and_the_adapter_reloads(tiny_lm, tmp_path):
    store, out = tmp_path / "s.sqlite", tmp_path / "adapter"
    args = [
        "finetune", "--model", tiny_lm["model"], "--data", tiny_lm["jsonl"], "--task",
        "causal-lm", "--epochs", "4", "--noise-multiplier", "0.5", "--lora-r", "4", "--json",
        "--store", str(store), "--output", str(out), "--set", "data.batch-size=16",
        "--set", "optimizer.lr=2.0",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["task"] == "causal-lm" and math.isfinite(summary["perplexity"])
    assert 0 < summary["trainable_parameters"] < summary["parameters"]
    with RunStore(store) as s:
        assert len(s.privacy_events(summary["run"])) == summary["steps"]
        cfg = Config.from_dict(s.get_run(summary["run"])["config"])  # finetune's defaults + flags
    assert cfg.task == "causal-lm" and cfg.lora.r == 4 and cfg.privacy.noise_multiplier == 0.5
    task = get_task(cfg)
    data = task.load_data()
    torch.manual_seed(0)
    initial = task.evaluate(task.build_model(data), data.test)["perplexity"]
    assert summary["perplexity"] < initial  # it learned the pattern (random init: ~vocab size)
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_lm["model"])
    loaded = PeftModel.from_pretrained(base, out).eval()
    assert task.evaluate(loaded, data.test)["perplexity"] == pytest.approx(
        summary["perplexity"], rel=1e-5
    )


def test_a_federation_fine_tunes_a_causal_lm_exchanging_only_adapters(tiny_lm, tmp_path):
    store = tmp_path / "s.sqlite"
    args = [
        "finetune", "--model", tiny_lm["model"], "--data", tiny_lm["jsonl"], "--federated",
        "--clients", "2", "--rounds", "2", "--noise-multiplier", "1.0", "--json",
        "--store", str(store), "--set", "data.batch-size=16",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["task"] == "causal-lm" and summary["rounds"] == 2
    assert math.isfinite(summary["perplexity"]) and set(summary["epsilon_per_client"]) == {
        "client-0",
        "client-1",
    }
    with RunStore(store) as s:
        cfg = Config.from_dict(s.get_run(summary["run"])["config"])
        names = {m["name"] for m in s.metrics(summary["run"])}
    assert "perplexity" in names and "accuracy" not in names
    task = get_task(cfg)
    torch.manual_seed(cfg.seed)
    model = task.build_model(task.load_data())
    adapters = sum(v.numel() * v.element_size() for v in task.trainable_state(model).values())
    assert summary["bytes_per_round"] == 4 * adapters  # down to 2 clients and back, adapters only
