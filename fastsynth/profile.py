"""`python -m fastsynth.profile`: throughput of the full SSL training step on one device (issue 4).

The model, plan, optimizers and precision are built as `train.py` builds them for the SSL stage;
every step is `engine.ssl_step`, unchanged. Reported: images/s per process, step time, a stage
table, peak memory, FLOPs per step, TFLOP/s and MFU against the device's dense bf16 peak (the
issue's figure, whatever --amp says). `--data synthetic-gpu`: one random batch already on the
device (a CPU too): the step alone; `--data loader`: the plan's loader (DALI or torchvision).

Stages: the networks' calls, MoCo's keys(), the Grad-CAM pass, the bank/noise code and the
optimizers' zero_grad/step are wrapped, on this profiler's own model, to drop a time mark at
entry and exit: a CUDA event on the current stream on a GPU (the GPU timeline, no host sync),
perf_counter on a CPU (ops are synchronous there). Each interval between consecutive marks
belongs to the innermost stage open at its start, so the rows add up to the step time exactly.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import itertools
import json
import os
import platform
import resource
import signal
import statistics
import sys
import threading
import time

import torch

from fastsynth import fast
from fastsynth.config import ConfigError, build_parser, from_args
from fastsynth.data.base import DatasetError
from fastsynth.gcpolicy import GCTimer, StepGC
from fastsynth.progress import tqdm

DATA = ("synthetic-gpu", "loader")
# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by a fragment of the device name; first
# match wins, so the PCIe H100 comes before the SXM one.
# NVL cards (PCIe form, lower clocks): 835 dense in NVIDIA's H100 / H200 NVL datasheets.
BF16_PEAK = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
             ("A100", 312e12))
GLUE = "losses + glue"
STAGES = {  # row -> what it measures (printed with --json, and the order of the table)
    "data wait": "end of the previous step to the batch on the device: loader next() + copy",
    "query encoder+head fwd": "f, g (and SimSiam's h) forwards with grad, wherever they run",
    "key encoder fwd": "MoCo keys(): the no-grad forward of f_k, g_k",
    "decoder fwd": "D(z) and D(z_tilde)",
    "Grad-CAM scores": "Eq. 3: head forward + autograd.grad to z, the score (networks inside count here)",
    "bank + dual noise": "bank update and variance, v_bar, dual noise (Sec. 3.4-3.5; Triton on a GPU)",
    GLUE: "the rest of the forward: InfoNCE, MSE, NT-Xent, normalisation, concatenation, Eq. 8, "
          "the BatchNorm statistics' snapshot a skipped step would restore",
    "backward": "zero_grad to the first optimizer step: loss.backward, the finiteness check as "
                "training makes it (and float16 unscale)",
    "optimizer + EMA + queue": "SGD and Adam steps, then the momentum update of f_k, g_k and the queue update",
}
# --cuda-graph: the step is one replay, whose inside no stage mark can see.
GRAPH_ROW = "whole step (one CUDA graph)"
GRAPH_MEANING = {"data wait": STAGES["data wait"],
                 GRAPH_ROW: "copying the batch and seed into the graph's inputs, then the replay of the captured step"}


class StageClock:
    """Time marks at stage boundaries; see the module docstring for what an interval means."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[object, str | None]] = []  # (stamp, stage of the interval starting here)
        self.stack: list[str] = []
        self.base = "data wait"
        self.sticky = {"Grad-CAM scores"}  # networks called inside keep this label

    def mark(self, label: str | None) -> None:
        if self.cuda:
            stamp = torch.cuda.Event(enable_timing=True)
            stamp.record()
        else:
            stamp = time.perf_counter()
        self.marks.append((stamp, label))

    def phase(self, label: str) -> None:
        """The label of the time outside any wrapped call (data, forward glue, backward, ...)."""
        if self.base != label:
            self.base = label
            if not self.stack:
                self.mark(label)

    @contextlib.contextmanager
    def stage(self, label: str):
        if self.stack and self.stack[-1] in self.sticky:
            label = self.stack[-1]
        self.stack.append(label)
        self.mark(label)
        try:
            with torch.profiler.record_function(label):  # the same rows as ranges in --trace
                yield
        finally:
            self.stack.pop()
            self.mark(self.stack[-1] if self.stack else self.base)

    def wrap(self, fn, label: str):
        def timed(*args, **kwargs):
            with self.stage(label):
                return fn(*args, **kwargs)
        return timed

    def intervals(self) -> list[tuple[str, float]]:
        """(stage, seconds) of every closed interval; call after the device is synchronised."""
        return [(label, a.elapsed_time(b) / 1e3 if self.cuda else b - a)
                for (a, label), (b, _) in zip(self.marks, self.marks[1:])]


def _time_calls(module: torch.nn.Module, clock: StageClock, label: str) -> None:
    """Mark every call of `module`. A subclass with its own __call__, because forward hooks run
    inside a torch.compile'd module (nn.Module.compile compiles _call_impl, hooks included) and
    would break its graph; this wrapper stays outside the compiled region."""
    cls = module.__class__

    def __call__(self, *args, **kwargs):
        with clock.stage(label):
            return cls.__call__(self, *args, **kwargs)
    module.__class__ = type(f"Timed{cls.__name__}", (cls,), {"__call__": __call__})


def instrument(model, opt, dec_opt, clock: StageClock) -> None:
    """Wrap the step's pieces in place: for the profiler's own model and optimizers only."""
    m = model.method
    for name in ("encoder", "head", "predictor"):
        if hasattr(m, name):
            _time_calls(getattr(m, name), clock, "query encoder+head fwd")
    if hasattr(m, "keys"):
        m.keys = clock.wrap(m.keys, "key encoder fwd")
    if model.synth is not None:
        _time_calls(model.synth.decoder, clock, "decoder fwd")
        model.synth.scores = clock.wrap(model.synth.scores, "Grad-CAM scores")
        model.synth.perturb = clock.wrap(model.synth.perturb, "bank + dual noise")
    for o in filter(None, (opt, dec_opt)):
        zero, step = o.zero_grad, o.step

        def zero_grad(*a, _zero=zero, **k):
            _zero(*a, **k)
            clock.phase("backward")  # ssl_step zeroes the gradients right before backward

        def opt_step(*a, _step=step, **k):
            clock.phase("optimizer + EMA + queue")
            return _step(*a, **k)
        o.zero_grad, o.step = zero_grad, opt_step


def build(cfg, device: torch.device, plan: fast.Plan | None = None):
    """As train.py's run() and train_ssl() build the SSL stage: (model, plan, opt, dec_opt,
    autocast, scaler); `plan` is fast.resolve's unless given."""
    from fastsynth.engine import precision
    from fastsynth.model import SynthSSL
    from fastsynth.train import seed_everything
    seed_everything(cfg.seed)
    model = SynthSSL(cfg).to(device)
    plan = plan or fast.resolve(cfg, device)
    fast.prepare(model, plan, cfg.compile_mode)
    opt, dec_opt = fast.optimizers(model, cfg, plan)
    autocast, scaler = precision(cfg, device)
    model.train()
    return model, plan, opt, dec_opt, autocast, scaler


def random_batch(cfg, device: torch.device, fmt=torch.contiguous_format, seed: int = 0):
    """(x1, x2, x): normalised-image-like N(0, 1) tensors drawn on the host from `seed`, so every
    impl gets the same inputs, then moved to the device once."""
    g = torch.Generator().manual_seed(seed)
    shape = (cfg.batch_size, 3, cfg.image_size, cfg.image_size)
    return tuple(torch.randn(shape, generator=g).to(device, memory_format=fmt) for _ in range(3))


class _NoModuleTracker(contextlib.nullcontext):
    parents = frozenset({"Global"})  # what FlopCounterMode reads: every count goes to the total


def count_flops(cfg, device: torch.device, batch) -> int:
    """FLOPs of one step's forward + backward (matmuls and convolutions, FlopCounterMode), on an
    eager copy with the plain-PyTorch kernels: the count is the method's, the same for every
    impl, and compiled or Triton code would hide ops from the counter. Optimizer flops are not
    counted (elementwise, as are BatchNorm and the noise)."""
    from torch.utils.flop_counter import FlopCounterMode

    from fastsynth.engine import precision
    from fastsynth.model import SynthSSL
    model = SynthSSL(cfg, kernel_impl="torch").to(device).train()
    autocast, _ = precision(cfg, device)
    x1, x2, x = (t.contiguous() for t in batch)
    counter = FlopCounterMode(display=False)
    # Its per-module tracker hooks autograd and fails inside the Grad-CAM pass's autograd.grad
    # (Eq. 3: "a leaf node was passed to _will_engine_execute_node"); only the total is needed.
    counter.mod_tracker = _NoModuleTracker()
    with counter:
        with autocast():
            loss = model(x1, x2, x if model.synth is not None else None, seed=0)[0]
        loss.backward()
    return int(counter.get_total_flops())


def _batches(cfg, plan, device, data: str):
    """An endless iterator of device batches. The dataset is built and scanned here, before the
    model, so a data error is reported before anything else runs (as in train.py)."""
    fmt = fast.memory_format(plan)
    if data == "synthetic-gpu":
        return itertools.repeat(random_batch(cfg, device, fmt, cfg.seed))
    from fastsynth.data.datasets import build_dataset
    from fastsynth.data.loaders import FileDataset
    from fastsynth.data.scan import clean_splits
    from fastsynth.data.transforms import SSLViews
    from fastsynth.engine import _ssl_loader  # the training loop's own loader choice
    splits = clean_splits(build_dataset(cfg.dataset, cfg.data_root, cfg.download, cfg.seed),
                          cfg.max_bad_fraction, os.devnull, workers=max(cfg.workers, 4))
    if len(splits.train) < cfg.batch_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the training set ({len(splits.train)} images)")
    dataset = FileDataset(splits.train, SSLViews(cfg.image_size), cache=cfg.workers == 0)

    def epochs():  # as training runs them: a fresh loader (DALI: a fresh pipeline) each epoch
        epoch = 0
        while True:
            for views, _, _ in _ssl_loader(plan, dataset, splits, cfg, cfg.batch_size, epoch, 0, device):
                yield tuple(t.to(device, non_blocking=True, memory_format=fmt) for t in views)
            epoch += 1
    return epochs()


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).replace("torch.", "")


def bf16_peak(name: str) -> float | None:
    return next((peak for frag, peak in BF16_PEAK if frag in name), None)


def _version(module: str) -> str | None:
    try:
        return __import__(module, fromlist=["__version__"]).__version__
    except Exception:  # noqa: BLE001 - absent or broken: recorded as None
        return None


class Progress:
    """The --json file kept current while the run goes, marked "complete": false until the end.

    A run stopped from outside (gpu_check.sh's per-step timeout sends SIGTERM) still leaves what
    it reached: the phase it was in, for how long, and each finished warm-up step's seconds,
    which is how long a compiling first step took, or at least ran, on a device whose time is
    scarce. SIGTERM writes that record and exits with 143; a SIGKILL leaves the last one written.
    """

    def __init__(self, path: str | None, header: dict):
        self.path, self.header = path, header
        self.state = {"phase": "building", "warmup_step_s": []}
        self.since = time.perf_counter()
        self._installed, self._previous = False, None
        self._pid = os.getpid()

    def update(self, phase: str, **fields) -> None:
        self.state.update(phase=phase, **fields)
        self.since = time.perf_counter()
        self.write()

    def write(self, **extra) -> None:
        if self.path:
            write_json(self.path, {**self.header, "complete": False, **self.state, **extra})

    def finish(self, record: dict) -> None:
        if self.path:
            write_json(self.path, record)

    def _stopped(self, signum, frame):
        if os.getpid() != self._pid:  # a forked loader worker inherited the handler: its record is stale
            raise SystemExit(128 + signum)
        self.write(stopped_by=signal.Signals(signum).name, phase_running_s=round(time.perf_counter() - self.since, 2))
        print(f"\n{signal.Signals(signum).name}: stopped in phase {self.state['phase']!r}"
              + (f"; partial record in {self.path}" if self.path else ""), file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    def __enter__(self) -> Progress:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            # None when the previous handler was not set from Python: restored as it was too.
            self._previous = signal.signal(signal.SIGTERM, self._stopped)
            self._installed = True
        self.write()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
        if exc_type is not None and not issubclass(exc_type, SystemExit):  # SIGTERM wrote its own record
            self.write(error=f"{exc_type.__name__}: {exc}"[-2000:],
                       phase_running_s=round(time.perf_counter() - self.since, 2))


def write_json(path: str, record: dict) -> None:
    """Whole or not at all: a reader (or a kill) never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(record, fh, indent=2)
    os.replace(tmp, path)


def profile(cfg, steps: int, warmup: int, data: str = "synthetic-gpu", trace: str | None = None,
            json_path: str | None = None) -> dict:
    """Time `steps` training steps after `warmup` untimed ones (torch.compile compiles there).
    json_path: where the record goes, kept current during the run (Progress)."""
    from fastsynth.engine import autocast_dtype, resolve_device
    if steps < 1 or warmup < 0:
        raise ConfigError(f"--steps must be >= 1 and --warmup-steps >= 0, got {steps} and {warmup}")
    if data not in DATA:
        raise ConfigError(f"--data {data!r}: choose one of {', '.join(DATA)}")
    try:
        device = resolve_device(cfg.device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the stage marks record on the current device's stream
    plan = fast.resolve(cfg, device)
    if plan.cuda_graph:  # the capture happens in an untimed step: eager steps first, then it
        from fastsynth.graphstep import WARMUP
        warmup = max(warmup, WARMUP + 1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu {platform.machine()}"
    header = {
        "impl": plan.impl, "plan": dataclasses.asdict(plan), "plan_text": plan.describe(), "data": data,
        "device": str(device), "device_name": name, "date": datetime.date.today().isoformat(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                     "triton": _version("triton"), "dali": _version("nvidia.dali")},
        "arch": cfg.arch, "image_size": cfg.image_size, "batch_size": cfg.batch_size, "amp": cfg.amp,
        "autocast_dtype": _dtype_name(autocast_dtype(cfg, device)),  # None: float32 (--amp may say otherwise)
        # What float32 means on a GPU: PyTorch's defaults, which run convolutions in TF32 on
        # Ampere and newer (faster than IEEE float32, so a stricter baseline), matmuls not.
        "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
        "steps": steps, "warmup_steps": warmup, "trace": trace, "config": cfg.to_dict(),
    }
    with Progress(json_path, header) as progress:
        result = {**header, **_profile(cfg, plan, device, name, steps, warmup, data, trace, progress), "complete": True}
        progress.finish(result)
    return result


def _profile(cfg, plan, device, name, steps, warmup, data, trace, progress: Progress) -> dict:
    from fastsynth.engine import autocast_dtype, checks_on_device, noise_seed, ssl_step
    from fastsynth.graphstep import GraphedStep, check
    from fastsynth.guard import finite_flag, finite_step
    check(cfg, plan, device, autocast_dtype(cfg, device) == torch.float16, 1)
    batches = _batches(cfg, plan, device, data)
    model, _, opt, dec_opt, autocast, scaler = build(cfg, device, plan)
    clock = StageClock(device)
    stepper = None
    if plan.cuda_graph:  # no stage marks inside a captured step: the table has the whole step
        stepper = GraphedStep(lambda b, s: ssl_step(model, model, opt, dec_opt, scaler, autocast, b, s, finite),
                              (opt, dec_opt), device)
    else:
        instrument(model, opt, dec_opt, clock)
    step_no = 0
    params = [p for p in model.parameters() if p.requires_grad]
    deferred = checks_on_device(plan, scaler)  # the finiteness check training makes

    def finite(loss):
        return finite_flag(loss, params) if deferred else finite_step(loss, params)

    def one_step():
        nonlocal step_no
        clock.phase("data wait")
        batch = next(batches)
        if stepper is not None:
            clock.phase(GRAPH_ROW)
            stepper(batch, noise_seed(cfg.seed, step_no))
        else:
            clock.phase(GLUE)
            ssl_step(model, model, opt, dec_opt, scaler, autocast, batch, noise_seed(cfg.seed, step_no), finite)
        step_no += 1
        gc_steps.step(step_no)  # as training's loop does with --gc-every

    with StepGC(cfg.gc_every) as gc_steps:  # every step this runs, as training would run it
        alloc_before = _allocator_counts(device)
        wall, step_s, stage_s, peak_mem, mem_kind, warm_s, gc_pauses = _time_steps(
            one_step, clock, device, steps, warmup, plan.impl, progress)
        allocator = _allocator_delta(alloc_before, _allocator_counts(device), steps)
        images_per_s = cfg.batch_size * steps / wall
        progress.update("host enqueue time", images_per_s=images_per_s, step_s=step_s)
        host_s = _host_enqueue_s(one_step, device, min(steps, 3))
        progress.update("host syncs of one step")
        syncs = _host_syncs(one_step, device)
        summary = None
        if trace:
            progress.update("trace")
            summary = _trace(trace, one_step, min(steps, 3), device)
    progress.update("counting FLOPs", host_enqueue_ms=statistics.median(host_s) * 1e3)
    flops = count_flops(cfg, device, random_batch(cfg, device))
    mean = statistics.fmean(step_s)
    peak = bf16_peak(name) if device.type == "cuda" else None
    return {
        "wall_s": wall, "images_per_s": images_per_s,
        # Seconds of each warm-up step: compilation (--compile) shows up here, mostly in the first.
        "warmup_step_s": warm_s,
        "step_ms": {"mean": mean * 1e3, "median": statistics.median(step_s) * 1e3,
                    "min": min(step_s) * 1e3, "max": max(step_s) * 1e3},
        "stages_ms": {k: v / steps * 1e3 for k, v in stage_s.items()},
        "stages_meaning": GRAPH_MEANING if stepper is not None else STAGES,
        # The host's own time for a step, started on an idle GPU (below): near the step time, the
        # GPU waits for launches; on the H200 four small stages grew by 8 ms under compile.
        "host_enqueue_ms": statistics.median(host_s) * 1e3, "step_syncs_host": not deferred,
        # Python's garbage collections during the timed steps (fastsynth.gcpolicy): host pauses
        # that become GPU idle time where the host is not ahead of the GPU.
        "gc_every": cfg.gc_every, **gc_pauses,
        # Synchronising calls of one more step (torch's sync debug mode, fastsynth.syncwatch):
        # each empties the launch queue. None on a CPU.
        "host_syncs": syncs,
        # The caching allocator's cudaMalloc/cudaFree calls per timed step (a cudaFree waits for
        # the device) and its retries after a failed allocation; None on a CPU. A warm step
        # should reuse its blocks: nonzero means allocator churn inside the timed steps.
        "allocator_per_step": allocator,
        "peak_memory_bytes": peak_mem, "peak_memory_kind": mem_kind,
        "flops_per_step": flops, "tflops_per_s": flops / mean / 1e12,
        "bf16_peak_tflops": peak / 1e12 if peak else None, "mfu": flops / mean / peak if peak else None,
        "trace_summary": summary,
    }


def _host_enqueue_s(one_step, device: torch.device, n: int) -> list[float]:
    """Host seconds of each of n more steps, each started on an idle GPU and not waited for.

    The timed steps run back to back, where a full launch queue makes the host wait for the GPU
    and host and GPU time read alike; here the queue starts empty, so a step without a host sync
    (the fast path) measures its Python, dispatch and launch overhead alone. A step that syncs
    (the reference path's finiteness check) includes the GPU's time up to that sync. On a CPU
    the ops run synchronously: this is the step time.
    """
    cuda = device.type == "cuda"
    out = []
    for _ in range(n):
        if cuda:
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        one_step()
        out.append(time.perf_counter() - t)
    if cuda:
        torch.cuda.synchronize(device)
    return out


def _host_syncs(one_step, device: torch.device) -> dict | None:
    """{"count": syncs in one step, "sites": [[file:line function, count], ...]}; None on a CPU."""
    if device.type != "cuda":
        return None
    from fastsynth.syncwatch import SyncWatch
    torch.cuda.synchronize(device)
    with SyncWatch(device) as watch:
        one_step()
    torch.cuda.synchronize(device)
    return {"count": watch.count, "sites": [list(site) for site in watch.sites]}


ALLOCATOR_COUNTS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")


def _allocator_counts(device: torch.device) -> dict | None:
    if device.type != "cuda":
        return None
    stats = torch.cuda.memory_stats(device)
    return {k: stats.get(k, 0) for k in ALLOCATOR_COUNTS}


def _allocator_delta(before: dict | None, after: dict | None, steps: int) -> dict | None:
    if before is None or after is None:
        return None
    return {k.removeprefix("num_"): (after[k] - before[k]) / steps for k in ALLOCATOR_COUNTS}


def _time_steps(one_step, clock: StageClock, device: torch.device, steps: int, warmup: int, impl: str,
                progress: Progress | None = None):
    """(wall s, [s per step], {stage: s over all steps}, peak memory bytes, what that peak is,
    [s per warm-up step], the timed steps' garbage collections (GCTimer.summary))."""
    cuda = device.type == "cuda"
    bar = tqdm(total=warmup + steps, desc=f"profile {impl}")
    warm_s = []
    for i in range(warmup):
        if progress:
            progress.update(f"warm-up step {i + 1} of {warmup}", warmup_step_s=warm_s)
        bar.update(1)
        t = time.perf_counter()
        one_step()
        if cuda:
            torch.cuda.synchronize(device)
        warm_s.append(time.perf_counter() - t)
    if progress:
        progress.update(f"{steps} timed steps", warmup_step_s=warm_s)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    clock.marks, starts = [], []
    t0 = time.perf_counter()
    with GCTimer() as collections:
        for _ in range(steps):
            starts.append(len(clock.marks))  # a step runs from its first mark to the next step's
            clock.base = "data wait"
            clock.mark("data wait")
            bar.update(1)  # host only; in the data wait row, where the loop's own overhead belongs
            one_step()
        clock.mark(None)
        if cuda:
            torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    bar.close()
    intervals = clock.intervals()
    bounds = starts + [len(intervals)]
    step_s = [sum(s for _, s in intervals[a:b]) for a, b in itertools.pairwise(bounds)]
    stage_s = dict.fromkeys(STAGES if GRAPH_ROW not in {label for label, _ in intervals} else GRAPH_MEANING, 0.0)
    for label, s in intervals:
        stage_s[label] += s
    gc_pauses = collections.summary(steps)
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        return wall, step_s, stage_s, peak, "cuda max_memory_allocated, timed steps", warm_s, gc_pauses
    # ru_maxrss is KiB on Linux: the process's lifetime peak, loader and dataset included.
    return (wall, step_s, stage_s, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS of the process",
            warm_s, gc_pauses)


def _trace(path: str, one_step, n: int, device: torch.device) -> dict:
    """A torch.profiler trace of n steps after the timed ones (its overhead stays out of the
    figures), written by tensorboard_trace_handler: Chrome JSON that TensorBoard, Perfetto and
    chrome://tracing open. Returns its summary (fastsynth.trace_summary): the GPU's idle time
    by stage, small enough for the JSON record."""
    from torch.profiler import ProfilerActivity, schedule, tensorboard_trace_handler

    from fastsynth import trace_summary
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    os.makedirs(path, exist_ok=True)
    with torch.profiler.profile(activities=acts, schedule=schedule(wait=0, warmup=1, active=n, repeat=1),
                                on_trace_ready=tensorboard_trace_handler(path)) as prof:
        for _ in range(n + 1):
            one_step()
            prof.step()
    return trace_summary.from_profiler(prof, set(STAGES), n)


def _sync_lines(r: dict) -> list[str]:
    syncs, alloc = r.get("host_syncs"), r.get("allocator_per_step")
    if syncs is None:
        return []
    where = "; ".join(f"{site} x{n}" for site, n in syncs["sites"][:3])
    lines = [f"host syncs in one step {syncs['count']}" + (f" ({where})" if where else "")]
    if alloc is not None:
        lines.append("allocator per step: " + ", ".join(f"{k} {v:g}" for k, v in alloc.items()))
    return lines


def format_table(r: dict) -> str:
    mfu = f"{r['mfu'] * 100:.1f} %" if r["mfu"] is not None else f"n/a ({r['device_name']}: no bf16 peak known)"
    lines = [f"{r['plan_text']}; data {r['data']}; {r['device_name']}",
             (f"{r['arch']} at {r['image_size']} px, batch {r['batch_size']}, amp {r['amp']} "
              f"(autocast {r.get('autocast_dtype') or 'off: float32'}): "
              f"{r['steps']} steps after {r['warmup_steps']} warm-up "
              f"({sum(r['warmup_step_s']):.1f} s, the first {(r['warmup_step_s'] or [0])[0]:.1f} s)"),
             (f"images/s per process {r['images_per_s']:.1f}   step ms mean {r['step_ms']['mean']:.2f}  "
              f"median {r['step_ms']['median']:.2f}"), "",
             f"{'stage':<26}{'ms/step':>10}{'%':>7}"]
    for k, v in r["stages_ms"].items():
        lines.append(f"{k:<26}{v:>10.2f}{100 * v / r['step_ms']['mean']:>7.1f}")
    lines += [f"{'total (= step time)':<26}{sum(r['stages_ms'].values()):>10.2f}{100.0:>7.1f}", "",
              f"peak memory {r['peak_memory_bytes'] / 2**30:.2f} GiB ({r['peak_memory_kind']})",
              (f"garbage collection {r['gc_ms_per_step']:.2f} ms/step, longest {r['gc_max_ms']:.1f} ms, "
               f"collections by generation {r['gc_collections']} "
               f"({'automatic' if not r['gc_every'] else 'young every %d steps' % r['gc_every']})"),
              (f"host enqueue ms/step {r['host_enqueue_ms']:.2f} (a step started on an idle GPU, "
               + ("its data wait included; near the step time: launch-bound)" if not r.get("step_syncs_host")
                  else "but this path syncs the host once per step: not a launch measure)")),
              *_sync_lines(r),
              (f"FLOPs/step {r['flops_per_step'] / 1e9:.2f} G   achieved {r['tflops_per_s']:.3f} TFLOP/s   "
               f"MFU vs bf16 peak {mfu}")]
    if r["trace"]:
        from fastsynth.trace_summary import format_lines
        lines.append(f"trace: {r['trace']}")
        lines += format_lines(r["trace_summary"]) if r.get("trace_summary") else []
    return "\n".join(lines)


def _parsers():
    full = build_parser(__doc__.splitlines()[0])
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for p in (full.add_argument_group("profiling"), own):
        p.add_argument("--steps", type=int, default=20, help="timed steps")
        p.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first (compile happens here)")
        p.add_argument("--data", choices=DATA, default="synthetic-gpu",
                       help="synthetic-gpu: one random batch on the device; loader: the plan's loader")
        p.add_argument("--trace", metavar="DIR", help="write a torch.profiler Chrome trace of a few more steps")
        p.add_argument("--json", metavar="PATH", help="write every figure, the versions and the config")

    def error(message):  # one line, not argparse's usage block
        raise ConfigError(f"{message} (python -m fastsynth.profile --help lists the options)")
    full.error = error
    full.allow_abbrev = False  # the training flags are split off by exact name below
    return full, own


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        full, own = _parsers()
        full.parse_args(argv)  # every flag and value checked once, --help answered
        opts, rest = own.parse_known_args(argv)
        cfg = from_args(rest, description=__doc__.splitlines()[0])
        result = profile(cfg, opts.steps, opts.warmup_steps, opts.data, opts.trace, opts.json)
    except (ConfigError, DatasetError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    if opts.json:
        print(f"figures: {opts.json}")  # written by profile()
    return 0


if __name__ == "__main__":
    sys.exit(main())
