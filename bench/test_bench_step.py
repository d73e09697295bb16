"""One full training step of the method (issue 4): the forward of every Eq. 8 term, backward, the
SGD and Adam steps and the queue update (`engine.ssl_step`), fast path against reference path.

Both cases take the same random batch (drawn from one seed on the host), already on the device:
the loader is not in this figure (`python -m fastsynth.profile --data loader` times it).

- GPU: the paper preset, ResNet-50 at 224 px, batch 128, queue 65536. fast = `--impl fast --amp`
  (bfloat16 autocast, channels-last, torch.compile, Triton kernels, fused optimizers);
  reference = `--impl reference`, eager float32 as issue 4 defines the baseline of its 3x target.
- CPU: the quick preset (ResNet-18 at 64 px) at batch 16, so CI's single run of each body
  (--benchmark-disable) stays in seconds. fast is `--impl fast --no-compile` here: compiling
  the networks with inductor on a 2-core CPU takes about 3 minutes per case; the Triton kernels
  fall back to their references on CPU tensors, so the CPU fast case is channels-last + DALI's
  plan switches around the same eager ops.
"""
import pytest
import torch

from benchutil import CUDA, peak_bytes, record, sync
from fastsynth import fast
from fastsynth.config import from_args
from fastsynth.engine import noise_seed, ssl_step
from fastsynth.profile import build, count_flops, random_batch

COMMON = ["--preset", "paper"] if CUDA else ["--preset", "quick", "--batch-size", "16"]
FLAGS = {"fast": ["--impl", "fast", "--amp"] if CUDA else ["--impl", "fast", "--no-compile"],
         "reference": ["--impl", "reference"]}
WARMUP = 3 if CUDA else 1  # steps before timing: compile, cuDNN and Triton autotuning happen here


@pytest.mark.parametrize("impl", list(FLAGS))
def test_bench_step(benchmark, dev, impl):
    cfg = from_args(COMMON + FLAGS[impl])
    model, plan, opt, dec_opt, autocast, scaler = build(cfg, dev)
    batch = random_batch(cfg, dev, fast.memory_format(plan), seed=0)
    n = 0

    def step():
        nonlocal n
        # No finiteness check: it reads the loss back, a host sync the training loop avoids too.
        ssl_step(model, model, opt, dec_opt, scaler, autocast, batch, noise_seed(cfg.seed, n), lambda loss: True)
        n += 1
        sync(dev)

    for _ in range(WARMUP - 1):
        step()
    peak = peak_bytes(step, dev)  # the last warm-up step
    benchmark(step)
    flops = count_flops(cfg, dev, batch)  # forward + backward matmul/conv FLOPs, the same for both impls
    mean = benchmark.stats.stats.mean if benchmark.stats else None
    record(benchmark, dev, impl, torch.bfloat16 if cfg.amp else torch.float32, peak, flops=flops,
           arch=cfg.arch, image_size=cfg.image_size, batch=cfg.batch_size, plan=plan.describe())
    benchmark.extra_info["images_per_s"] = cfg.batch_size / mean if mean else None
    benchmark.extra_info["flops_per_step"] = flops
