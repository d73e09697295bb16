"""Dual Gaussian noise injection on feature vectors (METHOD.md Eq. 4-6, Sec. 3.5).

z_tilde = z + sigma_g (1 - s_hat) n1 + [v_bar < lam] sigma_v (1 - v_hat) n2,   n1, n2 ~ N(0, 1)
s_hat = per-row min-max of the Grad-CAM scores s (Eq. 4); v_hat = min-max of v_bar over d (Eq. 6).
Dimensions that matter (high score) or vary a lot across the bank (high variance) get little
noise; the rest is perturbed, so a decoder turns z_tilde into an image that keeps the
discriminative content and changes the rest.
"""
from __future__ import annotations

import math

import torch

from ._dispatch import (HAS_TRITON, INTERPRET, direct_launch_ok, next_pow2, num_sms, resolve_impl, skip_launch, tl,
                        triton, wrap_triton)

HAS_TRITON_KERNEL = HAS_TRITON
COUNTER_LIMIT = 2 ** 31  # Philox counters (row * pairs + pair) are 32-bit in the kernel
MAX_SINGLE_BLOCK = 4096  # rows up to this width are normalised and perturbed from registers
# Launch choices. The kernel is bound by instructions, not memory (H200, B = 8192, d = 2048, bf16,
# bench/results/2026-11-26-h200-run4.json: 143 us with exact log/sin/cos, 73 us with the GPU's
# approximate ones, FAST). programs_per_sm: programs per SM, each walking over rows, so v_bar's
# min-max and eps_v's per-column scale are computed once per program, not once per row; 4 fit on
# an SM together at d = 2048 (96 registers x 128 threads; bench/sass_census.py), so all run in
# one wave. num_warps None = 4 up to 2048 elements per row block, else 8. bench/gpu_bench.py
# sweeps these.
# philox_rounds: 10, the Random123 default and cuRAND's; 7 also passes BigCrush (Salmon et al.,
# SC'11) with less margin, and Philox is about half of the kernel's instructions (sass_census).
# generator: "philox4x32" (the default) draws each Box-Muller uniform from 23 random bits, one
# Philox4x32 call per column pair; "philox2x32" takes 16 bits per uniform from half as much
# Philox work (Philox2x32: one multiply per round instead of two), so the normals' tails stop
# at sqrt(32 ln 2) = 4.71 sigma (probability 2.5e-6 beyond) instead of 5.6, on a 2^16 x 2^16
# grid of (radius, angle). It is swept on a GPU and becomes the default only if it pays there.
# draws: 2 draws n1 and n2 per element as Eq. 5-6 are written; 1 draws one normal n per element
# and writes z + sqrt(a^2 + b^2) n with a, b the two terms' scales: the sum of two independent
# zero-mean normals is a normal whose variance is the sum of theirs, so z_tilde has exactly the
# same distribution, from half the Box-Muller work. A column outside the low-variance mask (b = 0)
# gets a n, bit for bit the eps_g-only output. Philox then runs once per column pair: Philox2x32
# (23-bit uniforms from its two words) or Philox4x32 (its first two words). Swept on a GPU and the
# default only if it pays there; the reference always draws two.
TUNING = {"programs_per_sm": 4, "fast": True, "num_warps": None, "philox_rounds": 10, "generator": "philox4x32",
          "draws": 2}
GENERATORS = ("philox4x32", "philox2x32")
DRAWS = (1, 2)


def minmax(x: torch.Tensor, dim: int = -1, scale: float = 1.0) -> torch.Tensor:
    """(x - min) / (max - min) along dim; a constant slice maps to 0, never NaN.

    A constant score row carries no information about which dims matter, so every dim is
    treated as non-discriminative (s_hat = 0, the full noise), the conservative reading.
    A span below the smallest normal float, or one so small that scale / span exceeds half the
    largest float32, counts as constant too: the kernel multiplies by sigma / span (scale =
    sigma, >= 0) and then by its Box-Muller constant (about 1.18), which the half leaves room for.
    Both make the same float32 test on the same quotient, so they agree on which rows are constant.
    """
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    span = hi - lo
    safe = torch.where(span >= torch.finfo(torch.float32).tiny, span, torch.ones_like(span))
    ok = (span >= torch.finfo(torch.float32).tiny) & (scale / safe.float() <= torch.finfo(torch.float32).max / 2)
    return torch.where(ok, (x - lo) / safe, torch.zeros_like(x))


def dual_noise_reference(z: torch.Tensor, s: torch.Tensor, v_bar: torch.Tensor, sigma_g: float,
                         sigma_v: float, lam: float, seed: int) -> torch.Tensor:
    """Plain PyTorch Eq. 4-6. z, s: B x d; v_bar: d. Returns z_tilde (B x d, z's dtype).

    Noise comes from a torch.Generator seeded with `seed` on z's device: the same seed gives the
    same output. Memory traffic: reads z, s (2 B d) and v_bar (d), writes z_tilde (B d), plus the
    two normal draws and temporaries the fused kernel keeps in registers.
    """
    _check(z, s, v_bar)
    gen = torch.Generator(device=z.device)
    gen.manual_seed(_check_seed(seed))
    zf = z.float()
    s_hat = minmax(s.float(), dim=1, scale=sigma_g)                    # Eq. 4, B x d
    v_hat = minmax(v_bar.float(), dim=0, scale=sigma_v)                # Eq. 6, d
    low_var = (v_bar.float() < lam).float()                            # d
    n1 = torch.randn(zf.shape, generator=gen, device=z.device, dtype=torch.float32)
    n2 = torch.randn(zf.shape, generator=gen, device=z.device, dtype=torch.float32)
    eps_g = sigma_g * (1.0 - s_hat) * n1                               # Eq. 5
    eps_v = low_var * sigma_v * (1.0 - v_hat) * n2                     # Eq. 6
    return (zf + eps_g + eps_v).to(z.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernel: one read of z and s, one write; noise from in-kernel Philox; v_bar's part once
# per program, which then walks over rows
# ---------------------------------------------------------------------------------------------
# n = sqrt(-2 ln u) cos(theta) = sqrt(2 ln 2) * sqrt(-log2 u) cos(theta): the constant is folded
# into the per-row and per-column noise scales, so the kernel's Box-Muller takes log2 directly.
if HAS_TRITON:
    from triton.language.extra import libdevice

    _SQRT_2_LN2 = tl.constexpr(1.1774100225154747)

    @triton.jit
    def _unit_interval(r):
        """uint32 -> float in [1, 2) from its low 23 bits placed in the mantissa: a bit mask and
        an OR instead of an int-to-float conversion (a quarter-rate instruction on the GPU)."""
        return ((r & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)

    @triton.jit
    def _unit_intervals16(r):
        """uint32 -> two floats in [1, 2): its high and its low 16 bits, each placed at the top
        of a mantissa (a shift and one AND-OR each)."""
        hi = ((r >> 9) & 0x7FFF80) | 0x3F800000
        lo = ((r << 7) & 0x7FFF80) | 0x3F800000
        return hi.to(tl.float32, bitcast=True), lo.to(tl.float32, bitcast=True)

    @triton.jit
    def _philox2x32(seed, counter, ROUNDS: tl.constexpr):
        """Philox2x32 (Salmon et al., SC'11; Random123's constants): two uint32 per counter.
        Counter = (counter, the seed's high word), key = the seed's low word, so 64-bit seeds
        keep distinct streams."""
        seed = tl.cast(seed, tl.uint64)  # tl.cast takes the constexpr the JIT makes of a seed of 1
        k = (seed & 0xFFFFFFFF).to(tl.uint32)
        c1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32) + counter.to(tl.uint32) * 0
        c0 = counter.to(tl.uint32, bitcast=True)
        for _ in tl.static_range(ROUNDS):
            hi = tl.umulhi(c0, 0xD256D193)
            lo = tl.mul(c0, 0xD256D193, sanitize_overflow=False)
            c0 = hi ^ c1 ^ k
            c1 = lo
            k = tl.add(k, 0x9E3779B9, sanitize_overflow=False)
        return c0, c1

    @triton.jit
    def _box_muller(x, w, FAST: tl.constexpr):
        """Two N(0, 1) draws, each divided by sqrt(2 ln 2), from x, w uniform in [1, 2).

        Radius sqrt(-log2 u) with u = 2 - x in (0, 1] (finite log; the largest radius is
        sqrt(23), a 5.6 sigma tail, or sqrt(16) with 16-bit uniforms), angle 2 pi (w - 1.5)
        centred on 0, where the GPU's approximate sin/cos (FAST) are most accurate (abs. error
        about 1e-6); the interpreter has no approximate intrinsics and uses the exact functions.
        """
        u = 2.0 - x
        th = w * 6.283185307179586 - 9.42477796076938
        if FAST:
            # The approximate log2's absolute error (about 2^-22 near 1) exceeds -log2(1 - 2^-23):
            # without the clamp, u just below 1 could give sqrt of a negative number, NaN.
            rad = tl.sqrt(tl.maximum(-libdevice.fast_log2f(u), 0.0))
            return rad * libdevice.fast_cosf(th), rad * libdevice.fast_sinf(th)
        else:
            rad = tl.sqrt(-tl.log2(u))
            return rad * tl.cos(th), rad * tl.sin(th)

    @triton.jit
    def _normals(seed, counter, FAST: tl.constexpr, ROUNDS: tl.constexpr, GEN2: tl.constexpr):
        """Four N(0, 1) draws, each divided by sqrt(2 ln 2), from one Philox call per counter:
        two Box-Mullers on 23-bit uniforms (Philox4x32's four words), or on 16-bit ones (GEN2:
        Philox2x32's two words, halved)."""
        if GEN2:
            r1, r2 = _philox2x32(seed, counter, ROUNDS)
            x_a, w_a = _unit_intervals16(r1)
            x_b, w_b = _unit_intervals16(r2)
        else:
            r1, r2, r3, r4 = tl.randint4x(seed, counter, ROUNDS)
            x_a, w_a = _unit_interval(r1), _unit_interval(r2)
            x_b, w_b = _unit_interval(r3), _unit_interval(r4)
        n1a, n2a = _box_muller(x_a, w_a, FAST)
        n1b, n2b = _box_muller(x_b, w_b, FAST)
        return n1a, n2a, n1b, n2b

    @triton.jit
    def _normal_pair(seed, counter, FAST: tl.constexpr, ROUNDS: tl.constexpr, GEN2: tl.constexpr):
        """Two N(0, 1) draws, each divided by sqrt(2 ln 2), from one Box-Muller on two 23-bit
        uniforms: Philox2x32's two words (GEN2) or Philox4x32's first two."""
        if GEN2:
            r1, r2 = _philox2x32(seed, counter, ROUNDS)
        else:
            r1, r2, _r3, _r4 = tl.randint4x(seed, counter, ROUNDS)
        return _box_muller(_unit_interval(r1), _unit_interval(r2), FAST)

    @triton.jit
    def _joint_scale(g, v):
        """The std of eps_g + eps_v for independent terms of stds g and v: sqrt(g^2 + v^2), and
        exactly g where v = 0 (outside the low-variance mask), whatever the sqrt's rounding."""
        return tl.where(v == 0.0, g, tl.sqrt(g * g + v * v))

    @triton.jit
    def _load(ptr, mask, EVEN: tl.constexpr):
        if EVEN:
            return tl.load(ptr).to(tl.float32)
        else:
            return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _lo_hi(x, mask, lo, hi, EVEN: tl.constexpr):
        """Running elementwise min and max of x, ignoring masked-off lanes."""
        if EVEN:
            return tl.minimum(lo, x), tl.maximum(hi, x)
        else:
            return tl.minimum(lo, tl.where(mask, x, float("inf"))), tl.maximum(hi, tl.where(mask, x, float("-inf")))

    @triton.jit
    def _pairs_min_max(ptr, stride, P, D, HALF: tl.constexpr, EVEN: tl.constexpr):
        """Min and max of a d-vector read as the column pairs (j, P + j), HALF pairs at a time."""
        j = tl.arange(0, HALF)
        lo = tl.full([HALF], float("inf"), tl.float32)
        hi = tl.full([HALF], float("-inf"), tl.float32)
        for j0 in range(0, P, HALF):
            a = (j0 + j).to(tl.int64)
            ma = a < P
            mb = a + P < D
            lo, hi = _lo_hi(_load(ptr + a * stride, ma, EVEN), ma, lo, hi, EVEN)
            lo, hi = _lo_hi(_load(ptr + (a + P) * stride, mb, EVEN), mb, lo, hi, EVEN)
        return tl.min(lo, axis=0), tl.max(hi, axis=0)

    @triton.jit
    def _v_scale(v, lam, vhi, v_gain, v_floor):
        """eps_v's scale of a column (Eq. 6): sigma_v (1 - v_hat) where v_bar < lam, else 0."""
        return tl.where(v < lam, (vhi - v) * v_gain + v_floor, 0.0)

    @triton.jit
    def _gain(lo, hi, sigma):
        """(gain, floor) with c sigma (1 - minmax(x)) = (hi - x) * gain + floor, c = sqrt(2 ln 2)
        (see _normals): exactly 0 at the maximum (the reference's (hi - lo) / (hi - lo) is
        exactly 1), and a constant slice's minmax = 0 (the full sigma, as minmax() does) without
        a division by zero. A span below the smallest normal float, or one for which sigma / span
        exceeds half the largest float, is constant too: the same test minmax(scale=sigma) makes
        on the same quotient, taken before c scales it (which the half leaves room for), so
        never an infinite gain times a zero difference. sigma >= 0 (dual_noise checks)."""
        span = hi - lo
        normal = span >= 1.1754943508222875e-38
        gain = sigma / tl.where(normal, span, 1.0)
        ok = normal & (gain <= 1.7014117331926443e38)
        return tl.where(ok, gain, 0.0) * _SQRT_2_LN2, tl.where(ok, 0.0, sigma) * _SQRT_2_LN2

    @triton.jit
    def _perturb(z_ptr, out_ptr, row, a, P, ma, mb, stride_zb, stride_zd, stride_ob,
                 ga, gb, va, vb, seed, EVEN: tl.constexpr, FAST: tl.constexpr, ROUNDS: tl.constexpr,
                 GEN2: tl.constexpr, ONE: tl.constexpr):
        """Write z_tilde for the column pairs (a, P + a) of one row: element a takes the cos and
        sin of the pair's first Box-Muller draw as (n1, n2), element P + a the second's. ONE:
        one normal per element (TUNING["draws"] = 1), the cos for a and the sin for P + a."""
        r64 = tl.cast(row, tl.int64)
        a64 = a.to(tl.int64)  # strided (e.g. transposed) inputs: offsets past 2^31
        b64 = a64 + P
        za = _load(z_ptr + r64 * stride_zb + a64 * stride_zd, ma, EVEN)
        zb = _load(z_ptr + r64 * stride_zb + b64 * stride_zd, mb, EVEN)
        # Counter = (row, column pair): the same seed gives the same noise for any block shape.
        if ONE:
            na, nb = _normal_pair(seed, row * P + a, FAST, ROUNDS, GEN2)
            out_a = za + _joint_scale(ga, va) * na                         # z + (eps_g + eps_v)
            out_b = zb + _joint_scale(gb, vb) * nb
        else:
            n1a, n2a, n1b, n2b = _normals(seed, row * P + a, FAST, ROUNDS, GEN2)
            out_a = za + ga * n1a + va * n2a                              # z + eps_g + eps_v
            out_b = zb + gb * n1b + vb * n2b
        dt = out_ptr.dtype.element_ty
        if EVEN:
            tl.store(out_ptr + r64 * stride_ob + a64, out_a.to(dt))
            tl.store(out_ptr + r64 * stride_ob + b64, out_b.to(dt))
        else:
            tl.store(out_ptr + r64 * stride_ob + a64, out_a.to(dt), mask=ma)
            tl.store(out_ptr + r64 * stride_ob + b64, out_b.to(dt), mask=mb)

    @triton.jit
    def _dual_noise_kernel(z_ptr, s_ptr, v_ptr, out_ptr, B, D, P,
                           stride_zb, stride_zd, stride_sb, stride_sd, stride_v, stride_ob,
                           sigma_g, sigma_v, lam, seed, seed_ptr,
                           HALF: tl.constexpr, SINGLE: tl.constexpr, EVEN: tl.constexpr, FAST: tl.constexpr,
                           ROUNDS: tl.constexpr, GEN2: tl.constexpr, SEED_PTR: tl.constexpr, ONE: tl.constexpr):
        """Rows pid, pid + programs, ...; column j is paired with P + j (P = ceil(d / 2)), HALF
        pairs at a time. SINGLE: one block covers the row, so s and the per-column eps_v scale
        stay in registers. EVEN: d = 2 P and HALF divides P, no masks. SEED_PTR: the seed is read
        from device memory (an int64 the host sets before each replay of a CUDA graph), not
        passed by value (which a graph would keep from its capture)."""
        if SEED_PTR:
            seed = tl.load(seed_ptr)
        # Python floats arrive as fp64 from inductor-generated launches: compute in fp32 as the
        # reference does (v_bar.float() < lam compares in float32).
        sigma_g = tl.cast(sigma_g, tl.float32)  # _gain folds in _normals' constant
        sigma_v = tl.cast(sigma_v, tl.float32)
        lam = tl.cast(lam, tl.float32)
        j = tl.arange(0, HALF)

        # eps_v's per-column scale (Eq. 6) needs v_bar's min and max over d: once per program.
        vlo, vhi = _pairs_min_max(v_ptr, stride_v, P, D, HALF, EVEN)
        v_gain, v_floor = _gain(vlo, vhi, sigma_v)
        if SINGLE:  # the per-column scales, kept for every row
            ma = j < P
            mb = j + P < D
            va = _v_scale(_load(v_ptr + j.to(tl.int64) * stride_v, ma, EVEN), lam, vhi, v_gain, v_floor)
            vb = _v_scale(_load(v_ptr + (j.to(tl.int64) + P) * stride_v, mb, EVEN), lam, vhi, v_gain, v_floor)

        for row in range(tl.program_id(0), B, tl.num_programs(0)):
            s_row = s_ptr + tl.cast(row, tl.int64) * stride_sb
            if SINGLE:  # ma, mb: the masks set up with va, vb above
                sa = _load(s_row + j.to(tl.int64) * stride_sd, ma, EVEN)
                sb = _load(s_row + (j.to(tl.int64) + P) * stride_sd, mb, EVEN)
                s_lo, s_hi = _lo_hi(sa, ma, tl.full([HALF], float("inf"), tl.float32),
                                    tl.full([HALF], float("-inf"), tl.float32), EVEN)
                s_lo, s_hi = _lo_hi(sb, mb, s_lo, s_hi, EVEN)
                slo, shi = tl.min(s_lo, axis=0), tl.max(s_hi, axis=0)
                g_gain, g_floor = _gain(slo, shi, sigma_g)                       # Eq. 4-5
                _perturb(z_ptr, out_ptr, row, j, P, ma, mb, stride_zb, stride_zd, stride_ob,
                         (shi - sa) * g_gain + g_floor, (shi - sb) * g_gain + g_floor, va, vb,
                         seed, EVEN, FAST, ROUNDS, GEN2, ONE)
            else:  # wide rows: a pass for s's min and max, then re-read s and v_bar (cache hits)
                slo, shi = _pairs_min_max(s_row, stride_sd, P, D, HALF, EVEN)
                g_gain, g_floor = _gain(slo, shi, sigma_g)
                for j0 in range(0, P, HALF):
                    a = j0 + j
                    ma = a < P
                    mb = a + P < D
                    wa = _load(s_row + a.to(tl.int64) * stride_sd, ma, EVEN)
                    wb = _load(s_row + (a.to(tl.int64) + P) * stride_sd, mb, EVEN)
                    ua = _load(v_ptr + a.to(tl.int64) * stride_v, ma, EVEN)
                    ub = _load(v_ptr + (a.to(tl.int64) + P) * stride_v, mb, EVEN)
                    _perturb(z_ptr, out_ptr, row, a, P, ma, mb, stride_zb, stride_zd, stride_ob,
                             (shi - wa) * g_gain + g_floor, (shi - wb) * g_gain + g_floor,
                             _v_scale(ua, lam, vhi, v_gain, v_floor), _v_scale(ub, lam, vhi, v_gain, v_floor),
                             seed, EVEN, FAST, ROUNDS, GEN2, ONE)

    def _launch(z: torch.Tensor, s: torch.Tensor, v_bar: torch.Tensor, sigma_g: float, sigma_v: float,
                lam: float, seed: int, seed_t: torch.Tensor | None = None, direct: bool = False) -> torch.Tensor:
        """seed_t: a 0-dim int64 tensor on z's device read by the kernel instead of `seed`.
        direct: launch the kernel itself (the eager path), not through wrap_triton."""
        b, d = z.shape
        gen2 = _generator() == "philox2x32"  # checked before any early return
        one = _draws() == 1
        out = torch.empty((b, d), device=z.device, dtype=z.dtype)
        if b == 0 or (not direct and skip_launch(z, s, v_bar)):  # direct: real tensors only
            return out
        pairs = (d + 1) // 2
        half = max(1, min(next_pow2(pairs), MAX_SINGLE_BLOCK // 2))
        programs = min(b, num_sms(z.device) * TUNING["programs_per_sm"])
        (_dual_noise_kernel if direct else wrap_triton(_dual_noise_kernel))[(programs,)](
            z, s, v_bar, out, b, d, pairs,
            z.stride(0), z.stride(1), s.stride(0), s.stride(1), v_bar.stride(0), out.stride(0),
            sigma_g, sigma_v, lam, seed if seed_t is None else 0, z if seed_t is None else seed_t,
            HALF=half, SINGLE=pairs <= half, EVEN=(d == 2 * pairs and pairs % half == 0),
            FAST=TUNING["fast"] and not INTERPRET, ROUNDS=TUNING["philox_rounds"],
            GEN2=gen2, SEED_PTR=seed_t is not None, ONE=one,
            num_warps=TUNING["num_warps"] or (4 if half <= 1024 else 8))
        return out

    def _generator() -> str:
        if TUNING["generator"] not in GENERATORS:
            raise ValueError(f"dual_noise: TUNING['generator'] = {TUNING['generator']!r}: choose one of "
                             f"{', '.join(GENERATORS)}")
        return TUNING["generator"]

    def _draws() -> int:
        if TUNING["draws"] not in DRAWS:
            raise ValueError(f"dual_noise: TUNING['draws'] = {TUNING['draws']!r}: choose 1 or 2 normals per element")
        return TUNING["draws"]

    @torch.library.triton_op("fastsynth::dual_noise_fused", mutates_args=())
    def _dual_noise_fused(z: torch.Tensor, s: torch.Tensor, v_bar: torch.Tensor, sigma_g: float,
                          sigma_v: float, lam: float, seed: int) -> torch.Tensor:
        return _launch(z, s, v_bar, sigma_g, sigma_v, lam, seed)

    @torch.library.triton_op("fastsynth::dual_noise_fused_device_seed", mutates_args=())
    def _dual_noise_fused_device_seed(z: torch.Tensor, s: torch.Tensor, v_bar: torch.Tensor, sigma_g: float,
                                      sigma_v: float, lam: float, seed: torch.Tensor) -> torch.Tensor:
        """The same with the seed a 0-dim int64 device tensor (a CUDA graph's per-step seed)."""
        return _launch(z, s, v_bar, sigma_g, sigma_v, lam, 0, seed)


def dual_noise(z: torch.Tensor, s: torch.Tensor, v_bar: torch.Tensor, sigma_g: float, sigma_v: float,
               lam: float, seed: int | torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """z_tilde of Sec. 3.5 (Eq. 4-6); no gradient flows (the synthesized images are detached).

    impl="triton": one launch, noise from Philox keyed by (seed, row, column pair); a different
    random stream from the reference's torch.Generator, with the same distribution (also with
    TUNING["draws"] = 1, one normal per element scaled by the two terms' joint std). Scores or
    variances that are NaN give undefined rows (the GPU's min/max skip NaN, the reference's
    propagate it); the training loop must not feed non-finite features.
    seed: an int, or a 0-dim int64 tensor on z's device, which the kernel reads when it runs (a
    step captured in a CUDA graph gets a new seed per replay; the reference reads it on the host).
    Its value is not range-checked on the device (that would be a host sync).
    """
    _check(z, s, v_bar)
    for name, value in (("sigma_g", sigma_g), ("sigma_v", sigma_v)):
        if not 0 <= value < math.inf:  # a standard deviation (NaN fails too)
            raise ValueError(f"dual_noise: {name} must be >= 0 and finite, got {value}")
    if math.isnan(lam):
        raise ValueError("dual_noise: lam is NaN")
    device_seed = isinstance(seed, torch.Tensor)
    if device_seed:
        if seed.shape != () or seed.dtype != torch.int64 or seed.device != z.device:
            raise ValueError(f"dual_noise: a tensor seed must be a 0-dim int64 tensor on z's device ({z.device}), "
                             f"got shape {tuple(seed.shape)}, {seed.dtype} on {seed.device}")
    else:
        seed = _check_seed(seed)
    same_device = z.device == s.device == v_bar.device
    counter_fits = z.shape[0] * ((z.shape[1] + 1) // 2) < COUNTER_LIMIT
    path = resolve_impl(impl, z.device.type, HAS_TRITON_KERNEL, applies=same_device and counter_fits)
    with torch.no_grad():
        if path == "torch":
            if device_seed and z.is_cuda and torch.cuda.is_current_stream_capturing():
                raise ValueError("dual_noise: the reference reads a tensor seed on the host, which a CUDA graph "
                                 "capture cannot do; the Triton kernel reads it on the device (impl='triton')")
            return dual_noise_reference(z, s, v_bar, sigma_g, sigma_v, lam, int(seed) if device_seed else seed)
        if not same_device:
            raise ValueError(f"dual_noise: z, s, v_bar on different devices ({z.device}, {s.device}, {v_bar.device})")
        if not counter_fits:
            pairs = z.shape[0] * ((z.shape[1] + 1) // 2)
            raise ValueError(f"dual_noise(impl='triton'): B * ceil(d / 2) = {pairs} column pairs reach the noise "
                             f"counter's limit ({COUNTER_LIMIT}); use impl='torch' or a smaller batch")
        args = (z.detach(), s.detach(), v_bar.detach(), float(sigma_g), float(sigma_v), float(lam), seed)
        if direct_launch_ok(*args[:3], *([seed] if device_seed else [])):  # eager: no op dispatch layers
            if device_seed:
                return _launch(*args[:6], 0, seed, direct=True)
            return _launch(*args, direct=True)
        if device_seed:
            return torch.ops.fastsynth.dual_noise_fused_device_seed(*args)
        return torch.ops.fastsynth.dual_noise_fused(*args)  # traced by torch.compile


def _check_seed(seed) -> int:
    """Seeds are the Philox key (64-bit) and torch.Generator's: one range for both impls, so no
    two seeds a caller can pass give the same noise."""
    seed = int(seed)
    if not 0 <= seed < 2 ** 63:
        raise ValueError(f"dual_noise: seed must be in [0, 2**63), got {seed}")
    return seed


def _check(z, s, v_bar):
    if z.dim() != 2 or s.shape != z.shape:
        raise ValueError(f"dual_noise: z and s must both be B x d, got {tuple(z.shape)} and {tuple(s.shape)}")
    if z.shape[1] == 0:
        raise ValueError("dual_noise: d = 0, a feature vector without dimensions")
    if v_bar.shape != (z.shape[1],):
        raise ValueError(f"dual_noise: v_bar must have shape ({z.shape[1]},), got {tuple(v_bar.shape)}")
