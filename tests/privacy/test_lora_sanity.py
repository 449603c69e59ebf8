"""opacus#820 asks: do LoRA fine-tunes run but corrupt the adapters? With noise 0 and a clip
larger than every per-record norm, one private step must equal one non-private step, on every
per-sample backend, for BERT-, GPT-2- and Llama-like peft LoRA models fed HF-style dict batches.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader, Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

from dpfl.privacy import make_private

B, T, VOCAB = 6, 10, 50


def bert():
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=T, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=2,
    )  # fmt: skip
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                      modules_to_save=["classifier"], lora_dropout=0.0)  # fmt: skip
    return get_peft_model(BertForSequenceClassification(cfg), lora), "cls"


def gpt2():
    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=T, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, num_labels=2, pad_token_id=0,
    )  # fmt: skip
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                      modules_to_save=["score"], lora_dropout=0.0)  # fmt: skip
    return get_peft_model(GPT2ForSequenceClassification(cfg), lora), "cls"


def llama():
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=T,
    )  # fmt: skip
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return get_peft_model(LlamaForCausalLM(cfg), lora), "lm"


def mean_pool():
    """dpfl's mean-pooling classifier (the embedded minilm's head) on a LoRA'd BertModel: the
    mean is over each record's own unpadded tokens (two records here are padded)."""
    from transformers import BertModel

    from dpfl.config import LoraConfig as DpflLora
    from dpfl.tasks.hf import apply_lora
    from dpfl.tasks.text import MeanPoolClassifier, _drop_pooler

    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=T, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    encoder = apply_lora(_drop_pooler(BertModel(cfg)), DpflLora(r=4, alpha=8.0), None)
    return MeanPoolClassifier(encoder, 2), "cls"


class Records(Dataset):
    """HF-style records: ({input_ids, attention_mask}, label); the last two are padded."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, T), generator=g)
        self.mask = torch.ones(n, T, dtype=torch.long)
        self.mask[-2:, T - 3 :] = 0
        self.ids[self.mask == 0] = 0
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}, self.labels[i]


def cls_loss(out, y):
    return F.cross_entropy(out.logits, y, reduction="none")


def lm_loss(out, y):
    """Per record: mean next-token cross-entropy over its real (unpadded) positions; the
    targets travel in y = (input_ids, attention_mask), batch first, so they slice with it."""
    ids, mask = y
    logits, target, m = out.logits[:, :-1], ids[:, 1:], mask[:, 1:].float()
    ce = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    return (ce * m).sum(1) / m.sum(1)


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("backend", ["bk", "hooks", "functorch", "ghost"])
@pytest.mark.parametrize(
    "build", [bert, gpt2, llama, mean_pool], ids=["bert", "gpt2", "llama", "mean-pool"]
)
def test_noise_free_unclipped_private_step_equals_the_plain_step(build, backend):
    torch.manual_seed(0)
    model, kind = build()
    twin = copy.deepcopy(model)
    data = Records(B)
    x, y = next(iter(DataLoader(data, batch_size=B)))
    loss_fn = cls_loss
    if kind == "lm":
        loss_fn, y = lm_loss, (x["input_ids"], x["attention_mask"])
    before = trainable(model)
    assert before and all(
        "lora_" in n or "modules_to_save" in n or n.startswith("classifier.") for n in before
    )

    # the reference: one plain SGD step on the mean loss of the batch
    twin.train()
    plain = torch.optim.SGD([p for p in twin.parameters() if p.requires_grad], lr=0.5)
    loss_fn(twin(**x), y).mean().backward()
    plain.step()
    expected = trainable(twin)

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    pt = make_private(
        model, opt, DataLoader(data, batch_size=B), noise_multiplier=0.0, clip_norm=1e6,
        grad_sample_mode=backend, poisson_sampling=False, seed=0,
    )  # fmt: skip
    try:
        pt.train_step(x, y, loss_fn)
    finally:
        pt.detach()
    got = trainable(model)
    moved = 0
    for name, value in expected.items():
        assert torch.allclose(got[name], value, rtol=1e-4, atol=1e-6), (name, backend)
        moved += int(not torch.equal(value, before[name]))
    assert moved >= len(expected) // 2  # the step changed the adapters: not a vacuous equality


def test_poisson_empty_batches_keep_the_dict_structure_and_step():
    """An empty Poisson batch of dict records (even as the very first batch, where Opacus
    would fall back to tensors shaped like a record's top-level items) is a dict with zero rows;
    the step on it releases noise only."""
    torch.manual_seed(0)
    model, _ = bert()
    data = Records(8)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    pt = make_private(
        model, opt, DataLoader(data, batch_size=2), noise_multiplier=1.0, clip_norm=1.0, seed=0
    )
    try:
        x, y = pt.data_loader.collate_fn([])
        assert set(x) == {"input_ids", "attention_mask"} and x["input_ids"].shape == (0, T)
        assert y.shape == (0,)
        before = trainable(model)
        assert torch.isnan(torch.tensor(pt.train_step(x, y, cls_loss)))
        after = trainable(model)
        assert any(not torch.equal(before[n], after[n]) for n in before)  # noise was released
        assert pt.ledger.events and pt.ledger.events[-1].steps == 1
    finally:
        pt.detach()


@pytest.mark.parametrize("backend", ["bk", "hooks", "ghost"])
@pytest.mark.parametrize(
    "build", [bert, gpt2, llama, mean_pool], ids=["bert", "gpt2", "llama", "mean-pool"]
)
def test_one_record_moves_the_released_sum_by_at_most_c_with_dict_batches(build, backend):
    """Through train_step with HF dict batches (noise 0, every record clipped): the released
    clipped sum with and without the last record differs by at most C."""
    clip = 1e-3

    def released(model, x, y, loss_fn):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        pt = make_private(
            model, opt, DataLoader(Records(B), batch_size=B), noise_multiplier=0.0,
            clip_norm=clip, grad_sample_mode=backend, poisson_sampling=False, seed=0,
        )  # fmt: skip
        try:
            pt.train_step(x, y, loss_fn)
            return torch.cat([p.grad.flatten() for p in pt.optimizer.params]) * B
        finally:
            pt.detach()

    torch.manual_seed(0)
    model, kind = build()
    x, y = next(iter(DataLoader(Records(B), batch_size=B)))
    loss_fn = cls_loss
    if kind == "lm":
        loss_fn, y = lm_loss, (x["input_ids"], x["attention_mask"])
    full = released(copy.deepcopy(model), x, y, loss_fn)
    fewer_x = {k: v[:-1] for k, v in x.items()}
    fewer_y = tuple(t[:-1] for t in y) if isinstance(y, tuple) else y[:-1]
    fewer = released(copy.deepcopy(model), fewer_x, fewer_y, loss_fn)
    moved = float((full - fewer).norm())
    assert moved <= clip * (1 + 1e-4), moved
    assert moved >= clip * 0.5  # the removed record was clipped to ~C: not a vacuous bound


@pytest.mark.parametrize("backend", ["bk", "ghost"])
def test_dict_batches_split_into_physical_batches_give_the_same_step(backend):
    """data.physical-batch-size with HF dict batches: the logical batch of 6 records put through
    the model 4 + 2 at a time releases the same clipped sum as all 6 at once (noise 0, a clip
    every record reaches: the split must not change any record's clipping or drop a record)."""

    def step(physical):
        torch.manual_seed(0)
        model, _ = bert()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        pt = make_private(
            model, opt, DataLoader(Records(B), batch_size=B), noise_multiplier=0.0,
            clip_norm=1e-3, grad_sample_mode=backend, poisson_sampling=False, seed=0,
            physical_batch_size=physical,
        )  # fmt: skip
        try:
            x, y = next(iter(DataLoader(Records(B), batch_size=B)))
            pt.train_step(x, y, cls_loss)
            return trainable(model)
        finally:
            pt.detach()

    whole, split = step(None), step(4)
    torch.manual_seed(0)
    start = trainable(bert()[0])
    assert whole.keys() == split.keys() == start.keys()
    for n in whole:
        assert torch.allclose(whole[n], split[n], atol=1e-7), n
    assert any(not torch.allclose(whole[n], start[n]) for n in whole)  # the step moved them
