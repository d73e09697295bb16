"""SimSiam (METHOD.md Eq. 1, SimSiam variant): encoder f, projector g, predictor h, stop-gradient.

Same four calls as MoCoV2 (see its module docstring); SimSiam has no queue or key encoder.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastsynth import losses
from fastsynth.models import SimSiamPredictor, SimSiamProjector, build_encoder


class SimSiam(nn.Module):
    def __init__(self, arch: str = "resnet50", weights: str | None = None, dim: int = 2048, **_):
        super().__init__()
        self.encoder = build_encoder(arch, weights)
        self.head = SimSiamProjector(self.encoder.dim, dim)
        self.predictor = SimSiamPredictor(dim)

    @property
    def feat_dim(self) -> int:
        return self.encoder.dim

    def _pair(self, a: torch.Tensor, b: torch.Tensor):
        # One pass per view, as SimSiam does: each view normalised by its own batch statistics.
        z1, z2 = self.head(self.encoder(a)), self.head(self.encoder(b))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return losses.simsiam_loss(p1, p2, z1, z2), z2

    def ssl_loss(self, x1: torch.Tensor, x2: torch.Tensor):
        loss, z2 = self._pair(x1, x2)
        return loss, {"target": z2.detach()}

    @property
    def score_nets(self) -> tuple[nn.Module, ...]:
        """The networks score_loss runs (whose BatchNorm statistics the Grad-CAM pass freezes)."""
        return (self.head, self.predictor)

    def score_loss(self, z: torch.Tensor, ctx: dict) -> torch.Tensor:
        """Eq. 3, SimSiam variant: L = -cos(h(g(z)), sg(g(f(x2)))) with x2 a view of the same image."""
        p = self.predictor(self.head(z))
        return -F.cosine_similarity(p.float(), ctx["target"].float(), dim=1).mean()

    def pair_loss(self, x_hat: torch.Tensor, x_tilde: torch.Tensor) -> torch.Tensor:
        """Eq. 7, SimSiam variant: the symmetric SimSiam loss on (x_hat, x_tilde)."""
        return self._pair(x_hat, x_tilde)[0]

    def after_step(self, ctx: dict, ok: torch.Tensor | None = None) -> None:
        pass

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        # SimSiam keeps the predictor's lr constant (fix_lr: the scheduler skips the group).
        return [{"params": list(self.encoder.parameters()) + list(self.head.parameters()),
                 "lr": lr, "weight_decay": weight_decay},
                {"params": list(self.predictor.parameters()), "lr": lr, "weight_decay": weight_decay,
                 "fix_lr": True}]
