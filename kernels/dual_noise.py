"""Dual Gaussian noise injection on feature vectors (METHOD.md Eq. 4-6, Sec. 3.5).

z_tilde = z + sigma_g (1 - s_hat) n1 + [v_bar < lam] sigma_v (1 - v_hat) n2,   n1, n2 ~ N(0, 1)
s_hat = per-row min-max of the Grad-CAM scores s (Eq. 4); v_hat = min-max of v_bar over d (Eq. 6).
Dimensions that matter (high score) or vary a lot across the bank (high variance) get little
noise; the rest is perturbed, so a decoder turns z_tilde into an image that keeps the
discriminative content and changes the rest.
"""
from __future__ import annotations

import torch

from ._dispatch import resolve_impl

HAS_TRITON_KERNEL = False  # the fused Philox kernel arrives with the Triton issue


def minmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """(x - min) / (max - min) along dim; a constant slice maps to 0, never NaN.

    A constant score row carries no information about which dims matter, so every dim is
    treated as non-discriminative (s_hat = 0, the full noise), the conservative reading.
    """
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                       torch.zeros_like(x))


def dual_noise_reference(z: torch.Tensor, s: torch.Tensor, v_bar: torch.Tensor, sigma_g: float,
                         sigma_v: float, lam: float, seed: int) -> torch.Tensor:
    """Plain PyTorch Eq. 4-6. z, s: B x d; v_bar: d. Returns z_tilde (B x d, z's dtype).

    Noise comes from a torch.Generator seeded with `seed` on z's device: the same seed gives the
    same output. Memory traffic: reads z, s (2 B d) and v_bar (d), writes z_tilde (B d), plus the
    two normal draws and temporaries the fused kernel keeps in registers.
    """
    if z.dim() != 2 or s.shape != z.shape:
        raise ValueError(f"dual_noise: z and s must both be B x d, got {tuple(z.shape)} and {tuple(s.shape)}")
    if v_bar.shape != (z.shape[1],):
        raise ValueError(f"dual_noise: v_bar must have shape ({z.shape[1]},), got {tuple(v_bar.shape)}")
    gen = torch.Generator(device=z.device)
    gen.manual_seed(int(seed))
    zf = z.float()
    s_hat = minmax(s.float(), dim=1)                                   # Eq. 4, B x d
    v_hat = minmax(v_bar.float(), dim=0)                               # Eq. 6, d
    low_var = (v_bar.float() < lam).float()                            # d
    n1 = torch.randn(zf.shape, generator=gen, device=z.device, dtype=torch.float32)
    n2 = torch.randn(zf.shape, generator=gen, device=z.device, dtype=torch.float32)
    eps_g = sigma_g * (1.0 - s_hat) * n1                               # Eq. 5
    eps_v = low_var * sigma_v * (1.0 - v_hat) * n2                     # Eq. 6
    return (zf + eps_g + eps_v).to(z.dtype)


def dual_noise(z: torch.Tensor, s: torch.Tensor, v_bar: torch.Tensor, sigma_g: float, sigma_v: float,
               lam: float, seed: int, impl: str = "auto") -> torch.Tensor:
    """z_tilde of Sec. 3.5 (Eq. 4-6); no gradient flows (the synthesized images are detached)."""
    if resolve_impl(impl, z.device.type, HAS_TRITON_KERNEL) == "torch":
        with torch.no_grad():
            return dual_noise_reference(z, s, v_bar, sigma_g, sigma_v, lam, seed)
    raise AssertionError("unreachable: resolve_impl refuses triton without a kernel")
