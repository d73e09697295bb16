"""Miniature copies of each official layout (tiny JPEGs, real metadata formats) and the
errors a user sees when one is broken; mirrors fastsynth/data/official.py and datasets.py."""
import io
import os
import sys
import types

import numpy as np
import pytest
from PIL import Image

from fastsynth.data import datasets, official
from fastsynth.data.base import DatasetError
from fastsynth.data.datasets import build_dataset

_buf = io.BytesIO()
Image.new("RGB", (8, 8), (200, 30, 30)).save(_buf, "JPEG")
JPEG = _buf.getvalue()


def _jpeg(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(JPEG)


def _write(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))


# ---------------------------------------------------------------- FGVC-Aircraft

VARIANTS = ["707-320", "A300B4", "Cessna 172", "F-16A/B"]  # spaces and slashes are real


def make_aircraft(root):
    data = os.path.join(root, "fgvc-aircraft-2013b", "data")
    _write(os.path.join(data, "variants.txt"), VARIANTS)
    train = [(f"{100 + k:07d}", VARIANTS[k % 4]) for k in range(6)]
    test = [(f"{200 + k:07d}", VARIANTS[k % 4]) for k in range(3)]
    for name, rows in (("trainval", train), ("test", test)):
        _write(os.path.join(data, f"images_variant_{name}.txt"), [f"{i} {v}" for i, v in rows])
        for i, _ in rows:
            _jpeg(os.path.join(data, "images", f"{i}.jpg"))
    return data


@pytest.mark.parametrize("inner", [False, True])
def test_aircraft_parses_from_parent_or_inner_folder(tmp_path, inner):
    make_aircraft(str(tmp_path))
    root = tmp_path / "fgvc-aircraft-2013b" if inner else tmp_path
    s = official.aircraft(str(root))
    assert (len(s.train), len(s.test), s.name) == (6, 3, "aircraft")
    assert s.train.classes == VARIANTS and s.test.classes == VARIANTS
    assert s.train.labels == [0, 1, 2, 3, 0, 1] and s.test.labels == [0, 1, 2]
    assert s.train.paths[0] == str(tmp_path / "fgvc-aircraft-2013b/data/images/0000100.jpg")
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in s.train.paths + s.test.paths)


def test_aircraft_missing_root_names_path_and_layout(tmp_path):
    with pytest.raises(DatasetError, match=r"nope.*does not exist.*variants\.txt.*--download"):
        official.aircraft(str(tmp_path / "nope"))


def test_aircraft_missing_split_file(tmp_path):
    data = make_aircraft(str(tmp_path))
    os.remove(os.path.join(data, "images_variant_test.txt"))
    with pytest.raises(DatasetError, match=r"missing .*images_variant_test\.txt"):
        official.aircraft(str(tmp_path))


def test_aircraft_malformed_and_unknown_variant_lines(tmp_path):
    data = make_aircraft(str(tmp_path))
    path = os.path.join(data, "images_variant_trainval.txt")
    with open(path, "a") as f:
        f.write("0000999\n")
    with pytest.raises(DatasetError, match=r"images_variant_trainval\.txt line 7: expected 2"):
        official.aircraft(str(tmp_path))
    _write(path, ["0000100 707-320", "0000101 Boeing 999"])
    with pytest.raises(DatasetError, match=r"line 2: variant 'Boeing 999' is not in"):
        official.aircraft(str(tmp_path))
    _write(path, ["0000100 707-320", "0000100 A300B4"])
    with pytest.raises(DatasetError, match=r"line 2: duplicate id '0000100'"):
        official.aircraft(str(tmp_path))


def test_aircraft_missing_image_file(tmp_path):
    data = make_aircraft(str(tmp_path))
    os.remove(os.path.join(data, "images", "0000201.jpg"))
    with pytest.raises(DatasetError, match=r"1 of 3 images .*0000201\.jpg \(.*images_variant_\w+\.txt line \d+\)"):
        official.aircraft(str(tmp_path))


def _fake_torchvision(monkeypatch, fake_cls):
    """Stand in for torchvision.datasets so no test ever touches the network."""
    mod = types.ModuleType("torchvision.datasets")
    mod.FGVCAircraft = fake_cls
    monkeypatch.setitem(sys.modules, "torchvision.datasets", mod)


def test_aircraft_download_only_when_asked_and_missing(tmp_path, monkeypatch):
    calls = []

    class FakeAircraft:
        def __init__(self, root, split, annotation_level, download):
            calls.append((root, split, annotation_level, download))
            make_aircraft(root)

    _fake_torchvision(monkeypatch, FakeAircraft)
    with pytest.raises(DatasetError):
        official.aircraft(str(tmp_path / "a"))            # download=False: nothing fetched
    assert calls == []
    s = official.aircraft(str(tmp_path / "a"), download=True)
    assert calls == [(str(tmp_path / "a"), "trainval", "variant", True)] and len(s.train) == 6
    official.aircraft(str(tmp_path / "a" / "fgvc-aircraft-2013b"), download=True)
    assert len(calls) == 1                                # present: not fetched again


def test_aircraft_download_failure_is_a_dataset_error(tmp_path, monkeypatch):
    class Broken:
        def __init__(self, *a, **k):
            raise OSError("network unreachable")

    _fake_torchvision(monkeypatch, Broken)
    with pytest.raises(DatasetError, match=r"download into .* failed .*network unreachable"):
        official.aircraft(str(tmp_path), download=True)


# ---------------------------------------------------------------- CUB-200-2011

CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]


def make_cub(root):
    base = os.path.join(root, "CUB_200_2011")
    rows = [(k + 1, CUB_CLASSES[k % 3], k % 3 + 1, int(k % 5 != 4)) for k in range(10)]
    _write(os.path.join(base, "classes.txt"), [f"{i + 1} {c}" for i, c in enumerate(CUB_CLASSES)])
    _write(os.path.join(base, "images.txt"), [f"{i} {c}/img_{i}.jpg" for i, c, _, _ in rows])
    _write(os.path.join(base, "image_class_labels.txt"), [f"{i} {lab}" for i, _, lab, _ in rows])
    _write(os.path.join(base, "train_test_split.txt"), [f"{i} {t}" for i, _, _, t in rows])
    for i, c, _, _ in rows:
        _jpeg(os.path.join(base, "images", c, f"img_{i}.jpg"))
    return base


@pytest.mark.parametrize("inner", [False, True])
def test_cub_parses_official_split(tmp_path, inner):
    base = make_cub(str(tmp_path))
    s = official.cub(base if inner else str(tmp_path))
    assert (len(s.train), len(s.test), s.name) == (8, 2, "cub")
    assert s.train.classes == CUB_CLASSES
    assert s.train.labels == [0, 1, 2, 0, 2, 0, 1, 2] and s.test.labels == [1, 0]
    assert s.test.paths[0] == os.path.join(base, "images", CUB_CLASSES[1], "img_5.jpg")


def test_cub_label_for_missing_image_id(tmp_path):
    base = make_cub(str(tmp_path))
    with open(os.path.join(base, "image_class_labels.txt"), "a") as f:
        f.write("77 1\n")
    with pytest.raises(DatasetError, match=r"image_class_labels\.txt line 11: image id '77' "
                                           r"has no line in .*images\.txt"):
        official.cub(str(tmp_path))


def test_cub_missing_image_names_its_line(tmp_path):
    base = make_cub(str(tmp_path))
    os.remove(os.path.join(base, "images", CUB_CLASSES[1], "img_5.jpg"))
    with pytest.raises(DatasetError, match=r"img_5\.jpg \(.*images\.txt line 5\)"):
        official.cub(str(tmp_path))


def test_cub_duplicate_id_and_bad_label(tmp_path):
    base = make_cub(str(tmp_path))
    with open(os.path.join(base, "images.txt"), "a") as f:
        f.write("3 001.Black_footed_Albatross/img_1.jpg\n")
    with pytest.raises(DatasetError, match=r"images\.txt line 11: duplicate id '3'"):
        official.cub(str(tmp_path))
    base = make_cub(str(tmp_path / "b"))
    _write(os.path.join(base, "image_class_labels.txt"),
           [f"{i} {1 if i != 4 else 9}" for i in range(1, 11)])
    with pytest.raises(DatasetError, match=r"line 4: '9' is not a class id of .*classes\.txt"):
        official.cub(str(tmp_path / "b"))


def test_cub_missing_file_and_no_downloader(tmp_path):
    base = make_cub(str(tmp_path))
    os.remove(os.path.join(base, "train_test_split.txt"))
    with pytest.raises(DatasetError, match=r"missing .*train_test_split\.txt.*CUB_200_2011\.tgz"):
        official.cub(str(tmp_path))
    (tmp_path / "x").mkdir()
    with pytest.raises(DatasetError, match=r"no images\.txt .*--download cannot fetch .*caltech"):
        official.cub(str(tmp_path / "x"), download=True)


# ---------------------------------------------------------------- Stanford Cars

CAR_CLASSES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012"]
CAR_TRAIN = [("00001.jpg", 1), ("00002.jpg", 3), ("00003.jpg", 2), ("00004.jpg", 3)]
CAR_TEST = [("00001.jpg", 2), ("00002.jpg", 1)]


def _annos(rows):
    dt = [(k, "O") for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
    arr = np.zeros((1, len(rows)), dtype=dt)
    for j, (fname, cls) in enumerate(rows):
        arr[0, j] = (1, 1, 8, 8, cls, fname)
    return arr


def make_cars_mat(root, test_in_devkit=False):
    sio = pytest.importorskip("scipy.io", reason="the .mat layout needs scipy: pip install scipy")
    base = os.path.join(root, "stanford_cars")
    os.makedirs(os.path.join(base, "devkit"))
    sio.savemat(os.path.join(base, "devkit", "cars_meta.mat"),
                {"class_names": np.array([CAR_CLASSES], dtype=object)})
    sio.savemat(os.path.join(base, "devkit", "cars_train_annos.mat"),
                {"annotations": _annos(CAR_TRAIN)})
    test_dir = os.path.join(base, "devkit") if test_in_devkit else base
    sio.savemat(os.path.join(test_dir, "cars_test_annos_withlabels.mat"),
                {"annotations": _annos(CAR_TEST)})
    for split, rows in (("train", CAR_TRAIN), ("test", CAR_TEST)):
        for fname, _ in rows:
            _jpeg(os.path.join(base, f"cars_{split}", fname))
    return base


def _check_cars(s, base):
    assert (len(s.train), len(s.test), s.name) == (4, 2, "cars")
    assert s.train.classes == CAR_CLASSES
    assert s.train.labels == [0, 2, 1, 2] and s.test.labels == [1, 0]
    assert s.test.paths[1] == os.path.join(base, "cars_test", "00002.jpg")


@pytest.mark.parametrize("inner,test_in_devkit", [(False, False), (True, True)])
def test_cars_mat_layout(tmp_path, inner, test_in_devkit):
    base = make_cars_mat(str(tmp_path), test_in_devkit)
    _check_cars(official.cars(base if inner else str(tmp_path)), base)


def test_cars_mat_errors(tmp_path, monkeypatch):
    sio = pytest.importorskip("scipy.io", reason="the .mat layout needs scipy: pip install scipy")
    base = make_cars_mat(str(tmp_path))
    # the unlabeled cars_test_annos.mat saved under the labeled name: no 'class' field
    rows = np.zeros((1, 1), dtype=[("fname", "O")])
    rows[0, 0] = ("00001.jpg",)
    sio.savemat(os.path.join(base, "cars_test_annos_withlabels.mat"), {"annotations": rows})
    with pytest.raises(DatasetError, match=r"lacks fname/class fields"):
        official.cars(str(tmp_path))
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # as if scipy were not installed
    with pytest.raises(DatasetError, match=r"needs scipy: pip install scipy"):
        official.cars(str(tmp_path))


def make_cars_csv(root):
    _write(os.path.join(root, "names.csv"), CAR_CLASSES)
    for split, rows in (("train", CAR_TRAIN), ("test", CAR_TEST)):
        _write(os.path.join(root, f"anno_{split}.csv"), [f"{f},1,1,8,8,{c}" for f, c in rows])
        for fname, _ in rows:
            _jpeg(os.path.join(root, f"cars_{split}", fname))
    return root


def test_cars_csv_layout_and_errors(tmp_path):
    base = make_cars_csv(str(tmp_path))
    _check_cars(official.cars(str(tmp_path)), base)
    with open(os.path.join(base, "anno_test.csv"), "a") as f:
        f.write("00009.jpg,1,1,8\n")
    with pytest.raises(DatasetError, match=r"anno_test\.csv line 3: expected 'fname,x1"):
        official.cars(str(tmp_path))
    _write(os.path.join(base, "anno_test.csv"), ["00001.jpg,1,1,8,8,4"])
    with pytest.raises(DatasetError, match=r"class 4 outside 1\.\.3"):
        official.cars(str(tmp_path))
    _write(os.path.join(base, "anno_test.csv"), ["00001.jpg,1,1,8,8,1"] * 2)
    with pytest.raises(DatasetError, match=r"duplicate image '00001\.jpg'"):
        official.cars(str(tmp_path))


def test_cars_missing_and_download(tmp_path):
    with pytest.raises(DatasetError, match=r"no devkit.cars_meta\.mat or names\.csv in"):
        official.cars(str(tmp_path))
    with pytest.raises(DatasetError, match=r"--download cannot fetch Stanford Cars.*broken"):
        official.cars(str(tmp_path), download=True)


# ---------------------------------------------------------------- folder tree and registry

def test_folder_tree(tmp_path):
    for split, cls, name in [("train", "b", "1.jpg"), ("train", "a", "x/2.PNG"),
                             ("train", "a", "3.webp"), ("test", "b", "4.jpeg")]:
        _jpeg(str(tmp_path / split / cls / name))
    (tmp_path / "train" / "a" / "notes.txt").write_text("not an image")
    s = official.folder(str(tmp_path))
    assert s.train.classes == ["a", "b"] and s.train.labels == [0, 0, 1]
    assert [os.path.basename(p) for p in s.train.paths] == ["3.webp", "2.PNG", "1.jpg"]
    assert s.test.labels == [1] and len(s.test) == 1
    _jpeg(str(tmp_path / "test" / "zebra" / "5.jpg"))
    with pytest.raises(DatasetError, match=r"\['zebra'\].*have no train folder"):
        official.folder(str(tmp_path))
    with pytest.raises(DatasetError, match=r"data root .*nothing does not exist; arrange"):
        official.folder(str(tmp_path / "nothing"))
    (tmp_path / "only_train" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"missing folder .*only_train.test"):
        official.folder(str(tmp_path / "only_train"))


def test_registry_errors_and_dispatch(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match=r"unknown dataset 'imagenet'; valid choices: "
                                           r"synthetic, aircraft, cub, cars, folder"):
        build_dataset("imagenet")
    monkeypatch.setenv("FASTSYNTH_DATA", str(tmp_path / "default"))
    for name in ("aircraft", "cub", "cars", "folder"):
        with pytest.raises(DatasetError, match=r"nothing at the default location .*default.%s; pass --data-root"
                           % name):
            build_dataset(name)
    make_cub(str(tmp_path))
    assert len(build_dataset("cub", str(tmp_path)).train) == 8
    make_cub(str(tmp_path / "default" / "cub"))  # the default location is used when no root is given
    assert len(build_dataset("cub").train) == 8
    seen = {}
    monkeypatch.setattr(datasets, "synthetic", lambda **kw: seen.update(kw) or "splits")
    assert build_dataset("synthetic", seed=3) == "splits"
    assert seen == {"root": None, "download": False, "seed": 3}
