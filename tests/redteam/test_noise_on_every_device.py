"""The private step's noise on the model's device (training.device): drawn from the step's seeded
CPU generator and moved, so its std is sigma * C on every device and a seeded run draws the same
noise on CPU and CUDA. On a CPU-only machine only the CPU cases run; on a GPU machine the CUDA
cases check the device path (dpfl/privacy/noise.py, PrivateTraining.train_step)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torch.utils.data import DataLoader, TensorDataset

from dpfl.privacy import make_private
from dpfl.privacy.noise import gaussian_like
from tests.privacy.models import loss_fn, make_case

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_seeded_noise_is_the_same_on_every_device_with_the_right_std(device, dtype):
    ref = torch.zeros(200_000, dtype=dtype, device=device)
    noise = gaussian_like(ref, 1.7, torch.Generator().manual_seed(3))
    cpu = gaussian_like(torch.zeros(200_000, dtype=dtype), 1.7, torch.Generator().manual_seed(3))
    assert noise.device == ref.device and noise.dtype == dtype
    assert torch.equal(noise.cpu(), cpu)  # drawn on the CPU generator, then moved
    z = noise.double().cpu() / 1.7
    n = z.numel()
    assert abs(float(z.std()) - 1) < 5 / math.sqrt(2 * n)
    assert abs(float(z.mean())) < 5 / math.sqrt(n)


@pytest.mark.parametrize("device", DEVICES)
def test_unseeded_noise_on_the_device_has_the_right_std(device):
    # seed=None: no generator, the noise is drawn on the parameter's device directly
    z = gaussian_like(torch.zeros(200_000, device=device), 0.9, None).double().cpu() / 0.9
    n = z.numel()
    assert abs(float(z.std()) - 1) < 5 / math.sqrt(2 * n)
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-4


def _private(device, seed):
    """A private CNN on ``device`` (moved there before make_private, as the runs do); its data
    stays on the CPU, as the loaders yield it: train_step moves each batch."""
    model, x, y = make_case("cnn", batch=12, seed=0)
    model.to(device)
    loader = DataLoader(TensorDataset(x, y), batch_size=6)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    pt = make_private(
        model, opt, loader, noise_multiplier=1.3, clip_norm=0.7, grad_sample_mode="bk", seed=seed
    )
    return pt, x, y


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, None])
def test_private_step_on_the_device_releases_sigma_c_noise(device, seed):
    # an empty batch: the release is pure noise, std sigma * C on the sum, / B on the gradient
    pt, x, y = _private(device, seed)
    pt.train_step(x[:0], y[:0], loss_fn)
    noise = torch.cat([p.grad.flatten() for p in pt.optimizer.params]).double().cpu()
    assert all(p.grad.device.type == device for p in pt.optimizer.params)
    noise *= pt.expected_batch_size
    n = noise.numel()
    assert abs(float(noise.std()) / (1.3 * 0.7) - 1) < 5 / math.sqrt(2 * n)
    assert stats.kstest(noise.numpy() / (1.3 * 0.7), "norm").pvalue > 1e-4
    if device != "cpu" and seed is not None:  # the same seeded release as on the CPU
        cpu, x, y = _private("cpu", 0)
        cpu.train_step(x[:0], y[:0], loss_fn)
        expected = torch.cat([p.grad.flatten() for p in cpu.optimizer.params]).double()
        assert torch.allclose(noise / pt.expected_batch_size, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_private_step_on_cpu_batches_trains_on_the_device(device):
    # a real batch from the CPU loader: the clipped sum and the noise meet on the device
    pt, x, y = _private(device, 0)
    pt.train_step(x, y, loss_fn)
    assert all(p.grad.device.type == device for p in pt.optimizer.params)
    assert all(torch.isfinite(p.grad).all() for p in pt.optimizer.params)
    assert pt.ledger.epsilon(pt.participant) > 0
