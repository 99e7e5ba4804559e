"""A diagonal Gaussian mixture fitted by EM in torch (float32, any device, no global RNG).

Used by :class:`~clusterlight.methods.DebiasedClustering` to turn a k-means partition into a
mixture with per-cluster means, diagonal variances and weights (cardinalities): unlike k-means it
lets a small, tight cluster keep its points next to a big, spread one.
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


def one_hot(labels: Tensor, k: int) -> Tensor:
    """``labels (N,)`` to float one-hot responsibilities ``(N, k)``."""
    return F.one_hot(labels.long(), k).float()
