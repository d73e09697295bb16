"""Compile the kernels' real launches for a Hopper GPU (sm_90) on a machine without one.

Each launcher runs on meta tensors with its `wrap_triton(kernel)[grid](...)` calls recorded
instead of run; a recorded launch is specialised the way Triton's JIT specialises it on a device
(integers equal to 1 become constants, 16-byte-aligned pointers and multiples of 16 get hints)
and compiled through to a cubin with Triton's bundled ptxas. The CPU test
`tests/test_kernels_compile.py` and the static census `bench/sass_census.py` use it, so both
see exactly the launches the launchers make. A development tool: nothing at run time imports it.
"""
from __future__ import annotations

import contextlib

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource

SM90 = GPUTarget("cuda", 90, 32)
H100_SMS = 132
_OPTIONS = ("num_warps", "num_stages", "num_ctas")


def meta(*shape, dtype=torch.float32) -> torch.Tensor:
    """A tensor with a shape and dtype and no storage: what a recorded launch needs."""
    return torch.empty(*shape, dtype=dtype, device="meta")


def launches(module, call) -> list:
    """The (kernel, grid, args, kwargs) launches `call()` makes through `module`, recorded."""
    with recorded_launches(module) as out:
        call()
    return out


@contextlib.contextmanager
def recorded_launches(module, sms: int = H100_SMS):
    """Within the block, `module`'s launches are recorded as (kernel, grid, args, kwargs), not run,
    and its `num_sms` (where it has one) answers `sms`."""
    calls = []

    class _Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.kernel, tuple(grid), args, kwargs))

    saved = {n: getattr(module, n) for n in ("wrap_triton", "num_sms") if hasattr(module, n)}
    module.wrap_triton = _Recorder
    if "num_sms" in saved:
        module.num_sms = lambda device: sms
    try:
        yield calls
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def specialise(kernel, args, kwargs, float_type: str = "fp32"):
    """(signature, constexprs, attrs, options) as the JIT builds them for these arguments.

    float_type="fp64" types Python float arguments as inductor's generated launches pass them.
    """
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in _OPTIONS}
    bound = dict(zip(kernel.arg_names, args))
    bound.update(kwargs)
    sig, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        value = bound[name]
        if param.is_constexpr:
            sig[name], constexprs[name] = "constexpr", value
            continue
        ty, spec = native_specialize_impl(CUDABackend, value, False, not param.do_not_specialize,
                                          not param.do_not_specialize_on_alignment)
        if ty == "fp32" and isinstance(value, float):
            ty = float_type
        sig[name] = ty
        if ty == "constexpr":  # an integer equal to 1
            constexprs[name] = spec
        elif spec:
            attrs[(i,)] = CUDABackend.parse_attr(spec)
    return sig, constexprs, attrs, options


def compile_sm90(kernel, args, kwargs, float_type: str = "fp32"):
    """The CompiledKernel (ptx, cubin in .asm) of one recorded launch."""
    sig, constexprs, attrs, options = specialise(kernel, args, kwargs, float_type)
    return triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs),
                          target=SM90, options=options)
