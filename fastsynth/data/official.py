"""Parsers for the official on-disk layouts of the paper's three benchmarks, plus a folder tree.

METHOD.md evaluates on FGVC-Aircraft, CUB-200-2011 and Stanford Cars; each builder here reads
the metadata files exactly as distributed and returns `Splits` with absolute paths and 0-based
labels. Nothing is downloaded unless `download=True`. Every failure is one `DatasetError` that
names the path looked at, the file (and line) that is wrong, and how to get the data.
"""
from __future__ import annotations

import csv
import os
from typing import Dict, List, Optional, Sequence, Tuple

from .base import DatasetError, ImageList, Splits

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

_AIRCRAFT_HOW = ("get it with --download (torchvision's FGVCAircraft downloader), or unpack "
                 "fgvc-aircraft-2013b.tar.gz from "
                 "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/ into the data root")
_CUB_HOW = ("CUB-200-2011 has no automatic downloader: fetch CUB_200_2011.tgz from "
            "https://www.vision.caltech.edu/datasets/cub_200_2011/ and unpack it into the data "
            "root so that <root>/CUB_200_2011/images.txt exists")
_CARS_HOW = ("the official Stanford Cars URLs are dead (torchvision's download is broken "
             "upstream): get a copy elsewhere (e.g. the Kaggle mirror 'stanford-cars-dataset' "
             "plus cars_test_annos_withlabels.mat) and place it in the expected layout")


# ---------------------------------------------------------------- shared helpers

def _locate(root: str, sub: str, markers: Sequence[str]) -> Tuple[Optional[str], str]:
    """Accept either the dataset folder itself or its parent (downloaders nest it in `sub`).

    Returns (base, marker) for the first marker file found, or (None, "") when none is.
    """
    for marker in markers:
        for base in (root, os.path.join(root, sub)):
            if os.path.exists(os.path.join(base, marker)):
                return base, marker
    return None, ""


def _find_base(root: str, sub: str, markers: Sequence[str], what: str, layout: str,
               how: str, download: bool = False) -> Tuple[str, str]:
    if download:  # no working downloader: say so instead of silently not downloading
        how = f"--download cannot fetch {what}: {how}"
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise DatasetError(f"{what}: data root {root} does not exist; expected {layout}; {how}")
    base, marker = _locate(root, sub, markers)
    if base is None:
        raise DatasetError(f"{what}: no {' or '.join(markers)} in {root} nor in "
                           f"{os.path.join(root, sub)}; expected {layout}; {how}")
    return base, marker


def _need(path: str, what: str, how: str) -> str:
    if not os.path.exists(path):
        raise DatasetError(f"{what}: missing {path}; {how}")
    return path


def _read_rows(path: str, ncols: int, what: str, how: str) -> List[Tuple[int, List[str]]]:
    """Whitespace table -> [(line_no, fields)]; the last column may hold spaces (variant names)."""
    _need(path, what, how)
    rows = []
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.split(maxsplit=ncols - 1)
            if len(fields) != ncols:
                raise DatasetError(f"{what}: {path} line {no}: expected {ncols} fields, got "
                                   f"{line.rstrip()!r}; the file is malformed, re-extract it")
            rows.append((no, [x.strip() for x in fields]))
    return rows


def _id_map(rows, path: str, what: str) -> Dict[str, str]:
    """First column is a unique id; a repeated id is an error (it would silently drop a sample)."""
    out: Dict[str, str] = {}
    for no, (key, val) in rows:
        if key in out:
            raise DatasetError(f"{what}: {path} line {no}: duplicate id {key!r}")
        out[key] = val
    return out


def _check_files(paths: Sequence[str], what: str, how: str, sources: Sequence[str] | None = None) -> None:
    """Fail before training starts, not at the first missing image in epoch 3. `sources[i]`
    names the metadata file and line that listed paths[i]."""
    missing = [i for i, p in enumerate(paths) if not os.path.isfile(p)]
    if missing:
        first = missing[0]
        where = f" ({sources[first]})" if sources else ""
        raise DatasetError(f"{what}: {len(missing)} of {len(paths)} images listed in the "
                           f"metadata are missing, e.g. {paths[first]}{where}; {how}")


# ---------------------------------------------------------------- FGVC-Aircraft

def aircraft(root: str, download: bool = False) -> Splits:
    """FGVC-Aircraft 2013b at *variant* level (100 classes): trainval 6667 / test 3333.

    Layout: `<root>[/fgvc-aircraft-2013b]/data/{variants.txt, images_variant_trainval.txt,
    images_variant_test.txt, images/<id>.jpg}`; split files hold `<id> <variant name>`.
    """
    what, marker = "FGVC-Aircraft", os.path.join("data", "variants.txt")
    root = os.path.abspath(os.path.expanduser(root))
    # Skip the download when the set is already there (also when root is the inner folder,
    # which torchvision would not notice and would download into a nested copy).
    if download and _locate(root, "fgvc-aircraft-2013b", [marker])[0] is None:
        _tv_download_aircraft(root)
    layout = "<root>[/fgvc-aircraft-2013b]/data/{variants.txt, images_variant_*.txt, images/}"
    base, _ = _find_base(root, "fgvc-aircraft-2013b", [marker], what, layout, _AIRCRAFT_HOW)
    data = os.path.join(base, "data")
    vpath = os.path.join(data, "variants.txt")
    with open(vpath, encoding="utf-8") as f:
        classes = [line.strip() for line in f if line.strip()]
    index = {c: i for i, c in enumerate(classes)}

    def split(name: str) -> ImageList:
        path = os.path.join(data, f"images_variant_{name}.txt")
        rows = _read_rows(path, 2, what, _AIRCRAFT_HOW)
        ids = _id_map(rows, path, what)
        labels = []
        for no, (img, variant) in rows:
            if variant not in index:
                raise DatasetError(f"{what}: {path} line {no}: variant {variant!r} is not in "
                                   f"{vpath}")
            labels.append(index[variant])
        paths = [os.path.join(data, "images", f"{i}.jpg") for i in ids]
        _check_files(paths, what, _AIRCRAFT_HOW, [f"{path} line {no}" for no, _ in rows])
        return ImageList(paths, labels, list(classes))

    return Splits(split("trainval"), split("test"), "aircraft")


def _tv_download_aircraft(root: str) -> None:
    try:
        from torchvision.datasets import FGVCAircraft
    except ImportError as e:
        raise DatasetError(f"FGVC-Aircraft: --download needs torchvision ({e}); "
                           f"or {_AIRCRAFT_HOW}") from None
    os.makedirs(root, exist_ok=True)
    # torchvision skips the download when <root>/fgvc-aircraft-2013b is already complete.
    try:
        FGVCAircraft(root, split="trainval", annotation_level="variant", download=True)
    except Exception as e:  # network, disk, checksum: all end the same way for the user
        raise DatasetError(f"FGVC-Aircraft: download into {os.path.abspath(root)} failed "
                           f"({type(e).__name__}: {e}); {_AIRCRAFT_HOW}") from e


# ---------------------------------------------------------------- CUB-200-2011

def cub(root: str, download: bool = False) -> Splits:
    """CUB-200-2011 (200 classes), official split: train 5994 / test 5794.

    Layout: `<root>[/CUB_200_2011]/{images.txt (id path), image_class_labels.txt (id label,
    1-based), train_test_split.txt (id is_train), classes.txt (id name), images/}`.
    """
    what = "CUB-200-2011"
    layout = ("<root>[/CUB_200_2011]/{images.txt, image_class_labels.txt, "
              "train_test_split.txt, classes.txt, images/}")
    base, _ = _find_base(root, "CUB_200_2011", ["images.txt"], what, layout, _CUB_HOW, download)
    f = lambda n: os.path.join(base, n)  # noqa: E731
    image_rows = _read_rows(f("images.txt"), 2, what, _CUB_HOW)
    images = _id_map(image_rows, f("images.txt"), what)
    image_line = {img: no for no, (img, _) in image_rows}
    classes_rows = _read_rows(f("classes.txt"), 2, what, _CUB_HOW)
    class_ids = _id_map(classes_rows, f("classes.txt"), what)
    classes = [name for _, (_, name) in classes_rows]
    cls_index = {cid: i for i, cid in enumerate(class_ids)}

    def per_image(name: str, allowed: Dict[str, int], meaning: str) -> Dict[str, int]:
        """Map id -> allowed[value]; ids must match images.txt one to one."""
        path = f(name)
        rows = _read_rows(path, 2, what, _CUB_HOW)
        for no, (img, val) in rows:
            if img not in images:
                raise DatasetError(f"{what}: {path} line {no}: image id {img!r} has no line "
                                   f"in {f('images.txt')}")
            if val not in allowed:
                raise DatasetError(f"{what}: {path} line {no}: {val!r} is not {meaning}")
        out = {k: allowed[v] for k, v in _id_map(rows, path, what).items()}
        lacking = [i for i in images if i not in out]
        if lacking:
            raise DatasetError(f"{what}: {path} has no line for image id {lacking[0]!r} "
                               f"({len(lacking)} ids lacking)")
        return out

    labels = per_image("image_class_labels.txt", cls_index, f"a class id of {f('classes.txt')}")
    is_train = per_image("train_test_split.txt", {"1": 1, "0": 0}, "0 or 1")
    parts = {1: ([], []), 0: ([], [])}
    sources = {1: [], 0: []}
    for img, rel in images.items():
        ps, ls = parts[is_train[img]]
        ps.append(os.path.join(base, "images", rel))
        ls.append(labels[img])
        sources[is_train[img]].append(f"{f('images.txt')} line {image_line[img]}")
    _check_files(parts[1][0] + parts[0][0], what, _CUB_HOW, sources[1] + sources[0])
    return Splits(ImageList(*parts[1], list(classes)), ImageList(*parts[0], list(classes)), "cub")


# ---------------------------------------------------------------- Stanford Cars

def cars(root: str, download: bool = False) -> Splits:
    """Stanford Cars (196 classes): train 8144 / test 8041. Two layouts are accepted.

    1. torchvision's `StanfordCars` layout (needs scipy to read .mat):
       `<root>[/stanford_cars]/{devkit/cars_meta.mat, devkit/cars_train_annos.mat,
       cars_test_annos_withlabels.mat (or devkit/...), cars_train/, cars_test/}`.
    2. CSV layout (the devkit converted to text, as in the Kaggle "by classes" copy):
       `<root>[/stanford_cars]/{names.csv, anno_train.csv, anno_test.csv, cars_train/,
       cars_test/}`; `names.csv` holds one class name per line (line k = class k, 1-based);
       `anno_*.csv` rows are `fname,x1,y1,x2,y2,class` without a header, class 1-based,
       images at `cars_<split>/<fname>`. The .mat layout wins when both are present.
    """
    what = "Stanford Cars"
    layout = ("<root>[/stanford_cars]/{devkit/cars_meta.mat, devkit/cars_train_annos.mat, "
              "cars_test_annos_withlabels.mat, cars_train/, cars_test/} or <root>"
              "[/stanford_cars]/{names.csv (one class name per line), anno_train.csv and "
              "anno_test.csv (rows fname,x1,y1,x2,y2,class with class 1-based), cars_train/, "
              "cars_test/}")
    mat_marker = os.path.join("devkit", "cars_meta.mat")
    base, marker = _find_base(root, "stanford_cars", [mat_marker, "names.csv"], what, layout,
                              _CARS_HOW, download)
    return _cars_mat(base, what) if marker == mat_marker else _cars_csv(base, what)


def _cars_mat(base: str, what: str) -> Splits:
    try:
        import numpy as np
        from scipy.io import loadmat
    except ImportError:
        raise DatasetError(f"{what}: {base} uses the .mat layout, which needs scipy: "
                           f"pip install scipy") from None
    devkit = os.path.join(base, "devkit")

    def load(path: str, key: str):
        _need(path, what, _CARS_HOW)
        try:
            return np.atleast_1d(loadmat(path, squeeze_me=True)[key])
        except (KeyError, ValueError, OSError) as e:
            raise DatasetError(f"{what}: cannot read {key!r} from {path} ({e})") from None

    classes = [str(c) for c in load(os.path.join(devkit, "cars_meta.mat"), "class_names")]
    test_mat = os.path.join(base, "cars_test_annos_withlabels.mat")
    if not os.path.exists(test_mat) and os.path.exists(os.path.join(devkit, os.path.basename(
            test_mat))):
        test_mat = os.path.join(devkit, os.path.basename(test_mat))

    def split(mat: str, img_dir: str) -> ImageList:
        annos = load(mat, "annotations")
        try:
            rows = [(str(a["fname"]), int(a["class"])) for a in annos]
        except (ValueError, IndexError, KeyError) as e:
            raise DatasetError(f"{what}: {mat} lacks fname/class fields ({e}); for the test "
                               f"split use cars_test_annos_withlabels.mat") from None
        return _cars_list(rows, mat, os.path.join(base, img_dir), classes, what)

    return Splits(split(os.path.join(devkit, "cars_train_annos.mat"), "cars_train"),
                  split(test_mat, "cars_test"), "cars")


def _cars_csv(base: str, what: str) -> Splits:
    with open(os.path.join(base, "names.csv"), encoding="utf-8") as f:
        classes = [line.strip() for line in f if line.strip()]

    def split(name: str) -> ImageList:
        path = _need(os.path.join(base, f"anno_{name}.csv"), what, _CARS_HOW)
        rows = []
        with open(path, newline="", encoding="utf-8") as f:
            for no, rec in enumerate(csv.reader(f), 1):
                if not rec:
                    continue
                try:
                    if len(rec) != 6:
                        raise ValueError
                    rows.append((rec[0].strip(), int(rec[5])))
                except ValueError:
                    raise DatasetError(f"{what}: {path} line {no}: expected "
                                       f"'fname,x1,y1,x2,y2,class', got {','.join(rec)!r}"
                                       ) from None
        return _cars_list(rows, path, os.path.join(base, f"cars_{name}"), classes, what)

    return Splits(split("train"), split("test"), "cars")


def _cars_list(rows, src: str, img_dir: str, classes: List[str], what: str) -> ImageList:
    seen = set()
    paths, labels = [], []
    for no, (fname, cls) in enumerate(rows, 1):
        if fname in seen:
            raise DatasetError(f"{what}: {src} entry {no}: duplicate image {fname!r}")
        if not 1 <= cls <= len(classes):
            raise DatasetError(f"{what}: {src} entry {no}: class {cls} outside 1..{len(classes)}")
        seen.add(fname)
        paths.append(os.path.join(img_dir, fname))
        labels.append(cls - 1)
    _check_files(paths, what, _CARS_HOW, [f"{src} entry {no}" for no in range(1, len(paths) + 1)])
    return ImageList(paths, labels, list(classes))


# ---------------------------------------------------------------- generic folder tree

def _images_under(d: str) -> List[str]:
    out = []
    for dirpath, dirnames, files in os.walk(d):
        dirnames[:] = sorted(x for x in dirnames if not x.startswith("."))
        out += [os.path.join(dirpath, x) for x in sorted(files)
                if x.lower().endswith(IMAGE_EXTS) and not x.startswith(".")]
    return out


def folder(root: str, download: bool = False) -> Splits:
    """ImageFolder tree `<root>/{train,test}/<class>/**/*.{jpg,jpeg,png,bmp,webp}`.

    Classes are the sorted train class folders; a test class unknown to train is an error,
    because its label would have no meaning for a probe trained on train.
    """
    what = "folder dataset"
    how = "arrange images as <root>/train/<class>/*.jpg and <root>/test/<class>/*.jpg"
    if download:
        raise DatasetError(f"{what}: nothing to download; {how}")
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise DatasetError(f"{what}: data root {root} does not exist; {how}")
    for s in ("train", "test"):
        if not os.path.isdir(os.path.join(root, s)):
            raise DatasetError(f"{what}: missing folder {os.path.join(root, s)}; {how}")

    def class_dirs(s: str) -> List[str]:
        d = os.path.join(root, s)
        return sorted(x for x in os.listdir(d)
                      if os.path.isdir(os.path.join(d, x)) and not x.startswith("."))

    classes = class_dirs("train")
    if not classes:
        raise DatasetError(f"{what}: no class folders in {os.path.join(root, 'train')}; {how}")
    extra = sorted(set(class_dirs("test")) - set(classes))
    if extra:
        raise DatasetError(f"{what}: test class folder(s) {extra} under "
                           f"{os.path.join(root, 'test')} have no train folder")

    def split(s: str) -> ImageList:
        paths, labels = [], []
        for label, c in enumerate(classes):
            found = _images_under(os.path.join(root, s, c))
            if s == "train" and not found:
                raise DatasetError(f"{what}: {os.path.join(root, s, c)} holds no "
                                   f"{'/'.join(IMAGE_EXTS)} image")
            paths += found
            labels += [label] * len(found)
        return ImageList(paths, labels, list(classes))

    return Splits(split("train"), split("test"), "folder")
