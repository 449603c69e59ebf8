"""The private step against the microbatch reference, for every clip policy x backend."""

import math

import pytest
import torch
from scipy import stats

from dpfl.errors import ConfigError, IncompatibleModelError
from tests.privacy.models import build, loss_fn
from tests.reference import microbatch_grads, per_param_norms

BACKENDS = ["hooks", "functorch", "ghost", "bk"]
POLICIES = ["flat", "per-layer", "automatic", "adaptive", "dicesgd"]
RTOL, ATOL = 1e-4, 1e-6  # float32 sums of a dozen per-sample gradients


def spy_factors(pt):
    seen = {}
    original = pt.optimizer.policy.factors

    def spy(norms):
        f = original(norms)
        seen["norms"], seen["factors"] = norms.detach().clone(), f.detach().clone()
        return f

    pt.optimizer.policy.factors = spy
    return seen


def released_sum(pt):
    return [p.grad.detach() * pt.expected_batch_size for p in pt.optimizer.params]


@pytest.mark.parametrize("case", ["cnn", "seq", "tied"])
@pytest.mark.parametrize("clipping", POLICIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_clipped_sum_equals_microbatch_reference(case, backend, clipping):
    if backend == "ghost" and clipping in ("per-layer", "dicesgd"):
        pytest.skip(
            "ghost clipping supports scalar factors without the unclipped sum (tested below)"
        )
    if backend == "ghost" and case == "tied":
        pytest.skip("Opacus' ghost clipping does not support tied parameters")
    # Prepare
    pt, reference, x, y = build(case, backend, clipping)
    seen = spy_factors(pt)
    sensitivity = pt.optimizer.policy.sensitivity()
    # Execute: one step with zero noise
    pt.train_step(x, y, loss_fn)
    # Assert: the backend's norms are the true per-sample norms ...
    grads = microbatch_grads(reference, x, y, loss_fn)
    ref_norms = per_param_norms(grads)
    if backend == "ghost" and case == "seq":
        # Opacus' ghost Embedding norm ignores padding_idx: overestimated (safe), never less
        assert bool((seen["norms"] >= ref_norms * (1 - RTOL) - ATOL).all())
        assert torch.allclose(seen["norms"][:, 1:], ref_norms[:, 1:], rtol=RTOL, atol=ATOL)
    else:
        assert torch.allclose(seen["norms"], ref_norms, rtol=RTOL, atol=ATOL)
    # ... every clipped contribution is within the sensitivity ...
    f = seen["factors"]
    contrib = torch.sqrt(sum((f[:, j] ** 2) * ref_norms[:, j] ** 2 for j in range(len(grads))))
    assert bool((contrib <= sensitivity * (1 + 1e-5)).all()), (contrib.max(), sensitivity)
    # ... and the released sum is sum_i f_i g_i
    for j, (s, g) in enumerate(zip(released_sum(pt), grads, strict=True)):
        expected = torch.einsum("b,b...->...", f[:, j], g)
        assert torch.allclose(s, expected, rtol=RTOL, atol=ATOL), (j, (s - expected).abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_factors_follow_the_policy_formulas(backend):
    # flat: f_i = min(1, C / (||g_i|| + 1e-6)) on the total norm
    pt, reference, x, y = build("cnn", backend, "flat", clip_norm=0.3)
    seen = spy_factors(pt)
    pt.train_step(x, y, loss_fn)
    total = per_param_norms(microbatch_grads(reference, x, y, loss_fn)).pow(2).sum(1).sqrt()
    expected = (0.3 / (total + 1e-6)).clamp(max=1.0)
    assert torch.allclose(seen["factors"][:, 0], expected, rtol=RTOL)


def test_automatic_clipping_normalizes_every_sample():
    pt, reference, x, y = build("seq", "bk", "automatic", clip_norm=1.0)
    seen = spy_factors(pt)
    pt.train_step(x, y, loss_fn)
    total = per_param_norms(microbatch_grads(reference, x, y, loss_fn)).pow(2).sum(1).sqrt()
    assert torch.allclose(seen["factors"][:, 0], 1.0 / (total + 0.01), rtol=RTOL)


def test_per_layer_clips_each_tensor_to_its_threshold():
    pt, reference, x, y = build("cnn", "bk", "per-layer", clip_norm=0.2)
    seen = spy_factors(pt)
    pt.train_step(x, y, loss_fn)
    ref = per_param_norms(microbatch_grads(reference, x, y, loss_fn))
    per_tensor = seen["factors"] * ref
    threshold = 0.2 / math.sqrt(ref.shape[1])
    assert bool((per_tensor <= threshold * (1 + 1e-5)).all())
    assert pt.optimizer.policy.sensitivity() == pytest.approx(0.2)


@pytest.mark.parametrize(
    "case,clipping,error",
    [
        ("cnn", "per-layer", ConfigError),
        ("cnn", "dicesgd", IncompatibleModelError),
        ("tied", "flat", IncompatibleModelError),
    ],
)
def test_ghost_refuses_what_it_cannot_do(case, clipping, error):
    with pytest.raises(error):
        pt, _, x, y = build(case, "ghost", clipping)
        pt.train_step(x, y, loss_fn)


# -- noise ---------------------------------------------------------------------------------------
def _noise_std_case(backend, clipping, sigma, clip_norm, **kw):
    pt, reference, x, y = build("cnn", backend, clipping, sigma=sigma, clip_norm=clip_norm, **kw)
    seen = spy_factors(pt)
    pt.train_step(x, y, loss_fn)
    grads = microbatch_grads(reference, x, y, loss_fn)
    f = seen["factors"]
    noise = torch.cat(
        [
            (s - torch.einsum("b,b...->...", f[:, j], g)).flatten()
            for j, (s, g) in enumerate(zip(released_sum(pt), grads, strict=True))
        ]
    ).double()
    return pt, noise


@pytest.mark.parametrize(
    "backend,clipping,expected",
    [
        ("bk", "flat", lambda pt: 1.3 * 0.7),
        ("hooks", "flat", lambda pt: 1.3 * 0.7),
        ("ghost", "automatic", lambda pt: 1.3 * 0.7),
        ("functorch", "per-layer", lambda pt: 1.3 * 0.7),  # sqrt(sum C_p^2) = C
        (
            "bk",
            "adaptive",
            lambda pt: pt.optimizer.policy.gradient_multiplier(1.3, 6.0) * 0.7,
        ),
        ("bk", "dicesgd", lambda pt: 1.3 * 0.7 * math.sqrt(1 + 2 * 2.0 / 0.7)),
    ],
)
def test_noise_std_is_sigma_times_sensitivity(backend, clipping, expected):
    # Prepare / Execute: ~38k noise coordinates from one seeded step
    kw = {"dicesgd_options": {"c2": 2.0}} if clipping == "dicesgd" else {}
    if clipping == "adaptive":
        kw["clip_options"] = {"count_noise_std": 1.0}  # z = 1.3 < 2 sigma_b = 2
    pt, noise = _noise_std_case(backend, clipping, 1.3, 0.7, **kw)
    std = expected(pt)
    n = noise.numel()
    # Assert: sample std within 5 standard errors (se of a sample std ~ std / sqrt(2n)), mean
    # within 5 standard errors, and the distribution is Gaussian (KS test)
    assert abs(float(noise.std()) / std - 1) < 5 / math.sqrt(2 * n)
    assert abs(float(noise.mean())) < 5 * std / math.sqrt(n)
    assert stats.kstest(noise.numpy() / std, "norm").pvalue > 1e-4
    # and on the averaged gradient, std = sigma C / B
    assert pt.expected_batch_size == 6.0


def test_noise_is_reproducible_from_the_seed_and_differs_across_seeds():
    def grads(seed):
        pt, _, x, y = build("cnn", "bk", "flat", sigma=1.0, seed=0)
        pt.optimizer.generator.manual_seed(seed)
        pt.train_step(x, y, loss_fn)
        return torch.cat([p.grad.flatten() for p in pt.optimizer.params])

    assert torch.equal(grads(1), grads(1))
    assert not torch.equal(grads(1), grads(2))


def test_secure_mode_noise_has_the_right_std_and_ignores_the_seed():
    def noise(seed):
        pt, _, x, y = build(
            "cnn", "bk", "flat", sigma=1.0, clip_norm=1.0, seed=seed, secure_mode=True
        )
        pt.train_step(x[:0], y[:0], loss_fn)  # empty batch: the release is pure noise
        return torch.cat([p.grad.flatten() for p in pt.optimizer.params]).double() * 6.0

    a, b = noise(0), noise(0)
    assert not torch.equal(a, b)  # OS randomness, not the seeded generator
    n = a.numel()
    assert abs(float(a.std()) - 1.0) < 5 / math.sqrt(2 * n)
    assert stats.kstest(a.numpy(), "norm").pvalue > 1e-4
