"""FIFO feature memory bank with per-dimension variance (METHOD.md Sec. 3.4).

The bank keeps the last `size` feature vectors z; each batch overwrites the oldest rows.
`variance()` is Var over the stored rows, per dimension (unbiased, as torch.var), feeding
v_bar = v / ||v||_2 and the low-variance mask v_bar < lambda of Eq. 6.
"""
from __future__ import annotations

import torch
from torch import nn

from ._dispatch import resolve_impl

HAS_TRITON_KERNEL = False  # streaming statistics arrive with the Triton issue


class FeatureBank(nn.Module):
    """Ring buffer of `size` x `dim` features; state lives in buffers so checkpoints carry it.

    The reference recomputes the variance from the stored rows (an M x d pass); the streaming
    version keeps running statistics instead and must match this one.
    """

    def __init__(self, size: int, dim: int, impl: str = "auto"):
        super().__init__()
        if size < 2 or dim < 1:
            raise ValueError(f"FeatureBank needs size >= 2 and dim >= 1, got size={size}, dim={dim}")
        self.size, self.dim, self.impl = int(size), int(dim), impl
        resolve_impl(impl, "cpu", HAS_TRITON_KERNEL)  # reject a bad choice at construction
        self.register_buffer("bank", torch.zeros(self.size, self.dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))     # next row to write
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))  # rows holding data

    @torch.no_grad()
    def update(self, z: torch.Tensor) -> None:
        """Write the batch z (B x dim) over the oldest rows, wrapping around the end."""
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"FeatureBank.update: expected B x {self.dim}, got {tuple(z.shape)}")
        z = z.detach().to(self.bank.dtype)
        if z.shape[0] > self.size:  # only the newest `size` rows survive anyway
            z = z[-self.size:]
        b = z.shape[0]
        # Pointer arithmetic stays on the device: reading the pointer on the host would cost a
        # device synchronisation every training step.
        rows = (torch.arange(b, device=self.bank.device) + self.ptr) % self.size
        self.bank.index_copy_(0, rows, z.to(self.bank.device))
        self.ptr.copy_((self.ptr + b) % self.size)
        self.filled.copy_(torch.clamp(self.filled + b, max=self.size))

    @torch.no_grad()
    def variance(self) -> torch.Tensor:
        """Per-dimension variance over the filled rows (dim,); zeros until two rows exist.

        Rows fill from 0 upwards, so the filled ones are [0, filled); a mask keeps the
        computation free of host reads while the bank is still filling.
        """
        n = self.filled.to(self.bank.dtype)
        mask = (torch.arange(self.size, device=self.bank.device) < self.filled).to(self.bank.dtype)[:, None]
        mean = (self.bank * mask).sum(dim=0) / n.clamp_min(1)
        var = (((self.bank - mean) * mask) ** 2).sum(dim=0) / (n - 1).clamp_min(1)
        return torch.where(self.filled >= 2, var, torch.zeros_like(var))

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, impl={self.impl!r}"
