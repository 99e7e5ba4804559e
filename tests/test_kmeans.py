"""Tests of :mod:`clusterlight.cluster.kmeans` in a single process (CPU, small data)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from clusterlight.cluster.kmeans import (
    KMeansResult,
    _split_matmul,
    assign,
    distributed_kmeans,
    kmeans,
    kmeans_plusplus,
)
from clusterlight.errors import ClusterlightError


# One torch thread per test comes from the autouse fixture in conftest.py.


@pytest.fixture(scope="module")
def blobs() -> tuple[np.ndarray, np.ndarray]:
    x, y = make_blobs(n_samples=2000, n_features=10, centers=5, cluster_std=1.0, random_state=0)
    return x.astype(np.float32), y


def test_blobs_match_truth_and_sklearn(blobs):
    x, y = blobs
    res = kmeans(torch.from_numpy(x), 5, seed=0)
    assert isinstance(res, KMeansResult)
    assert res.centers.shape == (5, 10) and res.centers.dtype == torch.float32
    assert res.labels.shape == (2000,) and res.labels.dtype == torch.long
    assert adjusted_rand_score(y, res.labels.numpy()) == 1.0
    ref = KMeans(n_clusters=5, n_init=10, random_state=0).fit(x.astype(np.float64))
    assert abs(res.inertia - ref.inertia_) <= 1e-3 * ref.inertia_
    assert 1 <= res.n_iter <= 100


def test_uniform_inertia_close_to_sklearn():
    x = torch.rand(1500, 8, generator=torch.Generator().manual_seed(3))
    res = kmeans(x, 8, n_init=3, seed=0)
    ref = KMeans(n_clusters=8, n_init=3, random_state=0).fit(x.double().numpy())
    assert res.inertia <= 1.02 * ref.inertia_
    # The reported inertia is the inertia of the returned centres and labels.
    direct = ((x.double() - res.centers.double()[res.labels]) ** 2).sum().item()
    assert res.inertia == pytest.approx(direct, rel=1e-5)


@pytest.mark.parametrize("offset", [0.0, 50.0])
@pytest.mark.parametrize("chunk_size", [7, 8192])
def test_assign_matches_naive_cdist(offset, chunk_size):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=gen, dtype=torch.float64) + offset
    centers = torch.randn(9, 6, generator=gen, dtype=torch.float64) + offset
    full = torch.cdist(x, centers)
    labels, sq = assign(x.float(), centers.float(), chunk_size=chunk_size)
    assert labels.dtype == torch.long and sq.dtype == torch.float32
    assert torch.equal(labels, full.argmin(1))
    torch.testing.assert_close(sq.double(), full.min(1).values ** 2, rtol=1e-4, atol=1e-4)
    labels64, sq64 = assign(x, centers, chunk_size=chunk_size)
    assert sq64.dtype == torch.float64
    assert torch.equal(labels64, full.argmin(1))
    torch.testing.assert_close(sq64, full.min(1).values ** 2)


def test_fixed_point_labels_and_centres_consistent():
    x = torch.randn(1200, 5, generator=torch.Generator().manual_seed(1)) * 3 + 10
    res = kmeans(x, 7, tol=0.0, max_iter=500, chunk_size=256, seed=2)
    assert res.n_iter < 500  # reached a fixed point
    labels, _ = assign(x, res.centers)
    assert torch.equal(labels, res.labels)
    xn, ln = x.double().numpy(), res.labels.numpy()
    means = np.stack([xn[ln == j].mean(0) for j in range(7)])
    np.testing.assert_allclose(res.centers.numpy(), means, rtol=1e-5, atol=1e-5)


def test_same_seed_same_result_and_global_rng_untouched(blobs):
    x = torch.from_numpy(blobs[0])
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    a = kmeans(x, 6, seed=7)
    b = kmeans(x, 6, seed=7)
    c = kmeans(x, 6, seed=7, init="random")
    _ = kmeans_plusplus(x, 6, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.centers, b.centers) and torch.equal(a.labels, b.labels)
    assert a.inertia == b.inertia and a.n_iter == b.n_iter
    assert torch.isfinite(c.centers).all()
    # Different seeds draw different k-means++ seeds.
    assert not torch.equal(kmeans_plusplus(x, 6, seed=0), kmeans_plusplus(x, 6, seed=1))


def test_kmeans_plusplus_returns_distinct_data_rows(blobs):
    x = torch.from_numpy(blobs[0])
    centers = kmeans_plusplus(x, 5, seed=0)
    assert centers.shape == (5, 10)
    d = torch.cdist(centers.double(), x.double())
    assert (d.min(1).values < 1e-4).all()  # each centre is a data point
    truth = torch.from_numpy(blobs[1])
    owner = truth[d.argmin(1)]
    assert len(set(owner.tolist())) == 5  # D² sampling on separated blobs hits every blob


@pytest.mark.parametrize("k", [5, 30])
def test_duplicated_points_more_clusters_than_distinct(k):
    base = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, -2.0]])
    x = base.repeat(10, 1)  # 30 points, 3 distinct
    res = kmeans(x, k, seed=0)
    assert res.centers.shape == (k, 2)
    assert torch.isfinite(res.centers).all()
    assert res.inertia == pytest.approx(0.0, abs=1e-6)
    assert res.labels.min() >= 0 and res.labels.max() < k


def test_empty_cluster_reseeded_from_farthest_point():
    x, y = make_blobs(n_samples=600, n_features=4, centers=3, cluster_std=0.5, random_state=2)
    x = torch.from_numpy(x).float()
    # Two centres on blobs 0 and 1 (as one joint centre of blob 1 and 2 would be), one far away.
    start = torch.stack([x[y == 0].mean(0), x[(y == 1) | (y == 2)].mean(0), torch.full((4,), 1e4)])
    res = kmeans(x, 3, init=start)
    assert torch.isfinite(res.centers).all()
    assert adjusted_rand_score(y, res.labels.numpy()) == 1.0


def test_half_input_is_upcast(blobs):
    x, y = blobs
    res = kmeans(torch.from_numpy(x).half(), 5)
    assert res.centers.dtype == torch.float32
    assert adjusted_rand_score(y, res.labels.numpy()) == 1.0
    res64 = kmeans(torch.from_numpy(x).double(), 5)
    assert res64.centers.dtype == torch.float64
    assert adjusted_rand_score(y, res64.labels.numpy()) == 1.0


def test_distributed_kmeans_without_process_group_equals_kmeans(blobs):
    x = torch.from_numpy(blobs[0])
    a, b = kmeans(x, 4, seed=3), distributed_kmeans(x, 4, seed=3)
    assert torch.equal(a.centers, b.centers) and torch.equal(a.labels, b.labels)


def test_k_equals_n():
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    res = kmeans(x, 6)
    assert res.inertia == pytest.approx(0.0, abs=1e-6)
    assert sorted(res.labels.tolist()) == list(range(6))


@pytest.mark.parametrize(
    "kwargs",
    [{"k": 11}, {"k": 0}, {"k": 2, "init": "bogus"}, {"k": 2, "n_init": 0}, {"k": 2, "tol": -1.0}],
)
def test_bad_arguments_raise(kwargs):
    x = torch.randn(10, 2)
    with pytest.raises(ClusterlightError):
        kmeans(x, **kwargs)


def test_non_finite_input_raises():
    x = torch.randn(10, 2)
    x[3, 1] = float("nan")
    with pytest.raises(ClusterlightError, match="NaN"):
        kmeans(x, 2)


def test_split_matmul_keeps_float32_accuracy():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(50, 40, generator=gen) * 100
    b = torch.randn(30, 40, generator=gen)
    exact = a.double() @ b.double().T
    torch.testing.assert_close(_split_matmul(a, b).double(), exact, rtol=1e-5, atol=1e-3)
