"""FIFO feature memory bank with per-dimension variance (METHOD.md Sec. 3.4).

The bank keeps the last `size` feature vectors z; each batch overwrites the oldest rows.
`variance()` is Var over the stored rows, per dimension (unbiased, as torch.var), feeding
v_bar = v / ||v||_2 and the low-variance mask v_bar < lambda of Eq. 6.

Both paths keep the same state: the rows, a device-side count of rows ever written (pointer and
fill level derive from it, so no host read is needed), and float64 per-dimension mean and
centred sum of squares (M2) plus the float32 variance. The reference recomputes mean and M2 from
all stored rows after each update (an M x d pass); the Triton kernel removes the evicted rows'
contribution and adds the new rows' with Chan's pairwise formulas (each program of the launch
takes a share of the batch; the last of a column slice merges the shares), an O(B d) update, and
recomputes exactly once per rotation of the ring (O(B d) amortised), so rounding cannot
accumulate; `variance()` is O(d) on either path.
"""
from __future__ import annotations

import torch
from torch import nn

from ._dispatch import (HAS_TRITON, cdiv, direct_launch_ok, next_pow2, num_sms, resolve_impl, skip_launch, tl, triton,
                        wrap_triton)

HAS_TRITON_KERNEL = HAS_TRITON
# block_d columns per program, rows read block_b at a time; programs_per_sm sizes the row split
# (d / block_d column slices x chunks programs in all): each program takes a share of the batch,
# and on a rotation's update a share of the ring. merge_tile: float64 partials a slice's merging
# program reads as one tile (32 registers a thread at 4 warps).
# The batch was split over row chunks after the H200 run of 14a4910: one program per column
# slice streamed all B rows in a chain of dependent loads, 25.7 us for 3 MB of traffic
# (bench/results/2026-11-26-h200-run5).
TUNING = {"block_d": 64, "block_b": 32, "programs_per_sm": 2, "merge_tile": 2048}
MIN_BLOCK_D = 16  # sizes the kernel's completion counters (one per column slice)


# ---------------------------------------------------------------------------------------------
# 1. Reference: exact float64 statistics over the stored rows
# ---------------------------------------------------------------------------------------------
def bank_stats_reference(bank: torch.Tensor, filled: torch.Tensor):
    """(mean, M2) in float64 over rows [0, filled) of bank (M x d), without a host read.

    Memory traffic: reads the M x d bank and writes/reads a float64 copy of it (two passes:
    mean, then centred squares; the two-pass form is exact where sum/sum-of-squares cancels).
    """
    rows = bank.double()
    mask = (torch.arange(bank.shape[0], device=bank.device) < filled).double()[:, None]
    n = filled.double().clamp_min(1)
    mean = (rows * mask).sum(dim=0) / n
    m2 = (((rows - mean) * mask) ** 2).sum(dim=0)
    return mean, m2


def _variance_from(m2: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    return torch.where(n >= 2, m2 / (n.double() - 1).clamp_min(1), torch.zeros_like(m2)).float()


# ---------------------------------------------------------------------------------------------
# 2. Triton kernel: streaming update, one launch per batch
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:
    @triton.jit
    def _finite(x):
        """NaN and +-inf as 0 (torch.nan_to_num(x, 0, 0, 0)): a diverging step's features would
        stay in the streaming statistics for good. Done on the load, not by a launch before."""
        return tl.where((x == x) & (tl.abs(x) != float("inf")), x, 0.0)

    @triton.jit
    def _group_rows(base_ptr, b0, i1, ptr, M, stride_r, cols, cmask, filled,
                    WRAP: tl.constexpr, BLOCK_B: tl.constexpr):
        """Rows b0 .. b0 + BLOCK_B (below i1) of a group as float64, and which of them count.

        WRAP: rows of the ring at (ptr + i) % M, counting only where they hold data (< filled);
        otherwise rows i of the batch z, NaN and inf stored (and counted) as 0.
        """
        i = b0 + tl.arange(0, BLOCK_B)
        if WRAP:
            r = (ptr + i) % M
            valid = (i < i1) & (r < filled)
        else:
            r = i
            valid = i < i1
        x = tl.load(base_ptr + r.to(tl.int64)[:, None] * stride_r + cols[None, :],
                    mask=valid[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        if not WRAP:
            x = _finite(x)
        return x.to(tl.float64), valid

    @triton.jit
    def _group_stats(base_ptr, i0, i1, ptr, M, stride_r, cols, cmask, filled,
                     WRAP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
        """(count, mean, M2) per column of group rows i0 .. i1, two-pass in float64 (the second
        pass re-reads the rows, from cache, rather than cancel sum and sum of squares)."""
        acc = tl.zeros([BLOCK_B, BLOCK_D], tl.float64)
        cnt = tl.zeros([BLOCK_B], tl.float64)
        for b0 in range(i0, i1, BLOCK_B):
            x, valid = _group_rows(base_ptr, b0, i1, ptr, M, stride_r, cols, cmask, filled, WRAP, BLOCK_B)
            acc += x
            cnt += valid.to(tl.float64)
        n = tl.sum(cnt, axis=0)
        mean = tl.sum(acc, axis=0) / tl.maximum(n, 1.0)
        acc = tl.zeros([BLOCK_B, BLOCK_D], tl.float64)
        for b0 in range(i0, i1, BLOCK_B):
            x, valid = _group_rows(base_ptr, b0, i1, ptr, M, stride_r, cols, cmask, filled, WRAP, BLOCK_B)
            dx = tl.where(valid[:, None], x - mean[None, :], 0.0)
            acc += dx * dx
        return n, mean, tl.sum(acc, axis=0)

    @triton.jit
    def _ring_rows_after(z_ptr, bank_ptr, r0, end, ptr, M, B, stride_zb, D, cols, cmask,
                         BLOCK_B: tl.constexpr):
        """Ring rows r0 .. r0 + BLOCK_B (below `end`) as they are after this update, float64: a
        row the batch overwrites is read from z, the others from the bank. So the recompute never
        reads a row another program may be writing."""
        r = r0 + tl.arange(0, BLOCK_B)
        valid = r < end
        i = (r - ptr + M) % M                       # position in the batch, < B where overwritten
        new = valid & (i < B)
        old = valid & (i >= B)
        x = tl.load(bank_ptr + r.to(tl.int64)[:, None] * D + cols[None, :],
                    mask=old[:, None] & cmask[None, :], other=0.0).to(tl.float64)
        x += _finite(tl.load(z_ptr + i.to(tl.int64)[:, None] * stride_zb + cols[None, :],
                             mask=new[:, None] & cmask[None, :], other=0.0).to(tl.float32)).to(tl.float64)
        return x, valid

    @triton.jit
    def _chunk_tile(part_ptr, slot, c0, chunks, D, cols, cmask, BLOCK_CH: tl.constexpr):
        """Slot `slot` of chunks c0 .. c0 + BLOCK_CH (BLOCK_CH x BLOCK_D, 0 past the last chunk),
        from L2 (.cg), where the other programs' stores are."""
        ch = c0 + tl.arange(0, BLOCK_CH)
        return tl.load(part_ptr + slot * chunks * D + ch[:, None] * D + cols[None, :],
                       mask=(ch < chunks)[:, None] & cmask[None, :], other=0.0, cache_modifier=".cg")

    @triton.jit
    def _combine(part_ptr, slot, chunks, D, cols, cmask, BLOCK_CH: tl.constexpr, BLOCK_D: tl.constexpr):
        """(count, mean, M2) of the union of `chunks` groups whose statistics lie at part_ptr's
        slots slot, slot + 1, slot + 2 (count, mean, M2; chunks x D each). The pooled mean first,
        then every group's M2 plus its count times its squared distance to it: two passes over
        the chunk tiles, no chain of pairwise merges (each a dependent load). Empty groups
        (count 0) add nothing."""
        n = tl.zeros([BLOCK_D], tl.float64)
        s = tl.zeros([BLOCK_D], tl.float64)
        for c0 in range(0, chunks, BLOCK_CH):
            n_c = _chunk_tile(part_ptr, slot, c0, chunks, D, cols, cmask, BLOCK_CH)
            n += tl.sum(n_c, axis=0)
            s += tl.sum(n_c * _chunk_tile(part_ptr, slot + 1, c0, chunks, D, cols, cmask, BLOCK_CH), axis=0)
        mean = s / tl.maximum(n, 1.0)
        m2 = tl.zeros([BLOCK_D], tl.float64)
        for c0 in range(0, chunks, BLOCK_CH):
            n_c = _chunk_tile(part_ptr, slot, c0, chunks, D, cols, cmask, BLOCK_CH)
            dm = _chunk_tile(part_ptr, slot + 1, c0, chunks, D, cols, cmask, BLOCK_CH) - mean[None, :]
            m2 += tl.sum(_chunk_tile(part_ptr, slot + 2, c0, chunks, D, cols, cmask, BLOCK_CH) + n_c * dm * dm,
                         axis=0)
        return n, mean, m2

    @triton.jit
    def _store_stats(part_ptr, slot, chunk_id, chunks, D, cols, cmask, n, mean, m2):
        base = part_ptr + chunk_id * D + cols
        tl.store(base + slot * chunks * D, n + tl.zeros_like(mean), mask=cmask)
        tl.store(base + (slot + 1) * chunks * D, mean, mask=cmask)
        tl.store(base + (slot + 2) * chunks * D, m2, mask=cmask)

    @triton.jit
    def _bank_update_kernel(z_ptr, bank_ptr, count_ptr, mean_ptr, m2_ptr, var_ptr, done_ptr, part_ptr,
                            B, M, D, stride_zb, chunk, bchunk,
                            BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_CH: tl.constexpr):
        """Program (d, r) owns columns d * BLOCK_D .. and batch rows r * bchunk ..: it writes them
        over the oldest ring rows and takes the statistics of what it evicts and what it inserts
        (or, when this batch reaches the ring's end, the exact statistics of ring rows
        r * chunk .. after the update). The last program of a column slice to finish merges the
        slice's partial statistics (part_ptr: 6 x chunks x D float64) into the bank's.

        z must have unit column stride (the launcher guarantees it). done_ptr: [0] counts the
        finished programs, [1 + d] the finished programs of slice d; all back at 0 after.
        """
        pid = tl.program_id(0)
        pid_r = tl.program_id(1)
        chunks = tl.num_programs(1)
        cols = pid * BLOCK_D + tl.arange(0, BLOCK_D)
        cmask = cols < D
        count = tl.load(count_ptr)                       # rows ever written (int64, on device)
        ptr = count % M
        filled = tl.minimum(count, M)
        # Once per rotation (this batch reaches the ring's end) the streamed statistics are
        # replaced by an exact recompute over every stored row. Removing an evicted row subtracts
        # numbers that can be far larger than what stays (features whose scale falls), and the
        # float64 rounding left behind would otherwise never go: now it lasts at most one
        # rotation. M / B updates apart, so O(B d) per update on average.
        rotate = ptr + B >= M
        i0 = pid_r * bchunk
        i1 = tl.minimum(i0 + bchunk, B)

        if not rotate:
            # Chan et al.: this program's share of the evicted group (rows about to be overwritten)
            # and of the batch; the slice's last program removes the one and adds the other.
            n_r, mean_r, m2_r = _group_stats(bank_ptr, i0, i1, ptr, M, D, cols, cmask, filled,
                                             WRAP=True, BLOCK_B=BLOCK_B, BLOCK_D=BLOCK_D)
            n_a, mean_a, m2_a = _group_stats(z_ptr, i0, i1, ptr, M, stride_zb, cols, cmask, filled,
                                             WRAP=False, BLOCK_B=BLOCK_B, BLOCK_D=BLOCK_D)
            _store_stats(part_ptr, 0, pid_r, chunks, D, cols, cmask, n_r, mean_r, m2_r)
            _store_stats(part_ptr, 3, pid_r, chunks, D, cols, cmask, n_a, mean_a, m2_a)
        else:
            # After this update the ring is full: every row counts. Two passes over the chunk
            # (the second from cache). Tile-shaped accumulators, reduced over rows once at the
            # end: a reduction per tile would put cross-thread shuffles in the loop.
            r0 = pid_r * chunk
            end = tl.minimum(r0 + chunk, M)
            acc = tl.zeros([BLOCK_B, BLOCK_D], tl.float64)
            for b0 in range(r0, end, BLOCK_B):
                x, valid = _ring_rows_after(z_ptr, bank_ptr, b0, end, ptr, M, B, stride_zb, D, cols, cmask,
                                            BLOCK_B)
                acc += x
            n_c = tl.maximum(end - r0, 0).to(tl.float64)
            mean_c = tl.sum(acc, axis=0) / tl.maximum(n_c, 1.0)
            acc = tl.zeros([BLOCK_B, BLOCK_D], tl.float64)
            for b0 in range(r0, end, BLOCK_B):
                x, valid = _ring_rows_after(z_ptr, bank_ptr, b0, end, ptr, M, B, stride_zb, D, cols, cmask,
                                            BLOCK_B)
                dx = tl.where(valid[:, None], x - mean_c[None, :], 0.0)
                acc += dx * dx
            _store_stats(part_ptr, 0, pid_r, chunks, D, cols, cmask, n_c, mean_c, tl.sum(acc, axis=0))

        # Overwrite this program's evicted rows with its rows of the batch. The barrier: every
        # warp has read the evicted rows above (another warp may hold the same addresses).
        tl.debug_barrier()
        for b0 in range(i0, i1, BLOCK_B):
            i = b0 + tl.arange(0, BLOCK_B)
            r = (ptr + i) % M
            m = (i < i1)[:, None] & cmask[None, :]
            x = tl.load(z_ptr + i.to(tl.int64)[:, None] * stride_zb + cols[None, :], mask=m, other=0.0)
            tl.store(bank_ptr + r.to(tl.int64)[:, None] * D + cols[None, :], _finite(x.to(tl.float32)), mask=m)

        # The slice's last program merges (acq_rel: the other programs' partials are visible).
        tl.debug_barrier()  # every thread's partial stored before the release below
        if tl.atomic_add(done_ptr + 1 + pid, 1) == chunks - 1:
            if not rotate:
                n_r, mean_r, m2_r = _combine(part_ptr, 0, chunks, D, cols, cmask, BLOCK_CH, BLOCK_D)
                n_a, mean_a, m2_a = _combine(part_ptr, 3, chunks, D, cols, cmask, BLOCK_CH, BLOCK_D)
                n = filled.to(tl.float64)
                mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
                m2 = tl.load(m2_ptr + cols, mask=cmask, other=0.0)

                n_s = n - n_r
                keep = n_s > 0
                n_s_safe = tl.where(keep, n_s, 1.0)
                mean_s = tl.where(keep, (n * mean - n_r * mean_r) / n_s_safe, 0.0)
                delta = mean_r - mean_s
                m2_s = m2 - m2_r - delta * delta * (n_s * n_r / tl.maximum(n, 1.0))
                m2_s = tl.where(keep, tl.maximum(m2_s, 0.0), 0.0)

                n = n_s + n_a
                delta = mean_a - mean_s
                n_safe = tl.maximum(n, 1.0)  # 0 only in the masked-off columns past D
                mean = mean_s + delta * (n_a / n_safe)
                m2 = m2_s + m2_a + delta * delta * (n_s * n_a / n_safe)
            else:
                n, mean, m2 = _combine(part_ptr, 0, chunks, D, cols, cmask, BLOCK_CH, BLOCK_D)
            var = tl.where(n >= 2, m2 / tl.maximum(n - 1.0, 1.0), 0.0)
            tl.store(mean_ptr + cols, mean, mask=cmask)
            tl.store(m2_ptr + cols, m2, mask=cmask)
            tl.store(var_ptr + cols, var.to(tl.float32), mask=cmask)
            tl.atomic_xchg(done_ptr + 1 + pid, 0)

        # The last program to finish advances the count: every program has read it by then, so
        # the pointer update needs no second launch. acq_rel atomics order the read before.
        tl.debug_barrier()  # every warp of this program has read the count and written its share
        finished = tl.atomic_add(done_ptr, 1)
        if finished == tl.num_programs(0) * chunks - 1:
            tl.store(count_ptr, count + B)
            tl.atomic_xchg(done_ptr, 0)

    def _launch(z, bank, count, mean, m2, var, done, direct: bool = False) -> None:
        """direct: launch the kernel itself (the eager path), not through wrap_triton."""
        b, d = z.shape
        if b == 0 or (not direct and skip_launch(z, bank)):  # direct: real tensors only
            return
        m = bank.shape[0]
        block_d, block_b = TUNING["block_d"], TUNING["block_b"]
        slices = cdiv(d, block_d)
        # Row chunks: about programs_per_sm programs per SM in all. Each takes a share of the
        # batch (bchunk rows) on every update, and of the ring (chunk rows) on a rotation's.
        chunks = max(1, min(cdiv(m, block_b),
                            cdiv(num_sms(bank.device) * TUNING["programs_per_sm"], slices)))
        chunk = cdiv(cdiv(m, chunks), block_b) * block_b
        chunks = cdiv(m, chunk)
        bchunk = cdiv(b, chunks)
        if done.numel() < 1 + slices:
            raise ValueError(f"FeatureBank: completion counters for {slices} column slices, have {done.numel() - 1}")
        # Per chunk: (count, mean, M2) of the evicted rows and of the inserted ones (a rotation's
        # update uses the first three for its ring chunk).
        partial = torch.empty(6, chunks, d, device=bank.device, dtype=torch.float64)
        block_ch = min(next_pow2(chunks), max(1, TUNING["merge_tile"] // block_d))
        (_bank_update_kernel if direct else wrap_triton(_bank_update_kernel))[(slices, chunks)](
            z, bank, count, mean, m2, var, done, partial,
            b, m, d, z.stride(0), chunk, bchunk,
            BLOCK_B=block_b, BLOCK_D=block_d, BLOCK_CH=block_ch, num_warps=4)

    @torch.library.triton_op("fastsynth::feature_bank_update",
                             mutates_args=("bank", "count", "mean", "m2", "var", "done"))
    def _feature_bank_update(z: torch.Tensor, bank: torch.Tensor, count: torch.Tensor, mean: torch.Tensor,
                             m2: torch.Tensor, var: torch.Tensor, done: torch.Tensor) -> None:
        _launch(z, bank, count, mean, m2, var, done)


# ---------------------------------------------------------------------------------------------
# 3. The module
# ---------------------------------------------------------------------------------------------
class FeatureBank(nn.Module):
    """Ring buffer of `size` x `dim` float32 features; state lives in buffers (checkpointed).

    impl: "torch" recomputes the statistics from the stored rows (the reference), "triton"
    updates them from the evicted and new rows only, "auto" picks Triton for a CUDA bank.
    """

    def __init__(self, size: int, dim: int, impl: str = "auto"):
        super().__init__()
        if size < 2 or dim < 1:
            raise ValueError(f"FeatureBank needs size >= 2 and dim >= 1, got size={size}, dim={dim}")
        self.size, self.dim, self.impl = int(size), int(dim), impl
        resolve_impl(impl, "cuda", HAS_TRITON_KERNEL)  # reject a bad choice at construction
        self.register_buffer("bank", torch.zeros(self.size, self.dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))   # rows ever written
        self.register_buffer("mean", torch.zeros(self.dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(self.dim, dtype=torch.float64))
        self.register_buffer("var", torch.zeros(self.dim))
        # Kernel-private completion counters (all programs, then one per column slice), always back
        # at 0 between launches: not checkpointed.
        self.register_buffer("done", torch.zeros(1 + -(-self.dim // MIN_BLOCK_D), dtype=torch.int32),
                             persistent=False)

    @property
    def ptr(self) -> torch.Tensor:
        """Next row to write (a device tensor)."""
        return self.count % self.size

    @property
    def filled(self) -> torch.Tensor:
        """Rows holding data, [0, filled) (a device tensor)."""
        return self.count.clamp(max=self.size)

    @torch.no_grad()
    def update(self, z: torch.Tensor) -> None:
        """Write the batch z (B x dim) over the oldest rows, wrapping around the end."""
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"FeatureBank.update: expected B x {self.dim}, got {tuple(z.shape)}")
        # Statistics must describe exactly the stored (float32) values, or later evictions would
        # remove numbers that never were added.
        z = z.detach().to(self.bank.dtype) if z.dtype == torch.float64 else z.detach()
        if z.shape[0] > self.size:  # only the newest `size` rows survive anyway
            z = z[-self.size:]
        if z.device != self.bank.device:
            z = z.to(self.bank.device)
        # A diverging step's features (NaN/inf) would stay in the streaming statistics for good;
        # the step itself is skipped by the training loop, and its rows are stored as zeros
        # (by the kernel as it reads them; here on the reference path).
        if resolve_impl(self.impl, self.bank.device.type, HAS_TRITON_KERNEL) == "triton":
            if z.stride(1) != 1:
                z = z.contiguous()
            state = (self.bank, self.count, self.mean, self.m2, self.var, self.done)
            if direct_launch_ok(z, *state):  # eager: no op dispatch layers (see _dispatch)
                _launch(z, *state, direct=True)
            else:
                torch.ops.fastsynth.feature_bank_update(z, *state)
            return
        z = torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)
        b = z.shape[0]
        # Pointer arithmetic stays on the device: reading it on the host would synchronise.
        rows = (torch.arange(b, device=self.bank.device) + self.ptr) % self.size
        self.bank.index_copy_(0, rows, z.to(self.bank.dtype))
        self.count.add_(b)
        self.recompute()

    @torch.no_grad()
    def recompute(self) -> None:
        """Exact statistics from the stored rows (the reference update; also after a load)."""
        mean, m2 = bank_stats_reference(self.bank, self.filled)
        self.mean.copy_(mean)
        self.m2.copy_(m2)
        self.var.copy_(_variance_from(m2, self.filled))

    @torch.no_grad()
    def variance(self) -> torch.Tensor:
        """Per-dimension unbiased variance over the filled rows (dim,), float32; zeros below 2 rows.

        O(d): a copy of the maintained statistic, so a later update cannot change it under
        the caller.
        """
        return self.var.clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the streaming statistics (issue 2 layout) hold the rows and
        # ptr/filled only: rebuild count and the statistics from them.
        if prefix + "count" not in state_dict and prefix + "ptr" in state_dict:
            ptr, filled = state_dict.pop(prefix + "ptr"), state_dict.pop(prefix + "filled")
            count = filled if int(filled) < self.size else self.size + ptr
            state_dict[prefix + "count"] = count.clone().long()
            bank = state_dict[prefix + "bank"]
            mean, m2 = bank_stats_reference(bank, count.clamp(max=self.size))
            state_dict[prefix + "mean"], state_dict[prefix + "m2"] = mean, m2
            state_dict[prefix + "var"] = _variance_from(m2, count.clamp(max=self.size))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, impl={self.impl!r}"
