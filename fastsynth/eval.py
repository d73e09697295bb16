"""`python -m fastsynth.eval --checkpoint PATH`: linear probe and retrieval on a checkpoint.

Protocols of METHOD.md "Evaluation protocols": a linear classifier on the frozen encoder with
100 / 50 / 20 % of the training labels (stratified), and leave-one-out cosine retrieval on the
test set (rank-1, rank-5, mAP). Features are extracted once with the test view (resize +
centre crop); the probe trains on those frozen features (see fastsynth.metrics.linear_probe).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from fastsynth import metrics
from fastsynth.config import Config
from fastsynth.data.base import ImageList, Splits
from fastsynth.data.loaders import make_loader
from fastsynth.probe import paper_probe
from fastsynth.data.transforms import evaluation

from fastsynth.progress import tqdm


def file_digest(path: str) -> str:
    """sha1 of a file's bytes (a checkpoint's identity for the feature cache)."""
    import hashlib
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _file_key(path: str, label: int) -> str:
    """A file's part of the feature cache key: a file rewritten in place is a different file."""
    try:
        st = os.stat(path)
        return f"{path}\t{st.st_size}\t{st.st_mtime_ns}\t{label}"
    except OSError:  # the loader reports it; the key only has to differ from a readable file's
        return f"{path}\t-\t{label}"


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, images: ImageList, cfg: Config, device: torch.device,
                     desc: str = "features", cache: tuple[str, str] | None = None, loader: str = "torch"):
    """Encoder features (N x d, float32, CPU) and labels (N,) with the evaluation view.

    cache = (folder, checkpoint digest): features are saved there keyed by the checkpoint, the
    transform (image size, and the loader: DALI's resize differs from PIL's by a fraction of a
    grey level), the file list with each file's size and modification time, and the labels
    (a class added elsewhere renumbers them), and loaded instead of recomputed next time.
    loader = "dali": the DALI evaluation pipeline (GPU decoding on a GPU), same images in order.
    """
    path = None
    if cache is not None:
        import hashlib
        view = f"evaluation-{cfg.image_size}" + ("-dali" if loader == "dali" else "")
        key = hashlib.sha1("\n".join([cache[1], view, *map(_file_key, images.paths, images.labels)]).encode())
        key = key.hexdigest()
        path = os.path.join(cache[0], f"features-{key[:20]}.pt")
        if os.path.isfile(path):
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
                print(f"{desc}: cached features from {path}")
                return saved["features"], saved["labels"]
            except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed
                pass
    if loader == "dali":
        from fastsynth.data.dali import make_dali_eval_loader
        batches = make_dali_eval_loader(images, cfg.image_size, cfg.batch_size,
                                        device="gpu" if device.type == "cuda" else "cpu",
                                        device_id=device.index if device.type == "cuda" else None,
                                        workers=max(cfg.workers, 1))
    else:
        batches = make_loader(images, evaluation(cfg.image_size), cfg.batch_size, shuffle=False, drop_last=False,
                              workers=cfg.workers, seed=cfg.seed)
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    # Eagerly, also for an encoder compiled in place for training (static shapes): one pass,
    # whose last, partial batch would be one more graph to compile.
    with torch.compiler.set_stance("force_eager"):
        for x, y, _ in tqdm(batches, desc=desc, leave=False):
            feats.append(encoder(x.to(device, non_blocking=True)).float().cpu())
            labels.append(torch.as_tensor(y))
    encoder.train(was_training)
    out = torch.cat(feats), torch.cat(labels)
    if path is not None:
        from fastsynth.checkpoint import save_atomic
        os.makedirs(cache[0], exist_ok=True)
        save_atomic({"features": out[0], "labels": out[1]}, path)
    return out


def evaluate_encoder(encoder: torch.nn.Module, splits: Splits, cfg: Config, device: torch.device,
                     tag: str = "", cache: tuple[str, str] | None = None, loader: str = "torch") -> dict:
    """{'linear_top1@100', ..., 'rank1', 'rank5', 'mAP', 'knn_top1'} as fractions in [0, 1]."""
    tr_f, tr_y = extract_features(encoder, splits.train, cfg, device, f"{tag}train features", cache, loader)
    te_f, te_y = extract_features(encoder, splits.test, cfg, device, f"{tag}test features", cache, loader)
    out = {}
    for frac in cfg.fractions():
        idx = metrics.stratified_subset(tr_y, frac, seed=cfg.seed)
        kw = {"lr": cfg.probe_lr} if cfg.probe_lr is not None else {}
        if cfg.probe == "paper":
            subset = ImageList([splits.train.paths[i] for i in idx.tolist()],
                               [splits.train.labels[i] for i in idx.tolist()], splits.train.classes)
            probe = paper_probe(encoder, subset, te_f, te_y, image_size=cfg.image_size, epochs=cfg.probe_epochs,
                                num_classes=splits.train.num_classes, device=device, seed=cfg.seed,
                                workers=cfg.workers, **kw)
        else:
            probe = metrics.linear_probe(tr_f[idx], tr_y[idx], te_f, te_y, epochs=cfg.probe_epochs, seed=cfg.seed,
                                         num_classes=splits.train.num_classes, **kw)
        out[f"linear_top1@{round(frac * 100)}"] = probe["top1"]
        out[f"linear_top5@{round(frac * 100)}"] = probe["top5"]
    out.update(metrics.retrieval(te_f, te_y))
    out["knn_top1"] = metrics.knn(tr_f, tr_y, te_f, te_y, num_classes=splits.train.num_classes)
    return out


def format_table(results: dict[str, dict]) -> str:
    """Rows = metric, columns = encoders; percentages."""
    names = list(results)
    keys = [k for k in next(iter(results.values()))]
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(f"{100 * results[n][k]:.2f}" for n in names) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from fastsynth.checkpoint import CheckpointError, load, load_into
    from fastsynth.data.scan import clean_splits
    from fastsynth.config import ConfigError, from_dict
    from fastsynth.data.base import DatasetError
    from fastsynth.data.datasets import build_dataset
    from fastsynth.engine import resolve_device
    from fastsynth.model import SynthSSL

    p = argparse.ArgumentParser(description="Evaluate a fastsynth checkpoint (linear probe + retrieval)")
    p.add_argument("--checkpoint", required=True, help="a fastsynth checkpoint (last.pt or final.pt)")
    p.add_argument("--data-root", default=None, help="override the dataset root stored in the checkpoint")
    p.add_argument("--probe-fractions", default=None, help="label fractions, e.g. 1.0,0.5,0.2")
    p.add_argument("--probe-epochs", type=int, default=None)
    p.add_argument("--probe", choices=("cached", "paper"), default=None,
                   help="cached: on features extracted once; paper: augmented crops, SGD lr 30 (slow)")
    p.add_argument("--device", default="auto")
    p.add_argument("--output", default=None, help="write the metrics JSON here")
    args = p.parse_args(argv)
    try:
        ckpt = load(args.checkpoint)
        if "model" not in ckpt:
            raise CheckpointError(f"checkpoint {args.checkpoint}: holds stage {ckpt.get('stage')!r}, no encoder "
                                  "(use the run's last.pt)")
        cfg = from_dict(ckpt["config"])
        for name in ("data_root", "probe_fractions", "probe_epochs", "probe"):
            if getattr(args, name) is not None:
                setattr(cfg, name, getattr(args, name))
        cfg.weights = None  # the checkpoint carries the weights
        cfg.validate()
        device = resolve_device(args.device)
        model = SynthSSL(cfg)
        load_into(model, ckpt["model"], f"{args.checkpoint} (model)")
        splits = build_dataset(cfg.dataset, cfg.data_root, cfg.download, cfg.seed)
        splits = clean_splits(splits, cfg.max_bad_fraction,
                              os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "bad_files.txt"))
        cache = (os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "features"),
                 file_digest(args.checkpoint))
        # The loader the run's plan picks (DALI where it imports on the fast path), as train.py's
        # own evaluation does: the same view of the test images, bit for bit.
        from fastsynth import fast
        res = evaluate_encoder(model.encoder.to(device), splits, cfg, device, cache=cache,
                               loader=fast.resolve(cfg, device).loader)
    except (CheckpointError, ConfigError, DatasetError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table({"checkpoint": res}))
    if args.output:
        with open(args.output, "w") as fh:
            json.dump(res, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
