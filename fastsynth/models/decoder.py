"""Decoder D: feature vector z (d) -> image (3 x S x S) in the encoder's normalised input space.

Output stays in normalised space (no sigmoid) so x_hat and x_tilde go straight back into the
encoder and Eq. 2 compares like with like.
"""
from __future__ import annotations

import torch
from torch import nn


def _plan(size: int) -> tuple[int, int]:
    """(start side, number of x2 upsampling stages) with start in [3, 7] where possible."""
    if size % 8 != 0 or size < 16:
        raise ValueError(f"decoder: image size must be a multiple of 8 and >= 16, got {size}")
    n = 0
    while size % (2 ** (n + 1)) == 0 and size // 2 ** (n + 1) >= 3 and n < 6:
        n += 1
    return size // 2 ** n, n


class Decoder(nn.Module):
    def __init__(self, in_dim: int, image_size: int, width: int = 256, min_width: int = 16):
        super().__init__()
        self.image_size = image_size
        start, stages = _plan(image_size)
        self.start, self.width = start, width
        self.fc = nn.Linear(in_dim, width * start * start)
        layers, c = [], width
        for _ in range(stages):
            c_out = max(c // 2, min_width)
            # A stride-2 transposed conv costs 4 c c_out MACs per output pixel against 9 for
            # upsample + 3x3 conv; the full-resolution stages dominate the decoder's time.
            layers += [nn.ConvTranspose2d(c, c_out, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c = c_out
        layers += [nn.Conv2d(c, 3, 3, padding=1)]
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(z.shape[0], self.width, self.start, self.start)
        return self.body(torch.relu(h))
