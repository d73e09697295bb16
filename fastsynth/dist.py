"""torch.distributed for fastsynth: the process group torchrun describes, and the few collectives
the method needs so that W processes of batch B train like one process of batch W B.

Launch with torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); a plain
`python -m fastsynth.train` is one process and every function here is then a no-op. NCCL on
GPUs, gloo on CPUs. Gathers concatenate in rank order, so row r * B + i of a gathered batch is
row i of rank r: the same order a single process with the global batch would see.
"""
from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

_CONTROL = None  # a gloo group for host-side flags (stop requests) that must not touch the GPU stream


_LOCAL = False  # inside local(): this process acts alone


def world() -> int:
    if _LOCAL:
        return 1
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    if _LOCAL:
        return 0
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@contextlib.contextmanager
def local():
    """Run a block as if this process were alone (world() 1, rank() 0): every collective in the
    package goes through world(), so none is issued inside. For per-process diagnostics that may
    fail on one rank only (the FLOP count): a failure there cannot leave the other ranks waiting
    in a collective. Nothing inside may print, write files or need the global batch."""
    global _LOCAL
    saved, _LOCAL = _LOCAL, True
    try:
        yield
    finally:
        _LOCAL = saved


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """True when torchrun (or another launcher following its convention) started W > 1 processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device, timeout_min: float = 30.0) -> torch.device:
    """Join the process group torchrun describes; returns this process's device.

    `device` is the one the config resolved: a CUDA device becomes cuda:LOCAL_RANK (one GPU per
    process). A collective that waits longer than `timeout_min` (a rank died or hangs) raises
    instead of hanging the job forever.
    """
    global _CONTROL
    if not launched() or dist.is_initialized():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are visible: "
                               "start at most one process per GPU (torchrun --nproc_per_node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(minutes=timeout_min)
    kw = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, timeout=timeout, **kw)
    _CONTROL = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    return device


def shutdown() -> None:
    global _CONTROL
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CONTROL = None


def barrier() -> None:
    if world() > 1:
        dist.barrier(group=_CONTROL)


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (generating the synthetic set, scanning files into the
    cache); the other ranks run it afterwards and find the work done."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on one: all ranks stop at the same step boundary.

    Runs on the gloo control group with a CPU tensor, so it costs a host round trip but never
    synchronises the GPU stream.
    """
    if world() == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, group=_CONTROL)
    return bool(t.item())


def max_over_ranks(value: int) -> int:
    """The largest of the ranks' values, on every rank (the gloo control group: host only)."""
    if world() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_CONTROL)
    return int(t.item())


def any_rank_device(flag: torch.Tensor) -> torch.Tensor:
    """any_rank for a 0-dim bool tensor on the device, without a host synchronisation."""
    if world() == 1:
        return flag
    t = flag.to(torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.bool()


def broadcast_object(obj):
    """Rank 0's value of a picklable object on every rank (e.g. the run folder's name)."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_CONTROL)
    return box[0]


def gather_objects(obj) -> list:
    """[rank 0's obj, rank 1's obj, ...] on every rank."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj, group=_CONTROL)
    return out


@torch.no_grad()
def gather(t: torch.Tensor) -> torch.Tensor:
    """Rank-ordered concatenation of every rank's t (same shape on all), without gradient:
    MoCo keys for the queue, features for the bank."""
    if world() == 1:
        return t
    # Send and receive in one layout: empty_like would keep a channels-last batch's layout for the
    # receive buffers while the send buffer is made contiguous, and a collective that copies raw
    # bytes (NCCL's all_gather has had layout-dependent behaviour, pytorch#163483) would then
    # scramble the images. The result gets the input's layout back (shuffle-BN's key batch).
    parts = [torch.empty_like(t, memory_format=torch.contiguous_format) for _ in range(world())]
    dist.all_gather(parts, t.contiguous())
    out = torch.cat(parts)
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each rank the summed gradient of its own rows.

    Every rank's loss may depend on every rank's rows (Eq. 7's negatives); the rows' owner must
    receive the gradient from all of them. An all_reduce and a slice do that on NCCL and gloo
    alike (gloo has no reduce_scatter).
    """

    @staticmethod
    def forward(ctx, t):
        ctx.rows = t.shape[0]
        parts = [torch.empty_like(t, memory_format=torch.contiguous_format) for _ in range(world())]  # see gather
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)  # never reduce autograd's buffer in place
        dist.all_reduce(grad)
        r = rank()
        return grad[r * ctx.rows:(r + 1) * ctx.rows]


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradients over ranks too (every rank's loss
    depends on the sum, so each input's gradient is the sum of all ranks' gradients)."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over the ranks, without a gradient: logged figures of the whole global
    batch. A collective: every rank calls it at the same point."""
    if world() == 1:
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    return t if world() == 1 else _AllReduceSum.apply(t)


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    return t if world() == 1 else _GatherWithGrad.apply(t)


def row_offset(rows: int) -> int:
    """Where this rank's rows start in a gathered batch."""
    return rank() * rows


@torch.no_grad()
def shuffled_keys(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MoCo's shuffle-BN: run the key encoder on a random rank-to-rank permutation of the global
    batch, so its BatchNorm statistics come from other ranks' images and the query cannot match
    its key through batch statistics; return each rank its own rows, unshuffled.

    The permutation is drawn on rank 0 and broadcast, so every rank agrees on it.
    """
    if world() == 1:
        return net(x)
    b = x.shape[0]
    x_all = gather(x)
    perm = torch.randperm(x_all.shape[0], device=x.device) if is_main() else torch.empty(
        x_all.shape[0], dtype=torch.long, device=x.device)
    dist.broadcast(perm, src=0)
    r = rank()
    k_shuffled = gather(net(x_all[perm[r * b:(r + 1) * b]]))  # row j is image perm[j]
    k_all = torch.empty_like(k_shuffled)
    k_all[perm] = k_shuffled                                   # unshuffle
    return k_all[r * b:(r + 1) * b]


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of every rank, on CPU (gloo) as well as GPU.

    torch's SyncBatchNorm refuses CPU tensors; the CPU test that proves W ranks equal one
    process needs the global statistics too. The per-channel sum, sum of squares and count are
    all-reduced with autograd (all_reduce_sum), so gradients see the global statistics as well. On CUDA, train.py uses torch's fused SyncBatchNorm instead.
    """

    own_math = False  # tests: the same arithmetic in one process

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects N x C x ..., got {x.dim()} dims")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or (world() == 1 and not self.own_math):
            return super().forward(x)
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        # Sums in float64: E[x^2] - E[x]^2 cancels badly in float32 when |mean| >> std.
        xd = x.double()
        count = torch.full((1,), x.numel() // c, dtype=torch.float64, device=x.device)
        stats = all_reduce_sum(torch.cat([xd.sum(dims), (xd * xd).sum(dims), count]))
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        xf = x.float()
        mean, var = mean.float(), var.float()
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                # momentum None: a cumulative average, as nn.BatchNorm does
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * (n / (n - 1).clamp_min(1))
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of `module` normalised over the global batch (--bn sync)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats).to(device)
            # The same Parameter and buffer objects: requires_grad (frozen in the key encoder),
            # optimizer references and values all carry over.
            for pname, param in child.named_parameters(recurse=False):
                setattr(new, pname, param)
            for bname, buf in child.named_buffers(recurse=False):
                setattr(new, bname, buf)
            new.train(child.training)
            setattr(module, name, new)
        else:
            sync_batchnorm(child, device)
    return module


def ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel that does not re-broadcast buffers before every forward.

    The queue and the bank stay identical on every rank by construction (each adds the same
    gathered rows); re-sending them each step would cost their full size in traffic. torch >= 2.14
    names the switch forward_sync_buffers and still synchronises buffers once at construction;
    older versions (broadcast_buffers=False) skip that too, which is harmless here: every rank
    builds the model from the same seed and resumes from the same checkpoint.
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP
    kw = {"device_ids": [device.index]} if device.type == "cuda" else {}
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        kw["forward_sync_buffers"] = False
    else:
        kw["broadcast_buffers"] = False
    return DDP(module, **kw)


def describe() -> str:
    if world() == 1:
        return "1 process"
    backend = dist.get_backend()
    return f"{world()} processes ({backend}), rank {rank()}"
