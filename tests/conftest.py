"""Test-session setup: on a machine without CUDA, Triton kernels run under the interpreter.

TRITON_INTERPRET is read when a kernel is defined (at import of fastsynth.kernels), so it is
set here, before any test module imports the package. With a GPU the real kernels run.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kernelcase import KERNEL_DEVICE  # noqa: E402


@pytest.fixture
def kdev():
    return KERNEL_DEVICE


@pytest.fixture
def poison(monkeypatch):
    """Make every floating torch.empty/empty_like return NaNs while a kernel runs.

    Launchers allocate outputs and partial states with torch.empty; an element a kernel forgets
    to write then shows up as NaN in the result instead of as plausible leftover memory; an
    integer counter a kernel forgets to zero starts at 1234567.
    """
    empty, empty_like = torch.empty, torch.empty_like

    def _fill(t):
        if t.is_floating_point():
            return t.fill_(float("nan"))
        return t.fill_(1234567) if t.dtype in (torch.int32, torch.int64) else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _fill(empty_like(*a, **k)))
    yield
