"""Typed, validated configuration: frozen dataclasses loaded from TOML and ``--set`` overrides.

A configuration has a few top-level keys (``name``, ``seed``) and one section per concern::

    seed = 0
    [privacy]
    noise-multiplier = 1.1
    delta = 1e-5
    [federation]
    num-clients = 10

Keys are kebab-case in TOML, on the command line and in Flower's flat ``run_config``
(``privacy.noise-multiplier``); fields are the snake_case equivalents. Every value is checked when
the dataclass is built, so a :class:`Config` that exists is valid. Errors name the key and the
valid keys or range (:class:`~dpfl.errors.ConfigError`).

``privacy.noise-multiplier`` and ``privacy.target-epsilon`` are two ways to set the noise; exactly
one is set. Setting one of them (in a file or with ``--set``) unsets the other, so that
``--set privacy.target-epsilon=3`` works on top of a file that gives a noise multiplier.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

import tomli_w

from dpfl.errors import ConfigError
from dpfl.sources import resolve_data_source, resolve_model_source
from dpfl.validation import (
    at_least,
    at_most,
    check_delta,
    check_epsilon,
    check_noise_multiplier,
    in_range,
    in_unit_interval_closed_open,
    non_negative,
    positive,
)

__all__ = [
    "Config",
    "DataConfig",
    "FederationConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PrivacyConfig",
    "StoreConfig",
    "TrainingConfig",
    "apply_overrides",
    "describe_fields",
    "load_config",
    "parse_override",
]

_MISSING = object()


def _key(field_name: str) -> str:
    return field_name.replace("_", "-")


def _opt(
    default: Any,
    *,
    check=None,
    choices: tuple[str, ...] | None = None,
    doc: str = "",
    allowed: str | None = None,
):
    """A config field with its validation attached as metadata; ``allowed`` describes a range
    that a section's cross-field check enforces (``dpfl config show`` lists it)."""
    meta = {"check": check, "choices": choices, "doc": doc, "allowed": allowed}
    return field(default=default, metadata=meta)


def describe_fields() -> list[dict[str, Any]]:
    """Every config key: its dotted name, default, allowed values and meaning."""
    rows: list[dict[str, Any]] = [
        {"key": "name", "default": "dpfl", "allowed": "non-empty string", "doc": "run name"},
        {
            "key": "seed",
            "default": 0,
            "allowed": "integer in [0, 2**63 - 1]",
            "doc": "seeds data splits, models, sampling and noise",
        },
        {
            "key": "task",
            "default": "image-classification",
            "allowed": " | ".join(TASK_NAMES),
            "doc": "what gets trained: its data, model, per-record loss and evaluation",
        },
    ]
    for section, cls in _SECTIONS.items():
        hints = _field_types(cls)
        for f in dataclasses.fields(cls):
            meta = f.metadata
            allowed = meta.get("allowed")
            if allowed is None and meta.get("choices"):
                allowed = " | ".join(meta["choices"])
            if allowed is None and meta.get("check") is not None:
                allowed = getattr(meta["check"], "describe", None)
            base = _base_type(hints[f.name])
            if allowed is None:
                allowed = {bool: "true | false", str: "string", int: "integer", float: "number"}[
                    base
                ]
            if _is_optional(hints[f.name]):
                allowed += " (or none: unset)"
            rows.append(
                {
                    "key": f"{section}.{_key(f.name)}",
                    "default": f.default,
                    "allowed": allowed,
                    "doc": meta.get("doc", ""),
                }
            )
    return rows


@functools.cache
def _field_types(cls) -> dict[str, Any]:
    """The resolved annotations of a section class (cached: every client message parses the
    whole config, and resolving them is most of that cost). Callers must not mutate it."""
    return typing.get_type_hints(cls)


def _is_optional(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


def _base_type(tp: Any) -> Any:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Checks ``value`` against the field type ``tp``; ints are accepted where floats are."""
    if value is None:
        if _is_optional(tp):
            return None
        raise ConfigError(f"{name} cannot be empty")
    base = _base_type(tp)
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config field type {tp!r}")  # a bug in this module, not input


@dataclass(frozen=True)
class _Section:
    """Base of every section: type coercion and per-field checks on construction."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = _field_types(type(self))
        for f in dataclasses.fields(self):
            name = f"{self.SECTION}.{_key(f.name)}" if self.SECTION else _key(f.name)
            value = _coerce(name, getattr(self, f.name), hints[f.name])
            object.__setattr__(self, f.name, value)
            if value is None:
                continue
            choices = f.metadata.get("choices")
            if choices is not None and value not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
            check = f.metadata.get("check")
            if check is not None:
                check(name, value)
        self._validate()

    def _validate(self) -> None:
        """Cross-field checks of one section."""

    @classmethod
    def keys(cls) -> list[str]:
        return [_key(f.name) for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        if not isinstance(data, Mapping):
            raise ConfigError(f"[{cls.SECTION}] must be a table of keys, got {data!r}")
        known = {_key(f.name): f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in data.items():
            if key not in known:
                hint = " (keys use dashes, not underscores)" if _key(key) in known else ""
                raise ConfigError(
                    f"unknown key {cls.SECTION}.{key}{hint}; valid keys of [{cls.SECTION}]: "
                    f"{', '.join(sorted(known))}"
                )
            kwargs[known[key]] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case keys; None (unset) values are left out, since TOML has no null."""
        return {
            _key(f.name): getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }


CLIPPING_MODES = ("flat", "per-layer", "adaptive", "automatic", "dicesgd")
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost", "bk")
ACCOUNTANTS = ("rdp", "prv", "pld", "gdp")


@dataclass(frozen=True)
class PrivacyConfig(_Section):
    """Differential privacy of the training.

    ``level = "sample"`` protects each training record (DP-SGD on every learner, one accountant per
    learner); ``level = "user"`` protects each client's whole contribution (DP-FedAvg: client
    updates clipped, noise added on the server, one accountant on the server).
    """

    SECTION: ClassVar[str] = "privacy"

    enabled: bool = _opt(True, doc="train with differential privacy")
    level: str = _opt("sample", choices=("sample", "user"), doc="what one DP unit is")
    noise_multiplier: float | None = _opt(
        1.0, check=check_noise_multiplier, doc="Gaussian noise std / clip norm"
    )
    target_epsilon: float | None = _opt(
        None, check=check_epsilon, doc="calibrate the noise to spend this epsilon in total"
    )
    delta: float = _opt(1e-5, check=check_delta, doc="delta of (epsilon, delta)-DP")
    clip_norm: float = _opt(1.0, check=positive, doc="per-sample (or per-update) L2 clip norm C")
    clipping: str = _opt("flat", choices=CLIPPING_MODES, doc="clip policy")
    accountant: str = _opt("rdp", choices=ACCOUNTANTS, doc="privacy accountant")
    poisson_sampling: bool = _opt(True, doc="Poisson-sample the batches (what accounting assumes)")
    grad_sample_mode: str = _opt("bk", choices=GRAD_SAMPLE_MODES, doc="per-sample norm backend")
    secure_mode: bool = _opt(False, doc="noise from the OS CSPRNG instead of a seeded generator")
    target_quantile: float = _opt(
        0.5, check=in_unit_interval_closed_open, doc="adaptive: fraction of samples left unclipped"
    )
    clip_lr: float | None = _opt(
        None,
        check=positive,
        doc="adaptive: geometric clip learning rate; unset: 0.05 per DP-SGD step, 0.2 per "
        "DP-FedAvg round",
    )
    count_noise_std: float | None = _opt(
        None, check=positive, doc="adaptive: std of the unclipped-count noise (default B/20)"
    )
    automatic_gamma: float = _opt(0.01, check=positive, doc="automatic: stability constant")
    dicesgd_c2: float | None = _opt(
        None, check=non_negative, doc="DiceSGD feedback clip C2 (default C1)"
    )
    dicesgd_c2_units: str = _opt("sum", choices=("sum", "mean"), doc="DiceSGD: units of C2")
    dicesgd_residual_rule: str = _opt(
        "paper", choices=("paper", "code"), doc="DiceSGD: buffer residual rule"
    )

    def _validate(self) -> None:
        if not self.enabled:
            return
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ConfigError("set privacy.noise-multiplier or privacy.target-epsilon")
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise ConfigError(
                "privacy.noise-multiplier and privacy.target-epsilon are both set; set only one"
            )


#: largest accepted learning rate (a larger one only overflows the parameters)
MAX_LR = 1000.0
#: largest seed: SQLite and torch hold it as a signed 64-bit integer
MAX_SEED = 2**63 - 1
#: longest training accepted (passes over the data; federated rounds)
MAX_EPOCHS = 100_000.0
MAX_ROUNDS = 1_000_000

#: adaptive clipping's default geometric rate: per DP-FedAvg round (Andrew et al., TFF), and per
#: DP-SGD step (our choice: a step is far more frequent than a round; at 0.2 per step the clip
#: overshoots the median norm 7x within 40 steps on the default and the run diverges)
CLIP_LR_PER_ROUND = 0.2
CLIP_LR_PER_STEP = 0.05

#: every name in dpfl.optim.OPTIMIZERS (a test keeps the two equal)
OPTIMIZER_NAMES = (
    "sgd",
    "adam",
    "adamw",
    "sgd-sai",
    "scale",
    "swan",
    "sinkgd",
    "frugal",
    "conda",
    "muon",
    "auon",
    "hybrid-auon",
    "drop-muon",
    "lion",
    "adan",
    "adabelief",
    "adamp",
    "diffgrad",
)


@dataclass(frozen=True)
class OptimizerConfig(_Section):
    """The (local) solver; under DP it only ever sees privatized gradients."""

    SECTION: ClassVar[str] = "optimizer"

    name: str = _opt("sgd", choices=OPTIMIZER_NAMES, doc="optimizer name (dpfl optimizers)")
    lr: float | None = _opt(
        None,
        check=in_range(0, MAX_LR),
        doc="learning rate; unset: the solver's default, with or without DP (dpfl optimizers)",
    )
    momentum: float = _opt(0.0, check=in_unit_interval_closed_open, doc="momentum in [0, 1)")
    weight_decay: float = _opt(0.0, check=non_negative, doc="L2 weight decay")
    adam_lr: float | None = _opt(
        None, check=positive, doc="AdamW lr of hybrid optimizers' non-hidden params"
    )
    schedule: str = _opt(
        "constant",
        choices=("constant", "cosine", "linear"),
        doc="centralized training's learning-rate schedule over the planned steps: constant, "
        "or decay to 0 by a half cosine or linearly, after optimizer.warmup-steps (federated "
        "clients: constant only)",
    )
    warmup_steps: int = _opt(
        0, check=non_negative, doc="centralized training: linear warm-up steps from lr/warmup"
    )
    local_state: str = _opt(
        "reset", choices=("reset", "persist"), doc="federated clients: keep solver state"
    )
    options: str = _opt(
        "{}", doc='extra constructor arguments as a JSON object, e.g. {"density": 0.5}'
    )

    def _validate(self) -> None:
        import json

        try:
            value = json.loads(self.options)
        except json.JSONDecodeError as e:
            raise ConfigError(f"optimizer.options must be a JSON object: {e}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"optimizer.options must be a JSON object, got {self.options!r}")


@dataclass(frozen=True)
class DataConfig(_Section):
    SECTION: ClassVar[str] = "data"

    name: str = _opt(
        "digits",
        doc="data set: built-in (digits, mnist-5k), or how to read data.path: auto, npz, "
        "folder, csv (README: Your own data and model)",
    )
    path: str | None = _opt(
        None,
        doc="own data: an .npz (x, y), an image folder (one sub-folder per class) or a CSV "
        "file; made absolute; replaces the built-in data set",
    )
    label_column: str = _opt("label", doc="CSV files: the column that holds the labels")
    batch_size: int = _opt(128, check=at_least(1), doc="expected (logical) batch size")
    physical_batch_size: int | None = _opt(
        None, check=at_least(1), doc="largest batch held in memory (virtual steps above it)"
    )
    test_fraction: float = _opt(0.2, doc="held-out fraction for evaluation", allowed="(0, 1)")
    max_records: int | None = _opt(
        None,
        check=at_least(2),
        doc="text tasks: keep this many records (a seeded sample) before the split",
    )

    def _validate(self) -> None:
        if not (0 < self.test_fraction < 1):
            raise ConfigError(f"data.test-fraction must be in (0, 1), got {self.test_fraction!r}")
        name, path = resolve_data_source(self.name, self.path, self.label_column)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "path", path)


@dataclass(frozen=True)
class ModelConfig(_Section):
    SECTION: ClassVar[str] = "model"

    name: str = _opt(
        "cnn", doc="model: built-in (cnn, mlp), or factory (built by model.path's import string)"
    )
    path: str | None = _opt(
        None,
        doc="own model: an import string package.module:factory, or a state_dict checkpoint "
        "(torch.save) loaded into model.name; text tasks: a Hugging Face model directory or "
        "hub name",
    )
    pooling: str = _opt(
        "auto",
        choices=("auto", "cls", "mean"),
        doc="text classification: mean (masked mean of the last hidden states, then a linear "
        "head: how sentence-transformers models such as minilm are used), cls (the model's own "
        "sequence-classification head); auto: mean for minilm, cls otherwise",
    )

    def _validate(self) -> None:
        name, path = resolve_model_source(self.name, self.path)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "path", path)


@dataclass(frozen=True)
class TrainingConfig(_Section):
    """Centralized training length (the federation has its own rounds and local epochs)."""

    SECTION: ClassVar[str] = "training"

    epochs: float = _opt(
        10.0, check=in_range(0, MAX_EPOCHS), doc="passes over the data (in expectation)"
    )
    max_steps: int | None = _opt(None, check=at_least(1), doc="stop after this many steps")
    device: str = _opt(
        "auto",
        doc="where models train: auto = cuda if torch sees a GPU, else cpu",
        allowed="auto | cpu | cuda | cuda:N",
    )

    def _validate(self) -> None:
        d = self.device
        ok = d in ("auto", "cpu", "cuda") or (
            d.startswith("cuda:") and d[5:].isdigit() and str(int(d[5:])) == d[5:]
        )
        if not ok:
            raise ConfigError(
                f"training.device must be auto, cpu, cuda or cuda:N, got {self.device!r}"
            )


STRATEGIES = (
    "fedavg",
    "fedprox",
    "dp-fedavg",
    "median",
    "trimmed-mean",
    "lora-fedavg",
    "ffa-lora",
    "fedsvd",
)
#: strategies that need a LoRA model (text task, lora.r > 0)
LORA_STRATEGIES = ("lora-fedavg", "ffa-lora", "fedsvd")


@dataclass(frozen=True)
class FederationConfig(_Section):
    """The simulated (or deployed) federation.

    Clients are sampled each round independently with probability ``fraction`` (Poisson, seeded),
    or, for non-DP and sample-level DP runs only, exactly ``clients-per-round`` of them.

    Under DP a client's reply carries only its update and its privacy report by default;
    ``client-diagnostics = true`` adds metrics computed on its records, which the guarantee does
    not cover (see :mod:`dpfl.clients.federated`).
    """

    SECTION: ClassVar[str] = "federation"

    num_clients: int = _opt(10, check=at_least(1), doc="clients (data partitions)")
    rounds: int = _opt(5, check=at_most(MAX_ROUNDS), doc="server rounds")
    fraction: float = _opt(1.0, doc="Poisson client sampling rate per round", allowed="(0, 1]")
    clients_per_round: int | None = _opt(
        None, check=at_least(1), doc="fixed number of clients per round (not with user-level DP)"
    )
    local_epochs: float = _opt(1.0, check=in_range(0, MAX_EPOCHS), doc="local passes per round")
    local_steps: int | None = _opt(None, check=at_least(1), doc="local steps per round (cap)")
    partition: str = _opt(
        "iid",
        choices=("iid", "dirichlet", "classes", "natural"),
        doc="data split (natural: by each record's owner, e.g. rotten-tomatoes' movies)",
    )
    dirichlet_alpha: float = _opt(0.5, check=positive, doc="Dirichlet concentration")
    classes_per_client: int = _opt(2, check=at_least(1), doc="labels per client (classes)")
    client_test_fraction: float = _opt(
        0.1, check=in_unit_interval_closed_open, doc="each client's local held-out fraction"
    )
    strategy: str = _opt("fedavg", choices=STRATEGIES, doc="server strategy")
    server_lr: float = _opt(1.0, check=positive, doc="server step on the mean update (dp-fedavg)")
    proximal_mu: float = _opt(0.01, check=non_negative, doc="fedprox proximal weight")
    svd_period: int = _opt(
        1, check=non_negative, doc="fedsvd: re-factorize every this many rounds (0: ffa-lora)"
    )
    svd_warmup: int = _opt(
        0, check=non_negative, doc="fedsvd: no re-factorization in the first this many rounds"
    )
    calibration: str = _opt(
        "worst-case",
        choices=("worst-case", "expected"),
        doc="sample-level DP under a target epsilon: each client calibrates its noise for "
        "taking part in every round (worst-case) or in ceil(rounds x fraction) rounds "
        "(expected; a client sampled more often stops when its budget is spent)",
    )
    trim_fraction: float = _opt(
        0.1, doc="trimmed-mean: fraction cut at each end", allowed="[0, 0.5)"
    )
    mode: str = _opt(
        "sync",
        choices=("sync", "async"),
        doc="sync: rounds of sampled clients; async: every idle client is sent the current "
        "model and replies are applied as they arrive (dpfl.server.async_loop)",
    )
    async_scheme: str = _opt(
        "fedfix",
        choices=("fedfix", "fedbuff", "fedasync", "sync"),
        doc="async: when to aggregate (fedfix: every async-window; fedbuff: every async-buffer "
        "returns; fedasync: every return; sync: FedAvg on the same clock, the reference)",
    )
    async_window: float = _opt(0.5, check=positive, doc="async fedfix: the window dt")
    async_buffer: int = _opt(5, check=at_least(1), doc="async fedbuff: returns per aggregation c")
    async_weights: str = _opt(
        "weight",
        choices=("weight", "identical"),
        doc="async fedasync/fedbuff weights d_i: weight (re-weighted to the federated objective) "
        "or identical (1, or 1/c for fedbuff)",
    )
    horizon: float = _opt(
        20.0,
        check=positive,
        doc="async: the run's length in simulated time (virtual clock) or seconds (real clock)",
    )
    client_speeds: str = _opt(
        "F-0",
        doc="async: each client's time per local round: F-X (client 0 takes 1, the last X % "
        "less) or one comma-separated time per client",
    )
    clock: str = _opt(
        "virtual",
        choices=("virtual", "real"),
        doc="async: virtual (simulated time from client-speeds, reproducible bit for bit) or "
        "real (replies in their arrival order, e.g. on the Deployment Engine)",
    )
    eval_interval: float = _opt(
        0.0,
        check=non_negative,
        doc="async: evaluate (and checkpoint) once per this much time; 0: every aggregation",
    )
    backend: str = _opt("inprocess", choices=("inprocess", "ray"), doc="simulation engine")
    reply_timeout: float | None = _opt(None, check=positive, doc="seconds to wait for replies")
    client_diagnostics: bool = _opt(
        False,
        doc="under DP, clients also send train-loss, local-test-accuracy, num-examples, "
        "local-steps, update-norm: computed on their records, un-noised, NOT covered by the "
        "privacy guarantee (stored as uncovered/...); without DP they are always sent",
    )

    def _validate(self) -> None:
        if not (0 < self.fraction <= 1):
            raise ConfigError(f"federation.fraction must be in (0, 1], got {self.fraction!r}")
        if not (0 <= self.trim_fraction < 0.5):
            raise ConfigError(
                f"federation.trim-fraction must be in [0, 0.5), got {self.trim_fraction!r}"
            )
        if self.mode == "async":
            self._validate_async()
        if self.clients_per_round is not None and self.clients_per_round > self.num_clients:
            raise ConfigError(
                f"federation.clients-per-round ({self.clients_per_round}) exceeds "
                f"federation.num-clients ({self.num_clients})"
            )

    def _validate_async(self) -> None:
        from dpfl.server.async_schedule import parse_speeds

        if self.fraction != 1.0 or self.clients_per_round is not None:
            raise ConfigError(
                "federation.fraction / clients-per-round sample clients per round in sync mode; "
                "in async mode every idle client is sent the model: remove them"
            )
        if self.async_scheme == "fedbuff" and self.async_buffer > self.num_clients:
            raise ConfigError(
                f"federation.async-buffer ({self.async_buffer}) exceeds federation.num-clients "
                f"({self.num_clients}): fedbuff would wait forever"
            )
        parse_speeds(self.client_speeds, self.num_clients)  # ConfigError when malformed


@dataclass(frozen=True)
class LoraConfig(_Section):
    SECTION: ClassVar[str] = "lora"

    r: int = _opt(
        8, check=at_least(0), doc="LoRA rank (text tasks); 0: full fine-tuning, no adapters"
    )
    alpha: float = _opt(16.0, check=positive, doc="LoRA scaling numerator")
    dropout: float = _opt(0.0, check=in_unit_interval_closed_open, doc="LoRA dropout")
    target_modules: str = _opt(
        "auto",
        doc="comma-separated module names; auto: peft's default for the architecture (BERT "
        "query,value; Llama q_proj,v_proj; GPT-2 c_attn)",
    )
    freeze_a: bool = _opt(
        False, doc="keep every A at its random init, train only B and the head (FFA-LoRA)"
    )

    def _validate(self) -> None:
        if not [m for m in self.target_modules.split(",") if m.strip()]:
            raise ConfigError("lora.target-modules must name at least one module")


@dataclass(frozen=True)
class StoreConfig(_Section):
    SECTION: ClassVar[str] = "store"

    path: str = _opt("dpfl-runs.sqlite", doc="SQLite run store")

    def _validate(self) -> None:
        if not self.path.strip():
            raise ConfigError("store.path cannot be empty")


_SECTIONS: dict[str, type[_Section]] = {
    cls.SECTION: cls
    for cls in (
        PrivacyConfig,
        OptimizerConfig,
        DataConfig,
        ModelConfig,
        TrainingConfig,
        FederationConfig,
        LoraConfig,
        StoreConfig,
    )
}
_TOP_LEVEL = ("name", "seed", "task")

#: what gets trained (dpfl.tasks); text-classification and causal-lm come with LoRA fine-tuning
TASK_NAMES = ("image-classification", "text-classification", "causal-lm")

# Setting one key of a pair unsets the other (see the module docstring).
_EXCLUSIVE = {
    ("privacy", "noise-multiplier"): ("privacy", "target-epsilon"),
    ("privacy", "target-epsilon"): ("privacy", "noise-multiplier"),
}


@dataclass(frozen=True)
class Config:
    """A whole run configuration (immutable; derive changed copies with :func:`apply_overrides`)."""

    name: str = "dpfl"
    seed: int = 0
    task: str = "image-classification"
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    store: StoreConfig = field(default_factory=StoreConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"name must be a non-empty string, got {self.name!r}")
        if (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not 0 <= self.seed <= MAX_SEED
        ):
            raise ConfigError(f"seed must be an integer in [0, 2**63 - 1], got {self.seed!r}")
        if self.task not in TASK_NAMES:
            raise ConfigError(f"task must be one of {', '.join(TASK_NAMES)}; got {self.task!r}")
        user_dp = self.privacy.enabled and self.privacy.level == "user"
        if user_dp != (self.federation.strategy == "dp-fedavg"):
            raise ConfigError(
                "user-level DP is the dp-fedavg strategy: set privacy.level='user' with "
                "federation.strategy='dp-fedavg' (and privacy.level='sample' otherwise)"
            )
        if user_dp and self.federation.clients_per_round is not None:
            raise ConfigError(
                "dp-fedavg samples clients by Poisson sampling (federation.fraction) for its "
                "accounting; unset federation.clients-per-round"
            )
        if user_dp and self.privacy.clipping not in ("flat", "adaptive"):
            raise ConfigError(
                f"dp-fedavg clips client updates flat or adaptive, not {self.privacy.clipping!r}"
            )

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        """Builds a config from nested kebab-case tables (as TOML gives them)."""
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in _TOP_LEVEL:
                kwargs[key] = value
            elif key in _SECTIONS:
                kwargs[key] = _SECTIONS[key].from_dict(_resolve_exclusive(key, value))
            else:
                raise ConfigError(
                    f"unknown config key {key!r}; valid: "
                    f"{', '.join(_TOP_LEVEL + tuple(sorted(_SECTIONS)))}"
                )
        return cls(**kwargs)

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> Config:
        """Builds a config from dotted keys (``{"privacy.delta": 1e-5}``, Flower's run_config).

        Flower's run_config cannot hold a missing value, so the string ``"none"`` unsets an
        optional key there (``privacy.target-epsilon = "none"`` in pyproject.toml).
        """
        nested: dict[str, Any] = {}
        for dotted, value in flat.items():
            if isinstance(value, str) and value.lower() == "none":
                value = None
            _set_dotted(nested, dotted, value)
        return cls.from_dict(nested)

    # -- export -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "seed": self.seed, "task": self.task}
        for section in _SECTIONS:
            out[section] = getattr(self, section).to_dict()
        return out

    def to_flat(self) -> dict[str, Any]:
        """Dotted scalar keys, the shape of Flower's ``run_config``."""
        flat: dict[str, Any] = {"name": self.name, "seed": self.seed, "task": self.task}
        for section in _SECTIONS:
            for key, value in getattr(self, section).to_dict().items():
                flat[f"{section}.{key}"] = value
        return flat

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


def _resolve_exclusive(section: str, table: Any) -> Any:
    if not isinstance(table, Mapping):
        return table
    both = [k for k in table if (section, k) in _EXCLUSIVE]
    if len(both) > 1 and all(table[k] is not None for k in both):
        raise ConfigError(f"{section}.{both[0]} and {section}.{both[1]} are both set; set only one")
    table = dict(table)
    for key in both:
        other_section, other = _EXCLUSIVE[(section, key)]
        if table.get(key) is not None and other not in table:
            table[other] = None
    return table


def _set_dotted(nested: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if len(parts) == 1:
        nested[dotted] = value
        return
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"config key {dotted!r} must look like section.key")
    section, key = parts
    table = nested.setdefault(section, {})
    if not isinstance(table, dict):
        raise ConfigError(f"config key {dotted!r}: {section!r} is not a section")
    table[key] = value


# -- loading and overrides -----------------------------------------------------------------------
def parse_override(text: str) -> tuple[str, Any]:
    """Parses ``section.key=value``; the value is read as a TOML value, else as a plain string.

    ``none`` or ``null`` unsets an optional key (TOML itself has no null).
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    raw = raw.strip()
    if raw.lower() in ("none", "null"):
        return key, None
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"override {key}: NaN is not a valid value")
    return key, value


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Returns a copy of nested config ``data`` with ``--set`` overrides applied."""
    merged: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        if len(parts) == 2 and tuple(parts) in _EXCLUSIVE and value is not None:
            other_section, other = _EXCLUSIVE[tuple(parts)]  # type: ignore[index]
            if isinstance(merged.get(other_section), dict):
                merged[other_section].pop(other, None)
        _set_dotted(merged, key, value)
    return merged


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Reads a TOML config (or the defaults when ``path`` is None) and applies overrides.

    Raises:
        ConfigError: the file is missing or malformed, a key is unknown, or a value is invalid.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config file {p}: {e}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"malformed TOML in {p}: {e}") from None
    return Config.from_dict(apply_overrides(data, overrides))
