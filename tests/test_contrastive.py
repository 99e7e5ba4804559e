"""NT-Xent (the flagship's neighbour-view loss) against a naive per-row computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clusterlight.nn.contrastive import nt_xent


def _naive_nt_xent(a: np.ndarray, b: np.ndarray, t: float, w: np.ndarray | None = None) -> float:
    z = np.concatenate([a, b])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n = len(a)
    total = weights = 0.0
    for i in range(2 * n):
        pos = i + n if i < n else i - n
        wi = 1.0 if w is None else float(w[i % n])
        others = [math.exp(float(z[i] @ z[j]) / t) for j in range(2 * n) if j != i]
        total += -wi * math.log(math.exp(float(z[i] @ z[pos]) / t) / sum(others))
        weights += wi
    return total / weights


@pytest.mark.parametrize("t", [0.1, 0.5, 2.0])
def test_nt_xent_matches_the_naive_loop(t: float) -> None:
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(7, 5)), rng.normal(size=(7, 5)) * 3
    got = nt_xent(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), t)
    assert float(got) == pytest.approx(_naive_nt_xent(a, b, t), rel=1e-5)


def test_weighted_nt_xent_matches_the_naive_loop() -> None:
    """Per-pair weights: the weighted mean over rows, both rows of a pair with the pair's weight."""
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    w = np.array([0.2, 3.0, 1.0, 0.0, 0.7, 1.5])
    ta, tb = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    got = nt_xent(ta, tb, 0.5, torch.as_tensor(w, dtype=torch.float32))
    assert float(got) == pytest.approx(_naive_nt_xent(a, b, 0.5, w), rel=1e-5)
    assert float(got) != pytest.approx(_naive_nt_xent(a, b, 0.5), rel=1e-3)  # the weights matter here
    # equal weights give the unweighted loss
    assert float(nt_xent(ta, tb, 0.5, torch.full((6,), 2.5))) == pytest.approx(float(nt_xent(ta, tb, 0.5)), rel=1e-6)
    with pytest.raises(ValueError, match="a weight per pair"):
        nt_xent(ta, tb, 0.5, torch.ones(12))


def test_nt_xent_is_low_for_matching_views_and_rejects_bad_shapes() -> None:
    rng = np.random.default_rng(4)
    a = torch.as_tensor(rng.normal(size=(16, 8)), dtype=torch.float32)
    same = nt_xent(a, a * 2.0, 0.1)  # each pair points the same way: positives dominate
    shuffled = nt_xent(a, a[torch.randperm(16, generator=torch.Generator().manual_seed(0))] * 2.0, 0.1)
    assert float(same) < float(shuffled)
    with pytest.raises(ValueError, match="one shape"):
        nt_xent(a, a[:3])
