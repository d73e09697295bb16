"""InfoNCE with queue (Eq. 1) at the paper's sizes: N = 128, C = 128, K = 65536."""
import importlib

import pytest
import torch
import torch.nn.functional as F

mod = importlib.import_module("fastsynth.kernels.info_nce")  # the package re-exports a function of the same name

from conftest import impls, sync


@pytest.mark.parametrize("impl", impls(mod))
@pytest.mark.parametrize("n,k,c", [(128, 65536, 128)])
def test_bench_info_nce_fwd_bwd(benchmark, dev, impl, n, k, c):
    q = F.normalize(torch.randn(n, c, device=dev), dim=1).requires_grad_(True)
    key = F.normalize(torch.randn(n, c, device=dev), dim=1)
    queue = F.normalize(torch.randn(k, c, device=dev), dim=1)

    def step():
        q.grad = None
        mod.info_nce(q, key, queue, 0.2, impl=impl).backward()
        sync(dev)

    benchmark(step)
    # Bytes the op must at least move: the queue once, q, k, and dL/dq.
    min_bytes = 4 * (k * c + 3 * n * c)
    benchmark.extra_info.update(device=str(dev), impl=impl, n=n, k=k, c=c,
                                min_GBps=min_bytes / benchmark.stats.stats.mean / 1e9 if benchmark.stats else None)
