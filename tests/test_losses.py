"""Losses of METHOD.md against independent float64 formulas, and the Grad-CAM score (Eq. 3)."""
import math

import torch
import torch.nn.functional as F

from fastsynth import losses
from fastsynth.methods import MoCoV2, SimSiam, SynthPairs


def test_nt_xent_matches_loop():
    """Eq. 7: every one of the 2B anchors, its positive, the 2B - 2 others as negatives."""
    g = torch.Generator().manual_seed(1)
    a = F.normalize(torch.randn(5, 9, generator=g), dim=1)
    b = F.normalize(torch.randn(5, 9, generator=g), dim=1)
    tau = 0.3
    e = torch.cat([a, b]).double()
    n2, total = 10, 0.0
    for i in range(n2):
        pos = (i + 5) % n2
        denom = sum(math.exp(float(e[i] @ e[j]) / tau) for j in range(n2) if j != i)
        total += -(float(e[i] @ e[pos]) / tau - math.log(denom))
    assert abs(losses.nt_xent(a, b, tau).item() - total / n2) < 1e-5


def test_simsiam_loss_formula_and_stop_gradient():
    g = torch.Generator().manual_seed(2)
    p1, p2, z1, z2 = (torch.randn(6, 4, generator=g, requires_grad=True) for _ in range(4))
    d1, d2, e1, e2 = (t.detach().double() for t in (p1, p2, z1, z2))
    expected = -0.5 * (sum(float(F.cosine_similarity(d1[i:i+1], e2[i:i+1])) for i in range(6)) / 6
                       + sum(float(F.cosine_similarity(d2[i:i+1], e1[i:i+1])) for i in range(6)) / 6)
    loss = losses.simsiam_loss(p1, p2, z1, z2)
    assert abs(loss.item() - expected) < 1e-6
    loss.backward()
    assert z1.grad is None and z2.grad is None and p1.grad is not None


def test_reconstruction_total_and_variance_normalisation():
    x, y = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert abs(losses.reconstruction_loss(x, y).item() - float(((x - y) ** 2).double().mean())) < 1e-6
    assert losses.total_loss(torch.tensor(1.0), 2.0, 3.0, alpha=0.5, nu=0.25).item() == 2.75
    v = torch.tensor([3.0, 4.0])
    torch.testing.assert_close(losses.normalized_variance(v), torch.tensor([0.6, 0.8]))
    assert torch.equal(losses.normalized_variance(torch.zeros(3)), torch.zeros(3))


def _moco(**kw):
    torch.manual_seed(0)
    return MoCoV2(arch="resnet18", dim=16, queue_size=32, tau=0.2, **kw)


def test_gradcam_scores_equal_autograd_gradient_times_activation():
    """Eq. 3 computed by SynthPairs equals ReLU(-z * dL/dz) from a plain autograd pass over the
    full graph, and computing it leaves no gradient anywhere in the model."""
    moco = _moco()
    synth = SynthPairs(moco.feat_dim, 32, bank_size=16)
    z = torch.rand(4, moco.feat_dim) * 2
    ctx = {"k": F.normalize(torch.randn(4, 16), dim=1)}
    s = synth.scores(moco, z, ctx)
    assert all(p.grad is None for p in moco.parameters())

    zz = z.clone().requires_grad_(True)
    q = F.normalize(moco.head(zz), dim=1)
    l_pos = (q * ctx["k"]).sum(1, keepdim=True)
    logits = torch.cat([l_pos, q @ moco.queue.t()], 1) / 0.2
    F.cross_entropy(logits, torch.zeros(4, dtype=torch.long)).backward()
    torch.testing.assert_close(s, F.relu(-z * zz.grad))
    assert (s > 0).any()  # the check would be empty if every score were clipped
    synth_grad = SynthPairs(moco.feat_dim, 32, score="grad", bank_size=16)
    torch.testing.assert_close(synth_grad.scores(moco, z, ctx), F.relu(-zz.grad))


def test_simsiam_score_runs_through_head_only():
    torch.manual_seed(0)
    ss = SimSiam(arch="resnet18", dim=32)
    synth = SynthPairs(ss.feat_dim, 32, bank_size=16)
    z = torch.rand(4, ss.feat_dim)
    target = torch.randn(4, 32)
    stats = {k: v.clone() for k, v in ss.state_dict().items() if "running" in k}
    s = synth.scores(ss, z, {"target": target})
    assert all(p.grad is None for p in ss.parameters())          # no gradient leaks into weights
    assert all(torch.equal(v, ss.state_dict()[k]) for k, v in stats.items())  # nor into BN stats
    zz = z.clone().requires_grad_(True)
    (-F.cosine_similarity(ss.predictor(ss.head(zz)), target, dim=1).mean()).backward()
    torch.testing.assert_close(s, F.relu(-z * zz.grad))
    assert (s > 0).any()
