"""info_nce (Eq. 1) against an independent float64 formula, forward and gradient, both impls.

The Triton path runs on the GPU when there is one and under TRITON_INTERPRET=1 otherwise
(tests/conftest.py); bfloat16 only on a GPU, since the interpreter mishandles it.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from kernelcase import HALF_DTYPES, KERNEL_DEVICE as KDEV
from fastsynth.kernels import info_nce, info_nce_reference

mod = importlib.import_module("fastsynth.kernels.info_nce")

# Per-dtype tolerances (loss, grad). The float64 formula sees the same (rounded) inputs, so the
# loss differs by float32 accumulation only: measured under 1e-7 relative for float16 on both
# impls (dropping one queue key moved it by 9e-4 at N 37, K 1023: the bound catches that). dL/dq is returned in
# the input dtype (half an ulp, 2^-11 for float16: measured up to 4.4e-4 of the scale) and the
# Triton path also rounds the softmax weights p to it for the tensor cores (FlashAttention's
# choice), about one more ulp.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-5, 2e-3), torch.bfloat16: (1e-4, 1e-2)}


def _inputs(n, k, c, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n, c, generator=g, dtype=torch.float64), dim=1)
    key = F.normalize(torch.randn(n, c, generator=g, dtype=torch.float64), dim=1)
    queue = F.normalize(torch.randn(k, c, generator=g, dtype=torch.float64), dim=1)
    return q.to(device, dtype), key.to(device, dtype), queue.to(device, dtype)


def _float64_loss_and_grad(q, k, queue, tau):
    """loss_i = log(exp(l_i0) + sum_j exp(l_ij)) - l_i0; dL/dq = (sum_j p_ij v_j - k_i) / (tau N)."""
    q, k, queue = (t.detach().cpu().double() for t in (q, k, queue))
    values = torch.cat([k[:, None, :], queue[None].expand(q.shape[0], -1, -1)], dim=1)  # N x (K+1) x C
    logits = torch.einsum("nc,njc->nj", q, values) / tau
    loss = (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
    p = torch.softmax(logits, dim=1)
    grad = (torch.einsum("nj,njc->nc", p, values) - k) / (tau * q.shape[0])
    return loss, grad


def _check_against_float64(q, key, queue, tau, impl, dtype):
    q = q.detach().requires_grad_(True)
    loss = info_nce(q, key, queue, tau=tau, impl=impl)
    loss.backward()
    ref_loss, ref_grad = _float64_loss_and_grad(q, key, queue, tau)
    tol_loss, tol_grad = TOL[dtype]
    assert loss.dtype == torch.float32 and q.grad.dtype == q.dtype
    assert torch.isfinite(q.grad).all()
    torch.testing.assert_close(loss.detach().cpu().double(), ref_loss, rtol=tol_loss, atol=tol_loss)
    # Gradient error relative to the size of its terms, k / (tau N) and the largest entry: dL/dq is
    # a difference E_p[key] - k that cancels where p sits on k, so entries near zero carry no
    # relative meaning.
    scale = max(ref_grad.abs().max().item(), key.detach().abs().max().item() / (tau * q.shape[0]))
    torch.testing.assert_close(q.grad.cpu().double() / scale, ref_grad / scale, rtol=0, atol=tol_grad)


@pytest.mark.parametrize("n,k,c", [(1, 1, 1), (37, 1023, 128), (8, 100, 257), (256, 4096, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_matches_float64(n, k, c, dtype):
    _check_against_float64(*_inputs(n, k, c, dtype, seed=n + k), tau=0.2, impl="torch", dtype=dtype)


# (64, 1024, 32): whole tiles in every split and C a power of two, the kernel's unmasked path.
@pytest.mark.parametrize("n,k,c", [(1, 1, 1), (37, 1023, 128), (5, 77, 19), (70, 300, 200), (17, 2000, 256),
                                   (64, 1024, 32)])
@pytest.mark.parametrize("dtype", [torch.float32] + HALF_DTYPES)
def test_triton_matches_float64(n, k, c, dtype, kdev, poison):
    _check_against_float64(*_inputs(n, k, c, dtype, seed=n + k, device=kdev), tau=0.2, impl="triton", dtype=dtype)


def test_triton_extreme_temperature_and_no_grad(kdev, poison):
    """Small tau makes logits of +-100: the online max must keep exp2 in range."""
    q, key, queue = _inputs(9, 500, 32, torch.float32, seed=3, device=kdev)
    _check_against_float64(q, key, queue, tau=0.01, impl="triton", dtype=torch.float32)
    with torch.no_grad():  # the forward-only kernel variant (no dL/dq accumulation)
        loss = info_nce(q, key, queue, 0.07, impl="triton")
    torch.testing.assert_close(loss.cpu().double(), _float64_loss_and_grad(q, key, queue, 0.07)[0],
                               rtol=1e-5, atol=1e-5)


def test_triton_logits_beyond_float32_exp_range(kdev, poison):
    """tau = 0.005 with key = q and -q, q in the queue: logits of +-200, whose exp overflows
    float32; every partial state and their merge must subtract a running max first."""
    q, _, queue = _inputs(6, 300, 16, torch.float32, seed=8, device=kdev)
    queue = torch.cat([queue, -q, q[:3]])
    _check_against_float64(q, q.clone(), queue, tau=0.005, impl="triton", dtype=torch.float32)


def test_triton_non_contiguous_inputs(kdev, poison):
    """Strided views (every other column; a transposed queue) read through their strides."""
    q2, key2, _ = _inputs(13, 1, 96, torch.float32, seed=4, device=kdev)
    queue_t = _inputs(1, 48, 211, torch.float32, seed=5, device=kdev)[2].t()  # 211 x 48, column-major
    q, key = q2[:, ::2], key2[:, ::2]                                           # 13 x 48, stride 2
    assert not q.is_contiguous() and not queue_t.is_contiguous()
    _check_against_float64(q, key, queue_t, tau=0.2, impl="triton", dtype=torch.float32)


def test_triton_multiple_splits(kdev, monkeypatch):
    """Force many queue splits (more partial states to merge) and compare with one split; then
    merge the 47 splits two at a time (24 tiles, the last half empty)."""
    q, key, queue = _inputs(20, 3000, 64, torch.float32, seed=6, device=kdev)
    grads = []
    for sms, merge_tile in ((1, 8192), (64, 8192), (64, 128)):
        monkeypatch.setattr(mod, "num_sms", lambda _dev, s=sms: s)
        monkeypatch.setitem(mod.TUNING, "merge_tile", merge_tile)
        qq = q.clone().requires_grad_(True)
        info_nce(qq, key, queue, 0.2, impl="triton").backward()
        grads.append(qq.grad)
        _check_against_float64(q, key, queue, 0.2, "triton", torch.float32)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[0], grads[2], rtol=1e-5, atol=1e-7)


def test_triton_batch_mean_in_the_merge(kdev, poison, monkeypatch):
    """The merge's last row writes the batch mean (no reduction kernel after it): equal to the
    mean of the float64 per-row losses, the same bits on a second run, and right again for a
    call of another size (the split kernel zeroes the completion count for each call). With
    16-row loads, N = 37 sums three blocks, the last one partly masked."""
    monkeypatch.setitem(mod.TUNING, "mean_block", 16)
    for n, k, c in ((37, 17, 8), (3, 50, 16), (37, 17, 8)):
        q, key, queue = _inputs(n, k, c, torch.float32, seed=n, device=kdev)
        first = info_nce(q, key, queue, 0.2, impl="triton")
        again = info_nce(q, key, queue, 0.2, impl="triton")
        assert torch.equal(first, again)
        ref, _ = _float64_loss_and_grad(q, key, queue, 0.2)
        torch.testing.assert_close(first.cpu().double(), ref, rtol=1e-6, atol=1e-6)
        mean, _ = torch.ops.fastsynth.info_nce_fused(q, key, queue, 0.2, False)
        assert mean.shape == () and torch.equal(mean, first)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_triton_half_q_with_float32_queue(dtype, kdev, poison):
    """Under autocast q and k are half precision while the queue buffer stays float32."""
    q, key, queue = _inputs(21, 700, 64, torch.float32, seed=9, device=kdev)
    qh = q.to(dtype).requires_grad_(True)
    loss = info_nce(qh, key.to(dtype), queue, 0.2, impl="triton")
    loss.backward()
    # the expected numbers: the same op with every operand rounded to the half dtype first
    ref_loss, ref_grad = _float64_loss_and_grad(q.to(dtype), key.to(dtype), queue.to(dtype), 0.2)
    tol_loss, tol_grad = TOL[dtype]
    torch.testing.assert_close(loss.detach().cpu().double(), ref_loss, rtol=tol_loss, atol=tol_loss)
    scale = max(ref_grad.abs().max().item(), 1 / (0.2 * 21))
    torch.testing.assert_close(qh.grad.cpu().double() / scale, ref_grad / scale, rtol=0, atol=tol_grad)


def test_autocast_runs_float32_q_in_the_autocast_dtype(kdev, monkeypatch):
    """CUDA autocast runs F.normalize's norm in float32, so the step's unit-norm q and k reach the
    op in float32: under autocast it casts them to the autocast dtype, as a matmul's inputs are,
    instead of taking the exact-fp32 path (about 250x slower on the H200)."""
    low = torch.bfloat16 if kdev.type == "cuda" else torch.float16
    q, key, queue = _inputs(13, 200, 32, torch.float32, seed=4, device=kdev)
    seen, launch = [], mod._launch
    monkeypatch.setattr(mod, "_launch", lambda q, k, u, *a, **kw: seen.append((q.dtype, k.dtype, u.dtype)) or launch(q, k, u, *a, **kw))
    qa = q.clone().requires_grad_(True)
    with torch.autocast(kdev.type, dtype=low):
        loss = info_nce(qa, key, queue, 0.2, impl="triton")
    loss.backward()
    assert seen == [(low, low, torch.float32)]
    assert loss.dtype == torch.float32 and qa.grad.dtype == torch.float32
    # the same numbers as the op given q and k rounded to the autocast dtype, without autocast
    qb = q.to(low).requires_grad_(True)
    ref = info_nce(qb, key.to(low), queue, 0.2, impl="triton")
    ref.backward()
    assert torch.equal(loss, ref) and torch.equal(qa.grad, qb.grad.float())


def test_gradient_only_to_q(kdev):
    for impl, dev in (("torch", "cpu"), ("triton", kdev)):
        q, key, queue = _inputs(5, 11, 16, torch.float32, device=dev)
        for t in (q, key, queue):
            t.requires_grad_(True)
        info_nce(q, key, queue, 0.2, impl=impl).backward()
        assert q.grad is not None and key.grad is None and queue.grad is None


@pytest.mark.parametrize("dtype", HALF_DTYPES + [torch.float32])
def test_upstream_gradient_scales_dq(dtype, kdev):
    """The backward multiplies the forward's dL/dq by the incoming gradient (a loss weight in
    Eq. 8): in q's dtype, equal to the reference's gradient of the weighted loss."""
    q, key, queue = _inputs(9, 70, 32, dtype, seed=3, device=kdev)
    grads = {}
    for impl in ("torch", "triton"):
        qi = q.detach().clone().requires_grad_(True)
        (info_nce(qi, key, queue, 0.2, impl=impl) * -2.5).backward()
        grads[impl] = qi.grad
    assert grads["triton"].dtype == dtype
    _, ref = _float64_loss_and_grad(q, key, queue, 0.2)
    scale = 2.5 * max(ref.abs().max().item(), 1 / (0.2 * 9))
    for impl, g in grads.items():
        torch.testing.assert_close(g.cpu().double() / scale, -2.5 * ref / scale, rtol=0, atol=TOL[dtype][1],
                                   msg=lambda m: f"{impl}: {m}")


def test_backward_is_one_scaling_op(kdev):
    """The forward already computed dL/dq: backward only scales it. In particular no N x C zero
    gradient is filled in for the op's second output (dL/dq itself), which nothing uses."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    q, key, queue = _inputs(6, 40, 16, torch.float16, device=kdev)
    q.requires_grad_(True)
    loss = info_nce(q, key, queue, 0.2, impl="triton")
    with Ops() as ops:
        loss.backward()
    compute = [op for op in ops.seen if op not in ("detach", "ones_like")]  # autograd's own seed and bookkeeping
    assert compute == ["info_nce_scale"], ops.seen
    # The op's dL/dq output has no derivative: differentiating it (a gradient penalty through
    # create_graph=True) is autograd's error, not a silent zero.
    _, grad = torch.ops.fastsynth.info_nce_fused(q, key, queue, 0.2, True)
    assert not grad.requires_grad
    # The eager path (a once-differentiable autograd.Function) gives the same error.
    qa = q.detach().float().requires_grad_(True)
    (g,) = torch.autograd.grad(info_nce(qa, key.float(), queue.float(), 0.2, impl="triton"), qa, create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad"):
        (g * g).sum().backward()


def test_eager_calls_launch_directly_with_the_ops_results(kdev, monkeypatch):
    """An eager call launches the kernels from a plain autograd.Function (no registered op's
    dispatch layers) and gives the op's loss and gradient bit for bit; under a dispatch mode the
    registered op runs, so modes (fake tensors, recorders) still see it."""
    from torch.utils._python_dispatch import TorchDispatchMode
    calls = []
    direct = mod._InfoNCEDirect.apply
    monkeypatch.setattr(mod._InfoNCEDirect, "apply", lambda *a: calls.append(1) or direct(*a))
    q, key, queue = _inputs(9, 70, 24, torch.float16, device=kdev)
    qa, qb = (q.detach().clone().requires_grad_(True) for _ in range(2))
    la = info_nce(qa, key, queue, 0.2, impl="triton")
    la.backward()
    assert calls == [1]
    lb, _ = torch.ops.fastsynth.info_nce_fused(qb, key, queue, 0.2, True)
    lb.backward()
    assert torch.equal(la, lb) and torch.equal(qa.grad, qb.grad)

    class Seen(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))
    seen = []
    with Seen():
        lc = info_nce(q, key, queue, 0.2, impl="triton")
    assert calls == [1] and "info_nce_fused" in seen and torch.equal(lc, la)


@pytest.mark.parametrize("autocast", [False, True])
def test_compiles_without_graph_break(kdev, autocast):
    """torch.compile(fullgraph=True) must trace through the op, under autocast too (its dtype
    query): a graph break raises here."""
    q, key, queue = _inputs(7, 90, 24, torch.float32, device=kdev)
    backend = "inductor" if kdev.type == "cuda" else "eager"  # inductor cannot run interpreted kernels
    low = torch.bfloat16 if kdev.type == "cuda" else torch.float16

    def f(q, k, u):
        with torch.autocast(kdev.type, dtype=low, enabled=autocast):
            return info_nce(q, k, u, 0.2, impl="triton") * 2.0
    fn = torch.compile(f, fullgraph=True, backend=backend)
    qa = q.clone().requires_grad_(True)
    fn(qa, key, queue).backward()
    qb = q.clone().requires_grad_(True)
    f(qb, key, queue).backward()
    torch.testing.assert_close(qa.grad, qb.grad, rtol=1e-5, atol=1e-7)


def test_auto_takes_the_reference_where_the_kernel_does_not_apply(monkeypatch):
    """impl="auto" on CUDA tensors (simulated: the dispatch rule answers as on a GPU) runs the
    kernel where it applies and the reference for C > 256 or float64, instead of raising, and for
    float32 q outside autocast (the reference's matmul beats the exact float32 kernel)."""
    calls = []
    real = mod.resolve_impl  # the dispatch rule itself, answering as for CUDA tensors
    monkeypatch.setattr(mod, "resolve_impl", lambda impl, dev, has, **kw: real(impl, "cuda", has, **kw))
    monkeypatch.setattr(mod, "info_nce_reference", lambda *a: calls.append("reference") or a[0].sum() * 0)
    for c, dtype, expect in ((300, torch.float16, "reference"), (8, torch.float64, "reference"),
                             (8, torch.float32, "reference")):
        q, key, queue = _inputs(3, 5, c, dtype)
        info_nce(q, key, queue, 0.2, impl="auto")
        assert calls.pop() == expect
    launched = []
    launch = mod._launch
    monkeypatch.setattr(mod, "_launch", lambda *a, **kw: launched.append(a[0].dtype) or launch(*a, **kw))
    if mod.INTERPRET or torch.cuda.is_available():
        q, key, queue = _inputs(3, 5, 8, torch.float16, device=KDEV)
        info_nce(q, key, queue, 0.2, impl="auto")
        q, key, queue = _inputs(3, 5, 8, torch.float32, device=KDEV)
        info_nce(q, key, queue, 0.2, impl="triton")              # explicit: the exact kernel
        low = torch.bfloat16 if KDEV.type == "cuda" else torch.float16
        with torch.autocast(KDEV.type, dtype=low):               # autocast casts float32 q: the kernel
            info_nce(q, key, queue, 0.2, impl="auto")
        assert launched == [torch.float16, torch.float32, low] and not calls
    with pytest.raises(ValueError, match="C = 300"):
        big = _inputs(3, 5, 300, torch.float32, device=KDEV)
        info_nce(*big, 0.2, impl="triton")


def test_bad_shapes_and_impl(kdev):
    q, key, queue = _inputs(4, 6, 8, torch.float32)
    with pytest.raises(ValueError, match="queue must be K x C"):
        info_nce(q, key, queue[:, :5], 0.2)
    with pytest.raises(ValueError, match="q and k"):
        info_nce(q, key[:3], queue, 0.2)
    with pytest.raises(ValueError, match="choose one of"):
        info_nce(q, key, queue, 0.2, impl="cuda")
    with pytest.raises(ValueError, match="empty"):
        info_nce(q, key, queue[:0], 0.2)
    for impl in ("torch", "triton"):
        for tau in (0.0, -0.2, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="tau must be > 0 and finite"):
                info_nce(q.to(kdev), key.to(kdev), queue.to(kdev), tau, impl=impl)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        info_nce(q.to(kdev), key.to(kdev).double(), queue.to(kdev), 0.2, impl="triton")
    big = _inputs(2, 3, 300, torch.float32, device=kdev)
    with pytest.raises(ValueError, match="C = 300"):
        info_nce(*big, 0.2, impl="triton")
    # auto on a CPU tensor is the reference: bitwise the same number
    assert info_nce(q, key, queue, 0.2, impl="auto") == info_nce_reference(q, key, queue, 0.2)


def test_launch_arithmetic_matches_triton():
    """The launchers' cdiv and next_pow2 (plain Python, no Triton wrapper on the host path) give
    Triton's results, small and large."""
    triton = pytest.importorskip("triton")
    from fastsynth.kernels._dispatch import cdiv, next_pow2
    values = list(range(1, 3000)) + [2 ** 31 - 1, 2 ** 31, 2 ** 31 + 1, 2 ** 40 + 3]
    for n in values:
        assert next_pow2(n) == triton.next_power_of_2(n), n
    for x in values[:400] + values[-4:]:
        for y in (1, 2, 3, 7, 64, 65, 4096):
            assert cdiv(x, y) == triton.cdiv(x, y), (x, y)
