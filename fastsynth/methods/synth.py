"""The paper's synthesized pairs (METHOD.md Eq. 2-7, Sec. 3.4-3.5).

From z = f(x) of the plain image: reconstruct x_hat = D(z) (Eq. 2), score each feature dimension
by Grad-CAM through the head (Eq. 3), find low-variance dimensions in the FIFO bank (Sec. 3.4),
perturb the non-discriminative ones (Eq. 4-6) into z_tilde, decode x_tilde = D(z_tilde), and
contrast the two synthesized images (Eq. 7).
"""
from __future__ import annotations

import torch
from torch import nn

from fastsynth import dist, losses
from fastsynth.kernels import FeatureBank, dual_noise
from fastsynth.models import Decoder, frozen_bn_stats

NOISES = ("both", "gradcam", "lowvar", "random", "none")


class SynthPairs(nn.Module):
    def __init__(self, feat_dim: int, image_size: int, noise: str = "both", score: str = "grad_x_act",
                 sigma_g: float = 1.0, sigma_v: float = 1.0, lam: float = 0.02, bank_size: int = 4096,
                 decoder_width: int = 256, kernel_impl: str = "torch"):
        super().__init__()
        if noise not in NOISES:
            raise ValueError(f"noise {noise!r}: choose one of {', '.join(NOISES)}")
        self.decoder = Decoder(feat_dim, image_size, width=decoder_width)
        self.bank = FeatureBank(bank_size, feat_dim, impl=kernel_impl)
        self.noise, self.score = noise, score
        self.sigma_g, self.sigma_v, self.lam = sigma_g, sigma_v, lam
        self.kernel_impl = kernel_impl

    def scores(self, method: nn.Module, z: torch.Tensor, ctx: dict) -> torch.Tensor:
        """Eq. 3: dL/dz through the head only (z is a leaf cut from the encoder), then s.

        The leaf is float32 so that under float16 autocast the small, unscaled gradient
        (about 1 / (tau B)) does not underflow to an all-zero score row.
        """
        with torch.enable_grad(), frozen_bn_stats(*method.score_nets):
            zl = z.detach().float().requires_grad_(True)
            (grad,) = torch.autograd.grad(method.score_loss(zl, ctx), zl)
        return losses.gradcam_scores(zl.detach(), grad, self.score)

    def perturb(self, method: nn.Module, z: torch.Tensor, ctx: dict, seed: int) -> torch.Tensor:
        """z_tilde = z + eps_g + eps_v (Sec. 3.5) for the chosen ablation.

        The bank takes this batch first, so v_bar covers the newest features too (and exists on
        the very first step). `random` is i.i.d. N(0, sigma_g^2) on every dim: an all-zero score
        row min-max-normalises to 0, so eps_g is full-strength everywhere.
        """
        z = z.detach()
        self.bank.update(dist.gather(z))  # the global batch: v_bar is the same on every rank
        v_bar = losses.normalized_variance(self.bank.variance().to(z.device))
        zeros = torch.zeros_like(z)
        if self.noise == "both":
            return dual_noise(z, self.scores(method, z, ctx), v_bar, self.sigma_g, self.sigma_v, self.lam,
                              seed, impl=self.kernel_impl)
        if self.noise == "gradcam":
            return dual_noise(z, self.scores(method, z, ctx), v_bar, self.sigma_g, 0.0, self.lam, seed,
                              impl=self.kernel_impl)
        if self.noise == "lowvar":
            return dual_noise(z, zeros, v_bar, 0.0, self.sigma_v, self.lam, seed, impl=self.kernel_impl)
        return dual_noise(z, zeros, v_bar, self.sigma_g, 0.0, self.lam, seed, impl=self.kernel_impl)  # random

    def forward(self, method: nn.Module, z: torch.Tensor, x: torch.Tensor, ctx: dict, seed: int) -> dict:
        """Returns {"l_r", "l_cp", "x_hat", "x_tilde"} for Eq. 8; l_cp is None for noise=none."""
        x_rec = self.decoder(z)
        out = {"l_r": losses.reconstruction_loss(x, x_rec), "l_cp": None,
               "x_hat": x_rec.detach(), "x_tilde": None}
        if self.noise == "none":
            return out
        z_tilde = self.perturb(method, z, ctx, seed)
        with torch.no_grad(), frozen_bn_stats(self.decoder):  # Sec. 3.5: detached inputs
            out["x_tilde"] = self.decoder(z_tilde)
        out["l_cp"] = method.pair_loss(out["x_hat"], out["x_tilde"])
        return out
