"""The statistics pooling block (SPB): groups of features as mean, variance and cardinality.

Given features ``x (B, D)`` and assignment weights ``w (B, K)`` (one-hot for hard assignments,
probabilities for soft ones), group ``k`` is summarised by its weighted

- cardinality ``n_k = sum_b w_bk``,
- mean ``mu_k = sum_b w_bk x_b / n_k``,
- diagonal variance ``var_k = sum_b w_bk (x_b - mu_k)^2 / n_k``,

and the whole batch by the same three with all weights 1. With ``full_covariance`` the block also
keeps each group's full covariance ``Sigma_k = sum_b w_bk (x_b - mu_k)(x_b - mu_k)^T / n_k`` (from
the running sums of outer products ``sum_b w_bk x_b x_b^T``). Running estimates across batches are
kept as exponentially averaged *sums* (``n``, ``sum x``, ``sum x^2``), so the running mean and
variance are exactly those of the weighted pooled data (not averages of per-batch means). Under
DDP the batch sums are all-reduced before the update, so every rank holds the same statistics;
every rank must therefore call :meth:`StatisticsPooling.update` the same number of times. The
running sums are buffers: they are saved in and restored from checkpoints.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from clusterlight.precision import float32_math


@float32_math
def pooled_moments(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Weighted sums per group: ``(n (K,), s1 (K, D), s2 (K, D))`` with ``s1 = w^T x``, ``s2 = w^T x^2``.

    Float32, also under autocast (switched off here).
    """
    x, w = x.float(), w.float()
    return w.sum(0), w.T @ x, w.T @ (x * x)


def moments_to_stats(n: Tensor, s1: Tensor, s2: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """Sums to ``(mean, variance, cardinality)``; empty groups get mean 0 and variance 1."""
    safe = n.clamp_min(eps).unsqueeze(1)
    mean = s1 / safe
    var = (s2 / safe - mean * mean).clamp_min(0.0)
    empty = (n <= eps).unsqueeze(1)
    mean = torch.where(empty, torch.zeros_like(mean), mean)
    var = torch.where(empty, torch.ones_like(var), var)
    return mean, var, n


class StatisticsPooling(nn.Module):
    """Pools features into per-group (and whole-batch) mean, variance and cardinality.

    Args:
        num_groups: number of groups ``K`` (clusters).
        dim: feature size ``D``.
        momentum: weight of the past in the running sums (``0``: only the last batch counts).
        min_var: floor added to variances, so that a tight group never gets a zero variance.
        sync: all-reduce the batch sums across ranks when ``torch.distributed`` is initialised.
        full_covariance: also keep each group's full ``D x D`` covariance (:meth:`covariance`).
    """

    def __init__(self, num_groups: int, dim: int, momentum: float = 0.99, min_var: float = 1e-3,
                 sync: bool = True, full_covariance: bool = False) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.num_groups, self.dim, self.momentum, self.min_var, self.sync = num_groups, dim, momentum, min_var, sync
        self.register_buffer("count", torch.zeros(num_groups))
        self.register_buffer("sum", torch.zeros(num_groups, dim))
        self.register_buffer("sum_sq", torch.zeros(num_groups, dim))
        self.register_buffer("total_count", torch.zeros(()))
        self.register_buffer("total_sum", torch.zeros(dim))
        self.register_buffer("total_sum_sq", torch.zeros(dim))
        self.full_covariance = full_covariance
        if full_covariance:
            self.register_buffer("sum_outer", torch.zeros(num_groups, dim, dim))
        self.register_buffer("initialised", torch.tensor(False))

    def forward(self, x: Tensor, w: Tensor) -> dict[str, Tensor]:
        """Statistics of this batch alone (differentiable): per group and for the whole batch.

        Returns a dict with ``mean (K, D)``, ``var (K, D)``, ``count (K,)``, ``batch_mean (D,)``,
        ``batch_var (D,)``, ``batch_count ()`` and ``pooled (K, 2D + 1)``: each group as
        ``[mean, log var, log count]``, the block's pooled representation of the groups.
        """
        n, s1, s2 = pooled_moments(x, w)
        mean, var, count = moments_to_stats(n, s1, s2)
        ones = torch.ones(x.shape[0], 1, device=x.device, dtype=torch.float32)
        bn, b1, b2 = pooled_moments(x, ones)
        bmean, bvar, bcount = moments_to_stats(bn, b1, b2)
        pooled = torch.cat([mean, torch.log(var + self.min_var), torch.log1p(count).unsqueeze(1)], dim=1)
        return {"mean": mean, "var": var, "count": count, "batch_mean": bmean[0], "batch_var": bvar[0],
                "batch_count": bcount[0], "pooled": pooled}

    @torch.no_grad()
    def update(self, x: Tensor, w: Tensor) -> None:
        """Fold a batch into the running sums (all-reduced across ranks first: call on every rank)."""
        x, w = x.detach().float(), w.detach().float()
        n, s1, s2 = pooled_moments(x, w)
        k, d = self.num_groups, self.dim
        pieces = [n, s1.flatten(), s2.flatten(), n.new_tensor([x.shape[0]]), x.sum(0), (x * x).sum(0)]
        if self.full_covariance:
            pieces.append(self._outer(x, w).flatten())
        flat = torch.cat(pieces)
        if self.sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flat)
        parts = torch.split(flat, [k, k * d, k * d, 1, d, d] + ([k * d * d] if self.full_covariance else []))
        self._fold(parts, self.momentum if bool(self.initialised) else 0.0)

    @torch.no_grad()
    def reset_from(self, x: Tensor, w: Tensor) -> None:
        """Set the running statistics to those of ``(x, w)``, e.g. a whole split after k-means.

        No all-reduce: pass the same data on every rank (``compute_on_split`` returns it so).
        """
        x, w = x.detach().float(), w.detach().float()
        n, s1, s2 = pooled_moments(x, w)
        parts = [n, s1.flatten(), s2.flatten(), n.new_tensor([x.shape[0]]), x.sum(0), (x * x).sum(0)]
        if self.full_covariance:
            parts.append(self._outer(x, w))
        self._fold(parts, 0.0)

    @staticmethod
    def _outer(x: Tensor, w: Tensor) -> Tensor:
        """``sum_b w_bk x_b x_b^T`` per group, ``(K, D, D)``, without a ``(B, K, D, D)`` tensor."""
        return torch.einsum("bk,bi,bj->kij", w, x, x)

    def _fold(self, parts: list[Tensor] | tuple[Tensor, ...], m: float) -> None:
        bufs = [self.count, self.sum, self.sum_sq, self.total_count, self.total_sum, self.total_sum_sq]
        if self.full_covariance:
            bufs.append(self.sum_outer)
        for buf, new in zip(bufs, parts):
            buf.mul_(m).add_((1.0 - m) * new.view_as(buf).to(buf.dtype))
        self.initialised.fill_(True)

    def stats(self) -> tuple[Tensor, Tensor, Tensor]:
        """Running ``(mean (K, D), variance (K, D) + min_var, cardinality (K,))``."""
        mean, var, n = moments_to_stats(self.count, self.sum, self.sum_sq)
        return mean, var + self.min_var, n

    def covariance(self, shrinkage: float = 0.0) -> Tensor:
        """Running full covariance of each group, ``(K, D, D)`` (needs ``full_covariance``).

        ``shrinkage`` ``s`` blends each covariance with its mean variance:
        ``(1 - s) Sigma_k + s tr(Sigma_k)/D I``, then ``min_var`` is added to the diagonal (empty
        groups get the identity). A group with fewer samples than dimensions has a singular
        ``Sigma_k``; shrinkage makes it invertible.
        """
        if not self.full_covariance:
            raise RuntimeError("covariance() needs StatisticsPooling(full_covariance=True)")
        n = self.count.clamp_min(1e-6)
        mean = self.sum / n.unsqueeze(1)
        cov = self.sum_outer / n.view(-1, 1, 1) - mean.unsqueeze(2) * mean.unsqueeze(1)
        cov = 0.5 * (cov + cov.transpose(1, 2))
        eye = torch.eye(self.dim, device=cov.device, dtype=cov.dtype)
        scale = torch.diagonal(cov, dim1=1, dim2=2).mean(1).clamp_min(0.0).view(-1, 1, 1)
        cov = (1.0 - shrinkage) * cov + shrinkage * scale * eye + self.min_var * eye
        empty = (self.count <= 1e-6).view(-1, 1, 1)
        return torch.where(empty, eye.expand_as(cov), cov)

    def batch_stats(self) -> tuple[Tensor, Tensor, Tensor]:
        """Running whole-data ``(mean (D,), variance (D,), count ())``."""
        mean, var, n = moments_to_stats(self.total_count.view(1), self.total_sum.view(1, -1),
                                        self.total_sum_sq.view(1, -1))
        return mean[0], var[0] + self.min_var, n[0]

    def prior(self, eps: float = 1e-8) -> Tensor:
        """Cardinality prior ``pi_k = n_k / sum n`` from the running counts."""
        return (self.count + eps) / (self.count.sum() + eps * self.num_groups)
