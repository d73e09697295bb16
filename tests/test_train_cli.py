"""The training and evaluation commands end to end on a tiny set, and their error handling."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastsynth import eval as fs_eval
from fastsynth import train
from tinydata import tiny_folder

TINY = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--epochs", "2", "--max-steps", "2",
        "--warmup-epochs", "2", "--probe-epochs", "3", "--queue-size", "32", "--bank-size", "16",
        "--decoder-width", "32", "--log-every", "1"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """A 4-class synthetic set written as a plain train/ test/ ImageFolder tree."""
    root = tmp_path_factory.mktemp("tiny")
    return tiny_folder(root)


@pytest.fixture(scope="module")
def tiny_run(tiny_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    rc = train.main(["--dataset", "folder", "--data-root", tiny_root, "--output-dir", out, *TINY])
    assert rc == 0
    return out


def test_run_folder_contents(tiny_run):
    for name in ("config.json", "metrics.jsonl", "warmup.pt", "last.pt", "final_metrics.json", "triplets.png"):
        assert os.path.isfile(os.path.join(tiny_run, name)), name
    records = [json.loads(line) for line in open(os.path.join(tiny_run, "metrics.jsonl"))]
    assert {r["stage"] for r in records} == {"warmup", "ssl"}
    ssl = [r for r in records if r["stage"] == "ssl"]
    assert all(k in ssl[0] for k in ("loss", "l_c", "l_r", "l_cp"))
    assert ssl[-1]["images_per_s"] > 0 and ssl[-1]["tflops_per_s"] > 0 and "mfu" not in ssl[-1]  # no CPU peak
    final = json.load(open(os.path.join(tiny_run, "final_metrics.json")))
    for enc in ("trained", "random_init"):
        m = final["metrics"][enc]
        assert set(m) >= {"linear_top1@100", "linear_top1@50", "linear_top1@20", "rank1", "rank5", "mAP"}
        assert all(0.0 <= v <= 1.0 for v in m.values())
    assert final["ssl_steps"] == 2
    assert json.load(open(os.path.join(tiny_run, "config.json")))["max_steps"] == 2
    # --max-steps 2 ends the first epoch (3 batches of 8) early: a resume goes on at its batch 2
    last = torch.load(os.path.join(tiny_run, "last.pt"), weights_only=True)
    assert (last["step"], last["epoch"], last["batch_in_epoch"]) == (2, 0, 2)


def test_eval_cli_reads_checkpoint(tiny_run, tmp_path, capsys):
    out = tmp_path / "m.json"
    rc = fs_eval.main(["--checkpoint", os.path.join(tiny_run, "last.pt"), "--probe-fractions", "1.0",
                       "--probe-epochs", "2", "--output", str(out)])
    assert rc == 0
    res = json.load(open(out))
    assert set(res) == {"linear_top1@100", "linear_top5@100", "rank1", "rank5", "mAP", "knn_top1"}
    # Features are cached by checkpoint digest, transform and file list: a second evaluation
    # reads them back and reports the same numbers.
    assert len(os.listdir(os.path.join(tiny_run, "features"))) == 2
    capsys.readouterr()
    assert fs_eval.main(["--checkpoint", os.path.join(tiny_run, "last.pt"), "--probe-fractions", "1.0",
                         "--probe-epochs", "2", "--output", str(out)]) == 0
    assert capsys.readouterr().out.count("cached features from") == 2
    assert json.load(open(out)) == res


def test_stages_run_alone(tiny_root, tiny_run, tmp_path, capsys):
    out = str(tmp_path / "alone")
    args = ["--dataset", "folder", "--data-root", tiny_root, "--output-dir", out, *TINY]
    assert train.main([*args, "--stage", "warmup"]) == 0
    assert os.path.isfile(os.path.join(out, "warmup.pt")) and not os.path.exists(os.path.join(out, "last.pt"))
    capsys.readouterr()
    assert train.main([*args, "--stage", "ssl"]) == 0
    assert os.path.isfile(os.path.join(out, "last.pt"))
    assert "other inputs" not in capsys.readouterr().out
    # A decoder warmed up for another run (here another seed: other initial encoder features) is
    # named, not used silently.
    other = ["--dataset", "folder", "--data-root", tiny_root, "--output-dir", str(tmp_path / "other"), *TINY]
    assert train.main([*other, "--stage", "ssl", "--seed", "5", "--resume-from", os.path.join(out, "warmup.pt")]) == 0
    assert "warmed the decoder up on other inputs: --seed 0 (this run: 5)" in capsys.readouterr().out
    assert train.main([*args, "--stage", "eval", "--probe-fractions", "1.0"]) == 0
    # A trained model is not a warm-up decoder: a clear error, not a KeyError.
    assert train.main([*args, "--stage", "ssl", "--resume-from", os.path.join(out, "last.pt")]) == 2
    final = json.load(open(os.path.join(out, "final_metrics.json")))
    assert "metrics" in final and "ssl_steps" not in final


@pytest.mark.parametrize("flag,value", [
    ("--tau", "nan"), ("--tau", "0"), ("--lr", "nan"), ("--lr", "inf"), ("--nu", "nan"), ("--sigma-g", "nan"),
    ("--sigma-v", "-1"), ("--decoder-lr", "nan"), ("--alpha", "inf"), ("--weight-decay", "inf"),
    ("--dist-timeout", "nan"), ("--momentum", "1.5"), ("--momentum", "nan"), ("--probe-lr", "-5"),
    ("--probe-lr", "0"), ("--probe-lr", "nan"), ("--decoder-width", "0"), ("--simsiam-dim", "0")])
def test_numbers_outside_their_range_are_refused_before_any_work(flag, value):
    """NaN fails every comparison, so checks written as `x <= 0` let it through (--lr nan trained a
    NaN model until the divergence check stopped it); --probe-lr <= 0 failed only at evaluation,
    after all training, with a traceback."""
    from fastsynth.config import ConfigError, from_args
    with pytest.raises(ConfigError, match=flag):
        from_args([flag, value])


@pytest.mark.parametrize("argv,needle", [
    (["--dataset", "imagenet"], "invalid choice"),
    (["--dataset", "cub"], "--data-root"),
    (["--dataset", "cub", "--data-root", "/nonexistent/cub"], "/nonexistent/cub"),
    (["--noise", "loud"], "invalid choice"),
    (["--batch-size", "1"], "--batch-size"),
    (["--stage", "eval", "--resume-from", "/nonexistent.pt"], "/nonexistent.pt"),
    (["--stage", "ssl", "--resume-from", "/nonexistent.pt"], "/nonexistent.pt"),
])
def test_bad_input_is_one_clear_line(argv, needle, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastsynth.train", "--output-dir", str(tmp_path), *argv],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert needle in proc.stderr


def test_eval_rejects_unreadable_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    proc = subprocess.run([sys.executable, "-m", "fastsynth.eval", "--checkpoint", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "unreadable" in proc.stderr


def test_dataset_choices_match_registry():
    from fastsynth.config import CHOICES
    from fastsynth.data.datasets import DATASETS
    assert set(CHOICES["dataset"]) == set(DATASETS)


def _warmup_then_ssl(root, out, *flags):
    """The two training stages of a tiny run, one after the other, with extra flags."""
    for stage in ("warmup", "ssl"):
        assert train.main(["--dataset", "folder", "--data-root", root, "--output-dir", out, *TINY,
                           *flags, "--stage", stage]) == 0


def test_amp_bfloat16_on_cpu(tiny_root, tmp_path):
    """--amp --amp-dtype bfloat16 runs bfloat16 autocast on any CPU; the losses stay finite."""
    out = str(tmp_path / "amp")
    _warmup_then_ssl(tiny_root, out, "--amp", "--amp-dtype", "bfloat16")
    ssl = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"ssl"' in line]
    assert ssl and all(v == v and abs(v) < 1e6 for r in ssl for k, v in r.items() if k.startswith("l"))


def test_tensorboard_logs_scalars_and_triplets(tiny_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = str(tmp_path / "tb")
    _warmup_then_ssl(tiny_root, out, "--tensorboard")
    acc = EventAccumulator(os.path.join(out, "tensorboard")).Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"warmup/l_r", "ssl/loss", "ssl/l_c", "ssl/l_cp"} <= tags
    assert "triplets" in acc.Tags()["images"]


def test_queue_note_when_queue_covers_the_training_set():
    from fastsynth.config import from_args
    cfg = from_args(["--queue-size", "1024"])
    assert "1024 keys" in train.queue_note(cfg, 800) and "800 images" in train.queue_note(cfg, 800)
    assert train.queue_note(cfg, 1025) is None
    assert train.queue_note(from_args(["--method", "simsiam"]), 10) is None  # SimSiam has no queue


def test_the_paper_preset_is_method_md_settings():
    """--preset paper: METHOD.md's training settings and its linear-probe protocol (lr 30, crops
    and flips every epoch); the quick preset keeps the cached probe (seconds on a CPU). MoCo v2's
    lr 0.03 is the rate at the paper's batch 128; SimSiam's 0.05 is read per 256 images, as the
    SimSiam paper states its base rate."""
    from fastsynth.config import from_args
    paper = from_args(["--preset", "paper"])
    assert (paper.arch, paper.image_size, paper.batch_size, paper.epochs, paper.queue_size) == (
        "resnet50", 224, 128, 100, 65536)
    assert (paper.warmup_epochs, paper.tau, paper.moco_momentum, paper.probe) == (200, 0.2, 0.999, "paper")
    assert paper.effective_lr() == pytest.approx(0.03)
    assert from_args(["--preset", "paper", "--method", "simsiam"]).effective_lr() == pytest.approx(0.025)
    assert from_args([]).probe == "cached" and from_args(["--preset", "paper", "--probe", "cached"]).probe == "cached"
