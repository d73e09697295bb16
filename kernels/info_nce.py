"""InfoNCE with a queue of negatives (METHOD.md Eq. 1, MoCo v2).

loss = mean_i [ logsumexp_j(l_ij) - l_i0 ],  l_i0 = q_i . k_i / tau,  l_ij = q_i . queue_j / tau.
Only q receives a gradient: in MoCo the keys come from the momentum encoder and the queue holds
past keys, both constants for the step. Hence

    dL/dq_i = ( sum_j p_ij key_j - k_i ) / (tau N),   p_i = softmax_j(l_ij), key_0 = k_i,

which the fused forward produces in the same sweep over the queue (FlashAttention's forward with
V = K); backward only scales it by the incoming gradient.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._dispatch import (HAS_TRITON, INTERPRET, cdiv, direct_launch_ok, next_pow2, num_sms, resolve_impl,
                        skip_launch, tl, triton, wrap_triton)

HAS_TRITON_KERNEL = HAS_TRITON
MAX_C = 256  # a q row block and its accumulator live in registers
FLOATS = (torch.float32, torch.float16, torch.bfloat16)  # the input dtypes the kernel takes
# Launch configuration for C <= 128 (wider rows halve block_k and use 8 warps). programs_per_sm
# sets how many (row block, queue split) programs share the GPU: more splits keep more SMs busy
# but write more partial states (S x N x C floats). bench/gpu_bench.py sweeps these on a GPU.
# merge_tile: floats of partial accumulators the merge reads as one tile (64 registers a thread).
# mean_block: rows of losses the merge's last program sums per load when it takes the batch mean.
# programs_per_sm 2: 33.5 us against 36.8 us for 1 in the H200 sweep of 14a4910 (the tiled merge
# made more splits cheap; bench/results/2026-11-26-h200-run5).
TUNING = {"block_n": 64, "block_k": 64, "num_warps": 4, "num_stages": 3, "programs_per_sm": 2, "merge_tile": 8192,
          "mean_block": 1024}


# ---------------------------------------------------------------------------------------------
# 1. Reference
# ---------------------------------------------------------------------------------------------
def info_nce_reference(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float) -> torch.Tensor:
    """Plain PyTorch InfoNCE; q, k: N x C (unit norm), queue: K x C. Returns a float32 scalar.

    Memory traffic: reads q, k (2 N C) and queue (K C, then a float32 copy of it), materialises
    the N x (K + 1) logits (written and read again by cross_entropy, and again in backward);
    the fused kernel's job is to avoid that matrix.
    """
    _check(q, k, queue)
    k = k.detach()
    queue = queue.detach()
    # Accumulate in float32 whatever the input dtype: logits / tau with tau = 0.2 and K = 65536
    # terms in the log-sum-exp lose too much in half precision.
    qf, kf, nf = q.float(), k.float(), queue.float()
    l_pos = (qf * kf).sum(dim=1, keepdim=True)          # N x 1
    l_neg = qf @ nf.t()                                 # N x K
    logits = torch.cat([l_pos, l_neg], dim=1) / tau     # N x (K + 1)
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target)


# ---------------------------------------------------------------------------------------------
# 2. Triton kernels
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:
    @triton.jit
    def _info_nce_split_kernel(q_ptr, u_ptr, m_ptr, l_ptr, acc_ptr, done_ptr,
                               N, K, C, chunk,
                               stride_qn, stride_qc, stride_un, stride_uc,
                               scale,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
                               NEED_GRAD: tl.constexpr, IEEE: tl.constexpr, EVEN: tl.constexpr):
        """One (row block, queue chunk): online max / sum / p-weighted queue sum over the chunk.

        Logits are kept in log2 units (scale = log2(e) / tau > 0) so exp2 replaces exp; the max is
        taken on the raw dots and scaled once per row, so each logit costs one multiply-add
        (s * scale - max) before its exp2. EVEN: every chunk is whole tiles and C = BLOCK_C, so
        the queue tiles need no masks. Partial states go to m, l: S x N and acc: S x N x C
        (float32), merged by the next kernel. Program (0, 0) also zeroes the merge's completion
        counter: the merge launches after this kernel ends, so the count starts at 0 with no
        memset launch of its own.
        """
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        if (pid_n == 0) & (pid_s == 0):
            tl.store(done_ptr, 0)
        scale = tl.cast(scale, tl.float32)  # inductor passes Python floats as fp64
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_C)
        rmask = rows < N
        cmask = cols < C
        q = tl.load(q_ptr + rows[:, None] * stride_qn + cols[None, :] * stride_qc,
                    mask=rmask[:, None] & cmask[None, :], other=0.0)

        m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_N], tl.float32)
        acc = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
        start = pid_s * chunk
        end = tl.minimum(start + chunk, K)
        for j0 in range(start, end, BLOCK_K):
            keys = j0 + tl.arange(0, BLOCK_K)
            kmask = keys < end
            if EVEN:
                t = tl.load(u_ptr + keys[:, None] * stride_un + cols[None, :] * stride_uc)
            else:
                t = tl.load(u_ptr + keys[:, None] * stride_un + cols[None, :] * stride_uc,
                            mask=kmask[:, None] & cmask[None, :], other=0.0)               # BLOCK_K x BLOCK_C
            t = t.to(q.dtype)  # a float32 queue under bf16 autocast: the dots run in q's dtype
            if IEEE:
                s = tl.dot(q, tl.trans(t), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(t))
            if not EVEN:
                s = tl.where(kmask[None, :], s, float("-inf"))                            # BLOCK_N x BLOCK_K
            m_new = tl.maximum(m_i, tl.max(s, axis=1) * scale)                            # finite: >= 1 key
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s * scale - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if NEED_GRAD:
                if IEEE:
                    acc = acc * alpha[:, None] + tl.dot(p, t, input_precision="ieee")
                else:
                    # Half-precision p for the tensor cores, as FlashAttention does; acc stays fp32.
                    acc = acc * alpha[:, None] + tl.dot(p.to(t.dtype), t)
            m_i = m_new

        base = pid_s * N + rows
        tl.store(m_ptr + base, m_i, mask=rmask)
        tl.store(l_ptr + base, l_i, mask=rmask)
        if NEED_GRAD:
            tl.store(acc_ptr + base[:, None] * C + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])

    @triton.jit
    def _info_nce_merge_kernel(q_ptr, k_ptr, m_ptr, l_ptr, acc_ptr, loss_ptr, grad_ptr, mean_ptr, done_ptr,
                               N, C, S,
                               stride_qn, stride_qc, stride_kn, stride_kc,
                               scale, grad_scale,
                               BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                               NEED_GRAD: tl.constexpr):
        """One row: merge its S partial states with the positive logit; the row's loss and dL/dq.
        The last row to finish also writes the batch mean of the losses (Eq. 1's mean over i).

        The splits are read BLOCK_S at a time as one tile, not one after another: a chain of S
        dependent loads would make the merge's time grow with the number of splits. The mean
        needs every row's loss: a completion count (zeroed by the split kernel) picks the last
        program, which sums them in row order, so the loss is the same on every run (an atomic
        sum of the rows would not be), and no reduction kernel follows (1.7 us on the H200).
        """
        row = tl.program_id(0)
        scale = tl.cast(scale, tl.float32)  # inductor passes Python floats as fp64
        grad_scale = tl.cast(grad_scale, tl.float32)
        cols = tl.arange(0, BLOCK_C)
        cmask = cols < C
        splits = tl.arange(0, BLOCK_S)
        q = tl.load(q_ptr + row * stride_qn + cols * stride_qc, mask=cmask, other=0.0).to(tl.float32)
        kk = tl.load(k_ptr + row * stride_kn + cols * stride_kc, mask=cmask, other=0.0).to(tl.float32)
        pos = tl.sum(q * kk, axis=0) * scale                                     # l_i0, log2 units

        m_all = pos                                     # the positive logit is one more state
        for s0 in range(0, S, BLOCK_S):
            m_s = tl.load(m_ptr + (s0 + splits) * N + row, mask=s0 + splits < S, other=float("-inf"))
            m_all = tl.maximum(m_all, tl.max(m_s, axis=0))
        l_all = tl.exp2(pos - m_all)
        acc = kk * l_all
        for s0 in range(0, S, BLOCK_S):
            smask = s0 + splits < S
            off = (s0 + splits) * N + row
            w = tl.exp2(tl.load(m_ptr + off, mask=smask, other=float("-inf")) - m_all)   # 0 past S
            l_all += tl.sum(w * tl.load(l_ptr + off, mask=smask, other=0.0), axis=0)
            if NEED_GRAD:
                acc_s = tl.load(acc_ptr + off[:, None] * C + cols[None, :], mask=smask[:, None] & cmask[None, :],
                                other=0.0)
                acc += tl.sum(w[:, None] * acc_s, axis=0)

        loss = (m_all + tl.log2(l_all) - pos) * 0.6931471805599453               # (lse - l_i0), ln 2 units
        tl.store(loss_ptr + row, loss)
        if NEED_GRAD:
            grad = (acc / l_all - kk) * grad_scale
            tl.store(grad_ptr + row * C + cols, grad.to(grad_ptr.dtype.element_ty), mask=cmask)

        tl.debug_barrier()  # this program's loss is stored before the release below
        if tl.atomic_add(done_ptr, 1) == N - 1:  # acq_rel: every other row's loss is visible now
            total = tl.zeros([BLOCK_R], tl.float32)
            for r0 in range(0, N, BLOCK_R):
                r = r0 + tl.arange(0, BLOCK_R)
                # .cg: from L2, where the other programs' stores are; never a stale L1 line.
                total += tl.load(loss_ptr + r, mask=r < N, other=0.0, cache_modifier=".cg")
            tl.store(mean_ptr, tl.sum(total, axis=0) / N)

    @triton.jit
    def _info_nce_scale_kernel(g_ptr, src_ptr, dst_ptr, numel, BLOCK: tl.constexpr):
        """dst = src * g for the backward: src is dL/dq in q's dtype, g the incoming gradient
        (a float32 scalar on the device, read here: no host sync); the product is taken in
        float32 and rounded once."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        g = tl.load(g_ptr).to(tl.float32)
        x = tl.load(src_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst_ptr + offs, (x * g).to(dst_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# 3. Launcher
# ---------------------------------------------------------------------------------------------
def _launch(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float, need_grad: bool,
            direct: bool = False):
    """(mean loss, dL/dq). direct: launch the kernels themselves (the eager path, see
    _dispatch.direct_launch_ok), not through wrap_triton, which a registered op needs."""
    n, c = q.shape
    kq = queue.shape[0]
    block_c = max(16, next_pow2(c))
    block_n = max(16, min(TUNING["block_n"], next_pow2(n)))
    block_k = TUNING["block_k"] if block_c <= 128 else min(TUNING["block_k"], 32)
    warps = TUNING["num_warps"] if block_c <= 128 else 8
    ieee = q.dtype == torch.float32  # float32 in, float32 exactness out: no TF32 shortcut
    # Split the queue so that row blocks x splits fill the GPU (in whole waves): more splits only
    # add partial states to write and merge.
    row_blocks = cdiv(n, block_n)
    max_splits = cdiv(kq, block_k)
    splits = max(1, min(max_splits, (num_sms(q.device) * TUNING["programs_per_sm"]) // row_blocks))
    chunk = cdiv(cdiv(kq, splits), block_k) * block_k
    splits = cdiv(kq, chunk)

    dev = q.device
    m = torch.empty(splits, n, device=dev, dtype=torch.float32)
    lsum = torch.empty(splits, n, device=dev, dtype=torch.float32)
    acc = torch.empty(splits, n, c, device=dev, dtype=torch.float32) if need_grad else m
    rows_loss = torch.empty(n, device=dev, dtype=torch.float32)
    mean = torch.empty((), device=dev, dtype=torch.float32)
    done = torch.empty((), device=dev, dtype=torch.int32)  # zeroed by the split kernel
    grad = torch.empty(n, c, device=dev, dtype=q.dtype) if need_grad else torch.empty(0, device=dev, dtype=q.dtype)
    if not direct and skip_launch(q, k, queue):  # direct: real tensors only (direct_launch_ok)
        return mean, grad
    scale = 1.4426950408889634 / tau  # log2(e) / tau
    # wrap_triton makes each launch a node torch.compile can trace; in eager it is the kernel.
    split_kernel = _info_nce_split_kernel if direct else wrap_triton(_info_nce_split_kernel)
    merge_kernel = _info_nce_merge_kernel if direct else wrap_triton(_info_nce_merge_kernel)
    split_kernel[(row_blocks, splits)](
        q, queue, m, lsum, acc, done, n, kq, c, chunk,
        q.stride(0), q.stride(1), queue.stride(0), queue.stride(1), scale,
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_C=block_c, NEED_GRAD=need_grad, IEEE=ieee,
        EVEN=(kq % chunk == 0 and c == block_c),
        num_warps=warps, num_stages=1 if INTERPRET else TUNING["num_stages"])
    # One program per row, reading its partial states a tile of block_s splits at a time.
    block_s = min(next_pow2(splits), max(1, TUNING["merge_tile"] // block_c))
    merge_kernel[(n,)](
        q, k, m, lsum, acc, rows_loss, grad, mean, done, n, c, splits,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), scale, 1.0 / (tau * n),
        BLOCK_S=block_s, BLOCK_C=block_c, BLOCK_R=min(TUNING["mean_block"], max(16, next_pow2(n))),
        NEED_GRAD=need_grad, num_warps=4)
    return mean, grad


def _launch_scale(grad: torch.Tensor, grad_loss: torch.Tensor, direct: bool = False) -> torch.Tensor:
    out = torch.empty_like(grad)
    if (not direct and skip_launch(grad, grad_loss)) or grad.numel() == 0:
        return out
    block = 4096
    (_info_nce_scale_kernel if direct else wrap_triton(_info_nce_scale_kernel))[(cdiv(grad.numel(), block),)](
        grad_loss, grad, out, grad.numel(), BLOCK=block, num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------
# 4. Autograd-aware op (torch.compile traces through triton_op without a graph break)
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:
    @torch.library.triton_op("fastsynth::info_nce_fused", mutates_args=())
    def _info_nce_fused(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float,
                        need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss, dL/dq for an upstream gradient of 1); dL/dq is empty when not needed."""
        return _launch(q, k, queue, tau, need_grad)

    def _setup(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        # dL/dq has no derivative here: marked so, differentiating it (a gradient penalty through
        # create_graph=True) is autograd's "does not require grad" error, not a silent zero.
        ctx.mark_non_differentiable(output[1])
        # dL/dq, the op's second output, never gets a gradient of its own: without this autograd
        # fills an N x C zero tensor for it on every backward (one more launch) that is ignored.
        ctx.set_materialize_grads(False)

    @torch.library.triton_op("fastsynth::info_nce_scale", mutates_args=())
    def _info_nce_scale(grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
        """grad * grad_loss in one launch. Eager `grad * grad_loss` (a bfloat16 matrix times a
        0-dim float32 tensor) took TensorIterator's casting path: 3.8 us on the H200 for
        256 x 128, the largest of the op's small kernels (bench/results/2026-11-26-h200-run5)."""
        return _launch_scale(grad, grad_loss)

    def _backward(ctx, grad_loss, _grad_of_grad):
        if grad_loss is None:  # nothing flowed into the loss (only possible without materialised grads)
            return None, None, None, None, None
        (grad,) = ctx.saved_tensors
        # grad_loss is the float32 0-dim gradient of the op's float32 scalar. The scaling op has
        # no derivative: differentiating the gradient again is an error (see info_nce).
        return torch.ops.fastsynth.info_nce_scale(grad, grad_loss.float().contiguous()), None, None, None, None

    _info_nce_fused.register_autograd(_backward, setup_context=_setup)


class _InfoNCEDirect(torch.autograd.Function):
    """The eager path: the op's launches and backward without the registered op's dispatch
    layers (see _dispatch.direct_launch_ok); the same kernels, so the same bits."""

    @staticmethod
    def forward(ctx, q, k, queue, tau, need_grad):
        loss, grad = _launch(q, k, queue, tau, need_grad, direct=True)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable  # differentiating dL/dq again: an error, as the op's
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        grad_loss = grad_loss.float().contiguous()
        if direct_launch_ok(grad, grad_loss):
            scaled = _launch_scale(grad, grad_loss, direct=True)
        else:  # a dispatch mode came up between forward and backward: let it see the op
            scaled = torch.ops.fastsynth.info_nce_scale(grad, grad_loss)
        return scaled, None, None, None, None


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float, impl: str = "auto") -> torch.Tensor:
    """InfoNCE with queue (Eq. 1), mean over the batch, a float32 scalar differentiable in q only.

    impl="triton" is differentiable once (MoCo needs no more): its backward scales the dL/dq
    computed in the forward, and differentiating that gradient again is an error. impl="auto" takes
    the reference where the kernel does not apply (C > 256, float64, mixed devices) and for
    float32 q outside autocast, where the reference's matmul is faster than the exact kernel.
    Under autocast, float32 q and k are cast to the autocast dtype first, as a matmul's are.
    The logits and the p-weighted queue sum run in q's dtype on the tensor cores
    (a float32 queue under bfloat16 autocast is rounded tile by tile as it is read), with float32
    accumulation, softmax state and loss; dL/dq comes back in q's dtype.
    """
    _check(q, k, queue)
    if not 0 < tau < math.inf:  # a temperature; the kernel scales the max, not every logit, by 1 / tau
        raise ValueError(f"info_nce: tau must be > 0 and finite, got {tau}")
    # auto keeps float32 q (outside autocast, which casts it below) on the reference: the kernel's
    # exact float32 dots run on the CUDA cores, 22x slower than the reference's cuBLAS on the H200
    # (11.3 ms against 0.51 ms at N 256, K 65536; bench/results/2026-11-26-h200-run5).
    cast = torch.is_autocast_enabled(q.device.type) and q.dtype == torch.float32
    tensor_cores = (torch.get_autocast_dtype(q.device.type) if cast else q.dtype) != torch.float32
    path = resolve_impl(impl, q.device.type, HAS_TRITON_KERNEL,
                        applies=_triton_applies(q, k, queue) and tensor_cores)
    if path == "torch":
        return info_nce_reference(q, k, queue, tau)
    if q.shape[1] > MAX_C:
        raise ValueError(f"info_nce(impl='triton'): C = {q.shape[1]} > {MAX_C}; use impl='torch'")
    if not all(t.dtype in FLOATS for t in (q, k, queue)):
        raise ValueError(f"info_nce(impl='triton'): q, k, queue must each be float32, float16 or bfloat16, "
                         f"got {q.dtype}, {k.dtype}, {queue.dtype}")
    if not (q.device == k.device == queue.device):
        raise ValueError(f"info_nce: q, k, queue on different devices ({q.device}, {k.device}, {queue.device})")
    dev = q.device.type
    if torch.is_autocast_enabled(dev):
        # Autocast runs a matmul in its low dtype, and this op is matmuls; but CUDA autocast runs
        # F.normalize's norm in float32, so unit-norm q and k arrive in float32 and would take the
        # exact-fp32 path (12.2 ms against 0.05 ms at N 256 on the H200). Cast them as autocast
        # casts a matmul's inputs; the float32 queue is rounded tile by tile in the kernel.
        low = torch.get_autocast_dtype(dev)
        q, k = (t.to(low) if t.dtype == torch.float32 else t for t in (q, k))
    need_grad = q.requires_grad and torch.is_grad_enabled()
    k, queue = k.detach(), queue.detach()
    # Eager calls launch from a plain autograd.Function; compiled code traces the registered op.
    # (The H200 run2 measured a plain Function at 1.62 ms per fwd+bwd against the op's 0.83:
    # its launches went through wrap_triton, which outside a registered op dispatches through
    # torch's higher-order op. Direct launches skip both; bench/gpu_bench.py's "host dispatch"
    # case times the paths side by side.)
    if direct_launch_ok(q, k, queue):
        return _InfoNCEDirect.apply(q, k, queue, float(tau), need_grad)
    loss, _ = torch.ops.fastsynth.info_nce_fused(q, k, queue, float(tau), need_grad)
    return loss


def _triton_applies(q, k, queue) -> bool:
    """What the kernel takes: C up to MAX_C, float32/float16/bfloat16, one device. An explicit
    impl="triton" outside this is an error; impl="auto" falls back to the reference."""
    return (q.shape[1] <= MAX_C and all(t.dtype in FLOATS for t in (q, k, queue))
            and q.device == k.device == queue.device)


def _check(q, k, queue):
    if q.dim() != 2 or k.shape != q.shape:
        raise ValueError(f"info_nce: q and k must both be N x C, got {tuple(q.shape)} and {tuple(k.shape)}")
    if queue.dim() != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"info_nce: queue must be K x C with C = {q.shape[1]}, got {tuple(queue.shape)}")
    if q.shape[0] == 0 or queue.shape[0] == 0:
        raise ValueError(f"info_nce: empty batch or queue (N = {q.shape[0]}, K = {queue.shape[0]})")
