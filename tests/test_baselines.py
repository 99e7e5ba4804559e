"""Baselines' building blocks against hand-written references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import entropy

from clusterlight.methods.ae_kmeans import squared_distances, student_t
from clusterlight.methods.dec import dec_kl, target_distribution
from clusterlight.nn import ConvAutoencoder


def test_student_t_matches_formula() -> None:
    g = torch.Generator().manual_seed(0)
    z, mu = torch.randn(7, 3, generator=g), torch.randn(4, 3, generator=g)
    for alpha in (1.0, 2.5):
        q = student_t(squared_distances(z, mu), alpha).numpy()
        ref = np.zeros((7, 4))
        for i in range(7):
            for j in range(4):
                ref[i, j] = (1 + np.sum((z[i].numpy() - mu[j].numpy()) ** 2) / alpha) ** (-(alpha + 1) / 2)
        ref /= ref.sum(1, keepdims=True)
        np.testing.assert_allclose(q, ref, rtol=1e-5)


def test_target_distribution_matches_dec_paper() -> None:
    q = torch.softmax(torch.randn(20, 5, generator=torch.Generator().manual_seed(1)), 1)
    p = target_distribution(q).numpy()
    qn = q.numpy()
    f = qn.sum(0)
    ref = np.array([[qn[i, j] ** 2 / f[j] for j in range(5)] for i in range(20)])
    ref /= ref.sum(1, keepdims=True)
    np.testing.assert_allclose(p, ref, rtol=1e-5)
    # sharpening: the target is more confident than q on average
    assert (p.max(1) >= qn.max(1) - 1e-6).mean() > 0.9


def test_dec_kl_matches_scipy() -> None:
    g = torch.Generator().manual_seed(2)
    p, q = torch.softmax(torch.randn(6, 4, generator=g), 1), torch.softmax(torch.randn(6, 4, generator=g), 1)
    ref = np.mean([entropy(p[i].numpy(), q[i].numpy()) for i in range(6)])
    assert float(dec_kl(p, q)) == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 16, 16), (1, 28, 28), (3, 32, 32), (3, 96, 96), (1, 12, 20)])
def test_autoencoder_restores_every_input_shape(shape) -> None:
    ae = ConvAutoencoder(shape, latent_dim=7, widths=(8, 16))
    x = torch.rand(2, *shape)
    z, recon = ae(x)
    assert z.shape == (2, 7) and recon.shape == x.shape
    assert float(recon.min()) >= 0 and float(recon.max()) <= 1
