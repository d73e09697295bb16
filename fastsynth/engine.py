"""The training stages: decoder warm-up and SSL training (the evaluation stage is in eval.py).

Reference path: eager PyTorch, kernels with impl="torch". The training step keeps loss values
on the device and reads them back only every `log_every` steps.
"""
from __future__ import annotations

import contextlib
import math
import platform
import time

import torch
import torch.nn.functional as F

from fastsynth import dist, fast
from fastsynth.checkpoint import (FORMAT, CheckpointError, RunDir, load_into, load_optimizer, rng_state,
                                  rotate_and_save, save_atomic, saved_step, seed_everything, set_rng_state)
from fastsynth.config import Config
from fastsynth.data.base import Splits
from fastsynth.data.loaders import FileDataset, epoch_loader, make_loader
from fastsynth.data.transforms import SSLViews, plain
from fastsynth.figures import save_triplets
from fastsynth.gcpolicy import StepGC
from fastsynth.graphstep import GraphedStep
from fastsynth.guard import BadSteps, RunningStats, RunTracker, StopRequest, finite_flag, finite_step
from fastsynth.model import SynthSSL
from fastsynth.models import frozen_bn_stats
from fastsynth.progress import tqdm


def resolve_device(name: str) -> torch.device:
    """--device as a torch.device; a CUDA device always with its index (torch.cuda.set_device
    rejects a bare "cuda"), the current one where the name gave none."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 arithmetic instructions (x86: AVX512-BF16 or AMX; torch's own
    CPUID probes). Without them autocast emulates bfloat16 and the step runs several times slower
    than float32. (oneDNN's _is_mkldnn_bf16_supported only asks for AVX-512, which emulates.)
    Other architectures: oneDNN's check, where the torch build has it."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        if platform.machine() in ("x86_64", "AMD64") and all(probes):
            return any(bool(p()) for p in probes)
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without the probes: nothing known to be native
        return False


_SAID_FLOAT32 = False


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype a run uses, None for float32.

    `--amp` with `--amp-dtype auto`: bfloat16 on a GPU that has it, else float16 (with a
    GradScaler); on a CPU bfloat16 only where the CPU has bfloat16 hardware, else float32 with a
    one-line note (emulated bfloat16 took over 5x the float32 step time on a 2-core AVX2 machine:
    bench/results/2026-11-26-cpu-step). An explicit --amp-dtype is always honoured.
    """
    global _SAID_FLOAT32
    if not cfg.amp:
        return None
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.amp_dtype)
    if dtype is not None:
        return dtype
    if device.type == "cpu":
        if cpu_has_bf16():
            return torch.bfloat16
        if not _SAID_FLOAT32:
            print("--amp: this CPU has no bfloat16 hardware, so autocast would be emulated and slower; "
                  "running float32 (--amp-dtype bfloat16 forces it)")
            _SAID_FLOAT32 = True
        return None
    return torch.bfloat16 if _cuda_has_bf16() else torch.float16


def _cuda_has_bf16() -> bool:
    """bfloat16 in hardware (Ampere and newer); emulated bfloat16 (V100, T4) is slow, so those
    GPUs get float16 with a GradScaler."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # a torch without the argument counted hardware support only
        return torch.cuda.is_bf16_supported()


def precision(cfg: Config, device: torch.device):
    """(autocast context factory, GradScaler or None): one autocast (autocast_dtype), a scaler
    only for float16."""
    dtype = autocast_dtype(cfg, device)
    if dtype is None:
        return contextlib.nullcontext, None
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


@torch.no_grad()
def _frozen_features(model: SynthSSL, splits: Splits, cfg: Config, device: torch.device):
    """z = f(x) of every plain training image, once: the encoder is frozen during warm-up, so
    the 200 warm-up epochs need one encoder pass, not 200. Batch statistics as in SSL training:
    shuffled full batches, so a class-ordered file list does not give class-pure batches. The
    last, partial batch is filled up with images of the first and only its own features kept:
    every image gets a target, each computed in a full batch (where the set holds one)."""
    loader = make_loader(splits.train, plain(cfg.image_size), cfg.batch_size, shuffle=True,
                         drop_last=False, workers=cfg.workers, seed=cfg.seed)
    feats, images, first = [], [], None
    was_training = model.encoder.training
    model.encoder.train()
    with frozen_bn_stats(model.encoder):
        for x, _, _ in tqdm(loader, desc="warm-up: encoding", leave=False):
            x = x.to(device, non_blocking=True)
            n = x.shape[0]
            if first is None:
                first = x
            elif n < first.shape[0]:
                x = torch.cat([x, first[:first.shape[0] - n]])
            feats.append(model.encoder(x)[:n].float().cpu())
            images.append(x[:n].half().cpu())  # float16 halves the host memory of the cached targets
    model.encoder.train(was_training)
    return torch.cat(feats), torch.cat(images)


def warmup_decoder(model: SynthSSL, splits: Splits, cfg: Config, run: RunDir, device: torch.device,
                   stop: StopRequest, state: dict | None = None) -> dict:
    """METHOD.md decoder warm-up: encoder frozen, Eq. 2 (MSE) on resize-only inputs, Adam.

    `state`: an unfinished warmup.pt to continue from. On a stop request the decoder, Adam and
    the epoch's shuffling state are saved at the step boundary and {"stopped": True} returned.
    """
    decoder = model.synth.decoder
    # Every rank encodes the whole set (the encoder is frozen and the pass is cheap next to 200
    # epochs); the decoder's steps are sharded: rank r takes its slice of each global batch.
    feats, images = _frozen_features(model, splits, cfg, device)
    params = list(decoder.parameters())
    opt = torch.optim.Adam(params, lr=cfg.decoder_lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    world, rank = dist.world(), dist.rank()
    n, bs = feats.shape[0], min(cfg.batch_size, feats.shape[0])
    bs -= bs % world
    if bs == 0:
        raise ValueError(f"{n} training images cannot be split over {world} processes")
    local_bs = bs // world
    step_decoder = dist.ddp(decoder, device) if world > 1 else decoder
    steps_per_epoch = max(1, n // bs)
    step, start_epoch, skip, last = 0, 0, 0, float("nan")
    bad = BadSteps(cfg.max_bad_steps)
    if state is not None:
        load_into(decoder, state["decoder"], "warmup.pt (decoder)")
        load_optimizer(opt, state["optimizer"])
        gen.set_state(state["generator"])
        step, start_epoch, skip = state["step"], state["epoch"], state["batch_in_epoch"]
        print(f"continuing the decoder warm-up at epoch {start_epoch + 1}, step {step}")
    decoder.train()
    bn_stats = RunningStats(decoder)

    def save(epoch: int, batch: int, epoch_gen_state: torch.Tensor, complete: bool) -> None:
        if not run.active:
            return
        save_atomic({"format": FORMAT, "stage": "warmup", "complete": complete, "config": cfg.to_dict(),
                     "epoch": epoch, "batch_in_epoch": batch, "step": step, "generator": epoch_gen_state,
                     "decoder": decoder.state_dict(), "optimizer": opt.state_dict()}, run.file("warmup.pt"))

    bar = tqdm(range(start_epoch, cfg.warmup_epochs), desc="warm-up: decoder")
    for epoch in bar:
        epoch_gen_state = gen.get_state()  # the epoch's order is drawn from here: resumable
        perm = torch.randperm(n, generator=gen)
        total, done = torch.zeros((), device=device), 0
        for i in range(skip if epoch == start_epoch else 0, steps_per_epoch):
            if dist.any_rank(stop.requested):
                save(epoch, i, epoch_gen_state, complete=False)
                return {"stopped": True, "warmup_steps": step}
            idx = perm[i * bs:(i + 1) * bs][rank * local_bs:(rank + 1) * local_bs]
            z, x = feats[idx].to(device), images[idx].to(device).float()
            saved_stats = bn_stats.save()
            loss = F.mse_loss(step_decoder(z), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            applied = bad.check(_finite_everywhere(loss, params), "warm-up", step)
            if applied:
                opt.step()
                total += loss.detach()
                done += 1
            bn_stats.keep(applied, saved_stats)  # a skipped step leaves no NaN in the running statistics
            step += 1
            if cfg.max_steps and step >= cfg.max_steps:
                break
        # Every rank's share of the epoch, once per epoch: the logged figure is the global batch's.
        total, done_all = dist.sum_over_ranks(torch.stack([total, torch.tensor(float(done), device=device)]))
        last = (total / done_all.clamp_min(1)).item()
        run.log({"stage": "warmup", "epoch": epoch, "step": step, "l_r": last, "bad_steps": bad.total})
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(l_r=f"{last:.4f}")
        if cfg.max_steps and step >= cfg.max_steps:
            break
        if epoch + 1 < cfg.warmup_epochs:  # a crash or SIGKILL later loses this epoch at most
            save(epoch + 1, 0, gen.get_state(), complete=False)
    save(cfg.warmup_epochs, 0, gen.get_state(), complete=True)
    return {"warmup_l_r": last, "warmup_steps": step}


def _cosine(opt: torch.optim.Optimizer, base_lr: float, step: int, total: int) -> None:
    lr = base_lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))
    for g in opt.param_groups:
        value = base_lr if g.get("fix_lr") else lr
        if isinstance(g["lr"], torch.Tensor):  # --cuda-graph: the captured step reads it there
            g["lr"].fill_(value)
        else:
            g["lr"] = value


def _collapse_check(method_name: str, ctx: dict, run: RunDir, epoch: int) -> None:
    """SimSiam collapse: the l2-normalised outputs' per-dimension std falls from about 1/sqrt(d)
    towards 0 (SimSiam paper, Sec. 4.1). Warn at a tenth of the healthy value."""
    if method_name != "simsiam" or "target" not in ctx:
        return
    z = F.normalize(ctx["target"].float(), dim=1)
    std, healthy = z.std(dim=0).mean().item(), z.shape[1] ** -0.5
    run.log({"stage": "ssl", "epoch": epoch, "output_std": std, "output_std_healthy": healthy})
    if std < 0.1 * healthy:
        print(f"warning: SimSiam may have collapsed: output std {std:.2e} per dimension, a healthy run has about "
              f"{healthy:.2e} (check --lr, --batch-size, the predictor)", flush=True)


def step_flops(cfg: Config, device: torch.device, batch) -> int | None:
    """FLOPs of one training step on this batch, for the TFLOP/s and MFU in the log: one forward
    and backward of an eager copy of the model (profile.count_flops), once per run. The RNG
    streams are restored afterwards, so the run is the same with or without it. None (and a note)
    when counting fails: the log then shows images/s only."""
    from fastsynth.profile import count_flops
    # dist.local(): the copy's forward issues no collectives (shuffle-BN, bank gather, NT-Xent's
    # global negatives), so an error here on one rank cannot leave the others waiting; the count
    # then misses only Eq. 7's columns for other ranks' rows (2N x 2N(W-1) x C, negligible).
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), dist.local():
        try:
            return count_flops(cfg, device, batch)
        except Exception as e:  # noqa: BLE001 - a diagnostic must never stop training
            print(f"note: FLOPs per step not counted ({type(e).__name__}: {e}); the log shows images/s only")
            return None
        finally:
            if device.type == "cuda":  # the copy's activations: give them back to other processes too
                torch.cuda.empty_cache()


def _device_peak(device: torch.device) -> float | None:
    """The GPU's dense bf16 peak FLOP/s (fastsynth.profile's table), None on a CPU or unknown GPU."""
    from fastsynth.profile import bf16_peak
    return bf16_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def _throughput(flops: int, peak: float | None, steps: int, seconds: float) -> dict:
    """{'tflops_per_s', 'mfu'} over an interval; MFU only where the peak is known."""
    if not flops or seconds <= 0:
        return {}
    rate = flops * steps / seconds
    out = {"tflops_per_s": round(rate / 1e12, 4)}
    if peak:
        out["mfu"] = round(rate / peak, 4)
    return out


def train_ssl(model: SynthSSL, splits: Splits, cfg: Config, run: RunDir, device: torch.device,
              stop: StopRequest, state: dict | None = None, plan: fast.Plan | None = None) -> dict:
    """SSL training with Eq. 8 (or Eq. 1 alone with --synth off). Returns the last epoch's means.

    `state`: an SSL checkpoint to continue from exactly (weights, optimizers, scaler, data
    position, RNG states). Checkpoints go to last.pt every epoch, every --checkpoint-every steps
    and on a stop request; the previous --keep-checkpoints - 1 stay beside it. `plan`: the fast
    path's switches (fast.resolve), already applied to the model by fast.prepare.
    """
    plan = plan or fast.resolve(cfg, device)
    fmt = fast.memory_format(plan)
    dataset = FileDataset(splits.train, SSLViews(cfg.image_size), cache=cfg.workers == 0)
    world, rank = dist.world(), dist.rank()
    local_bs = cfg.batch_size // world  # --batch-size is the global batch
    steps_per_epoch = len(dataset) // world // local_bs
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the training set ({len(splits.train)} images)")
    base_lr = cfg.effective_lr()
    opt, dec_opt = fast.optimizers(model, cfg, plan)
    params = [p for p in model.parameters() if p.requires_grad]
    # Several ranks: DDP averages the gradients. Buffers are not broadcast each step: the queue
    # and bank stay identical by construction (every rank adds the same gathered rows), and BN
    # running statistics are per rank unless --bn sync (rank 0's are saved).
    step_model = dist.ddp(model, device) if world > 1 else model
    autocast, scaler = precision(cfg, device)
    # The cosine schedule spans --epochs; --max-steps only ends the run early (a budget that a
    # resume may raise, continuing the same schedule).
    schedule_steps = cfg.epochs * steps_per_epoch
    total_steps = min(schedule_steps, cfg.max_steps) if cfg.max_steps else schedule_steps
    step, start_epoch, skip, epoch_means = 0, 0, 0, {}
    bad = BadSteps(cfg.max_bad_steps)
    train_set = train_fingerprint(splits.train)
    if state is not None:
        saved_set = state.get("train_set")
        if saved_set is not None and saved_set != train_set:
            # The epoch's order, steps per epoch and the schedule's length all follow the set:
            # another set (files added, removed, or newly rejected by the scan) is no continuation.
            raise CheckpointError(
                f"the training set changed since this checkpoint: {saved_set['images']} images then, "
                f"{train_set['images']} now (or the same number, other files or labels); an exact "
                "continuation needs the same set: restore it (--data-root, --max-bad-fraction) or start a fresh run")
        load_into(model, state["model"], "SSL checkpoint (model)")
        load_optimizer(opt, state["optimizer"])
        if dec_opt and state.get("decoder_optimizer"):
            load_optimizer(dec_opt, state["decoder_optimizer"])
        if scaler and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, start_epoch, skip = state["step"], state["epoch"], state["batch_in_epoch"]
        bad.total = state.get("bad_steps", 0)
        bad.in_a_row = state.get("bad_in_a_row", 0)  # a diverging run restarted again and again still stops
        epoch_means = dict(state.get("epoch_means") or {})  # final_* even if no epoch is left to run
        if skip and state.get("data_order") != DATA_ORDER and (world > 1 or state.get("rng_ranks")):
            print("warning: this mid-epoch checkpoint of a multi-process run predates the epoch order every "
                  "world size shares: the rest of this epoch reads another order (some images twice, some not)")
        per_rank = state.get("rng_ranks")
        if per_rank and len(per_rank) == world:
            set_rng_state(per_rank[rank])
        else:
            set_rng_state(state["rng"])
            if rank:  # another number of processes: ranks > 0 must not repeat rank 0's random streams
                seed_everything(cfg.seed * 1_000_003 + step * 7_919 + rank)
        print(f"continuing SSL training at epoch {start_epoch + 1}, batch {skip}, step {step}")
        if run.active:
            _set_aside_newer(run, step)
    elif run.active:
        _set_aside_previous_run(run)

    # Fused optimizers (CUDA) skip a non-finite step on the device; the count of skipped steps is
    # read back every --log-every steps. Otherwise every step is checked on the host.
    deferred = checks_on_device(plan, scaler)
    runs = RunTracker(bad.in_a_row, device) if deferred else None  # bad steps in a row, on the device

    def finite(loss):
        if deferred:
            return ~dist.any_rank_device(~finite_flag(loss, params))
        return bad.check(_finite_everywhere(loss, params), "SSL", step)

    # --cuda-graph (train.py checked its limits): the step captured once and replayed.
    stepper = None
    if plan.cuda_graph:
        stepper = GraphedStep(lambda b, s: ssl_step(step_model, model, opt, dec_opt, scaler, autocast, b, s, finite),
                              (opt, dec_opt), device)

    def checkpoint(epoch: int, batch: int) -> None:
        nonlocal window
        if deferred and window:  # the device-side skip flags not yet read: counted before saving
            n_bad, trailing, longest = runs.read()
            bad.check_window(n_bad, window, "SSL", step, trailing, longest)
            window = 0
        partial = None
        if batch:  # mid-epoch: the epoch's sums so far (all ranks'), so its logged means cover it all
            names = sorted(sums)
            *totals, n = dist.sum_over_ranks(torch.stack([sums[k] for k in names] + [count])).tolist()
            partial = {"sums": dict(zip(names, totals)), "count": n}
        save_checkpoint(model, opt, dec_opt, scaler, cfg, run, epoch, batch, step, bad.total, train_set,
                        bad.in_a_row, partial, epoch_means)

    model.train()
    flops, peak = None, _device_peak(device)  # flops: per step, counted on the first batch this process sees
    # --gc-every: the collector runs at known steps (fastsynth/gcpolicy.py); 0 leaves it to Python.
    with StepGC(cfg.gc_every) as gc_steps:
        for epoch in range(start_epoch, cfg.epochs):
            if step >= total_steps:
                break
            first = skip if epoch == start_epoch else 0
            loader = _ssl_loader(plan, dataset, splits, cfg, local_bs, epoch, first, device)
            # Sums and counts stay on the device; they are read every --log-every steps.
            sums, count, last, ctx = {}, torch.zeros((), device=device), None, {}  # last: (x, x_hat, x_tilde)
            if first and state is not None and state.get("epoch_partial"):
                # A mid-epoch resume: the steps before it count in this epoch's means (rank 0 holds
                # the saved global sums; the other ranks the same keys at zero).
                saved = state["epoch_partial"]
                own = 1.0 if rank == 0 else 0.0
                sums = {k: torch.tensor(v * own, device=device) for k, v in saved["sums"].items()}
                count = torch.tensor(saved["count"] * own, device=device)
            stopping = False
            window = 0  # steps since the device-side skip flags were last read (runs)
            t_epoch = t_log = time.perf_counter()
            images = images_log = steps_done = steps_log = 0
            read = first  # batches of this epoch done: a --max-steps end can leave it unfinished
            bar = tqdm(loader, desc=f"ssl epoch {epoch + 1}/{cfg.epochs}")
            for i, ((x1, x2, x), _, _) in enumerate(bar, start=first):
                x1, x2, x = (t.to(device, non_blocking=True, memory_format=fmt) for t in (x1, x2, x))
                if flops is None:
                    flops = step_flops(cfg, device, (x1, x2, x)) or 0
                    t_epoch = t_log = time.perf_counter()  # the count's own step is not training time
                    if device.type == "cuda":  # nor is its memory: the logged peak is the training step's
                        torch.cuda.reset_peak_memory_stats(device)
                _cosine(opt, base_lr, step, schedule_steps)
                seed = noise_seed(cfg.seed, step, rank, world)
                if stepper is not None:
                    good, loss, parts, ctx, out = stepper((x1, x2, x), seed)
                else:
                    good, loss, parts, ctx, out = ssl_step(step_model, model, opt, dec_opt, scaler, autocast,
                                                           (x1, x2, x), seed, finite)
                w = good.float() if isinstance(good, torch.Tensor) else float(good)
                for k, v in {"loss": loss, **parts}.items():
                    sums[k] = sums.get(k, 0) + torch.nan_to_num(v.detach().float()) * w
                count += w
                images += x1.shape[0]
                steps_done += 1
                if deferred:
                    runs.step(good)
                window += 1
                step += 1
                gc_steps.step(step)
                read = i + 1
                if deferred and (step % cfg.log_every == 0 or i + 1 == steps_per_epoch or step >= total_steps):
                    n_bad, trailing, longest = runs.read()
                    bad.check_window(n_bad, window, "SSL", step, trailing, longest)
                    window = 0
                if out is not None and out["x_tilde"] is not None:  # what the figure needs, no graph
                    last = (x, out["x_hat"], out["x_tilde"])
                if step % cfg.log_every == 0 and hasattr(bar, "set_postfix"):
                    shown = {k: f"{(v / count.clamp_min(1)).item():.3f}" for k, v in sums.items()}  # syncs
                    now = time.perf_counter()
                    shown["img/s"] = f"{(images - images_log) / max(now - t_log, 1e-9):.1f}"  # per process
                    rate = _throughput(flops, peak, steps_done - steps_log, now - t_log)
                    if rate:
                        shown["TFLOP/s"] = f"{rate['tflops_per_s']:.3g}"
                    if "mfu" in rate:
                        shown["MFU"] = f"{100 * rate['mfu']:.1f}%"
                    bar.set_postfix(shown)
                    t_log, images_log, steps_log = now, images, steps_done
                # Checkpoints at the end of a step, before the loader draws the next batch's
                # augmentations: the saved RNG state is the one the next step starts from.
                if dist.any_rank(stop.requested):
                    if i + 1 == steps_per_epoch:  # the epoch is done: log and checkpoint it as any other
                        stopping = True
                        break
                    checkpoint(epoch, i + 1)
                    return {"stopped": True, "ssl_steps": step}
                if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and i + 1 < steps_per_epoch
                        and step < total_steps):  # the last step's checkpoint comes after the epoch's log
                    checkpoint(epoch, i + 1)
                if step >= total_steps:
                    break
            # Every rank's share of the epoch (one collective on every rank): the logged means are
            # the global batch's, not rank 0's shard.
            names = sorted(sums)
            *totals, n_all = dist.sum_over_ranks(torch.stack([sums[k] for k in names] + [count]))
            epoch_means = {k: (v / n_all.clamp_min(1)).item() for k, v in zip(names, totals)}
            seconds = max(time.perf_counter() - t_epoch, 1e-9)
            speed = {"images_per_s": round(images / seconds, 2),  # per process
                     **_throughput(flops, peak, steps_done, seconds)}
            if device.type == "cuda":
                speed["peak_memory_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            run.log({"stage": "ssl", "epoch": epoch, "step": step, "lr": float(opt.param_groups[0]["lr"]),
                     "bad_steps": bad.total, **epoch_means, **speed})
            _collapse_check(cfg.method, ctx, run, epoch)
            # Where a resume (with more --max-steps, say) goes on: this epoch's next batch if the
            # step budget ended it early, else the next epoch.
            checkpoint(*((epoch, read) if read < steps_per_epoch else (epoch + 1, 0)))
            gc_steps.full()
            if last is not None and run.active:
                save_triplets(*last, run.file("triplets.png"))
                run.log_image("triplets", run.file("triplets.png"), step)
            if stopping:
                return {"stopped": True, "ssl_steps": step}
        return {f"final_{k}": v for k, v in epoch_means.items()} | {"ssl_steps": step, "bad_steps": bad.total}


def _ssl_loader(plan: fast.Plan, dataset, splits: Splits, cfg: Config, local_bs: int, epoch: int, first: int,
                device: torch.device):
    """One epoch of this rank's batches from the torchvision or the DALI loader: the same sample
    order, the same ((x1, x2, x), labels, indices) batches."""
    world, rank = dist.world(), dist.rank()
    if plan.loader == "dali":
        from fastsynth.data.dali import make_dali_ssl_loader
        return make_dali_ssl_loader(splits.train, cfg.image_size, local_bs, seed=cfg.seed, epoch=epoch,
                                    skip_batches=first, device="gpu" if device.type == "cuda" else "cpu",
                                    device_id=device.index if device.type == "cuda" else None,
                                    shard_id=rank, num_shards=world, workers=max(cfg.workers, 1))
    return epoch_loader(dataset, local_bs, epoch, cfg.seed, first, cfg.workers, device.type == "cuda",
                        rank=rank, world=world)


RANK_STRIDE = 2 ** 40  # steps a run may take before rank r's seeds meet rank r + 1's


def noise_seed(seed: int, step: int, rank: int = 0, world: int = 1) -> int:
    """The dual-noise seed of a step on a rank: reproducible from --seed, distinct for every
    (step, rank) pair of a run whatever the number of processes, also across a resume under
    another world size (a formula scaled by the world size gave rank 0 of a 2-process step 7
    and the 1-process step 14 the same seed), and the single-process value on rank 0. Below
    2**63 (the Philox key range) for --seed < 2**32 and up to 2**22 ranks. `world` is not used."""
    return seed * 1_000_003 + step + rank * RANK_STRIDE


def checks_on_device(plan: fast.Plan, scaler) -> bool:
    """Whether a step's finiteness is a device flag the fused optimizers read (no host sync);
    otherwise it is read back on the host, and float16 leaves it to the GradScaler."""
    return plan.fused and scaler is None


def ssl_step(step_model, model: SynthSSL, opt, dec_opt, scaler, autocast, batch, seed: int, finite):
    """One step of Eq. 8 (or Eq. 1 alone): forward, backward, the optimizers, then the method's
    state updates (the key encoder's momentum update, the queue). `finite(loss)` says whether
    the step's gradients may be applied, as a bool or, with fused optimizers, as a device flag
    (no host sync). A skipped step moves no weights, key encoder, queue or BatchNorm running
    statistics; only the bank keeps the batch (non-finite features as zeros, FeatureBank).
    `step_model` is `model` or its DDP wrapper. Returns (applied, loss, parts, ctx, synth outputs)."""
    x1, x2, x = batch
    if getattr(model, "cudagraph_steps", False):  # fast.prepare: --compile-mode reduce-overhead
        torch.compiler.cudagraph_mark_step_begin()
    stats = model.running_stats()
    saved = stats.save()
    with autocast():
        loss, parts, ctx, out = step_model(x1, x2, x if model.synth else None, seed=seed)
    opt.zero_grad(set_to_none=True)
    if dec_opt:
        dec_opt.zero_grad(set_to_none=True)
    if scaler:  # float16: the GradScaler skips steps with inf/NaN gradients itself
        scaler.scale(loss).backward()
        opts = [o for o in (opt, dec_opt) if o is not None]
        for o in opts:
            scaler.unscale_(o)
        _one_decision(scaler, opts)
        for o in opts:
            scaler.step(o)
        good = _scaler_applied(scaler, opt)
        scaler.update()
    else:
        loss.backward()
        good = finite(loss)
        if isinstance(good, torch.Tensor):
            # Deferred: fused optimizers read found_inf on the device and skip the update there,
            # so a step costs no host synchronisation (GradScaler drives them the same way).
            skip = (~good).float()
            for o in (opt, dec_opt):
                if o is not None:
                    o.found_inf = skip
                    o.step()
                    del o.found_inf
        elif good:
            opt.step()
            if dec_opt:
                dec_opt.step()
    if isinstance(good, torch.Tensor):
        model.method.after_step(ctx, good)
    elif good:
        model.method.after_step(ctx)
    stats.keep(good, saved)
    return good, loss, parts, ctx, out


def _one_decision(scaler, opts) -> None:
    """The GradScaler decides per optimizer: the encoder's step skipped for an overflow while
    the decoder's goes ahead would leave a half-applied step. Both get the union of their
    found-inf flags (device tensors, no host sync), read from the scaler's per-optimizer record
    (not a public API; where it is missing each optimizer decides alone, as before)."""
    try:
        flags = [f for o in opts for f in scaler._per_optimizer_states[id(o)]["found_inf_per_device"].values()]
        if len(flags) < 2:
            return
        any_inf = torch.stack([f.to(flags[0].device).reshape(()) for f in flags]).amax()
        for f in flags:
            f.copy_(any_inf)
    except (AttributeError, KeyError, RuntimeError):
        return


def _scaler_applied(scaler, opt) -> torch.Tensor | bool:
    """Whether the GradScaler applied this step, as a device flag (no host sync), so a skipped
    float16 step leaves the queue alone too. Read from the scaler's per-optimizer record (not a
    public API): where it is missing the step counts as applied, as before."""
    try:
        found = scaler._per_optimizer_states[id(opt)]["found_inf_per_device"]
        return torch.stack([v.reshape(()) for v in found.values()]).sum() == 0
    except (AttributeError, KeyError, RuntimeError):
        return True


def _finite_everywhere(loss: torch.Tensor, params) -> bool:
    """finite_step on every rank: with several ranks all of them skip a step if one must."""
    return not dist.any_rank(not finite_step(loss, params))


def _ssl_checkpoints(run: RunDir) -> list[str]:
    import os
    return [f for f in os.listdir(run.path) if f == "last.pt" or (f.startswith("ssl-step") and f.endswith(".pt"))]


def _move_aside(run: RunDir, names: list[str], prefix: str) -> str:
    """Move checkpoint files into <prefix>-<time>/ of the run folder (nothing is deleted)."""
    import os
    import time
    dest = run.file(f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(dest, exist_ok=True)
    for f in names:
        os.replace(run.file(f), os.path.join(dest, f))
    return dest


def _set_aside_previous_run(run: RunDir, also: tuple[str, ...] = ()) -> None:
    """A fresh SSL run in a folder that holds an earlier run's checkpoints moves them (and the
    files named in `also` that exist) to previous-<time>/: `--resume auto` must never pick up a
    stale run, and nothing is deleted."""
    import os
    old = _ssl_checkpoints(run) + [f for f in also if os.path.isfile(run.file(f))]
    if old:
        dest = _move_aside(run, old, "previous")
        print(f"note: {run.path} held an earlier run's files ({', '.join(sorted(old))}); moved them to {dest}")


def set_aside_earlier_run(run: RunDir) -> None:
    """A fresh run that begins with the warm-up (--stage all or warmup) in a folder holding an
    earlier run's files moves its checkpoints (warmup.pt and the SSL ones) and its metrics.jsonl
    to previous-<time>/ before any work. Moved only at the SSL stage's start, a run that died in
    its warm-up left --resume auto the earlier run's last.pt to continue (another experiment),
    and the new run's log lines were appended to the old run's curves. Nothing is deleted."""
    _set_aside_previous_run(run, also=("warmup.pt", "metrics.jsonl"))


def _set_aside_newer(run: RunDir, step: int) -> None:
    """Resuming from an older checkpoint than the folder's newest abandons the steps after it:
    their checkpoints move to abandoned-<time>/, or a later --resume auto (after a corrupt
    last.pt, say) could go back to the abandoned run, and rotation would keep them over the
    new run's. Nothing is deleted."""
    newer = [f for f in _ssl_checkpoints(run) if saved_step(run.file(f)) > step]  # -1: left where it is
    if newer:
        dest = _move_aside(run, newer, "abandoned")
        print(f"note: resuming at step {step}; the later checkpoints ({', '.join(sorted(newer))}) moved to {dest}")


DATA_ORDER = 2  # loaders.rank_order (checkpoints without it: DistributedSampler's order for several ranks)


def train_fingerprint(images) -> dict:
    """The training set as a resume must find it again: the image count and a digest of the
    (path below the set's common folder, label) pairs in order; the folder itself may move."""
    import hashlib
    import os
    try:  # the folder above every file (a single file's own folder too)
        root = os.path.commonpath([os.path.dirname(p) for p in images.paths]) if images.paths else ""
    except ValueError:  # no common folder (other drives): the paths as they are
        root = None
    h = hashlib.sha1()
    for path, label in zip(images.paths, images.labels):
        h.update(f"{os.path.relpath(path, root) if root is not None else path}\t{label}\n".encode())
    return {"images": len(images.paths), "digest": h.hexdigest()}


def save_checkpoint(model, opt, dec_opt, scaler, cfg: Config, run: RunDir, epoch: int, batch_in_epoch: int,
                    step: int, bad_steps: int = 0, train_set: dict | None = None, bad_in_a_row: int = 0,
                    epoch_partial: dict | None = None, epoch_means: dict | None = None) -> None:
    """Everything an exact continuation needs; (epoch, batch_in_epoch) is the next batch to read.

    Called on every rank (the RNG states are gathered); only rank 0 writes.
    """
    rngs = dist.gather_objects(rng_state())
    if not run.active:
        return
    state = {"format": FORMAT, "stage": "ssl", "config": cfg.to_dict(), "epoch": epoch,
             "batch_in_epoch": batch_in_epoch, "step": step, "bad_steps": bad_steps,
             "model": model.state_dict(), "optimizer": opt.state_dict(),
             "decoder_optimizer": dec_opt.state_dict() if dec_opt else None,
             "scaler": scaler.state_dict() if scaler else None, "rng": rngs[0],
             "rng_ranks": rngs if len(rngs) > 1 else None, "train_set": train_set, "bad_in_a_row": bad_in_a_row,
             "epoch_partial": epoch_partial, "epoch_means": epoch_means or {},
             "data_order": DATA_ORDER}
    rotate_and_save(state, run, cfg.keep_checkpoints)
