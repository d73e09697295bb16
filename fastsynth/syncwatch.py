"""Host synchronisations inside a block of CUDA work, found with torch's sync debug mode.

Issue 4 asks for a training step with no host synchronisation: a sync empties the launch queue,
so every microsecond of Python after it is GPU idle time. The step's code avoids `.item()`,
`bool(tensor)` and friends by construction; `SyncWatch` checks it on a GPU. Inside the block,
`torch.cuda.set_sync_debug_mode("warn")` makes every synchronising CUDA call PyTorch knows of
(device-to-host copies, nonzero, a tensor's truth value, ...) raise a warning; the watch records
where each came from and lets every other warning through. PyTorch calls the mode a prototype
that does not catch every sync (cudaMalloc/cudaFree of the caching allocator, for one: the
profile counts those from the allocator's statistics instead).

On a CPU there is nothing to watch: the mode is left alone, and `active` is False.
"""
from __future__ import annotations

import collections
import os
import traceback
import warnings

import torch

SYNC_MESSAGE = "synchronizing CUDA operation"  # torch's text: "called a synchronizing CUDA operation"
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_SKIP_FILES = {os.path.abspath(__file__), os.path.abspath(warnings.__file__)}
_SKIP_NAMES = {"warnings.py", "_py_warnings.py"}  # the latter: the module's home in newer Pythons


class SyncWatch:
    """with SyncWatch(device) as w: ...  then w.count and w.sites (most frequent first)."""

    def __init__(self, device: torch.device):
        self.active = torch.device(device).type == "cuda"
        self.where: list[str] = []  # one entry per sync, in order
        self._catch = None
        self._outer_show = None
        self._mode = 0

    @property
    def count(self) -> int:
        return len(self.where)

    @property
    def sites(self) -> list[tuple[str, int]]:
        """(where, how many times), most frequent first."""
        return collections.Counter(self.where).most_common()

    def __enter__(self) -> SyncWatch:
        self._outer_show = warnings.showwarning
        self._catch = warnings.catch_warnings()  # restores the filters and showwarning on exit
        self._catch.__enter__()
        warnings.filterwarnings("always", message=".*" + SYNC_MESSAGE)
        warnings.showwarning = self._show
        if self.active:
            self._mode = torch.cuda.get_sync_debug_mode()
            with warnings.catch_warnings():  # torch's one-line note that the mode is a prototype
                warnings.simplefilter("ignore")
                torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.active:
                torch.cuda.set_sync_debug_mode(self._mode)
        finally:
            self._catch.__exit__(*exc)

    def _show(self, message, category, filename, lineno, file=None, line=None) -> None:
        if SYNC_MESSAGE in str(message):
            self.where.append(caller(traceback.extract_stack()[:-1]))
        else:
            self._outer_show(message, category, filename, lineno, file, line)


def caller(stack: traceback.StackSummary) -> str:
    """The innermost frame outside torch, the warnings machinery and this module, as
    'file:line function' (the file relative to the working directory where it is inside it):
    the line of our code that made the synchronising call."""
    for frame in reversed(stack):
        if not _skipped(frame.filename):
            path = os.path.relpath(frame.filename) if frame.filename.startswith(os.getcwd()) else frame.filename
            return f"{path}:{frame.lineno} {frame.name}"
    frame = stack[-1]
    return f"{frame.filename}:{frame.lineno} {frame.name}"


def _skipped(filename: str) -> bool:
    return (filename.startswith(_TORCH_DIR) or os.path.abspath(filename) in _SKIP_FILES
            or os.path.basename(filename) in _SKIP_NAMES)
