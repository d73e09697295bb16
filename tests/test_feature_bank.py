"""FeatureBank (Sec. 3.4): FIFO contents and per-dimension variance over the stored rows.

Both impls: "torch" recomputes the statistics from the stored rows, "triton" streams them
(evict + insert with Chan's formulas) on the GPU or under the interpreter.
"""
import collections

import pytest
import torch

from fastsynth.kernels import FeatureBank

IMPLS = ["torch", "triton"]


def _bank(size, dim, impl, kdev):
    return FeatureBank(size, dim, impl=impl).to(kdev if impl == "triton" else "cpu")


@pytest.mark.parametrize("impl", IMPLS)
def test_variance_matches_torch_var_after_wraparound(impl, kdev):
    size, dim = 50, 7
    bank = _bank(size, dim, impl, kdev)
    shadow = collections.deque(maxlen=size)  # independent FIFO model of what the bank holds
    g = torch.Generator().manual_seed(0)
    for b in [13, 13, 24, 7, 50, 3, 31, 60, 1]:  # wraps several times; one batch larger than the bank
        z = torch.randn(b, dim, generator=g) * 3 + 100
        bank.var.fill_(float("nan"))            # poison: the update must rewrite every entry
        bank.update(z.to(bank.bank.device))
        shadow.extend(z.unbind(0))
        rows = torch.stack(list(shadow)).double()
        torch.testing.assert_close(bank.variance().cpu().double(), rows.var(dim=0), rtol=1e-5, atol=1e-6)
        assert int(bank.filled) == len(shadow) and int(bank.ptr) == int(bank.count) % size
    # Same multiset of rows as the shadow FIFO (order within the ring differs)
    stored = bank.bank[: int(bank.filled)].cpu()
    assert torch.equal(stored.sort(dim=0).values, torch.stack(list(shadow)).sort(dim=0).values)


def _naive_float32_variance(batches, size):
    """Running sum and sum of squares in float32 (add new rows, subtract evicted): the method
    the cancellation test exists to reject."""
    ring, s, sq = collections.deque(), 0.0, 0.0
    s = torch.zeros(batches[0].shape[1])
    sq = torch.zeros_like(s)
    for z in batches:
        for row in z:
            if len(ring) == size:
                old = ring.popleft()
                s, sq = s - old, sq - old * old
            ring.append(row)
            s, sq = s + row, sq + row * row
    n = len(ring)
    return (sq - s * s / n) / (n - 1)


@pytest.mark.parametrize("impl", IMPLS)
def test_streaming_survives_cancellation(impl, kdev):
    """20 full rotations of data with mean 100 x its spread: relative error < 1e-5 against a
    float64 recompute, where naive float32 sum / sum-of-squares is off by far more."""
    size, dim, b = 64, 33, 16
    bank = _bank(size, dim, impl, kdev)
    g = torch.Generator().manual_seed(1)
    spread = torch.rand(dim, generator=g) + 0.5
    batches = [(100 * spread + spread * torch.randn(b, dim, generator=g)).float()
               for _ in range(20 * size // b)]
    for z in batches:
        bank.update(z.to(bank.bank.device))
    exact = bank.bank.cpu().double().var(dim=0)           # float64 recompute over the stored rows
    got = bank.variance().cpu().double()
    assert ((got - exact).abs() / exact).max() < 1e-5
    # The float64 accumulators themselves stay far tighter (a float32 slip would be ~1e-5).
    from_m2 = bank.m2.cpu() / (size - 1)
    assert ((from_m2 - exact).abs() / exact).max() < 1e-10
    naive = _naive_float32_variance(batches, size).double()
    assert ((naive - exact).abs() / exact).max() > 1e-3   # the test would catch the naive method


@pytest.mark.parametrize("impl", IMPLS)
def test_statistics_recover_when_the_feature_scale_falls(impl, kdev):
    """Rows of mean 1e4 evicted by rows of spread 1e-3: removing them leaves float64 rounding of
    the order of 1e4^2 * 1e-16 in M2, several per cent of what stays. The Triton path recomputes
    exactly once per rotation, so the error does not outlive the large rows by more than one."""
    size, dim, b = 37, 70, 13
    bank = _bank(size, dim, impl, kdev)
    g = torch.Generator().manual_seed(2)
    for i in range(3 + 8):  # 3 batches of large rows, then 104 small rows: all large ones gone
        z = 1e4 + torch.randn(b, dim, generator=g) if i < 3 else 1e-3 * torch.randn(b, dim, generator=g)
        bank.update(z.to(bank.bank.device))
    exact = bank.bank.cpu().double().var(dim=0)
    assert exact.max() < 1e-5                              # only small rows are left
    got = bank.variance().cpu().double()
    assert ((got - exact).abs() / exact).max() < 1e-5
    zeros = torch.zeros(size, dim)                         # a column of zeros has variance exactly 0
    bank.update(zeros.to(bank.bank.device))
    assert torch.equal(bank.variance().cpu(), torch.zeros(dim))


def test_triton_and_torch_agree_and_hand_over(kdev):
    """Same state on both paths, so a bank can switch impl (or device) mid-run."""
    a, r = _bank(40, 9, "triton", kdev), _bank(40, 9, "torch", kdev)
    g = torch.Generator().manual_seed(2)
    for b in [5, 17, 30, 11]:
        z = torch.randn(b, 9, generator=g) + 10
        a.update(z.to(a.bank.device))
        r.update(z)
    for name in ("bank", "count", "var"):
        torch.testing.assert_close(getattr(a, name).cpu(), getattr(r, name), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.mean.cpu(), r.mean, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(a.m2.cpu(), r.m2, rtol=1e-9, atol=1e-9)
    # continue the torch bank on the triton path from the torch path's statistics
    handed = _bank(40, 9, "triton", kdev)
    handed.load_state_dict(r.state_dict())
    z = torch.randn(13, 9, generator=g) + 10
    handed.update(z.to(handed.bank.device))
    r.update(z)
    torch.testing.assert_close(handed.variance().cpu(), r.variance(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_partial_fill_and_empty(impl, kdev):
    bank = _bank(10, 3, impl, kdev)
    assert torch.equal(bank.variance().cpu(), torch.zeros(3))
    bank.update(torch.randn(1, 3, device=bank.bank.device))
    assert torch.equal(bank.variance().cpu(), torch.zeros(3))  # one row: no variance yet
    z = torch.randn(4, 3, device=bank.bank.device)
    bank.update(z)
    assert int(bank.filled) == 5
    torch.testing.assert_close(bank.variance(), bank.bank[:5].var(dim=0), rtol=1e-5, atol=1e-6)


def test_triton_half_precision_and_strided_input(kdev, poison):
    bank, ref = _bank(16, 8, "triton", kdev), FeatureBank(16, 8, impl="torch")
    z_half = torch.randn(6, 8, device=kdev).half()                  # stored as float32
    wide = torch.randn(5, 24, device=kdev)[:, 4:12]                 # row stride 24, unit column stride
    every_other = torch.randn(4, 16, device=kdev)[:, ::2]           # column stride 2
    z64 = torch.randn(3, 8, dtype=torch.float64, device=kdev) * 1e3 + 1 / 3  # rounded when stored
    assert wide.stride() == (24, 1) and every_other.stride() == (16, 2)
    for z in (z_half, wide, every_other):
        bank.update(z)
        ref.update(z.cpu())
    rows = torch.cat([z_half.float(), wide, every_other]).cpu()      # 15 rows: not yet full
    torch.testing.assert_close(bank.bank[:15].cpu(), rows)
    torch.testing.assert_close(bank.variance().cpu(), rows.var(dim=0), rtol=1e-5, atol=1e-6)
    for _ in range(6):  # wrap around with float64 input: evictions must remove what was stored
        bank.update(z64)
        ref.update(z64.cpu())
    torch.testing.assert_close(bank.bank.cpu(), ref.bank)
    torch.testing.assert_close(bank.m2.cpu(), ref.m2, rtol=1e-9, atol=1e-6)


def test_compiles_without_graph_break(kdev):
    bank = _bank(32, 8, "triton", kdev)
    ref = _bank(32, 8, "triton", kdev)
    backend = "inductor" if kdev.type == "cuda" else "eager"

    def step(b, z):
        b.update(z)
        return b.variance() * 2.0

    fn = torch.compile(step, fullgraph=True, backend=backend)
    for _ in range(3):
        z = torch.randn(12, 8, device=kdev)
        torch.testing.assert_close(fn(bank, z), step(ref, z))
    assert int(bank.count) == 36 and torch.equal(bank.bank, ref.bank)


def test_state_dict_roundtrip_old_layout_and_errors():
    bank = FeatureBank(8, 2, impl="torch")
    bank.update(torch.randn(5, 2))
    other = FeatureBank(8, 2)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.variance(), bank.variance()) and int(other.ptr) == 5
    # A checkpoint from before the streaming statistics: rows plus ptr/filled only.
    bank.update(torch.randn(6, 2))                              # wrapped: count 11, ptr 3
    old = {"bank": bank.bank.clone(), "ptr": torch.tensor(3), "filled": torch.tensor(8)}
    restored = FeatureBank(8, 2)
    restored.load_state_dict(old)
    assert int(restored.ptr) == 3 and int(restored.filled) == 8
    torch.testing.assert_close(restored.variance(), bank.variance())
    with pytest.raises(ValueError, match="expected B x 2"):
        bank.update(torch.randn(3, 4))
    with pytest.raises(ValueError):
        FeatureBank(1, 2)
    with pytest.raises(ValueError, match="choose one of"):
        FeatureBank(8, 2, impl="fast")


@pytest.mark.parametrize("block_b, per_sm", [(32, 2), (4, 2), (4, 64), (8, 3)])
def test_rotation_recompute_merges_row_chunks_exactly(kdev, block_b, per_sm):
    """The once-per-rotation recompute is split over row chunks (the last one uneven) and merged;
    every update that reaches the ring's end, a batch straddling it included, leaves float64
    statistics equal to a two-pass recompute over the stored rows, and the kernel's completion
    counters back at 0."""
    from fastsynth.kernels import feature_bank as fb
    from fastsynth.kernels._dispatch import tuned
    size, dim = 45, 21
    bank = _bank(size, dim, "triton", kdev)
    g = torch.Generator().manual_seed(5)
    rotations = 0
    with tuned(fb, block_b=block_b, programs_per_sm=per_sm, block_d=16):
        for b in [20, 20, 11, 45, 7, 30, 16, 44, 9]:
            before = int(bank.count) % size
            z = 1e3 + torch.randn(b, dim, generator=g) * (1 + torch.rand(dim, generator=g))
            bank.mean.fill_(float("nan"))            # poison: a recompute must rewrite every column
            bank.m2.fill_(float("nan"))
            bank.update(z.to(bank.bank.device))
            if before + b < size:                    # a streamed update reads the old statistics:
                bank.recompute()                     # put them back for the next one
                continue
            rotations += 1
            rows = bank.bank.cpu().double()
            torch.testing.assert_close(bank.mean.cpu(), rows.mean(dim=0), rtol=1e-13, atol=0)
            torch.testing.assert_close(bank.m2.cpu(), ((rows - rows.mean(dim=0)) ** 2).sum(dim=0), rtol=1e-10, atol=0)
            torch.testing.assert_close(bank.variance().cpu().double(), rows.var(dim=0), rtol=1e-6, atol=0)
            assert int(bank.done.abs().sum()) == 0
    assert rotations == 4


@pytest.mark.parametrize("impl", IMPLS)
def test_non_finite_rows_are_stored_and_counted_as_zero(impl, kdev):
    """NaN and +-inf entries enter the bank as 0 on both paths (the kernel cleans them as it
    reads z), on a streamed update and on a rotation's recompute, and the statistics stay finite
    and equal to those of the stored rows."""
    size, dim = 12, 5
    bank = _bank(size, dim, impl, kdev)
    g = torch.Generator().manual_seed(4)
    bad = torch.tensor([float("nan"), float("inf"), -float("inf")])
    for b in [5, 4, 3, 6]:                    # streamed, streamed, reaches the end, streamed
        z = torch.randn(b, dim, generator=g) + 3
        z[0, :3] = bad
        z[-1, 4] = float("nan")
        bank.update(z.to(bank.bank.device))
        expect = torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)
        last = (int(bank.count) - b + torch.arange(b)) % size
        assert torch.equal(bank.bank.cpu()[last], expect)
        rows = bank.bank.cpu()[: int(bank.filled)].double()
        torch.testing.assert_close(bank.variance().cpu().double(), rows.var(dim=0), rtol=1e-5, atol=1e-6)
        assert torch.isfinite(bank.m2).all() and torch.isfinite(bank.mean).all()


@pytest.mark.parametrize("per_sm, b", [(64, 9), (64, 3), (3, 17)])
def test_streamed_update_splits_the_batch_over_programs(kdev, per_sm, b):
    """The batch is shared among a column slice's programs, some holding one row and some none
    (more programs than rows), or uneven shares; the merged float64 statistics equal a
    two-pass recompute over the stored rows after each streamed update."""
    from fastsynth.kernels import feature_bank as fb
    from fastsynth.kernels._dispatch import tuned
    size, dim = 60, 19
    bank = _bank(size, dim, "triton", kdev)
    g = torch.Generator().manual_seed(6)
    streamed = 0
    with tuned(fb, block_b=4, programs_per_sm=per_sm, block_d=16, merge_tile=32):
        while streamed < 8:
            before = int(bank.count) % size
            bank.update((50 + torch.randn(b, dim, generator=g)).to(bank.bank.device))
            if before + b >= size:             # a rotation: recomputed, tested elsewhere
                continue
            streamed += 1
            rows = bank.bank.cpu()[: int(bank.filled)].double()
            torch.testing.assert_close(bank.mean.cpu(), rows.mean(dim=0), rtol=1e-12, atol=0)
            torch.testing.assert_close(bank.m2.cpu(), ((rows - rows.mean(dim=0)) ** 2).sum(dim=0),
                                       rtol=1e-8, atol=0)
            assert int(bank.done.abs().sum()) == 0


def test_eager_updates_launch_directly_with_the_ops_state(kdev, monkeypatch):
    """An eager update launches the kernel itself (no registered op's dispatch layers) and leaves
    the state the registered op leaves."""
    from fastsynth.kernels import feature_bank as fb
    calls = []
    launch = fb._launch
    monkeypatch.setattr(fb, "_launch", lambda *a, **kw: calls.append(kw.get("direct", False)) or launch(*a, **kw))
    a, b = _bank(20, 6, "triton", kdev), _bank(20, 6, "triton", kdev)
    g = torch.Generator().manual_seed(9)
    for n in (7, 9, 8):
        z = (3 + torch.randn(n, 6, generator=g)).to(kdev)
        a.update(z)
        torch.ops.fastsynth.feature_bank_update(z, b.bank, b.count, b.mean, b.m2, b.var, b.done)
    assert calls == [True, False] * 3
    for name in ("bank", "count", "mean", "m2", "var"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
