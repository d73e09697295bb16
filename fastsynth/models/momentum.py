"""Momentum (EMA) copy of a network, as MoCo's key encoder f_k, g_k."""
from __future__ import annotations

import copy

import torch
from torch import nn


def momentum_copy(net: nn.Module) -> nn.Module:
    """A frozen deep copy: its weights move only through momentum_update."""
    k = copy.deepcopy(net)
    for p in k.parameters():
        p.requires_grad_(False)
    return k


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, m: float, ok: torch.Tensor | None = None) -> None:
    """theta_k <- m theta_k + (1 - m) theta_q, over parameters (buffers keep their own stats).

    ok: a 0-dim bool device flag of a step the optimizer may have skipped; False leaves theta_k
    as it is (exactly, for finite weights, up to the sign of a zero), with no host sync: a 0-dim
    tensor given to lerp as a Scalar would be read back, so the weight goes through multiplies
    that take a tensor (three passes and a temporary, against lerp's one pass).
    """
    qs = [p.detach() for p in online.parameters()]
    ks = list(target.parameters())
    if ok is None:
        torch._foreach_lerp_(ks, qs, 1.0 - m)
        return
    w = ok.to(ks[0].dtype) * (1.0 - m)
    torch._foreach_mul_(ks, 1.0 - w)
    torch._foreach_add_(ks, torch._foreach_mul(qs, w))
