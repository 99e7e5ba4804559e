"""NT-Xent (the flagship's neighbour-view loss) against a naive per-row computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clusterlight.nn.contrastive import nt_xent


def _naive_nt_xent(a: np.ndarray, b: np.ndarray, t: float) -> float:
    z = np.concatenate([a, b])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n = len(a)
    total = 0.0
    for i in range(2 * n):
        pos = i + n if i < n else i - n
        others = [math.exp(float(z[i] @ z[j]) / t) for j in range(2 * n) if j != i]
        total += -math.log(math.exp(float(z[i] @ z[pos]) / t) / sum(others))
    return total / (2 * n)


@pytest.mark.parametrize("t", [0.1, 0.5, 2.0])
def test_nt_xent_matches_the_naive_loop(t: float) -> None:
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(7, 5)), rng.normal(size=(7, 5)) * 3
    got = nt_xent(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), t)
    assert float(got) == pytest.approx(_naive_nt_xent(a, b, t), rel=1e-5)


def test_nt_xent_is_low_for_matching_views_and_rejects_bad_shapes() -> None:
    rng = np.random.default_rng(4)
    a = torch.as_tensor(rng.normal(size=(16, 8)), dtype=torch.float32)
    same = nt_xent(a, a * 2.0, 0.1)  # each pair points the same way: positives dominate
    shuffled = nt_xent(a, a[torch.randperm(16, generator=torch.Generator().manual_seed(0))] * 2.0, 0.1)
    assert float(same) < float(shuffled)
    with pytest.raises(ValueError, match="one shape"):
        nt_xent(a, a[:3])
