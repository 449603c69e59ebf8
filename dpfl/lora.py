"""LoRA adapter algebra on plain tensors (no Flower, no peft import): FedSVD's re-factorization.

peft stores a LoRA layer as ``...lora_A.<adapter>.weight`` (r x d_in) and
``...lora_B.<adapter>.weight`` (d_out x r); the layer adds ``scaling * B @ A`` to its base
weight. FedSVD (Lee et al., NeurIPS 2025; ../shared/algorithms/dp_and_fl.md 3.1) re-factorizes
the server's ``B A`` after each aggregation so that the next A has orthonormal rows and B carries
the singular values:

    B A = U S V^T,   A_new = V^T,   B_new = U S,   B_new A_new = B A (rank <= r).

:func:`refactorize` does it without the d_out x d_in product: B = Q_B R_B and A^T = Q_A R_A
(reduced QR), then the r x r SVD R_B R_A^T = U' S V'^T gives U = Q_B U' and V^T = V'^T Q_A^T.
The scaling (alpha / r) is unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["embedding_adapters", "is_lora_a", "lora_pairs", "refactorize", "refactorize_state"]

_A, _B = ".lora_A.", ".lora_B."


_EMBEDDING = ".lora_embedding_"


def is_lora_a(name: str) -> bool:
    """Whether a parameter name is a LoRA A matrix (peft naming; an Embedding layer's A is
    ``lora_embedding_A``)."""
    return _A in name or f"{_EMBEDDING}A" in name


def embedding_adapters(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The Embedding layers' LoRA tensors (peft: ``lora_embedding_A`` / ``_B``, A at 0 and B
    random at init, the reverse of a Linear layer's)."""
    return sorted(k for k in state if _EMBEDDING in k)


def lora_pairs(state: Mapping[str, torch.Tensor]) -> list[tuple[str, str]]:
    """``(A key, B key)`` of every LoRA layer in ``state``, sorted; a lone A or B is an error."""
    a_keys = sorted(k for k in state if _A in k)
    b_keys = {k for k in state if _B in k}
    pairs = []
    for a in a_keys:
        b = a.replace(_A, _B, 1)
        if b not in b_keys:
            raise ValueError(f"LoRA state has {a} but no {b}")
        pairs.append((a, b))
        b_keys.discard(b)
    if b_keys:
        raise ValueError(f"LoRA state has {sorted(b_keys)[0]} but no matching lora_A")
    return pairs


def refactorize(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_new, B_new)`` with ``B_new @ A_new == b @ a`` and ``A_new @ A_new.T == I_r``.

    ``a``: r x d_in, ``b``: d_out x r, with r <= min(d_in, d_out). Computed in float64 and
    returned in the inputs' dtype and device. The singular vectors are unique up to sign (and,
    for repeated singular values, rotation): any choice satisfies both identities.
    """
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
        raise ValueError(
            f"LoRA factors must be A (r x d_in) and B (d_out x r); got A {tuple(a.shape)}, "
            f"B {tuple(b.shape)}"
        )
    r, d_in = a.shape
    d_out = b.shape[0]
    if r > min(d_in, d_out):
        raise ValueError(
            f"LoRA rank {r} exceeds the layer's dimensions ({d_out} x {d_in}): A cannot have "
            "r orthonormal rows"
        )
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    q_b, r_b = torch.linalg.qr(b64)  # d_out x r, r x r
    q_a, r_a = torch.linalg.qr(a64.T)  # d_in x r, r x r
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)  # r x r each
    a_new = vh @ q_a.T  # r x d_in, orthonormal rows
    b_new = (q_b @ u) * s  # d_out x r: U diag(S)
    return a_new.to(a.dtype).to(a.device), b_new.to(b.dtype).to(b.device)


def refactorize_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every LoRA pair re-factorized by :func:`refactorize`; other tensors (the
    head, biases) are passed through unchanged."""
    out = dict(state)
    for a_key, b_key in lora_pairs(state):
        out[a_key], out[b_key] = refactorize(state[a_key], state[b_key])
    return out
