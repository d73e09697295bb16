"""InfoNCE with a queue of negatives (METHOD.md Eq. 1, MoCo v2).

loss = mean_i [ logsumexp_j(l_ij) - l_i0 ],  l_i0 = q_i . k_i / tau,  l_ij = q_i . queue_j / tau.
Only q receives a gradient: in MoCo the keys come from the momentum encoder and the queue holds
past keys, both constants for the step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import resolve_impl

HAS_TRITON_KERNEL = False  # the fused kernel arrives with the Triton issue


def info_nce_reference(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float) -> torch.Tensor:
    """Plain PyTorch InfoNCE; q, k: N x C (unit norm), queue: K x C. Returns a float32 scalar.

    Memory traffic: reads q, k (2 N C) and queue (K C), materialises the N x (K + 1) logits
    (written and read again by cross_entropy); the fused kernel's job is to avoid that matrix.
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


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float, impl: str = "auto") -> torch.Tensor:
    """InfoNCE with queue (Eq. 1), mean over the batch, differentiable in q only."""
    if resolve_impl(impl, q.device.type, HAS_TRITON_KERNEL) == "torch":
        return info_nce_reference(q, k, queue, tau)
    raise AssertionError("unreachable: resolve_impl refuses triton without a kernel")


def _check(q, k, queue):
    if q.dim() != 2 or k.shape != q.shape:
        raise ValueError(f"info_nce: q and k must both be N x C, got {tuple(q.shape)} and {tuple(k.shape)}")
    if queue.dim() != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"info_nce: queue must be K x C with C = {q.shape[1]}, got {tuple(queue.shape)}")
