"""Red team of the privacy-relevant pieces of ``dpfl finetune``: central checkpoints and
``--resume`` (``dpfl.clients.central``), the causal-LM per-record loss, the mean-pooling
classifier, and what the summary and the run store keep.

The resume tests run ``train_central`` on the embedded digits task (a second a run); a kill is a
``KeyboardInterrupt`` raised from the step hook (as in tests/cli/test_finetune.py), or from the
store write of a checkpoint. The model tests use the tiny random BERT / GPT-2 / Llama fixtures.
"""

from __future__ import annotations

import io
import json

import pytest
import torch
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from dpfl.accountants import Phase, compute_epsilon
from dpfl.cli.main import app
from dpfl.clients import central
from dpfl.config import load_config
from dpfl.privacy import make_private
from dpfl.store import RunStore
from dpfl.tasks import get_task
from tests.reference import rdp_epsilon
from tests.tasks.test_causal_lm import sets as lm_sets
from tests.tasks.test_causal_lm import tiny_lm  # noqa: F401 - the fixture
from tests.tasks.test_text_classification import sets as text_sets
from tests.tasks.test_text_classification import tiny  # noqa: F401 - the fixture

#: a central digits run of 3 epochs (17 steps at q = 256/1437, an epoch about 5 steps)
DIGITS = ["training.epochs=3", "data.batch-size=256", "privacy.target-epsilon=none"]


# -- central checkpoints and resume -----------------------------------------------------------
def _attempt(store, monkeypatch, cfg=None, *, resume=None, die_after=None, die_in_checkpoint=None):
    """One process of a central run: a new run of ``cfg``, or the resume of run ``resume``.
    It is killed after ``die_after`` steps of its own, or while writing the checkpoint of
    epoch ``die_in_checkpoint`` (after that epoch's metrics were stored). Returns (run id, steps
    this attempt released, result or None)."""
    taken = [0]
    real = central.train_private

    def counting(pt, **kw):
        inner = kw["on_step"]

        def on_step(step, loss):
            taken[0] += 1
            inner(step, loss)
            if die_after is not None and taken[0] >= die_after:
                raise KeyboardInterrupt

        return real(pt, **{**kw, "on_step": on_step})

    monkeypatch.setattr(central, "train_private", counting)
    result = None
    try:
        with RunStore(store) as s:
            if resume is None:
                handle, state = s.create_run("train", cfg.to_dict(), name="rt", seed=cfg.seed), None
            else:
                cfg, state = central.central_resume_state(s, resume, ("train",))
                handle = s.reopen_run(resume)
            if die_in_checkpoint is not None:
                write = handle.add_artifact

                def dying_write(kind, name, data, **kw):
                    if kind == "checkpoint" and kw.get("round") == die_in_checkpoint:
                        raise KeyboardInterrupt
                    return write(kind, name, data, **kw)

                handle.add_artifact = dying_write
            try:
                with s.tracking(handle):
                    result = central.train_central(cfg, handle, resume=state)
            except KeyboardInterrupt:
                assert handle.status() == "interrupted"
    finally:
        monkeypatch.setattr(central, "train_private", real)
    return handle.run_id, taken[0], result


def _eps(sigma, q, steps, delta):
    return compute_epsilon([Phase(sigma, q, steps)], delta, "rdp")


def _last_checkpoint(store, run_id):
    with RunStore(store) as s:
        arts = [a for a in s.artifacts(run_id, with_data=True) if a["kind"] == "checkpoint"]
    assert len(arts) == 1  # only the latest is kept
    return torch.load(io.BytesIO(arts[0]["data"]), weights_only=False)


def test_every_released_step_is_charged_exactly_once_across_kills(tmp_path, monkeypatch):
    """Four attempts: killed after the first checkpoint, killed again before the next one (the
    same checkpoint is resumed twice: its steps are replayed twice), killed after the second,
    then run to the end. The store's ledger holds one event per released step of every attempt
    (no step lost, none counted twice, sequence numbers 0..n-1), the reported epsilon is that of
    all of them, and the model is bit-identical to an uninterrupted run.

    Breaks if the resumed ledger is rebuilt from the checkpoint's steps only (lost steps, and seq
    numbers collide), if restored events are written to the store again (double count), or if
    the noise / sampler generators are not restored."""
    cfg = load_config(None, DIGITS)
    _, n_ref, reference = _attempt(tmp_path / "whole.sqlite", monkeypatch, cfg)
    store = tmp_path / "killed.sqlite"
    run_id, first, _ = _attempt(store, monkeypatch, cfg, die_after=7)
    per_epoch = _last_checkpoint(store, run_id)["steps"]
    assert 2 <= per_epoch < 7 and _last_checkpoint(store, run_id)["epoch"] == 1
    taken = [first]
    _, n, _ = _attempt(store, monkeypatch, resume=run_id, die_after=1)  # before epoch 2 ends
    taken.append(n)
    assert _last_checkpoint(store, run_id)["epoch"] == 1
    _, n, _ = _attempt(store, monkeypatch, resume=run_id, die_after=per_epoch + 1)
    taken.append(n)
    assert _last_checkpoint(store, run_id)["epoch"] == 2
    _, n, result = _attempt(store, monkeypatch, resume=run_id)
    taken.append(n)
    assert result is not None and result.train.stopped == "completed"

    with RunStore(store) as s:
        events = s.privacy_events(run_id)
        assert s.get_run(run_id)["status"] == "completed"
    assert len(events) == sum(taken) and taken[-1] == n_ref - 2 * per_epoch
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert {(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in events} == {
        (1.0, events[0]["sample_rate"], 1)
    }
    q, delta = events[0]["sample_rate"], cfg.privacy.delta
    assert result.epsilon == pytest.approx(_eps(1.0, q, len(events), delta), rel=1e-9)
    assert result.epsilon == pytest.approx(rdp_epsilon(1.0, q, len(events), delta), rel=1e-2)
    assert result.epsilon > reference.epsilon
    assert result.train.steps == reference.train.steps == n_ref
    assert result.test_loss == reference.test_loss and result.accuracy == reference.accuracy


def test_a_resumed_run_never_exceeds_the_target_epsilon(tmp_path, monkeypatch):
    """Calibrated to spend exactly the target over the plan, killed late in the last epoch: the
    killed attempt's steps after the checkpoint leave less budget than the remaining plan needs,
    so the resumed run must stop on the budget, at the checkpointed noise multiplier, with the
    epsilon of every recorded event within the target.

    Breaks if the budget is dropped on resume (the ledger rebuilt without target_epsilon and
    make_private not given it: each alone is caught by the other), or if sigma is re-calibrated
    instead of kept."""
    target = 3.0
    cfg = load_config(
        None, [*DIGITS, "privacy.noise-multiplier=none", f"privacy.target-epsilon={target}"]
    )
    store = tmp_path / "s.sqlite"
    run_id, _, _ = _attempt(store, monkeypatch, cfg, die_after=14)
    sigma = _last_checkpoint(store, run_id)["noise_multiplier"]
    assert _last_checkpoint(store, run_id)["epoch"] == 2
    _, _, result = _attempt(store, monkeypatch, resume=run_id)
    with RunStore(store) as s:
        events = s.privacy_events(run_id)
    assert result.train.stopped == "budget"
    assert result.train.steps < result.steps_planned
    assert {e["noise_multiplier"] for e in events} == {sigma} and result.noise_multiplier == sigma
    q, delta = events[0]["sample_rate"], cfg.privacy.delta
    spent = _eps(sigma, q, len(events), delta)  # the enforcing accountant, on every event
    assert spent <= target and result.epsilon == pytest.approx(spent, rel=1e-9)
    assert _eps(sigma, q, len(events) + 1, delta) > target  # the budget ended the run
    assert rdp_epsilon(sigma, q, len(events), delta) == pytest.approx(spent, rel=1e-2)


def test_between_checkpoints_the_store_gains_only_privacy_events(tmp_path, monkeypatch):
    """What a killed attempt leaves after its last checkpoint: only ledger events (sigma, q, 1:
    data-independent). No per-step metric, no model, no summary: nothing computed on private
    data after the checkpoint is stored, which is what makes replaying its noise on resume safe
    (see the next test). Breaks if, say, the step hook logs the training loss to the run."""
    cfg = load_config(None, DIGITS)
    store = tmp_path / "s.sqlite"
    run_id, taken, _ = _attempt(store, monkeypatch, cfg, die_after=8)
    ck = _last_checkpoint(store, run_id)
    assert ck["epoch"] == 1 and taken > ck["steps"]
    with RunStore(store) as s:
        metrics = s.metrics(run_id)
        artifacts = s.artifacts(run_id)
        run = s.get_run(run_id)
        events = s.privacy_events(run_id)
    assert len(events) == taken
    assert metrics and {m["round"] for m in metrics} == {1}  # the checkpointed epoch only
    assert {m["name"] for m in metrics} <= {"test_accuracy", "test_loss", "epsilon"}
    assert [(a["kind"], a["round"]) for a in artifacts] == [("checkpoint", 1)]
    assert not run["summary"]


def _killed_in_the_checkpoint_write(tmp_path, monkeypatch, extra):
    cfg = load_config(None, [*DIGITS, *extra])
    _, _, reference = _attempt(tmp_path / "whole.sqlite", monkeypatch, cfg)
    store = tmp_path / "killed.sqlite"
    run_id, _, _ = _attempt(store, monkeypatch, cfg, die_in_checkpoint=2)
    assert _last_checkpoint(store, run_id)["epoch"] == 1
    _, _, result = _attempt(store, monkeypatch, resume=run_id)
    with RunStore(store) as s:
        rows = [(m["name"], m["value"]) for m in s.metrics(run_id) if m["round"] == 2]
    return reference, result, rows


def test_the_replayed_noise_only_re_releases_what_was_released(tmp_path, monkeypatch):
    """Is replaying the noise draws after the checkpoint safe?

    The resumed run restores the noise generator (and the Poisson sampler's) to the checkpoint,
    so the steps after it draw the killed attempt's noise z_t again. Two releases with the same
    z_t and different clipped sums S_A, S_B would reveal S_A - S_B with no noise at all, and the
    ledger charging both attempts' steps as independent Gaussian releases would not cover it.
    So the replay is safe iff, for every step after the checkpoint, either nothing depending on
    the killed attempt's release of it was stored or shown, or the replay recomputes exactly the
    same release (same parameters, same batch, same noise: a re-release, which costs nothing).

    What a killed attempt shows or stores after its checkpoint: ledger events (public), the
    progress bar's training loss and tokens/s (shown, not stored; not privatized, known), and one
    window: log_epoch stores (and prints) the epoch's test metrics BEFORE the checkpoint of that
    epoch is written (the torch.save of a full fine-tune's state takes seconds). A run that stops
    mid-epoch (diverged, no progress, or a plan that ends between epochs) also exports its model
    and final metrics after the last checkpoint, and a 'failed' run can be resumed. On the CPU
    with Poisson sampling the replay is bit-identical, so the window only re-releases the same
    numbers: checked here by killing the run inside the epoch-2 checkpoint write. (On a GPU the
    replay is only equal up to non-deterministic reductions: the noise-free difference is
    rounding, not data. If the data file changes between the kill and the resume, it is data.)
    Breaks if the sampler or noise generator is not restored, or restored from another point."""
    reference, result, rows = _killed_in_the_checkpoint_write(tmp_path, monkeypatch, [])
    names = sorted({n for n, _ in rows})
    assert names == ["epsilon", "test_accuracy", "test_loss"]
    # fixed: the checkpoint is written before the epoch's metrics, so the attempt killed inside
    # the checkpoint write stored none; the epoch-2 metrics exist once, from the resumed run
    assert len(rows) == len(names)
    assert result.test_loss == reference.test_loss


def test_without_poisson_sampling_the_replayed_noise_meets_other_batches(tmp_path, monkeypatch):
    """As above with ``privacy.poisson-sampling=false`` (fixed-size shuffled batches): the epoch-2
    metrics the killed attempt stored and those of the resumed run must be the same release.
    They are not: the resume reshuffles from the seed, so epoch 2 sees epoch 1's order under the
    same noise draws, and the run is not bit-identical to an uninterrupted one. Fix: restore
    ``shuffle`` from ``resume.loader_generator`` for private runs too (and write the checkpoint
    before the epoch's metrics are stored, which closes the window for every sampler)."""
    extra = ["privacy.poisson-sampling=false"]
    reference, result, rows = _killed_in_the_checkpoint_write(tmp_path, monkeypatch, extra)
    for name in ("test_accuracy", "test_loss"):  # epsilon differs by design (charged twice)
        values = [v for n, v in rows if n == name]
        assert values and len(set(values)) == 1, (name, values)
    assert result.test_loss == reference.test_loss


def test_a_dicesgd_checkpoint_keeps_no_unnoised_gradient_residual(tmp_path, monkeypatch):
    """DiceSGD's error-feedback buffer is a raw function of the records' gradients (never
    noised); the paper's (hidden-state) privacy analysis is only about the released steps.
    Since the per-epoch checkpoints (new in this change, for ``dpfl train`` too), every dicesgd
    central run leaves the buffer in the store (``artifacts`` table), also after it completes."""
    cfg = load_config(None, [*DIGITS, "privacy.clipping='dicesgd'"])
    store = tmp_path / "s.sqlite"
    run_id, _, result = _attempt(store, monkeypatch, cfg)
    assert result is not None
    # fixed: dicesgd runs are never checkpointed (so they cannot be resumed)
    with RunStore(store) as s:
        assert not [a for a in s.artifacts(run_id) if a["kind"] == "checkpoint"]


def test_a_secure_mode_checkpoint_does_not_store_the_secret_sampler_state(tmp_path, monkeypatch):
    """The MT19937 state of the sampler lets a reader of the store list every later batch (and,
    the twister being invertible, earlier ones): the amplification by subsampling the accountant
    assumes is gone for whoever reads the store. Fix: omit ``sampler_generator`` from the
    checkpoint in secure mode and reseed from the OS on resume (every step stays charged)."""
    cfg = load_config(None, [*DIGITS, "privacy.secure-mode=true"])
    store = tmp_path / "s.sqlite"
    run_id, _, _ = _attempt(store, monkeypatch, cfg)
    assert _last_checkpoint(store, run_id).get("sampler_generator") is None


# -- the causal-LM per-record loss --------------------------------------------------------------
def _lm(tiny_lm):  # noqa: F811
    cfg = load_config(None, lm_sets(tiny_lm))
    task = get_task(cfg)
    data = task.load_data()
    torch.manual_seed(0)
    model = task.build_model(data)
    x, y = next(iter(DataLoader(data.train, batch_size=8)))
    lengths = x["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) >= 3  # records of different lengths, right-padded
    return task, data, model, x, y


def _drop(batch, j):
    keep = [i for i in range(len(batch["input_ids"])) if i != j]
    return {k: v[keep] for k, v in batch.items()}


def test_lm_loss_is_each_records_mean_over_its_own_tokens(tiny_lm):  # noqa: F811
    """Each record's loss: removing any other record, or cutting the batch's padding columns,
    leaves it unchanged, and it equals the mean next-token loss of the record run alone without
    padding. Breaks if the loss is normalized over the batch's tokens (removal changes others), by
    the padded length (cutting padding changes it), or if padding positions are not ignored."""
    task, _, model, x, y = _lm(tiny_lm)
    model.eval()
    with torch.no_grad():
        losses = task.per_sample_loss(model(**x), y)
        n = len(y)
        for j in range(n):
            fewer = task.per_sample_loss(model(**_drop(x, j)), y[[i for i in range(n) if i != j]])
            others = torch.cat([losses[:j], losses[j + 1 :]])
            assert torch.allclose(fewer, others, rtol=1e-5, atol=1e-6), j
        t = int(x["attention_mask"].sum(1).max())
        cut = task.per_sample_loss(model(**{k: v[:, :t] for k, v in x.items()}), y[:, :t])
        assert torch.allclose(cut, losses, rtol=1e-5, atol=1e-6)
        for i in range(n):
            m = int(x["attention_mask"][i].sum())
            ids = x["input_ids"][i : i + 1, :m]
            logits = model(input_ids=ids).logits[0, :-1]
            alone = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
            assert torch.allclose(losses[i], alone, rtol=1e-4, atol=1e-6), i


@pytest.mark.parametrize("backend", ["bk", "hooks"])
def test_lm_one_record_moves_the_released_sum_by_exactly_its_clip(tiny_lm, backend):  # noqa: F811
    """noise 0, every record clipped: the released clipped sum with and without the last record
    differs by that record's clipped gradient, of norm C (<= C is the guarantee; == C shows the
    others did not move). Breaks if the loss mixes records (then make_private's probe refuses)."""
    task, data, model, x, y = _lm(tiny_lm)
    clip, b = 1e-3, len(y)

    def released(xb, yb):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        pt = make_private(
            model, opt, DataLoader(data.train, batch_size=b), noise_multiplier=0.0,
            clip_norm=clip, grad_sample_mode=backend, poisson_sampling=False, seed=0,
        )  # fmt: skip
        try:
            pt.train_step(xb, yb, task.per_sample_loss)
            return torch.cat([p.grad.flatten() for p in pt.optimizer.params]).double() * b
        finally:
            pt.detach()

    full = released(x, y)
    fewer = released(_drop(x, b - 1), y[: b - 1])
    assert float(full.norm()) > clip  # not vacuous: several clipped records
    assert float((full - fewer).norm()) == pytest.approx(clip, rel=1e-3)


# -- the mean-pooling classifier ----------------------------------------------------------------
def _mean_pool(tiny):  # noqa: F811
    cfg = load_config(None, text_sets(tiny, "model.pooling='mean'"))
    task = get_task(cfg)
    data = task.load_data()
    torch.manual_seed(0)
    model = task.build_model(data)
    assert type(model).__name__ == "MeanPoolClassifier"
    x, y = next(iter(DataLoader(data.train, batch_size=6)))
    return task, data, model, x, y


def _hostile(x):
    """Record 1: every mask zero (nothing to average: 0/0 without the clamp); record 2: cut to
    its first two tokens (its padding now covers most of it)."""
    h = {k: v.clone() for k, v in x.items()}
    h["attention_mask"][1] = 0
    h["input_ids"][1] = 0
    h["attention_mask"][2, 2:] = 0
    h["input_ids"][2, 2:] = 0
    return h


def test_mean_pool_one_records_padding_does_not_reach_the_others(tiny):  # noqa: F811
    """An all-padding record and a mostly-padding record: every logit stays finite, the empty
    record pools to zero (its logits are the head's bias), and no other record's logits move.
    Breaks if the mean is taken over the batch's mask (m.sum() instead of m.sum(1)) or the
    division is not guarded (0/0: NaN)."""
    _, _, model, x, _ = _mean_pool(tiny)
    model.eval()
    with torch.no_grad():
        plain = model(**x).logits
        hostile = model(**_hostile(x)).logits
    assert torch.isfinite(hostile).all()
    assert torch.allclose(hostile[1], model.classifier.bias, atol=1e-7)
    for i in (0, 3, 4, 5):
        assert torch.allclose(hostile[i], plain[i], rtol=1e-5, atol=1e-7), i


@pytest.mark.parametrize("backend", ["bk", "hooks", "ghost"])
def test_mean_pool_empty_record_cannot_poison_the_released_sum(tiny, backend):  # noqa: F811
    """Through the private step (noise 0, all clipped): with the all-padding record in the batch
    the released sum is finite, and removing a record moves it by at most C (the empty record's
    own gradient, only the head's bias, by exactly C). Breaks if a NaN of the empty record (an
    unguarded 0/0) reaches the clipped sum, which would poison every record's update."""
    task, data, model, x, y = _mean_pool(tiny)
    x = _hostile(x)
    clip, b = 1e-3, len(y)

    def released(xb, yb):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        pt = make_private(
            model, opt, DataLoader(data.train, batch_size=b), noise_multiplier=0.0,
            clip_norm=clip, grad_sample_mode=backend, poisson_sampling=False, seed=0,
        )  # fmt: skip
        try:
            pt.train_step(xb, yb, task.per_sample_loss)
            return torch.cat([p.grad.flatten() for p in pt.optimizer.params]).double() * b
        finally:
            pt.detach()

    full = released(x, y)
    assert torch.isfinite(full).all() and float(full.norm()) > clip
    keep = [i for i in range(b) if i != 1]
    without_empty = released({k: v[keep] for k, v in x.items()}, y[keep])
    assert float((full - without_empty).norm()) == pytest.approx(clip, rel=1e-3)
    without_last = released(_drop(x, b - 1), y[: b - 1])
    assert float((full - without_last).norm()) <= clip * (1 + 1e-4)


# -- what the summary and the store keep ----------------------------------------------------------
#: data-derived numbers dpfl finetune may keep: held-out metrics, the accounting, the plan, and
#: tokens/s (un-noised: see the report; accepted like dpfl train's timings)
SUMMARY_KEYS = {
    "run", "task", "accuracy", "test_loss", "epsilon", "delta", "noise_multiplier", "steps",
    "steps_planned", "stopped", "seconds", "tokens_per_second", "lr", "trainable_parameters",
    "parameters", "error", "initial_accuracy",  # the pretrained model's held-out accuracy
}  # fmt: skip
CHECKPOINT_KEYS = {
    "epoch", "steps", "trainable", "initial_loss", "initial_accuracy", "initial_metric",
    "torch_rng", "optimizer", "noise_multiplier", "sampler_generator",
}  # fmt: skip


def test_finetune_keeps_no_unprivatized_training_statistic(tiny, tmp_path):  # noqa: F811
    """A central private finetune: the JSON summary, the stored summary, the metrics and the
    artifacts hold only held-out metrics, the accounting and the plan (no training loss, no
    clipped fraction, no per-record norm), and the checkpoint only the training state. Breaks if,
    say, ``result.train.mean_loss`` (the un-noised training loss) joins the summary."""
    store = tmp_path / "s.sqlite"
    argv = ["finetune", "--model", tiny["model"], "--data", tiny["csv"], "--store", str(store),
            "--noise-multiplier", "0.5", "--epochs", "10", "--lora-r", "4", "--json",
            "--set", "data.batch-size=32", "--set", "optimizer.name='adam'",
            "--set", "optimizer.lr=0.05"]  # fmt: skip
    r = CliRunner().invoke(app, argv, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert set(summary) <= SUMMARY_KEYS, set(summary) - SUMMARY_KEYS
    with RunStore(store) as s:
        row = s.get_run(summary["run"])
        metrics = s.metrics(summary["run"])
        artifacts = s.artifacts(summary["run"], with_data=True)
    assert set(row["summary"]) <= SUMMARY_KEYS, set(row["summary"]) - SUMMARY_KEYS
    assert {m["name"] for m in metrics} <= {"test_accuracy", "test_loss", "epsilon", "steps"}
    assert {a["kind"] for a in artifacts} == {"checkpoint", "model"}
    (ck,) = [a for a in artifacts if a["kind"] == "checkpoint"]
    state = torch.load(io.BytesIO(ck["data"]), weights_only=False)
    assert set(state) <= CHECKPOINT_KEYS, set(state) - CHECKPOINT_KEYS
    assert set(state["optimizer"]) == {"inner", "policy", "error_feedback", "generator", "steps"}
    assert state["optimizer"]["error_feedback"] is None  # flat clipping: no hidden buffer
