"""Contrastive loss between two views of a batch (pure function, unit-tested on tensors)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clusterlight.precision import float32_math

__all__ = ["nt_xent"]


@float32_math
def nt_xent(a: Tensor, b: Tensor, temperature: float = 0.5, weight: Tensor | None = None) -> Tensor:
    """Normalised-temperature cross-entropy (SimCLR's NT-Xent) of paired views ``a[i]``, ``b[i]``.

    The ``2B`` rows are L2-normalised; for each row the positive is its pair and the negatives are
    the other ``2B - 2`` rows: ``loss_i = -log(exp(s_ip / t) / sum_{j != i} exp(s_ij / t))`` with
    cosine similarities ``s``, averaged over all ``2B`` rows. ``weight`` (``B``, non-negative, not
    all zero) makes it a weighted mean: both rows of pair ``i`` count ``weight[i]``, divided by the
    rows' total weight. Float32, also under autocast.
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"nt_xent expects two [B, D] tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    n = a.shape[0]
    z = F.normalize(torch.cat([a, b]).float(), dim=1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    pos = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    if weight is None:
        return F.cross_entropy(sim, pos)
    if weight.shape != (n,):
        raise ValueError(f"nt_xent expects a weight per pair, shape ({n},), got {tuple(weight.shape)}")
    w = torch.cat([weight, weight]).float().to(z.device)
    return (w * F.cross_entropy(sim, pos, reduction="none")).sum() / w.sum()
