"""The private step against expectations computed independently of the implementation.

Every expected value here is a closed form written out in the test, or comes from the microbatch
per-sample gradients of :mod:`tests.reference` (one backward per sample on an un-hooked copy of
the model). Nothing is read back from the clip policy (no ``policy.factors``, no
``gradient_multiplier``) to form an expectation. Each test was checked to fail under a single
mutation of the privacy code that the rest of the suite did not catch (mutation testing, issue 9):

* virtual steps not accounted          -> test_virtual_steps_are_accounted_once_per_logical_step
* adaptive gradient noise not split    -> test_adaptive_gradient_noise_is_the_split_multiplier
* adaptive count released un-noised    -> test_adaptive_clip_update_comes_from_a_noisy_count
* min(1, .) of the factors dropped     -> test_partly_clipped_batch_matches_the_factor_formulas
* factors rescaled in a backend        -> test_clipped_sum_with_factors_computed_independently,
                                          test_removing_one_record_moves_the_sum_by_at_most_c
"""

import math

import pytest
import torch
from scipy import stats

from dpfl.accountants import Phase, compute_epsilon
from tests.privacy.models import build, loss_fn, make_case
from tests.reference import microbatch_grads, per_param_norms

BACKENDS = ["hooks", "functorch", "ghost", "bk"]
CASES = ["cnn", "seq", "tied"]
BATCH = 12  # build(): a dataset of BATCH records and a loader batch of BATCH // 2
B = BATCH // 2  # expected batch size q N, with q = (BATCH // 2) / BATCH = 1/2
Q = 0.5
DELTA = 1e-5  # make_private's default
EPS, GAMMA = 1e-6, 0.01  # the clip formulas' stabilizers (Opacus / AUTO-S defaults)
RTOL, ATOL = 1e-4, 1e-6  # float32 sums of a dozen per-sample gradients


# -- independent references ----------------------------------------------------------------------
def reference(case, *, padding=True):
    """(microbatch per-sample grads [B, *shape] per parameter, norms [B, P], x, y) of the model
    build() will construct (same seed). ``padding=False`` drops the embedding's padding_idx from
    the copy the grads are taken on (what Opacus' ghost Embedding norm computes)."""
    model, x, y = make_case(case, batch=BATCH)
    if not padding:
        for m in model.modules():
            if isinstance(m, torch.nn.Embedding):
                m.padding_idx = None  # forward unchanged; the padding row now gets a gradient
    grads = microbatch_grads(model, x, y, loss_fn)
    return grads, per_param_norms(grads), x, y


def formula_factors(clipping, norms, clip_norm):
    """[B, P] clip factors written out from the formulas, in float64.

    flat (and adaptive, DiceSGD on their first step): min(1, C / (||g_i|| + 1e-6));
    automatic: C / (||g_i|| + 0.01); per-layer: min(1, C_p / (||g_ip|| + 1e-6)), C_p = C/sqrt(P).
    """
    n = norms.double()
    total = n.pow(2).sum(1, keepdim=True).sqrt().expand_as(n)
    if clipping in ("flat", "adaptive", "dicesgd"):
        return torch.minimum(torch.ones_like(total), clip_norm / (total + EPS))
    if clipping == "automatic":
        return clip_norm / (total + GAMMA)
    if clipping == "per-layer":
        c_p = clip_norm / math.sqrt(n.shape[1])
        return torch.minimum(torch.ones_like(n), c_p / (n + EPS))
    raise ValueError(clipping)


def weighted_sums(factors, grads):
    """sum_i f_ip g_ip for each parameter p, in float64."""
    return [torch.einsum("b,b...->...", factors[:, j], g.double()) for j, g in enumerate(grads)]


def released_sums(pt):
    """The released (noisy) sum: p.grad is the sum divided by B = q N."""
    return [p.grad.detach().double() * B for p in pt.optimizer.params]


def midpoint(values, k):
    """A threshold strictly between the k-th and (k+1)-th smallest values (0-based k)."""
    v = values.flatten().double().sort().values
    assert float(v[k + 1] - v[k]) > 1e-3 * float(v[k + 1]), "no clear gap to put the threshold in"
    return float(v[k] + v[k + 1]) / 2


def supported(backend, case, clipping):
    """Opacus' ghost clipping refuses tied parameters, applies one factor per sample and cannot
    give the unclipped sum (DiceSGD)."""
    return backend != "ghost" or (case != "tied" and clipping not in ("per-layer", "dicesgd"))


def assert_sums_close(actual, expected):
    for j, (s, e) in enumerate(zip(actual, expected, strict=True)):
        assert torch.allclose(s, e, rtol=RTOL, atol=ATOL), (j, float((s - e).abs().max()))


# -- 1. accounting of virtual steps --------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_virtual_steps_are_accounted_once_per_logical_step(backend):
    # Prepare: physical batches of at most 5, logical batches of 12, 7, 3, 0 and 12 samples
    sigma = 1.1
    pt, _, x, y = build("cnn", backend, "flat", sigma=sigma, physical_batch_size=5)
    sizes = [12, 7, 3, 0, 12]  # 3, 2, 1, 0, 3 physical batches
    for k, n in enumerate(sizes, start=1):
        # Execute
        pt.train_step(x[:n], y[:n], loss_fn)
        # Assert: one subsampled-Gaussian release per logical step, whatever its physical split
        assert pt.ledger.history("central") == [Phase(sigma, Q, k)], (k, n)
        assert pt.optimizer.last_stats["physical_batches"] == math.ceil(n / 5)
    events = pt.ledger.events
    assert [(e.noise_multiplier, e.sample_rate, e.steps) for e in events] == [(sigma, Q, 1)] * 5
    expected = compute_epsilon([Phase(sigma, Q, len(sizes))], DELTA)
    assert pt.epsilon() == pytest.approx(expected, rel=1e-9)
    assert events[-1].epsilon_after == pytest.approx(expected, rel=1e-9)


# -- 2. adaptive clipping: the gradient gets the split noise multiplier ---------------------------
@pytest.mark.parametrize("z,sigma_b", [(1.3, 1.0), (1.0, 0.6), (0.5, 0.5)])
def test_adaptive_gradient_noise_is_the_split_multiplier(z, sigma_b):
    # Prepare: an empty Poisson batch, so the release is pure noise at the initial clip C_0
    c0 = 0.7
    pt, _, x, y = build(
        "cnn", "bk", "adaptive", sigma=z, clip_norm=c0, clip_options={"count_noise_std": sigma_b}
    )
    # Execute
    pt.train_step(x[:0], y[:0], loss_fn)
    noise = torch.cat([s.flatten() for s in released_sums(pt)])
    # Assert: std = z_g C_0 with z_g = (z^-2 - (2 sigma_b)^-2)^-1/2 (Andrew et al. 2021, Sec. 3),
    # within 5 standard errors of a sample std (std / sqrt(2 n)); zero mean; Gaussian (KS)
    std = (z**-2 - (2 * sigma_b) ** -2) ** -0.5 * c0
    n = noise.numel()
    assert abs(float(noise.std()) / std - 1) < 5 / math.sqrt(2 * n), (float(noise.std()), std)
    assert abs(float(noise.mean())) < 5 * std / math.sqrt(n)
    assert stats.kstest(noise.numpy() / std, "norm").pvalue > 1e-4
    # and the accountant is charged z itself
    assert pt.ledger.history("central") == [Phase(z, Q, 1)]


# -- 3. adaptive clipping: the clipped count is released with noise sigma_b ----------------------
@pytest.mark.parametrize("regime", ["half-unclipped", "all-clipped"])
def test_adaptive_clip_update_comes_from_a_noisy_count(regime):
    """C_{t+1} = C_t exp(-lr (b~ - gamma)), b~ = clamp((sum_i (b_i - 1/2) + N(0, sigma_b^2)) / B
    + 1/2, 0, 1): on a batch of exactly B samples whose unclipped count is known, b~ recovered
    from C_{t+1} / C_t over many independent steps has the closed-form distribution."""
    # Prepare: B samples; C_0 between the 3rd and 4th smallest norms (3 unclipped: b~ = 1/2 +
    # N(0, s^2)) or below all of them (none unclipped: b~ = max(0, N(0, s^2))), s = sigma_b / B
    sigma_b, lr, target, steps = 0.3, 0.2, 0.5, 200
    _, norms, x, y = reference("cnn")
    x, y = x[:B], y[:B]
    total = norms[:B].pow(2).sum(1).sqrt()
    c0 = midpoint(total, 2) if regime == "half-unclipped" else float(total.min()) * 1e-3
    pt, _, _, _ = build(
        "cnn",
        "bk",
        "adaptive",
        sigma=0.5,  # < 2 sigma_b
        clip_norm=c0,
        clip_options={"count_noise_std": sigma_b, "clip_lr": lr, "target_quantile": target},
    )
    fractions = []
    for _ in range(steps):
        pt.optimizer.policy.load_state_dict({"clip_norm": c0})  # lr = 0: same model, same norms
        # Execute
        pt.train_step(x, y, loss_fn)
        c1 = pt.optimizer.policy.state_dict()["clip_norm"]
        fractions.append(target - math.log(c1 / c0) / lr)
    b = torch.tensor(fractions, dtype=torch.float64)
    s = sigma_b / B  # 0.05: the clamp at 1 (and at 0 in the first regime) is > 10 s away
    # Assert
    if regime == "half-unclipped":
        assert abs(float(b.mean()) - 0.5) < 5 * s / math.sqrt(steps)
        assert abs(float(b.std()) / s - 1) < 5 / math.sqrt(2 * steps), float(b.std())
        assert stats.kstest(((b - 0.5) / s).numpy(), "norm").pvalue > 1e-4
    else:
        # s max(Z, 0): an atom of mass 1/2 at 0, E = s / sqrt(2 pi), E[X^2] = s^2 / 2,
        # Var = s^2 (1/2 - 1/(2 pi)), E[X^4] = 3 s^4 / 2; the positive part is half-normal
        zero = b.abs() < 1e-9
        assert abs(float(zero.double().mean()) - 0.5) < 5 * math.sqrt(0.25 / steps)
        mean_se = s * math.sqrt((0.5 - 1 / (2 * math.pi)) / steps)
        assert abs(float(b.mean()) - s / math.sqrt(2 * math.pi)) < 5 * mean_se
        second_se = s**2 * math.sqrt((1.5 - 0.25) / steps)
        assert abs(float(b.pow(2).mean()) - s**2 / 2) < 5 * second_se
        assert float(b.var()) > 0.5 * s**2 * (0.5 - 1 / (2 * math.pi))
        assert stats.kstest((b[~zero] / s).numpy(), "halfnorm").pvalue > 1e-4


# -- 4. a batch partly clipped: the min(1, .) branch ----------------------------------------------
@pytest.mark.parametrize("clipping", ["flat", "automatic", "per-layer"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_partly_clipped_batch_matches_the_factor_formulas(backend, clipping):
    if not supported(backend, "cnn", clipping):
        pytest.skip("ghost clipping applies one factor per sample")
    # Prepare: C at the median of the per-sample total norms (per-layer: C_p = C / sqrt(P) at the
    # median of all per-sample, per-tensor norms), so half the samples (tensors) are clipped
    grads, norms, x, y = reference("cnn")
    if clipping == "per-layer":
        c_p = midpoint(norms, norms.numel() // 2 - 1)
        clip_norm = c_p * math.sqrt(norms.shape[1])
        clipped = norms > c_p
    else:
        total = norms.pow(2).sum(1).sqrt()
        clip_norm = midpoint(total, BATCH // 2 - 1)
        clipped = total > clip_norm
    assert 0 < int(clipped.sum()) < clipped.numel()
    pt, _, _, _ = build("cnn", backend, clipping, clip_norm=clip_norm)
    # Execute: one step, no noise
    pt.train_step(x, y, loss_fn)
    # Assert: the released sum is sum_i f_i g_i with the factors written out in the test
    f = formula_factors(clipping, norms, clip_norm)
    if clipping != "automatic":
        assert bool((f[~clipped] == 1).all())  # the unclipped ones are left as they are
    assert_sums_close(released_sums(pt), weighted_sums(f, grads))


# -- 5. every case x backend x policy, factors from the formulas ----------------------------------
@pytest.mark.parametrize("clipping", ["flat", "per-layer", "automatic", "adaptive", "dicesgd"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_clipped_sum_with_factors_computed_independently(case, backend, clipping):
    if not supported(backend, case, clipping):
        pytest.skip("not supported by Opacus' ghost clipping")
    clip_norm = 0.5
    grads, norms, x, y = reference(case)
    if backend == "ghost" and case == "seq":
        # Opacus' ghost Embedding norm ignores padding_idx (documented limitation): the factors
        # come from the norm with the padding row's gradient; the sum is autograd's, exact
        _, norms, _, _ = reference(case, padding=False)
    pt, _, _, _ = build(case, backend, clipping, clip_norm=clip_norm)
    # Execute: one step, sigma = 0, lr = 0 (adaptive and DiceSGD act as flat on a first step)
    pt.train_step(x, y, loss_fn)
    # Assert: released sum = sum_i f_i g_i ...
    f = formula_factors(clipping, norms, clip_norm)
    assert_sums_close(released_sums(pt), weighted_sums(f, grads))
    # ... and every sample's clipped contribution has norm <= C (per-layer: sqrt(P C_p^2) = C)
    true_norms = per_param_norms(grads).double()
    contrib = (f * true_norms).pow(2).sum(1).sqrt()
    assert bool((contrib <= clip_norm * (1 + 1e-5)).all()), float(contrib.max())


# -- 6. one record removed: the released sum moves by at most C -----------------------------------
@pytest.mark.parametrize("clipping", ["flat", "automatic", "per-layer"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_removing_one_record_moves_the_sum_by_at_most_c(case, backend, clipping):
    if not supported(backend, case, clipping):
        pytest.skip("not supported by Opacus' ghost clipping")
    clip_norm = 0.5
    _, true_norms, x, y = reference(case)
    norms = true_norms  # the norms the factors are computed from
    if backend == "ghost" and case == "seq":
        _, norms, _, _ = reference(case, padding=False)  # ghost's (over)estimated norms

    def release(keep):
        # a fresh, identical private step: same dataset size and loader batch, so the same B
        pt, _, _, _ = build(case, backend, clipping, clip_norm=clip_norm)
        pt.train_step(x[keep], y[keep], loss_fn)
        return torch.cat([s.flatten() for s in released_sums(pt)])

    full = release(torch.arange(BATCH))
    f = formula_factors(clipping, norms, clip_norm)
    for i in (0, 5, BATCH - 1):
        # Execute
        without = release(torch.tensor([j for j in range(BATCH) if j != i]))
        distance = float((full - without).norm())
        # Assert: within the sensitivity C, and equal to record i's own clipped norm
        assert distance <= clip_norm * (1 + 1e-5), (i, distance)
        own = float((f[i] * true_norms[i].double()).norm())
        assert distance == pytest.approx(own, rel=1e-3, abs=1e-6), (i, distance, own)
