"""`python -m fastsynth.train`: decoder warm-up, SSL training, evaluation (METHOD.md), one command.

With no arguments: the embedded synthetic set, the quick preset (a 2-core CPU in minutes).
`--stage warmup|ssl|eval` runs one stage alone; later stages pick up the run folder's
checkpoints (or --resume-from).
"""
from __future__ import annotations

import json
import os
import random
import sys
import time

import numpy as np
import torch

from fastsynth import checkpoint
from fastsynth.config import ConfigError, from_args, save
from fastsynth.data.base import DatasetError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _load_stage_inputs(model, cfg, run) -> None:
    """--stage ssl needs the warm-up's decoder; --stage eval needs the trained model."""
    if cfg.stage == "ssl" and model.synth is not None:
        path = cfg.resume_from or run.file("warmup.pt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--stage ssl with --synth on needs the warm-up decoder: {path} does not exist "
                                    "(run --stage warmup first, or pass --resume-from)")
        ckpt = checkpoint.load(path)
        if "decoder" not in ckpt:
            raise checkpoint.CheckpointError(
                f"{path} is a {ckpt.get('stage')!r} checkpoint, not a decoder warm-up (warmup.pt); continuing an "
                "interrupted SSL run is not supported yet")
        model.synth.decoder.load_state_dict(ckpt["decoder"])
        print(f"loaded warm-up decoder from {path}")
    if cfg.stage == "eval":
        path = cfg.resume_from or run.file("last.pt")
        ckpt = checkpoint.load(path)
        if "model" not in ckpt:
            raise checkpoint.CheckpointError(f"{path} holds no trained model (stage {ckpt.get('stage')!r})")
        model.load_state_dict(ckpt["model"])
        print(f"loaded model from {path}")


def run(cfg) -> dict:
    # Imports here keep `--help` and config errors fast.
    from fastsynth.data.datasets import build_dataset
    from fastsynth.engine import resolve_device, train_ssl, warmup_decoder
    from fastsynth.eval import evaluate_encoder, format_table
    from fastsynth.model import SynthSSL

    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    run_dir = checkpoint.RunDir(cfg.output_dir, f"{cfg.dataset}-{cfg.method}-synth{cfg.synth}")
    save(cfg, run_dir.file("config.json"))
    print("config:", json.dumps(cfg.to_dict(), sort_keys=True))
    print(f"run folder: {run_dir.path}   device: {device}")

    t0 = time.time()
    splits = build_dataset(cfg.dataset, cfg.data_root, cfg.download, cfg.seed)
    print(f"dataset {cfg.dataset}: {len(splits.train)} train / {len(splits.test)} test images, "
          f"{splits.train.num_classes} classes")
    seed_everything(cfg.seed)  # the model's initialisation depends on the seed only
    model = SynthSSL(cfg).to(device)
    _load_stage_inputs(model, cfg, run_dir)
    results = {"config": cfg.to_dict(), "run_dir": run_dir.path}

    if cfg.stage in ("all", "warmup") and model.synth is not None:
        results.update(warmup_decoder(model, splits, cfg, run_dir, device))
    if cfg.stage in ("all", "ssl"):
        results.update(train_ssl(model, splits, cfg, run_dir, device))
    if cfg.stage in ("all", "eval"):
        table = {"trained": evaluate_encoder(model.encoder, splits, cfg, device, "trained: ")}
        # The encoder before SSL (same seed): what training must beat. With --weights that is
        # the loaded initialisation, so the row is named for what it is.
        seed_everything(cfg.seed)
        fresh = SynthSSL(cfg).encoder.to(device)
        name = "init_weights" if cfg.weights else "random_init"
        table[name] = evaluate_encoder(fresh, splits, cfg, device, f"{name}: ")
        results["metrics"] = table
        print(format_table(table))
    results["seconds"] = round(time.time() - t0, 1)
    run_dir.write_json("final_metrics.json", results)
    print(f"done in {results['seconds']} s; results in {run_dir.file('final_metrics.json')}")
    return results


def main(argv=None) -> int:
    from fastsynth.checkpoint import CheckpointError
    try:
        cfg = from_args(argv, description=__doc__.splitlines()[0])
        run(cfg)
    except (ConfigError, DatasetError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last epoch's checkpoint is in the run folder", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
