"""Keeping a long run alive: pre-emption signals and non-finite steps.

SIGTERM (pre-emption) and SIGINT (Ctrl-C) only set a flag; the training loops check it at step
boundaries, write a checkpoint and return, so a stop never leaves a half-written state. A second
Ctrl-C stops at once. A step whose loss or gradient is not finite is skipped (no optimizer,
momentum or queue update, BatchNorm running statistics put back) and counted; too many in a row
end the run with a clear error.
"""
from __future__ import annotations

import signal
import threading

import torch
from torch import nn


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and where the last good checkpoint is."""


class StopRequest:
    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: stopping at the next step boundary with a checkpoint",
              flush=True)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 130 if self.signum == signal.SIGINT else 0


class BadSteps:
    """Counts non-finite steps; more than `limit` in a row raise TrainingError."""

    def __init__(self, limit: int, total: int = 0):
        self.limit, self.total, self.in_a_row = limit, total, 0

    def check(self, finite: bool, stage: str, step: int) -> bool:
        if finite:
            self.in_a_row = 0
            return True
        self.total += 1
        self.in_a_row += 1
        print(f"warning: {stage} step {step}: non-finite loss or gradient, step skipped "
              f"({self.total} skipped so far)", flush=True)
        if self.in_a_row > self.limit:
            raise TrainingError(f"{self.in_a_row} non-finite {stage} steps in a row (--max-bad-steps {self.limit}): "
                                "the run diverged; the last good checkpoint is in the run folder (try a lower --lr)")
        return False

    def check_window(self, n_bad: int, n: int, stage: str, step: int, trailing: int, longest: int) -> None:
        """The deferred form (fused optimizers skip bad steps on the device): n_bad of the last
        n steps were skipped; `trailing` bad steps in a row end the window and the longest run
        in it was `longest`, both counted on the device (RunTracker) with the run that came into
        the window included. Counts alone cannot tell scattered bad steps from a run of them."""
        self.in_a_row = trailing
        if n_bad == 0:
            return
        self.total += n_bad
        print(f"warning: {stage} steps up to {step}: {n_bad} of the last {n} had a non-finite loss or gradient "
              f"and were skipped ({self.total} skipped so far)", flush=True)
        if longest > self.limit:
            raise TrainingError(f"{longest} non-finite {stage} steps in a row (--max-bad-steps {self.limit}): "
                                "the run diverged; the last good checkpoint is in the run folder (try a lower --lr)")


class RunTracker:
    """Bad steps of a window, on the device (no host sync per step): `count` of them, `trailing`
    the current run (carried across windows), `longest` the longest run since the last read."""

    def __init__(self, in_a_row: int, device: torch.device):
        self.count = torch.zeros((), device=device)
        self.trailing = torch.full((), float(in_a_row), device=device)
        self.longest = self.trailing.clone()

    def step(self, applied: torch.Tensor) -> None:
        bad = 1.0 - applied.float()
        self.count.add_(bad)
        self.trailing.add_(1.0).mul_(bad)  # +1 on a bad step, back to 0 on a good one
        torch.maximum(self.longest, self.trailing, out=self.longest)

    def read(self) -> tuple[int, int, int]:
        """(count, trailing, longest) read back in one sync, at the window's end; the next
        window counts from 0 and its longest starts from the run it inherits."""
        count, trailing, longest = (int(v) for v in torch.stack([self.count, self.trailing, self.longest]).tolist())
        self.count.zero_()
        self.longest.copy_(self.trailing)
        return count, trailing, longest


def finite_flag(loss: torch.Tensor, params) -> torch.Tensor:
    """Loss and every gradient finite, as a 0-dim bool tensor on the device (no host sync; the
    sum of the per-tensor norms is non-finite as soon as one element is)."""
    grads = [p.grad for p in params if p.grad is not None]
    ok = torch.isfinite(loss.detach().float())
    if grads:
        ok = ok & torch.isfinite(torch.stack(torch._foreach_norm(grads)).float().sum())
    return ok


def finite_step(loss: torch.Tensor, params) -> bool:
    """finite_flag read back: one host synchronisation per step."""
    return bool(finite_flag(loss, params))


class RunningStats:
    """The BatchNorm running statistics of `model`, which a training forward moves before anyone
    knows whether the step will be applied. `save()` before the forward, `keep(applied, saved)`
    after the optimizers: a skipped step puts them back, so one non-finite batch cannot leave
    NaN in the statistics evaluation uses. A few launches per step: one flat copy per dtype
    before the forward; after it, with a device flag (no host sync), a second flat copy, one
    `where` and one multi-tensor copy back on every step; with a bool, the copy back on a
    skipped step only."""

    def __init__(self, model: nn.Module):
        self.modules = [m for m in model.modules()
                        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self._slots = [(m._buffers, name) for m in self.modules
                       for name in ("running_mean", "running_var", "num_batches_tracked")]
        self._cache: tuple | None = None

    def _groups(self) -> dict[tuple, tuple[list[torch.Tensor], list[int]]]:
        """(dtype, device) -> (flat views of the buffers, their sizes). Kept between calls and
        rebuilt when a buffer was replaced (.to(), assignment), which an identity check per
        buffer finds: a few hundred dict lookups, where taking the views again each call (and
        each step, twice) cost milliseconds of host time for a ResNet-50 pair."""
        current = [d.get(name) for d, name in self._slots]
        if self._cache is None or any(a is not b for a, b in zip(current, self._cache[0])):
            groups: dict[tuple, list[torch.Tensor]] = {}
            for b in current:
                if b is not None:
                    groups.setdefault((b.dtype, b.device), []).append(b.view(-1))  # aliases the buffer
            self._cache = (current, {key: (flats, [f.numel() for f in flats]) for key, flats in groups.items()})
        return self._cache[1]

    @torch.no_grad()
    def save(self) -> dict:
        return {key: torch.cat(flats) for key, (flats, _) in self._groups().items()}

    @torch.no_grad()
    def keep(self, applied: bool | torch.Tensor, saved: dict) -> None:
        """applied: a bool, or a 0-dim bool tensor on the device."""
        if not isinstance(applied, torch.Tensor) and applied:
            return
        for key, (flats, sizes) in self._groups().items():
            flat = saved[key]
            if isinstance(applied, torch.Tensor):
                flat = torch.where(applied, torch.cat(flats), flat)
            torch._foreach_copy_(flats, list(flat.split(sizes)))
