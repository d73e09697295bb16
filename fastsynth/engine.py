"""The training stages: decoder warm-up and SSL training (the evaluation stage is in eval.py).

Reference path: eager PyTorch, kernels with impl="torch". The training step keeps loss values
on the device and reads them back only every `log_every` steps.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from fastsynth.checkpoint import FORMAT, RunDir, save_atomic
from fastsynth.config import Config
from fastsynth.data.base import Splits
from fastsynth.data.loaders import make_loader
from fastsynth.data.transforms import SSLViews, plain
from fastsynth.figures import save_triplets
from fastsynth.model import SynthSSL
from fastsynth.models import frozen_bn_stats
from fastsynth.progress import tqdm


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return dev


def precision(cfg: Config, device: torch.device):
    """(autocast context factory, GradScaler or None): one autocast, a scaler only for float16."""
    if not cfg.amp:
        return contextlib.nullcontext, None
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.amp_dtype)
    if dtype is None:
        bf16_ok = device.type == "cpu" or torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if bf16_ok else torch.float16
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


@torch.no_grad()
def _frozen_features(model: SynthSSL, splits: Splits, cfg: Config, device: torch.device):
    """z = f(x) of every plain training image, once: the encoder is frozen during warm-up, so
    the 200 warm-up epochs need one encoder pass, not 200. Batch statistics as in SSL training:
    shuffled full batches, so a class-ordered file list does not give class-pure batches."""
    loader = make_loader(splits.train, plain(cfg.image_size), cfg.batch_size, shuffle=True,
                         drop_last=len(splits.train) > cfg.batch_size, workers=cfg.workers, seed=cfg.seed)
    feats, images = [], []
    was_training = model.encoder.training
    model.encoder.train()
    with frozen_bn_stats(model.encoder):
        for x, _, _ in tqdm(loader, desc="warm-up: encoding", leave=False):
            x = x.to(device, non_blocking=True)
            feats.append(model.encoder(x).float().cpu())
            images.append(x.half().cpu())  # float16 halves the host memory of the cached targets
    model.encoder.train(was_training)
    return torch.cat(feats), torch.cat(images)


def warmup_decoder(model: SynthSSL, splits: Splits, cfg: Config, run: RunDir, device: torch.device) -> dict:
    """METHOD.md decoder warm-up: encoder frozen, Eq. 2 (MSE) on resize-only inputs, Adam."""
    decoder = model.synth.decoder
    feats, images = _frozen_features(model, splits, cfg, device)
    opt = torch.optim.Adam(decoder.parameters(), lr=cfg.decoder_lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    n, bs = feats.shape[0], min(cfg.batch_size, feats.shape[0])
    steps_per_epoch = max(1, n // bs)
    step, last = 0, float("nan")
    decoder.train()
    bar = tqdm(range(cfg.warmup_epochs), desc="warm-up: decoder")
    for epoch in bar:
        perm = torch.randperm(n, generator=gen)
        total = torch.zeros((), device=device)
        for i in range(steps_per_epoch):
            idx = perm[i * bs:(i + 1) * bs]
            z, x = feats[idx].to(device), images[idx].to(device).float()
            loss = F.mse_loss(decoder(z), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
            step += 1
            if cfg.max_steps and step >= cfg.max_steps:
                break
        last = (total / (i + 1)).item()  # once per epoch
        run.log({"stage": "warmup", "epoch": epoch, "step": step, "l_r": last})
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(l_r=f"{last:.4f}")
        if cfg.max_steps and step >= cfg.max_steps:
            break
    save_atomic({"format": FORMAT, "stage": "warmup", "config": cfg.to_dict(), "step": step,
                 "decoder": decoder.state_dict()}, run.file("warmup.pt"))
    return {"warmup_l_r": last, "warmup_steps": step}


def _cosine(opt: torch.optim.Optimizer, base_lr: float, step: int, total: int) -> None:
    lr = base_lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))
    for g in opt.param_groups:
        g["lr"] = base_lr if g.get("fix_lr") else lr


def train_ssl(model: SynthSSL, splits: Splits, cfg: Config, run: RunDir, device: torch.device) -> dict:
    """SSL training with Eq. 8 (or Eq. 1 alone with --synth off). Returns the last epoch's means."""
    loader = make_loader(splits.train, SSLViews(cfg.image_size), cfg.batch_size, shuffle=True, drop_last=True,
                         workers=cfg.workers, seed=cfg.seed, cache=True, pin_memory=device.type == "cuda")
    if len(loader) == 0:
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the training set ({len(splits.train)} images)")
    base_lr = cfg.effective_lr()
    opt = torch.optim.SGD(model.method.param_groups(base_lr, cfg.weight_decay), lr=base_lr, momentum=cfg.momentum)
    dec_opt = torch.optim.Adam(model.synth.decoder.parameters(), lr=cfg.decoder_lr) if model.synth else None
    autocast, scaler = precision(cfg, device)
    total_steps = cfg.epochs * len(loader)
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    step, epoch_means = 0, {}
    model.train()
    for epoch in range(cfg.epochs):
        sums, count, last = {}, 0, None  # last: (x, x_hat, x_tilde) of the newest batch
        bar = tqdm(loader, desc=f"ssl epoch {epoch + 1}/{cfg.epochs}")
        for (x1, x2, x), _, _ in bar:
            x1, x2, x = (t.to(device, non_blocking=True) for t in (x1, x2, x))
            _cosine(opt, base_lr, step, total_steps)
            with autocast():
                # Noise seed per step (and, with several ranks later, per rank): reproducible.
                loss, parts, ctx, out = model(x1, x2, x if model.synth else None, seed=cfg.seed * 1_000_003 + step)
            opt.zero_grad(set_to_none=True)
            if dec_opt:
                dec_opt.zero_grad(set_to_none=True)
            if scaler:
                scaler.scale(loss).backward()
                scaler.step(opt)
                if dec_opt:
                    scaler.step(dec_opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
                if dec_opt:
                    dec_opt.step()
            model.method.after_step(ctx)
            for k, v in {"loss": loss, **parts}.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
            count, step = count + 1, step + 1
            if out is not None and out["x_tilde"] is not None:  # what the figure needs, no graph
                last = (x, out["x_hat"], out["x_tilde"])
            if step % cfg.log_every == 0 and hasattr(bar, "set_postfix"):
                bar.set_postfix({k: f"{(v / count).item():.3f}" for k, v in sums.items()})
            if step >= total_steps:
                break
        epoch_means = {k: (v / count).item() for k, v in sums.items()}
        run.log({"stage": "ssl", "epoch": epoch, "step": step, "lr": opt.param_groups[0]["lr"], **epoch_means})
        save_checkpoint(model, opt, dec_opt, scaler, cfg, run, epoch, step)
        if last is not None:
            save_triplets(*last, run.file("triplets.png"))
        if step >= total_steps:
            break
    return {f"final_{k}": v for k, v in epoch_means.items()} | {"ssl_steps": step}


def save_checkpoint(model, opt, dec_opt, scaler, cfg: Config, run: RunDir, epoch: int, step: int) -> None:
    state = {"format": FORMAT, "stage": "ssl", "config": cfg.to_dict(), "epoch": epoch, "step": step,
             "model": model.state_dict(), "optimizer": opt.state_dict(),
             "decoder_optimizer": dec_opt.state_dict() if dec_opt else None,
             "scaler": scaler.state_dict() if scaler else None}
    save_atomic(state, run.file("last.pt"))
