"""Plain helpers for the benchmark suites and bench/gpu_bench.py (fixtures live in conftest.py).

A module of its own because bench/ and tests/ both have a conftest.py: `from conftest import`
would pick whichever pytest imported last. pytest is imported lazily, since gpu_bench.py uses
these helpers on machines that may not have it.
"""
from __future__ import annotations

import platform

import torch

CUDA = torch.cuda.is_available()
IMPLS = ["triton", "torch"]  # every suite times the fast path next to its reference, same inputs


def device() -> torch.device:
    return torch.device("cuda" if CUDA else "cpu")


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu {platform.machine()}"


def skip_unless_runnable(impl: str, module) -> None:
    """Skip the Triton case where it cannot be timed (CPU, or the kernel not written yet)."""
    import pytest
    if impl != "triton":
        return
    if not CUDA:
        pytest.skip("Triton kernels are benchmarked on CUDA only")
    if not getattr(module, "HAS_TRITON_KERNEL", False):
        pytest.skip(f"{module.__name__} has no Triton kernel (HAS_TRITON_KERNEL is False)")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak_bytes(fn, dev: torch.device) -> int | None:
    """Device memory one call of fn needs beyond what was allocated before it; None on CPU.

    Call it before timing: the call doubles as the warm-up, so Triton's JIT compile and
    autotuning stay out of the timed rounds.
    """
    if dev.type != "cuda":
        fn()
        return None
    sync(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev)
    fn()
    sync(dev)
    return torch.cuda.max_memory_allocated(dev) - before


def record(benchmark, dev, impl, dtype, peak, nbytes=None, flops=None, **sizes) -> None:
    """Store the derived figures of one case in benchmark.extra_info.

    Under --benchmark-disable the body runs once untimed and benchmark.stats is None, so the
    rates are None there.
    """
    mean = benchmark.stats.stats.mean if benchmark.stats else None
    benchmark.extra_info.update(
        device=device_name(dev), impl=impl, dtype=str(dtype).removeprefix("torch."), **sizes,
        GBps=nbytes / mean / 1e9 if nbytes and mean else None,
        TFLOPs=flops / mean / 1e12 if flops and mean else None,
        extra_peak_bytes=peak)
