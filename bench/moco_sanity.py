"""Does MoCo v2 (fastsynth's step, --synth off) learn at all when the task is easy? A developer
check behind bench/results/2026-11-26-quick-vs-random: 256 random colour images, two views that
differ only by additive noise, ResNet-18 at 32 px. The InfoNCE loss must fall well below its
ceiling ln(K + 1) within 50 steps; on the synthetic set at the quick budget it does not.

    python bench/moco_sanity.py
"""
import math

import torch

from fastsynth.config import Config
from fastsynth.model import SynthSSL


def main(steps: int = 60, batch: int = 32, queue: int = 256) -> None:
    torch.manual_seed(0)
    cfg = Config(arch="resnet18", image_size=32, batch_size=batch, queue_size=queue, moco_momentum=0.99,
                 synth="off").validate()
    model = SynthSSL(cfg).train()
    opt = torch.optim.SGD(model.method.param_groups(0.1, 1e-4), lr=0.1, momentum=0.9)
    # per-image colour and contrast, so images differ in more than their noise
    data = torch.randn(256, 3, 32, 32) * torch.rand(256, 3, 1, 1) * 2 + torch.randn(256, 3, 1, 1)
    for step in range(steps):
        x = data[torch.randint(0, len(data), (batch,))]
        x1, x2 = x + 0.3 * torch.randn_like(x), x + 0.3 * torch.randn_like(x)
        loss, _, ctx, _ = model(x1, x2, None, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.method.after_step(ctx)
        if step % 10 == 0:
            print(f"step {step}: InfoNCE {loss.item():.3f}   ceiling ln(K + 1) = {math.log(queue + 1):.3f}")


if __name__ == "__main__":
    main()
