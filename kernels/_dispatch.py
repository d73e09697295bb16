"""The one rule for `impl=` choices, shared by every kernel file, Triton availability, and the
TUNING overrides that sweeps and compile checks apply (`tuned`)."""
from __future__ import annotations

import contextlib
import os

import torch
from torch.library import wrap_triton as _torch_wrap_triton

IMPLS = ("auto", "triton", "torch")

try:  # Triton ships with Linux torch wheels; elsewhere the reference path still works.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401
    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = tl = None
    HAS_TRITON = False

# Under TRITON_INTERPRET=1 (read by triton.jit when a kernel is defined) kernels run on CPU tensors
# through Triton's NumPy simulation: correct for float32/float16, used by the CPU test suite.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str, device_type: str, has_triton_kernel: bool, applies: bool = True) -> str:
    """Return "triton" or "torch" for an `impl` request on a device.

    auto = Triton on CUDA tensors when the kernel exists and `applies` (the kernel takes these
    inputs), the reference otherwise. An explicit "triton" on CPU tensors is honoured only under
    the interpreter (tests), never silently; for inputs it does not take, the caller raises.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: choose one of {', '.join(IMPLS)}")
    if impl == "auto":
        return "triton" if (device_type == "cuda" and has_triton_kernel and HAS_TRITON and applies) else "torch"
    if impl == "triton":
        if not (has_triton_kernel and HAS_TRITON):
            raise NotImplementedError(
                "impl='triton' was asked for, but Triton is not importable here; "
                "use impl='torch' (the reference) or impl='auto'")
        if device_type != "cuda" and not INTERPRET:
            raise ValueError(
                f"impl='triton' needs CUDA tensors, got {device_type} tensors; use impl='auto' or 'torch', "
                "or set TRITON_INTERPRET=1 before importing fastsynth to simulate the kernels on the CPU")
    return impl


def direct_launch_ok(*tensors: torch.Tensor) -> bool:
    """True where a public function may launch its kernels itself, from a plain autograd.Function
    or none, instead of through its registered op: no torch.compile or export tracing (which
    must see the op), no Python dispatch mode (fake tensors, functionalization, a recorder of
    ops), and plain tensors (no subclass that the op's dispatch would unwrap).

    The registered op's eager call runs Python layers (schema defaults, the custom-op autograd
    wrapper, dynamo's disable wrapper) that cost about as much host time as the kernels' own
    launches; in the compiled training step the losses and kernels between the compiled
    networks run eagerly, so that host time is where the GPU waits.
    """
    if torch.compiler.is_compiling() or _current_dispatch_mode() is not None:
        return False
    return all(type(t) is torch.Tensor or type(t) is torch.nn.Parameter for t in tensors)


def _current_dispatch_mode():
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    return _get_current_dispatch_mode()


def wrap_triton(kernel):
    """torch.library.wrap_triton, which makes a launch a node torch.compile can trace (in eager it
    is the kernel itself). The interpreter's kernels are not `triton.jit` functions: torch 2.14
    passes them through unchanged, torch 2.11 raises, so they skip it here on every version."""
    if INTERPRET and HAS_TRITON:
        from triton.runtime.jit import JITFunction
        if not isinstance(kernel, JITFunction):
            return kernel
    return _torch_wrap_triton(kernel)


def skip_launch(*tensors: torch.Tensor) -> bool:
    """True while torch.compile propagates fake tensors through an interpreted kernel.

    On a GPU, `wrap_triton` turns a launch into a graph node and fake tensors never reach
    Triton. The interpreter's kernels are plain Python that `wrap_triton` passes through, and
    they would read the fake tensors' (absent) data; the launcher's outputs only need their
    shapes then, and the real launch happens when the compiled graph runs.
    """
    if not INTERPRET:
        return False
    from torch._subclasses.fake_tensor import is_fake
    return any(is_fake(t) for t in tensors)


def cdiv(x: int, y: int) -> int:
    """ceil(x / y), triton.cdiv's arithmetic without its ConstexprFunction wrapper, which costs
    about 6 us a call on the host (Triton 3.6 and 3.8); a launcher makes up to ten of these
    calls, all on the eager path's critical host time. Works on SymInts as well."""
    return (x + y - 1) // y


def next_pow2(n: int) -> int:
    """The smallest power of 2 >= n (n >= 1): triton.next_power_of_2's bit arithmetic, without
    the wrapper (see cdiv)."""
    n -= 1
    n |= n >> 1
    n |= n >> 2
    n |= n >> 4
    n |= n >> 8
    n |= n >> 16
    n |= n >> 32
    return n + 1


_SMS: dict = {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill; a small fixed number under the interpreter."""
    if device.type != "cuda":
        return 4
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SMS:
        _SMS[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SMS[key]


@contextlib.contextmanager
def tuned(module, **overrides):
    """module.TUNING with `overrides` inside the block and as it was after it, also when the
    block fails (sweeps and ahead-of-time compile cases try launch choices one after another)."""
    tuning = getattr(module, "TUNING", None)
    if tuning is None:
        if overrides:
            raise ValueError(f"{module.__name__} has no TUNING to override")
        yield
        return
    unknown = set(overrides) - set(tuning)
    if unknown:  # a misspelt launch choice would otherwise be a silent no-op in a sweep
        raise ValueError(f"{module.__name__}.TUNING has no {', '.join(sorted(unknown))}")
    saved = dict(tuning)
    try:
        tuning.update(overrides)
        yield
    finally:
        tuning.clear()
        tuning.update(saved)
