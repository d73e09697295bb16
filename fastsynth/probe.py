"""The paper's linear protocol (METHOD.md, "Evaluation protocols"), trained on augmented crops.

`--probe cached` (the default) trains the linear layer on features extracted once from the
evaluation view: seconds, and what the tables report unless asked otherwise. `--probe paper`
follows the paper: frozen encoder, RandomResizedCrop + flip every epoch, SGD lr 30, momentum
0.9, no weight decay, batch 128, 100 epochs; one encoder pass over the labelled images per
epoch, so hours on a real dataset.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastsynth.data.base import ImageList
from fastsynth.data.loaders import make_loader
from fastsynth.data.transforms import probe_train
from fastsynth.progress import tqdm

PAPER_LR = 30.0
PAPER_BATCH = 128


def paper_probe(encoder: torch.nn.Module, train: ImageList, test_features: torch.Tensor,
                test_labels: torch.Tensor, *, image_size: int, epochs: int, num_classes: int,
                device: torch.device, lr: float = PAPER_LR, seed: int = 0, workers: int = 0) -> dict:
    """{'top1', 'top5'} of a linear layer trained on the frozen encoder's augmented-crop features
    (cosine lr decay per step, zero-initialised weights); test features come from the caller
    (resize + centre crop)."""
    loader = make_loader(train, probe_train(image_size), min(PAPER_BATCH, len(train)), shuffle=True,
                         drop_last=False, workers=workers, seed=seed)
    head = torch.nn.Linear(test_features.shape[1], num_classes).to(device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    was_training = encoder.training
    encoder.eval()
    total, step = epochs * len(loader), 0
    for _ in tqdm(range(epochs), desc="linear probe (paper)", leave=False):
        for x, y, _ in loader:
            # Eagerly, as extract_features: each label fraction's last batch has its own size,
            # a graph each for an encoder compiled with static shapes for training.
            with torch.no_grad(), torch.compiler.set_stance("force_eager"):
                f = encoder(x.to(device, non_blocking=True)).float()
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(head(f), torch.as_tensor(y, device=device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    encoder.train(was_training)
    with torch.no_grad():
        logits = head(test_features.to(device).float())
        y = test_labels.to(device)
        k = min(5, num_classes)
        top5 = (logits.topk(k, dim=1).indices == y[:, None]).any(dim=1).float().mean().item()
        top1 = (logits.argmax(dim=1) == y).float().mean().item()
    return {"top1": top1, "top5": top5}
