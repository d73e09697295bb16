"""--cuda-graph (fastsynth/graphstep.py): the limits are clear errors, and a step run through the
graph's static buffers, device seed and device learning rates equals the plain step. The capture
itself needs a GPU: the last test runs there (bench/gpu_check.sh), and is skipped here."""
import pytest
import torch

from fastsynth import checkpoint, fast, graphstep, profile, train
from fastsynth.config import Config, ConfigError
from fastsynth.engine import _cosine, ssl_step
from fastsynth.guard import finite_flag
from stepcase import built

CPU = torch.device("cpu")


def _cfg(**kw):
    base = dict(arch="resnet18", image_size=32, batch_size=4, queue_size=16, bank_size=8, moco_dim=8,
                decoder_width=16, sigma_g=0.5, sigma_v=0.5, impl="fast", loader="torch")
    return Config(**{**base, **kw}).validate()


def _batches(n, device=CPU, size=32, b=4):
    g = torch.Generator().manual_seed(5)
    return [tuple((torch.randn(b, 3, size, size, generator=g) * (1 + i)).to(device) for _ in range(3)) for i in range(n)]


@pytest.mark.parametrize("why,kw,plan_kw,float16,world", [
    ("a CUDA device", {}, {}, False, 1),
    ("one process", {}, {}, False, 2),
    ("no float16 GradScaler", {}, {}, True, 1),
    ("fused optimizers", {}, {"fused": False}, False, 1),
    ("--impl fast with Triton", {}, {"impl": "reference"}, False, 1),
    ("--compile-mode default, not reduce-overhead", {"compile_mode": "reduce-overhead"}, {"compile": True}, False, 1),
    ("--compile-mode default, not max-autotune", {"compile_mode": "max-autotune"}, {"compile": True}, False, 1)])
def test_limits_are_clear_errors(why, kw, plan_kw, float16, world):
    cfg = _cfg(cuda_graph=True, **kw)
    plan = fast.Plan(**{**dict(impl="fast", loader="torch", channels_last=True, compile=False, fused=True,
                               cuda_graph=True), **plan_kw})
    device = CPU if why == "a CUDA device" else torch.device("cuda", 0)
    with pytest.raises(ConfigError, match=why):
        graphstep.check(cfg, plan, device, float16, world)
    graphstep.check(cfg, fast.Plan("fast", "torch", True, False, True), CPU, float16, world)  # off: no check


def test_commands_refuse_it_before_any_work(tmp_path, capsys):
    assert profile.main(["--cuda-graph", "--device", "cpu", "--arch", "resnet18", "--image-size", "32"]) == 2
    assert "--cuda-graph needs a CUDA device" in capsys.readouterr().err
    assert train.main(["--cuda-graph", "--device", "cpu", "--preset", "quick", "--output-dir", str(tmp_path)]) == 2
    assert "--cuda-graph needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "warmup.pt").exists()


def _run(graphed: bool, batches, seeds):
    """Three SSL steps with fused optimizers (also on a CPU in this torch) and the cosine schedule;
    graphed: through GraphedStep's buffers without the capture. Returns the state afterwards."""
    model, opt, dec_opt, autocast, params = built(_cfg(), fast.Plan("fast", "torch", False, False, True))

    def step(batch, seed):
        return ssl_step(model, model, opt, dec_opt, None, autocast, batch, seed, lambda loss: finite_flag(loss, params))
    stepper = graphstep.GraphedStep(step, (opt, dec_opt), CPU) if graphed else None
    losses = []
    for i, (batch, seed) in enumerate(zip(batches, seeds)):
        _cosine(opt, 0.5, i, 4)  # a schedule that moves: 0.5, 0.43, 0.25
        good, loss, *_ = stepper(batch, seed) if graphed else step(batch, seed)
        assert bool(good)
        losses.append(loss.detach().clone())
    lrs = [float(g["lr"]) for g in opt.param_groups]
    return {**model.state_dict()}, {id(p): s for p, s in opt.state.items()}, losses, lrs, opt


def test_static_buffers_device_seed_and_rates_equal_the_plain_step():
    """Bit for bit while the learning rate is exact in float32 (0.5: the first update, seen by the
    second step's loss); after that the device scalar's float32 rate (0.4268 rounded) against the
    Python float's moves the weights by rounding only."""
    batches, seeds = _batches(3), [11, 2 ** 40, 7]
    ref_state, _, ref_losses, ref_lrs, _ = _run(False, batches, seeds)
    state, _, losses, lrs, opt = _run(True, batches, seeds)
    assert all(isinstance(g["lr"], torch.Tensor) for g in opt.param_groups)  # device scalars, filled in place
    assert lrs == pytest.approx(ref_lrs)
    assert torch.equal(losses[0], ref_losses[0]) and torch.equal(losses[1], ref_losses[1])
    torch.testing.assert_close(losses[2], ref_losses[2], rtol=1e-6, atol=0)
    # Each tensor within 1e-4 of its own largest entry (measured: 8e-6 at most, the bank's rows);
    # a wrong seed or rate in the third step moves weights by far more.
    for k, ref in ref_state.items():
        if ref.is_floating_point():
            scale = ref.abs().max().clamp_min(1e-12)
            assert ((state[k] - ref).abs().max() / scale).item() < 1e-4, k
        else:
            assert torch.equal(state[k], ref), k


def test_batch_shape_change_is_an_error():
    stepper = graphstep.GraphedStep(lambda b, s: s, (), CPU)
    stepper(_batches(1)[0], 1)
    with pytest.raises(ValueError, match="batch changed shape"):
        stepper(tuple(t[:2] for t in _batches(1)[0]), 2)


def test_device_learning_rates_load_as_numbers(tmp_path):
    """A --cuda-graph run's checkpoint holds its rates as tensors; any run loads them as numbers."""
    w = torch.nn.Parameter(torch.ones(3))
    saver = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    graphstep.device_lr(saver)
    saver.param_groups[0]["lr"].fill_(0.25)
    w.grad = torch.ones(3)
    saver.step()
    loader = torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1, momentum=0.9)
    checkpoint.load_optimizer(loader, saver.state_dict())
    assert loader.param_groups[0]["lr"] == 0.25 and not torch.is_tensor(loader.param_groups[0]["lr"])


def _flat_state(state: dict) -> torch.Tensor:
    return torch.cat([v.float().flatten() for k, v in sorted(state.items()) if v.is_floating_point()])


def _snapshot(model, opts):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [{id(p): {k: v.clone() for k, v in o.state[p].items() if torch.is_tensor(v)} for p in o.state} for o in opts])


def _restore(model, opts, snap):
    """Back to the snapshot in place: the captured graph keeps the tensors' addresses."""
    weights, states = snap
    model.load_state_dict(weights)
    for o, saved in zip(opts, states):
        for p in o.state:
            for k, v in saved[id(p)].items():
                o.state[p][k].copy_(v)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA graph needs a GPU")
def test_a_replay_equals_the_eager_step_from_the_same_state_on_a_gpu():
    """On a GPU (Triton kernels, fused optimizers, bfloat16 autocast): WARMUP eager steps, the
    capture, then one more step taken twice from the same state, as a replay (new batch, seed
    and learning rate written into the graph's inputs) and as the plain eager step. They must
    agree: a replay that kept the capture's seed, rate or batch differs by the noise itself.
    One step from one state, with cuDNN's deterministic algorithms: no chaotic amplification of
    rounding over steps (the Eq. 6 threshold and Grad-CAM's ranking are discontinuous)."""
    dev = torch.device("cuda", 0)
    saved = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        model, opt, dec_opt, _, params = built(_cfg(cuda_graph=True, decoder_lr=2.0 ** -10),
                                               fast.Plan("fast", "torch", True, False, True, cuda_graph=True),
                                               dev, kernel_impl="triton")  # cudnn.benchmark off (the Plan's)

        def step(batch, seed):
            return ssl_step(model, model, opt, dec_opt, None, lambda: torch.autocast("cuda", dtype=torch.bfloat16),
                            batch, seed, lambda loss: finite_flag(loss, params))
        stepper = graphstep.GraphedStep(step, (opt, dec_opt), dev)
        batches = [tuple(t.contiguous(memory_format=torch.channels_last) for t in b)
                   for b in _batches(graphstep.WARMUP + 3, dev)]

        def set_lr(v):
            for g in opt.param_groups:
                g["lr"].fill_(v)
        for i in range(graphstep.WARMUP + 1):
            set_lr(2.0 ** -(i + 1))
            stepper(batches[i], 100 + i)
        assert stepper.graph is not None
        snap = _snapshot(model, (opt, dec_opt))
        runs = []
        for replay in (True, False):
            _restore(model, (opt, dec_opt), snap)
            set_lr(2.0 ** -7)
            batch, seed = batches[graphstep.WARMUP + 1], 555
            good, loss, _, _, out = stepper(batch, seed) if replay else step(batch, seed)
            torch.cuda.synchronize()
            assert bool(good)
            runs.append((loss.float().clone(), out["x_tilde"].float().clone(), _flat_state(model.state_dict())))
        (loss_r, xt_r, state_r), (loss_e, xt_e, state_e) = runs
        torch.testing.assert_close(loss_r, loss_e, rtol=1e-3, atol=1e-4)
        # The state's change in this step, not the state: a rate kept from the capture (2^-4
        # for 2^-7) scales the change 8x but moves the whole state by less than 1e-3.
        before = _flat_state(snap[0])
        for what, a, b in (("x_tilde", xt_r, xt_e), ("the step's change of the state", state_r - before,
                                                     state_e - before)):
            assert ((a - b).norm() / b.norm()).item() < 1e-2, what
        assert (state_r - before).norm() > 0  # the replay did step
        stepper(batches[graphstep.WARMUP + 2], 556)  # and replays go on after an eager step
        torch.cuda.synchronize()
    finally:
        torch.backends.cudnn.deterministic = saved


def test_training_loop_runs_and_resumes_through_the_graph_step(tmp_path, monkeypatch):
    """train.py's loop with the graph step (here without the capture, which a CPU cannot do;
    check() is what refuses --cuda-graph here, so the plan is forced past it): every SSL step
    goes through GraphedStep, the logged rates are numbers, the checkpoint's device rates load
    back on --resume, and the resumed run goes on from its step. Warm-up and SSL, synth on
    (the device seed, capturable Adam)."""
    import dataclasses
    import json
    import os
    import signal

    from fastsynth import engine
    from tinydata import tiny_folder
    root = tiny_folder(tmp_path / "data", test_per_class=2, size=40)
    resolve, calls = fast.resolve, []
    monkeypatch.setattr(fast, "resolve", lambda cfg, dev: dataclasses.replace(resolve(cfg, dev), cuda_graph=True,
                                                                              fused=True))
    monkeypatch.setattr(graphstep, "check", lambda *a: None)
    real = graphstep.GraphedStep.__call__
    monkeypatch.setattr(graphstep.GraphedStep, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    cosine = engine._cosine

    def stop_after_two(*a):  # SIGTERM as the third step starts: it finishes, then the checkpoint
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return cosine(*a)
    monkeypatch.setattr(engine, "_cosine", stop_after_two)
    out = tmp_path / "run"
    args = ["--dataset", "folder", "--data-root", root, "--output-dir", str(out), "--arch", "resnet18",
            "--image-size", "32", "--batch-size", "8", "--epochs", "2", "--warmup-epochs", "1", "--queue-size", "32",
            "--bank-size", "16", "--decoder-width", "16", "--workers", "0", "--stage", "ssl"]
    assert train.main([*args[:-2], "--stage", "warmup"]) == 0
    train.main(args)  # stopped by the signal
    ckpt = checkpoint.load(str(out / "last.pt"))
    assert ckpt["step"] == 3 and torch.is_tensor(ckpt["optimizer"]["param_groups"][0]["lr"])
    monkeypatch.setattr(engine, "_cosine", cosine)
    assert train.main(["--resume", "auto", "--output-dir", str(out)]) == 0
    assert len(calls) == 6 and checkpoint.load(str(out / "last.pt"))["step"] == 6  # 2 epochs of 3
    logged = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["lr"] for r in logged if r.get("stage") == "ssl"] and all(
        isinstance(r["lr"], float) for r in logged if r.get("stage") == "ssl")
