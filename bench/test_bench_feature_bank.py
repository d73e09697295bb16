"""Feature bank update + variance (Sec. 3.4): batch 128 into a bank of 4096 x 2048."""
import importlib

import pytest
import torch

mod = importlib.import_module("fastsynth.kernels.feature_bank")  # the package re-exports a function of the same name
from fastsynth.kernels import FeatureBank

from conftest import impls, sync


@pytest.mark.parametrize("impl", impls(mod))
@pytest.mark.parametrize("size,d,b", [(4096, 2048, 128)])
def test_bench_feature_bank(benchmark, dev, impl, size, d, b):
    bank = FeatureBank(size, d, impl=impl).to(dev)
    bank.update(torch.randn(size, d, device=dev))  # full: the steady state of training
    z = torch.randn(b, d, device=dev)

    def step():
        bank.update(z)
        bank.variance()
        sync(dev)

    benchmark(step)
    benchmark.extra_info.update(device=str(dev), impl=impl, size=size, d=d, b=b)
