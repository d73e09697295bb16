"""MoCo v2 (METHOD.md Eq. 1): query encoder f, g; momentum key encoder f_k, g_k; FIFO queue Q.

Every method exposes the same calls the training step uses:
  ssl_loss(x1, x2) -> (L_C, ctx)      Eq. 1, ctx carries what the other terms reuse
  score_loss(z, ctx) -> L             Eq. 3's loss as a function of z = f(x), through g only
  score_nets                          the networks score_loss runs
  pair_loss(x_hat, x_tilde) -> L_Cp   Eq. 7
  after_step(ctx)                     state updates once the optimizer has stepped
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastsynth import dist, losses
from fastsynth.models import MoCoHead, build_encoder, momentum_copy, momentum_update


class MoCoV2(nn.Module):
    def __init__(self, arch: str = "resnet50", weights: str | None = None, dim: int = 128,
                 queue_size: int = 65536, momentum: float = 0.999, tau: float = 0.2,
                 kernel_impl: str = "torch", **_):
        super().__init__()
        self.encoder = build_encoder(arch, weights)
        self.head = MoCoHead(self.encoder.dim, dim)
        self.key_encoder = momentum_copy(self.encoder)
        self.key_head = momentum_copy(self.head)
        self.m, self.tau, self.kernel_impl = momentum, tau, kernel_impl
        # "shuffle": MoCo's shuffle-BN across ranks for the key encoder (a no-op in one process);
        # "sync"/"local": the key encoder's BatchNorm layers decide (SyncBN or per-rank).
        self.key_bn = "shuffle"
        # Random unit keys until real ones arrive, as in MoCo.
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @property
    def feat_dim(self) -> int:
        return self.encoder.dim

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """norm(g(z)): B x d -> B x dim, unit rows."""
        return F.normalize(self.head(z), dim=1)

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """k = norm(g_k(f_k(x))). f_k, g_k already hold the momentum update MoCo makes at the
        start of a step: after_step made it at the end of the previous one (see there)."""
        def net(v):
            return self.key_head(self.key_encoder(v))
        k = dist.shuffled_keys(net, x) if self.key_bn == "shuffle" else net(x)
        return F.normalize(k, dim=1)

    def ssl_loss(self, x1: torch.Tensor, x2: torch.Tensor):
        q = self.project(self.encoder(x1))
        k = self.keys(x2)
        return losses.info_nce(q, k, self.queue, self.tau, impl=self.kernel_impl), {"k": k}

    @property
    def score_nets(self) -> tuple[nn.Module, ...]:
        """The networks score_loss runs (whose BatchNorm statistics the Grad-CAM pass freezes)."""
        return (self.head,)

    def score_loss(self, z: torch.Tensor, ctx: dict) -> torch.Tensor:
        """Eq. 3: L = InfoNCE(norm(g(z)), k', Q) with k' the key of the same image's view."""
        return losses.info_nce(self.project(z), ctx["k"], self.queue, self.tau, impl=self.kernel_impl)

    def pair_loss(self, x_hat: torch.Tensor, x_tilde: torch.Tensor) -> torch.Tensor:
        """Eq. 7: NT-Xent over the 2B synthesized images, one encoder pass for both halves.

        With several ranks the negatives are the global batch's synthesized images (gathered,
        gradients returned to their rank); each rank averages over its own anchors.
        """
        e = self.project(self.encoder(torch.cat([x_hat, x_tilde], dim=0)))
        a, b = e.chunk(2, dim=0)
        if dist.world() == 1:
            return losses.nt_xent(a, b, self.tau)
        return losses.nt_xent(a, b, self.tau, dist.gather_with_grad(a), dist.gather_with_grad(b),
                              dist.row_offset(a.shape[0]))

    @torch.no_grad()
    def after_step(self, ctx: dict, ok: torch.Tensor | None = None) -> None:
        """ok: a device flag of a step the optimizer may have skipped (no host sync).

        The momentum update MoCo makes before the next step's keys is made here, once the
        optimizer has stepped: f_k, g_k are the same when the keys are computed (the first step
        finds f_k = f either way), but a skipped step now leaves them alone.
        """
        momentum_update(self.encoder, self.key_encoder, self.m, ok)
        momentum_update(self.head, self.key_head, self.m, ok)
        self.enqueue(dist.gather(ctx["k"]), ok)  # every rank enqueues the global batch's keys

    @torch.no_grad()
    def enqueue(self, k: torch.Tensor, ok: torch.Tensor | None = None) -> None:
        """FIFO: the newest keys overwrite the oldest, wrapping around the end of the queue.
        With `ok` False (a skipped step) the queue and its pointer stay as they are."""
        n, size = k.shape[0], self.queue.shape[0]
        if n > size:  # only the newest `size` keys survive anyway
            k, n = k[-size:], size
        # The pointer stays on the device: no host synchronisation in the training step.
        rows = (torch.arange(n, device=k.device) + self.queue_ptr) % size
        k = k.to(self.queue.dtype)
        if ok is not None:
            k = torch.where(ok, k, self.queue.index_select(0, rows))
        self.queue.index_copy_(0, rows, k)
        step = n if ok is None else ok.long() * n
        self.queue_ptr.copy_((self.queue_ptr + step) % size)

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        return [{"params": list(self.encoder.parameters()) + list(self.head.parameters()),
                 "lr": lr, "weight_decay": weight_decay}]
