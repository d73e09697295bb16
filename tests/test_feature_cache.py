"""The evaluation feature cache (fastsynth.eval.extract_features): a hit only for the same
checkpoint, transform, files and labels."""
import os

import torch
from PIL import Image

from fastsynth.config import Config
from fastsynth.data.base import ImageList
from fastsynth.eval import extract_features

CPU = torch.device("cpu")


def _image(path, colour):
    Image.new("RGB", (40, 40), colour).save(path)


def test_cache_hits_only_for_the_same_files_and_labels(tmp_path, capsys):
    paths = [str(tmp_path / f"{i}.png") for i in range(3)]
    for p, c in zip(paths, [(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        _image(p, c)
    encoder = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())  # mean colour
    cfg = Config(image_size=32, batch_size=2, workers=0).validate()
    cache = (str(tmp_path / "features"), "digest")

    def run(labels):
        f, y = extract_features(encoder, ImageList(paths, labels), cfg, CPU, cache=cache)
        return f, y, "cached features" in capsys.readouterr().out

    f0, y0, hit = run([0, 1, 1])
    assert not hit and y0.tolist() == [0, 1, 1]
    f1, y1, hit = run([0, 1, 1])
    assert hit and torch.equal(f1, f0) and torch.equal(y1, y0)
    # A class added elsewhere renumbers the labels of the same files: not the cached ones.
    _, y2, hit = run([1, 2, 2])
    assert not hit and y2.tolist() == [1, 2, 2]
    # A file rewritten in place (new contents, new modification time) is a different file.
    _image(paths[0], (0, 0, 0))
    st = os.stat(paths[0])
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    f3, _, hit = run([0, 1, 1])
    assert not hit and not torch.equal(f3[0], f0[0]) and torch.equal(f3[1:], f0[1:])
