"""Image transforms: METHOD.md's SSL augmentations, the plain view, evaluation transforms.

Images are normalised with ImageNet statistics (what `--weights` ImageNet trunks expect); the
decoder works in that same normalised space.
"""
from __future__ import annotations

import torch
from torchvision import transforms as T

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _normalize():
    return [T.ToTensor(), T.Normalize(MEAN, STD)]


def augment(image_size: int) -> T.Compose:
    """MoCo v2's view: RandomResizedCrop, colour jitter, grayscale, Gaussian blur, flip."""
    k = max(3, int(0.1 * image_size) // 2 * 2 + 1)  # odd kernel about 10 % of the side
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(k, sigma=(0.1, 2.0))], p=0.5),
        T.RandomHorizontalFlip(),
        *_normalize(),
    ])


def plain(image_size: int) -> T.Compose:
    """The decoder's target x: resize only (METHOD.md notation)."""
    return T.Compose([T.Resize((image_size, image_size)), *_normalize()])


def evaluation(image_size: int) -> T.Compose:
    """Resize to 256/224 of the size, centre crop: the linear-probe and retrieval test view."""
    return T.Compose([T.Resize(int(round(image_size * 256 / 224))), T.CenterCrop(image_size), *_normalize()])


def probe_train(image_size: int) -> T.Compose:
    """RandomResizedCrop + flip: the paper's linear-probe training view."""
    return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), *_normalize()])


class SSLViews:
    """PIL image -> (x1, x2, x): two augmented views and the plain view."""

    def __init__(self, image_size: int):
        self.aug, self.plain = augment(image_size), plain(image_size)

    def __call__(self, img):
        return self.aug(img), self.aug(img), self.plain(img)


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Normalised B x 3 x H x W -> [0, 1] for figures."""
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x.float() * std + mean).clamp(0, 1)
