"""`python -m fastsynth.profile` on the CPU with a tiny model: the figures exist and add up, the
trace is written, and bad input is a one-line error with exit code 2."""
import glob
import json
import os
import signal
import time

import pytest
import torch

from fastsynth import engine, profile
from tinydata import tiny_folder

TINY = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "4", "--queue-size", "16", "--bank-size", "8",
        "--decoder-width", "16", "--steps", "2", "--warmup-steps", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The reference path through the torchvision loader on a tiny folder set, and the fast path
    (eager: compiling takes minutes on a CPU) on in-device random batches with a trace."""
    tmp = tmp_path_factory.mktemp("profile")
    root = tiny_folder(tmp / "data")
    argv = {"reference": ["--impl", "reference", "--dataset", "folder", "--data-root", root, "--data", "loader"],
            "fast": ["--impl", "fast", "--no-compile", "--trace", str(tmp / "trace"), "--gc-every", "1"]}
    out = {}
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    for impl, extra in argv.items():
        path = str(tmp / f"{impl}.json")
        # The reference run with cuDNN's TF32 off (PyTorch's default is on) and the fast one with
        # matmul TF32 on (default off): the record must report what the run had, not the default.
        torch.backends.cudnn.allow_tf32 = impl != "reference"
        torch.backends.cuda.matmul.allow_tf32 = impl == "fast"
        try:
            assert profile.main(TINY + extra + ["--json", path]) == 0
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
        with open(path) as fh:
            out[impl] = json.load(fh)
    out["trace_dir"] = str(tmp / "trace")
    return out


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_figures_exist_and_add_up(runs, impl):
    r = runs[impl]
    assert r["complete"] is True and "phase" not in r and "error" not in r  # the final record, not a partial one
    assert r["impl"] == impl and r["plan"]["impl"] == impl and r["config"]["batch_size"] == 4
    assert r["data"] == ("loader" if impl == "reference" else "synthetic-gpu")
    assert r["steps"] == 2 and r["images_per_s"] > 0 and r["wall_s"] > 0
    assert len(r["warmup_step_s"]) == r["warmup_steps"] and all(t > 0 for t in r["warmup_step_s"])
    assert r["amp"] is False and r["autocast_dtype"] is None
    assert r["tf32"] == {"cudnn": impl != "reference", "matmul": impl == "fast"}
    step = r["step_ms"]
    assert 0 < step["min"] <= step["median"] <= step["max"] and step["min"] <= step["mean"] <= step["max"]
    # The stage rows partition each step's marks, so they add up to the step time (float sums only).
    assert set(r["stages_ms"]) == set(profile.STAGES) and all(v >= 0 for v in r["stages_ms"].values())
    assert sum(r["stages_ms"].values()) == pytest.approx(step["mean"], rel=1e-6)
    for busy in ("query encoder+head fwd", "key encoder fwd", "decoder fwd", "Grad-CAM scores", "backward",
                 "optimizer + EMA + queue"):
        assert r["stages_ms"][busy] > 0, busy
    # The timed loop is the steps back to back: wall clock and the steps' sum agree.
    assert r["wall_s"] * 1e3 == pytest.approx(2 * step["mean"], rel=0.1)
    assert r["images_per_s"] == pytest.approx(4 / (step["mean"] / 1e3), rel=0.1)
    assert r["flops_per_step"] > 1e8 and r["tflops_per_s"] > 0
    assert r["mfu"] is None and r["bf16_peak_tflops"] is None  # no bf16 peak for a CPU
    assert r["peak_memory_bytes"] > 0 and r["versions"]["torch"] and r["device_name"].startswith("cpu")
    assert r["host_enqueue_ms"] > 0  # on a CPU the ops are synchronous: about a step
    assert r["host_syncs"] is None and r["allocator_per_step"] is None  # CUDA-only figures
    # The timed steps' garbage collections: with --gc-every 1 exactly one young collection after
    # each of the 2 timed steps and nothing automatic; otherwise whatever Python's thresholds did.
    assert r["gc_every"] == (1 if impl == "fast" else 0) and r["gc_ms_per_step"] >= 0
    if impl == "fast":
        assert r["gc_collections"] == {"1": 2} and r["gc_max_ms"] > 0


def test_flops_are_the_methods_not_the_impls(runs):
    assert runs["fast"]["flops_per_step"] == runs["reference"]["flops_per_step"]


def test_trace_written(runs):
    (trace,) = glob.glob(os.path.join(runs["trace_dir"], "*.pt.trace.json"))
    with open(trace) as fh:
        names = {e.get("name") for e in json.load(fh)["traceEvents"]}
    # The wrapped calls are record_function ranges named as their rows (phases are not ranges).
    assert {"query encoder+head fwd", "key encoder fwd", "decoder fwd", "Grad-CAM scores",
            "bank + dual noise"} <= names
    assert any(str(n).startswith("ProfilerStep") for n in names)


def test_trace_summary_in_the_record(runs):
    """On a CPU there is no GPU timeline: the summary says so and still lists the host's ops."""
    s = runs["fast"]["trace_summary"]
    assert s["gpu_busy_fraction"] is None and "no device activity" in s["note"]
    ops = s["host_top_self_ms_per_step"]
    assert ops and all(o["ms"] >= 0 and o["calls"] > 0 for o in ops)
    assert runs["reference"]["trace_summary"] is None  # no --trace, no summary


def test_trace_summary_finds_idle_gpu_time_by_stage():
    """Two steps of a made-up GPU timeline (microseconds): kernels overlap or touch except for
    gaps of 100 us (resumed while the host was in "Grad-CAM scores", inside its nested range),
    40 us (resumed outside any stage) and 5 us (a launch gap, under the 20 us threshold)."""
    device = [(0, 50, "conv"), (40, 100, "bn"), (100, 120, "relu"),        # overlap, touch: no gap
              (220, 230, "mm"),                                             # 100 us gap
              (235, 260, "exp"),                                            # 5 us
              (300, 400, "conv2")]                                          # 40 us
    host = [(150, 260, "Grad-CAM scores"), (210, 225, "aten::mm"), (200, 240, "Grad-CAM scores"),
            (0, 500, "ProfilerStep#3"), (280, 310, "aten::conv")]
    from fastsynth.trace_summary import OUTSIDE, format_lines, summarize
    s = summarize(device, host, {"Grad-CAM scores", "decoder fwd"}, steps=2)
    assert s["device_events_per_step"] == 3
    assert s["gpu_busy_ms_per_step"] == pytest.approx((120 + 10 + 25 + 100) / 2 / 1e3)
    assert s["gpu_span_ms_per_step"] == pytest.approx(400 / 2 / 1e3)
    assert s["gpu_busy_fraction"] == pytest.approx(255 / 400)
    assert s["idle_gaps_per_step"] == 1 and s["idle_ms_per_step"] == pytest.approx(140 / 2 / 1e3)
    assert s["short_gap_ms_per_step"] == pytest.approx(5 / 2 / 1e3)
    assert s["idle_ms_per_step_by_stage"] == pytest.approx({"Grad-CAM scores": 0.05, OUTSIDE: 0.02})
    first, second = s["longest_gaps"]
    assert (first["us"], first["prev"], first["next"], first["stage"], first["host_op"]) == \
        (100, "relu", "mm", "Grad-CAM scores", "aten::mm")
    assert (second["us"], second["prev"], second["next"], second["stage"], second["host_op"]) == \
        (40, "exp", "conv2", OUTSIDE, "aten::conv")
    assert any("Grad-CAM scores" in line for line in format_lines(s))


def _stopping_step(monkeypatch, on_call: int, action):
    """engine.ssl_step, with `action` run at the start of its on_call-th call."""
    real, calls = engine.ssl_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == on_call:
            action()
        return real(*args, **kwargs)
    monkeypatch.setattr(engine, "ssl_step", step)


def test_sigterm_leaves_a_partial_record(tmp_path, monkeypatch):
    """gpu_check.sh's timeout stops a run with SIGTERM: the --json file still says how far it got
    (a compiling first step that outlasts its budget is the case this is for)."""
    path = str(tmp_path / "p.json")
    before = signal.getsignal(signal.SIGTERM)
    _stopping_step(monkeypatch, 2, lambda: os.kill(os.getpid(), signal.SIGTERM))
    argv = TINY[:-4] + ["--warmup-steps", "3", "--device", "cpu", "--impl", "fast", "--no-compile", "--json", path]
    with pytest.raises(SystemExit) as stop:
        profile.main(argv)
    assert stop.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is the run's only
    with open(path) as fh:
        r = json.load(fh)
    assert r["complete"] is False and r["stopped_by"] == "SIGTERM"
    assert r["phase"] == "warm-up step 2 of 3" and 0 <= r["phase_running_s"] < 60  # stopped at the step's start
    assert len(r["warmup_step_s"]) == 1 and r["warmup_step_s"][0] > 0  # the finished first step
    assert r["impl"] == "fast" and r["warmup_steps"] == 3 and r["config"]["batch_size"] == 4
    assert os.listdir(tmp_path) == ["p.json"]  # no temporary file left beside it


def test_sigterm_in_a_forked_worker_leaves_the_record_alone(tmp_path):
    """Loader workers are forked with the handler installed; timeout's SIGTERM reaches them too.
    Only the profiling process writes: a worker's copy of the record is stale."""
    path = tmp_path / "p.json"
    with profile.Progress(str(path), {"run": "x"}) as progress:
        progress.update("2 timed steps")
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except SystemExit as e:
                code = e.code
            os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 128 + signal.SIGTERM
    with open(path) as fh:
        r = json.load(fh)
    assert r["phase"] == "2 timed steps" and "stopped_by" not in r and r["run"] == "x"
    assert os.listdir(tmp_path) == ["p.json"]


def test_a_failing_step_is_in_the_record(tmp_path, monkeypatch):
    path = str(tmp_path / "p.json")

    def boom():
        raise RuntimeError("boom in the step")
    _stopping_step(monkeypatch, 1, boom)
    with pytest.raises(RuntimeError, match="boom"):
        profile.main(TINY + ["--impl", "fast", "--no-compile", "--json", path])
    with open(path) as fh:
        r = json.load(fh)
    assert r["complete"] is False and r["error"] == "RuntimeError: boom in the step"
    assert r["phase"] == "warm-up step 1 of 1" and r["warmup_step_s"] == [] and "stopped_by" not in r


def test_sync_and_allocator_figures_read_back():
    """The CUDA-only lines: syncs with their three most frequent sites, the allocator's calls per
    step from two snapshots of its counters."""
    before = dict.fromkeys(profile.ALLOCATOR_COUNTS, 0)
    after = {**before, "num_device_alloc": 6, "num_device_free": 3}
    per_step = profile._allocator_delta(before, after, steps=3)
    assert per_step == {"device_alloc": 2.0, "device_free": 1.0, "alloc_retries": 0.0, "sync_all_streams": 0.0}
    assert profile._allocator_delta(None, None, 3) is None
    r = {"host_syncs": {"count": 5, "sites": [["fastsynth/guard.py:99 finite_step", 4], ["a.py:1 f", 1]]},
         "allocator_per_step": per_step}
    assert profile._sync_lines(r) == [
        "host syncs in one step 5 (fastsynth/guard.py:99 finite_step x4; a.py:1 f x1)",
        "allocator per step: device_alloc 2, device_free 1, alloc_retries 0, sync_all_streams 0"]
    assert profile._sync_lines({"host_syncs": {"count": 0, "sites": []}, "allocator_per_step": None}) == [
        "host syncs in one step 0"]
    assert profile._sync_lines({"host_syncs": None}) == []


def test_bf16_peak_table():
    assert profile.bf16_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert profile.bf16_peak("NVIDIA H100 PCIe") == 756e12
    assert profile.bf16_peak("NVIDIA H200") == 989e12
    assert profile.bf16_peak("NVIDIA H100 NVL") == profile.bf16_peak("NVIDIA H200 NVL") == 835e12
    assert profile.bf16_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert profile.bf16_peak("Some GPU") is None


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--warmup-steps", "-1"], ["--data", "nope"],
                                  ["--no-such-flag"], ["--steps", "two"], ["--preset", "huge"]])
def test_bad_input_is_one_line_and_exit_2(capsys, argv):
    assert profile.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err


def test_training_log_flops_match_the_profiler_and_leave_the_rng_alone():
    """train's TFLOP/s comes from the profiler's count on the run's own batch; counting draws a
    model's initial weights but restores the RNG, so a run is the same with or without it."""
    import torch

    from fastsynth.config import Config
    from fastsynth.engine import step_flops
    cfg = Config(arch="resnet18", image_size=32, batch_size=4, queue_size=16, bank_size=8,
                 decoder_width=16).validate()
    batch = profile.random_batch(cfg, torch.device("cpu"))
    torch.manual_seed(5)
    before = torch.get_rng_state()
    n = step_flops(cfg, torch.device("cpu"), batch)
    assert torch.equal(torch.get_rng_state(), before)
    # counted on the batch it is given: convolutions and InfoNCE scale with the batch, only
    # Eq. 7's 2N x 2N similarities grow faster (a tiny share)
    twice = tuple(torch.cat([t, t]) for t in batch)
    assert n > 1e8 and 1.95 < step_flops(cfg, torch.device("cpu"), twice) / n < 2.05


def test_trace_summary_ignores_user_annotations_on_the_gpu_timeline():
    """torch.profiler reports each record_function range (the stage names, ProfilerStep#N) on the
    GPU timeline too, spanning the work launched inside it. Counted as GPU work they filled the
    idle gaps: here two 100 us kernels with 100 us idle between them read as 100 % busy."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from fastsynth.trace_summary import from_profiler

    def ev(start, end, name, device, annotation=False):
        return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end), name=name, device_type=device,
                               is_user_annotation=annotation)

    events = [ev(0, 100, "conv", DeviceType.CUDA), ev(200, 300, "mm", DeviceType.CUDA),
              ev(0, 300, "ProfilerStep#1", DeviceType.CUDA, annotation=True),
              ev(0, 300, "Grad-CAM scores", DeviceType.CUDA, annotation=True),
              ev(0, 400, "ProfilerStep#1", DeviceType.CPU), ev(120, 190, "Grad-CAM scores", DeviceType.CPU)]
    prof = SimpleNamespace(events=lambda: events, key_averages=lambda: [])
    s = from_profiler(prof, set(profile.STAGES), steps=1)
    assert "error" not in s, s
    assert s["gpu_busy_fraction"] == pytest.approx(2 / 3)
    assert s["idle_ms_per_step"] == pytest.approx(0.1)
