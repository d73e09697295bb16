"""Dual noise (Eq. 4-6) at the paper's sizes: B = 128, d = 2048, plus one larger batch."""
import importlib

import pytest
import torch

mod = importlib.import_module("fastsynth.kernels.dual_noise")  # the package re-exports a function of the same name

from conftest import impls, sync


@pytest.mark.parametrize("impl", impls(mod))
@pytest.mark.parametrize("b,d", [(128, 2048), (1024, 2048)])
def test_bench_dual_noise(benchmark, dev, impl, b, d):
    z, s = torch.randn(b, d, device=dev), torch.rand(b, d, device=dev)
    v_bar = torch.rand(d, device=dev) * 0.05

    def step():
        mod.dual_noise(z, s, v_bar, 1.0, 1.0, 0.02, seed=0, impl=impl)
        sync(dev)

    benchmark(step)
    min_bytes = 4 * (3 * b * d + d)  # read z and s, write z_tilde, read v_bar
    benchmark.extra_info.update(device=str(dev), impl=impl, b=b, d=d,
                                min_GBps=min_bytes / benchmark.stats.stats.mean / 1e9 if benchmark.stats else None)
