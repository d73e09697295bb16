"""The one rule for `impl=` choices, shared by every kernel file."""
from __future__ import annotations

IMPLS = ("auto", "triton", "torch")


def resolve_impl(impl: str, device_type: str, has_triton_kernel: bool) -> str:
    """Return "triton" or "torch" for an `impl` request on a device.

    auto = Triton on CUDA tensors when the kernel exists, the reference elsewhere.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: choose one of {', '.join(IMPLS)}")
    if impl == "auto":
        return "triton" if (device_type == "cuda" and has_triton_kernel) else "torch"
    if impl == "triton" and not has_triton_kernel:
        raise NotImplementedError(
            "impl='triton' was asked for, but this operation has no Triton kernel yet; "
            "use impl='torch' (the reference) or impl='auto'")
    return impl
