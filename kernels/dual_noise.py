"""Dual Gaussian noise injection on feature vectors (METHOD.md Eq. 4-6, Sec. 3.5).

z_tilde = z + sigma_g (1 - s_hat) n1 + [v_bar < lam] sigma_v (1 - v_hat) n2,   n1, n2 ~ N(0, 1)
s_hat = per-row min-max of the Grad-CAM scores s (Eq. 4); v_hat = min-max of v_bar over d (Eq. 6).
Dimensions that matter (high score) or vary a lot across the bank (high variance) get little
noise; the rest is perturbed, so a decoder turns z_tilde into an image that keeps the
discriminative content and changes the rest.
"""
from __future__ import annotations

import torch
from torch.library import wrap_triton

from ._dispatch import HAS_TRITON, INTERPRET, resolve_impl, skip_launch, tl, triton

HAS_TRITON_KERNEL = HAS_TRITON
MAX_SINGLE_BLOCK = 4096  # rows up to this width are normalised and perturbed from registers
# Launch choices, swept on an H200 (bench/results/2026-11-26-h200-run4.json, B = 8192, d = 2048,
# bf16): one row per program, 4 warps, approximate log/sin/cos for Box-Muller (the kernel is
# bound by instructions, not memory: 143 us with the exact functions, 73 us with these).
# num_warps None = 4 up to 2048 elements per program, else 8.
TUNING = {"rows": 1, "fast": True, "num_warps": None}


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
    _check(z, s, v_bar)
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



# ---------------------------------------------------------------------------------------------
# Triton kernel: one program per row, one read of z and s, one write, noise from in-kernel Philox
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:
    from triton.language.extra import libdevice

    @triton.jit
    def _uniform(r):
        """uint32 -> the open interval (0, 1) from the top 24 bits, so log(u) stays finite."""
        return ((r >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)

    @triton.jit
    def _normals(seed, pair, FAST: tl.constexpr):
        """N(0, 1) draws (n1, n2) for the two elements 2j, 2j+1 of each pair counter j.

        One Philox4x32-10 call yields four uint32 words; Box-Muller turns each two into two
        independent normals; the elements of pair j get (a1, a2) and (b1, b2). The angle is
        centred on 0, where the GPU's approximate sin/cos (FAST) are most accurate (abs. error
        about 1e-6); the interpreter has no approximate intrinsics and uses the exact ones.
        """
        r1, r2, r3, r4 = tl.randint4x(seed, pair)
        th_a = 6.283185307179586 * (_uniform(r2) - 0.5)
        th_b = 6.283185307179586 * (_uniform(r4) - 0.5)
        if FAST:
            rad_a = tl.sqrt(-2.0 * libdevice.fast_logf(_uniform(r1)))
            rad_b = tl.sqrt(-2.0 * libdevice.fast_logf(_uniform(r3)))
            n1 = tl.interleave(rad_a * libdevice.fast_cosf(th_a), rad_b * libdevice.fast_cosf(th_b))
            n2 = tl.interleave(rad_a * libdevice.fast_sinf(th_a), rad_b * libdevice.fast_sinf(th_b))
        else:
            rad_a = tl.sqrt(-2.0 * tl.log(_uniform(r1)))
            rad_b = tl.sqrt(-2.0 * tl.log(_uniform(r3)))
            n1 = tl.interleave(rad_a * tl.cos(th_a), rad_b * tl.cos(th_b))
            n2 = tl.interleave(rad_a * tl.sin(th_a), rad_b * tl.sin(th_b))
        return n1, n2

    @triton.jit
    def _dual_noise_kernel(z_ptr, s_ptr, v_ptr, out_ptr, B, D,
                           stride_zb, stride_zd, stride_sb, stride_sd, stride_v, stride_ob,
                           sigma_g, sigma_v, lam, seed,
                           ROWS: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE: tl.constexpr, FAST: tl.constexpr):
        """ROWS rows per program; v_bar's min-max and v_hat are computed once per program."""
        # Python floats arrive as fp64 from inductor-generated launches: compute in fp32 as the
        # reference does (v_bar.float() < lam compares in float32).
        sigma_g = tl.cast(sigma_g, tl.float32)
        sigma_v = tl.cast(sigma_v, tl.float32)
        lam = tl.cast(lam, tl.float32)
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        rmask = rows < B
        rows64 = rows.to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        cols64 = cols.to(tl.int64)  # strided (e.g. transposed) inputs: offsets past 2^31
        half = tl.arange(0, BLOCK_D // 2)

        # Pass 1: per-row min/max of s (Eq. 4) and min/max of v_bar over d (Eq. 6). Rows up to
        # BLOCK_D wide are loaded once and kept in registers for pass 2 (SINGLE).
        if SINGLE:
            cm = cols < D
            m2 = rmask[:, None] & cm[None, :]
            s = tl.load(s_ptr + rows64[:, None] * stride_sb + cols64[None, :] * stride_sd, mask=m2, other=0.0)
            s = s.to(tl.float32)
            v = tl.load(v_ptr + cols64 * stride_v, mask=cm, other=0.0).to(tl.float32)
            s_lo_v = tl.where(m2, s, float("inf"))
            s_hi_v = tl.where(m2, s, float("-inf"))
            v_lo_v = tl.where(cm, v, float("inf"))
            v_hi_v = tl.where(cm, v, float("-inf"))
        else:
            s_lo_v = tl.full([ROWS, BLOCK_D], float("inf"), tl.float32)
            s_hi_v = tl.full([ROWS, BLOCK_D], float("-inf"), tl.float32)
            v_lo_v = tl.full([BLOCK_D], float("inf"), tl.float32)
            v_hi_v = tl.full([BLOCK_D], float("-inf"), tl.float32)
            for d0 in range(0, D, BLOCK_D):
                c = d0 + cols
                c64 = c.to(tl.int64)
                cm = c < D
                m2 = rmask[:, None] & cm[None, :]
                sw = tl.load(s_ptr + rows64[:, None] * stride_sb + c64[None, :] * stride_sd, mask=m2, other=0.0)
                sw = sw.to(tl.float32)
                vw = tl.load(v_ptr + c64 * stride_v, mask=cm, other=0.0).to(tl.float32)
                s_lo_v = tl.minimum(s_lo_v, tl.where(m2, sw, float("inf")))
                s_hi_v = tl.maximum(s_hi_v, tl.where(m2, sw, float("-inf")))
                v_lo_v = tl.minimum(v_lo_v, tl.where(cm, vw, float("inf")))
                v_hi_v = tl.maximum(v_hi_v, tl.where(cm, vw, float("-inf")))
        s_lo = tl.where(rmask, tl.min(s_lo_v, axis=1), 0.0)[:, None]  # rows past B: no inf - inf
        s_hi = tl.where(rmask, tl.max(s_hi_v, axis=1), 0.0)[:, None]
        s_span = s_hi - s_lo
        s_inv = tl.where(s_span > 0, 1.0 / tl.where(s_span > 0, s_span, 1.0), 0.0)
        s_top = tl.where(s_span > 0, 1.0, 0.0)
        v_lo = tl.min(v_lo_v, axis=0)
        v_hi = tl.max(v_hi_v, axis=0)
        v_span = v_hi - v_lo
        v_inv = tl.where(v_span > 0, 1.0 / tl.where(v_span > 0, v_span, 1.0), 0.0)
        v_top = tl.where(v_span > 0, 1.0, 0.0)
        pairs_per_row = (D + 1) // 2

        # Pass 2. (Triton scopes names bound inside a loop body to it: the wide-row loads get
        # their own names, sc/vc, bound in both branches of the compile-time `if`.)
        for d0 in range(0, D, BLOCK_D):
            c = d0 + cols
            c64 = c.to(tl.int64)
            cm = c < D
            m2 = rmask[:, None] & cm[None, :]
            if SINGLE:
                sc = s
                vc = v
            else:  # wide rows: re-read s and v_bar (cache hits)
                sc = tl.load(s_ptr + rows64[:, None] * stride_sb + c64[None, :] * stride_sd, mask=m2, other=0.0)
                sc = sc.to(tl.float32)
                vc = tl.load(v_ptr + c64 * stride_v, mask=cm, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + rows64[:, None] * stride_zb + c64[None, :] * stride_zd, mask=m2, other=0.0)
            # (x - lo) / span, with the maximum mapped to exactly 1 so that its dim gets exactly
            # no noise, and a constant row to 0 (full noise), as minmax() does.
            s_hat = tl.where(sc == s_hi, s_top, (sc - s_lo) * s_inv)
            v_hat = tl.where(vc == v_hi, v_top, (vc - v_lo) * v_inv)
            # Counter = (row, column pair): the same seed gives the same noise for any block shape.
            pair = rows[:, None] * pairs_per_row + (d0 // 2 + half)[None, :]
            n1, n2 = _normals(seed, pair, FAST)
            eps_g = sigma_g * (1.0 - s_hat) * n1                                                # Eq. 5
            eps_v = tl.where((vc < lam)[None, :], (sigma_v * (1.0 - v_hat))[None, :] * n2, 0.0)  # Eq. 6
            out = z.to(tl.float32) + eps_g + eps_v
            tl.store(out_ptr + rows64[:, None] * stride_ob + c[None, :], out.to(out_ptr.dtype.element_ty), mask=m2)

    def _launch(z: torch.Tensor, s: torch.Tensor, v_bar: torch.Tensor, sigma_g: float, sigma_v: float,
                lam: float, seed: int) -> torch.Tensor:
        b, d = z.shape
        out = torch.empty((b, d), device=z.device, dtype=z.dtype)
        if b == 0 or skip_launch(z, s, v_bar):
            return out
        block = max(2, min(triton.next_power_of_2(d), MAX_SINGLE_BLOCK))  # even: whole pairs
        rows = TUNING["rows"]
        fast = TUNING["fast"] and not INTERPRET
        wrap_triton(_dual_noise_kernel)[(triton.cdiv(b, rows),)](
            z, s, v_bar, out, b, d,
            z.stride(0), z.stride(1), s.stride(0), s.stride(1), v_bar.stride(0), out.stride(0),
            sigma_g, sigma_v, lam, seed,
            ROWS=rows, BLOCK_D=block, SINGLE=d <= block, FAST=fast,
            num_warps=TUNING["num_warps"] or (4 if block * rows <= 2048 else 8))
        return out

    @torch.library.triton_op("fastsynth::dual_noise_fused", mutates_args=())
    def _dual_noise_fused(z: torch.Tensor, s: torch.Tensor, v_bar: torch.Tensor, sigma_g: float,
                          sigma_v: float, lam: float, seed: int) -> torch.Tensor:
        return _launch(z, s, v_bar, sigma_g, sigma_v, lam, seed)


def dual_noise(z: torch.Tensor, s: torch.Tensor, v_bar: torch.Tensor, sigma_g: float, sigma_v: float,
               lam: float, seed: int, impl: str = "auto") -> torch.Tensor:
    """z_tilde of Sec. 3.5 (Eq. 4-6); no gradient flows (the synthesized images are detached).

    impl="triton": one launch, noise from Philox keyed by (seed, row, column pair); a different
    random stream from the reference's torch.Generator, with the same distribution. Scores or
    variances that are NaN give undefined rows (the GPU's min/max skip NaN, the reference's
    propagate it); the training loop must not feed non-finite features.
    """
    _check(z, s, v_bar)
    path = resolve_impl(impl, z.device.type, HAS_TRITON_KERNEL)
    with torch.no_grad():
        if path == "torch":
            return dual_noise_reference(z, s, v_bar, sigma_g, sigma_v, lam, seed)
        if not (z.device == s.device == v_bar.device):
            raise ValueError(f"dual_noise: z, s, v_bar on different devices ({z.device}, {s.device}, {v_bar.device})")
        if z.shape[0] * (z.shape[1] + 1) // 2 >= 2 ** 31:
            raise ValueError(f"dual_noise(impl='triton'): B * d = {z.numel()} overflows the 32-bit noise counter")
        seed = int(seed) % (2 ** 63)  # Philox keys are 64-bit; negative seeds wrap like torch's
        args = (z.detach(), s.detach(), v_bar.detach(), float(sigma_g), float(sigma_v), float(lam), seed)
        return torch.ops.fastsynth.dual_noise_fused(*args)  # eager and compiled alike (see info_nce)


def _check(z, s, v_bar):
    if z.dim() != 2 or s.shape != z.shape:
        raise ValueError(f"dual_noise: z and s must both be B x d, got {tuple(z.shape)} and {tuple(s.shape)}")
    if v_bar.shape != (z.shape[1],):
        raise ValueError(f"dual_noise: v_bar must have shape ({z.shape[1]},), got {tuple(v_bar.shape)}")
