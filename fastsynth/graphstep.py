"""The whole SSL step as one CUDA graph (`--cuda-graph`): captured once, replayed every step.

A replay launches the step's thousands of kernels (four encoder passes, the Grad-CAM pass,
backward, both optimizers, the momentum update, queue and bank) with one call and no Python, so
the GPU never waits for the host: what torch.compile's `reduce-overhead` does per network, here
for the glue between them too.

What a replay cannot see, it must not need: everything the step reads that changes from step to
step lives in device memory at a fixed address. The batch is copied into static input buffers;
the noise seed is a device scalar the dual-noise kernel reads (kernels/dual_noise.py); the
learning rates are device scalars the fused SGD reads, which the schedule fills in place
(engine._cosine); the queue and bank pointers, BatchNorm statistics and the skip flag were device
tensors already. The first WARMUP steps run eagerly on the capture stream (compilation, cuDNN's
algorithm search and Triton's JIT happen there, none of which may run inside a capture); the
next one is captured and replayed, and every later one is a replay.

Limits, checked by `check`: a CUDA device, one process (the step's collectives are not
captured), no float16 GradScaler (it decides on the host), fused optimizers, the Triton kernels
(`--impl fast`), and not together with compile's own CUDA graphs (`--compile-mode
reduce-overhead` or `max-autotune`).
"""
from __future__ import annotations

import torch

from fastsynth.config import ConfigError
from fastsynth.kernels._dispatch import HAS_TRITON

WARMUP = 3  # eager steps before the capture


def check(cfg, plan, device: torch.device, float16: bool, world: int) -> None:
    """ConfigError naming what --cuda-graph cannot run with (float16: autocast to float16, which
    a GradScaler drives)."""
    if not plan.cuda_graph:
        return
    problems = []
    if device.type != "cuda":
        problems.append(f"a CUDA device (this run is on {device})")
    if world > 1:
        problems.append(f"one process (this run has {world}: the step's collectives are not captured)")
    if float16:
        problems.append("no float16 GradScaler (--amp-dtype bfloat16, or no --amp)")
    if not plan.fused:
        problems.append("fused optimizers (--optimizer sgd on CUDA)")
    if plan.impl != "fast" or not HAS_TRITON:
        # The reference dual noise seeds a torch.Generator from the seed on the host: a sync.
        problems.append("--impl fast with Triton (the kernels read the step's seed on the device)")
    if plan.compile and cfg.compile_mode != "default":
        # reduce-overhead and max-autotune both turn on inductor's own CUDA graphs, which would
        # record inside this capture (and free cuBLAS workspaces it points to).
        problems.append(f"--compile-mode default, not {cfg.compile_mode} (its CUDA graphs inside this one)")
    if problems:
        raise ConfigError("--cuda-graph needs " + "; ".join(problems))


def device_lr(*opts) -> None:
    """Each parameter group's learning rate as a device scalar (the schedule fills it in place);
    also after a checkpoint loaded float rates into the groups."""
    for o in opts:
        if o is None:
            continue
        for g in o.param_groups:
            if not isinstance(g["lr"], torch.Tensor):
                dev = g["params"][0].device
                g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float32, device=dev)


class GraphedStep:
    """`step(batch, seed)` does what `engine.ssl_step(..., batch, seed, finite)` does and returns
    the same (applied, loss, parts, ctx, synth outputs). The returned tensors are the graph's
    static outputs: the next step overwrites them, so read them before it (the training loop
    adds them to its sums at once).

    On a CPU every step runs eagerly through the same static buffers and device seed (the CPU
    tests' check of everything but the capture itself).
    """

    def __init__(self, run_step, opts, device: torch.device):
        self.run_step = run_step  # (batch, seed) -> ssl_step's tuple; a closure over the model
        self.device = device
        self.capture = device.type == "cuda"
        self.seed = torch.zeros((), dtype=torch.long, device=device)
        device_lr(*opts)
        self.static = None
        self.graph = None
        self.result = None
        self.eager_steps = 0
        self.stream = torch.cuda.Stream(device) if self.capture else None

    def __call__(self, batch, seed: int):
        if self.static is not None and any(s.shape != t.shape for s, t in zip(self.static, batch)):
            raise ValueError(f"--cuda-graph: the batch changed shape ({[tuple(t.shape) for t in batch]}, captured "
                             f"{[tuple(s.shape) for s in self.static]}); a graph replays one shape")
        if self.static is None:
            self.static = tuple(torch.empty_like(t) for t in batch)  # keeps each input's memory format
        for dst, src in zip(self.static, batch):
            dst.copy_(src)
        self.seed.fill_(seed)
        if self.graph is not None:
            self.graph.replay()
            return self.result
        if not self.capture:
            return self.run_step(self.static, self.seed)
        # The capture stream for the eager steps too: the state they create lazily (cuBLAS and
        # cuDNN workspaces, compiled graphs, Triton's binaries) is then there for the capture.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            if self.eager_steps < WARMUP:
                self.eager_steps += 1
                result = self.run_step(self.static, self.seed)
            else:
                graph = torch.cuda.CUDAGraph()
                # thread_local: the loader's threads (pinning, DALI) keep making CUDA calls while
                # this thread captures; only this thread's calls must be capturable.
                with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                    self.result = self.run_step(self.static, self.seed)
                self.graph = graph
                result = None
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        if self.graph is not None:
            self.graph.replay()  # the capture recorded the step without running it
            return self.result
        return result
