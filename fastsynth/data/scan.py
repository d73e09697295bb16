"""Scan a split before training: decode every file once, exclude the ones that cannot be used.

Excluded: zero-byte files, files that do not decode (truncated or corrupt JPEG/PNG, non-image
files with an image extension), formats the DALI loader cannot decode (a GIF named .jpg), PNGs
that PIL decodes but DALI's libpng refuses (a chunk checksum wrong, the end chunk missing), TIFFs
with 1-bit or 32-bit pixels (DALI fails on them or misreads them), images smaller than
`min_size` on a side. Grayscale, CMYK,
palette, 16-bit and alpha images are fine: the loaders convert them to RGB. Results are cached
by (path, size, mtime) so later runs only decode new or changed files. Both loaders read the
cleaned ImageList, so they see the same files.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import List, Tuple

from PIL import Image

from fastsynth.progress import tqdm

from .base import DatasetError, ImageList, Splits

MIN_SIZE = 8  # px: smaller images cannot survive a crop to the training size meaningfully
# Formats both loaders decode (PIL names; each checked through DALI 2.4's CPU pipeline). PIL reads
# the format from the content, so a GIF, TGA or ICO named .jpg passes PIL, then stops a DALI
# pipeline mid-epoch ("nvImageCodec failure") without naming the file: excluded here, for both
# loaders, so that they keep reading the same list.
FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000"})
VERSION = 3  # of the cached verdicts: 2 added the format check, 3 the PNG and TIFF checks
# TIFF pixel modes (PIL's names) DALI 2.4 cannot read: "1" and "I" stop the pipeline ("missing:
# BitsPerSample"), "F" (32-bit float) decodes to other values than PIL's.
TIFF_MODES_DALI_CANNOT_READ = frozenset({"1", "I", "F"})
# A PNG ends with its IEND chunk: zero length, the type, and that type's CRC.
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def check_image(path: str, min_size: int = MIN_SIZE) -> str | None:
    """None if the file decodes to a usable image, else the reason it is excluded."""
    try:
        if os.path.getsize(path) == 0:
            return "zero-byte file"
        with Image.open(path) as im:
            im.load()  # full decode: a truncated file fails here, not at open()
            w, h, fmt, mode = *im.size, im.format, im.mode
        if fmt == "PNG":
            damaged = _png_damage(path)
            if damaged:
                return f"damaged PNG ({damaged}; PIL reads past it, the DALI loader stops on it)"
    except Exception as e:  # noqa: BLE001 - any decoder failure excludes the file
        return f"cannot decode ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    if fmt not in FORMATS:
        return f"{fmt} image (the DALI loader cannot decode it; convert it to JPEG or PNG)"
    if fmt == "TIFF" and mode in TIFF_MODES_DALI_CANNOT_READ:
        return f"TIFF with {mode!r} pixels (1-bit or 32-bit: the DALI loader cannot read them; convert to 8-bit)"
    if min(w, h) < min_size:
        return f"too small ({w}x{h} < {min_size} px)"
    return None


def _png_damage(path: str) -> str | None:
    """What libpng (DALI's PNG decoder) would refuse that PIL's decode lets through: a chunk whose
    CRC is wrong (PIL's verify() checks them) or a file cut anywhere in its last chunk (the end
    chunk must be there, whole; a little data after it, which libpng ignores, is allowed)."""
    with Image.open(path) as im:
        try:
            im.verify()
        except Exception as e:  # noqa: BLE001 - PIL raises SyntaxError, OSError, struct.error, ...
            return f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else 'verify failed'}"
    with open(path, "rb") as fh:
        fh.seek(max(0, os.path.getsize(path) - 4096))
        if PNG_END not in fh.read():
            return "no end chunk"
    return None


def _cache_path(paths: List[str]) -> str:
    base = os.environ.get("FASTSYNTH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastsynth")
    digest = hashlib.sha1("\n".join(sorted(paths)).encode()).hexdigest()[:16]
    return os.path.join(base, f"scan{VERSION}-{digest}.json")


def _signature(path: str) -> list:
    try:
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return [-1, -1]


def scan(images: ImageList, workers: int = 8, desc: str = "scan") -> List[Tuple[int, str]]:
    """[(index, reason)] of the unusable files of `images`, decoding only uncached ones."""
    cache_file = _cache_path(images.paths)
    cache = {}
    if os.path.isfile(cache_file):
        try:
            with open(cache_file) as fh:
                cache = json.load(fh)
        except (OSError, ValueError):
            cache = {}  # a damaged cache is only a slower start
    sigs = [_signature(p) for p in images.paths]
    todo = [i for i, p in enumerate(images.paths) if cache.get(p, [None])[:2] != sigs[i]]
    if todo:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # PIL decodes without the GIL
            reasons = list(tqdm(pool.map(check_image, [images.paths[i] for i in todo]), total=len(todo),
                                desc=f"{desc}: checking {len(todo)} files", leave=False))
        for i, reason in zip(todo, reasons):
            cache[images.paths[i]] = [*sigs[i], reason]
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        tmp = f"{cache_file}.tmp-{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump(cache, fh)
        os.replace(tmp, cache_file)
    return [(i, cache[p][2]) for i, p in enumerate(images.paths) if cache[p][2] is not None]


def clean_splits(splits: Splits, max_bad_fraction: float, report_path: str, workers: int = 8) -> Splits:
    """Both splits without their unusable files; bad_files.txt lists them with the reason.

    Stops with a DatasetError when more than `max_bad_fraction` of a split is bad or a training
    class is left without images.
    """
    cleaned, lines = {}, []
    for name in ("train", "test"):
        images = getattr(splits, name)
        bad = scan(images, workers, desc=name)
        lines += [f"{name}\t{images.paths[i]}\t{reason}" for i, reason in bad]
        drop = {i for i, _ in bad}
        cleaned[name] = ImageList([p for i, p in enumerate(images.paths) if i not in drop],
                                  [y for i, y in enumerate(images.labels) if i not in drop], images.classes)
        if bad:
            print(f"{name}: excluded {len(bad)} of {len(images)} files that cannot be used (see {report_path})")
    if lines:
        with open(report_path, "w") as fh:
            fh.write("split\tpath\treason\n" + "\n".join(lines) + "\n")
    for name in ("train", "test"):
        total, kept = len(getattr(splits, name)), len(cleaned[name])
        if total and (total - kept) / total > max_bad_fraction:
            raise DatasetError(f"{name} split: {total - kept} of {total} files are unusable "
                               f"({100 * (total - kept) / total:.1f} % > --max-bad-fraction {max_bad_fraction}); "
                               f"they are listed in {report_path}")
    train = cleaned["train"]
    empty = sorted(set(range(splits.train.num_classes)) - set(train.labels))
    if empty:
        names = [train.classes[c] if train.classes else str(c) for c in empty]
        raise DatasetError(f"train split: no usable image left in class(es) {', '.join(names)} "
                           f"(excluded files are listed in {report_path})")
    return Splits(train=train, test=cleaned["test"], name=splits.name)
