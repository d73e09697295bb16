"""FIFO feature memory bank with per-dimension variance (METHOD.md Sec. 3.4).

The bank keeps the last `size` feature vectors z; each batch overwrites the oldest rows.
`variance()` is Var over the stored rows, per dimension (unbiased, as torch.var), feeding
v_bar = v / ||v||_2 and the low-variance mask v_bar < lambda of Eq. 6.

Both paths keep the same state: the rows, a device-side count of rows ever written (pointer and
fill level derive from it, so no host read is needed), and float64 per-dimension mean and
centred sum of squares (M2) plus the float32 variance. The reference recomputes mean and M2 from
all stored rows after each update (an M x d pass); the Triton kernel removes the evicted rows'
contribution and adds the new rows' with Chan's pairwise formulas, an O(B d) update, and
recomputes exactly once per rotation of the ring (O(B d) amortised), so rounding cannot
accumulate; `variance()` is O(d) on either path.
"""
from __future__ import annotations

import torch
from torch import nn

from ._dispatch import HAS_TRITON, resolve_impl, skip_launch, tl, triton, wrap_triton

HAS_TRITON_KERNEL = HAS_TRITON


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
    def _group_rows(base_ptr, b0, ptr, M, nrows, stride_r, cols, cmask, filled,
                    WRAP: tl.constexpr, BLOCK_B: tl.constexpr):
        """Rows b0 .. b0 + BLOCK_B of a group as float64, and which of them count.

        WRAP: rows live in the ring at (ptr + i) % M and count only where they hold data
        (< filled); otherwise rows 0..nrows-1 of a plain B x d input.
        """
        i = b0 + tl.arange(0, BLOCK_B)
        if WRAP:
            r = (ptr + i) % M
            valid = (i < nrows) & (r < filled)
        else:
            r = i
            valid = i < nrows
        x = tl.load(base_ptr + r.to(tl.int64)[:, None] * stride_r + cols[None, :],
                    mask=valid[:, None] & cmask[None, :], other=0.0).to(tl.float64)
        return x, valid

    @triton.jit
    def _group_stats(base_ptr, ptr, M, nrows, stride_r, cols, cmask, filled,
                     WRAP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
        """(count, mean, M2) per column of `nrows` rows, two-pass in float64 (the second pass
        re-reads the rows, from cache, rather than cancel sum and sum of squares)."""
        acc = tl.zeros([BLOCK_D], tl.float64)
        cnt = tl.zeros([BLOCK_B], tl.float64)
        for b0 in range(0, nrows, BLOCK_B):
            x, valid = _group_rows(base_ptr, b0, ptr, M, nrows, stride_r, cols, cmask, filled, WRAP, BLOCK_B)
            acc += tl.sum(x, axis=0)
            cnt += valid.to(tl.float64)
        n = tl.sum(cnt, axis=0)
        mean = acc / tl.maximum(n, 1.0)
        m2 = tl.zeros([BLOCK_D], tl.float64)
        for b0 in range(0, nrows, BLOCK_B):
            x, valid = _group_rows(base_ptr, b0, ptr, M, nrows, stride_r, cols, cmask, filled, WRAP, BLOCK_B)
            dx = tl.where(valid[:, None], x - mean[None, :], 0.0)
            m2 += tl.sum(dx * dx, axis=0)
        return n, mean, m2

    @triton.jit
    def _bank_update_kernel(z_ptr, bank_ptr, count_ptr, mean_ptr, m2_ptr, var_ptr, done_ptr,
                            B, M, D, stride_zb, stride_zd,
                            BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
        """Each program owns BLOCK_D columns: evict, insert, and update that slice's statistics.

        z must have unit column stride (the launcher guarantees it).
        """
        pid = tl.program_id(0)
        cols = pid * BLOCK_D + tl.arange(0, BLOCK_D)
        cmask = cols < D
        count = tl.load(count_ptr)                       # rows ever written (int64, on device)
        ptr = count % M
        filled = tl.minimum(count, M)

        # Chan et al.: remove the evicted group (rows about to be overwritten), then add the batch.
        n_r, mean_r, m2_r = _group_stats(bank_ptr, ptr, M, B, D, cols, cmask, filled,
                                         WRAP=True, BLOCK_B=BLOCK_B, BLOCK_D=BLOCK_D)
        n_a, mean_a, m2_a = _group_stats(z_ptr, ptr, M, B, stride_zb, cols, cmask, filled,
                                         WRAP=False, BLOCK_B=BLOCK_B, BLOCK_D=BLOCK_D)
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

        n_new = n_s + n_a
        delta = mean_a - mean_s
        mean_new = mean_s + delta * (n_a / n_new)
        m2_new = m2_s + m2_a + delta * delta * (n_s * n_a / n_new)

        # Overwrite the evicted rows with the batch (after this program read them above).
        for b0 in range(0, B, BLOCK_B):
            i = b0 + tl.arange(0, BLOCK_B)
            r = (ptr + i) % M
            m = (i < B)[:, None] & cmask[None, :]
            x = tl.load(z_ptr + i.to(tl.int64)[:, None] * stride_zb + cols[None, :], mask=m, other=0.0)
            tl.store(bank_ptr + r.to(tl.int64)[:, None] * D + cols[None, :], x.to(tl.float32), mask=m)

        # Once per rotation (this batch reaches the ring's end) the streamed statistics of these
        # columns are replaced by an exact two-pass recompute over every stored row. Removing an
        # evicted row subtracts numbers that can be far larger than what stays (features whose
        # scale falls), and the float64 rounding left behind would otherwise never go: now it
        # lasts at most one rotation. M / B updates apart, so O(B d) per update on average.
        if ptr + B >= M:
            tl.debug_barrier()  # the rows this program's threads just wrote, visible to all of them
            n_new, mean_new, m2_new = _group_stats(bank_ptr, 0, M, M, D, cols, cmask, M,
                                                   WRAP=True, BLOCK_B=BLOCK_B, BLOCK_D=BLOCK_D)
        var = tl.where(n_new >= 2, m2_new / tl.maximum(n_new - 1.0, 1.0), 0.0)
        tl.store(mean_ptr + cols, mean_new, mask=cmask)
        tl.store(m2_ptr + cols, m2_new, mask=cmask)
        tl.store(var_ptr + cols, var.to(tl.float32), mask=cmask)

        # The last program to finish advances the count: every program has read it by then, so
        # the pointer update needs no second launch. acq_rel atomics order the read before.
        finished = tl.atomic_add(done_ptr, 1)
        if finished == tl.num_programs(0) - 1:
            tl.store(count_ptr, count + B)
            tl.atomic_xchg(done_ptr, 0)

    def _launch(z, bank, count, mean, m2, var, done) -> None:
        b, d = z.shape
        if b == 0 or skip_launch(z, bank):
            return
        block_d = 64
        wrap_triton(_bank_update_kernel)[(triton.cdiv(d, block_d),)](
            z, bank, count, mean, m2, var, done, b, bank.shape[0], d, z.stride(0), z.stride(1),
            BLOCK_B=32, BLOCK_D=block_d, num_warps=4)

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
        # Kernel-private completion counter, always back at 0 between launches: not checkpointed.
        self.register_buffer("done", torch.zeros((), dtype=torch.int32), persistent=False)

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
        # A diverging step's features (NaN/inf) would stay in the streaming statistics for good;
        # the step itself is skipped by the training loop, and its rows are stored as zeros.
        z = torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)
        if z.shape[0] > self.size:  # only the newest `size` rows survive anyway
            z = z[-self.size:]
        if z.device != self.bank.device:
            z = z.to(self.bank.device)
        if resolve_impl(self.impl, self.bank.device.type, HAS_TRITON_KERNEL) == "triton":
            if z.stride(1) != 1:
                z = z.contiguous()
            torch.ops.fastsynth.feature_bank_update(z, self.bank, self.count, self.mean, self.m2, self.var,
                                                    self.done)
            return
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
