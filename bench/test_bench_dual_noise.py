"""Dual noise (Eq. 4-6) at the paper's B = 128, d = 2048, plus B = 8192 to fill a GPU.

float32 and bfloat16 z (s and v_bar stay float32). The large batch runs on CUDA only: the
reference's two normal draws over 16M elements take seconds on a 2-core CPU.
"""
import importlib

import pytest
import torch

from benchutil import CUDA, IMPLS, peak_bytes, record, skip_unless_runnable, sync

mod = importlib.import_module("fastsynth.kernels.dual_noise")  # the package re-exports a function of the same name

SIZES = [(128, 2048), (8192, 2048)] if CUDA else [(128, 2048)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("b,d", SIZES)
def test_bench_dual_noise(benchmark, dev, impl, dtype, b, d):
    skip_unless_runnable(impl, mod)
    z = torch.randn(b, d, device=dev).to(dtype)
    s = torch.rand(b, d, device=dev)
    v_bar = torch.rand(d, device=dev) * 0.05  # about 40 % of dimensions below lam = 0.02

    def step():
        mod.dual_noise(z, s, v_bar, 1.0, 1.0, 0.02, seed=0, impl=impl)
        sync(dev)

    peak = peak_bytes(step, dev)
    benchmark(step)
    # At least: read z and s, write z_tilde (z's dtype), read v_bar; the noise never touches memory.
    nbytes = b * d * (2 * dtype.itemsize + s.element_size()) + d * v_bar.element_size()
    record(benchmark, dev, impl, dtype, peak, nbytes=nbytes, b=b, d=d)
