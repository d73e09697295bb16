"""The fast path's switches, resolved once per run: loader, memory format, compile, optimizer.

`--impl fast` (the default on a GPU through `--impl auto`) turns on DALI loading where it
imports, channels-last tensors, torch.compile and fused optimizers, with the Triton kernels in
the hot path; `--impl reference` is eager float32 PyTorch with the torchvision loader. Each
switch can be set alone (`--loader`, `--compile/--no-compile`, `--channels-last/...`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastsynth.config import Config, ConfigError


@dataclass(frozen=True)
class Plan:
    impl: str            # "fast" | "reference"
    loader: str          # "dali" | "torch"
    channels_last: bool
    compile: bool
    fused: bool          # PyTorch's fused SGD/Adam (CUDA)
    # cuDNN times its convolution algorithms once per shape and keeps the fastest (the step's
    # shapes are fixed); off with --deterministic, and PyTorch's default (off) for the reference.
    cudnn_benchmark: bool = False
    cuda_graph: bool = False  # --cuda-graph: the whole SSL step replayed as one graph (graphstep.py)

    def describe(self) -> str:
        return (f"impl {self.impl}, loader {self.loader}, channels_last {self.channels_last}, "
                f"compile {self.compile}, fused optimizer {self.fused}, cudnn benchmark {self.cudnn_benchmark}, "
                f"cuda graph {self.cuda_graph}")


def resolve(cfg: Config, device: torch.device) -> Plan:
    impl = cfg.impl if cfg.impl != "auto" else ("fast" if device.type == "cuda" else "reference")
    fast = impl == "fast"
    if cfg.loader == "auto":
        loader = "torch"
        if fast:
            from fastsynth.data.dali import resolve_loader
            loader = resolve_loader("auto")  # DALI where it imports, else torch with one warning
    else:
        loader = cfg.loader
        if loader == "dali":
            from fastsynth.data.dali import DaliUnavailableError, require_dali
            try:
                require_dali()
            except DaliUnavailableError as e:
                raise ConfigError(str(e)) from None
    # Compile defaults on for the fast path on a GPU only: on a CPU inductor's code was no faster
    # than eager for this step (bench/results/2026-11-26-cpu-step) and compiling takes minutes.
    compile_default = fast and device.type == "cuda"
    channels_last = fast if cfg.channels_last is None else cfg.channels_last
    compiled = compile_default if cfg.compile is None else cfg.compile
    return Plan(impl=impl, loader=loader, channels_last=channels_last, compile=compiled,
                fused=device.type == "cuda" and cfg.optimizer == "sgd",
                cudnn_benchmark=fast and device.type == "cuda" and not cfg.deterministic,
                cuda_graph=cfg.cuda_graph)


def memory_format(plan: Plan) -> torch.memory_format:
    return torch.channels_last if plan.channels_last else torch.contiguous_format


def prepare(model: nn.Module, plan: Plan, compile_mode: str = "default") -> nn.Module:
    """Channels-last weights and, with compile on, every network of the model compiled in place
    (nn.Module.compile: the state_dict keeps its names, so checkpoints are the same either way).

    Networks, not the whole step: the Grad-CAM pass takes a gradient inside the forward, which
    torch.compile would split anyway; the losses and Triton ops between the networks run as
    registered custom ops (tests/test_fast_path.py checks they trace without graph breaks).
    """
    # Set both ways: the plan, not whichever run came before in this process, decides.
    torch.backends.cudnn.benchmark = plan.cudnn_benchmark
    if plan.channels_last:
        model.to(memory_format=torch.channels_last)
    # CUDA graphs (reduce-overhead) replay each compiled network's graph from one memory pool;
    # a step calls the encoder several times (B and 2B images, with and without grad) and takes
    # a gradient in the middle (Eq. 3), not one forward then one backward, so the step tells
    # them where an iteration begins (engine.ssl_step) rather than leaving them to guess.
    model.cudagraph_steps = plan.compile and compile_mode == "reduce-overhead"
    if plan.compile:
        mode = None if compile_mode == "default" else compile_mode
        for net in networks(model):
            if any(isinstance(m, nn.SyncBatchNorm) for m in net.modules()):
                # Dynamo breaks the graph at every SyncBatchNorm (pytorch#161302): a ResNet-50
                # would become ~55 graphs per call for no gain, so --bn sync networks stay eager.
                print(f"note: {type(net).__name__} has SyncBatchNorm layers (--bn sync): not compiled")
                continue
            # Static shapes: a step's batch sizes are fixed (the encoder sees B and, for Eq. 7,
            # 2B), so each gets its own specialised graph rather than the second turning the
            # encoder into one dynamic-batch graph; CUDA graphs (reduce-overhead) want static
            # shapes too. Not yet timed on a GPU against the default.
            net.compile(mode=mode, dynamic=False)
    return model


def networks(model: nn.Module) -> list[nn.Module]:
    """The encoder, heads, momentum copies, predictor and decoder that a step runs."""
    m = model.method
    nets = [m.encoder, m.head]
    for name in ("key_encoder", "key_head", "predictor"):
        if hasattr(m, name):
            nets.append(getattr(m, name))
    if model.synth is not None:
        nets.append(model.synth.decoder)
    return nets


def optimizers(model: nn.Module, cfg: Config, plan: Plan):
    """(SGD of the method, Adam of the decoder or None), fused on CUDA; apex's on request."""
    base_lr = cfg.effective_lr()
    groups = model.method.param_groups(base_lr, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        kw = {"fused": True} if plan.fused else {}
        opt = torch.optim.SGD(groups, lr=base_lr, momentum=cfg.momentum, **kw)
        if plan.fused and cfg.momentum:
            # Fused SGD creates its momentum buffers with empty_like on the first step and fills
            # them in the kernel; a first step skipped through found_inf (a non-finite step, or
            # GradScaler's first overflow) would leave them uninitialised. Zeros are what the
            # first real step would start from.
            for group in opt.param_groups:
                for p in group["params"]:
                    opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    else:
        opt = _apex_optimizer(cfg.optimizer, groups, base_lr, cfg.momentum)
    dec_opt = None
    if model.synth is not None:
        kw = {"fused": True} if plan.fused else {}
        if plan.cuda_graph:  # Adam keeps its step count on the device, as a captured step needs
            kw["capturable"] = True
        dec_opt = torch.optim.Adam(model.synth.decoder.parameters(), lr=cfg.decoder_lr, **kw)
    return opt, dec_opt


def _apex_optimizer(name: str, groups, lr: float, momentum: float):
    try:
        from apex.optimizers import FusedSGD
    except ImportError:
        raise ConfigError(f"--optimizer {name} needs NVIDIA apex, which is not installed (it is not on the "
                          "package index: build it from https://github.com/NVIDIA/apex), or use --optimizer sgd "
                          "(PyTorch's fused SGD on CUDA)") from None
    opt = FusedSGD(groups, lr=lr, momentum=momentum)
    if name == "apex-lars":
        from apex.parallel.LARC import LARC
        opt = LARC(opt, trust_coefficient=0.001, clip=False)
    return opt
