"""What the Hugging Face tasks (text classification, causal LM) share: reading text files,
resolving the model (embedded package, local directory or hub name), peft LoRA, and the
trainable state that federations exchange (adapters + what else trains, never the base model).
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from dpfl.errors import ConfigError
from dpfl.tasks.base import Task

__all__ = ["HFTask", "TokenRecords", "apply_lora", "quiet_transformers", "read_rows"]


class TokenRecords(Dataset):
    """Tokenized records: ``({"input_ids": [T], "attention_mask": [T]}, target)``; the target
    is a class id (classification) or the ``[T]`` labels (causal LM, -100 on padding)."""

    def __init__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        targets: torch.Tensor,
        groups: np.ndarray | None = None,
    ):
        self.input_ids, self.attention_mask, self.labels = input_ids, attention_mask, targets
        self.groups = groups  # each record's owner (movie), for natural client splits

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i]}, (
            self.labels[i]
        )


def read_rows(path: Path, columns: tuple[str, ...]) -> list[dict[str, Any]]:
    """Rows of a .csv or .jsonl(.gz) file; every row must have a non-empty value in each of
    ``columns`` (the first is the text)."""
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    try:
        if suffix in (".jsonl", ".jsonl.gz"):
            opener = gzip.open if suffix.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
        elif suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        else:
            raise ConfigError(f"data.path {path}: text data are a .csv or .jsonl file")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise ConfigError(f"data.path {path}: cannot read it ({e})") from None
    if not rows:
        raise ConfigError(f"data.path {path}: no records")
    if not all(isinstance(r, dict) for r in rows):
        raise ConfigError(f"data.path {path}: every JSONL line must be an object")
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise ConfigError(
            f"data.path {path}: no {' or '.join(repr(c) for c in missing)} column (this task "
            f"reads {', '.join(repr(c) for c in columns)})"
        )
    for i, r in enumerate(rows):
        text = r.get(columns[0])
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"data.path {path}: record {i + 1} has no text")
        if any(r.get(c) in (None, "") for c in columns[1:]):
            raise ConfigError(f"data.path {path}: record {i + 1} has no {columns[1]}")
    return rows


def quiet_transformers() -> None:
    """No download/loading progress bars or advice on stderr (the CLI prints one line per
    epoch; loading a local model is not news)."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def apply_lora(model: nn.Module, lora, head: str | None) -> nn.Module:
    """peft LoRA on ``lora.target-modules`` (``auto``: peft's per-architecture default, e.g.
    BERT's query/value, Llama's q_proj/v_proj, GPT-2's c_attn); ``head`` (a fresh classifier)
    trains too. ``lora.r = 0``: full fine-tuning, no adapters."""
    if lora.r == 0:
        return model
    from peft import LoraConfig, get_peft_model

    targets: list[str] | None = [t.strip() for t in lora.target_modules.split(",") if t.strip()]
    if targets == ["auto"]:
        targets = None
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        modules_to_save=None if head is None else [head],
    )
    try:
        model = get_peft_model(model, config)
    except ValueError as e:
        raise ConfigError(
            f"lora.target-modules={lora.target_modules!r}: {e} (name the model's linear layers, "
            "e.g. q_proj,v_proj)"
        ) from None
    if lora.freeze_a:  # FFA-LoRA: A stays at its init (exchanged, so every learner shares it)
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                p.requires_grad_(False)
    return model


def _adapter_names(model: nn.Module) -> list[str]:
    """The adapter state: every LoRA tensor (trained or frozen, like FFA-LoRA's A) and what
    trains besides (the head); without adapters (lora.r = 0) what trains."""
    return [
        n
        for n, p in model.named_parameters()
        if p.requires_grad or ".lora_A." in n or ".lora_B." in n
    ]


_CACHE: dict[tuple, Any] = {}
_CACHE_SIZE = 4


def file_stamp(path: str | None) -> tuple | None:
    """What identifies a file's contents cheaply (for :func:`cached` keys)."""
    import os

    if path is None or not os.path.exists(path):
        return None
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size)


def cached(key: tuple, build):
    """One tokenization per process for the same data, model and split (the pre-run check
    and the run read the same data; records are never modified). A few entries, oldest out."""
    if key not in _CACHE:
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = build()
    return _CACHE[key]


class HFTask(Task):
    """A task on a Hugging Face model whose trainable state is its adapters (+ head)."""

    def labels(self, dataset: Dataset) -> np.ndarray | None:
        records, idx = _unwrap(dataset)
        if records is None or records.labels.dim() != 1:
            return None  # causal LM: no class labels
        return records.labels[idx].numpy() if idx is not None else records.labels.numpy()

    def groups(self, dataset: Dataset) -> np.ndarray | None:
        records, idx = _unwrap(dataset)
        if records is None or records.groups is None:
            return None
        return records.groups if idx is None else records.groups[idx]

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The adapters and the head, not the frozen base model (frozen adapters included: a
        learner that builds the model gets the shared A instead of its own random init)."""
        params = dict(model.named_parameters())
        return {n: params[n].detach().cpu().clone() for n in _adapter_names(model)}

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        expected = set(_adapter_names(model))
        if set(state) != expected:
            raise ConfigError(
                f"trainable state does not fit the model: {len(set(state) ^ expected)} keys "
                "differ (another LoRA config or model?)"
            )
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, v in state.items():
                if params[n].shape != v.shape:
                    raise ConfigError(f"trainable state: {n} has shape {tuple(v.shape)}")
                params[n].copy_(v)

    def export(self, model: nn.Module, directory: Path) -> list[Path]:
        """peft's ``save_pretrained`` format (adapter config + weights, the head included), which
        ``PeftModel.from_pretrained(base, directory)`` loads back; with ``lora.r = 0`` the
        whole model in transformers' format. The tokenizer is not copied (it is the base's)."""
        directory.mkdir(parents=True, exist_ok=True)
        before = set(directory.rglob("*"))
        model.save_pretrained(directory)
        return sorted(p for p in set(directory.rglob("*")) - before if p.is_file())


def _unwrap(dataset: Dataset) -> tuple[TokenRecords | None, list[int] | None]:
    if isinstance(dataset, TokenRecords):
        return dataset, None
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, TokenRecords):
        return dataset.dataset, list(dataset.indices)
    return None, None


def load_tokenizer(model_dir: str, **kwargs):
    from transformers import AutoTokenizer

    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the tokenizer of {model_dir}: {_first_line(e)}") from None
    if tokenizer.pad_token is None:  # GPT-2 / Llama tokenizers: pad with end-of-sequence
        if tokenizer.eos_token is None:
            raise ConfigError(f"the tokenizer of {model_dir} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def split(n: int, seed: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) record indices: a seeded permutation, the test fraction first."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, round(n * test_fraction))
    test, train = order[:n_test], order[n_test:]
    if len(train) < 2:
        raise ConfigError(f"data.test-fraction={test_fraction:g} leaves {len(train)} records")
    return train, test
