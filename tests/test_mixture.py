"""The torch diagonal-Gaussian EM against scikit-learn's GaussianMixture(covariance_type="diag")."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture

from clusterlight.cluster.mixture import diag_gmm_em, one_hot


@pytest.mark.parametrize("seed", [0, 1])
def test_diag_em_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sizes, k, d = [400, 60, 15], 3, 4  # imbalanced components of different spreads
    x = np.concatenate([rng.normal(3 * c, 0.5 + c, (n, d)) for c, n in enumerate(sizes)]).astype(np.float64)
    labels = rng.integers(0, k, len(x))  # a poor start: EM has work to do
    labels[:k] = np.arange(k)
    resp0 = np.eye(k)[labels]
    n = resp0.sum(0)
    means = resp0.T @ x / n[:, None]
    var = resp0.T @ (x * x) / n[:, None] - means**2 + 1e-6
    iters = 15
    ref = GaussianMixture(k, covariance_type="diag", weights_init=n / n.sum(), means_init=means,
                          precisions_init=1.0 / var, max_iter=iters, tol=0.0, reg_covar=1e-6).fit(x)
    # one more M-step here: ours starts from the responsibilities, sklearn from their parameters
    resp, weights, mu, variances = diag_gmm_em(torch.as_tensor(x, dtype=torch.float32), one_hot(torch.as_tensor(labels), k),
                                               iters=iters + 1, reg=1e-6, tol=-float("inf"))
    np.testing.assert_allclose(weights.numpy(), ref.weights_, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(mu.numpy(), ref.means_, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(variances.numpy(), ref.covariances_, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(resp.sum(1).numpy(), 1.0, atol=1e-5)
    assert (resp.argmax(1).numpy() == ref.predict(x)).mean() > 0.99


def test_em_stops_when_converged() -> None:
    x = torch.cat([torch.zeros(50, 2), torch.full((50, 2), 10.0)]) + torch.randn(100, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.cat([torch.zeros(50), torch.ones(50)]).long()
    resp, weights, _, _ = diag_gmm_em(x, one_hot(labels, 2), iters=1000)
    assert torch.equal(resp.argmax(1), labels)
    torch.testing.assert_close(weights, torch.tensor([0.5, 0.5]), atol=1e-4, rtol=0)
