"""Run folder, metrics log and checkpoints.

Checkpoints are written to a temporary file, fsynced, then renamed over the target, so a run
killed mid-write leaves the previous checkpoint intact. They are loaded with weights_only=True:
a checkpoint is data and never runs code.
"""
from __future__ import annotations

import json
import os
import time

import torch

FORMAT = "fastsynth-v1"


class CheckpointError(RuntimeError):
    pass


def save_atomic(obj: dict, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt or foreign: the same user error
        why = (str(e).splitlines() or ["empty file" if os.path.getsize(path) == 0 else "no message"])[0][:200]
        raise CheckpointError(f"checkpoint {path}: unreadable ({type(e).__name__}: {why})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: not a fastsynth checkpoint (no format tag {FORMAT!r})")
    return ckpt


class RunDir:
    """The run folder: config.json, metrics.jsonl, checkpoints, figures, final metrics.

    With several ranks every rank knows the folder (it reads checkpoints from it on resume) but
    only rank 0 writes: `active` is False elsewhere and the writers below do nothing.
    """

    def __init__(self, path: str | None, name_hint: str, active: bool = True):
        if path is None:
            path = self.default_path(name_hint)
        if active:
            os.makedirs(path, exist_ok=True)
        self.path, self.active = path, active

    @staticmethod
    def default_path(name_hint: str) -> str:
        return os.path.join("runs", f"{time.strftime('%Y%m%d-%H%M%S')}-{name_hint}")

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    writer = None  # a TensorBoard SummaryWriter when --tensorboard is on

    def enable_tensorboard(self) -> None:
        if not self.active:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("--tensorboard needs the tensorboard package: pip install tensorboard "
                              "(or pip install -e '.[tensorboard]')") from None
        self.writer = SummaryWriter(self.file("tensorboard"))

    def log(self, record: dict) -> None:
        if not self.active:
            return
        with open(self.file("metrics.jsonl"), "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:  # the same numbers, as TensorBoard scalars per stage
            step = record.get("step", record.get("epoch", 0))
            for k, v in record.items():
                if k not in ("stage", "epoch", "step") and isinstance(v, (int, float)) and v == v:
                    self.writer.add_scalar(f"{record.get('stage', 'run')}/{k}", v, step)
            self.writer.flush()

    def log_image(self, tag: str, path: str, step: int) -> None:
        if self.active and self.writer is not None:
            import numpy as np
            from PIL import Image
            self.writer.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
            self.writer.flush()

    def write_json(self, name: str, obj: dict) -> None:
        if not self.active:
            return
        tmp = self.file(name + ".tmp")
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True)
        os.replace(tmp, self.file(name))


# ---------------------------------------------------------------------------------------------
# Exact continuation: RNG states and the rotating set of SSL checkpoints
# ---------------------------------------------------------------------------------------------
def rng_state() -> dict:
    """Every generator a step draws from, as tensors and plain numbers (weights_only-loadable)."""
    import random

    import numpy as np

    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"python": [version, list(mt), gauss], "numpy": [np_name, torch.from_numpy(np_keys.astype("int64")),
                                                             int(np_pos), int(np_has_gauss), float(np_gauss)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's generators from one seed (NumPy takes it modulo 2**32)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


LAST = "last.pt"


def saved_step(path: str) -> int:
    """The step a checkpoint file was written at: from an ssl-step<N>.pt name, else read from the
    file; -1 where neither works (a renamed or unreadable file)."""
    name = os.path.basename(path)
    try:
        if name.startswith("ssl-step") and name.endswith(".pt"):
            return int(name[len("ssl-step"):-len(".pt")])
        return int(torch.load(path, map_location="cpu", weights_only=True).get("step", -1))
    except Exception:  # noqa: BLE001 - any failure: no step to go by
        return -1


def rotate_and_save(state: dict, run: "RunDir", keep: int) -> str:
    """Write `last.pt` atomically; the previous one becomes `ssl-step<N>.pt`; keep the newest
    `keep` checkpoints in all, so a corrupt newest file still leaves one to fall back on."""
    last = run.file(LAST)
    if os.path.isfile(last) and keep > 1:
        prev_step = saved_step(last)  # -1 for a corrupt last.pt: not worth keeping
        if prev_step >= 0:
            os.replace(last, run.file(f"ssl-step{prev_step:08d}.pt"))
    save_atomic(state, last)
    older = sorted(f for f in os.listdir(run.path) if f.startswith("ssl-step") and f.endswith(".pt"))
    for name in older[:max(0, len(older) - (keep - 1))]:
        os.remove(run.file(name))
    return last


def newest_valid(run: "RunDir", stage: str = "ssl") -> tuple[str, dict] | None:
    """(path, checkpoint) of the newest loadable `stage` checkpoint in the run folder, or None.

    A truncated or corrupt file (a crash mid-copy, a full disk) is reported and skipped.
    """
    older = sorted((f for f in os.listdir(run.path) if f.startswith("ssl-step") and f.endswith(".pt")), reverse=True)
    for name in [LAST, *older]:
        path = run.file(name)
        if not os.path.isfile(path):
            continue
        try:
            ckpt = load(path)
        except CheckpointError as e:
            print(f"warning: {e}; trying the previous checkpoint")
            continue
        if ckpt.get("stage") == stage:
            return path, ckpt
    return None


# Per-group choices of how an optimizer runs, not of what it computes: this run's, not the saved.
_IMPL_FLAGS = ("fused", "foreach", "capturable", "differentiable")


def _plain_lr(group: dict) -> dict:
    """A --cuda-graph run keeps its learning rates as device scalars (graphstep.device_lr): loaded
    as numbers, which every optimizer takes; such a run makes them device scalars again."""
    lr = group.get("lr")
    return {**group, "lr": float(lr)} if torch.is_tensor(lr) else group


def load_optimizer(opt, state: dict) -> None:
    """opt.load_state_dict(state), keeping this run's implementation flags and layouts.

    --device and --impl may change on resume, and load_state_dict takes each group's flags from
    the checkpoint: a CPU or reference-path run's SGD (fused=None) loaded into the fused CUDA
    optimizer would reject the found_inf flag the fast path passes it. Its state tensors also
    keep the saved memory layout, where the fused kernels want their parameters' (channels-last).
    """
    flags = [{k: g[k] for k in _IMPL_FLAGS if k in g} for g in opt.param_groups]
    # This run's flags written into the saved groups before loading: torch places each state
    # tensor (Adam's `step` on the device for fused/capturable, else on the host) by them.
    state = {**state, "param_groups": [{**_plain_lr(saved), **own}
                                       for saved, own in zip(state["param_groups"], flags)]}
    opt.load_state_dict(state)
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            for k, v in st.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def load_into(module: torch.nn.Module, state: dict, what: str) -> None:
    """module.load_state_dict(state), with unknown/missing keys and shape mismatches reported in
    one line (which checkpoint part, the first few keys) instead of PyTorch's long message.
    Modules' own load hooks (e.g. FeatureBank reading an older layout) still apply."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{what}: expected a state dict, found {type(state).__name__}")
    try:
        module.load_state_dict(state)
        return
    except RuntimeError:
        pass
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            problems.append(f"{len(items)} {label} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})")
    raise CheckpointError(f"{what} does not fit this model: " + ("; ".join(problems) or "incompatible")
                          + " (was it written with other --arch/--method/--synth/sizes?)") from None
