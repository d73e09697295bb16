"""Encoder f: a torchvision ResNet trunk, global-average-pooled, classifier removed.

Weights are never downloaded: the paper's ImageNet initialisation comes from a local state dict
(`--weights PATH`), since machines running this may have no route to a weight hub.
"""
from __future__ import annotations

import os

import torch
from torch import nn
import torchvision

ARCHS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}  # arch -> d


class Encoder(nn.Module):
    """x: B x 3 x H x W -> z: B x d (post-ReLU, average pooled)."""

    def __init__(self, arch: str = "resnet50"):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHS)}")
        net = getattr(torchvision.models, arch)(weights=None)
        net.fc = nn.Identity()
        self.net = net
        self.arch = arch
        self.dim = ARCHS[arch]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def last_conv(self) -> nn.Module:
        """The last convolutional stage, for Grad-CAM attention maps (Fig. 3)."""
        return self.net.layer4


def build_encoder(arch: str, weights: str | None = None) -> Encoder:
    enc = Encoder(arch)
    if weights:
        load_weights(enc, weights)
    return enc


def load_weights(enc: Encoder, path: str) -> None:
    """Load a torchvision-style ResNet state dict (fc.* ignored) from a local file.

    Accepts a plain state dict or one nested under "state_dict"/"model", with or without a
    "module." or "net." prefix. Loaded with weights_only=True: a weight file never runs code.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--weights {path}: no such file (weights are read from disk, never downloaded)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the same user error
        raise ValueError(f"--weights {path}: not a readable PyTorch state dict ({type(e).__name__}: {e})") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"--weights {path}: expected a state dict, got {type(sd).__name__}")
    clean = {}
    for k, v in sd.items():
        for prefix in ("module.", "net.", "encoder."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if not k.startswith("fc."):
            clean[k] = v
    try:
        missing, unexpected = enc.net.load_state_dict(clean, strict=False)
    except RuntimeError as e:  # shape mismatches: another architecture's weights
        raise ValueError(f"--weights {path}: does not match {enc.arch}: {' '.join(str(e).split())[:300]}") from None
    if missing or unexpected:
        raise ValueError(f"--weights {path}: does not match {enc.arch}: "
                         f"{len(missing)} missing keys (e.g. {missing[:3]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
