"""The embedded synthetic set: determinism, seed sensitivity, layout, real JPEGs, cache reuse
and atomic generation; mirrors fastsynth/data/synthetic.py. Small counts keep it fast."""
import hashlib
import json
import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from fastsynth.data import synthetic as syn
from fastsynth.data.base import DatasetError

SMALL = dict(num_classes=4, train_per_class=3, test_per_class=2, size=64)


def _hashes(folder):
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _folder(splits):
    return os.path.dirname(os.path.dirname(os.path.dirname(splits.train.paths[0])))


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = _hashes(_folder(syn.synthetic(str(tmp_path / "a"), seed=5, **SMALL)))
    b = _hashes(_folder(syn.synthetic(str(tmp_path / "b"), seed=5, **SMALL)))
    c = _hashes(_folder(syn.synthetic(str(tmp_path / "c"), seed=6, **SMALL)))
    assert len(a) == 4 * 5 + 1 and a == b
    images = [k for k in a if k.endswith(".jpg")]
    assert all(a[k] != c[k] for k in images)


def test_image_does_not_depend_on_counts_or_order():
    # (seed, split, class, index) alone seeds an image: growing a set keeps its old images
    x = np.asarray(syn.render(0, 1, 2, 3, num_classes=20, size=48))
    y = np.asarray(syn.render(0, 1, 2, 3, num_classes=20, size=48))
    z = np.asarray(syn.render(0, 1, 2, 4, num_classes=20, size=48))
    assert np.array_equal(x, y) and not np.array_equal(x, z)


def test_layout_counts_labels_and_real_jpegs(tmp_path):
    s = syn.synthetic(str(tmp_path), seed=1, **SMALL)
    folder = _folder(s)
    assert folder == str(tmp_path / "synthetic-v2-s1-c4-n3x2-64px")
    assert (len(s.train), len(s.test), s.name) == (12, 8, "synthetic")
    assert s.train.classes == syn.class_names(4) == s.test.classes
    assert Counter(s.train.labels) == {c: 3 for c in range(4)}
    assert Counter(s.test.labels) == {c: 2 for c in range(4)}
    for split, lst in (("train", s.train), ("test", s.test)):
        for p, lab in zip(lst.paths, lst.labels):
            assert os.path.isabs(p)
            assert os.path.relpath(p, folder).split(os.sep)[:2] == [split, lst.classes[lab]]
            with Image.open(p) as im:
                assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (64, 64))
                im.load()
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    assert meta["version"] == syn.VERSION == 2 and meta["seed"] == 1 and meta["size"] == 64
    assert (meta["num_classes"], meta["train_per_class"], meta["test_per_class"]) == (4, 3, 2)
    assert [d for d in os.listdir(tmp_path) if d.startswith(".")] == []  # no temp left


def test_reuse_does_not_regenerate(tmp_path, monkeypatch):
    s = syn.synthetic(str(tmp_path), **SMALL)
    stamps = [os.stat(p).st_mtime_ns for p in s.train.paths[:3]]
    meta = os.path.join(_folder(s), "meta.json")
    meta_stamp = os.stat(meta).st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("regenerated a cached set")

    monkeypatch.setattr(syn, "render", boom)
    again = syn.synthetic(str(tmp_path), **SMALL)
    assert again.train.paths == s.train.paths and again.test.labels == s.test.labels
    assert [os.stat(p).st_mtime_ns for p in s.train.paths[:3]] == stamps
    assert os.stat(meta).st_mtime_ns == meta_stamp


def test_default_cache_root_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSYNTH_CACHE", str(tmp_path / "cache"))
    s = syn.synthetic(num_classes=2, train_per_class=1, test_per_class=1, size=32)
    assert s.train.paths[0].startswith(str(tmp_path / "cache" / "synthetic-v2-s0-c2-n1x1-32px"))


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    real, calls = syn.render, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(syn, "render", flaky)
    with pytest.raises(KeyboardInterrupt):
        syn.synthetic(str(tmp_path), **SMALL)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(syn, "render", real)
    assert len(syn.synthetic(str(tmp_path), **SMALL).train) == 12


def test_foreign_or_damaged_folder_is_a_clear_error(tmp_path):
    s = syn.synthetic(str(tmp_path), **SMALL)
    folder = _folder(s)
    os.remove(s.test.paths[-1])
    with pytest.raises(DatasetError, match=r"1 images missing .*delete .* regenerated"):
        syn.synthetic(str(tmp_path), **SMALL)
    with open(os.path.join(folder, "meta.json"), "w") as f:
        f.write("{}")
    with pytest.raises(DatasetError, match=r"meta\.json does not describe this set"):
        syn.synthetic(str(tmp_path), **SMALL)


def test_class_names_are_a_factorial_design():
    names = syn.class_names(20)
    assert names[0] == "c00_tailA_tipA_noseA" and names[19] == "c19_tailE_tipB_noseB"
    parts = [tuple(n.split("_")[1:]) for n in names]
    assert len(set(parts)) == 20
    # every single part choice is shared by several classes: only the combination is the class
    for k in range(3):
        counts = Counter(p[k] for p in parts)
        assert min(counts.values()) >= 4
    assert len(set(syn.class_names(45))) == 45
    with pytest.raises(DatasetError, match=r"num_classes=46 must be in 1\.\.45"):
        syn.class_names(46)


def test_nuisance_varies_strongly_within_a_class():
    # The paper's setting: pixels are dominated by class-independent background, pose and
    # colour, so images of one class must differ a lot from each other.
    imgs = np.stack([np.asarray(syn.render(0, 0, 3, i, 20, 48), np.float32) for i in range(8)])
    assert imgs.std(axis=0).mean() > 40
