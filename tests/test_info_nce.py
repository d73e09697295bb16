"""info_nce (Eq. 1) against an independent float64 formula, forward and gradient."""
import pytest
import torch
import torch.nn.functional as F

from fastsynth.kernels import info_nce, info_nce_reference


def _inputs(n, k, c, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n, c, generator=g, dtype=torch.float64), dim=1)
    key = F.normalize(torch.randn(n, c, generator=g, dtype=torch.float64), dim=1)
    queue = F.normalize(torch.randn(k, c, generator=g, dtype=torch.float64), dim=1)
    return q.to(dtype), key.to(dtype), queue.to(dtype)


def _float64_loss_and_grad(q, k, queue, tau):
    """loss_i = log(exp(l_i0) + sum_j exp(l_ij)) - l_i0; dL/dq = (sum_j p_ij v_j - k_i) / (tau N)."""
    q, k, queue = (t.double() for t in (q, k, queue))
    values = torch.cat([k[:, None, :], queue[None].expand(q.shape[0], -1, -1)], dim=1)  # N x (K+1) x C
    logits = torch.einsum("nc,njc->nj", q, values) / tau
    loss = (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
    p = torch.softmax(logits, dim=1)
    grad = (torch.einsum("nj,njc->nc", p, values) - k) / (tau * q.shape[0])
    return loss, grad


@pytest.mark.parametrize("n,k,c", [(1, 1, 1), (37, 1023, 128), (8, 100, 257), (256, 4096, 64)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_matches_float64(n, k, c, dtype, tol):
    q, key, queue = _inputs(n, k, c, dtype, seed=n + k)
    q.requires_grad_(True)
    loss = info_nce(q, key, queue, tau=0.2, impl="torch")
    loss.backward()
    ref_loss, ref_grad = _float64_loss_and_grad(q.detach(), key, queue, 0.2)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=tol, atol=tol)
    torch.testing.assert_close(q.grad.double(), ref_grad, rtol=tol * 10, atol=tol)


def test_gradient_only_to_q():
    q, key, queue = _inputs(5, 11, 16, torch.float32)
    for t in (q, key, queue):
        t.requires_grad_(True)
    info_nce_reference(q, key, queue, 0.2).backward()
    assert q.grad is not None and key.grad is None and queue.grad is None


def test_bad_shapes_and_impl():
    q, key, queue = _inputs(4, 6, 8, torch.float32)
    with pytest.raises(ValueError, match="queue must be K x C"):
        info_nce(q, key, queue[:, :5], 0.2)
    with pytest.raises(ValueError, match="q and k"):
        info_nce(q, key[:3], queue, 0.2)
    with pytest.raises(ValueError, match="choose one of"):
        info_nce(q, key, queue, 0.2, impl="cuda")
    # auto on a CPU tensor is the reference: bitwise the same number
    assert info_nce(q, key, queue, 0.2, impl="auto") == info_nce_reference(q, key, queue, 0.2)
