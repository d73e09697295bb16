"""Method state (queue, momentum copy) and a few optimizer steps lowering the Eq. 8 loss."""
import copy

import pytest
import torch
import torch.nn.functional as F

from fastsynth.config import Config
from fastsynth.methods import MoCoV2
from fastsynth.model import SynthSSL
from fastsynth.models import momentum_update


def test_queue_is_fifo():
    torch.manual_seed(0)
    moco = MoCoV2(arch="resnet18", dim=4, queue_size=10)
    batches = [F.normalize(torch.randn(4, 4), dim=1) for _ in range(4)]  # 16 keys through 10 slots
    for b in batches:
        moco.enqueue(b)
    newest = torch.cat(batches)[-10:]                  # the 10 newest keys survive
    order = [(6 + i) % 10 for i in range(10)]          # ptr = 16 % 10 = 6: oldest slot first
    assert torch.equal(moco.queue[order], newest)
    assert int(moco.queue_ptr) == 6


def test_momentum_update_moves_key_encoder_after_an_applied_step_only():
    """MoCo's momentum update, made in after_step: k <- 0.9 k + 0.1 q; with the device flag
    False (a skipped step) the key encoder stays exactly as it was; keys() itself moves nothing."""
    torch.manual_seed(0)
    moco = MoCoV2(arch="resnet18", dim=4, queue_size=8, momentum=0.9)
    w_q = moco.head.net[0].weight
    with torch.no_grad():
        w_q.add_(1.0)
    before = moco.key_head.net[0].weight.clone()
    ctx = {"k": moco.keys(torch.randn(2, 3, 32, 32))}
    assert torch.equal(moco.key_head.net[0].weight, before)
    moco.after_step(ctx, torch.tensor(False))
    assert torch.equal(moco.key_head.net[0].weight, before)
    moco.after_step(ctx, torch.tensor(True))
    torch.testing.assert_close(moco.key_head.net[0].weight, 0.9 * before + 0.1 * w_q.detach())
    moco.after_step(ctx)                                   # host-checked step: no flag
    torch.testing.assert_close(moco.key_head.net[0].weight,
                               0.81 * before + 0.19 * w_q.detach())
    assert not moco.key_head.net[0].weight.requires_grad


def test_momentum_update_at_step_end_gives_mocos_keys():
    """Moving the update from the start of a step (MoCo's order) to the end of the previous one
    leaves every step's keys the same: three steps of SGD against MoCo's order written out."""
    torch.manual_seed(0)
    moco = MoCoV2(arch="resnet18", dim=4, queue_size=8, momentum=0.5)
    ref = copy.deepcopy(moco)
    xs = [torch.randn(2, 3, 32, 32) for _ in range(3)]
    keys = {}
    for name, m in (("ours", moco), ("moco", ref)):
        opt = torch.optim.SGD(list(m.encoder.parameters()) + list(m.head.parameters()), lr=0.5)
        m.train()
        keys[name] = []
        for x in xs:
            if name == "moco":  # MoCo's order: the momentum update first, then the keys
                momentum_update(m.encoder, m.key_encoder, m.m)
                momentum_update(m.head, m.key_head, m.m)
            k = m.keys(x)
            keys[name].append(k)
            loss = -(m.project(m.encoder(x)) * k).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if name == "ours":
                m.after_step({"k": k})
    for a, b in zip(keys["ours"], keys["moco"]):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(keys["ours"][1], keys["ours"][2])  # the key encoder did move


def _tiny_cfg(**kw):
    base = dict(arch="resnet18", image_size=32, batch_size=8, queue_size=64, bank_size=32, moco_dim=16,
                simsiam_dim=64, decoder_width=32, sigma_g=0.5, sigma_v=0.5, moco_momentum=0.99)
    return Config(**{**base, **kw}).validate()


@pytest.mark.parametrize("method,noise", [("mocov2", "both"), ("simsiam", "both"), ("mocov2", "random"),
                                          ("mocov2", "lowvar"), ("mocov2", "gradcam")])
def test_a_few_steps_lower_total_loss(method, noise):
    """With inputs, queue and noise seed held fixed, SGD steps on Eq. 8 lower it."""
    torch.manual_seed(0)
    cfg = _tiny_cfg(method=method, noise=noise)
    model = SynthSSL(cfg)
    g = torch.Generator().manual_seed(1)
    x1, x2, x = (torch.randn(8, 3, 32, 32, generator=g) for _ in range(3))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.02, momentum=0.9)

    def loss_now():
        state = {k: v.clone() for k, v in model.synth.bank.state_dict().items()}
        loss, parts, ctx, out = model(x1, x2, x, seed=7)
        model.synth.bank.load_state_dict(state)  # same bank contents at every evaluation
        return loss, parts

    first, parts = loss_now()
    assert set(parts) == {"l_c", "l_r", "l_cp"} and all(torch.isfinite(v) for v in parts.values())
    for _ in range(6):
        loss, _ = loss_now()
        opt.zero_grad()
        loss.backward()
        opt.step()
    last, _ = loss_now()
    assert last.item() < first.item() - 1e-3, (first.item(), last.item())


def test_step_with_triton_kernels_matches_reference(monkeypatch):
    """The model's step on the Triton kernels (GPU, or the interpreter here): the same L_C, L_R,
    dL_C/d(encoder) and bank state as the reference path; L_Cp differs only through the noise
    stream (Philox instead of torch.Generator), so it is checked finite."""
    from kernelcase import KERNEL_DEVICE
    if KERNEL_DEVICE.type == "cuda":  # the same conv algorithms, no TF32, in both runs
        monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    g = torch.Generator().manual_seed(1)
    x1, x2, x = (torch.randn(8, 3, 32, 32, generator=g).to(KERNEL_DEVICE) for _ in range(3))
    runs = {}
    for impl in ("torch", "triton"):
        torch.manual_seed(0)
        model = SynthSSL(_tiny_cfg(), kernel_impl=impl).to(KERNEL_DEVICE)
        loss, parts, _, _ = model(x1, x2, x, seed=3)
        enc = [p for p in model.encoder.parameters() if p.requires_grad]
        grads = torch.autograd.grad(parts["l_c"], enc)
        runs[impl] = (parts, grads, model.synth.bank.variance(), model.synth.bank.bank.clone())
    (p_ref, g_ref, v_ref, b_ref), (p_tri, g_tri, v_tri, b_tri) = runs["torch"], runs["triton"]
    torch.testing.assert_close(p_tri["l_c"], p_ref["l_c"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p_tri["l_r"], p_ref["l_r"], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(p_tri["l_cp"])
    for a, b in zip(g_tri, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(b_tri, b_ref)
    torch.testing.assert_close(v_tri, v_ref, rtol=1e-5, atol=1e-7)


def test_full_step_with_triton_kernels_and_no_noise_matches_reference(monkeypatch):
    """The whole training step with all three Triton kernels in it, optimizer and queue update
    included, against the same step on their references: every loss term, every gradient and
    all the state the step leaves (weights, queue, bank, BatchNorm statistics). The test above
    covers the noise draw; this one covers what the step does around the kernels (Eq. 3's
    gradient through info_nce inside the forward, the bank fed before its variance is read,
    Eq. 4-6 fed the scores, Eq. 7 and the backward through all of it). Noise scales are 0, so
    z_tilde = z on both paths and their different generators do not matter."""
    from kernelcase import KERNEL_DEVICE

    from fastsynth import fast
    from fastsynth.engine import precision, ssl_step
    if KERNEL_DEVICE.type == "cuda":  # the same conv algorithms, no TF32, in both runs
        monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cfg = _tiny_cfg(impl="fast", loader="torch", sigma_g=0.0, sigma_v=0.0)
    g = torch.Generator().manual_seed(1)
    # Colour and contrast differ per image: i.i.d. noise images map to nearly equal features at
    # initialisation, and BatchNorm over those divides by variances near 0 (amplified rounding).
    batch = tuple((torch.randn(8, 3, 32, 32, generator=g) * (torch.rand(8, 3, 1, 1, generator=g) * 1.5 + 0.5)
                   + torch.rand(8, 3, 1, 1, generator=g) * 2 - 1).to(KERNEL_DEVICE) for _ in range(3))
    runs = {}
    for impl in ("torch", "triton"):
        torch.manual_seed(0)
        model = SynthSSL(cfg, kernel_impl=impl).to(KERNEL_DEVICE).train()
        opt, dec_opt = fast.optimizers(model, cfg, fast.Plan("fast", "torch", False, False, False))
        autocast, _ = precision(cfg, KERNEL_DEVICE)
        good, _, parts, _, _ = ssl_step(model, model, opt, dec_opt, None, autocast, batch, 3, lambda loss: True)
        assert good
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        runs[impl] = (parts, grads, {n: t.clone() for n, t in model.state_dict().items()})
    (p_ref, g_ref, s_ref), (p_tri, g_tri, s_tri) = runs["torch"], runs["triton"]
    assert set(p_tri) == set(p_ref) == {"l_c", "l_r", "l_cp"}
    for k in p_ref:
        torch.testing.assert_close(p_tri[k], p_ref[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    # Gradients per tensor, normwise: rounding-level differences (summation order in info_nce)
    # reach 0.2 % on 5 of the first conv's 9408 elements (2e-6 absolute), while every tensor
    # agrees to ~1e-6 normwise (measured); info_nce's gradient off by 1 % gives 8e-3 here.
    assert set(g_tri) == set(g_ref) and len(g_ref) > 60
    for n in g_ref:
        dev = ((g_tri[n] - g_ref[n]).norm() / g_ref[n].norm()).item()
        assert dev < 1e-4, (n, dev)
    assert set(s_tri) == set(s_ref)
    for n in s_ref:
        torch.testing.assert_close(s_tri[n], s_ref[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_impl_flag_picks_kernel_impl():
    """--impl reference keeps every op on the PyTorch reference; --impl fast lets each op pick
    Triton for CUDA tensors (auto)."""
    ref, fast = SynthSSL(_tiny_cfg(impl="reference")), SynthSSL(_tiny_cfg(impl="fast"))
    assert ref.method.kernel_impl == ref.synth.kernel_impl == ref.synth.bank.impl == "torch"
    assert fast.method.kernel_impl == fast.synth.kernel_impl == fast.synth.bank.impl == "auto"


def test_synth_off_and_noise_none():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    off = SynthSSL(_tiny_cfg(synth="off"))
    loss, parts, _, out = off(x, x, None, seed=0)
    assert off.synth is None and set(parts) == {"l_c"} and out is None
    none = SynthSSL(_tiny_cfg(noise="none", nu=0.0))
    loss, parts, _, out = none(x, x, x, seed=0)
    assert out["x_tilde"] is None and parts["l_cp"].item() == 0
    torch.testing.assert_close(loss, parts["l_c"] + parts["l_r"])


def test_gradient_paths_of_eq8():
    """L_R reaches encoder and decoder; L_Cp reaches the encoder but not the decoder, whose
    outputs x_hat and x_tilde enter Eq. 7 detached (Sec. 3.5)."""
    torch.manual_seed(0)
    model = SynthSSL(_tiny_cfg())
    x = torch.randn(8, 3, 32, 32)
    _, parts, ctx, out = model(x, x, x, seed=0)
    assert not out["x_hat"].requires_grad and not out["x_tilde"].requires_grad
    dec = list(model.synth.decoder.parameters())
    enc = list(model.encoder.parameters())
    g_cp = torch.autograd.grad(parts["l_cp"], dec + enc, allow_unused=True)
    assert all(g is None for g in g_cp[:len(dec)])
    assert any(g is not None and g.abs().sum() > 0 for g in g_cp[len(dec):])
    g_r = torch.autograd.grad(parts["l_r"], dec + enc, allow_unused=True)
    assert all(g is not None for g in g_r[:len(dec)])
    assert any(g is not None and g.abs().sum() > 0 for g in g_r[len(dec):])


def test_cosine_schedule_keeps_simsiam_predictor_lr():
    from fastsynth.engine import _cosine
    from fastsynth.methods import SimSiam
    torch.manual_seed(0)
    ss = SimSiam(arch="resnet18", dim=32)
    opt = torch.optim.SGD(ss.param_groups(0.1, 1e-4), lr=0.1)
    _cosine(opt, 0.1, step=5, total=10)
    assert abs(opt.param_groups[0]["lr"] - 0.05) < 1e-12 and opt.param_groups[1]["lr"] == 0.1


def test_config_method_defaults_and_noise_none():
    from fastsynth.config import from_args
    assert from_args([]).lr == 0.06 and from_args(["--method", "simsiam"]).lr == 0.05
    assert from_args(["--method", "simsiam", "--lr", "0.2"]).lr == 0.2
    assert from_args(["--noise", "none"]).nu == 0.0 and from_args(["--noise", "none", "--nu", "0.3"]).nu == 0.3


def test_warmup_targets_cover_every_image_each_in_a_full_batch(tmp_path):
    """The decoder warm-up's cached targets: 10 images at batch 4 give 10 targets (the last,
    partial batch of 2 filled up with 2 images of the first), and the encoder saw every image
    in a batch of 4: with a batch-dependent encoder, the last two features are those of the
    padded batch."""
    from PIL import Image

    from fastsynth.data.base import ImageList, Splits
    from fastsynth.engine import _frozen_features

    paths = []
    for i in range(10):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (40, 40), (25 * i, 255 - 25 * i, 7 * i)).save(paths[-1])

    class Centred(torch.nn.Module):  # batch statistics, as BatchNorm in train mode
        def forward(self, x):
            f = x.mean(dim=(2, 3))
            return f - f.mean(dim=0)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = Centred()

    images = ImageList(paths, [0] * 10)
    cfg = Config(image_size=32, batch_size=4, workers=0).validate()
    feats, cached = _frozen_features(Model(), Splits(images, images), cfg, torch.device("cpu"))
    assert feats.shape == (10, 3) and cached.shape == (10, 3, 32, 32)
    means = sorted(cached.float().mean(dim=(1, 2, 3)).tolist())
    assert len({round(m, 3) for m in means}) == 10  # every image once
    padded = torch.cat([cached[8:], cached[:2]]).float()
    torch.testing.assert_close(feats[8:], Centred()(padded)[:2], rtol=0, atol=2e-3)
    assert not torch.allclose(feats[8:], Centred()(cached[8:].float()), atol=1e-2)  # not the batch of 2


@pytest.mark.parametrize("method", ["mocov2", "simsiam"])
def test_gradcam_pass_moves_no_running_statistics(method):
    """The Grad-CAM score pass runs the method's score_nets in train mode with their BatchNorm
    statistics frozen (SimSiam's projector and predictor have BatchNorm; MoCo's head has none):
    every running mean and variance of the model is the same after it, and the momenta are back."""
    from fastsynth.models import frozen_bn_stats
    torch.manual_seed(0)
    cfg = Config(arch="resnet18", image_size=32, batch_size=4, queue_size=16, method=method, moco_dim=8,
                 simsiam_dim=16, decoder_width=8, bank_size=8)
    model = SynthSSL(cfg).train()
    m = model.method
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    _, ctx = m.ssl_loss(x1, x2)
    bns = [mod for net in m.score_nets for mod in net.modules() if isinstance(mod, torch.nn.BatchNorm1d)]
    assert bool(bns) is (method == "simsiam")
    # running_mean/var (what evaluation uses); num_batches_tracked counts every train-mode forward
    # and is read only by BatchNorm without a momentum
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    s = model.synth.scores(m, torch.randn(4, m.feat_dim), ctx)
    assert s.shape == (4, m.feat_dim) and torch.isfinite(s).all()
    after = model.state_dict()
    assert [k for k, v in before.items() if not torch.equal(after[k], v)] == []
    assert all(b.momentum == 0.1 for b in bns)
    if bns:  # and without the freeze the same pass would have moved them: the check has power
        with torch.enable_grad():
            m.score_loss(torch.randn(4, m.feat_dim).requires_grad_(True), ctx)
        assert not torch.equal(bns[0].running_mean, before[next(k for k in before if "running_mean" in k
                                                                and "head" in k)])
    with frozen_bn_stats(*m.score_nets):
        assert all(b.momentum == 0.0 for b in bns)


def test_running_stats_follow_replaced_buffers():
    """RunningStats keeps flat views of the BatchNorm buffers between steps; a buffer replaced
    since (.to(), assignment) must be the one restored after a skipped step, not the old one."""
    from fastsynth.guard import RunningStats
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.BatchNorm1d(5), torch.nn.BatchNorm1d(5)).train()
    stats = RunningStats(net)
    stats.keep(torch.tensor(False), stats.save())           # builds the cached views
    net.to(torch.float64)                                   # every buffer replaced, float64 now
    net[2].running_var = torch.full((5,), 3.0, dtype=torch.float64)
    live = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}
    saved = stats.save()
    net(torch.randn(8, 3, dtype=torch.float64))             # a forward moves the statistics
    assert not torch.equal(net[2].running_var, live["2.running_var"])
    stats.keep(torch.tensor(False), saved)                  # a skipped step: put them back
    for k, v in live.items():
        assert torch.equal(net.state_dict()[k], v), k
    net(torch.randn(8, 3, dtype=torch.float64))
    moved = net[1].running_mean.clone()
    stats.keep(torch.tensor(True), stats.save())            # an applied step keeps what moved
    assert torch.equal(net[1].running_mean, moved)
