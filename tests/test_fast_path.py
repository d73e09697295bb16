"""The fast path's switches (issue 4): plan resolution, channels-last, compile, optimizers, DALI
in the training command, and no graph breaks where the Triton kernels sit in the step."""
import warnings

import pytest
import torch

from fastsynth import fast
from fastsynth.config import Config, ConfigError
from fastsynth.engine import precision, ssl_step
from fastsynth.kernels import dual_noise
from fastsynth.model import SynthSSL
from stepcase import built
from tinydata import tiny_folder

CPU = torch.device("cpu")


def _cfg(**kw):
    base = dict(arch="resnet18", image_size=32, batch_size=4, queue_size=16, bank_size=8, moco_dim=8,
                decoder_width=16, sigma_g=0.5, sigma_v=0.5)
    return Config(**{**base, **kw}).validate()


def test_plan_follows_impl_and_flags(monkeypatch):
    ref = fast.resolve(_cfg(), CPU)  # --impl auto on a CPU: the reference path
    assert (ref.impl, ref.loader, ref.channels_last, ref.compile, ref.fused) == ("reference", "torch", False, False, False)
    f = fast.resolve(_cfg(impl="fast"), CPU)
    # On a CPU compile stays off unless asked for (no faster there, minutes to compile); fused needs CUDA.
    assert (f.impl, f.channels_last, f.compile, f.fused) == ("fast", True, False, False)
    assert fast.resolve(_cfg(impl="fast", compile=True), CPU).compile
    f = fast.resolve(_cfg(impl="fast", compile=False, channels_last=False, loader="torch"), CPU)
    assert (f.compile, f.channels_last, f.loader) == (False, False, "torch")
    assert fast.resolve(_cfg(impl="reference", compile=True), CPU).compile  # a flag beats the impl


def test_cudnn_benchmark_on_the_fast_path_on_a_gpu_only():
    gpu = torch.device("cuda")  # resolve only reads the device's type: no GPU needed
    assert fast.resolve(_cfg(impl="fast", loader="torch"), gpu).cudnn_benchmark
    assert not fast.resolve(_cfg(impl="reference"), gpu).cudnn_benchmark  # PyTorch's default
    assert not fast.resolve(_cfg(impl="fast", loader="torch", deterministic=True), gpu).cudnn_benchmark
    assert not fast.resolve(_cfg(impl="fast", loader="torch"), CPU).cudnn_benchmark
    saved = torch.backends.cudnn.benchmark
    model = torch.nn.Conv2d(3, 4, 3)
    try:
        for on in (True, False):  # prepare applies the plan's choice, whatever was set before
            torch.backends.cudnn.benchmark = not on
            fast.prepare(model, fast.Plan("fast", "torch", False, False, False, cudnn_benchmark=on))
            assert torch.backends.cudnn.benchmark is on
    finally:
        torch.backends.cudnn.benchmark = saved


def test_loader_choice_without_dali(monkeypatch):
    from fastsynth.data import dali
    monkeypatch.setattr(dali, "dali_available", lambda: False)
    monkeypatch.setattr(dali, "_warned_auto", False)

    def missing():
        raise dali.DaliUnavailableError("--loader dali needs NVIDIA DALI, which does not import")
    monkeypatch.setattr(dali, "require_dali", missing)
    with pytest.warns(UserWarning, match="torchvision loader"):
        assert fast.resolve(_cfg(impl="fast"), CPU).loader == "torch"
    with pytest.raises(ConfigError, match="needs NVIDIA DALI"):
        fast.resolve(_cfg(loader="dali"), CPU)


def test_apex_absent_is_a_clear_error():
    try:
        import apex  # noqa: F401
        pytest.skip("apex is installed here")
    except ImportError:
        pass
    cfg = _cfg(optimizer="apex-lars")
    with pytest.raises(ConfigError, match="needs NVIDIA apex"):
        fast.optimizers(SynthSSL(cfg), cfg, fast.resolve(cfg, CPU))


def _batch(fmt=torch.contiguous_format):
    """Images that differ in colour and contrast, not only in noise: at initialisation a ResNet
    maps i.i.d. noise images to nearly the same features, the decoder then draws nearly the same
    image for each, and BatchNorm over such a batch (1 x 1 spatial in layer4 at 32 px) divides by
    a variance near 0, so rounding differences between two equivalent computations blow up."""
    g = torch.Generator().manual_seed(1)

    def images():
        scale = torch.rand(4, 3, 1, 1, generator=g) * 1.5 + 0.5
        shift = torch.rand(4, 3, 1, 1, generator=g) * 2 - 1
        return (torch.randn(4, 3, 32, 32, generator=g) * scale + shift).contiguous(memory_format=fmt)
    return tuple(images() for _ in range(3))


def _one_step(model, cfg, plan, batch):
    opt, dec_opt = fast.optimizers(model, cfg, plan)
    autocast, scaler = precision(cfg, CPU)
    model.train()
    good, loss, parts, _, _ = ssl_step(model, model, opt, dec_opt, scaler, autocast, batch, 7, lambda loss: True)
    assert good
    return {k: v.detach() for k, v in parts.items()}, {n: p.grad.clone() for n, p in model.named_parameters()
                                                       if p.grad is not None}


def _flat(grads: dict) -> torch.Tensor:
    return torch.cat([grads[n].flatten() for n in sorted(grads)])


def test_channels_last_and_compiled_networks_match_eager():
    """A step with channels-last weights and inputs, and with the heads and decoder compiled
    (the ResNet trunk stays eager here: compiling it forward+backward takes ~3 min on this CPU;
    the GPU script compiles everything), equals the eager contiguous step to rounding.

    Loss terms: to 1e-4. Gradients: at initialisation the step is ill-conditioned (the encoder
    maps the batch to nearly equal features, so the decoder's and the Eq. 7 pass's BatchNorm
    layers divide by variances near 0): scaling the inputs by 1 + 1e-6 moves the reference's own
    gradient by ~1-2 % (normwise). The fast step must stay within a few times that rounding-level
    sensitivity; a layout or compile bug moves gradients by O(1).
    """
    cfg = _cfg(impl="fast", loader="torch")
    ref_plan = fast.Plan("reference", "torch", False, False, False)
    plan = fast.Plan("fast", "torch", True, False, False)

    def run(p, batch, compiled=False):
        torch.manual_seed(0)
        model = SynthSSL(cfg)
        fast.prepare(model, p)
        if compiled:
            assert model.method.encoder.net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
            for net in (model.method.head, model.method.key_head, model.synth.decoder):
                net.compile()
        return model, *_one_step(model, cfg, p, batch)

    ref_model, parts_ref, grads_ref = run(ref_plan, _batch())
    _, _, grads_pert = run(ref_plan, tuple(t * (1 + 1e-6) for t in _batch()))
    model, parts, grads = run(plan, _batch(torch.channels_last), compiled=True)
    for k in parts_ref:
        torch.testing.assert_close(parts[k], parts_ref[k], rtol=1e-4, atol=1e-5)
    assert set(grads) == set(grads_ref) and len(grads) > 60
    g_ref = _flat(grads_ref)
    sensitivity = (_flat(grads_pert) - g_ref).norm() / g_ref.norm()
    deviation = (_flat(grads) - g_ref).norm() / g_ref.norm()
    assert sensitivity < 0.05  # the premise: rounding-level input changes stay small
    assert deviation < 3 * sensitivity + 1e-5, (deviation.item(), sensitivity.item())
    assert set(model.state_dict()) == set(ref_model.state_dict())  # compile in place: same checkpoint keys


def test_prepare_compiles_every_network_in_place(monkeypatch):
    cfg = _cfg(impl="fast", loader="torch")
    model = SynthSSL(cfg)
    keys = set(model.state_dict())
    calls = []
    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append(kw) or compile_(self, **kw))
    fast.prepare(model, fast.resolve(_cfg(impl="fast", loader="torch", compile=True), CPU))
    nets = fast.networks(model)
    assert len(nets) == 5 and all(n._compiled_call_impl is not None for n in nets)
    assert calls == [{"mode": None, "dynamic": False}] * 5  # static shapes: one graph per batch size
    assert set(model.state_dict()) == keys


@pytest.mark.parametrize("mode,marks", [("reduce-overhead", 2), ("default", 0)])
def test_cuda_graph_mode_marks_each_step_begin(monkeypatch, mode, marks):
    """Under reduce-overhead each step tells CUDA graph trees where an iteration begins (a step
    is not one forward then one backward); other modes never call it. Compiling itself is
    stubbed: what is checked is the step's call, once per step."""
    cfg = _cfg(impl="fast", loader="torch", compile=True)
    model = SynthSSL(cfg)
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: None)
    calls = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: calls.append(1))
    plan = fast.resolve(cfg, CPU)
    fast.prepare(model, plan, mode)
    for _ in range(2):
        _one_step(model, cfg, plan, _batch())
    assert len(calls) == marks


def _explain(fn, *args):
    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args)


def test_hot_path_traces_without_graph_breaks():
    """The pieces between the networks, with the Triton kernels (interpreter here), trace as one
    graph each: Eq. 1 with the key encoder and queue, Eq. 7, the bank update and Eq. 4-6."""
    cfg = _cfg(impl="fast")
    model = SynthSSL(cfg, kernel_impl="triton")
    model.train()
    x1, x2, x = _batch()
    ex = _explain(model.method.ssl_loss, x1, x2)
    assert ex.graph_break_count == 0, ex.break_reasons
    ex = _explain(model.method.pair_loss, x, x.flip(0))
    assert ex.graph_break_count == 0, ex.break_reasons
    z = model.method.encoder(x).detach()
    ex = _explain(model.synth.bank.update, z)
    assert ex.graph_break_count == 0, ex.break_reasons

    def noise(z, s, v):
        return dual_noise(z, s, v, 0.5, 0.5, 0.02, 3, impl="triton")
    ex = _explain(noise, z, torch.rand_like(z), torch.rand(z.shape[1]))
    assert ex.graph_break_count == 0, ex.break_reasons


@pytest.mark.slow
def test_train_command_with_dali_and_channels_last(tmp_path):
    pytest.importorskip("nvidia.dali")
    from fastsynth import train
    root = tiny_folder(tmp_path / "data")
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no silent fallback to the torch loader
        rc = train.main(["--dataset", "folder", "--data-root", root, "--output-dir", str(out), "--impl", "fast",
                         "--no-compile", "--loader", "dali", "--arch", "resnet18", "--image-size", "32",
                         "--batch-size", "8", "--epochs", "2", "--warmup-epochs", "1", "--queue-size", "32",
                         "--bank-size", "16", "--decoder-width", "16", "--probe-epochs", "2",
                         "--probe-fractions", "1.0", "--device", "cpu"])
    assert rc == 0
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == 2 * (24 // 8) and ckpt["config"]["loader"] == "dali"


def test_deferred_finite_check_skips_on_device():
    """Fused optimizers (CUDA; CPU too in this torch) skip a non-finite step from a device flag,
    with no host synchronisation; the host-checked path skips it too. Either way weights,
    optimizer state, the key encoder, BatchNorm running statistics, the queue and its pointer
    stay exactly as they were (only the bank keeps the batch), and a finite step on the device
    equals the host-checked step."""
    from fastsynth.guard import finite_flag
    cfg = _cfg(impl="fast", loader="torch", nu=0.0)
    fused = fast.Plan("fast", "torch", False, False, True)
    runs = {}
    for name, plan in (("host", fast.Plan("fast", "torch", False, False, False)), ("device", fused)):
        model, opt, dec_opt, autocast, params = built(cfg, plan)
        assert opt.param_groups[0]["fused"] is (True if plan.fused else None)

        def finite(loss):
            return finite_flag(loss, params) if plan.fused else bool(finite_flag(loss, params))
        good, *_ = ssl_step(model, model, opt, dec_opt, None, autocast, _batch(), 7, finite)
        assert bool(good)
        runs[name] = before = {n: t.clone() for n, t in model.state_dict().items()}
        state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
        x1, x2, x = _batch()
        x1[0, 0, 0, 0] = float("nan")
        good, *_ = ssl_step(model, model, opt, dec_opt, None, autocast, (x1, x2, x), 8, finite)
        assert isinstance(good, torch.Tensor) is plan.fused and not bool(good)
        after = model.state_dict()
        moved = {n for n in before if not torch.equal(after[n], before[n])}
        assert moved == {"synth.bank.bank", "synth.bank.count", "synth.bank.mean", "synth.bank.m2",
                         "synth.bank.var"}, moved
        assert torch.isfinite(after["synth.bank.var"]).all()
        for p, s in opt.state.items():
            for k, v in s.items():
                assert torch.equal(v, state[id(p)][k]), k
    for n in runs["host"]:
        torch.testing.assert_close(runs["device"][n], runs["host"][n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_skipped_first_fused_step_leaves_clean_momentum():
    """Fused SGD allocates its momentum buffers uninitialised and fills them on the first step;
    a first step skipped on the device must not leave them so: a skipped step followed by a good
    one equals the good step alone."""
    from fastsynth.guard import finite_flag
    cfg = _cfg(impl="fast", loader="torch", nu=0.0)
    fused = fast.Plan("fast", "torch", False, False, True)
    out = []
    for skip_first in (False, True):
        model, opt, dec_opt, autocast, params = built(cfg, fused)
        if skip_first:
            x1, x2, x = _batch()
            x1[0, 0, 0, 0] = float("nan")
            with torch.no_grad():
                state = {k: v.clone() for k, v in model.state_dict().items()}
            good, *_ = ssl_step(model, model, opt, dec_opt, None, autocast, (x1, x2, x), 7,
                                lambda loss: finite_flag(loss, params))
            assert not bool(good)
            model.load_state_dict(state)  # undo the forward-time state (BN statistics, key encoder, bank)
        good, *_ = ssl_step(model, model, opt, dec_opt, None, autocast, _batch(), 7,
                            lambda loss: finite_flag(loss, params))
        assert bool(good)
        out.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for n in out[0]:
        torch.testing.assert_close(out[1][n], out[0][n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_evaluation_features_through_dali_match_torchvision(tmp_path):
    """The evaluation view through DALI (resize + centre crop, same files in order) gives the
    encoder nearly the same input as torchvision: features agree to a few per cent and every
    image keeps its label."""
    pytest.importorskip("nvidia.dali")
    from fastsynth.data.synthetic import synthetic
    from fastsynth.eval import extract_features
    from fastsynth.models import build_encoder
    splits = synthetic(root=str(tmp_path), num_classes=4, train_per_class=3, test_per_class=2, size=48)
    torch.manual_seed(0)
    enc = build_encoder("resnet18")
    cfg = _cfg(batch_size=5, workers=0)  # 12 images: the last batch is partial
    f_torch, y_torch = extract_features(enc, splits.train, cfg, CPU, loader="torch")
    f_dali, y_dali = extract_features(enc, splits.train, cfg, CPU, loader="dali")
    assert torch.equal(y_dali, y_torch) and f_dali.shape == f_torch.shape == (12, 512)
    rel = (f_dali - f_torch).norm(dim=1) / f_torch.norm(dim=1)
    assert rel.max() < 0.05, rel


def test_float16_steps_the_scaler_skips_leave_the_queue_alone():
    """GradScaler (float16) skips the first steps while its scale is too large; those steps
    must not enqueue keys either (the flag is read on the device, no host sync), nor step the
    decoder's optimizer alone or move BatchNorm statistics: only the bank keeps the batch."""
    cfg = _cfg(amp=True, amp_dtype="float16", loader="torch")
    torch.manual_seed(0)
    model = SynthSSL(cfg)
    plan = fast.resolve(cfg, CPU)
    opt, dec_opt = fast.optimizers(model, cfg, plan)
    autocast, scaler = precision(cfg, CPU)
    assert scaler is not None
    applied = []
    bank = {"synth.bank.bank", "synth.bank.count", "synth.bank.mean", "synth.bank.m2", "synth.bank.var"}
    for step in range(10):
        before = {n: t.clone() for n, t in model.state_dict().items()}
        good, *_ = ssl_step(model, model, opt, dec_opt, scaler, autocast, _batch(), step, lambda loss: True)
        applied.append(bool(good))
        moved = {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}
        if not applied[-1]:  # one decision for both optimizers: no weight of either moves
            assert moved <= bank and "synth.bank.count" in moved, (step, moved - bank)
        else:
            assert any(n.startswith("synth.decoder.") for n in moved) and any(n.startswith("method.encoder.") for n in moved)
    assert not all(applied) and any(applied), applied  # the starting scale 65536 overflows first
    assert int(model.method.queue_ptr) == sum(applied) * 4 % 16


@pytest.mark.parametrize("native", [False, True])
def test_amp_auto_on_cpu_follows_bfloat16_hardware(monkeypatch, capsys, native):
    """--amp with --amp-dtype auto: bfloat16 autocast only on a CPU with bfloat16 hardware, else
    float32 and a note; an explicit --amp-dtype bfloat16 is honoured either way."""
    from fastsynth import engine
    monkeypatch.setattr(engine, "cpu_has_bf16", lambda: native)
    monkeypatch.setattr(engine, "_SAID_FLOAT32", False)
    lin = torch.nn.Linear(4, 4)
    autocast, scaler = precision(_cfg(amp=True), CPU)
    with autocast():
        out = lin(torch.randn(2, 4))
    assert scaler is None
    assert out.dtype == (torch.bfloat16 if native else torch.float32)
    assert ("no bfloat16 hardware" in capsys.readouterr().out) is (not native)
    autocast, _ = precision(_cfg(amp=True, amp_dtype="bfloat16"), CPU)
    with autocast():
        assert lin(torch.randn(2, 4)).dtype == torch.bfloat16


@pytest.mark.parametrize("hardware", [False, True])
def test_amp_auto_on_gpu_uses_bfloat16_only_in_hardware(monkeypatch, hardware):
    """Emulated bfloat16 (V100, T4) is slow: --amp there means float16 with a GradScaler."""
    from fastsynth import engine
    asked = {}

    def probe(including_emulation=True):
        asked["emulation"] = including_emulation
        return hardware
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", probe)
    dtype = engine.autocast_dtype(_cfg(amp=True), torch.device("cuda"))
    assert asked == {"emulation": False}
    assert dtype == (torch.bfloat16 if hardware else torch.float16)


@pytest.mark.parametrize("name,index", [("auto", 0), ("cuda", 0), ("cuda:1", 1)])
def test_a_cuda_device_always_has_its_index(monkeypatch, name, index):
    """torch.cuda.set_device (profile, torchrun) rejects a bare "cuda": --device auto and cuda
    resolve to the current device's index. Checked without a GPU: set_device's own check of a
    bare "cuda" runs before CUDA is touched, so it shows here too."""
    from fastsynth.engine import resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    dev = resolve_device(name)
    assert dev == torch.device("cuda", index) and dev.index == index
    with pytest.raises(ValueError, match="specified index"):
        torch.cuda.set_device(torch.device("cuda"))
