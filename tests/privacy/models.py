"""Tiny models covering every layer type the per-sample backends handle, and a private-step
builder shared by the privacy tests."""

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpfl.models.cnn import SmallCNN
from dpfl.privacy import make_private


class TinySeq(nn.Module):
    """Embedding -> LayerNorm -> Linear on [B, T, d] (ghost-norm path) -> Linear with a wide T
    (instantiated path) -> mean over T -> Linear head."""

    def __init__(self, vocab: int = 30, dim: int = 32, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Linear(dim, dim)
        self.narrow = nn.Linear(dim, 4)
        self.head = nn.Linear(4, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.mix(self.norm(self.emb(ids))))
        return self.head(torch.tanh(self.narrow(h)).mean(1))


class TiedConv(nn.Module):
    """Conv on 4x4 maps (ghost-norm path of the conv), a grouped strided conv, a Linear called
    twice (one parameter, two calls) and an output layer tied to an embedding (one parameter,
    two modules)."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.norm = nn.GroupNorm(4, 32)
        self.gconv = nn.Conv2d(32, 32, 3, padding=1, groups=4, stride=2)
        self.proj = nn.Linear(32 * 4, 24)
        self.twice = nn.Linear(24, 24)
        self.emb = nn.Embedding(classes, 24)
        self.out = nn.Linear(24, classes, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gconv(torch.relu(self.norm(self.conv(x)))).flatten(1)
        h = torch.tanh(self.twice(torch.tanh(self.twice(self.proj(h)))))
        bias = self.emb(torch.zeros(x.shape[0], dtype=torch.long))
        return self.out(h + bias)


def make_case(name: str, batch: int = 12, seed: int = 0):
    """(model, x, y, num_classes) with a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "cnn":
        model = SmallCNN()
        x = torch.rand(batch, 1, 8, 8, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
    elif name == "seq":
        model = TinySeq()
        x = torch.randint(0, 30, (batch, 12), generator=g)  # includes padding id 0
        y = torch.randint(0, 3, (batch,), generator=g)
    elif name == "tied":
        model = TiedConv()
        x = torch.rand(batch, 3, 4, 4, generator=g)
        y = torch.randint(0, 5, (batch,), generator=g)
    else:
        raise ValueError(name)
    return model, x, y


def loss_fn(out, y):
    return F.cross_entropy(out, y, reduction="none")


def build(case, backend, clipping, *, sigma=0.0, clip_norm=0.5, batch=12, seed=0, lr=0.0, **kw):
    """(PrivateTraining, un-hooked copy of the initial model, x, y); q = 1/2, so B = batch / 2."""
    model, x, y = make_case(case, batch=batch, seed=seed)
    reference = copy.deepcopy(model)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch // 2)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    pt = make_private(
        model,
        opt,
        loader,
        noise_multiplier=sigma,
        clip_norm=clip_norm,
        clipping=clipping,
        grad_sample_mode=backend,
        seed=seed,
        **kw,
    )
    return pt, reference, x, y
