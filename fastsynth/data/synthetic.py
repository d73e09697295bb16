"""The embedded default dataset: a fine-grained set whose class cue is small and whose clutter
is not, generated deterministically from a seed into a cache folder of real JPEG files.

Why this design: METHOD.md's premise is that a self-supervised encoder latches onto background
and global appearance instead of the small discriminative parts of a fine-grained object. So
every image shows ONE object type (a stylised top-view aircraft), and classes differ ONLY by
three part-level shape details, each about 8-15 % of the object's area:
  tail  A bar | B swept-back | C forward-swept | D twin end plates | E round
  tip   A disc | B wedge | C block            (markers on both wing tips)
  nose  A band | B cone | C twin dots         (pattern on the forward fuselage)
Class k is the k-th combination of itertools.product(tails, tips[:m], noses[:m]) with the
smallest m in 1..3 with 5*m*m >= num_classes: the default 20 classes are the full 5x2x2
design, so every part choice is shared by several classes and only the combination names one.
Names look like `c07_tailB_tipB_noseA`.
Everything else is drawn independently of the class: a random gradient background with 12-24
random shapes, lines and blobs (some the size and shape of the markers and tails), rotation in
+-30 deg, object length 65-90 % of the image side, position, body colour, a detail colour
(random, only forced to contrast with the body, so colour never identifies the class), random
engine pods and wing sweep, then brightness, contrast, colour cast and sensor noise.

Cache layout (`$FASTSYNTH_CACHE` or `~/.cache/fastsynth` when root is None):
  <root>/synthetic-v{VERSION}-s{seed}-c{C}-n{train}x{test}-{size}px/
      train/<class_name>/<index:04d>.jpg   test/<class_name>/<index:04d>.jpg   meta.json
Generation writes into a temporary sibling folder, writes meta.json last and renames the folder
into place, so an interrupted run never leaves a half set; a folder whose meta.json matches is
reused. Image (split, c, i) draws from `numpy.random.default_rng([seed, split_id, c, i])`, so
its bytes do not depend on generation order or on the other counts.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import tempfile
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from .base import DatasetError, ImageList, Splits

VERSION = 2
SPLITS = ("train", "test")  # split_id = position: part of every image's RNG seed
TAILS, TIPS, NOSES = "ABCDE", "ABC", "ABC"
CLUTTER = (12, 25)  # number of background shapes, [low, high)
ROTATION = 30       # object rotation range, degrees either way
MARKER = 0.18       # wing-tip marker radius in object units
KINDS = 5           # clutter kinds drawn: 3 = no part-shaped decoys, 5 = with them
LENGTH = (0.65, 0.9)  # nose-to-tail length as a fraction of the image side
SS = 3  # draw at 3x and downsample: antialiased edges without per-shape tricks
Point = Tuple[float, float]


def class_names(num_classes: int) -> List[str]:
    """`c{k:02d}_tail?_tip?_nose?` for the first num_classes combinations (module docstring)."""
    if not 1 <= num_classes <= len(TAILS) * len(TIPS) * len(NOSES):
        raise DatasetError(f"synthetic: num_classes={num_classes} must be in 1..45 "
                           f"({len(TAILS)} tails x {len(TIPS)} tips x {len(NOSES)} noses)")
    m = next(m for m in (1, 2, 3) if len(TAILS) * m * m >= num_classes)
    combos = itertools.product(TAILS, TIPS[:m], NOSES[:m])
    return [f"c{k:02d}_tail{t}_tip{w}_nose{n}"
            for k, (t, w, n) in zip(range(num_classes), combos)]


# ---------------------------------------------------------------- drawing one image

def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 20) -> List[Point]:
    return [(cx + rx * math.cos(2 * math.pi * j / n), cy + ry * math.sin(2 * math.pi * j / n))
            for j in range(n)]


def _grow(poly: Sequence[Point], k: float, y0: float) -> List[Point]:
    """Scale a part by k about (0, y0): the tail is drawn larger than its base outline."""
    return [(k * x, y0 + k * (y - y0)) for x, y in poly]


def _mirror(poly: Sequence[Point]) -> List[Point]:
    return [(-x, y) for x, y in reversed(poly)]


def _tail(kind: str) -> List[List[Point]]:
    """Horizontal stabiliser in object units (nose at y=-1, tail at y=+1); body-coloured."""
    if kind == "A":    # straight bar
        return [[(-0.42, 0.72), (0.42, 0.72), (0.42, 0.88), (-0.42, 0.88)]]
    if kind == "B":    # strongly swept back
        half = [(0.0, 0.62), (0.45, 0.95), (0.45, 1.05), (0.0, 0.86)]
    elif kind == "C":  # forward swept: tips ahead of the root
        half = [(0.0, 0.78), (0.42, 0.58), (0.42, 0.72), (0.0, 0.98)]
    elif kind == "D":  # short bar with end plates
        return [[(-0.34, 0.76), (0.34, 0.76), (0.34, 0.86), (-0.34, 0.86)],
                [(0.28, 0.62), (0.42, 0.62), (0.42, 1.0), (0.28, 1.0)],
                [(-0.42, 0.62), (-0.28, 0.62), (-0.28, 1.0), (-0.42, 1.0)]]
    else:              # round disc
        return [_ellipse(0.0, 0.8, 0.3, 0.2)]
    return [half, _mirror(half)]


def _tip_marker(kind: str, x: float, y: float) -> List[Point]:
    """One wing-tip marker centred at (x, y); shape, not colour, carries the class."""
    r = MARKER  # two markers together: about 12 % of the object's area
    if kind == "A":
        return _ellipse(x, y, r, r, 16)
    if kind == "B":  # wedge pointing forward
        return [(x, y - 1.3 * r), (x + r, y + r), (x - r, y + r)]
    return [(x - 0.75 * r, y - 1.1 * r), (x + 0.75 * r, y - 1.1 * r),
            (x + 0.75 * r, y + 1.1 * r), (x - 0.75 * r, y + 1.1 * r)]


def _nose(kind: str, fw: float) -> List[List[Point]]:
    """Pattern on the forward fuselage of half-width fw (5-6 % of the object's area)."""
    if kind == "A":  # transverse band
        return [[(-fw, -0.64), (fw, -0.64), (fw, -0.44), (-fw, -0.44)]]
    if kind == "B":  # nose cone
        return [[(0.0, -1.0), (fw * 0.9, -0.72), (fw, -0.6), (-fw, -0.6), (-fw * 0.9, -0.72)]]
    return [_ellipse(-fw * 0.55, -0.58, 0.095, 0.095, 12),
            _ellipse(fw * 0.55, -0.58, 0.095, 0.095, 12)]


def _rand_colour(rng: np.random.Generator) -> Tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _contrasting(rng: np.random.Generator, ref: Tuple[int, int, int]) -> Tuple[int, int, int]:
    """A random colour far enough from ref that a detail stays visible on the body."""
    for _ in range(64):
        c = _rand_colour(rng)
        if np.linalg.norm(np.subtract(c, ref)) > 160:
            return c
    return tuple(255 - v for v in ref)


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, side: int) -> None:
    """Random shapes in random colours; the small ones mimic markers and tails on purpose."""
    for _ in range(int(rng.integers(*CLUTTER))):
        kind = rng.integers(0, KINDS)
        cx, cy = rng.uniform(-0.1, 1.1, 2) * side
        r = side * (rng.uniform(0.1, 0.4) if kind < 2 else rng.uniform(0.02, 0.1))
        col = _rand_colour(rng)
        if kind == 0:    # blob
            draw.ellipse([cx - r, cy - r * rng.uniform(0.3, 1), cx + r, cy + r], fill=col)
        elif kind == 1:  # random polygon
            n = int(rng.integers(3, 7))
            ang = np.sort(rng.uniform(0, 2 * math.pi, n))
            rad = r * rng.uniform(0.4, 1.0, n)
            draw.polygon([(cx + a * math.cos(t), cy + a * math.sin(t))
                          for t, a in zip(ang, rad)], fill=col)
        elif kind == 2:  # line
            x2, y2 = rng.uniform(0, 1, 2) * side
            draw.line([cx, cy, x2, y2], fill=col, width=int(rng.integers(1, 4 * SS)))
        else:            # part-sized decoy: a marker or tail shape at a random pose
            pts = (_tip_marker("ABC"[rng.integers(0, 3)], 0, 0) if kind == 3
                   else _tail("ABCDE"[rng.integers(0, 5)])[0])
            s, t = r * 3, rng.uniform(0, 2 * math.pi)
            co, si = math.cos(t), math.sin(t)
            draw.polygon([(cx + s * (co * x - si * y), cy + s * (si * x + co * y))
                          for x, y in pts], fill=col)


def render(seed: int, split_id: int, c: int, i: int, num_classes: int = 20,
           size: int = 96) -> Image.Image:
    """Draw image i of class c in split split_id; a pure function of its arguments."""
    rng = np.random.default_rng([seed, split_id, c, i])
    tail, tip, nose = (part[-1] for part in class_names(num_classes)[c].split("_")[1:])
    side = size * SS
    # background: linear gradient between two random colours in a random direction
    t = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size] / size  # a smooth ramp: compute small, upsample
    ramp = np.clip(0.5 + (xx - 0.5) * math.cos(t) + (yy - 0.5) * math.sin(t), 0, 1)[..., None]
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = Image.fromarray((c0 + (c1 - c0) * ramp).astype(np.uint8)).resize((side, side),
                                                                           Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    _clutter(draw, rng, side)

    # object pose: unit coordinates -> canvas (scale = half the nose-to-tail length)
    half = side * rng.uniform(*LENGTH) / 2
    theta = math.radians(rng.uniform(-ROTATION, ROTATION))
    reach = half * 1.15  # wings and tail poke slightly past the unit square once rotated
    cx, cy = rng.uniform(reach, side - reach, 2) if side > 2 * reach else (side / 2, side / 2)
    co, si = math.cos(theta), math.sin(theta)

    def place(poly):
        return [(cx + half * (co * x - si * y), cy + half * (si * x + co * y)) for x, y in poly]

    body = _rand_colour(rng)
    edge = tuple(int(v * 0.45) for v in body) if sum(body) > 300 else \
        tuple(int(v + (255 - v) * 0.55) for v in body)
    detail = _contrasting(rng, body)
    fw = rng.uniform(0.15, 0.18)     # fuselage half-width (nuisance)
    sweep = rng.uniform(0.05, 0.3)   # wing sweep (nuisance)
    wing = [(0.0, -0.3), (0.9, -0.05 + sweep), (0.9, 0.17 + sweep), (0.0, 0.2)]
    parts = [_ellipse(0.0, 0.0, fw, 1.0, 28), wing, _mirror(wing)] + [_grow(p, 1.35, 0.8) for p in _tail(tail)]
    if rng.random() < 0.5:           # engine pods, present or not regardless of class
        parts += [_ellipse(s * 0.42, -0.12 + sweep * 0.45, 0.07, 0.16, 12) for s in (-1, 1)]
    # Two passes: wide edge strokes, then plain fills over them, so only the outer half of the
    # silhouette's stroke survives and the object stays visible on clutter of its own colour.
    for p in parts:
        q = place(p)
        draw.line(q + q[:1], fill=edge, width=3 * SS, joint="curve")
    for p in parts:
        draw.polygon(place(p), fill=body)
    tip_y = 0.06 + sweep
    for p in [_tip_marker(tip, 0.9, tip_y), _tip_marker(tip, -0.9, tip_y)] + _nose(nose, fw):
        draw.polygon(place(p), fill=detail)

    # lighting: contrast about the mean, brightness, per-channel colour cast, sensor noise
    a = np.asarray(img.resize((size, size), Image.LANCZOS), dtype=np.float32)
    a = (a - a.mean()) * rng.uniform(0.6, 1.3) + a.mean()
    a = a * rng.uniform(0.65, 1.3) * rng.uniform(0.8, 1.2, 3)
    a = a + rng.normal(0, rng.uniform(0, 6), a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


# ---------------------------------------------------------------- the cached split files

def default_cache_root() -> str:
    return os.environ.get("FASTSYNTH_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "fastsynth")


def _lists(folder: str, classes: List[str], counts: Tuple[int, int]) -> Splits:
    out = []
    for s, n in zip(SPLITS, counts):
        paths = [os.path.join(folder, s, name, f"{i:04d}.jpg") for name in classes
                 for i in range(n)]
        out.append(ImageList(paths, [c for c in range(len(classes)) for _ in range(n)],
                             list(classes)))
    return Splits(out[0], out[1], "synthetic")


def _progress(total: int):
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc="generating synthetic set", unit="img", leave=False)
    except ImportError:  # tqdm is a dependency, but a missing bar must not stop generation
        return None


def synthetic(root: Optional[str] = None, download: bool = False, seed: int = 0,
              num_classes: int = 20, train_per_class: int = 40, test_per_class: int = 20,
              size: int = 96) -> Splits:
    """Build (or reuse) the synthetic set; `download` is accepted for the registry and unused."""
    seed, num_classes, size = int(seed), int(num_classes), int(size)  # JSON-safe, exact names
    train_per_class, test_per_class = int(train_per_class), int(test_per_class)
    classes = class_names(num_classes)
    counts = (train_per_class, test_per_class)
    meta = {"version": VERSION, "seed": seed, "num_classes": num_classes,
            "train_per_class": train_per_class, "test_per_class": test_per_class,
            "size": size, "classes": classes}
    root = os.path.abspath(os.path.expanduser(root or default_cache_root()))
    name = f"synthetic-v{VERSION}-s{seed}-c{num_classes}-n{train_per_class}x{test_per_class}" \
           f"-{size}px"
    folder = os.path.join(root, name)
    if not os.path.isdir(folder):
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root)
        try:
            _generate(tmp, meta, counts)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; a cache is readable like any dir
            os.rename(tmp, folder)
        except OSError:
            if not os.path.isdir(folder):  # a real failure, not a concurrent winner
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _check(folder, meta)
    splits = _lists(folder, classes, counts)
    missing = [p for p in splits.train.paths + splits.test.paths if not os.path.isfile(p)]
    if missing:
        raise DatasetError(f"synthetic: {len(missing)} images missing from {folder}, e.g. "
                           f"{missing[0]}; delete {folder} and it will be regenerated")
    return splits


def _check(folder: str, meta: dict) -> None:
    path = os.path.join(folder, "meta.json")
    try:
        with open(path, encoding="utf-8") as f:
            found = json.load(f)
    except (OSError, ValueError) as e:
        found = f"unreadable ({e})"
    if found != meta:
        raise DatasetError(f"synthetic: {path} does not describe this set (found {found!r}); "
                           f"delete {folder} and it will be regenerated")


def _generate(tmp: str, meta: dict, counts: Tuple[int, int]) -> None:
    classes = meta["classes"]
    bar = _progress(len(classes) * sum(counts))
    for split_id, (s, n) in enumerate(zip(SPLITS, counts)):
        for c, cname in enumerate(classes):
            d = os.path.join(tmp, s, cname)
            os.makedirs(d)
            for i in range(n):
                img = render(meta["seed"], split_id, c, i, meta["num_classes"], meta["size"])
                img.save(os.path.join(d, f"{i:04d}.jpg"), quality=90)
                if bar is not None:
                    bar.update()
    if bar is not None:
        bar.close()
    with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)  # last: its presence marks a complete set
