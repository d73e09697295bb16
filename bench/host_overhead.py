"""Host time of the eager calls the training step makes between its compiled networks, without
any kernel running: a CPU measure of what the GPU waits for when the host falls behind.

    python bench/host_overhead.py            # kernels' public calls, then the step's glue
    python bench/host_overhead.py kernels    # info_nce fwd+bwd, dual_noise, FeatureBank
    python bench/host_overhead.py glue       # RunningStats save/keep, the Grad-CAM pass's BN freeze
    python bench/host_overhead.py gc         # a full garbage collection, before and after the freeze
                                             # of --gc-every (not in the default list: it compiles)

kernels: CPU tensors at the paper's sizes under TRITON_INTERPRET=1, with every Triton launch
replaced by a no-op (each module's kernels and its wrap_triton), so what is timed is the Python
and dispatch path from the public function to the launch. glue: the paper model (two ResNet-50s,
heads, decoder) on the CPU; RunningStats' figures include the CPU's own small copies. gc: one
step of the quick preset's model, compiled (about 2 minutes here), then gc.collect() timed
before and after fastsynth.gcpolicy.StepGC's freeze.
Medians of 5 repetitions; one thread. Host speed differs between machines: compare commits on
one machine, never against a GPU host's figures.
"""
from __future__ import annotations

import importlib
import os
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined: CPU tensors take the kernel path

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def median_us(fn, n: int, reps: int = 5) -> float:
    for _ in range(max(3, n // 10)):
        fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        out.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(out)


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def kernels() -> dict:
    mods = [importlib.import_module(f"fastsynth.kernels.{m}") for m in ("info_nce", "dual_noise", "feature_bank")]
    for m in mods:
        m.wrap_triton = lambda kernel: _NoLaunch()
        for name in dir(m):
            if name.startswith("_") and name.endswith("_kernel"):
                setattr(m, name, _NoLaunch())
    nce, dn, fb = mods
    q = F.normalize(torch.randn(256, 128), dim=1).requires_grad_(True)
    k = F.normalize(torch.randn(256, 128), dim=1)
    queue = F.normalize(torch.randn(65536, 128), dim=1)

    def nce_step():
        q.grad = None
        nce.info_nce(q, k, queue, 0.2, impl="triton").backward()
    z, s, v = torch.randn(128, 2048), torch.rand(128, 2048), torch.rand(2048)
    bank = fb.FeatureBank(65536, 2048, impl="triton")
    zb = torch.randn(128, 2048)

    def bank_step():
        bank.update(zb)
        bank.variance()
    return {"info_nce fwd+bwd (N 256, K 65536, C 128)": median_us(nce_step, 400),
            "dual_noise (B 128, d 2048)": median_us(lambda: dn.dual_noise(z, s, v, 1.0, 1.0, 0.02, 0, impl="triton"), 400),
            "FeatureBank update + variance (M 65536, d 2048, B 128)": median_us(bank_step, 400)}


def glue() -> dict:
    from fastsynth.config import Config
    from fastsynth.model import SynthSSL
    from fastsynth.models import frozen_bn_stats
    model = SynthSSL(Config())  # the paper preset: ResNet-50, MoCo v2, synthesized pairs
    stats = model.running_stats()
    ok = torch.tensor(True)
    saved = stats.save()

    def freeze():
        with frozen_bn_stats(*model.method.score_nets):
            pass
    return {f"RunningStats.save ({len(stats.modules)} BatchNorm layers)": median_us(stats.save, 50),
            "RunningStats.keep (device flag)": median_us(lambda: stats.keep(ok, saved), 50),
            "frozen_bn_stats(score_nets) enter + exit": median_us(freeze, 50)}


def gc_pause() -> dict:
    import gc

    from fastsynth.config import from_args
    from fastsynth.engine import ssl_step
    from fastsynth.gcpolicy import StepGC
    from fastsynth.guard import finite_step
    from fastsynth.profile import build, random_batch
    cfg = from_args(["--preset", "quick", "--image-size", "32", "--batch-size", "4", "--impl", "fast", "--compile",
                     "--device", "cpu"])
    model, _, opt, dec_opt, autocast, scaler = build(cfg, torch.device("cpu"))
    batch = random_batch(cfg, torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]

    def step(seed):
        ssl_step(model, model, opt, dec_opt, scaler, autocast, batch, seed, lambda loss: finite_step(loss, params))

    def collect_after_steps(seed):  # a step, then one full collection timed: median of 3
        times = []
        for i in range(3):
            step(seed + i)
            t = time.perf_counter()
            gc.collect()
            times.append((time.perf_counter() - t) * 1e6)
        return statistics.median(times)
    step(0)  # compiles
    out = {f"gc.collect() after a step, {len(gc.get_objects())} objects tracked": collect_after_steps(1)}
    with StepGC(1) as g:
        step(4)
        g.step(1)  # the first step of the block: collect, then freeze
        out[f"the same after StepGC's freeze ({g.frozen} frozen)"] = collect_after_steps(5)
    return out


PARTS = {"kernels": kernels, "glue": glue, "gc": gc_pause}


def main(argv=None) -> int:
    parts = (argv if argv is not None else sys.argv[1:]) or ["kernels", "glue"]
    unknown = set(parts) - set(PARTS)
    if unknown:
        print(f"unknown part(s) {', '.join(sorted(unknown))}: choose {', '.join(PARTS)}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, host CPU, one thread; medians in us")
    for part in parts:
        for name, us in PARTS[part]().items():
            print(f"{name:<58}{us:>10.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
