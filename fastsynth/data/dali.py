"""The DALI loader: the same ImageList, views and batch contract as the torch loader, decoded and
augmented by NVIDIA DALI (CPU-only here, ``mixed``/GPU on a CUDA machine).

API (everything imports nvidia.dali lazily, so ``import fastsynth.data.dali`` always works):

- ``dali_available() -> bool``; ``require_dali()`` raises ``DaliUnavailableError`` (an ImportError)
  naming ``pip install -e '.[dali]'``; ``resolve_loader("dali" | "torch" | "auto") -> "dali" | "torch"``
  (``auto``: DALI where it imports, else torch with one warning).
- ``make_dali_ssl_loader(images, image_size, batch_size, *, seed, epoch=0, skip_batches=0,
  device="cpu", device_id=None, shard_id=0, num_shards=1, workers=1)``: one epoch, like
  ``loaders.epoch_loader``. Yields ``((x1, x2, x), labels, indices)``: x1, x2 the two SSL views
  (``transforms.augment``), x the plain view (``transforms.plain``), each B x 3 x S x S float32
  (NCHW, ImageNet-normalised) on the CPU or on ``cuda:device_id``; labels and indices B int64 on
  the host, indices = positions in ``images``. Full batches only; ``len()`` = batches this epoch.
  The batches hold exactly the indices of ``epoch_loader`` for the same (seed, epoch,
  skip_batches), with ``num_shards`` ranks as loaders.rank_order splits them.
- ``make_dali_eval_loader(images, image_size, batch_size, *, train=False, shuffle=False, seed=0,
  epoch=0, device=..., device_id=..., shard_id=0, num_shards=1, workers=1)``: yields
  ``(x, labels, indices)`` over every sample of the shard once, the last batch partial;
  ``train=False`` is ``transforms.evaluation``, ``train=True`` is ``transforms.probe_train``.
- ``device="cpu"``: a CPU-only pipeline (``device_id=None``; DALI never touches CUDA).
  ``device="gpu"``: nvJPEG/hardware decode (``mixed``) and GPU operators on ``device_id``
  (default: torch's current device). ``workers``: DALI's CPU threads (0 counts as 1). Augmentation
  draws follow (seed, epoch, shard_id, skip_batches); a resumed epoch reads the same remaining
  batches but not the same random crops.

Why the order is computed here and not by the reader: the reader's own shuffling is a
1024-sample buffer (``random_shuffle``) or a fixed reshuffle (``shuffle_after_epoch``), neither
the torch loader's (seed, epoch) permutation, and neither can start mid-epoch. So each epoch
passes the reader an explicitly ordered file list (``labels`` = the ImageList positions, mapped
to class labels on the host) and builds a fresh pipeline (tens of ms); the list is cut so that
every shard gets the same whole number of batches, which keeps ranks in step.

Corrupt files are not handled here: the caller passes an ImageList already cleaned by
``scan.py``, because a decode error inside DALI stops the whole pipeline.
"""
from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Iterator, Sequence

import torch

from .base import ImageList
from .transforms import MEAN, STD

INSTALL_HINT = "pip install -e '.[dali]'  (the nvidia-dali-cuda130 wheel, Linux only)"
_READER = "reader"  # the iterator finds the epoch size through this operator name


class DaliUnavailableError(ImportError):
    """DALI was asked for but does not import; the message says how to install it."""


def dali_available() -> bool:
    try:
        import nvidia.dali
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken wheel (missing CUDA library) counts as absent
        return False
    return True


def require_dali() -> None:
    try:
        import nvidia.dali
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as e:
        raise DaliUnavailableError(f"--loader dali needs NVIDIA DALI, which does not import ({e}). "
                                   f"Install it with: {INSTALL_HINT}, or use --loader torch.") from e


_warned_auto = False


def resolve_loader(choice: str) -> str:
    """'dali' | 'torch' | 'auto' -> 'dali' | 'torch'; 'auto' warns once when it falls back."""
    global _warned_auto
    if choice not in ("dali", "torch", "auto"):
        raise ValueError(f"loader {choice!r}: choose one of dali, torch, auto")
    if choice == "dali":
        require_dali()
    if choice != "auto":
        return choice
    if dali_available():
        return "dali"
    if not _warned_auto:
        warnings.warn(f"--loader auto: DALI does not import, using the torchvision loader ({INSTALL_HINT})")
        _warned_auto = True
    return "torch"


def _pipeline_seed(*parts: int) -> int:
    # A stable hash, not Python's hash(): the same run must draw the same augmentations.
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


# ---------------------------------------------------------------- graph pieces (inside a pipeline)

def _normalise(img, dev: str, mirror=0, crop=None, crop_pos=(0.5, 0.5)):
    """uint8 HWC -> float32 CHW, (v/255 - MEAN) / STD as ToTensor + Normalize, flip and crop fused."""
    from nvidia.dali import fn, types
    kw = {"crop": crop, "crop_pos_y": crop_pos[0], "crop_pos_x": crop_pos[1]} if crop is not None else {}
    return fn.crop_mirror_normalize(img, device=dev, mirror=mirror, dtype=types.FLOAT, output_layout="CHW",
                                    mean=[255.0 * m for m in MEAN], std=[255.0 * s for s in STD], **kw)


def _maybe(p: float, value, identity: float):
    """`value` with probability p, else `identity`: how RandomApply becomes per-sample arguments."""
    from nvidia.dali import fn
    on = fn.random.coin_flip(probability=p)
    return on * value + (1 - on) * identity


def _colour(img, dev: str, brightness, contrast, saturation, hue):
    """ColorJitter's four factors (and grayscale, as saturation 0) on uint8 HWC.

    Contrast blends towards the image's mean luminance, as torchvision/PIL do (DALI's default
    centre is the fixed 128). With that centre, brightness, contrast and saturation (DALI scales
    chroma at fixed luma Y = .299 R + .587 G + .114 B, PIL's "L") commute up to clipping, so
    ColorJitter's random order does not matter; hue rotates chroma in YIQ, not PIL's HSV, so
    it is close but not equal.
    """
    from nvidia.dali import fn, types
    rgb = fn.reductions.mean(img, device=dev, axes=(0, 1), dtype=types.FLOAT)  # 3 channel means
    if dev == "gpu":
        rgb = rgb.cpu()  # argument inputs live on the host; legal with DALI 2's dynamic executor
    luma = rgb[0] * 0.299 + rgb[1] * 0.587 + rgb[2] * 0.114
    out = fn.brightness_contrast(img, device=dev, brightness=brightness, contrast=contrast, contrast_center=luma)
    return fn.hsv(out, device=dev, saturation=saturation, hue=hue)


def _ssl_view(img, dev: str, size: int):
    """transforms.augment: RandomResizedCrop(0.2, 1), jitter p=.8, grayscale p=.2, blur p=.5, flip."""
    from nvidia.dali import fn
    x = fn.random_resized_crop(img, device=dev, size=(size, size), random_area=(0.2, 1.0),
                               random_aspect_ratio=(3 / 4, 4 / 3), antialias=True)
    jitter = fn.random.coin_flip(probability=0.8)  # one draw switches all four factors, as RandomApply

    def factor(lo: float, hi: float, identity: float):
        return jitter * fn.random.uniform(range=(lo, hi)) + (1 - jitter) * identity

    gray = fn.random.coin_flip(probability=0.2)
    x = _colour(x, dev, brightness=factor(0.6, 1.4, 1.0), contrast=factor(0.6, 1.4, 1.0),
                saturation=factor(0.6, 1.4, 1.0) * (1 - gray),
                hue=factor(-0.1 * 360.0, 0.1 * 360.0, 0.0))  # torchvision's 0.1 of a turn, in degrees
    # Not blurring = sigma 1e-3: the kernel's off-centre weights underflow to exactly 0, so the
    # image passes unchanged, and one operator serves the whole batch without conditionals.
    k = max(3, int(0.1 * size) // 2 * 2 + 1)  # transforms.augment's kernel rule
    sigma = _maybe(0.5, fn.random.uniform(range=(0.1, 2.0)), 1e-3)
    x = fn.gaussian_blur(x, device=dev, window_size=k, sigma=sigma)
    return _normalise(x, dev, mirror=fn.random.coin_flip(probability=0.5))


def _eval_view(img, enc, dev: str, size: int):
    """transforms.evaluation: shorter side to round(size * 256 / 224) with torchvision's
    rounding of the longer side (int(), from the encoded shape), then a centre crop."""
    from nvidia.dali import fn, types
    short = round(size * 256 / 224)
    shape = fn.peek_image_shape(enc, adjust_orientation=False)  # H, W, C on the host in every mode
    h, w = shape[0], shape[1]
    wide = w >= h
    new_h = wide * short + (1 - wide) * (short * h // w)
    new_w = wide * (short * w // h) + (1 - wide) * short
    x = fn.resize(img, device=dev, resize_x=fn.cast(new_w, dtype=types.FLOAT),
                  resize_y=fn.cast(new_h, dtype=types.FLOAT), antialias=True)
    # CenterCrop's offset is Python's round((H - size) / 2), half to even; DALI rounds halves up,
    # a one-pixel shift whenever H - size is odd. So pass the offset itself, as a position.
    pos = []
    for extent in (new_h, new_w):
        d = extent - size
        half = d // 2
        top = half + (d - 2 * half) * (half - 2 * (half // 2))  # + 1 only for an odd d with odd d // 2
        pos.append(fn.cast(top, dtype=types.FLOAT) / fn.cast(d + (d == 0), dtype=types.FLOAT))
    return _normalise(x, dev, crop=(size, size), crop_pos=pos)


def _build(kind: str, files: list[str], positions: list[int], size: int, batch_size: int, *, dev: str,
           device_id: int | None, workers: int, seed: int, shard_id: int, num_shards: int):
    from nvidia.dali import Pipeline, fn, types
    pipe = Pipeline(batch_size=batch_size, num_threads=max(1, workers), device_id=device_id, seed=seed,
                    prefetch_queue_depth=2)
    with pipe:
        # labels = ImageList positions: the reader hands back each sample's true index.
        enc, index = fn.readers.file(files=files, labels=positions, shard_id=shard_id, num_shards=num_shards,
                                     random_shuffle=False, stick_to_shard=True,
                                     pad_last_batch=kind != "ssl", name=_READER)
        # No EXIF rotation: loaders.load_rgb (PIL) ignores it too, so both loaders see the same pixels.
        img = fn.decoders.image(enc, device="mixed" if dev == "gpu" else "cpu", output_type=types.RGB,
                                adjust_orientation=False)
        if kind == "ssl":
            plain = fn.resize(img, device=dev, resize_x=float(size), resize_y=float(size), antialias=True)
            outs = (_ssl_view(img, dev, size), _ssl_view(img, dev, size), _normalise(plain, dev), index)
        elif kind == "probe":  # transforms.probe_train: RandomResizedCrop (default scale) + flip
            x = fn.random_resized_crop(img, device=dev, size=(size, size), antialias=True)
            outs = (_normalise(x, dev, mirror=fn.random.coin_flip(probability=0.5)), index)
        else:
            outs = (_eval_view(img, enc, dev, size), index)
        pipe.set_outputs(*outs)
    return pipe


# ---------------------------------------------------------------- the loader

class DaliLoader:
    """One pass over `order` (ImageList positions, shard chunks in sequence) as torch batches.

    Each iteration builds its pipeline afresh, so iterating twice gives the same batches.
    """

    def __init__(self, images: ImageList, order: Sequence[int], kind: str, image_size: int, batch_size: int, *,
                 shard_len: int, seed: int, device: str, device_id: int | None, shard_id: int,
                 num_shards: int, workers: int):
        self.images, self.order, self.kind = images, list(order), kind
        self.image_size, self.batch_size, self.shard_len = image_size, batch_size, shard_len
        self.seed, self.shard_id, self.num_shards, self.workers = seed, shard_id, num_shards, workers
        self.device, self.device_id = _device(device, device_id)
        self._labels = torch.as_tensor(images.labels, dtype=torch.int64)
        drop = kind == "ssl"
        self._len = shard_len // batch_size if drop else math.ceil(shard_len / batch_size)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[tuple]:
        if self._len == 0:
            return
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
        pipe = _build(self.kind, [self.images.paths[i] for i in self.order], self.order, self.image_size,
                      self.batch_size, dev=self.device, device_id=self.device_id, workers=self.workers,
                      seed=self.seed, shard_id=self.shard_id, num_shards=self.num_shards)
        names = ["x1", "x2", "x", "index"] if self.kind == "ssl" else ["x", "index"]
        # SSL shards are whole batches, so DROP never drops; eval pads the reader's last batch with
        # copies of the last sample and PARTIAL cuts them off again: no sample lost or repeated.
        policy = LastBatchPolicy.DROP if self.kind == "ssl" else LastBatchPolicy.PARTIAL
        it = DALIGenericIterator([pipe], names, reader_name=_READER, last_batch_policy=policy, auto_reset=False)
        try:
            for n, out in enumerate(it):
                if n == self._len:  # never read into the next epoch, whatever the reader pads
                    break
                b = out[0]
                index = b["index"].reshape(-1).to(torch.int64).cpu()
                views = (b["x1"], b["x2"], b["x"]) if self.kind == "ssl" else b["x"]
                yield views, self._labels[index], index
        finally:
            del it, pipe  # free the pipeline's threads and buffers before the next epoch builds one


def _device(device: str, device_id: int | None):
    if device == "cpu":
        return "cpu", None  # CPU-only pipeline: DALI touches no GPU when device_id is None
    if device in ("gpu", "cuda", "mixed"):
        return "gpu", torch.cuda.current_device() if device_id is None else int(device_id)
    raise ValueError(f"DALI device {device!r}: choose cpu or gpu")


def _check(images: ImageList, batch_size: int, shard_id: int, num_shards: int) -> None:
    require_dali()
    if batch_size < 1 or num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ValueError(f"batch_size={batch_size}, shard_id={shard_id}, num_shards={num_shards}: need "
                         "batch_size >= 1 and 0 <= shard_id < num_shards")
    if len(images) == 0:
        raise ValueError("the image list is empty: nothing to load")


def _shard_orders(n: int, seed: int, epoch: int, num_shards: int) -> list[list[int]]:
    """Each shard's sample order for one epoch, exactly as loaders.epoch_loader draws it
    (loaders.rank_order), so switching --loader changes neither the batches nor which rank
    reads them."""
    from fastsynth.data.loaders import rank_order
    return [rank_order(n, seed, epoch, rank, num_shards) for rank in range(num_shards)]


def make_dali_ssl_loader(images: ImageList, image_size: int, batch_size: int, *, seed: int, epoch: int = 0,
                         skip_batches: int = 0, device: str = "cpu", device_id: int | None = None,
                         shard_id: int = 0, num_shards: int = 1, workers: int = 1) -> DaliLoader:
    """One SSL epoch: ((x1, x2, x), labels, indices) in full batches; see the module docstring."""
    _check(images, batch_size, shard_id, num_shards)
    shards = _shard_orders(len(images), seed, epoch, num_shards)
    per_shard = len(shards[0]) // batch_size * batch_size  # whole batches, the same count on every shard
    if per_shard == 0:
        raise ValueError(f"batch size {batch_size} x {num_shards} shard(s) is larger than the "
                         f"{len(images)} images: lower --batch-size")
    start = skip_batches * batch_size
    # The reader splits this list into num_shards equal contiguous parts: part s is shard s.
    order = [i for shard in shards for i in shard[start:per_shard]]
    return DaliLoader(images, order, "ssl", image_size, batch_size, shard_len=max(0, per_shard - start),
                      seed=_pipeline_seed(seed, epoch, shard_id, skip_batches), device=device,
                      device_id=device_id, shard_id=shard_id, num_shards=num_shards, workers=workers)


def make_dali_eval_loader(images: ImageList, image_size: int, batch_size: int, *, train: bool = False,
                          shuffle: bool = False, seed: int = 0, epoch: int = 0, device: str = "cpu",
                          device_id: int | None = None, shard_id: int = 0, num_shards: int = 1,
                          workers: int = 1) -> DaliLoader:
    """Every sample once: (x, labels, indices), last batch partial; see the module docstring."""
    _check(images, batch_size, shard_id, num_shards)
    n = len(images)
    if n < num_shards:  # DALI's reader needs a sample per shard and fails at build, less clearly
        raise ValueError(f"{n} image(s) cannot be split over {num_shards} shards: evaluate on fewer ranks")
    order = list(range(n))
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    # The reader's shard s is [n*s // k, n*(s+1) // k) of the list it is given.
    shard_len = n * (shard_id + 1) // num_shards - n * shard_id // num_shards
    return DaliLoader(images, order, "probe" if train else "eval", image_size, batch_size, shard_len=shard_len,
                      seed=_pipeline_seed(seed, epoch, shard_id, -1), device=device, device_id=device_id,
                      shard_id=shard_id, num_shards=num_shards, workers=workers)
