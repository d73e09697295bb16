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
def momentum_update(online: nn.Module, target: nn.Module, m: float) -> None:
    """theta_k <- m theta_k + (1 - m) theta_q, over parameters (buffers keep their own stats)."""
    qs = [p.detach() for p in online.parameters()]
    ks = list(target.parameters())
    torch._foreach_lerp_(ks, qs, 1.0 - m)
