"""Figures: image / reconstruction / perturbed reconstruction triplets (paper Fig. 4)."""
from __future__ import annotations

import torch
from torchvision.utils import save_image

from fastsynth.data.transforms import denormalize


def save_triplets(x: torch.Tensor, x_hat: torch.Tensor, x_tilde: torch.Tensor, path: str, n: int = 8) -> None:
    """Three rows: plain images x, reconstructions D(z), perturbed reconstructions D(z_tilde)."""
    n = min(n, x.shape[0])
    rows = [denormalize(t[:n].detach().cpu()) for t in (x, x_hat, x_tilde)]
    save_image(torch.cat(rows, dim=0), path, nrow=n, padding=2)
