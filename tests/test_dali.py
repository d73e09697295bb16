"""The DALI loader (CPU-only pipeline) against the torchvision loader on the same real JPEGs:
shapes, dtypes, ranges, labels, indices, epoch order, sharding, the eval loader's last partial
batch, and the colour/blur operators against torchvision's; mirrors fastsynth/data/dali.py.

Tolerances: both loaders decode with libjpeg-turbo (an image that needs no resize comes out
bit-identical), and PIL's bilinear resize and DALI's antialiased linear resize are the same
triangle filter, so resized views differ by rounding: one grey level is 1/255/0.225 = 0.0174 in
normalised units. We allow a mean of 0.02 (about one level; measured 0.003) and, away from the
one-pixel border, a maximum of 0.05 (three levels; measured one). On the border the two treat
the filter's overhang differently (PIL renormalises, DALI repeats the edge): up to about 11
levels on a few pixels, which the mean bound covers.
"""
import itertools
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF

from fastsynth.data import dali as D
from fastsynth.data import synthetic as syn
from fastsynth.data.base import ImageList
from fastsynth.data.loaders import epoch_loader, load_rgb
from fastsynth.data.transforms import MEAN, STD, evaluation, plain

S = 32  # image side: small keeps the file fast
LEVEL = 1 / 255 / 0.225  # one grey level in normalised units (the smallest STD)
LO = torch.tensor([(0 - m) / s for m, s in zip(MEAN, STD)]).view(1, 3, 1, 1)
HI = torch.tensor([(1 - m) / s for m, s in zip(MEAN, STD)]).view(1, 3, 1, 1)


@pytest.fixture(autouse=True)
def _dali(request):
    if request.node.name != "test_without_dali_a_clear_error_and_auto_falls_back":
        pytest.importorskip("nvidia.dali")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """20 synthetic 64 px JPEGs plus 4 odd-shaped ones (the eval resize's portrait/landscape paths)."""
    root = tmp_path_factory.mktemp("dali")
    s = syn.synthetic(str(root), seed=0, num_classes=4, train_per_class=5, test_per_class=1, size=64)
    paths, labels = list(s.train.paths), list(s.train.labels)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(60, 90), (90, 61), (37, 51), (100, 80)]):
        y, x = np.mgrid[0:h, 0:w]
        a = np.stack([x * 255 // w, y * 255 // h, (x + y) * 3 % 256], -1) + rng.integers(0, 40, (h, w, 3))
        p = os.path.join(root, f"odd{i}.jpg")
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(p, quality=90)
        paths.append(p)
        labels.append(i % 4)
    return ImageList(paths, labels, s.train.classes)


class _Positions(Dataset):
    """Stands in for FileDataset where only epoch_loader's order matters."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return 0, 0, i


def _torch_order(n, batch, epoch, seed, skip=0):
    return [b[2].tolist() for b in epoch_loader(_Positions(n), batch, epoch, seed, skip)]


def _close(a, b, mean=0.02, worst=0.05):
    d = (a - b).abs()
    inner = d[..., 1:-1, 1:-1].amax()  # the outermost pixels differ more: see the module docstring
    assert d.mean(dim=(1, 2, 3)).max() < mean and inner < worst, (d.mean(dim=(1, 2, 3)), inner)


def _in_range(x):
    assert x.dtype == torch.float32 and x.shape[1:] == (3, S, S)
    assert (x >= LO - 1e-4).all() and (x <= HI + 1e-4).all()


def test_without_dali_a_clear_error_and_auto_falls_back(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "nvidia.dali", None)  # import now fails
    monkeypatch.setattr(D, "_warned_auto", False)
    assert not D.dali_available()
    with pytest.raises(D.DaliUnavailableError, match=r"pip install -e '\.\[dali\]'"):
        D.resolve_loader("dali")
    with pytest.warns(UserWarning, match="torchvision loader"):
        assert D.resolve_loader("auto") == "torch"
    assert D.resolve_loader("torch") == "torch"
    with pytest.raises(ValueError, match="dali, torch, auto"):
        D.resolve_loader("fast")


def test_ssl_batches_match_the_torch_loader(images):
    n, batch = len(images), 5
    loader = D.make_dali_ssl_loader(images, S, batch, seed=3, epoch=1)
    batches = list(loader)
    assert len(loader) == len(batches) == n // batch
    assert [b[2].tolist() for b in batches] == _torch_order(n, batch, 1, 3)  # same order, batch by batch
    gray = 0
    for (x1, x2, x), labels, idx in batches:
        for v in (x1, x2, x):
            _in_range(v)
        assert labels.dtype == idx.dtype == torch.int64 and labels.shape == idx.shape == (batch,)
        assert labels.tolist() == [images.labels[i] for i in idx]
        assert not torch.allclose(x1, x2) and not torch.allclose(x1, x)  # two different views
        _close(x, torch.stack([plain(S)(load_rgb(images.paths[i])) for i in idx]))
        for v in (x1, x2):  # grayscale views: channels equal (to DALI's rounding) once un-normalised
            rgb = v * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
            gray += int(((rgb[:, 0] - rgb[:, 1]).abs().amax(dim=(1, 2)) < 1.5 / 255).sum())
    assert 0 < gray < 2 * len(batches) * batch / 2  # p = 0.2: some, not most
    again = list(loader)  # a second pass rebuilds the pipeline with the same seed
    assert all(torch.equal(a[0][0], b[0][0]) for a, b in zip(batches, again))
    other = next(iter(D.make_dali_ssl_loader(images, S, batch, seed=3, epoch=2)))
    assert other[2].tolist() != batches[0][2].tolist()


def test_an_epoch_visits_every_sample_once_and_resumes_mid_epoch(images):
    n = len(images)
    seen = [i for _, _, idx in D.make_dali_ssl_loader(images, S, 6, seed=0) for i in idx.tolist()]
    assert sorted(seen) == list(range(n))  # 24 = 4 full batches: each sample exactly once
    rest = D.make_dali_ssl_loader(images, S, 6, seed=0, skip_batches=1)
    assert len(rest) == 3
    assert [b[2].tolist() for b in rest] == _torch_order(n, 6, 0, 0, skip=1)


def test_two_shards_partition_the_epoch_as_the_torch_loader_does(images):
    shards = [D.make_dali_ssl_loader(images, S, 4, seed=1, epoch=2, shard_id=s, num_shards=2) for s in (0, 1)]
    seen = [[i for _, _, idx in sh for i in idx.tolist()] for sh in shards]
    assert [len(sh) for sh in shards] == [3, 3] and list(map(len, seen)) == [12, 12]
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(len(images)))
    for rank in (0, 1):  # the torch loader's ranks read the same slices of the epoch's permutation
        torch_order = [i for b in epoch_loader(list(range(len(images))), 4, 2, seed=1, rank=rank, world=2)
                       for i in b.tolist()]
        assert seen[rank] == torch_order
    odd = ImageList(images.paths[:23], images.labels[:23], images.classes)  # 11 per rank, 2 batches of 4
    seen = [[i for _, _, idx in D.make_dali_ssl_loader(odd, S, 4, seed=1, shard_id=s, num_shards=2)
             for i in idx.tolist()] for s in (0, 1)]
    assert list(map(len, seen)) == [8, 8] and not set(seen[0]) & set(seen[1])


@pytest.mark.parametrize("n, batch, shards", [(24, 5, 1), (23, 4, 2), (9, 4, 2)])
def test_eval_loader_covers_every_sample_once_with_a_partial_last_batch(images, n, batch, shards):
    # (23, 4, 2): shards of 11 and 12, the first ends partial. (9, 4, 2): shards of 4 and 5 need
    # 1 and 2 batches, where the reader's padding adds a whole batch of repeats to the first.
    sub = ImageList(images.paths[-n:], images.labels[-n:], images.classes)
    seen = []
    for s in range(shards):
        loader = D.make_dali_eval_loader(sub, S, batch, shard_id=s, num_shards=shards)
        got = list(loader)
        assert len(got) == len(loader)
        assert all(len(b[2]) == batch for b in got[:-1]) and 1 <= len(got[-1][2]) <= batch
        idx = torch.cat([b[2] for b in got])
        assert idx.tolist() == sorted(idx.tolist())  # in ImageList order
        x = torch.cat([b[0] for b in got])
        _in_range(x)
        assert torch.cat([b[1] for b in got]).tolist() == [sub.labels[i] for i in idx]
        _close(x, torch.stack([evaluation(S)(load_rgb(sub.paths[i])) for i in idx]))
        seen += idx.tolist()
    assert sorted(seen) == list(range(n)) and len(seen) == len(set(seen))


def test_probe_train_view_random_crops_of_every_sample(images):
    loader = D.make_dali_eval_loader(images, S, 7, train=True, shuffle=True, seed=2)
    got = list(loader)
    idx = torch.cat([b[2] for b in got]).tolist()
    assert sorted(idx) == list(range(len(images))) and idx != sorted(idx)
    x = torch.cat([b[0] for b in got])
    _in_range(x)
    ref = torch.stack([evaluation(S)(load_rgb(images.paths[i])) for i in idx])
    assert (x - ref).abs().mean() > 5 * LEVEL  # random crops, not the centre crop


def _run_ops(path, build):
    """Decode one file in a CPU pipeline and apply build(img) -> DataNode; returns both as arrays."""
    from nvidia.dali import Pipeline, fn
    pipe = Pipeline(batch_size=1, num_threads=1, device_id=None, seed=0)
    with pipe:
        enc, _ = fn.readers.file(files=[path])
        img = fn.decoders.image(enc, device="cpu", adjust_orientation=False)
        pipe.set_outputs(img, build(img))
    src, out = pipe.run()
    return np.array(src[0]), np.array(out[0])


def test_colour_and_blur_follow_torchvision(images):
    from nvidia.dali import fn
    path = images.paths[-3]  # 37 x 51, no resize: decoded bit-identically by PIL and DALI
    pil = load_rgb(path)

    def levels(a, b):
        d = np.abs(np.asarray(a, dtype=np.int32) - np.asarray(b, dtype=np.int32))
        return d.mean(), d.max()

    for b, c, s in [(1.1, 0.8, 1.2), (0.7, 1.3, 0.6), (1.3, 0.7, 1.4)]:
        src, out = _run_ops(path, lambda img, b=b, c=c, s=s: D._colour(img, "cpu", b, c, s, 0.0))
        assert np.array_equal(src, np.asarray(pil))
        # ColorJitter applies its factors in a random order; clipping makes the orders differ
        # (up to 12 levels on average here), so DALI must match one of them to rounding: PIL
        # rounds after each of three steps, DALI after two (measured 1.1 to 1.4 levels). A fixed
        # contrast centre of 128 instead of the mean luminance would be several levels off.
        steps = [lambda r, b=b: TF.adjust_brightness(r, b), lambda r, c=c: TF.adjust_contrast(r, c),
                 lambda r, s=s: TF.adjust_saturation(r, s)]
        best = min(levels(out, steps[k](steps[j](steps[i](pil))))[0]
                   for i, j, k in itertools.permutations(range(3)))
        assert best < 2.0, (b, c, s, best)
    _, out = _run_ops(path, lambda img: D._colour(img, "cpu", 1.0, 1.0, 0.0, 0.0))
    assert levels(out, TF.rgb_to_grayscale(pil, 3))[1] <= 1  # grayscale = saturation 0, PIL's luma
    _, out = _run_ops(path, lambda img: fn.gaussian_blur(img, window_size=5, sigma=1e-3))
    assert np.array_equal(out, np.asarray(pil))  # the "no blur" branch is exactly the identity
    _, out = _run_ops(path, lambda img: fn.gaussian_blur(img, window_size=5, sigma=1.3))
    mean, worst = levels(out, TF.gaussian_blur(pil, 5, 1.3))
    assert mean < 0.5 and worst <= 2, (mean, worst)


def test_a_format_dali_cannot_decode_is_excluded_by_the_scan(images, tmp_path):
    """A GIF named .jpg decodes in PIL (the torch loader would train on it) but stops a DALI
    pipeline mid-epoch without naming the file: the scan excludes it for both loaders, and the
    DALI loader then runs over the cleaned list."""
    from fastsynth.data.base import Splits
    from fastsynth.data.scan import check_image, clean_splits
    gif = str(tmp_path / "gif_as.jpg")
    Image.open(images.paths[0]).convert("RGB").save(gif, format="GIF")
    mixed = ImageList([gif, *images.paths[:7]], [0, *images.labels[:7]])  # classes 0 and 1
    with pytest.raises(RuntimeError):  # why: DALI's own failure on the file
        for _ in D.make_dali_eval_loader(ImageList([gif, images.paths[1]], [0, 0], images.classes), S, 2):
            pass
    assert check_image(gif).startswith("GIF image (the DALI loader cannot decode it")
    cleaned = clean_splits(Splits(mixed, mixed), 0.2, str(tmp_path / "bad.txt")).train
    assert cleaned.paths == images.paths[:7]
    assert sum(len(b[2]) for b in D.make_dali_eval_loader(cleaned, S, 3)) == 7


def _damaged(kind: str, source: str, tmp_path) -> str:
    """A file PIL decodes (the torch loader trains on it) that DALI refuses or misreads."""
    rgb = Image.open(source).convert("RGB")
    path = str(tmp_path / f"{kind}.{'tif' if kind.startswith('tiff') else 'png'}")
    if kind.startswith("tiff"):
        mode = kind.split("-")[1]
        gray = np.asarray(rgb.convert("L"))
        img = {"1": rgb.convert("1"), "I": Image.fromarray(gray.astype(np.int32), "I"),
               "F": Image.fromarray(gray.astype(np.float32), "F")}[mode]
        img.save(path)
        return path
    rgb.save(path)
    data = bytearray(open(path, "rb").read())
    if kind == "png-crc":
        at = data.index(b"IDAT")
        length = int.from_bytes(data[at - 4:at], "big")
        data[at + 4 + length] ^= 0xFF  # the chunk's CRC, after its data: the data is intact, the CRC wrong
    else:
        data = data[:-int(kind.removeprefix("png-cut"))]  # cut inside the end chunk (IEND)
    open(path, "wb").write(bytes(data))
    return path


@pytest.mark.parametrize("kind", ["png-crc", "png-cut4", "png-cut12", "tiff-1", "tiff-I", "tiff-F"])
def test_files_pil_reads_but_dali_cannot_are_excluded_by_the_scan(images, tmp_path, kind):
    """The scan decodes with PIL, which reads past a wrong PNG chunk CRC or a missing end chunk;
    DALI's libpng stops the pipeline on them, as on 1-bit and 32-bit integer TIFFs, and reads a
    32-bit float TIFF as other values. All are excluded for both loaders, with the reason."""
    from fastsynth.data.scan import check_image
    path = _damaged(kind, images.paths[0], tmp_path)
    load_rgb(path)  # the torch loader alone would take it
    if kind == "tiff-F":
        _, out = _run_ops(path, lambda img: img)
        assert np.abs(out.astype(float) - np.asarray(load_rgb(path)).astype(float)).mean() > 10
    else:
        with pytest.raises(RuntimeError):
            for _ in D.make_dali_eval_loader(ImageList([path, images.paths[1]], [0, 0], images.classes), S, 2):
                pass
    reason = check_image(path)
    assert reason and reason.startswith("damaged PNG" if kind.startswith("png") else "TIFF with"), reason


def test_intact_png_and_tiff_variants_stay(images, tmp_path):
    """What the PNG and TIFF checks must not exclude: a PNG with a few bytes after its end chunk
    (libpng stops at the chunk), 8-bit and 16-bit TIFFs; each decodes in DALI."""
    from fastsynth.data.scan import check_image
    rgb = Image.open(images.paths[0]).convert("RGB")
    trailing = str(tmp_path / "trailing.png")
    rgb.save(trailing)
    with open(trailing, "ab") as fh:
        fh.write(b"\x00" * 100)
    gray8, gray16 = str(tmp_path / "g8.tif"), str(tmp_path / "g16.tif")
    rgb.convert("L").save(gray8)
    Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257).save(gray16)
    for path in (trailing, gray8, gray16):
        assert check_image(path) is None, path
        _, out = _run_ops(path, lambda img: img)
        assert np.abs(out.astype(float) - np.asarray(load_rgb(path)).astype(float)).mean() < 1, path


def test_eval_loader_with_fewer_images_than_shards_is_a_clear_error(images):
    one = ImageList(images.paths[:1], images.labels[:1], images.classes)
    with pytest.raises(ValueError, match="1 image.* cannot be split over 2 shards"):
        D.make_dali_eval_loader(one, S, 2, shard_id=1, num_shards=2)
