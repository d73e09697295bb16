"""Heads g (projection) and h (SimSiam predictor)."""
from __future__ import annotations

from torch import nn


class MoCoHead(nn.Module):
    """MoCo v2 projection MLP: d -> d -> out_dim (128 in the paper), ReLU between."""

    def __init__(self, in_dim: int, out_dim: int = 128, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or in_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, out_dim))

    def forward(self, z):
        return self.net(z)


class SimSiamProjector(nn.Module):
    """SimSiam projection MLP: three linear layers with BN, the last BN without affine."""

    def __init__(self, in_dim: int, out_dim: int = 2048):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim), nn.ReLU(inplace=True),
            nn.Linear(out_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim), nn.ReLU(inplace=True),
            nn.Linear(out_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim, affine=False))

    def forward(self, z):
        return self.net(z)


class SimSiamPredictor(nn.Module):
    """SimSiam predictor h: out_dim -> out_dim / 4 -> out_dim (bottleneck)."""

    def __init__(self, dim: int = 2048, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or max(dim // 4, 1)
        self.net = nn.Sequential(nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                                 nn.ReLU(inplace=True), nn.Linear(hidden_dim, dim))

    def forward(self, p):
        return self.net(p)
