"""The comparison runner: every configuration trained once, tables filled, figures written, reuse."""
import json
import os
import re

import pytest

from fastsynth import compare
from tinydata import tiny_folder

TINY = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--epochs", "1", "--max-steps", "2",
        "--warmup-epochs", "1", "--probe-epochs", "2", "--queue-size", "32", "--bank-size", "16",
        "--decoder-width", "32", "--workers", "0"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    base = tmp_path_factory.mktemp("cmp")
    return tiny_folder(base, size=40)


def test_plan_and_bad_method():
    assert [r[0] for r in compare.plan(["mocov2", "simsiam+synth"], ["both", "random"])] == \
        ["mocov2", "simsiam+synth", "mocov2+synth/random"]
    with pytest.raises(ValueError, match="byol"):
        compare.plan(["byol"], ["both"])


def test_report_every_cell_filled_then_reused(root, tmp_path, capsys):
    out = str(tmp_path / "cmp")
    argv = ["--methods", "mocov2,mocov2+synth", "--noise", "both,random", "--output-dir", out,
            "--dataset", "folder", "--data-root", root, *TINY]
    assert compare.main(argv) == 0
    report = open(os.path.join(out, "report.md")).read()
    rows = [line for line in report.splitlines() if line.startswith("| [") or line.startswith("| noise=")]
    assert len(rows) == 2 + 2                                  # Table 1: 2 methods; Table 4: both, random
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")[1:]]
        assert len(cells) == 6 and all(re.fullmatch(r"\d+\.\d\d", c) for c in cells), line
    data = json.load(open(os.path.join(out, "report.json")))
    assert [r["name"] for r in data["rows"]] == ["mocov2", "mocov2+synth", "mocov2+synth/random"]
    for name in ("mocov2-curves.png", "mocov2+synth-variance.png", "mocov2+synth-embedding.png", "attention.png"):
        assert os.path.getsize(os.path.join(out, name)) > 1000, name
    for item in sum(data["figures"].values(), []):           # every figure the report embeds exists
        assert os.path.isfile(os.path.join(out, item)), item
        assert f"]({item})" in report
    assert "attention.png" in sum(data["figures"].values(), [])
    capsys.readouterr()
    assert compare.main(argv + ["--no-figures"]) == 0          # same configs: nothing retrained
    assert capsys.readouterr().out.count("reusing") == 3


def test_paper_probe_protocol_runs_and_reports_top5(root):
    """--probe paper: augmented crops through the frozen encoder each epoch, SGD lr 30."""
    import torch
    from fastsynth.config import Config
    from fastsynth.data.datasets import build_dataset
    from fastsynth.eval import evaluate_encoder
    from fastsynth.models.encoder import Encoder
    cfg = Config(arch="resnet18", image_size=32, batch_size=8, probe="paper", probe_epochs=2,
                 probe_fractions="1.0,0.5", workers=0).validate()
    splits = build_dataset("folder", root, False, 0)
    torch.manual_seed(0)
    out = evaluate_encoder(Encoder("resnet18"), splits, cfg, torch.device("cpu"))
    for k in ("linear_top1@100", "linear_top5@100", "linear_top1@50", "linear_top5@50", "rank1", "mAP"):
        assert 0.0 <= out[k] <= 1.0, k
    assert out["linear_top5@100"] >= out["linear_top1@100"]


@pytest.mark.parametrize("method", ["mocov2", "simsiam"])
def test_ssl_gradcam_maps_and_no_side_effects(method):
    """Fig. 3's maps: one per image, in [0, 1], not all zero; the model is left untouched."""
    import torch
    from fastsynth.attention import ssl_gradcam
    from fastsynth.config import Config
    from fastsynth.model import SynthSSL
    torch.manual_seed(0)
    cfg = Config(method=method, arch="resnet18", image_size=32, batch_size=8, queue_size=32, bank_size=16,
                 moco_dim=16, simsiam_dim=64, decoder_width=32).validate()
    model = SynthSSL(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cam = ssl_gradcam(model, torch.randn(3, 3, 64, 64))       # 2 x 2 maps at the last stage
    assert cam.shape == (3, 64, 64) and torch.isfinite(cam).all() and cam.min() >= 0
    peaks = cam.flatten(1).amax(1)                            # 1, or 0 where no channel argues for the loss
    assert all(p in (0.0, 1.0) for p in peaks.tolist()) and peaks.max() == 1.0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_reuse_treats_options_added_later_as_their_defaults():
    from fastsynth.config import Config
    now = Config().to_dict()
    old = {k: v for k, v in now.items() if k != "probe"}          # a run saved before --probe existed
    assert compare._same(old, now)
    assert not compare._same(old, {**now, "probe": "paper"})
    assert not compare._same({**old, "lr": 1.0}, now)


def test_reuse_needs_a_finished_run_of_the_same_data():
    """A folder's final_metrics.json is reused only from a --stage all run of the same experiment:
    not from a lone stage (no table, or another checkpoint's scores with --resume-from), and not
    when --data-root differs (for --dataset folder it is the dataset)."""
    from fastsynth.config import Config
    cfg = Config(dataset="folder", data_root="/data/a").to_dict()
    done = {"config": dict(cfg), "metrics": {"trained": {"rank1": 0.5}, "random_init": {"rank1": 0.1}}}
    assert compare.reusable(done, cfg)
    assert not compare.reusable(done, {**cfg, "data_root": "/data/b"})
    assert not compare.reusable({"config": {**cfg, "stage": "ssl"}}, cfg)                      # no metrics
    assert not compare.reusable({**done, "config": {**cfg, "stage": "eval"}}, cfg)
    assert not compare.reusable({**done, "config": {**cfg, "resume_from": "/other/last.pt"}}, cfg)
    assert compare.reusable(done, {**cfg, "workers": 0, "device": "cpu"})                      # how, not what


def test_table_columns_follow_the_probe_fractions():
    """--probe-fractions 1.0 gives one linear column (a fixed 100/50/20 list crashed the report
    after all training with a KeyError)."""
    rows = [{"name": "a", "run_dir": "x/a", "metrics": {"linear_top1@100": 0.5, "rank1": 0.4, "rank5": 0.6,
                                                          "mAP": 0.3, "linear_top5@100": 0.9}}]
    assert compare.columns(rows) == [("linear_top1@100", "linear 100 %"), ("rank1", "rank-1"), ("rank5", "rank-5"),
                                     ("mAP", "mAP")]
    table = compare._table(rows, None)
    assert table[0] == "| run | linear 100 % | rank-1 | rank-5 | mAP |" and "| 50.00 | 40.00 | 60.00 | 30.00 |" in table[2]
    both = rows + [{"name": "b", "run_dir": "x/b", "metrics": {**rows[0]["metrics"], "linear_top1@50": 0.2}}]
    assert [k for k, _ in compare.columns(both)][0] == "linear_top1@100"  # only what every run has
