"""fastsynth.metrics against independent brute-force computations (CPU, a few seconds)."""
import math

import numpy as np
import pytest
import torch

from fastsynth.metrics import knn, linear_probe, retrieval, stratified_subset


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # these tensors are tiny: intra-op threads only add sync cost, which grows ~40x when the
    # CI machine's cores are busy with other jobs
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _brute_retrieval(x, labels):
    """Python-loop retrieval with the documented rule: descending cosine, ties by index."""
    x = np.asarray(x, dtype=np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    labels = list(labels)
    n = len(labels)
    r1 = r5 = ap_sum = 0.0
    count = 0
    for i in range(n):
        num_rel = sum(labels[j] == labels[i] for j in range(n) if j != i)
        if num_rel == 0:
            continue
        others = sorted((j for j in range(n) if j != i), key=lambda j: (-float(x[i] @ x[j]), j))
        rel = [labels[j] == labels[i] for j in others]
        r1 += any(rel[:1])
        r5 += any(rel[:5])
        hits, ap = 0, 0.0
        for pos, r in enumerate(rel, start=1):
            if r:
                hits += 1
                ap += hits / pos
        ap_sum += ap / num_rel
        count += 1
    return {"rank1": r1 / count, "rank5": r5 / count, "mAP": ap_sum / count}


def _labels_with_singletons(n, num_classes, gen):
    y = torch.randint(0, num_classes, (n,), generator=gen)
    y[:2] = torch.tensor([100, 101])  # two singleton classes
    return y


@pytest.mark.parametrize("block_size", [1, 5, 16, 37, 1000])
def test_retrieval_matches_sklearn_on_continuous_data(block_size):
    sk = pytest.importorskip("sklearn.metrics")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 8, generator=gen, dtype=torch.float64)  # no ties
    y = _labels_with_singletons(37, 5, gen)
    got = retrieval(x, y, block_size=block_size)

    xn = (x / x.norm(dim=1, keepdim=True)).numpy()
    yn = y.numpy()
    r1, r5, aps = [], [], []
    for i in range(len(yn)):
        mask = np.arange(len(yn)) != i
        rel, score = yn[mask] == yn[i], xn[mask] @ xn[i]
        if not rel.any():
            continue  # singleton: excluded
        top = np.argsort(-score)
        r1.append(rel[top[:1]].any())
        r5.append(rel[top[:5]].any())
        aps.append(sk.average_precision_score(rel, score))
    assert got["rank1"] == pytest.approx(np.mean(r1), abs=1e-12)
    assert got["rank5"] == pytest.approx(np.mean(r5), abs=1e-12)
    assert got["mAP"] == pytest.approx(np.mean(aps), abs=1e-9)


@pytest.mark.parametrize("block_size", [1, 7, 40, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_retrieval_with_duplicates_and_ties_matches_brute_force(block_size, dtype):
    # +-1 entries in 4-D: 16 patterns for 40 samples, so many duplicates; the unit vectors have
    # entries +-0.5, so every cosine is an exact multiple of 0.25 and ties are exact.
    gen = torch.Generator().manual_seed(1)
    x = (torch.randint(0, 2, (40, 4), generator=gen) * 2 - 1).to(dtype)
    y = _labels_with_singletons(40, 4, gen)
    got = retrieval(x, y, block_size=block_size)
    want = _brute_retrieval(x.double().numpy(), y.tolist())
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key


def test_retrieval_tie_rule_hand_built():
    # Query 0 = e1 sees samples 1 and 2 tied at cosine 0; the lower index (1, other class) ranks
    # first. Worked by hand: rank1 = 1/4, rank5 = 1, AP per query = 1/2, 1/3, 1/2, 1.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    got = retrieval(x, [0, 1, 0, 1])
    assert got["rank1"] == pytest.approx(0.25)
    assert got["rank5"] == pytest.approx(1.0)
    assert got["mAP"] == pytest.approx((0.5 + 1 / 3 + 0.5 + 1.0) / 4)


def test_retrieval_perfect_clusters_and_singleton_exclusion():
    gen = torch.Generator().manual_seed(2)
    centers = torch.eye(6)[:5] * 10
    y = torch.arange(5).repeat_interleave(9)
    x = centers[y] + 0.1 * torch.randn(45, 6, generator=gen)
    for block_size in (4, 1024):
        assert retrieval(x, y, block_size=block_size) == {"rank1": 1.0, "rank5": 1.0, "mAP": 1.0}
    # a singleton along the 6th axis: excluded as a query, and it ranks after every
    # same-class item of the other queries, so nothing changes
    xs = torch.cat([x, torch.tensor([[0, 0, 0, 0, 0, 10.0]])])
    ys = torch.cat([y, torch.tensor([99])])
    assert retrieval(xs, ys, block_size=8) == {"rank1": 1.0, "rank5": 1.0, "mAP": 1.0}
    # string labels work too (retrieval only compares labels)
    assert retrieval(x, [f"c{v}" for v in y.tolist()])["mAP"] == 1.0


def test_retrieval_blocked_equals_unblocked():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(101, 16, generator=gen)
    y = torch.randint(0, 7, (101,), generator=gen)
    full = retrieval(x, y, block_size=101)
    for block_size in (1, 3, 10, 50, 100, 4096):
        got = retrieval(x, y, block_size=block_size)
        for key in full:
            assert got[key] == pytest.approx(full[key], abs=1e-6), (block_size, key)


def test_retrieval_rejects_bad_input():
    x = torch.randn(6, 3)
    with pytest.raises(ValueError, match="2-D"):
        retrieval(torch.randn(6), [0] * 6)
    with pytest.raises(ValueError, match="one entry per feature row"):
        retrieval(x, [0] * 5)
    with pytest.raises(ValueError, match="at least 2"):
        retrieval(x[:1], [0])
    with pytest.raises(ValueError, match="singletons"):
        retrieval(x, list(range(6)))
    with pytest.raises(ValueError, match="block_size"):
        retrieval(x, [0] * 6, block_size=0)
    with pytest.raises(ValueError, match="NaN"):
        retrieval(torch.full((6, 3), math.nan), [0] * 6)


def _brute_knn(xtr, ytr, xte, yte, k, t, c):
    xtr = xtr.double() / xtr.double().norm(dim=1, keepdim=True)
    xte = xte.double() / xte.double().norm(dim=1, keepdim=True)
    correct = 0
    for i in range(len(yte)):
        sims = [(float(xte[i] @ xtr[j]), j) for j in range(len(ytr))]
        votes = [0.0] * c
        for s, j in sorted(sims, reverse=True)[:k]:
            votes[int(ytr[j])] += math.exp(s / t)
        correct += max(range(c), key=lambda cl: votes[cl]) == int(yte[i])
    return correct / len(yte)


@pytest.mark.parametrize("k,t,block_size", [(1, 0.07, 5), (20, 0.07, 1024), (7, 0.5, 3),
                                            (200, 0.1, 16)])
def test_knn_matches_brute_force(k, t, block_size):
    gen = torch.Generator().manual_seed(4)
    xtr, xte = torch.randn(83, 10, generator=gen), torch.randn(29, 10, generator=gen)
    ytr, yte = torch.randint(0, 4, (83,), generator=gen), torch.randint(0, 4, (29,), generator=gen)
    got = knn(xtr, ytr, xte, yte, k=k, temperature=t, block_size=block_size)
    assert got == pytest.approx(_brute_knn(xtr, ytr, xte, yte, min(k, 83), t, 4))


def test_knn_clustered_and_errors():
    gen = torch.Generator().manual_seed(5)
    centers = torch.randn(5, 32, generator=gen) * 10
    ytr, yte = torch.arange(5).repeat(20), torch.arange(5).repeat(8)
    xtr = centers[ytr] + torch.randn(100, 32, generator=gen)
    xte = centers[yte] + torch.randn(40, 32, generator=gen)
    assert knn(xtr, ytr, xte, yte, temperature=0.01) == 1.0
    with pytest.raises(ValueError, match="num_classes"):
        knn(xtr, ytr, xte, yte, num_classes=3)
    with pytest.raises(ValueError, match="differ"):
        knn(xtr, ytr, xte[:, :5], yte)
    with pytest.raises(TypeError, match="integer"):
        knn(xtr, ytr.float(), xte, yte)


def _gaussian_clusters(centers, n_per_class, gen):
    y = torch.arange(len(centers)).repeat_interleave(n_per_class)
    return centers[y] + torch.randn(len(y), centers.shape[1], generator=gen), y


def test_linear_probe_separable_and_deterministic():
    gen = torch.Generator().manual_seed(6)
    centers = torch.randn(5, 64, generator=gen) * 2  # centre distance ~16, noise std 1 per dim
    xtr, ytr = _gaussian_clusters(centers, 60, gen)
    xte, yte = _gaussian_clusters(centers, 40, gen)
    # a tiny feature scale must not matter: standardisation removes it
    got = linear_probe(xtr * 1e-3, ytr, xte * 1e-3, yte, epochs=30)
    assert got == {"top1": 1.0, "top5": 1.0}
    a = linear_probe(xtr, ytr, xte, yte, epochs=3, seed=1)
    b = linear_probe(xtr, ytr, xte, yte, epochs=3, seed=1)
    assert a == b


def test_linear_probe_random_labels_near_chance():
    gen = torch.Generator().manual_seed(7)
    xtr, xte = torch.randn(500, 64, generator=gen), torch.randn(500, 64, generator=gen)
    ytr, yte = torch.randint(0, 5, (500,), generator=gen), torch.randint(0, 5, (500,), generator=gen)
    got = linear_probe(xtr, ytr, xte, yte, epochs=20)
    assert got["top1"] < 0.3  # chance 0.2; 500 test samples give a std of about 0.018
    assert got["top5"] == 1.0  # only 5 classes


def test_linear_probe_rejects_bad_input():
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    with pytest.raises(ValueError, match="epochs"):
        linear_probe(x, y, x, y, epochs=0)
    with pytest.raises(ValueError, match=">= 0"):
        linear_probe(x, y - 5, x, y)


def test_stratified_subset():
    y = torch.tensor([0] * 10 + [1] * 5 + [2] * 1 + [3] * 3)
    idx = stratified_subset(y, 0.5, seed=3)
    counts = torch.bincount(y[idx], minlength=4).tolist()
    assert counts == [5, 3, 1, 2]  # max(1, round-half-up(0.5 * n_c))
    assert torch.equal(idx, stratified_subset(y.tolist(), 0.5, seed=3))  # deterministic
    assert idx.dtype == torch.long and torch.equal(idx, idx.unique())
    assert torch.bincount(y[stratified_subset(y, 0.01)], minlength=4).tolist() == [1, 1, 1, 1]
    assert torch.equal(stratified_subset(y, 1.0), torch.arange(len(y)))
    # one seed: 20 % is a subset of 50 %; another seed draws differently
    big = torch.arange(1000) % 10
    s20, s50 = stratified_subset(big, 0.2, seed=0), stratified_subset(big, 0.5, seed=0)
    assert set(s20.tolist()) <= set(s50.tolist()) and len(s20) == 200
    assert not torch.equal(s20, stratified_subset(big, 0.2, seed=1))
    for bad in (0.0, -0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="fraction"):
            stratified_subset(y, bad)
