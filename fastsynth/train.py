"""`python -m fastsynth.train`: decoder warm-up, SSL training, evaluation (METHOD.md), one command.

With no arguments: the embedded synthetic set, the quick preset (a 2-core CPU in minutes).
`--stage warmup|ssl|eval` runs one stage alone; later stages pick up the run folder's
checkpoints (or --resume-from).
"""
from __future__ import annotations

import json
import os
import re
import signal
import sys
import time

import torch

from fastsynth import checkpoint, dist, fast, graphstep
from fastsynth.checkpoint import seed_everything
from fastsynth.config import ConfigError, from_args, from_dict, save
from fastsynth.data.base import DatasetError
from fastsynth.guard import StopRequest, TrainingError

# Flags that steer this invocation rather than define the experiment: on --resume, those given on
# the command line apply; everything else comes from the checkpoint's config. The fast path's
# switches are here: a run moved to another machine (a CPU, a GPU without the Triton kernels, no
# DALI) must be able to change them; --max-steps is a step budget (the schedule spans --epochs).
RUN_CONTROL = ("stage", "resume_from", "output_dir", "device", "workers", "log_every", "keep_checkpoints",
               "checkpoint_every", "max_bad_steps", "deterministic", "download", "data_root", "max_bad_fraction",
               "dist_timeout", "gc_every", "max_steps", "impl", "loader", "compile", "compile_mode", "cuda_graph",
               "channels_last")


# What the decoder warm-up's inputs depend on (the frozen initial encoder's features of which
# images): --stage ssl names any that differ from its own run's.
WARMUP_DEFINES = ("dataset", "seed", "weights", "arch", "image_size")


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
                f"{path} is a {ckpt.get('stage')!r} checkpoint, not a decoder warm-up (warmup.pt); to continue an "
                "interrupted SSL run use --resume auto --output-dir RUN_FOLDER (or --resume PATH)")
        if not ckpt.get("complete", True):
            raise checkpoint.CheckpointError(f"{path}: the decoder warm-up did not finish; continue it with "
                                             "--resume auto --output-dir RUN_FOLDER")
        checkpoint.load_into(model.synth.decoder, ckpt["decoder"], f"{path} (decoder)")
        print(f"loaded warm-up decoder from {path}")
        differs = [f"--{k.replace('_', '-')} {ckpt.get('config', {}).get(k)!r} (this run: {getattr(cfg, k)!r})"
                   for k in WARMUP_DEFINES if ckpt.get("config", {}).get(k, getattr(cfg, k)) != getattr(cfg, k)]
        if differs:
            print(f"warning: {path} warmed the decoder up on other inputs: {', '.join(differs)}")
    if cfg.stage == "eval":
        path = cfg.resume_from or run.file("last.pt")
        ckpt = checkpoint.load(path)
        if "model" not in ckpt:
            raise checkpoint.CheckpointError(f"{path} holds no trained model (stage {ckpt.get('stage')!r})")
        checkpoint.load_into(model, ckpt["model"], f"{path} (model)")
        print(f"loaded model from {path}")


def _resume_point(cfg):
    """--resume: (config to continue with, run folder, SSL state or None, warm-up state or None)."""
    if cfg.resume in ("auto", "if-any"):
        if not cfg.output_dir or not os.path.isdir(cfg.output_dir):
            raise checkpoint.CheckpointError(f"--resume auto needs --output-dir set to an existing run folder, "
                                             f"got {cfg.output_dir!r}")
        run_dir = checkpoint.RunDir(cfg.output_dir, "")
        found = checkpoint.newest_valid(run_dir, "ssl")
        ssl_state = found[1] if found else None
        warm_state = None
        if os.path.isfile(run_dir.file("warmup.pt")):
            try:
                warm_state = checkpoint.load(run_dir.file("warmup.pt"))
            except checkpoint.CheckpointError as e:
                print(f"warning: {e}; the warm-up starts again")
        where = found[0] if found else (run_dir.file("warmup.pt") if warm_state else None)
    else:
        ckpt = checkpoint.load(cfg.resume)
        run_dir = checkpoint.RunDir(cfg.output_dir or os.path.dirname(os.path.abspath(cfg.resume)), "")
        ssl_state = ckpt if ckpt.get("stage") == "ssl" else None
        warm_state = ckpt if ckpt.get("stage") == "warmup" else None
        where = cfg.resume
    source = ssl_state or warm_state
    if source is None:
        raise checkpoint.CheckpointError(f"--resume: no valid checkpoint in {run_dir.path} to continue from")
    given = getattr(cfg, "given", frozenset())
    saved = source["config"]
    ignored = sorted(k for k in given if k not in RUN_CONTROL and k != "resume" and saved.get(k) != getattr(cfg, k))
    if ignored:
        print("warning: --resume continues the saved experiment; ignoring "
              + ", ".join(f"--{k.replace('_', '-')}" for k in ignored))
    merged = {**saved, **{k: getattr(cfg, k) for k in RUN_CONTROL if k in given},
              "resume": cfg.resume, "output_dir": run_dir.path}
    print(f"resuming from {where}")
    return from_dict(merged).validate(), run_dir, ssl_state, warm_state


def _has_checkpoint(path) -> bool:
    if not path or not os.path.isdir(path):
        return False
    return any(f in ("last.pt", "warmup.pt") or (f.startswith("ssl-step") and f.endswith(".pt"))
               for f in os.listdir(path))


def _deterministic(cfg) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for reproducible GEMMs
    torch.use_deterministic_algorithms(True, warn_only=True)  # cudnn.benchmark: the plan (fast.resolve)
    if cfg.workers > 0:
        print("warning: --deterministic with --workers > 0: a run resumed mid-epoch draws different "
              "augmentations than an uninterrupted one (use --workers 0 for exact resumption)")


def queue_note(cfg, train_images: int) -> str | None:
    """A MoCo queue as long as the training set holds older keys of each query's own image, which
    then count as negatives. The paper's K = 65536 does that on every fine-grained set; say so."""
    if cfg.method != "mocov2" or cfg.queue_size < train_images:
        return None
    return (f"note: the MoCo queue ({cfg.queue_size} keys) is at least the training set ({train_images} "
            f"images): older keys of each query's own image are among its negatives")


def run(cfg) -> dict:
    # Imports here keep `--help` and config errors fast.
    from fastsynth.data.datasets import build_dataset
    from fastsynth.data.scan import clean_splits
    from fastsynth.engine import autocast_dtype, resolve_device, train_ssl, warmup_decoder
    from fastsynth.eval import evaluate_encoder, format_table
    from fastsynth.model import SynthSSL

    # Under torchrun: join the process group first; rank 0 alone prints and writes.
    device = dist.init(resolve_device(cfg.device), cfg.dist_timeout)
    world = dist.world()
    if not dist.is_main():
        global _SAVED_STDOUT
        _SAVED_STDOUT, sys.stdout = sys.stdout, open(os.devnull, "w")  # noqa: SIM115 - errors reach stderr
    ssl_state = warm_state = None
    if cfg.resume == "if-any" and not _has_checkpoint(cfg.output_dir):
        print(f"--resume if-any: nothing to resume in {cfg.output_dir}; starting a fresh run")
        cfg.resume = None
    if cfg.resume:
        cfg, run_dir, ssl_state, warm_state = _resume_point(cfg)
        run_dir.active = dist.is_main()
    else:
        hint = f"{cfg.dataset}-{cfg.method}-synth{cfg.synth}"
        path = dist.broadcast_object(cfg.output_dir or checkpoint.RunDir.default_path(hint))
        run_dir = checkpoint.RunDir(path, hint, active=dist.is_main())
    # On the config the run goes on with: a resumed run takes the checkpoint's batch size, which
    # the command line's default (checked before the resume) says nothing about.
    if cfg.batch_size % world:
        saved = " (the resumed run's)" if cfg.resume else ""
        raise ConfigError(f"--batch-size {cfg.batch_size}{saved} is the global batch and must divide evenly over "
                          f"the {world} processes")
    if cfg.deterministic:
        _deterministic(cfg)
    if cfg.tensorboard:
        try:
            run_dir.enable_tensorboard()
        except ImportError as e:
            raise ConfigError(str(e)) from None
    seed_everything(cfg.seed)
    if run_dir.active and not cfg.resume and cfg.stage in ("all", "warmup"):
        from fastsynth.engine import set_aside_earlier_run
        set_aside_earlier_run(run_dir)
    if run_dir.active:
        save(cfg, run_dir.file("config.json"))
    print("config:", json.dumps(cfg.to_dict(), sort_keys=True))
    print(f"run folder: {run_dir.path}   device: {device}   {dist.describe()}")

    t0 = time.time()
    with dist.main_first():  # rank 0 generates / scans into the caches; the others then read them
        splits = build_dataset(cfg.dataset, cfg.data_root, cfg.download, cfg.seed)
        report = run_dir.file("bad_files.txt") if run_dir.active else os.devnull
        splits = clean_splits(splits, cfg.max_bad_fraction, report, workers=max(cfg.workers, 4))
    print(f"dataset {cfg.dataset}: {len(splits.train)} train / {len(splits.test)} test images, "
          f"{splits.train.num_classes} classes")
    note = queue_note(cfg, len(splits.train))
    if note:
        print(note)
    seed_everything(cfg.seed)  # the model's initialisation depends on the seed only
    model = SynthSSL(cfg).to(device)
    if world > 1:
        _distribute(model, cfg, device)
    _load_stage_inputs(model, cfg, run_dir)
    plan = fast.resolve(cfg, device)
    # Before any stage runs: --cuda-graph's limits would otherwise stop the run after the warm-up.
    graphstep.check(cfg, plan, device, autocast_dtype(cfg, device) == torch.float16, world)
    fast.prepare(model, plan, cfg.compile_mode)
    print(f"path: {plan.describe()}")
    if dist.rank():
        seed_everything(cfg.seed + dist.rank())  # augmentations differ across ranks; the weights do not
    results = {"config": cfg.to_dict(), "run_dir": run_dir.path}

    with StopRequest() as stop:
        if cfg.stage in ("all", "warmup") and model.synth is not None and ssl_state is None:
            if warm_state is not None and warm_state.get("complete", True):
                checkpoint.load_into(model.synth.decoder, warm_state["decoder"], "warmup.pt (decoder)")
                print("decoder warm-up already complete: continuing with SSL training")
            else:
                results.update(warmup_decoder(model, splits, cfg, run_dir, device, stop, state=warm_state))
        if cfg.stage in ("all", "ssl") and not results.get("stopped"):
            results.update(train_ssl(model, splits, cfg, run_dir, device, stop, state=ssl_state, plan=plan))
    if results.get("stopped"):
        signum = agreed_signal(stop)
        results["exit_code"] = 130 if signum == signal.SIGINT else 0
        print(f"stopped by {signal.Signals(signum).name}: checkpoint in {run_dir.path}; continue with\n"
              f"  python -m fastsynth.train --resume auto --output-dir {run_dir.path}", flush=True)
        return results
    if not dist.is_main():
        return results  # evaluation, the table and final_metrics.json: rank 0 only
    if cfg.stage in ("all", "eval"):
        table = {"trained": evaluate_encoder(model.encoder, splits, cfg, device, "trained: ", loader=plan.loader)}
        # The encoder before SSL (same seed): what training must beat. With --weights that is
        # the loaded initialisation, so the row is named for what it is.
        seed_everything(cfg.seed)
        fresh = SynthSSL(cfg).encoder.to(device)
        name = "init_weights" if cfg.weights else "random_init"
        table[name] = evaluate_encoder(fresh, splits, cfg, device, f"{name}: ", loader=plan.loader)
        results["metrics"] = table
        print(format_table(table))
    results["seconds"] = round(time.time() - t0, 1)
    run_dir.write_json("final_metrics.json", results)
    print(f"done in {results['seconds']} s; results in {run_dir.file('final_metrics.json')}")
    return results


def agreed_signal(stop: StopRequest) -> int:
    """The signal that stopped the run, the same on every rank. dist.any_rank stops all ranks when
    one is signalled (one node of a multi-node job pre-empted): the others have none of their own,
    and each must still exit as the signalled one does (SIGTERM 0, SIGINT 130; SIGTERM wins)."""
    return dist.max_over_ranks(stop.signum or 0)


def _distribute(model, cfg, device) -> None:
    """--bn: how BatchNorm sees the global batch (METHOD.md's MoCo v2 uses shuffle-BN)."""
    mode = cfg.bn_mode()
    if mode == "sync":
        dist.sync_batchnorm(model, device)
    if hasattr(model.method, "key_bn"):
        model.method.key_bn = mode


def main(argv=None) -> int:
    from fastsynth.checkpoint import CheckpointError
    try:
        cfg = from_args(argv, description=__doc__.splitlines()[0])
        return run(cfg).get("exit_code", 0)
    except (ConfigError, DatasetError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is in the run folder (--resume auto --output-dir RUN_FOLDER)",
              file=sys.stderr)
        return 130
    except (getattr(torch.distributed, "DistError", ()), RuntimeError) as e:  # a rank died or a collective timed out
        # gloo (the control group, and CPU runs) reports a dead or hung peer as a plain
        # RuntimeError: recognised by its text, and only under several processes.
        if not isinstance(e, getattr(torch.distributed, "DistError", ())) and not (
                dist.world() > 1 and _PEER_FAILURE.search(str(e))):
            raise
        print(f"error: rank {dist.rank()} of {dist.world()}: {type(e).__name__}: {str(e).splitlines()[0][:300]} "
              "(another process probably failed first: see its message; continue with --resume auto)",
              file=sys.stderr)
        return 1
    finally:
        dist.shutdown()
        _restore_stdout()
    return 0


_SAVED_STDOUT = None  # a non-zero rank's real stdout while it runs silenced
# How gloo words a peer that exited or stopped answering (torch 2.11-2.14).
_PEER_FAILURE = re.compile(r"gloo|timed out waiting|connection (closed|reset|refused)|broken pipe", re.IGNORECASE)


def _restore_stdout() -> None:
    global _SAVED_STDOUT
    if _SAVED_STDOUT is not None:
        sys.stdout.close()
        sys.stdout, _SAVED_STDOUT = _SAVED_STDOUT, None


if __name__ == "__main__":
    sys.exit(main())
