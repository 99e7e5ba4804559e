"""Mutual neighbour pairs (``mutual_neighbours``) against a naive loop and a hand-made case."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from clusterlight.errors import ClusterlightError
from clusterlight.methods.neighbours import mutual_knn


def _naive(table: np.ndarray) -> tuple[list[list[int]], list[int]]:
    rows = [set(r.tolist()) for r in table]
    kept = [[int(j) for j in table[i] if i in rows[j]] for i in range(len(table))]
    return kept, [len(r) for r in kept]


def test_mutual_knn_by_hand() -> None:
    """Points 0, 1, 3, 10 on a line, k = 1: 0 <-> 1 are mutual; 3 -> 1 and 10 -> 3 are not returned."""
    x = np.array([[0.0], [1.0], [3.0], [10.0]])
    table = torch.from_numpy(NearestNeighbors(n_neighbors=2).fit(x).kneighbors(x)[1][:, 1:])
    assert table.squeeze(1).tolist() == [1, 0, 1, 2]
    kept, count = mutual_knn(table)
    assert count.tolist() == [1, 1, 0, 0]
    assert kept.squeeze(1).tolist() == [1, 0, 2, 3]  # rows without a mutual neighbour hold themselves


@pytest.mark.parametrize("chunk_rows", [7, 8192])
@pytest.mark.parametrize("k", [1, 4, 9])
def test_mutual_knn_matches_a_naive_loop(k: int, chunk_rows: int) -> None:
    """Random points with clusters of very different density (the case the option is for); rows
    in chunks of 7 (the last one shorter) or all at once."""
    rng = np.random.default_rng(k)
    dense = rng.normal(0.0, 0.3, (150, 5))
    sparse = rng.normal(0.0, 3.0, (30, 5)) + 2.0
    x = np.concatenate([dense, sparse])
    table = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)[1][:, 1:]
    kept, count = mutual_knn(torch.from_numpy(table), chunk_rows=chunk_rows)
    ref_kept, ref_count = _naive(table)
    assert count.tolist() == ref_count
    for i, (row, ref) in enumerate(zip(kept.tolist(), ref_kept)):
        assert row[: len(ref)] == ref  # the mutual ones first, nearest first
        assert row[len(ref):] == [i] * (k - len(ref))
    # the sparse points lose more of their neighbours than the dense ones
    frac = count.float() / k
    assert frac[150:].mean() < frac[:150].mean()
    assert (count == 0).any() or k == 9


@pytest.mark.parametrize("method", ["DebiasedClustering", "OnlineHardClustering"])
def test_draws_pick_only_mutual_neighbours(monkeypatch, method: str) -> None:
    """``mutual_neighbours=True`` (both methods that take it): every drawn view is a mutual neighbour
    of the sample, or the sample itself when it has none; every mutual neighbour of a sample is drawn."""
    import clusterlight.methods

    gen = torch.Generator().manual_seed(0)
    n, k = 30, 4
    pixels = torch.randint(0, 256, (n, 1, 8, 8), generator=gen, dtype=torch.uint8)
    model = getattr(clusterlight.methods, method)(num_clusters=3, input_shape=(1, 8, 8), latent_dim=6, widths=[4, 8],
                                                  norm="none", neighbours=k, mutual_neighbours=True)
    flat = pixels.flatten(1).float().numpy()
    table = NearestNeighbors(n_neighbors=k + 1).fit(flat).kneighbors(flat)[1][:, 1:]
    model._set_neighbour_table(torch.from_numpy(table), "test")
    monkeypatch.setattr(model, "_datamodule", lambda: SimpleNamespace(train_dataset=SimpleNamespace(images=pixels)))
    ref_kept, _ = _naive(table)
    everyone = torch.arange(n)
    seen: list[set[int]] = [set() for _ in range(n)]
    for step in range(60):
        view = model._neighbour_images(everyone, step)
        for i in range(n):
            match = [j for j in range(n) if torch.equal(view[i], pixels[j].float() / 255.0)]
            allowed = set(ref_kept[i]) or {i}
            assert any(j in allowed for j in match), (i, match, allowed)
            seen[i].update(j for j in match if j in allowed)
    for i in range(n):
        assert seen[i] == (set(ref_kept[i]) or {i})


@pytest.mark.parametrize("method", ["DebiasedClustering", "OnlineHardClustering"])
def test_mutual_neighbours_needs_neighbours(method: str) -> None:
    import clusterlight.methods

    with pytest.raises(ClusterlightError, match="mutual_neighbours needs neighbours > 0"):
        getattr(clusterlight.methods, method)(mutual_neighbours=True)
