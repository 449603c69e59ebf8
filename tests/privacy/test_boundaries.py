"""The guarantee at the boundaries (issue 9): hard models are either trained exactly (released
clipped sum == the microbatch reference, one record removed moves it by <= C) or refused."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpfl.accountants import Phase, PrivacyLedger, compute_epsilon
from dpfl.errors import IncompatibleModelError, PrivacyBudgetError
from dpfl.privacy import make_private
from tests.privacy.hard_models import BATCH, accepted_cases, refused_cases

ACCEPTED = accepted_cases()
REFUSED = refused_cases()


def _call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _drop(inputs, i):
    def cut(t):
        return torch.cat([t[:i], t[i + 1 :]]) if t.dim() > 0 and t.shape[0] == BATCH else t

    return {k: cut(v) for k, v in inputs.items()} if isinstance(inputs, dict) else cut(inputs)


def _private(factory, backend, clip, seed=0):
    torch.manual_seed(seed)
    model = factory()
    reference = copy.deepcopy(model)
    loader = DataLoader(TensorDataset(torch.zeros(2 * BATCH)), batch_size=BATCH)  # q = 1/2
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pt = make_private(
            model, opt, loader, noise_multiplier=0.0, clip_norm=clip, grad_sample_mode=backend
        )
    return pt, reference


def _released(pt, inputs, y, loss):
    pt.model.train()
    pt.optimizer.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pt.backward(loss(_call(pt.model, inputs), y))
        pt.optimizer.step()
    return torch.cat([p.grad.flatten() for p in pt.optimizer.params]) * pt.expected_batch_size


def _microbatch(reference, inputs, y, loss):
    """[B, D] per-sample gradients, one forward/backward per record (obviously correct)."""
    rows = []
    params = [p for p in reference.parameters() if p.requires_grad]
    for i in range(BATCH):
        one = (
            {k: v[i : i + 1] for k, v in inputs.items()}
            if isinstance(inputs, dict)
            else inputs[i : i + 1]
        )
        reference.zero_grad(set_to_none=True)
        loss(_call(reference, one), y[i : i + 1]).sum().backward()
        rows.append(
            torch.cat(
                [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]
            )
        )
    return torch.stack(rows)


def _accepted_params():
    for name, (_, _, _, _, backends) in ACCEPTED.items():
        for b in backends:
            yield pytest.param(name, b, id=f"{name}-{b}")


@pytest.mark.parametrize("case,backend", list(_accepted_params()))
def test_hard_models_are_exact_and_one_record_moves_the_sum_by_at_most_c(case, backend):
    factory, inputs, y, loss, _ = ACCEPTED[case]
    # Prepare: C between the smallest and largest per-sample norm, so both branches of min(1, .)
    _, reference = _private(factory, backend, 1.0)
    grads = _microbatch(reference, inputs, y, loss)
    norms = grads.norm(dim=1)
    clip = float(norms.median())
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    assert bool((factors < 1).any()) and bool((factors == 1).any())
    # Execute
    pt, _ = _private(factory, backend, clip)
    full = _released(pt, inputs, y, loss)
    # Assert: exact clipped sum
    expected = factors @ grads
    scale = float(expected.abs().max())
    assert torch.allclose(full, expected, rtol=1e-4, atol=1e-5 * scale), (
        float((full - expected).abs().max()),
        scale,
    )
    assert pt.optimizer.last_stats["samples"] == BATCH
    # ... and removing any one record moves the released sum by at most C
    for i in range(BATCH):
        pt_i, _ = _private(factory, backend, clip)
        moved = float(
            (full - _released(pt_i, _drop(inputs, i), y[torch.arange(BATCH) != i], loss)).norm()
        )
        assert moved <= clip * (1 + 1e-4), (i, moved, clip)


def _refused_params():
    for name, (_, _, _, _, backends) in REFUSED.items():
        for b in backends:
            yield pytest.param(name, b, id=f"{name}-{b}")


@pytest.mark.parametrize("case,backend", list(_refused_params()))
def test_models_that_break_the_guarantee_are_refused(case, backend):
    factory, inputs, y, loss, _ = REFUSED[case]
    with pytest.raises(IncompatibleModelError):
        pt, _ = _private(factory, backend, 1.0)
        _released(pt, inputs, y, loss)


@pytest.mark.parametrize(
    "case,needle",
    [
        ("train-mode-frozen-batchnorm", "'bn' (BatchNorm1d)"),
        ("time-first-attention-T==B", "attn."),
        ("transpose-inside-T==B", "'lin' (Linear)"),
        ("functional-tie", "'emb.weight'"),
        ("torch-lstm", "DPLSTM"),
        ("mixes-records", "mixes records"),
    ],
)
def test_refusals_name_the_module_and_the_way_out(case, needle):
    factory, inputs, y, loss, _ = REFUSED[case]
    with pytest.raises(IncompatibleModelError, match=None) as err:
        pt, _ = _private(factory, "bk", 1.0)
        _released(pt, inputs, y, loss)
    assert needle in str(err.value), str(err.value)


# -- parameters unfrozen later, optimizers holding other parameters ------------------------------
def _cnn(freeze_head=True):
    from tests.privacy.models import make_case

    model, x, y = make_case("cnn", batch=8)
    if freeze_head:
        for p in model.parameters():
            p.requires_grad_(False)
        list(model.parameters())[0].requires_grad_(True)
    return model, x, y


@pytest.mark.parametrize("backend", ["bk", "hooks", "functorch", "ghost"])
def test_a_parameter_unfrozen_after_make_private_is_refused_and_nothing_moves(backend):
    from tests.privacy.models import loss_fn

    model, x, y = _cnn()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # holds the frozen ones too
    pt = make_private(model, opt, loader, noise_multiplier=1.0, grad_sample_mode=backend, seed=0)
    for p in model.parameters():
        p.requires_grad_(True)  # gradual unfreezing
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(IncompatibleModelError, match="became trainable after make_private"):
        pt.train_step(x, y, loss_fn)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert pt.ledger.events == []


def test_the_step_refuses_raw_gradients_on_parameters_it_does_not_cover():
    from tests.privacy.models import loss_fn

    model, x, y = _cnn(freeze_head=False)
    other = nn.Linear(3, 3)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    opt = torch.optim.SGD([*model.parameters(), *other.parameters()], lr=1.0)
    pt = make_private(model, opt, loader, noise_multiplier=1.0, seed=0)
    before = other.weight.detach().clone()
    pt.optimizer.zero_grad()
    # a second model's term in the loss: a raw gradient the private step never saw
    losses = loss_fn(pt.model(x), y) + other(x.flatten(1)[:, :3]).sum(1)
    pt.backward(losses)
    with pytest.raises(IncompatibleModelError, match="not covered by the private step"):
        pt.optimizer.step()
    assert torch.equal(other.weight, before) and other.weight.grad is None
    assert pt.ledger.events == []


# -- eval-mode BatchNorm is pinned ----------------------------------------------------------------
def test_frozen_eval_batchnorm_stays_in_eval_mode_and_its_statistics_never_move():
    factory, x, y, loss, _ = ACCEPTED["frozen-eval-batchnorm"]
    pt, _ = _private(factory, "bk", 1.0)
    bn = pt.model.bn
    stats = (bn.running_mean.clone(), bn.running_var.clone())
    for _ in range(3):
        _released(pt, x, y, loss)  # calls model.train() every step
        assert not bn.training
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    bn.train()  # by hand: still pinned at the next forward
    _released(pt, x, y, loss)
    assert not bn.training
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])


# -- a given budget is always enforced ------------------------------------------------------------
def test_target_epsilon_is_enforced_on_a_given_ledger_without_a_budget():
    from tests.privacy.models import loss_fn

    model, x, y = _cnn(freeze_head=False)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # q = 1/2
    ledger = PrivacyLedger("rdp", 1e-5)  # no budget of its own
    pt = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        loader,
        noise_multiplier=2.0,
        target_epsilon=3.0,
        ledger=ledger,
        seed=0,
    )
    steps = 0
    with pytest.raises(PrivacyBudgetError):
        for _ in range(100):
            pt.train_step(x[:4], y[:4], loss_fn)
            steps += 1
    # independent of the ledger: the closed history of `steps` releases fits, one more does not
    assert compute_epsilon([Phase(2.0, 0.5, steps)], 1e-5) <= 3.0
    assert compute_epsilon([Phase(2.0, 0.5, steps + 1)], 1e-5) > 3.0
    assert ledger.target_epsilon == 3.0


def test_the_stricter_of_two_budgets_is_kept():
    ledger = PrivacyLedger("rdp", 1e-5, target_epsilon=2.0)
    ledger.enforce_budget(5.0)
    assert ledger.target_epsilon == 2.0
    ledger.enforce_budget(1.0)
    assert ledger.target_epsilon == 1.0
    assert math.isfinite(ledger.epsilon("central"))


def test_secure_mode_batches_do_not_follow_the_seed():
    from tests.privacy.models import make_case

    def batches(secure):
        model, x, y = make_case("cnn", batch=64)
        loader = DataLoader(TensorDataset(x, y), batch_size=8)
        pt = make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            loader,
            noise_multiplier=1.0,
            seed=0,
            secure_mode=secure,
        )
        return [tuple(xb.sum((1, 2, 3)).tolist()) for xb, _ in pt.data_loader]

    assert batches(False) == batches(False)  # seeded: reproducible
    assert batches(True) != batches(True)  # secure: the seed does not reveal the batches


# -- what the guard sees of the training loop ------------------------------------------------------
def test_submodules_called_directly_bypass_nothing():
    from tests.privacy.models import loss_fn

    model, x, y = _cnn(freeze_head=False)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    pt = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        loader,
        noise_multiplier=1.0,
        grad_sample_mode="hooks",
        seed=0,
    )
    pt.optimizer.zero_grad()
    inner = pt.model._module  # SmallCNN: features, classifier
    h = inner.classifier(inner.features(x))  # skipping the model's own forward
    pt.backward(loss_fn(h, y))
    with pytest.raises(IncompatibleModelError, match="without a forward of the model itself"):
        pt.optimizer.step()
    assert pt.ledger.events == []


def _cnn_private(**kw):
    from tests.privacy.models import make_case

    model, x, y = make_case("cnn", batch=8)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return make_private(model, opt, loader, noise_multiplier=1.0, seed=0, **kw), x, y


def test_a_loss_that_mixes_records_is_refused():
    pt, x, y = _cnn_private()

    def in_batch_negatives(out, target):  # InfoNCE over the batch
        sim = out @ out.t()
        return -torch.log_softmax(sim, dim=1).diagonal()

    with pytest.raises(IncompatibleModelError, match="the loss mixes records"):
        pt.train_step(x, y, in_batch_negatives)
    assert pt.ledger.events == []


def test_losses_and_rows_must_match_the_batch():
    from tests.privacy.models import loss_fn

    pt, x, y = _cnn_private()
    pt.optimizer.zero_grad()
    with pytest.raises(IncompatibleModelError, match="per-sample losses for a forward of 8"):
        pt.backward(loss_fn(pt.model(x), y)[:-1])
    pt.guard._forwarded = True
    with pytest.raises(IncompatibleModelError, match="produced 7 rows for 8"):
        pt.guard.check_rows(7)


def test_the_loss_probe_slices_model_outputs_and_keeps_an_honest_loss():
    # a Hugging Face model through train_step: its ModelOutput is sliced like a tensor
    from tests.privacy.hard_models import cls_loss, tiny_bert

    torch.manual_seed(0)
    model = tiny_bert()
    ids = torch.randint(1, 40, (8, 6))
    y = torch.randint(0, 3, (8,))
    loader = DataLoader(TensorDataset(ids, y), batch_size=4)
    pt = make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), loader, noise_multiplier=1.0, seed=0
    )
    loss = pt.train_step(ids[:4], y[:4], cls_loss)
    assert math.isfinite(loss) and pt._loss_probed
    assert len(pt.ledger.events) == 1
