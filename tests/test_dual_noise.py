"""dual_noise (Eq. 4-6): determinism, degenerate rows, and the per-dimension noise scale.

Statistical tests run on both impls. Rows are few and wide so the interpreted kernel (one
program per row) stays fast: score and variance patterns repeat with a period along d, and the
noise is pooled over the columns sharing a pattern position.
"""
import importlib

import pytest
import torch
from scipy import stats

from kernelcase import HALF_DTYPES
from fastsynth.kernels import dual_noise, dual_noise_reference
from fastsynth.kernels.dual_noise import minmax

mod = importlib.import_module("fastsynth.kernels.dual_noise")

if mod.HAS_TRITON_KERNEL:
    import triton
    import triton.language as tl

    _philox2x32 = mod._philox2x32

    @triton.jit
    def _philox2x32_kat(out_ptr, ctr_ptr, seed, ROUNDS: tl.constexpr):
        """The kernel's Philox2x32 on one counter, its two words stored as int32."""
        i = tl.arange(0, 1)
        r0, r1 = _philox2x32(seed, tl.load(ctr_ptr + i), ROUNDS)
        tl.store(out_ptr + i, r0.to(tl.int32, bitcast=True))
        tl.store(out_ptr + 1 + i, r1.to(tl.int32, bitcast=True))


@pytest.fixture(params=["torch", "triton", "triton-philox2x32", "triton-one-draw"])
def impl(request, monkeypatch):
    """The reference, and the kernel with each of its generators (TUNING["generator"]), and with
    one normal per element (TUNING["draws"] = 1, with Philox2x32, the combination meant to pay)."""
    if request.param == "triton-philox2x32":
        monkeypatch.setitem(mod.TUNING, "generator", "philox2x32")
        return "triton"
    if request.param == "triton-one-draw":
        monkeypatch.setitem(mod.TUNING, "generator", "philox2x32")
        monkeypatch.setitem(mod.TUNING, "draws", 1)
        return "triton"
    return request.param


@pytest.fixture(params=[(g, d) for d in (2, 1) for g in mod.GENERATORS], ids=lambda p: f"{p[0]}-draws{p[1]}")
def generator(request, monkeypatch):
    """Each generator, with two normals per element and with one."""
    monkeypatch.setitem(mod.TUNING, "generator", request.param[0])
    monkeypatch.setitem(mod.TUNING, "draws", request.param[1])
    return request.param


def _pooled(noise: torch.Tensor, period: int) -> torch.Tensor:
    """B x (period * r) -> (B * r) x period: the samples of each pattern position."""
    b, d = noise.shape
    return noise.reshape(b, d // period, period).reshape(-1, period)


def _dev(impl, kdev):
    return kdev if impl == "triton" else torch.device("cpu")


def test_same_seed_same_output_and_different_seed_differs(impl, kdev, poison):
    dev = _dev(impl, kdev)
    z, s, v = torch.randn(7, 33, device=dev), torch.rand(7, 33, device=dev), torch.rand(33, device=dev)
    a = dual_noise(z, s, v, 0.5, 0.5, 0.5, seed=3, impl=impl)
    b = dual_noise(z, s, v, 0.5, 0.5, 0.5, seed=3, impl=impl)
    c = dual_noise(z, s, v, 0.5, 0.5, 0.5, seed=4, impl=impl)
    assert torch.isfinite(a).all() and torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_a_device_seed_gives_the_noise_of_its_value(impl, kdev, poison):
    """A 0-dim int64 seed tensor (what a CUDA-graph step sets before each replay) gives exactly
    the output of the same seed passed as an int, a 64-bit one included; changing the tensor in
    place changes the noise. A tensor of another shape, dtype or device is refused."""
    dev = _dev(impl, kdev)
    z, s, v = torch.randn(5, 34, device=dev), torch.rand(5, 34, device=dev), torch.rand(34, device=dev)
    seed = torch.tensor(2 ** 40 + 7, device=dev)
    for value in (2 ** 40 + 7, 3):
        seed.fill_(value)
        a = dual_noise(z, s, v, 0.5, 0.5, 0.5, seed=seed, impl=impl)
        assert torch.equal(a, dual_noise(z, s, v, 0.5, 0.5, 0.5, seed=value, impl=impl))
    assert not torch.equal(a, dual_noise(z, s, v, 0.5, 0.5, 0.5, seed=4, impl=impl))
    for bad in (torch.tensor([3], device=dev), torch.tensor(3, dtype=torch.int32, device=dev),
                torch.tensor(3, device="meta")):
        with pytest.raises(ValueError, match="0-dim int64 tensor"):
            dual_noise(z, s, v, 0.5, 0.5, 0.5, seed=bad, impl=impl)


def test_triton_noise_independent_of_block_shape(generator, kdev, monkeypatch, poison):
    """Counter = (row, column pair): programs walking several rows each, one row per program, and
    the chunked (wide-row) path with odd d draw the same numbers."""
    z, s, v = torch.randn(7, 701, device=kdev), torch.rand(7, 701, device=kdev), torch.rand(701, device=kdev)
    monkeypatch.setitem(mod.TUNING, "programs_per_sm", 64)
    one_row_each = dual_noise(z, s, v, 0.5, 0.7, 0.5, seed=9, impl="triton")
    monkeypatch.setitem(mod.TUNING, "programs_per_sm", 1)
    monkeypatch.setattr(mod, "num_sms", lambda device: 3)     # 3 programs: rows (0, 3, 6), (1, 4), (2, 5)
    walking = dual_noise(z, s, v, 0.5, 0.7, 0.5, seed=9, impl="triton")
    monkeypatch.setattr(mod, "MAX_SINGLE_BLOCK", 128)         # 351 pairs in chunks of 64
    chunked = dual_noise(z, s, v, 0.5, 0.7, 0.5, seed=9, impl="triton")
    assert torch.isfinite(one_row_each).all()
    assert torch.equal(walking, one_row_each) and torch.equal(chunked, one_row_each)


def test_triton_even_rows_single_and_chunked_agree(kdev, monkeypatch, poison):
    """d = 256: whole blocks, no masks (EVEN), in one block of 128 pairs and in chunks of 64."""
    g = torch.Generator().manual_seed(3)
    z, s, v = (t.to(kdev) for t in (torch.randn(5, 256, generator=g), torch.rand(5, 256, generator=g),
                                    torch.rand(256, generator=g)))
    single = dual_noise(z, s, v, 0.5, 0.7, 0.5, seed=4, impl="triton")
    monkeypatch.setattr(mod, "MAX_SINGLE_BLOCK", 128)
    chunked = dual_noise(z, s, v, 0.5, 0.7, 0.5, seed=4, impl="triton")
    assert torch.isfinite(single).all() and torch.equal(chunked, single)
    # Column alignment without masks: eps_v exactly where v_bar < lam, eps_g nowhere on a row's
    # top-scored dim, and zero sigmas give z back.
    eps_v = dual_noise(z, s, v, 0.0, 0.7, 0.5, seed=4, impl="triton") - z
    assert ((eps_v != 0) == (v < 0.5).expand_as(z)).all()
    eps_g = dual_noise(z, s, v, 0.5, 0.0, 0.5, seed=4, impl="triton") - z
    assert ((eps_g == 0) == (s == s.amax(dim=1, keepdim=True))).all()
    assert torch.equal(dual_noise(z, s, v, 0.0, 0.0, 0.5, seed=4, impl="triton"), z)


def test_triton_strided_inputs_read_through_strides(kdev, poison):
    """Transposed z and s, every other v_bar: the same numbers as contiguous copies."""
    b, d = 9, 301
    z_t = torch.randn(d, b, device=kdev).t()                  # b x d, column-major
    s_t = torch.rand(d, b, device=kdev).t()
    v_wide = torch.rand(2 * d, device=kdev)
    v = v_wide[::2]
    assert not z_t.is_contiguous() and not s_t.is_contiguous() and v.stride(0) == 2
    strided = dual_noise(z_t, s_t, v, 0.6, 0.8, 0.5, seed=4, impl="triton")
    contiguous = dual_noise(z_t.contiguous(), s_t.contiguous(), v.contiguous(), 0.6, 0.8, 0.5, seed=4, impl="triton")
    assert torch.equal(strided, contiguous)


def test_triton_noise_never_reuses_a_counter(generator, kdev):
    """Odd d: a row's last column pair is half empty, and the next row must not reuse its
    counter. Reused counters would show up as repeated noise values."""
    b, d = 64, 333
    z = torch.zeros(b, d, device=kdev)
    noise = dual_noise(z, torch.zeros_like(z), torch.ones(d, device=kdev), 1.0, 0.0, 0.5, seed=2, impl="triton")
    # float32 birthday ties among 21312 normals: 0-9 over seeds 0-9 (philox2x32: 2-6; torch.randn:
    # 2-5); counters reused from row to row (pairs counted as d // 2) gave 63-72 here, at least
    # b - 1 = 63 (a row's counters shifted by one pair: 68-72 with either generator).
    assert torch.unique(noise).numel() > noise.numel() - 20


def test_degenerate_rows_do_not_nan(impl, kdev, poison):
    dev = _dev(impl, kdev)
    z = torch.randn(3, 16, device=dev)
    s = torch.zeros(3, 16, device=dev)
    s[1] = 5.0  # constant non-zero row
    v = torch.full((16,), 0.01, device=dev)  # constant variance: v_hat degenerate too
    out = dual_noise(z, s, v, 1.0, 1.0, 0.02, seed=0, impl=impl)
    assert torch.isfinite(out).all()
    assert torch.equal(minmax(s[1:2]), torch.zeros(1, 16, device=dev))
    # Constant rows carry no ranking: s_hat = v_hat = 0, every dim gets both terms in full,
    # std sqrt(sigma_g^2 + sigma_v^2) (v_bar = 0.01 < lam = 0.02).
    wide = torch.full((4, 4096), 3.0, device=dev)
    noise = dual_noise(torch.zeros_like(wide), wide, torch.full((4096,), 0.01, device=dev), 0.6, 0.8, 0.02,
                       seed=1, impl=impl)
    assert abs(noise.std().item() - 1.0) < 0.03


# The interpreter evaluates the kernel's sigma / span in NumPy, which warns on the overflow the
# kernel then caps at the largest float.
@pytest.mark.filterwarnings("ignore:overflow encountered in divide:RuntimeWarning")
def test_tiny_score_span_counts_as_constant(impl, kdev, poison):
    """A score row whose spread is below the smallest normal float, or so small that sigma_g /
    spread exceeds half the largest float32, is constant for Eq. 4 in both impls (full noise on
    every dim): the kernel's gain, which it also multiplies by its Box-Muller constant (1.18),
    would be inf, and inf times a zero difference NaN. Both impls test the same quotient, so
    rows just either side of the line go the same way (the kernel once tested the quotient
    after that constant and the reference before it: spans near 3e-38 differed)."""
    dev = _dev(impl, kdev)
    z = torch.randn(7, 70, device=dev)
    s = torch.zeros(7, 70, device=dev)
    s[1, 0] = 1e-40                      # subnormal span
    s[2, :35] = 2e-38                    # normal span, but 10 / span is beyond float32
    s[3, :35] = 3.2e-38                  # 10 / span = 3.1e38: a float, but times 1.18 it is not
    s[4, :35] = 4.5e-38                  # 10 / span = 2.2e38: times 1.18 still a float, yet above the line
    s[5, :35] = 6.5e-38                  # 10 / span = 1.5e38: below half the largest, an ordinary row
    s[6, :35] = 2e-37                    # 10 / span fits easily: an ordinary row
    v = torch.rand(70, device=dev)
    out = dual_noise(z, s, v, 10.0, 1.0, 0.5, seed=3, impl=impl)
    assert torch.isfinite(out).all()
    zero = torch.zeros(1, 70, device=dev)
    for r in (1, 2, 3, 4):
        assert torch.equal(minmax(s[r:r + 1], scale=10.0), zero), r
    for r in (5, 6):
        assert torch.equal(minmax(s[r:r + 1], scale=10.0), (s[r:r + 1] > 0).float()), r
    # Same seed, rows made constant: rows 1-4 get exactly the same noise (the same gains);
    # rows 5 and 6 do not (their high-score half is spared).
    flat = torch.zeros_like(s)
    same = dual_noise(z, flat, v, 10.0, 1.0, 0.5, seed=3, impl=impl)
    assert torch.equal(out[1:5], same[1:5])
    for r in (5, 6):
        assert not torch.equal(out[r], same[r]), r
        # eps_g spares the top-scored half exactly; only eps_v (v_bar < lam columns) moves it.
        spared = (v[:35] >= 0.5)
        assert torch.equal(out[r, :35][spared], z[r, :35][spared]), r


def test_noise_scales_must_be_standard_deviations(impl, kdev):
    """sigma_g, sigma_v >= 0 and finite, lam not NaN, on both impls (a negative sigma gave the
    kernel an inf gain: inf and NaN outputs where the reference gave finite noise)."""
    dev = _dev(impl, kdev)
    z = torch.zeros(2, 8, device=dev)
    v = torch.ones(8, device=dev)
    for sg, sv in ((-1.0, 1.0), (1.0, -0.5), (float("nan"), 1.0), (1.0, float("inf"))):
        with pytest.raises(ValueError, match="must be >= 0 and finite"):
            dual_noise(z, z, v, sg, sv, 0.5, seed=0, impl=impl)
    with pytest.raises(ValueError, match="lam is NaN"):
        dual_noise(z, z, v, 1.0, 1.0, float("nan"), seed=0, impl=impl)
    assert torch.equal(dual_noise(z, z, v, 0.0, 0.0, 0.5, seed=0, impl=impl), z)  # zero noise: allowed


def test_seed_outside_the_philox_key_range_is_an_error(impl, kdev):
    """One seed range for both impls, [0, 2**63): a seed that would wrap onto another is refused."""
    dev = _dev(impl, kdev)
    z = torch.zeros(2, 8, device=dev)
    for seed in (-1, 2 ** 63, 2 ** 64):
        with pytest.raises(ValueError, match="seed must be in"):
            dual_noise(z, z, torch.ones(8, device=dev), 1.0, 1.0, 0.5, seed=seed, impl=impl)
    dual_noise(z, z, torch.ones(8, device=dev), 1.0, 1.0, 0.5, seed=2 ** 63 - 1, impl=impl)


def test_auto_takes_the_reference_where_the_kernel_does_not_apply(monkeypatch, kdev):
    """impl="auto" on CUDA tensors (simulated on a CPU: the dispatch rule answers as on a GPU) runs
    the kernel where it applies and the reference past the kernel's 32-bit noise counter."""
    calls = []
    real = mod.resolve_impl  # the dispatch rule itself, answering as for CUDA tensors
    monkeypatch.setattr(mod, "resolve_impl", lambda impl, dev, has, **kw: real(impl, "cuda", has, **kw))
    monkeypatch.setattr(mod, "dual_noise_reference", lambda z, *a: calls.append("reference") or z.clone())
    monkeypatch.setattr(mod, "COUNTER_LIMIT", 64)              # 8 rows x 8 column pairs reach it
    z = torch.zeros(8, 16)
    dual_noise(z, z, torch.ones(16), 1.0, 1.0, 0.5, seed=1, impl="auto")
    assert calls == ["reference"]
    with pytest.raises(ValueError, match=r"B \* ceil\(d / 2\) = 64 column pairs reach the noise counter's limit \(64\)"):
        dual_noise(z, z, torch.ones(16), 1.0, 1.0, 0.5, seed=1, impl="triton")
    if mod.INTERPRET or torch.cuda.is_available():
        # The kernel's own device: CPU tensors under the interpreter, CUDA tensors on a GPU (the
        # H200 run of 14a4910 launched it on CPU tensors here: "cannot be accessed from Triton").
        zk = z[:7].to(kdev)
        out = dual_noise(zk, zk, torch.ones(16, device=kdev), 1.0, 1.0, 0.5, seed=1, impl="auto")
        assert calls == ["reference"] and out.shape == (7, 16)  # the kernel ran, not the stub


def test_per_dimension_std_follows_gradcam_scale(impl, kdev):
    """Eq. 5: std of (z_tilde - z) in dim i is sigma_g (1 - s_hat_i); higher score, less noise."""
    dev, period, sigma_g = _dev(impl, kdev), 12, 0.7
    s = torch.linspace(0.0, 3.0, period).repeat(1000).expand(24, -1).to(dev)   # s_hat = linspace(0, 1)
    z = torch.randn(s.shape, device=dev)
    v = torch.ones(s.shape[1], device=dev)                                    # nothing low-variance
    noise = _pooled((dual_noise(z, s, v, sigma_g, 5.0, lam=0.0, seed=11, impl=impl) - z).cpu(), period)
    expected = sigma_g * (1 - torch.linspace(0, 1, period))
    torch.testing.assert_close(noise.std(dim=0), expected, rtol=0.03, atol=0.01)
    assert noise[:, -1].abs().max() == 0          # top-scored dim untouched
    std = noise.std(dim=0)
    assert (std[1:] < std[:-1]).all()             # strictly decreasing with the score
    assert noise.mean(dim=0).abs().max() < 0.02


def test_lowvar_mask_and_scale(impl, kdev):
    """Eq. 6: only dims with v_bar < lambda get eps_v, with std sigma_v (1 - v_hat)."""
    dev, sigma_v, lam = _dev(impl, kdev), 0.9, 0.5
    pattern = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.5, 0.6, 0.8, 1.0])  # 0.5 == lam: masked
    v_bar = pattern.repeat(1000).to(dev)
    z = torch.randn(24, v_bar.numel(), device=dev)
    noise = dual_noise(z, torch.zeros_like(z), v_bar, 0.0, sigma_v, lam, seed=5, impl=impl) - z
    pooled = _pooled(noise.cpu(), 8)
    expected = torch.where(pattern < lam, sigma_v * (1 - pattern), torch.zeros(8))  # v_hat = pattern
    torch.testing.assert_close(pooled.std(dim=0), expected, rtol=0.03, atol=0.005)
    assert (noise[:, v_bar >= lam] == 0).all()


def test_both_terms_independent_and_add(impl, kdev):
    """Two independent normals: variances add, sigma_g^2 (1-s_hat)^2 + sigma_v^2 (1-v_hat)^2."""
    dev = _dev(impl, kdev)
    s = torch.tensor([0.0, 1.0, 0.0, 1.0]).repeat(2000).expand(30, -1).to(dev)   # s_hat = s
    v_bar = torch.tensor([0.0, 0.0, 1.0, 0.5]).repeat(2000).to(dev)             # v_hat = v_bar
    noise = dual_noise(torch.zeros_like(s), s, v_bar, 0.6, 0.8, lam=0.75, seed=1, impl=impl)
    expected = torch.tensor([(0.36 + 0.64) ** 0.5, 0.8, 0.6, 0.4])
    torch.testing.assert_close(_pooled(noise.cpu(), 4).std(dim=0), expected, rtol=0.03, atol=0.005)


def _standard_normal(n):
    """Moments within 1e-2 over 1e5+ samples, KS statistic below the alpha = 0.001 critical value."""
    assert n.numel() > 1e5
    assert abs(n.mean()) < 1e-2 and abs(n.std() - 1) < 1e-2
    ks = stats.kstest(n.numpy(), "norm").statistic
    assert ks < 1.95 / n.numel() ** 0.5, ks


def test_normalised_noise_is_standard_normal(impl, kdev, poison):
    """(z_tilde - z) / scale ~ N(0, 1) for each term alone: moments within 1e-2 over 1e5+ samples,
    KS statistic below the alpha = 0.001 critical value; the two terms uncorrelated. With one
    draw per element the terms are not drawn apart: eps_g alone and the sum over the joint std
    are standard normal, and masked dims are exactly the eps_g-only output."""
    dev = _dev(impl, kdev)
    b, d = 40, 4096
    g = torch.Generator().manual_seed(0)
    z = torch.randn(b, d, generator=g).to(dev)
    s = torch.rand(b, d, generator=g).to(dev)
    v_bar = torch.rand(d, generator=g).to(dev)
    lam = 0.8
    g_only = dual_noise(z, s, v_bar, 0.7, 0.0, lam, seed=21, impl=impl) - z
    both = dual_noise(z, s, v_bar, 0.7, 0.9, lam, seed=21, impl=impl) - z
    v_only = both - g_only                         # same seed: same n1, so this is eps_v alone
    scale_g = 0.7 * (1 - minmax(s.float(), dim=1))
    scale_v = (0.9 * (1 - minmax(v_bar.float(), dim=0))).expand(b, d)
    masked = (v_bar >= lam).expand(b, d)
    assert (v_only[masked] == 0).all()             # masked dims: eps_v exactly absent
    keep_g, keep_v = scale_g > 0.05, (scale_v > 0.05) & ~masked
    _standard_normal((g_only / scale_g)[keep_g].double().cpu())
    if impl == "triton" and mod.TUNING["draws"] == 1:
        joint = (scale_g ** 2 + torch.where(masked, 0.0, scale_v) ** 2).sqrt()
        keep = joint > 0.05
        _standard_normal((both / joint)[keep].double().cpu())
        # and not the sum of perfectly correlated terms (std a + b): its own check has power
        assert abs((both / (scale_g + torch.where(masked, 0.0, scale_v)))[keep & ~masked].std() - 1) > 0.05
        return
    _standard_normal((v_only / scale_v)[keep_v].double().cpu())
    both_kept = keep_g & keep_v
    pair = torch.stack([(g_only / scale_g)[both_kept], (v_only / scale_v)[both_kept]]).double().cpu()
    assert abs(torch.corrcoef(pair)[0, 1]) < 1e-2


def test_triton_seed_high_word_and_generator_change_the_stream(kdev, monkeypatch):
    """Seeds that differ only above bit 32 draw different noise (Philox2x32's key is 32 bits, so
    the seed's high word goes into its counter), and the two generators differ at one seed. An
    unknown generator is a clear error."""
    z, s, v = torch.zeros(3, 64, device=kdev), torch.rand(3, 64, device=kdev), torch.rand(64, device=kdev)
    outs = {}
    for gen in mod.GENERATORS:
        monkeypatch.setitem(mod.TUNING, "generator", gen)
        outs[gen] = dual_noise(z, s, v, 1.0, 1.0, 0.5, seed=5, impl="triton")
        high = dual_noise(z, s, v, 1.0, 1.0, 0.5, seed=5 + 2 ** 40, impl="triton")
        assert torch.isfinite(outs[gen]).all() and not torch.equal(high, outs[gen]), gen
    assert not torch.equal(outs["philox4x32"], outs["philox2x32"])
    monkeypatch.setitem(mod.TUNING, "generator", "philox4x32")
    monkeypatch.setitem(mod.TUNING, "draws", 3)
    with pytest.raises(ValueError, match="draws"):
        dual_noise(z, s, v, 1.0, 1.0, 0.5, seed=5, impl="triton")
    monkeypatch.setitem(mod.TUNING, "draws", 2)
    monkeypatch.setitem(mod.TUNING, "generator", "mt19937")
    with pytest.raises(ValueError, match="generator"):
        dual_noise(z, s, v, 1.0, 1.0, 0.5, seed=5, impl="triton")
    with pytest.raises(ValueError, match="generator"):  # also where no kernel would launch
        dual_noise(z[:0], s[:0], v, 1.0, 1.0, 0.5, seed=5, impl="triton")


@pytest.mark.parametrize("rounds,counter,seed,expected", [
    # Random123's known-answer vectors (kat_vectors): philox2x32 R, ctr[0] ctr[1], key -> out
    (10, 0x00000000, 0x00000000_00000000, (0xFF1DAE59, 0x6CD10DF2)),
    (10, 0x243F6A88, 0x85A308D3_13198A2E, (0xDD7CE038, 0xF62A4C12)),
    (10, 0xFFFFFFFF, 0xFFFFFFFF_FFFFFFFF, (0x2C3F628B, 0xAB4FD7AD)),
    (7, 0xFFFFFFFF, 0xFFFFFFFF_FFFFFFFF, (0xAB302C4D, 0x3DC9D239)),
    (7, 0x00000000, 0x00000000_00000000, (0x257A3673, 0xCD26BE2A)),
    (7, 0x243F6A88, 0x85A308D3_13198A2E, (0xBEDBBE6B, 0xE4C770B3)),
])
def test_philox2x32_known_answers(rounds, counter, seed, expected, kdev):
    """The kernel's Philox2x32 is Random123's: counter = (counter, the seed's high word), key =
    the seed's low word."""
    ctr = torch.tensor([counter - (1 << 32) if counter >= 1 << 31 else counter], dtype=torch.int32, device=kdev)
    out = torch.zeros(2, dtype=torch.int32, device=kdev)
    _philox2x32_kat[(1,)](out, ctr, seed, ROUNDS=rounds)
    assert [v & 0xFFFFFFFF for v in out.tolist()] == list(expected)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_triton_half_precision_z(dtype, kdev, poison):
    z = torch.randn(5, 300, device=kdev).to(dtype)
    s, v = torch.rand(5, 300, device=kdev), torch.rand(300, device=kdev)
    out = dual_noise(z, s, v, 0.0, 0.0, 0.5, seed=0, impl="triton")
    assert out.dtype == dtype and torch.equal(out, z)  # zero sigmas: z comes back exactly
    out = dual_noise(z, s, v, 1.0, 1.0, 0.5, seed=0, impl="triton")
    assert torch.isfinite(out).all() and not torch.equal(out, z)


def test_compiles_without_graph_break(kdev):
    z, s, v = torch.randn(4, 64, device=kdev), torch.rand(4, 64, device=kdev), torch.rand(64, device=kdev)
    backend = "inductor" if kdev.type == "cuda" else "eager"
    fn = torch.compile(lambda z, s, v: dual_noise(z, s, v, 0.5, 0.5, 0.5, 7, impl="triton") + 1.0,
                       fullgraph=True, backend=backend)
    torch.testing.assert_close(fn(z, s, v), dual_noise(z, s, v, 0.5, 0.5, 0.5, 7, impl="triton") + 1.0)


def test_dtype_preserved_and_shape_checks():
    z = torch.randn(4, 8, dtype=torch.float16)
    out = dual_noise_reference(z, torch.rand(4, 8), torch.rand(8), 0.1, 0.1, 0.5, 0)
    assert out.dtype == torch.float16
    for impl in ("torch", "triton"):
        with pytest.raises(ValueError, match="v_bar"):
            dual_noise(z, torch.rand(4, 8), torch.rand(7), 0.1, 0.1, 0.5, 0, impl=impl)
        with pytest.raises(ValueError, match="B x d"):
            dual_noise(z, torch.rand(3, 8), torch.rand(8), 0.1, 0.1, 0.5, 0, impl=impl)
        with pytest.raises(ValueError, match="d = 0"):
            dual_noise(z[:, :0], torch.rand(4, 0), torch.rand(0), 0.1, 0.1, 0.5, 0, impl=impl)


def test_tuned_overrides_and_restores_tuning():
    """The sweeps' and the AOT cases' TUNING overrides hold inside the block only, also when it fails."""
    from fastsynth.kernels._dispatch import tuned
    before = dict(mod.TUNING)
    with pytest.raises(RuntimeError, match="inside"):
        with tuned(mod, num_warps=8, generator="philox2x32"):
            assert mod.TUNING == {**before, "num_warps": 8, "generator": "philox2x32"}
            raise RuntimeError("inside")
    assert mod.TUNING == before
    bare = importlib.import_module("fastsynth.kernels._dispatch")
    with tuned(bare):  # a module without TUNING takes no overrides, and none is fine
        pass
    with pytest.raises(ValueError, match="no TUNING"):
        with tuned(bare, num_warps=8):
            pass
    with pytest.raises(ValueError, match="has no num_wraps"):  # a misspelt choice is no silent no-op
        with tuned(mod, num_wraps=8):
            pass
    assert mod.TUNING == before


def test_eager_calls_launch_directly_with_the_ops_results(kdev, monkeypatch):
    """An eager call launches the kernel itself (no registered op's dispatch layers), with the
    op's output bit for bit, the seed an int or a device tensor."""
    calls = []
    launch = mod._launch
    monkeypatch.setattr(mod, "_launch", lambda *a, **kw: calls.append(kw.get("direct", False)) or launch(*a, **kw))
    g = torch.Generator().manual_seed(8)
    z, s, v = (t.to(kdev) for t in (torch.randn(6, 50, generator=g), torch.rand(6, 50, generator=g),
                                    torch.rand(50, generator=g)))
    out = dual_noise(z, s, v, 0.5, 0.7, 0.5, seed=12, impl="triton")
    out_t = dual_noise(z, s, v, 0.5, 0.7, 0.5, seed=torch.tensor(12, device=kdev), impl="triton")
    assert calls == [True, True]
    assert torch.equal(out, torch.ops.fastsynth.dual_noise_fused(z, s, v, 0.5, 0.7, 0.5, 12))
    assert torch.equal(out_t, out)
    assert calls[2:] == [False]
