"""FeatureBank (Sec. 3.4): FIFO contents and per-dimension variance over the stored rows."""
import collections

import pytest
import torch

from fastsynth.kernels import FeatureBank


def test_variance_matches_torch_var_after_wraparound():
    size, dim = 50, 7
    bank = FeatureBank(size, dim)
    shadow = collections.deque(maxlen=size)  # independent FIFO model of what the bank holds
    g = torch.Generator().manual_seed(0)
    for b in [13, 13, 24, 7, 50, 3, 31, 60]:  # wraps several times; one batch larger than the bank
        z = torch.randn(b, dim, generator=g) * 3 + 100
        bank.update(z)
        shadow.extend(z.unbind(0))
        rows = torch.stack(list(shadow))
        torch.testing.assert_close(bank.variance(), rows.var(dim=0), rtol=1e-4, atol=1e-4)
        assert int(bank.filled) == len(shadow)
    # Same multiset of rows as the shadow FIFO (order within the ring differs)
    stored = bank.bank[: int(bank.filled)]
    assert torch.equal(stored.sort(dim=0).values, torch.stack(list(shadow)).sort(dim=0).values)


def test_partial_fill_and_empty():
    bank = FeatureBank(10, 3)
    assert torch.equal(bank.variance(), torch.zeros(3))
    z = torch.randn(4, 3)
    bank.update(z)
    torch.testing.assert_close(bank.variance(), z.var(dim=0))


def test_state_dict_roundtrip_and_errors():
    bank = FeatureBank(8, 2)
    bank.update(torch.randn(5, 2))
    other = FeatureBank(8, 2)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.variance(), bank.variance()) and int(other.ptr) == 5
    with pytest.raises(ValueError, match="expected B x 2"):
        bank.update(torch.randn(3, 4))
    with pytest.raises(ValueError):
        FeatureBank(1, 2)
