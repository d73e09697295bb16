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
