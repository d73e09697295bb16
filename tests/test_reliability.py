"""Issue 6 (part): interrupted runs continue exactly, bad steps are skipped, checkpoints are data."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastsynth import checkpoint, engine, train
from fastsynth.kernels import FeatureBank
from tinydata import tiny_folder

TINY = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--epochs", "2",
        "--warmup-epochs", "2", "--probe-epochs", "2", "--probe-fractions", "1.0", "--queue-size", "32",
        "--bank-size", "16", "--decoder-width", "32", "--log-every", "1", "--workers", "0"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """4 classes x 6 training images: 3 SSL steps per epoch at batch 8."""
    base = tmp_path_factory.mktemp("rel")
    return tiny_folder(base, test_per_class=2, size=40)


def _args(root, out, *extra):
    return ["--dataset", "folder", "--data-root", root, "--output-dir", str(out), *TINY, *extra]


def _weights(path):
    return checkpoint.load(path)["model"]


def test_sigterm_checkpoints_then_resume_equals_uninterrupted(root, tmp_path, monkeypatch):
    """--deterministic: stopped by SIGTERM after 4 SSL steps (mid-epoch 2) and resumed, the run
    ends with the same weights, queue and bank as one that was never stopped."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert train.main(_args(root, a, "--deterministic", "--stage", "all")) == 0

    calls = {"n": 0}
    cosine = engine._cosine

    def stop_after_four(*args):  # the SSL loop calls _cosine once per step
        calls["n"] += 1
        if calls["n"] == 5:  # the fifth step begins: deliver SIGTERM now, as a pre-emption would
            os.kill(os.getpid(), signal.SIGTERM)
        return cosine(*args)

    monkeypatch.setattr(engine, "_cosine", stop_after_four)
    assert train.main(_args(root, b, "--deterministic")) == 0          # SIGTERM: clean exit 0
    ckpt = checkpoint.load(str(b / "last.pt"))
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]) == (5, 1, 2)
    assert not (b / "final_metrics.json").exists()
    monkeypatch.setattr(engine, "_cosine", cosine)

    assert train.main(["--resume", "auto", "--output-dir", str(b), "--deterministic", "--workers", "0"]) == 0
    wa, wb = _weights(str(a / "last.pt")), _weights(str(b / "last.pt"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert json.load(open(b / "final_metrics.json"))["metrics"]["trained"].keys()
    # The interrupted epoch's logged means cover its steps before the stop too (saved with it).
    last_a, last_b = ([json.loads(line) for line in open(d / "metrics.jsonl") if '"ssl"' in line][-1] for d in (a, b))
    assert (last_b["epoch"], last_b["loss"]) == (last_a["epoch"], last_a["loss"])


def test_sigkill_mid_run_resumes_from_last_checkpoint(root, tmp_path):
    out = tmp_path / "k"
    cmd = [sys.executable, "-m", "fastsynth.train", *_args(root, out, "--epochs", "6", "--checkpoint-every", "1")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list(out.glob("ssl-step*.pt")):
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()  # SIGKILL: no handler, no goodbye
    proc.wait()
    assert list(out.glob("ssl-step*.pt")), "no SSL checkpoint appeared before the kill"
    done = subprocess.run([sys.executable, "-m", "fastsynth.train", "--resume", "auto", "--output-dir", str(out),
                           "--workers", "0"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "continuing SSL training at" in done.stdout
    assert checkpoint.load(str(out / "last.pt"))["step"] == 18
    assert (out / "final_metrics.json").exists()


def test_corrupt_newest_checkpoint_falls_back_and_rotation_keeps_n(tmp_path, capsys):
    run = checkpoint.RunDir(str(tmp_path), "")
    for step in (3, 6, 9, 12):
        checkpoint.rotate_and_save({"format": checkpoint.FORMAT, "stage": "ssl", "step": step}, run, keep=3)
    names = sorted(os.listdir(tmp_path))
    assert names == ["last.pt", "ssl-step00000006.pt", "ssl-step00000009.pt"]
    with open(run.file("last.pt"), "r+b") as fh:  # a crash mid-copy: the file is cut short
        fh.truncate(20)
    path, ckpt = checkpoint.newest_valid(run)
    assert path.endswith("ssl-step00000009.pt") and ckpt["step"] == 9
    assert "unreadable" in capsys.readouterr().out


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (open, (self.marker, "w"))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    marker = str(tmp_path / "ran")
    path = str(tmp_path / "evil.pt")
    torch.save({"format": checkpoint.FORMAT, "stage": "ssl", "payload": _RunsCode(marker)}, path)
    with pytest.raises(checkpoint.CheckpointError, match="unreadable"):
        checkpoint.load(path)
    assert not os.path.exists(marker)
    assert train.main(["--stage", "eval", "--resume-from", path, "--output-dir", str(tmp_path / "r")]) == 2
    assert not os.path.exists(marker)


def test_nan_loss_is_skipped_and_counted_then_too_many_stop(root, tmp_path, monkeypatch, capsys):
    from fastsynth.model import SynthSSL
    forward = SynthSSL.forward
    calls = {"n": 0, "always": False}

    def sometimes_nan(self, *args, **kwargs):
        loss, parts, ctx, out = forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["always"] or calls["n"] % 3 == 2:
            loss = loss * float("nan")
        return loss, parts, ctx, out

    monkeypatch.setattr(SynthSSL, "forward", sometimes_nan)
    out = tmp_path / "nan"
    assert train.main(_args(root, out, "--synth", "off", "--stage", "ssl")) == 0
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert records[-1]["bad_steps"] == 2                       # steps 2 and 5 of 6
    assert all(v == v for r in records for k, v in r.items() if isinstance(v, float))
    assert "non-finite loss or gradient, step skipped" in capsys.readouterr().out

    calls.update(n=0, always=True)                             # every step: NaN
    rc = train.main(_args(root, tmp_path / "nan2", "--synth", "off", "--stage", "ssl", "--max-bad-steps", "2"))
    assert rc == 1
    assert "non-finite SSL steps in a row" in capsys.readouterr().err


def test_bank_keeps_statistics_finite_after_a_bad_batch():
    bank = FeatureBank(8, 3, impl="torch")
    bank.update(torch.randn(4, 3))
    bank.update(torch.tensor([[float("nan"), float("inf"), 1.0]]))
    assert torch.isfinite(bank.variance()).all()


def test_simsiam_collapse_is_warned(tmp_path, capsys):
    run = checkpoint.RunDir(str(tmp_path), "")
    engine._collapse_check("simsiam", {"target": torch.ones(16, 64) + 1e-9 * torch.randn(16, 64)}, run, 0)
    assert "may have collapsed" in capsys.readouterr().out
    engine._collapse_check("simsiam", {"target": torch.randn(16, 64)}, run, 1)
    assert "collapsed" not in capsys.readouterr().out


@pytest.mark.parametrize("flag,value", [("--lam", "1.5"), ("--queue-size", "4"), ("--image-size", "12"),
                                        ("--keep-checkpoints", "0"), ("--max-bad-steps", "-1"), ("--lr", "-1"),
                                        ("--seed", "-1")])
def test_invalid_options_fail_at_startup_naming_the_option(flag, value, capsys):
    assert train.main(["--batch-size", "8", flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and flag in err[0]


def test_resume_auto_with_nothing_to_resume_is_a_clear_error(tmp_path, capsys):
    assert train.main(["--resume", "auto", "--output-dir", str(tmp_path)]) == 2
    assert "no valid checkpoint" in capsys.readouterr().err


def test_checkpoint_that_does_not_fit_is_one_clear_error(tmp_path):
    from fastsynth.models import Decoder
    dec = Decoder(16, 32, width=32)
    state = Decoder(16, 32, width=64).state_dict()                # other width: shapes differ
    with pytest.raises(checkpoint.CheckpointError, match="shape mismatch .*fc.weight"):
        checkpoint.load_into(dec, state, "warmup.pt (decoder)")
    with pytest.raises(checkpoint.CheckpointError, match="1 unexpected \\(extra\\)"):
        checkpoint.load_into(dec, {**dec.state_dict(), "extra": torch.zeros(1)}, "x")


def _salt(folder, make):
    """Write one bad or unusual file per kind into a class folder of a tiny ImageFolder tree."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    photo = (rng.random((40, 40, 3)) * 255).astype("uint8")
    good = {
        "gray.png": Image.fromarray(photo[..., 0], "L"),
        "cmyk.jpg": Image.fromarray(photo).convert("CMYK"),
        "palette.png": Image.fromarray(photo).convert("P"),
        "rgba.png": Image.fromarray(np.dstack([photo, photo[..., :1]]), "RGBA"),
        "sixteen.png": Image.fromarray(photo[..., 0].astype("uint16") * 257),  # mode I;16
    }
    for name, im in good.items():
        im.save(os.path.join(folder, name))
    Image.fromarray(photo).save(os.path.join(folder, "whole.jpg"))
    with open(os.path.join(folder, "whole.jpg"), "rb") as fh:
        data = fh.read()
    bad = {"empty.jpg": b"", "truncated.jpg": data[: len(data) // 2], "corrupt.png": b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,
           "notes.jpg": b"this is a text file, not a picture\n"}
    for name, blob in bad.items():
        with open(os.path.join(folder, name), "wb") as fh:
            fh.write(blob)
    Image.fromarray(photo[:4, :4]).save(os.path.join(folder, "tiny.png"))
    Image.fromarray(photo).save(os.path.join(folder, "gif_as.jpg"), format="GIF")  # PIL reads it; DALI cannot
    os.remove(os.path.join(folder, "whole.jpg"))
    return set(good), set(bad) | {"tiny.png", "gif_as.jpg"}


def test_bad_files_are_excluded_reported_and_limited(root, tmp_path, monkeypatch):
    import shutil
    monkeypatch.setenv("FASTSYNTH_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "salted"
    shutil.copytree(root, data)
    cls = sorted(os.listdir(data / "train"))[0]
    good, bad = _salt(str(data / "train" / cls), None)
    out = tmp_path / "run"
    args = ["--dataset", "folder", "--data-root", str(data), "--output-dir", str(out), *TINY,
            "--synth", "off", "--stage", "ssl", "--max-steps", "1"]
    assert train.main([*args, "--max-bad-fraction", "0.5"]) == 0
    lines = (out / "bad_files.txt").read_text().splitlines()[1:]
    assert {os.path.basename(line.split("\t")[1]) for line in lines} == bad
    reasons = {os.path.basename(line.split("\t")[1]): line.split("\t")[2] for line in lines}
    assert reasons["empty.jpg"] == "zero-byte file" and reasons["tiny.png"].startswith("too small")
    assert reasons["gif_as.jpg"].startswith("GIF image (the DALI loader cannot decode it")
    from fastsynth.data.loaders import load_rgb
    for name in good:  # converted, not rejected; 16-bit keeps its contrast
        im = load_rgb(str(data / "train" / cls / name))
        assert im.mode == "RGB" and im.size == (40, 40)
    import numpy as np
    assert np.asarray(load_rgb(str(data / "train" / cls / "sixteen.png"))).std() > 30
    # over the default 1 %: a clear stop naming the report
    rc = train.main([*args, "--output-dir", str(tmp_path / "run2")])
    assert rc == 2
    # a class with nothing usable left
    for f in os.listdir(data / "train" / cls):
        if f not in bad:
            os.remove(data / "train" / cls / f)
    with pytest.raises(Exception, match="no usable image left in class"):
        from fastsynth.data.datasets import build_dataset
        from fastsynth.data.scan import clean_splits
        clean_splits(build_dataset("folder", str(data), False, 0), 1.0, str(tmp_path / "b.txt"))


def test_sigterm_during_warmup_then_resume_finishes(root, tmp_path, monkeypatch):
    out = tmp_path / "w"
    real = engine.finite_step
    calls = {"n": 0}

    def term_on_second(*args):  # the warm-up's second step: pre-empted mid-warm-up
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(engine, "finite_step", term_on_second)
    assert train.main(_args(root, out, "--warmup-epochs", "3")) == 0
    warm = checkpoint.load(str(out / "warmup.pt"))
    assert warm["complete"] is False and warm["step"] == 2 and not (out / "last.pt").exists()
    monkeypatch.setattr(engine, "finite_step", real)
    assert train.main(["--resume", "auto", "--output-dir", str(out)]) == 0
    assert checkpoint.load(str(out / "warmup.pt"))["complete"] is True
    assert (out / "final_metrics.json").exists()


def test_fresh_run_sets_aside_an_earlier_runs_checkpoints(tmp_path, capsys):
    run = checkpoint.RunDir(str(tmp_path), "")
    for step in (3, 6):
        checkpoint.rotate_and_save({"format": checkpoint.FORMAT, "stage": "ssl", "step": step}, run, keep=3)
    engine._set_aside_previous_run(run)
    assert not (tmp_path / "last.pt").exists() and checkpoint.newest_valid(run) is None
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("previous-")]
    assert len(moved) == 1 and sorted(f.name for f in moved[0].iterdir()) == ["last.pt", "ssl-step00000003.pt"]
    assert "moved them to" in capsys.readouterr().out


def test_an_empty_checkpoint_is_skipped_not_a_crash(tmp_path, capsys):
    """A 0-byte last.pt (an interrupted copy, a full disk): torch.load's EOFError has no message,
    and reading its first line crashed load() with an IndexError, so newest_valid never fell
    back to the previous checkpoint."""
    run = checkpoint.RunDir(str(tmp_path), "")
    for step in (3, 6):
        checkpoint.rotate_and_save({"format": checkpoint.FORMAT, "stage": "ssl", "step": step}, run, keep=3)
    (tmp_path / "last.pt").write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointError, match="unreadable .*empty file"):
        checkpoint.load(str(tmp_path / "last.pt"))
    path, ckpt = checkpoint.newest_valid(run)
    assert ckpt["step"] == 3 and path.endswith("ssl-step00000003.pt")  # the previous one (last.pt held 6)
    assert "trying the previous checkpoint" in capsys.readouterr().out


def test_a_fresh_run_dying_in_its_warmup_leaves_no_earlier_run_to_resume(root, tmp_path, monkeypatch):
    """A fresh run (--stage all) in a folder that holds an earlier run's files moves them aside
    before its warm-up: when the new run dies there, --resume auto finds nothing to continue
    rather than the earlier run's last.pt (another experiment), and its log starts empty."""
    out = tmp_path / "run"
    assert train.main(_args(root, out, "--synth", "off", "--stage", "all", "--max-steps", "1",
                            "--probe-epochs", "1")) == 0
    assert (out / "last.pt").exists() and (out / "metrics.jsonl").exists()

    def crash(*args, **kwargs):
        raise RuntimeError("killed in the warm-up")
    monkeypatch.setattr(engine, "warmup_decoder", crash)
    with pytest.raises(RuntimeError, match="killed in the warm-up"):
        train.run(train.from_args(_args(root, out, "--seed", "7")))
    assert not (out / "last.pt").exists() and not (out / "metrics.jsonl").exists()
    (moved,) = [p for p in out.iterdir() if p.name.startswith("previous-")]
    assert {"last.pt", "metrics.jsonl"} <= {f.name for f in moved.iterdir()}
    assert train.main(["--resume", "auto", "--output-dir", str(out)]) == 2  # nothing of this run to resume


def test_optimizer_state_from_another_path_keeps_this_runs_flags_and_layout():
    """--device / --impl may change on resume: a plain SGD's state loaded into the fast path's
    fused SGD over channels-last weights keeps fused=True (which the found_inf flag needs) and
    gets momentum buffers in the weights' layout, with the saved values."""
    from fastsynth.checkpoint import load_optimizer
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3)
    plain = torch.optim.SGD(conv.parameters(), lr=0.1, momentum=0.9)
    conv(torch.randn(2, 3, 8, 8)).sum().backward()
    plain.step()
    saved = plain.state_dict()
    fast_conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    fused = torch.optim.SGD(fast_conv.parameters(), lr=0.1, momentum=0.9, fused=True)
    load_optimizer(fused, saved)
    assert fused.param_groups[0]["fused"] is True
    w = fast_conv.weight
    buf = fused.state[w]["momentum_buffer"]
    assert buf.stride() == w.stride() and torch.equal(buf, plain.state[conv.weight]["momentum_buffer"])
    fast_conv(torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)).sum().backward()
    before = w.detach().clone()
    fused.found_inf = torch.ones(())               # the fast path's skip flag: the step is skipped
    fused.step()
    del fused.found_inf
    assert torch.equal(w, before)
    fused.step()
    assert not torch.equal(w, before)


def test_warmup_keeps_a_checkpoint_per_epoch_through_a_crash(root, tmp_path, monkeypatch):
    """A crash (or SIGKILL: no handler runs) in the warm-up's second epoch leaves the first
    epoch's end in warmup.pt; --resume auto goes on from there to the end."""
    out = tmp_path / "w"
    real = engine.finite_step
    calls = {"n": 0}

    def crash_in_second_epoch(*args):  # 3 steps per epoch: the 5th is epoch 2's second
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return real(*args)

    monkeypatch.setattr(engine, "finite_step", crash_in_second_epoch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.run(train.from_args(_args(root, out, "--warmup-epochs", "3")))
    warm = checkpoint.load(str(out / "warmup.pt"))
    assert (warm["complete"], warm["epoch"], warm["batch_in_epoch"], warm["step"]) == (False, 1, 0, 3)
    monkeypatch.setattr(engine, "finite_step", real)
    assert train.main(["--resume", "auto", "--output-dir", str(out), "--stage", "warmup"]) == 0
    warm = checkpoint.load(str(out / "warmup.pt"))
    assert warm["complete"] is True and warm["step"] == 9


def test_resuming_an_older_checkpoint_sets_the_later_ones_aside(tmp_path, capsys):
    """Checkpoints at steps 100, 200, 300; a resume from step 100 abandons 200 and 300: they
    move aside, so rotation keeps the new run's files and --resume auto never returns to them."""
    run = checkpoint.RunDir(str(tmp_path), "")
    for s in (100, 200, 300):
        checkpoint.rotate_and_save({"step": s}, run, keep=5)
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "ssl-step00000100.pt", "ssl-step00000200.pt"]
    engine._set_aside_newer(run, 100)
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".pt")) == ["ssl-step00000100.pt"]
    (aside,) = [d for d in os.listdir(tmp_path) if d.startswith("abandoned-")]
    assert sorted(os.listdir(tmp_path / aside)) == ["last.pt", "ssl-step00000200.pt"]
    assert "resuming at step 100" in capsys.readouterr().out
    checkpoint.rotate_and_save({"step": 150}, run, keep=5)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 150
    engine._set_aside_newer(run, 150)                # the newest: nothing to move
    assert len([d for d in os.listdir(tmp_path) if d.startswith("abandoned-")]) == 1


def test_resume_refuses_a_changed_training_set(root, tmp_path, monkeypatch, capsys):
    """The epoch order, the steps per epoch and the schedule follow the training set: a resume
    that finds another set (here one image fewer) is a clear error, not a silent new run; the
    same set under another folder (the data moved) resumes."""
    import shutil
    monkeypatch.setenv("FASTSYNTH_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    shutil.copytree(root, data)
    out = tmp_path / "run"
    args = ["--dataset", "folder", "--data-root", str(data), "--output-dir", str(out), *TINY,
            "--synth", "off", "--stage", "ssl", "--max-steps", "1"]
    assert train.main(args) == 0
    assert checkpoint.load(str(out / "last.pt"))["train_set"]["images"] == 24
    moved = tmp_path / "moved"
    shutil.move(str(data), str(moved))
    resume = ["--resume", "auto", "--output-dir", str(out), "--max-steps", "2"]
    assert train.main([*resume, "--data-root", str(moved)]) == 0
    cls = sorted(os.listdir(moved / "train"))[0]
    os.remove(moved / "train" / cls / sorted(os.listdir(moved / "train" / cls))[0])
    capsys.readouterr()
    assert train.main([*resume, "--data-root", str(moved), "--max-steps", "3"]) == 2
    assert "the training set changed since this checkpoint: 24 images then, 23 now" in capsys.readouterr().err


def test_resume_may_change_how_it_runs_and_raise_the_step_budget(root, tmp_path, capsys):
    """--resume keeps the experiment but not how this invocation runs: the fast path's switches
    (a run moved to a CPU, or to a GPU without the kernels) and the --max-steps budget apply as
    given. The schedule spans --epochs whatever the budget, so raising it continues the same
    cosine: the second step runs at lr * (1 + cos(pi / 6)) / 2 of the 6-step schedule (the
    budget-capped schedule of before would have given the 2-step one's 0.5)."""
    import math

    from fastsynth.config import from_dict
    out = tmp_path / "run"
    args = ["--dataset", "folder", "--data-root", root, "--output-dir", str(out), *TINY, "--synth", "off",
            "--stage", "ssl", "--max-steps", "1", "--impl", "fast", "--loader", "torch", "--channels-last"]
    assert train.main(args) == 0
    assert checkpoint.load(str(out / "last.pt"))["step"] == 1
    capsys.readouterr()
    assert train.main(["--resume", "auto", "--output-dir", str(out), "--max-steps", "2", "--impl", "reference",
                       "--no-channels-last", "--no-compile", "--no-cuda-graph", "--loader", "torch"]) == 0
    printed = capsys.readouterr().out
    assert "ignoring" not in printed, printed
    last = checkpoint.load(str(out / "last.pt"))
    cfg = last["config"]
    assert last["step"] == 2 and cfg["max_steps"] == 2 and cfg["impl"] == "reference"
    assert cfg["channels_last"] is False and cfg["compile"] is False
    base = from_dict(cfg).effective_lr()
    lr = last["optimizer"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(base * 0.5 * (1 + math.cos(math.pi / 6)), rel=1e-9)
    # What defines the experiment still comes from the checkpoint, with a warning.
    assert train.main(["--resume", "auto", "--output-dir", str(out), "--max-steps", "3", "--lr", "0.5"]) == 0
    assert "ignoring --lr" in capsys.readouterr().out
    assert checkpoint.load(str(out / "last.pt"))["config"]["lr"] == cfg["lr"]


def test_a_skipped_warmup_step_leaves_the_decoders_batchnorm_statistics(root, tmp_path, monkeypatch):
    """As in SSL steps: the warm-up's forward moves the decoder's running statistics before the
    finiteness check, and a skipped step puts them back (a non-finite batch would otherwise
    leave NaN in them, in every later checkpoint). Here the second and third steps are declared
    non-finite: the statistics after the warm-up are those after the first step."""
    from fastsynth.models import Decoder
    calls = {"n": 0}
    real = engine._finite_everywhere

    def first_only(loss, params):
        calls["n"] += 1
        return real(loss, params) and calls["n"] == 1
    monkeypatch.setattr(engine, "_finite_everywhere", first_only)
    one, three = tmp_path / "one", tmp_path / "three"
    assert train.main(_args(root, one, "--stage", "warmup", "--warmup-epochs", "1", "--max-steps", "1")) == 0
    calls["n"] = 0
    assert train.main(_args(root, three, "--stage", "warmup", "--warmup-epochs", "1")) == 0
    assert calls["n"] == 3
    after_one, after_three = (checkpoint.load(str(d / "warmup.pt"))["decoder"] for d in (one, three))
    stats = [k for k in after_one if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert stats and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in Decoder(8, 32).modules())
    for k in stats:
        assert torch.equal(after_three[k], after_one[k]), k
    moved = [k for k in after_one if k.endswith("num_batches_tracked")]
    assert all(int(after_one[k]) == 1 for k in moved)  # the first step's forward did count


def _fused_on_cpu(monkeypatch):
    """The GPU's way of checking steps on a CPU: fused optimizers (this torch has them on a CPU)
    and the finiteness flag left on the device (engine.checks_on_device), read every --log-every."""
    import dataclasses

    from fastsynth import fast
    resolve = fast.resolve
    monkeypatch.setattr(fast, "resolve", lambda cfg, device: dataclasses.replace(resolve(cfg, device), fused=True))


@pytest.mark.parametrize("checks", ["host", "device"])
def test_bad_steps_in_a_row_survive_a_resume(root, tmp_path, monkeypatch, capsys, checks):
    """A diverging run (every step non-finite) stopped after 2 bad steps and resumed stops at the
    limit counted across the restart: the count in a row is in the checkpoint. Both ways a step
    is checked: read back each step (host), or a device flag read every --log-every (device)."""
    from fastsynth.model import SynthSSL
    if checks == "device":
        _fused_on_cpu(monkeypatch)
    forward = SynthSSL.forward

    def always_nan(self, *args, **kwargs):
        loss, parts, ctx, out = forward(self, *args, **kwargs)
        return loss * float("nan"), parts, ctx, out

    calls = {"n": 0}
    cosine = engine._cosine

    def stop_after_two(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return cosine(*args)

    monkeypatch.setattr(SynthSSL, "forward", always_nan)
    monkeypatch.setattr(engine, "_cosine", stop_after_two)
    out = tmp_path / "div"
    assert train.main(_args(root, out, "--synth", "off", "--stage", "ssl", "--max-bad-steps", "3")) == 0
    ckpt = checkpoint.load(str(out / "last.pt"))
    assert (ckpt["bad_steps"], ckpt["bad_in_a_row"]) == (3, 3)
    monkeypatch.setattr(engine, "_cosine", cosine)
    capsys.readouterr()
    assert train.main(["--resume", "auto", "--output-dir", str(out)]) == 1
    assert "4 non-finite SSL steps in a row" in capsys.readouterr().err


def test_stop_on_an_epochs_last_batch_still_logs_the_epoch(root, tmp_path, monkeypatch):
    """SIGTERM during an epoch's last step: the epoch is complete, so its record and its
    end-of-epoch checkpoint (next epoch, batch 0) are written before the clean exit."""
    calls = {"n": 0}
    cosine = engine._cosine

    def stop_in_third(*args):  # 3 steps per epoch: the third is epoch 1's last
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return cosine(*args)

    monkeypatch.setattr(engine, "_cosine", stop_in_third)
    out = tmp_path / "s"
    assert train.main(_args(root, out, "--synth", "off", "--stage", "ssl")) == 0
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [(r["epoch"], r["step"]) for r in records if r["stage"] == "ssl"] == [(0, 3)]
    ckpt = checkpoint.load(str(out / "last.pt"))
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["epoch_partial"]) == (3, 1, 0, None)
    assert not (out / "final_metrics.json").exists()


def test_adam_state_from_a_plain_run_steps_in_the_fused_adam():
    """The decoder's Adam: a plain run's state (its `step` a host tensor) loaded into the fused
    Adam keeps fused=True and steps, skipped steps included (on a GPU torch places `step` by
    the groups' flags, which load_optimizer sets to this run's before loading)."""
    from fastsynth.checkpoint import load_optimizer
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    plain = torch.optim.Adam(lin.parameters(), lr=1e-3)
    lin(torch.randn(5, 4)).sum().backward()
    plain.step()
    fast_lin = torch.nn.Linear(4, 3)
    fused = torch.optim.Adam(fast_lin.parameters(), lr=1e-3, fused=True)
    load_optimizer(fused, plain.state_dict())
    assert fused.param_groups[0]["fused"] is True
    assert float(fused.state[fast_lin.weight]["step"]) == 1.0
    fast_lin(torch.randn(5, 4)).sum().backward()
    before = fast_lin.weight.detach().clone()
    fused.found_inf = torch.ones(())
    fused.step()
    del fused.found_inf
    assert torch.equal(fast_lin.weight, before)
    fused.step()
    assert float(fused.state[fast_lin.weight]["step"]) == 2.0 and not torch.equal(fast_lin.weight, before)


_GROUP_SIGTERM = """
import os, signal, sys, time
import torch
from torch.utils.data import Dataset
from fastsynth.data.loaders import epoch_loader
from fastsynth.guard import StopRequest

class Items(Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        flag = sys.argv[1]
        if not os.path.exists(flag):  # the first item a worker makes: SIGTERM to the whole group
            open(flag, "w").close()
            os.killpg(os.getpgid(0), signal.SIGTERM)
            time.sleep(0.5)  # delivered to every process of the group before the next item
        return torch.tensor(float(i))

with StopRequest() as stop:
    seen = [int(x) for batch in epoch_loader(Items(), 2, epoch=0, seed=0, workers=2) for x in batch]
print("items", len(seen), "distinct", len(set(seen)), "stop requested", stop.requested)
"""


def test_a_sigterm_to_the_process_group_leaves_loader_workers_serving(tmp_path):
    """Slurm pre-emption and `kill -TERM -PGID` signal the loader's workers too. A worker killed
    by it made the main process raise mid-step ("DataLoader worker ... is killed by signal"),
    before StopRequest could stop at a step boundary with a checkpoint; the workers now ignore
    it (loaders.ignore_stop_signals) and the main process alone decides. Run in its own session
    so the signal reaches that process group only."""
    script = tmp_path / "group_sigterm.py"
    script.write_text(_GROUP_SIGTERM)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "sent")], capture_output=True, text=True,
                          timeout=60, start_new_session=True)
    assert (tmp_path / "sent").exists()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "items 16 distinct 16 stop requested True" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_device_run_tracker_counts_runs_not_totals():
    """Deferred checks read a window of steps at once: its count of bad steps alone made scattered
    ones look like a run (5 alternating bad steps in a window of 10 stopped a run whose limit
    was 3). The device tracker carries the run across windows and keeps the window's longest."""
    from fastsynth.guard import BadSteps, RunTracker, TrainingError
    runs, bad = RunTracker(2, torch.device("cpu")), BadSteps(limit=3, total=2)
    bad.in_a_row = 2
    flags = [False, True, False, True, False, True, False, True, False, True]  # 5 bad, none adjacent
    for ok in flags:
        runs.step(torch.tensor(ok))
    n_bad, trailing, longest = runs.read()
    assert (n_bad, trailing, longest) == (5, 0, 3)  # the 2 carried in + the window's first bad step
    bad.check_window(5, 10, "SSL", 10, trailing, longest)  # 3 is not over the limit
    assert (bad.total, bad.in_a_row) == (7, 0)
    for ok in (True, False, False):
        runs.step(torch.tensor(ok))
    assert runs.read() == (2, 2, 2)  # the window's longest starts from the run it inherits (0 here)
    bad.check_window(2, 3, "SSL", 13, 2, 2)
    for ok in (False, False):
        runs.step(torch.tensor(ok))
    n_bad, trailing, longest = runs.read()
    assert (n_bad, trailing, longest) == (2, 4, 4)
    with pytest.raises(TrainingError, match="4 non-finite SSL steps in a row"):
        bad.check_window(2, 2, "SSL", 15, trailing, longest)


def test_scattered_bad_steps_in_one_window_do_not_stop_a_run(root, tmp_path, monkeypatch):
    """The deferred path end to end: every other step non-finite, --max-bad-steps 1, windows of
    6 steps (--log-every 6): 3 bad steps per window but never 2 in a row, so the run finishes."""
    from fastsynth.model import SynthSSL
    _fused_on_cpu(monkeypatch)
    forward, cosine, now = SynthSSL.forward, engine._cosine, {"step": None}

    def set_lr(opt, base_lr, step, total):  # called once per training step, with its number
        now["step"] = step
        return cosine(opt, base_lr, step, total)

    def odd_steps_nan(self, *args, **kwargs):  # (the FLOP count's forward, before step 0, is left alone)
        loss, parts, ctx, out = forward(self, *args, **kwargs)
        bad = now["step"] is not None and now["step"] % 2 == 1
        return (loss * float("nan") if bad else loss), parts, ctx, out
    monkeypatch.setattr(engine, "_cosine", set_lr)
    monkeypatch.setattr(SynthSSL, "forward", odd_steps_nan)
    out = tmp_path / "scattered"
    assert train.main(_args(root, out, "--synth", "off", "--stage", "ssl", "--max-bad-steps", "1",
                            "--log-every", "6")) == 0
    ckpt = checkpoint.load(str(out / "last.pt"))
    assert (ckpt["step"], ckpt["bad_steps"], ckpt["bad_in_a_row"]) == (6, 3, 1)
