"""InfoNCE with queue (Eq. 1), forward + backward: the issue's N = 256 and the paper's N = 128.

K = 65536, C = 128 in bfloat16 (the training dtype) on a GPU. On a CPU one small float32 case,
so the reference stays well under a second when CI runs each body once (--benchmark-disable).
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from benchutil import CUDA, IMPLS, peak_bytes, record, skip_unless_runnable, sync

mod = importlib.import_module("fastsynth.kernels.info_nce")  # the package re-exports a function of the same name

SIZES = [(256, 65536, 128), (128, 65536, 128)] if CUDA else [(64, 4096, 128)]
DTYPE = torch.bfloat16 if CUDA else torch.float32


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,k,c", SIZES)
def test_bench_info_nce_fwd_bwd(benchmark, dev, impl, n, k, c):
    skip_unless_runnable(impl, mod)
    q = F.normalize(torch.randn(n, c, device=dev), dim=1).to(DTYPE).requires_grad_(True)
    key = F.normalize(torch.randn(n, c, device=dev), dim=1).to(DTYPE)
    queue = F.normalize(torch.randn(k, c, device=dev), dim=1).to(DTYPE)

    def step():
        q.grad = None
        mod.info_nce(q, key, queue, 0.2, impl=impl).backward()
        sync(dev)

    peak = peak_bytes(step, dev)
    benchmark(step)
    # At least: the queue once, q, k and dL/dq; logits q.queue^T and dL/dq = dL/dlogits . queue.
    elt = DTYPE.itemsize
    record(benchmark, dev, impl, DTYPE, peak, nbytes=k * c * elt + 3 * n * c * elt,
           flops=2 * 2 * n * k * c, n=n, k=k, c=c)
