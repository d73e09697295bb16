"""Python's cyclic garbage collector around the training step: its pauses, measured or scheduled.

A step that enqueues GPU work faster than the GPU runs it keeps the GPU busy through host
pauses; once the host falls behind (launch-bound stretches, a sync), a pause is GPU idle time.
torch.compile leaves many long-lived Python objects (graphs, guards, generated code), so each
full collection walks more of them. `GCTimer` measures the pauses (fastsynth.profile records
them); `StepGC` (`--gc-every N`) turns automatic collection off during SSL training and collects
the young generations every N steps and everything at each epoch end, where the loop stops for
its log anyway: the pauses come at known steps instead of wherever a threshold trips.

It also freezes (gc.freeze) what exists after the first step: torch's modules, the model, and
what compile built in that step are alive for the whole run, and a full collection would walk
them all (227 ms with a compiled quick-preset model on the development CPU, 0.05 ms once frozen:
bench/results/2026-11-27-gc-freeze). Objects made later are collected as before; the frozen
ones go back to the collector when the block ends.
"""
from __future__ import annotations

import gc
import time


class StepGC:
    """every = 0: Python's automatic collection, untouched. every > 0: see the module docstring."""

    def __init__(self, every: int):
        if every < 0:
            raise ValueError(f"gc every {every} steps: must be >= 0")
        self.every = every
        self._was_enabled = False
        self._steps = 0
        self.frozen = 0  # objects gc.freeze moved to the permanent generation, for the record

    def __enter__(self) -> StepGC:
        if self.every:
            self._was_enabled = gc.isenabled()
            gc.disable()
        return self

    def step(self, n: int) -> None:
        """After step n (counted from 1): generations 0 and 1 every `every` steps; after the
        block's first step, a full collection and then everything left is frozen."""
        if not self.every:
            return
        self._steps += 1
        # Only where nothing is frozen yet: gc.unfreeze() at the end then restores the state found
        # (it cannot unfreeze a part; someone else's freeze is left alone).
        if self._steps == 1 and gc.get_freeze_count() == 0:
            gc.collect()  # the first step's garbage is not frozen with the rest
            gc.freeze()
            self.frozen = gc.get_freeze_count()
        elif n % self.every == 0:
            gc.collect(1)

    def full(self) -> None:
        """All generations (an epoch end): cyclic garbage that reached the oldest generation
        does not wait for the end of training."""
        if self.every:
            gc.collect()

    def __exit__(self, *exc) -> None:
        if self.every:
            if self.frozen:
                gc.unfreeze()
            gc.collect()
            if self._was_enabled:
                gc.enable()


class GCTimer:
    """Collections and their host time while the block runs (gc.callbacks)."""

    def __init__(self):
        self.pauses: list[tuple[int, float]] = []  # (generation, seconds)
        self._start = None

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.pauses.append((info.get("generation", -1), time.perf_counter() - self._start))
            self._start = None

    def __enter__(self) -> GCTimer:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self, steps: int) -> dict:
        by_gen: dict[str, int] = {}
        for gen, _ in self.pauses:
            by_gen[str(gen)] = by_gen.get(str(gen), 0) + 1
        total = sum(s for _, s in self.pauses)
        longest = max((s for _, s in self.pauses), default=0.0)
        return {"gc_ms_per_step": total / max(steps, 1) * 1e3, "gc_max_ms": longest * 1e3, "gc_collections": by_gen}
