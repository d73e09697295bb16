"""dual_noise (Eq. 4-6): determinism, degenerate rows, and the per-dimension noise scale."""
import pytest
import torch

from fastsynth.kernels import dual_noise, dual_noise_reference
from fastsynth.kernels.dual_noise import minmax


def test_same_seed_same_output_and_different_seed_differs():
    z, s = torch.randn(7, 33), torch.rand(7, 33)
    v = torch.rand(33)
    a = dual_noise(z, s, v, 0.5, 0.5, 0.5, seed=3, impl="torch")
    b = dual_noise(z, s, v, 0.5, 0.5, 0.5, seed=3, impl="torch")
    c = dual_noise(z, s, v, 0.5, 0.5, 0.5, seed=4, impl="torch")
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_degenerate_rows_do_not_nan():
    z = torch.randn(3, 16)
    s = torch.zeros(3, 16)
    s[1] = 5.0  # constant non-zero row
    v = torch.full((16,), 0.01)  # constant variance: v_hat degenerate too
    out = dual_noise(z, s, v, 1.0, 1.0, 0.02, seed=0)
    assert torch.isfinite(out).all()
    assert torch.equal(minmax(s[1:2]), torch.zeros(1, 16))


def test_per_dimension_std_follows_gradcam_scale():
    """Eq. 5: std of (z_tilde - z) in dim i is sigma_g (1 - s_hat_i); higher score, less noise."""
    d, rows, sigma_g = 12, 40000, 0.7
    base = torch.linspace(0.0, 3.0, d)                  # scores; s_hat = linspace(0, 1)
    s = base.expand(rows, d).contiguous()
    z = torch.randn(rows, d)
    v = torch.ones(d)                                    # nothing low-variance: eps_v = 0
    noise = dual_noise(z, s, v, sigma_g, 5.0, lam=0.0, seed=11) - z
    expected = sigma_g * (1 - torch.linspace(0, 1, d))
    torch.testing.assert_close(noise.std(dim=0), expected, rtol=0.03, atol=0.01)
    assert noise[:, -1].abs().max() == 0          # top-scored dim untouched
    std = noise.std(dim=0)
    assert (std[1:] < std[:-1]).all()             # strictly decreasing with the score
    assert noise.mean(dim=0).abs().max() < 0.02


def test_lowvar_mask_and_scale():
    """Eq. 6: only dims with v_bar < lambda get eps_v, with std sigma_v (1 - v_hat)."""
    d, rows, sigma_v, lam = 8, 40000, 0.9, 0.5
    v_bar = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0])
    z = torch.randn(rows, d)
    noise = dual_noise(z, torch.zeros(rows, d), v_bar, 0.0, sigma_v, lam, seed=5) - z
    v_hat = (v_bar - v_bar.min()) / (v_bar.max() - v_bar.min())
    expected = torch.where(v_bar < lam, sigma_v * (1 - v_hat), torch.zeros(d))
    torch.testing.assert_close(noise.std(dim=0), expected, rtol=0.03, atol=0.005)
    assert (noise[:, v_bar >= lam] == 0).all()


def test_both_terms_independent_and_add():
    """Two independent normals: variances add, sigma_g^2 (1-s_hat)^2 + sigma_v^2 (1-v_hat)^2."""
    d, rows = 4, 60000
    s = torch.tensor([0.0, 1.0, 0.0, 1.0]).expand(rows, d).contiguous()   # s_hat = s
    v_bar = torch.tensor([0.0, 0.0, 1.0, 0.5])                              # v_hat = v_bar
    z = torch.zeros(rows, d)
    noise = dual_noise(z, s, v_bar, 0.6, 0.8, lam=0.75, seed=1)
    expected = torch.tensor([(0.36 + 0.64) ** 0.5, 0.8, 0.6, 0.4])
    torch.testing.assert_close(noise.std(dim=0), expected, rtol=0.03, atol=0.005)


def test_dtype_preserved_and_shape_checks():
    z = torch.randn(4, 8, dtype=torch.float16)
    out = dual_noise_reference(z, torch.rand(4, 8), torch.rand(8), 0.1, 0.1, 0.5, 0)
    assert out.dtype == torch.float16
    with pytest.raises(ValueError, match="v_bar"):
        dual_noise(z, torch.rand(4, 8), torch.rand(7), 0.1, 0.1, 0.5, 0)
    with pytest.raises(ValueError, match="B x d"):
        dual_noise(z, torch.rand(3, 8), torch.rand(8), 0.1, 0.1, 0.5, 0)
