"""Grad-CAM attention of the encoder's last convolutional stage, driven by the SSL loss (the
paper's Fig. 3): where does the self-supervised objective look?

MoCo v2: InfoNCE (Eq. 1) of q = g(f(x)) against the momentum encoder's key of the same image and
the queue. SimSiam: the negative cosine of p(x) with the stop-gradient z(x). Channel weights are
the spatial means of -dL/dA (the direction that lowers the loss), as Grad-CAM takes the class
score's gradient; BatchNorm uses its running statistics, nothing is updated. The maps have the
last stage's resolution (image size / 32: 2 x 2 at the quick preset's 64 px, 7 x 7 at 224), and a
map is all zero where no channel's weighted activation lowers the loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastsynth import losses


def ssl_gradcam(model, x: torch.Tensor) -> torch.Tensor:
    """B x H x W maps in [0, 1] (each normalised by its own maximum) for images x: B x 3 x H x W."""
    method = model.method
    acts = {}
    hook = method.encoder.last_conv().register_forward_hook(lambda m, i, o: acts.__setitem__("a", o))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            f = method.encoder(x)
            if hasattr(method, "queue"):
                with torch.no_grad():
                    k = F.normalize(method.key_head(method.key_encoder(x)), dim=1)
                loss = losses.info_nce(method.project(f), k, method.queue, method.tau, impl="torch")
            else:
                z = method.head(f)
                loss = -F.cosine_similarity(method.predictor(z), z.detach(), dim=1).mean()
            (grad,) = torch.autograd.grad(loss, acts["a"])
    finally:
        hook.remove()
        model.train(was_training)
    a = acts["a"].detach()
    weights = (-grad).mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * a).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    return cam / peak


def save_attention(images: torch.Tensor, cams: dict, path: str) -> None:
    """Rows: the images, then one row of Grad-CAM overlays per model (name -> B x H x W)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastsynth.data.transforms import denormalize
    imgs = denormalize(images.cpu()).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    n, rows = imgs.shape[0], 1 + len(cams)
    fig, axes = plt.subplots(rows, n, figsize=(1.6 * n, 1.7 * rows), squeeze=False)
    for j in range(n):
        axes[0, j].imshow(imgs[j])
        for i, (name, cam) in enumerate(cams.items(), start=1):
            axes[i, j].imshow(imgs[j])
            axes[i, j].imshow(cam[j].cpu().numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
            if j == 0:
                axes[i, j].set_ylabel(name, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    axes[0, 0].set_ylabel("image", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
