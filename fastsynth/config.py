"""One typed dataclass of settings, the named presets, and the argparse built from them.

`paper` is METHOD.md's settings; `quick` fits a 2-core CPU in minutes. A flag given on the
command line always wins over the preset.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, fields
from typing import Optional


class ConfigError(ValueError):
    """A setting is invalid; the message names the flag and the valid choices."""


CHOICES = {
    "dataset": ("synthetic", "aircraft", "cub", "cars", "folder"),  # = data.datasets.DATASETS
    "preset": ("quick", "paper"),
    "method": ("mocov2", "simsiam"),
    "synth": ("on", "off"),
    "noise": ("both", "gradcam", "lowvar", "random", "none"),
    "score": ("grad_x_act", "grad"),
    "stage": ("all", "warmup", "ssl", "eval"),
    "probe": ("cached", "paper"),
    "impl": ("auto", "reference", "fast"),
    "loader": ("auto", "dali", "torch"),
    "compile_mode": ("default", "reduce-overhead", "max-autotune"),
    "optimizer": ("sgd", "apex-sgd", "apex-lars"),
    "arch": ("resnet18", "resnet34", "resnet50"),
    "amp_dtype": ("auto", "bfloat16", "float16"),
    "bn": ("auto", "shuffle", "sync", "local"),
}

HELP = {
    "resume": "continue an interrupted run: 'auto' (the newest valid checkpoint in --output-dir), 'if-any' "
              "(the same, or a fresh run when there is none: for torchrun's elastic restarts) or a "
              "checkpoint path; the checkpoint's config is used, run-control flags from this command",
    "keep_checkpoints": "SSL checkpoints kept in the run folder (last.pt and the older ones beside it)",
    "checkpoint_every": "also checkpoint every N SSL steps (0: at each epoch end only; SIGTERM/Ctrl-C "
                        "always checkpoint at the next step boundary)",
    "max_bad_steps": "stop after this many non-finite (skipped) steps in a row",
    "tensorboard": "also log scalars and the triplet figure for TensorBoard to <run>/tensorboard "
                   "(pip install tensorboard, or the [tensorboard] extra)",
    "max_bad_fraction": "stop when more than this fraction of a split's files cannot be decoded (they are "
                        "excluded and listed in bad_files.txt otherwise)",
    "deterministic": "deterministic algorithms; with --workers 0 a resumed run equals an uninterrupted one",
    "dataset": "synthetic (embedded, default) | aircraft | cub | cars | folder",
    "data_root": "folder holding the dataset (required for real datasets)",
    "download": "download the dataset with torchvision's downloader where one exists",
    "preset": "quick: 2-core CPU in minutes; paper: METHOD.md's settings",
    "method": "the SSL baseline (Eq. 1)",
    "synth": "on: the paper's synthesized pairs (Eq. 2-8); off: the plain baseline",
    "noise": "which noise builds z_tilde (Eq. 5-6); none also sets nu = 0",
    "score": "Eq. 3 score: ReLU(-z dL/dz) (grad_x_act) or ReLU(-dL/dz) (grad)",
    "weights": "local ResNet state dict to initialise the encoder (never downloaded)",
    "epochs": "SSL epochs",
    "lr": "SGD learning rate per 256 images (scaled by batch_size / 256); default 0.06 MoCo v2, 0.05 SimSiam",
    "warmup_epochs": "decoder warm-up epochs (frozen encoder, MSE, Adam)",
    "max_steps": "stop each training stage after this many steps (smoke runs; the learning-rate schedule still "
                 "spans --epochs, so a resume with a larger value goes on with the same schedule)",
    "stage": "all = warm-up, SSL, evaluation; or one stage alone",
    "resume_from": "checkpoint a lone stage starts from: warmup.pt for --stage ssl, last.pt for --stage eval",
    "impl": "reference: eager float32 PyTorch ops, torchvision loader; fast: Triton kernels (InfoNCE, dual noise, "
            "bank statistics) on a GPU, DALI loading where it imports, channels-last, torch.compile, fused "
            "optimizers; auto: fast on a GPU, reference on a CPU",
    "loader": "dali | torch | auto (auto: DALI with --impl fast where it imports, else torchvision)",
    "compile": "torch.compile the networks (default: on with --impl fast on a GPU)",
    "compile_mode": "torch.compile mode (reduce-overhead uses CUDA graphs)",
    "cuda_graph": "capture the whole SSL step (every network, the Grad-CAM pass, backward, optimizers, momentum "
                  "update, queue, bank) as one CUDA graph after 3 eager steps and replay it: no Python or launch "
                  "overhead per step (one GPU, --impl fast, fused optimizers, bfloat16 or float32, "
                  "--compile-mode default)",
    "channels_last": "channels-last tensors for the convolutions (default: on with --impl fast)",
    "optimizer": "sgd: PyTorch SGD (fused on CUDA); apex-sgd / apex-lars: NVIDIA apex's FusedSGD / LARC "
                 "(apex must be installed by hand: it is not on the package index)",
    "sigma_g": "std of the Grad-CAM-guided noise eps_g (Eq. 5)",
    "sigma_v": "std of the low-variance noise eps_v (Eq. 6)",
    "lam": "lambda, threshold on v_bar for low-variance dims (Sec. 3.4)",
    "tau": "temperature of Eq. 1 and Eq. 7",
    "alpha": "weight of L_R in Eq. 8",
    "nu": "weight of L_Cp in Eq. 8",
    "bank_size": "rows of the FIFO feature memory bank (Sec. 3.4)",
    "queue_size": "MoCo queue length K",
    "probe_fractions": "label fractions for the linear probe, comma separated",
    "probe": "cached: linear layer on features extracted once (seconds); paper: METHOD.md's protocol, "
             "augmented crops each epoch through the frozen encoder, SGD lr 30 (hours on real data)",
    "amp": "mixed precision: bfloat16 autocast where supported, else float16 + GradScaler",
    "device": "auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)",
    "bn": "BatchNorm across ranks (torchrun): shuffle = MoCo's shuffle-BN for the key encoder; sync = every "
          "BatchNorm over the global batch (SyncBN); local = each rank's own batch; auto = shuffle for "
          "mocov2, sync for simsiam. One process: all the same",
    "dist_timeout": "minutes a collective may wait for the other ranks before the job fails (a dead rank)",
    "batch_size": "global batch: with torchrun each of the W processes takes batch_size / W images",
    "gc_every": "Python's garbage collector during SSL training: 0 = automatic (default); N > 0 = off, with the "
                "young generations collected every N steps and all of them at each epoch end (host pauses at "
                "known steps; fastsynth.profile records the pauses either way)",
}


@dataclass
class Config:
    # data
    dataset: str = "synthetic"
    data_root: Optional[str] = None
    download: bool = False
    image_size: int = 224
    workers: int = 4
    # method
    preset: str = "paper"
    method: str = "mocov2"
    synth: str = "on"
    noise: str = "both"
    score: str = "grad_x_act"
    arch: str = "resnet50"
    weights: Optional[str] = None
    impl: str = "auto"
    loader: str = "auto"
    compile: Optional[bool] = None
    compile_mode: str = "default"
    cuda_graph: bool = False
    channels_last: Optional[bool] = None
    optimizer: str = "sgd"
    # Eq. 1
    tau: float = 0.2
    moco_dim: int = 128
    moco_momentum: float = 0.999
    queue_size: int = 65536
    simsiam_dim: int = 2048
    # Eq. 2-8
    alpha: float = 1.0
    nu: float = 0.5
    sigma_g: float = 1.0
    sigma_v: float = 1.0
    lam: float = 0.02
    bank_size: int = 4096
    decoder_width: int = 256
    # optimisation
    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.06
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: int = 200
    decoder_lr: float = 1e-3
    max_steps: Optional[int] = None
    amp: bool = False
    amp_dtype: str = "auto"
    # evaluation
    probe: str = "cached"
    probe_epochs: int = 100
    probe_lr: Optional[float] = None
    probe_fractions: str = "1.0,0.5,0.2"
    # run
    stage: str = "all"
    resume_from: Optional[str] = None
    output_dir: Optional[str] = None
    seed: int = 0
    device: str = "auto"
    log_every: int = 20
    gc_every: int = 0
    # several processes (torchrun)
    bn: str = "auto"
    dist_timeout: float = 30.0
    # interruptions and numerical trouble
    resume: Optional[str] = None
    keep_checkpoints: int = 3
    checkpoint_every: int = 0
    max_bad_steps: int = 20
    deterministic: bool = False
    max_bad_fraction: float = 0.01
    tensorboard: bool = False

    def bn_mode(self) -> str:
        if self.bn != "auto":
            return self.bn
        return "shuffle" if self.method == "mocov2" else "sync"

    def effective_lr(self) -> float:
        return self.lr * self.batch_size / 256

    def fractions(self) -> list[float]:
        try:
            fr = [float(f) for f in self.probe_fractions.split(",") if f.strip()]
        except ValueError:
            raise ConfigError(f"--probe-fractions {self.probe_fractions!r}: expected e.g. 1.0,0.5,0.2") from None
        if not fr or any(not 0 < f <= 1 for f in fr):
            raise ConfigError(f"--probe-fractions {self.probe_fractions!r}: each must be in (0, 1]")
        return fr

    def validate(self) -> "Config":
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        for name in ("image_size", "epochs", "batch_size", "queue_size", "bank_size", "moco_dim", "simsiam_dim",
                     "decoder_width"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ConfigError("--batch-size must be at least 2 (batch statistics and Eq. 7 negatives)")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(f"--max-steps must be positive, got {self.max_steps}")
        if not 0 <= self.moco_momentum < 1:
            raise ConfigError(f"--moco-momentum must be in [0, 1), got {self.moco_momentum}")
        # Written as "not (ok)": NaN fails every comparison, so `x <= 0` let --tau nan through.
        for name, low, inclusive in (("tau", 0, False), ("sigma_g", 0, True), ("sigma_v", 0, True),
                                     ("alpha", 0, True), ("nu", 0, True), ("lr", 0, True), ("decoder_lr", 0, True),
                                     ("weight_decay", 0, True), ("dist_timeout", 0, False)):
            value = getattr(self, name)
            if not (math.isfinite(value) and (value >= low if inclusive else value > low)):
                raise ConfigError(f"--{name.replace('_', '-')} must be {'>=' if inclusive else '>'} {low} and finite, "
                                  f"got {value}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.probe_lr is not None and not (math.isfinite(self.probe_lr) and self.probe_lr > 0):
            raise ConfigError(f"--probe-lr must be > 0 and finite, got {self.probe_lr}")
        if self.image_size % 8 or self.image_size < 16:
            raise ConfigError(f"--image-size must be a multiple of 8 and at least 16 (decoder upsampling), "
                              f"got {self.image_size}")
        if not 0 <= self.lam <= 1:
            raise ConfigError(f"--lam must be in [0, 1] (it thresholds the unit-norm variance vector), got {self.lam}")
        if self.method == "simsiam" and self.bn == "shuffle":
            raise ConfigError("--bn shuffle is MoCo's key-encoder shuffle; SimSiam has no key encoder "
                              "(use --bn sync or --bn local)")
        if not 0 <= self.seed < 2 ** 32:  # NumPy's seed range; noise seeds derive from it
            raise ConfigError(f"--seed must be in [0, 2**32), got {self.seed}")
        if self.method == "mocov2" and self.queue_size < self.batch_size:
            raise ConfigError(f"--queue-size {self.queue_size} is smaller than --batch-size {self.batch_size}: "
                              "each step enqueues a whole batch of keys")
        if self.synth == "on" and self.bank_size < 2:
            raise ConfigError(f"--bank-size must be at least 2 (a variance needs two rows), got {self.bank_size}")
        for name, low in (("keep_checkpoints", 1), ("checkpoint_every", 0), ("max_bad_steps", 0),
                          ("workers", 0), ("warmup_epochs", 0), ("log_every", 1), ("probe_epochs", 1),
                          ("gc_every", 0)):
            if getattr(self, name) < low:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ConfigError(f"--max-bad-fraction must be in [0, 1], got {self.max_bad_fraction}")
        self.fractions()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Per-method defaults, below the preset and the flags. METHOD.md: MoCo v2 lr 0.03 at batch 128
# (0.06 per 256 images); SimSiam lr 0.05, read in SimSiam's own convention as per 256 images.
METHOD_DEFAULTS = {"mocov2": {"lr": 0.06}, "simsiam": {"lr": 0.05}}

PRESETS = {
    # METHOD.md "Training settings": ResNet-50 at 224, batch 128, 100 epochs, queue 65536,
    # decoder warm-up 200 epochs. lr 0.03 at batch 128 is 0.06 per 256 images.
    "paper": {"probe": "paper"},  # and its linear-probe protocol (lr 30, crops and flips, 100 epochs)
    # Fits a 2-core CPU: ResNet-18 at 64 px on the synthetic set. The queue holds about 1.3
    # epochs of keys (1024 for 800 images; a queue of 256 changed nothing measurable, see
    # bench/results/2026-11-26-quick-vs-random) and the bank 512 rows, so both hold recent
    # features; the key encoder moves faster because the run is only 60 steps long.
    "quick": dict(arch="resnet18", image_size=64, batch_size=64, epochs=5,
                  queue_size=1024, bank_size=512, moco_momentum=0.99, warmup_epochs=20,
                  simsiam_dim=512, decoder_width=128, probe_epochs=100, workers=0, log_every=5),
}


def _add_flag(parser: argparse.ArgumentParser, f: dataclasses.Field) -> None:
    flag = "--" + f.name.replace("_", "-")
    kw = {"dest": f.name, "default": None, "help": HELP.get(f.name)}
    if f.type in ("bool", bool, "Optional[bool]"):
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        return
    base = {"int": int, "float": float, "str": str, "Optional[int]": int, "Optional[float]": float,
            "Optional[str]": str}[str(f.type)]
    if f.name in CHOICES:
        kw["choices"] = CHOICES[f.name]
    parser.add_argument(flag, type=base, **kw)


def build_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(Config):
        _add_flag(p, f)
    return p


def from_args(argv=None, description: str = "fastsynth") -> Config:
    """Defaults <- preset <- flags given on the command line."""
    args = build_parser(description).parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    preset = given.get("preset", "quick")
    if preset not in PRESETS:
        raise ConfigError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
    method = given.get("method", Config.method)
    values = {**METHOD_DEFAULTS.get(method, {}), **PRESETS[preset], "preset": preset, **given}
    if values.get("noise") == "none" and "nu" not in given:
        values["nu"] = 0.0  # METHOD.md: the `none` ablation is MoCo v2 + L_R with nu = 0
    cfg = Config(**values).validate()
    cfg.given = frozenset(given)  # which flags the command line set (--resume keeps the others)
    return cfg


def save(cfg: Config, path: str) -> None:
    with open(path, "w") as fh:
        json.dump(cfg.to_dict(), fh, indent=2, sort_keys=True)


def from_dict(d: dict) -> Config:
    known = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in d.items() if k in known})
