"""Gaussian mixtures for :class:`~clusterlight.methods.DebiasedClustering`'s initial partition.

- :func:`diag_gmm_em` -- a diagonal mixture fitted by EM in torch (float32, any device, no global
  RNG), from given responsibilities (``init_partition: kmeans``: a k-means partition).
- :func:`full_gmm` -- a full-covariance mixture (scikit-learn, locally seeded), the best
  likelihood of k-means and k-means++ starts (``init_partition: gmm``).

Unlike k-means, a mixture with per-cluster means, covariances and weights (cardinalities) lets a
small, tight cluster keep its points next to a big, spread one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from clusterlight.precision import float32_math


@float32_math
def diag_gmm_em(x: Tensor, resp: Tensor, iters: int = 100, reg: float = 1e-6,
                tol: float = 1e-6) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EM for a diagonal Gaussian mixture, started from responsibilities ``resp (N, K)``.

    Each iteration is an M-step (weights, means, variances from the responsibilities; ``reg``
    added to every variance, as scikit-learn's ``reg_covar``) then an E-step. It stops after
    ``iters`` iterations or when the mean log-likelihood improves by less than ``tol``.

    Returns ``(resp, weights (K,), means (K, D), variances (K, D))``, the responsibilities being
    those of the returned parameters.
    """
    x, resp = x.float(), resp.float()
    prev = -math.inf
    for _ in range(max(1, iters)):
        n = resp.sum(0) + 1e-10
        weights = n / n.sum()
        means = resp.T @ x / n[:, None]
        variances = (resp.T @ (x * x)) / n[:, None] - means * means + reg
        variances = variances.clamp_min(reg)
        inv = 1.0 / variances
        maha = (x * x) @ inv.T - 2.0 * x @ (means * inv).T + (means * means * inv).sum(1)
        log_p = -0.5 * (maha + torch.log(variances).sum(1) + x.shape[1] * math.log(2 * math.pi)) + weights.log()
        log_norm = torch.logsumexp(log_p, dim=1, keepdim=True)
        resp = (log_p - log_norm).exp()
        ll = float(log_norm.mean())
        if ll - prev < tol:
            break
        prev = ll
    return resp, weights, means, variances


def full_gmm(x: Tensor, k: int, n_init: int, seed: int, max_iter: int = 100, reg_covar: float = 1e-5) -> Tensor:
    """Responsibilities ``(N, k)`` (float32, on ``x``'s device) of a full-covariance Gaussian mixture.

    EM (scikit-learn, float64, at most ``max_iter`` iterations per start) from ``n_init`` k-means
    partitions and from as many k-means++ seedings, seeded by ``seed``; the fit with the best
    likelihood is kept (a label-free choice). Starts from k-means alone inherit its cuts: on two
    long clusters beside a small one, every one of them splits a long cluster.
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    from clusterlight.cluster.umap_hdbscan import preserve_torch_threads

    data = x.detach().cpu().double().numpy()
    best = None
    with warnings.catch_warnings(), preserve_torch_threads():
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        for init in ("kmeans", "k-means++"):
            gmm = GaussianMixture(k, covariance_type="full", n_init=n_init, init_params=init, random_state=seed,
                                  reg_covar=reg_covar, max_iter=max_iter).fit(data)
            if best is None or gmm.lower_bound_ > best.lower_bound_:
                best = gmm
        resp = best.predict_proba(data)
    return torch.from_numpy(resp).float().to(x.device)


def one_hot(labels: Tensor, k: int) -> Tensor:
    """``labels (N,)`` to float one-hot responsibilities ``(N, k)``."""
    return F.one_hot(labels.long(), k).float()
