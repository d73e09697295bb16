"""Feature bank update + variance (Sec. 3.4): a batch of 128 into a full bank of 65536 x 2048.

The bank is filled before timing, as in steady-state training. On a CPU one small bank, so the
reference's M x d recompute stays fast.
"""
import importlib

import pytest
import torch

from benchutil import CUDA, IMPLS, peak_bytes, record, skip_unless_runnable, sync

mod = importlib.import_module("fastsynth.kernels.feature_bank")  # the package re-exports names from it

SIZES = [(65536, 2048, 128)] if CUDA else [(4096, 256, 128)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size,d,b", SIZES)
def test_bench_feature_bank(benchmark, dev, impl, size, d, b):
    skip_unless_runnable(impl, mod)
    bank = mod.FeatureBank(size, d, impl=impl).to(dev)
    bank.update(torch.randn(size, d, device=dev))
    z = torch.randn(b, d, device=dev)

    def step():
        bank.update(z)
        bank.variance()
        sync(dev)

    peak = peak_bytes(step, dev)
    benchmark(step)
    # At least, for an exact FIFO variance: read z, read the rows it evicts, write them, write
    # the d variances. The reference moves O(M d) instead; its GB/s is by this same count.
    nbytes = 3 * b * d * 4 + d * 4
    record(benchmark, dev, impl, torch.float32, peak, nbytes=nbytes, size=size, d=d, b=b)
