"""The method's losses as pure functions, one per equation of METHOD.md.

Shapes: B batch, C embedding dim, d encoder feature dim, K queue length.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastsynth.kernels import info_nce as _info_nce


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float, impl: str = "auto") -> torch.Tensor:
    """Eq. 1 (MoCo v2): q, k: B x C unit norm, queue: K x C. Mean loss, gradient to q only."""
    return _info_nce(q, k, queue, tau, impl=impl)


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Eq. 1, SimSiam variant: -1/2 (cos(p1, sg(z2)) + cos(p2, sg(z1))). All B x C."""
    return -0.5 * (F.cosine_similarity(p1.float(), z2.detach().float(), dim=1).mean()
                   + F.cosine_similarity(p2.float(), z1.detach().float(), dim=1).mean())


def reconstruction_loss(x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
    """Eq. 2: mean((x - D(f(x)))^2) over every pixel of the plain image; x, x_rec: B x 3 x H x W."""
    return F.mse_loss(x_rec.float(), x.float())


def gradcam_scores(z: torch.Tensor, dl_dz: torch.Tensor, mode: str = "grad_x_act") -> torch.Tensor:
    """Eq. 3: s = ReLU(-z * dL/dz) ("grad_x_act", default) or s = ReLU(-dL/dz) ("grad").

    A dimension whose increase lowers the self-supervised loss (negative gradient) on an active
    feature is one the loss relies on: it scores high and is spared from the noise of Eq. 5.
    """
    if mode == "grad_x_act":
        return F.relu(-z * dl_dz)
    if mode == "grad":
        return F.relu(-dl_dz)
    raise ValueError(f"score mode {mode!r}: choose grad_x_act or grad")


def normalized_variance(v: torch.Tensor) -> torch.Tensor:
    """Sec. 3.4: v_bar = v / ||v||_2 over the d dims (a zero vector stays zero)."""
    return v / v.norm().clamp_min(torch.finfo(v.dtype).tiny)


def nt_xent(a: torch.Tensor, b: torch.Tensor, tau: float, a_all: torch.Tensor | None = None,
            b_all: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """Eq. 7 (MoCo variant): NT-Xent over the 2N synthesized embeddings.

    a = norm(g(f(x_hat))), b = norm(g(f(x_tilde))), both B x C unit norm. Positives are the pairs
    (a_i, b_i); negatives every other synthesized embedding of the batch (2N - 2 per anchor).
    Mean over the 2B anchors of a and b.

    Several ranks: a_all, b_all (N x C) are the global batch, of which a, b are rows
    offset .. offset + B; the anchors are the local rows, the candidates all 2N. The mean of the
    ranks' losses is then the single-process loss over the global batch.
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"nt_xent: a and b must both be B x C, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a_all is None:
        a_all, b_all, offset = a, b, 0
    n, big_n = a.shape[0], a_all.shape[0]
    anchors = torch.cat([a, b], dim=0).float()                       # 2B x C
    candidates = torch.cat([a_all, b_all], dim=0).float()            # 2N x C
    with torch.autocast(a.device.type, enabled=False):  # logits / tau in float32 even under --amp
        sim = anchors @ candidates.t() / tau                         # 2B x 2N
    rows = torch.arange(n, device=a.device) + offset
    own = torch.cat([rows, rows + big_n])                            # each anchor's own column
    target = torch.cat([rows + big_n, rows])                         # its positive's column
    self_mask = torch.zeros(sim.shape, dtype=torch.bool, device=a.device)
    self_mask[torch.arange(2 * n, device=a.device), own] = True
    sim = sim.masked_fill(self_mask, float("-inf"))
    return F.cross_entropy(sim, target)


def total_loss(l_c: torch.Tensor, l_r: torch.Tensor | float, l_cp: torch.Tensor | float,
               alpha: float, nu: float) -> torch.Tensor:
    """Eq. 8: L = L_C + alpha L_R + nu L_Cp."""
    return l_c + alpha * l_r + nu * l_cp
