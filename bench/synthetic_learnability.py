"""How learnable is the synthetic set at a CPU budget? A supervised upper-bound check.

Not a test and not a benchmark: a script for tuning the synthetic set's difficulty. It trains a
ResNet-18 from scratch *with labels* for a few epochs and prints test top-1 per epoch. If even
supervised training stays at chance (1 / classes), no self-supervised run of the same budget can
beat a random encoder on the linear probe, whatever the method.

    python bench/synthetic_learnability.py --epochs 6 --aug plain
    python bench/synthetic_learnability.py --epochs 6 --aug ssl ROTATION=0 "CLUTTER=(0,1)"

Trailing NAME=VALUE pairs override the generator's knobs in fastsynth.data.synthetic
(CLUTTER, ROTATION, MARKER, KINDS, LENGTH); images are rendered in memory, nothing is cached.
"""
import argparse
import time

import torch
import torch.nn.functional as F
import torchvision

import fastsynth.data.synthetic as syn
from fastsynth.data.transforms import augment, evaluation, plain
from synthetic_knobs import apply_knobs  # bench/ is on sys.path when run as a script


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--train-per-class", type=int, default=40)
    p.add_argument("--aug", choices=("plain", "ssl"), default="plain")
    p.add_argument("knobs", nargs="*")
    args = p.parse_args()
    apply_knobs(args.knobs)
    torch.manual_seed(0)
    s, classes = args.image_size, 20
    tf = plain(s) if args.aug == "plain" else augment(s)
    train = [(syn.render(0, 0, c, i), c) for c in range(classes) for i in range(args.train_per_class)]
    ev = evaluation(s)
    x_te = torch.stack([ev(syn.render(0, 1, c, i)) for c in range(classes) for i in range(20)])
    y_te = torch.arange(classes).repeat_interleave(20)
    model = torchvision.models.resnet18(num_classes=classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(train))
        for k in range(0, len(perm) - 63, 64):
            idx = perm[k:k + 64].tolist()
            x = torch.stack([tf(train[j][0]) for j in idx])
            y = torch.tensor([train[j][1] for j in idx])
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(x_te).argmax(1) == y_te).float().mean().item()
        print(f"epoch {epoch}: train loss {loss.item():.3f}  test top-1 {acc:.3f}  ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
