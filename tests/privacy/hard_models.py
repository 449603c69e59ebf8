"""Models that are *not* the easy ones, for the privacy-boundary tests (issue 9).

Each ``accepted`` case is a model the private step must train exactly (released clipped sum ==
the microbatch reference; one record removed moves it by <= C); each ``refused`` case breaks the
guarantee in a way the step must detect and refuse with :class:`IncompatibleModelError`.

A case is ``(model_factory, inputs, targets, loss)``: ``inputs`` is a dict of keyword tensors
(batch first) or a single tensor, ``loss(output, targets)`` returns per-sample losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from opacus.layers import DPGRU, DPLSTM, DPRNN, DPMultiheadAttention
from torch import nn

BATCH = 4


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def lm_loss(out, y):
    logits = out.logits if hasattr(out, "logits") else out
    per_token = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")
    return per_token.mean(1)


def cls_loss(out, y):
    return F.cross_entropy(out.logits, y, reduction="none")


# -- accepted ------------------------------------------------------------------------------------
class FrozenBNNet(nn.Module):
    """A frozen BatchNorm in eval mode: a fixed per-record affine map (accepted, pinned)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 16, 3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)
        self.bn.requires_grad_(False)
        self.bn.eval()

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


class PaddedConvs(nn.Module):
    """Conv1d / Conv2d / Conv3d with circular, reflect, replicate and 'same' padding."""

    def __init__(self) -> None:
        super().__init__()
        self.c2_circ = nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular")
        self.c2_refl = nn.Conv2d(3, 3, 3, padding=2, padding_mode="reflect", dilation=2)
        self.c2_same = nn.Conv2d(3, 2, 4, padding="same", padding_mode="replicate")
        self.c1 = nn.Conv1d(2, 2, 3, padding=1, padding_mode="circular", groups=2)
        self.c3 = nn.Conv3d(1, 2, 2, padding=1)
        self.head = nn.Linear(2 * 16 + 2 * 4 + 2 * 2 * 5 * 5, 3)

    def forward(self, x):  # [B, 2, 4, 4]
        h = self.c2_same(torch.tanh(self.c2_refl(torch.tanh(self.c2_circ(x)))))
        h1 = self.c1(x[:, :, 0, :])  # [B, 2, 4]
        h3 = self.c3(x[:, :1].unsqueeze(1))  # [B, 2, 2, 5, 5]
        return self.head(torch.cat([h.flatten(1), h1.flatten(1), h3.flatten(1)], 1))


class RecurrentNet(nn.Module):
    """Opacus' DPLSTM, DPGRU and DPRNN (batch first), cells called once per time step."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = DPLSTM(3, 5, batch_first=True)
        self.gru = DPGRU(5, 4, batch_first=True)
        self.rnn = DPRNN(4, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h, _ = self.lstm(x)
        h, _ = self.gru(h)
        h, _ = self.rnn(h)
        return self.head(h[:, -1])


class StridedIds(nn.Module):
    """Embedding ids that are a non-contiguous view, and a GroupNorm whose bias is frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.norm = nn.GroupNorm(2, 8)
        self.norm.bias.requires_grad_(False)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.emb(ids[:, ::2]).transpose(1, 2)  # [B, 8, T/2]
        return self.head(self.norm(h).mean(2))


class AttentionNet(nn.Module):
    """Opacus' DPMultiheadAttention, batch first, with bias_kv (SequenceBias) and zero attn."""

    def __init__(self, add_bias_kv: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.attn = DPMultiheadAttention(
            8, 2, batch_first=True, add_bias_kv=add_bias_kv, add_zero_attn=add_bias_kv
        )
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.emb(ids)
        out, _ = self.attn(h, h, h)
        return self.head(out.mean(1))


class BagNet(nn.Module):
    """EmbeddingBag on a 2-D [batch, bag] input (mean mode, padding), then a LayerNorm whose
    bias is frozen and a torch RMSNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(15, 6, mode="mean", padding_idx=0)
        self.norm = nn.LayerNorm(6)
        self.norm.bias.requires_grad_(False)
        self.rms = nn.RMSNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(self.rms(self.norm(self.bag(ids))))


class RawParam(nn.Module):
    """A custom layer holding a raw parameter (no rule of its own: vmap(grad) fallback)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        return x * self.scale / (1 + (x * self.scale).pow(2).mean(-1, keepdim=True)).sqrt()


class CustomNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.raw = RawParam(6)
        self.head = nn.Linear(6, 3)
        self.twice = nn.Linear(6, 6)

    def forward(self, x):
        h = self.raw(torch.tanh(self.lin(x)))
        return self.head(torch.tanh(self.twice(torch.tanh(self.twice(h)))))


class Linear4D(nn.Module):
    """A Linear on a 4-D input (refused by ghost only)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x)).mean((1, 2)))


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    return BertForSequenceClassification(cfg)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=40,
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
    )
    return LlamaForCausalLM(cfg)


def gpt2_lora():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    model.train()
    return model


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _hf_text(labels: str):
    g = _g(1)
    ids = torch.randint(1, 40, (BATCH, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    y = torch.randint(0, 3, (BATCH,), generator=g) if labels == "cls" else ids
    return inputs, y


def accepted_cases() -> dict[str, tuple]:
    """name -> (factory, inputs, targets, loss, backends that must accept it)."""
    g = _g(2)
    image = torch.rand(BATCH, 2, 4, 4, generator=g)
    labels = torch.randint(0, 3, (BATCH,), generator=g)
    seq = torch.rand(BATCH, 5, 3, generator=g)
    ids = torch.randint(0, 20, (BATCH, 5), generator=g)
    bag = torch.randint(0, 15, (BATCH, 4), generator=g)
    bag[0, 0] = 0
    vec = torch.rand(BATCH, 6, generator=g)
    x4 = torch.rand(BATCH, 2, 3, 3, generator=g)
    bert_in, bert_y = _hf_text("cls")
    lm_in, lm_y = _hf_text("lm")
    all4 = ("bk", "hooks", "functorch", "ghost")
    return {
        "frozen-eval-batchnorm": (FrozenBNNet, image, labels, ce, all4),
        "padded-convs": (PaddedConvs, image, labels, ce, ("bk", "functorch")),
        "dplstm-dpgru": (RecurrentNet, seq, labels, ce, ("bk", "hooks", "functorch")),
        "dp-attention-bias-kv": (AttentionNet, ids, labels, ce, ("bk",)),
        "dp-attention": (
            lambda: AttentionNet(False),
            ids,
            labels,
            ce,
            ("bk", "hooks", "functorch"),
        ),
        "embedding-bag-norms": (BagNet, bag, labels, ce, ("bk",)),
        "strided-ids-frozen-norm-bias": (StridedIds, ids, labels, ce, all4),
        "root-parameter": (RootParam, torch.rand(BATCH, 5, 6, generator=g), labels, ce, all4),
        "keyword-call": (KeywordCall, vec, labels, ce, ("bk",)),
        "custom-raw-parameter": (CustomNet, vec, labels, ce, ("bk", "hooks", "functorch")),
        "linear-4d": (Linear4D, x4, labels, ce, ("bk", "hooks", "functorch")),
        "bert-full": (tiny_bert, bert_in, bert_y, cls_loss, all4),
        "gpt2-full": (tiny_gpt2, lm_in, lm_y, lm_loss, ("bk", "hooks", "functorch")),
        "llama-full": (tiny_llama, lm_in, lm_y, lm_loss, all4),
        "gpt2-lora": (gpt2_lora, lm_in, lm_y, lm_loss, all4),
    }


# -- refused -------------------------------------------------------------------------------------
class TrainBN(nn.Module):
    def __init__(self, track: bool = True, frozen: bool = True) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6, track_running_stats=track)
        self.head = nn.Linear(6, 3)
        if frozen:
            self.bn.requires_grad_(False)

    def forward(self, x):
        return self.head(self.bn(self.lin(x)))


class EvalBNNoStats(TrainBN):
    def __init__(self) -> None:
        super().__init__(track=False)
        self.bn.eval()


class TimeFirstAttention(nn.Module):
    """DPMultiheadAttention with its default batch_first=False fed batch-first data: clipped per
    time step. With T == B the shapes alone cannot tell."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = DPMultiheadAttention(6, 2)
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # x: [B, T, E], passed as if time-first
        out, _ = self.attn(x, x, x)
        return self.head(out.mean(1))


class TransposeInside(nn.Module):
    """A Linear run on time-first [T, B, d] tensors after a transpose inside forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # [B, T, d]
        h = torch.tanh(self.lin(x.transpose(0, 1)))  # [T, B, d]
        return self.head(h.mean(0))


class FunctionalTie(nn.Module):
    """GPT-style tying written by hand: the output layer is F.linear on the embedding weight."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)

    def forward(self, ids):
        h = self.emb(ids).mean(1)
        return F.linear(h, self.emb.weight)[:, :3]


class UsedTwice(nn.Module):
    """A weight used by its module and again functionally."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return self.head(h @ self.lin.weight)


class MixesRecords(nn.Module):
    """Subtracts the batch mean: one record moves every other record's output."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.lin(x)
        return self.head(h - h.mean(0, keepdim=True))


class TorchMHA(nn.Module):
    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, batch_first=batch_first)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x)[0].mean(1))


class TorchRNN(nn.Module):
    def __init__(self, kind=nn.LSTM) -> None:
        super().__init__()
        self.rnn = kind(6, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class EmbeddingOption(nn.Module):
    def __init__(self, **kw) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6, **kw)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


class TrainOnlyMix(nn.Module):
    """Mixes records only in train mode (an eval-mode probe would miss it)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.lin(x)
        if self.training:
            h = h - h.mean(0, keepdim=True)
        return self.head(h)


class EMANorm(nn.Module):
    """A parameter-free module whose buffer follows the batch in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mu", torch.zeros(6))

    def forward(self, x):
        if self.training:
            self.mu.mul_(0.5).add_(0.5 * x.detach().mean(0))
        return x - self.mu


class EMANet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.ema = EMANorm()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.ema(self.lin(x)))


class StatsTracker(nn.Module):
    """Accumulates a statistic of the batch in a buffer without using it: the outputs never
    change, but the buffer is released with the model."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 3)
        self.register_buffer("seen", torch.zeros(6))

    def forward(self, x):
        self.seen.add_(x.detach().sum(0))
        return self.lin(x)


class DataWrite(nn.Module):
    """Moves a parameter in place from the batch (an un-noised update)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, x):
        if self.training:
            self.lin.bias.data.add_(0.01 * x.mean(0)[:3])
        return self.lin(x)


class TrainOnlyTie(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        if self.training:
            h = h @ self.lin.weight
        return self.head(h)


class _Child(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = [fn]
        self.lin = nn.Linear(6, 6, bias=False)

    def forward(self, x):
        return self.fn[0](self.lin(x))


class ClosureParent(nn.Module):
    """A parent's parameter read inside a child's forward through a closure."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(6))
        self.child = _Child(lambda h: h + self.bias)

    def forward(self, x):
        return self.child(x)


class ClosureNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = ClosureParent()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.block(x)))


class AddPos(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(6) + 0.5)

    def forward(self, x, pos):
        return (x + pos) * self.scale


class PosNet(nn.Module):
    """A [T, d] buffer passed to a layer next to the batch: with T == B its leading dimension
    equals the batch size by coincidence."""

    def __init__(self) -> None:
        super().__init__()
        self.p = AddPos()
        self.head = nn.Linear(6, 3)
        self.register_buffer("pos", torch.randn(BATCH, 6) * 3)

    def forward(self, x):
        return self.head(torch.tanh(self.p(x, self.pos)).mean(1))


class RootParam(nn.Module):
    """A ViT-style model whose root module owns a parameter (a position embedding)."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(5, 6) * 0.1)
        self.lin = nn.Linear(6, 3)

    def forward(self, x):
        return self.lin(torch.tanh(x + self.pos)).mean(1)


class KeywordCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(input=x)))


class _DropoutInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(6))
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(x) * self.scale


class RandomLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rand = _DropoutInside()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.rand(x))


class InstanceStats(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(6, 6, 1)
        self.norm = nn.InstanceNorm1d(6, affine=True, track_running_stats=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # [B, T, 6]
        return self.head(self.norm(self.conv(x.transpose(1, 2))).mean(2))


class EvalAffineBN(TrainBN):
    def __init__(self) -> None:
        super().__init__(frozen=False)
        self.bn.eval()


class MaxBag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(10, 6, mode="max")
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(self.bag(ids))


class TimeFirstOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(x).t()


class _BufferedScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(6))
        self.register_buffer("offset", torch.ones(6))

    def forward(self, x):
        return x * self.scale + self.offset


class BufferedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = _BufferedScale()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.layer(x))


class UnusedParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(6, 3)
        self.unused = nn.Linear(6, 6)

    def forward(self, x):
        return self.head(x)


def refused_cases() -> dict[str, tuple]:
    """name -> (factory, inputs, targets, loss, backends that must refuse it)."""
    g = _g(3)
    vec = torch.rand(BATCH, 6, generator=g)
    labels = torch.randint(0, 3, (BATCH,), generator=g)
    square = torch.rand(BATCH, BATCH, 6, generator=g)  # T == B
    long = torch.rand(BATCH, 7, 6, generator=g)  # T != B
    ids = torch.randint(0, 10, (BATCH, 5), generator=g)
    all4 = ("bk", "hooks", "functorch", "ghost")
    return {
        "train-mode-frozen-batchnorm": (TrainBN, vec, labels, ce, all4),
        "trainable-batchnorm": (lambda: TrainBN(frozen=False), vec, labels, ce, all4),
        "batchnorm-without-running-stats": (EvalBNNoStats, vec, labels, ce, all4),
        "time-first-attention-T!=B": (TimeFirstAttention, long, labels, ce, all4),
        "time-first-attention-T==B": (TimeFirstAttention, square, labels, ce, all4),
        "transpose-inside-T==B": (TransposeInside, square, labels, ce, all4),
        "functional-tie": (FunctionalTie, ids, labels, ce, all4),
        "module-and-functional-use": (UsedTwice, vec, labels, ce, all4),
        "mixes-records": (MixesRecords, vec, labels, ce, all4),
        "torch-mha": (TorchMHA, long, labels, ce, all4),
        "torch-mha-time-first": (lambda: TorchMHA(False), long, labels, ce, all4),
        "torch-lstm": (TorchRNN, long, labels, ce, all4),
        "torch-gru": (lambda: TorchRNN(nn.GRU), long, labels, ce, all4),
        "embedding-max-norm": (lambda: EmbeddingOption(max_norm=1.0), ids, labels, ce, all4),
        "embedding-grad-by-freq": (
            lambda: EmbeddingOption(scale_grad_by_freq=True),
            ids,
            labels,
            ce,
            all4,
        ),
        "circular-conv-opacus-rules": (
            PaddedConvs,
            torch.rand(BATCH, 2, 4, 4, generator=g),
            labels,
            ce,
            ("hooks", "ghost"),
        ),
        "tied-module-weights-ghost": (
            lambda: __import__("tests.privacy.models", fromlist=["TiedConv"]).TiedConv(3),
            torch.rand(BATCH, 3, 4, 4, generator=g),
            labels,
            ce,
            ("ghost",),
        ),
        "called-twice-ghost": (CustomNet, vec, labels, ce, ("ghost",)),
        "embedding-bag-opacus-rules": (
            __import__("tests.privacy.hard_models", fromlist=["BagNet"]).BagNet,
            torch.randint(0, 15, (BATCH, 4), generator=g),
            labels,
            ce,
            ("hooks", "functorch", "ghost"),
        ),
        "dp-attention-bias-kv-opacus-rules": (
            __import__("tests.privacy.hard_models", fromlist=["AttentionNet"]).AttentionNet,
            ids,
            labels,
            ce,
            ("hooks", "functorch", "ghost"),
        ),
        "dplstm-ghost": (
            RecurrentNet,
            torch.rand(BATCH, 5, 3, generator=g),
            labels,
            ce,
            ("ghost",),
        ),
        "linear-4d-ghost": (
            Linear4D,
            torch.rand(BATCH, 2, 3, 3, generator=g),
            labels,
            ce,
            ("ghost",),
        ),
        "gpt2-full-tied-ghost": (tiny_gpt2, *_hf_text("lm"), lm_loss, ("ghost",)),
        "instance-norm-running-stats": (InstanceStats, long, labels, ce, all4),
        "eval-batchnorm-trainable-affine": (EvalAffineBN, vec, labels, ce, all4),
        "sparse-embedding": (lambda: EmbeddingOption(sparse=True), ids, labels, ce, all4),
        "embedding-bag-max": (MaxBag, ids, labels, ce, ("bk",)),
        "output-not-batch-first": (TimeFirstOutput, vec, labels, ce, all4),
        "buffers-in-a-layer-without-rule": (BufferedLayer, vec, labels, ce, ("bk",)),
        "unused-trainable-parameter": (UnusedParameter, vec, labels, ce, ("bk", "hooks")),
        "mixes-only-in-train-mode": (TrainOnlyMix, vec, labels, ce, all4),
        "buffer-follows-the-batch": (EMANet, vec, labels, ce, all4),
        "buffer-written-in-forward": (StatsTracker, vec, labels, ce, all4),
        "parameter-written-in-forward": (DataWrite, vec, labels, ce, all4),
        "functional-use-only-in-train-mode": (TrainOnlyTie, vec, labels, ce, all4),
        "parent-parameter-in-child-closure": (ClosureNet, vec, labels, ce, all4),
        "coincidental-batch-size-input": (PosNet, square, labels, ce, ("bk",)),
        "random-layer-without-rule": (RandomLayer, vec, labels, ce, all4),
        "keyword-call-opacus-rules": (
            KeywordCall,
            vec,
            labels,
            ce,
            ("hooks", "functorch", "ghost"),
        ),
    }
