"""The torchvision loader: a Dataset over an ImageList that yields true sample indices.

(The DALI loader arrives with the fast-path issue and reads the same ImageList.)
"""
from __future__ import annotations

import signal
import threading

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .base import ImageList


def load_rgb(path: str) -> Image.Image:
    """Decode any PIL-readable image to RGB (grayscale, palette, alpha, CMYK converted).

    16-bit and 32-bit integer images are rescaled to 8 bits by their type's range first: PIL's
    own conversion clips them, which turns most 16-bit photographs white.
    """
    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            import numpy as np
            a = np.asarray(im, dtype=np.float64)
            top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
            return Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
        return im.convert("RGB")


class FileDataset(Dataset):
    """(transform(image), label, index): the index is the position in the ImageList.

    cache=True keeps decoded images in memory: worth it for the small synthetic set on a CPU,
    where decoding would otherwise be repeated every epoch.
    """

    def __init__(self, images: ImageList, transform, cache: bool = False):
        self.images, self.transform = images, transform
        self._cache = {} if cache else None

    def __len__(self) -> int:
        return len(self.images)

    def _image(self, i: int) -> Image.Image:
        if self._cache is None:
            return load_rgb(self.images.paths[i])
        if i not in self._cache:
            self._cache[i] = load_rgb(self.images.paths[i])
        return self._cache[i]

    def __getitem__(self, i: int):
        return self.transform(self._image(i)), self.images.labels[i], i


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: the workers leave SIGTERM and SIGINT to the main process.

    A scheduler's pre-emption (Slurm, `kill -TERM -PGID`) and a terminal's Ctrl-C signal the
    whole process group. PyTorch's workers die of a SIGTERM that their parent did not send, and
    the main process then raises "DataLoader worker ... is killed by signal" in the middle of a
    step, before its own handler (fastsynth.guard.StopRequest) can stop at a step boundary with
    a checkpoint. Ignoring both here (this runs after PyTorch sets the worker's handlers) keeps
    the workers serving until the main process shuts them down; they still exit when it dies
    (PyTorch's parent watchdog). Loader blocks the signals while it starts the workers, so one
    that arrives before this function runs waits, and is then dropped here.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class Loader(DataLoader):
    """A DataLoader whose workers start with SIGTERM and SIGINT blocked (see ignore_stop_signals):
    forked workers inherit the signal mask, the main process unblocks as soon as they exist, and
    a signal that came meanwhile is delivered to it then, not lost."""

    def _get_iterator(self):
        if self.num_workers == 0 or threading.current_thread() is not threading.main_thread():
            return super()._get_iterator()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super()._get_iterator()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def make_loader(images: ImageList, transform, batch_size: int, *, shuffle: bool, drop_last: bool,
                workers: int = 0, seed: int = 0, pin_memory: bool = False) -> DataLoader:
    gen = torch.Generator()
    gen.manual_seed(seed)  # the shuffling order follows --seed
    return Loader(FileDataset(images, transform), batch_size=batch_size,
                      shuffle=shuffle, drop_last=drop_last, num_workers=workers, generator=gen,
                      pin_memory=pin_memory, persistent_workers=workers > 0, worker_init_fn=ignore_stop_signals)


def rank_order(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[int]:
    """This rank's sample order for one epoch: one permutation of the n samples drawn from
    (seed, epoch) alone, rank r taking every world-th entry from r (the tail that does not give
    every rank one more is left out).

    So each global batch is a contiguous run of the same permutation whatever the number of
    processes: a run resumed under another world size reads the epoch's remaining images, and
    seeds give independent orders (DistributedSampler's seed + epoch made seed s at epoch e + 1
    read seed s + 1's epoch e).
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g)
    return order[: n // world * world][rank::world].tolist()


def epoch_loader(dataset: Dataset, batch_size: int, epoch: int, seed: int, skip_batches: int = 0,
                 workers: int = 0, pin_memory: bool = False, rank: int = 0, world: int = 1) -> DataLoader:
    """Full batches of `dataset` in an order fixed by (seed, epoch), from batch `skip_batches` on.

    The order is a function of the epoch alone, so a run resumed mid-epoch reads exactly the
    batches it had not seen. The loader's own generator is seeded too: without one, DataLoader
    draws its worker seed from the global RNG, which would shift every later random draw.

    Several ranks: `batch_size` is the per-rank batch and each rank reads its own shard of the
    one (seed, epoch) permutation (rank_order); the shards are disjoint and together cover the
    epoch (less the few images that do not fill a batch on every rank).
    """
    order = torch.tensor(rank_order(len(dataset), seed, epoch, rank, world), dtype=torch.long)
    full = len(order) // batch_size * batch_size
    indices = order[:full][skip_batches * batch_size:].tolist()
    # Workers' augmentation seeds come from this generator: distinct per rank.
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 1 + 7_919 * rank)
    return Loader(dataset, batch_size=batch_size, sampler=indices, drop_last=True, num_workers=workers,
                  generator=gen, pin_memory=pin_memory, worker_init_fn=ignore_stop_signals)
