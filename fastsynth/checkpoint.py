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
        raise CheckpointError(f"checkpoint {path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: not a fastsynth checkpoint (no format tag {FORMAT!r})")
    return ckpt


class RunDir:
    """The run folder: config.json, metrics.jsonl, checkpoints, figures, final metrics."""

    def __init__(self, path: str | None, name_hint: str):
        if path is None:
            path = os.path.join("runs", f"{time.strftime('%Y%m%d-%H%M%S')}-{name_hint}")
        os.makedirs(path, exist_ok=True)
        self.path = path

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def log(self, record: dict) -> None:
        with open(self.file("metrics.jsonl"), "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def write_json(self, name: str, obj: dict) -> None:
        tmp = self.file(name + ".tmp")
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True)
        os.replace(tmp, self.file(name))
