"""Shared helpers for the benchmark suites: which impls exist here, and device sync."""
import pytest
import torch


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def impls(module) -> list[str]:
    """The reference always; the Triton kernel where it exists and a GPU is present."""
    out = ["torch"]
    if getattr(module, "HAS_TRITON_KERNEL", False) and torch.cuda.is_available():
        out.append("triton")
    return out


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@pytest.fixture
def dev():
    return device()


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record the versions that decide the numbers next to pytest-benchmark's CPU info."""
    machine_info["torch"] = torch.__version__
    machine_info["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        import triton
        machine_info["triton"] = triton.__version__
    except ImportError:
        machine_info["triton"] = None
