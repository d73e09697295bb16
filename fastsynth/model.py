"""The whole trainable model: one SSL method plus, when on, the synthesized-pairs branch.

It owns every piece of state (encoders, heads, decoder, queue, bank) so one state_dict
checkpoints the run.
"""
from __future__ import annotations

import torch
from torch import nn

from fastsynth import losses
from fastsynth.config import Config
from fastsynth.guard import RunningStats
from fastsynth.methods import METHODS, SynthPairs


class SynthSSL(nn.Module):
    def __init__(self, cfg: Config, kernel_impl: str | None = None):
        """kernel_impl overrides the kernels' `impl=` choice that cfg.impl implies (tests, benchmarks)."""
        super().__init__()
        # reference: plain PyTorch ops; fast: Triton kernels on CUDA tensors, references elsewhere.
        if kernel_impl is None:
            kernel_impl = "torch" if cfg.impl == "reference" else "auto"
        if cfg.method not in METHODS:
            raise ValueError(f"method {cfg.method!r}: choose one of {', '.join(METHODS)}")
        dim = cfg.moco_dim if cfg.method == "mocov2" else cfg.simsiam_dim
        self.method = METHODS[cfg.method](arch=cfg.arch, weights=cfg.weights, dim=dim,
                                          queue_size=cfg.queue_size, momentum=cfg.moco_momentum,
                                          tau=cfg.tau, kernel_impl=kernel_impl)
        self.synth = None
        if cfg.synth == "on":
            self.synth = SynthPairs(self.method.feat_dim, cfg.image_size, noise=cfg.noise, score=cfg.score,
                                    sigma_g=cfg.sigma_g, sigma_v=cfg.sigma_v, lam=cfg.lam,
                                    bank_size=cfg.bank_size, decoder_width=cfg.decoder_width,
                                    kernel_impl=kernel_impl)
        self.alpha, self.nu = cfg.alpha, cfg.nu

    @property
    def encoder(self) -> nn.Module:
        return self.method.encoder

    def running_stats(self) -> RunningStats:
        """The BatchNorm statistics a skipped training step puts back, found at the first call:
        after any SyncBatchNorm conversion (which replaces the modules) and compilation."""
        if self.__dict__.get("_running_stats") is None:
            self.__dict__["_running_stats"] = RunningStats(self)
        return self.__dict__["_running_stats"]

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, x: torch.Tensor | None, seed: int):
        """One training step's losses. Returns (L of Eq. 8, {term: value}, ctx, synth outputs)."""
        l_c, ctx = self.method.ssl_loss(x1, x2)
        parts = {"l_c": l_c}
        if self.synth is None:
            return l_c, parts, ctx, None
        out = self.synth(self.method, self.method.encoder(x), x, ctx, seed)
        parts["l_r"] = out["l_r"]
        l_cp = out["l_cp"] if out["l_cp"] is not None else torch.zeros((), device=l_c.device)
        parts["l_cp"] = l_cp
        return losses.total_loss(l_c, out["l_r"], l_cp, self.alpha, self.nu), parts, ctx, out
