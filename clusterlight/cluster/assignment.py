"""Batch-level cluster assignments for online deep clustering.

- :func:`greedy_hard_assign` -- the hard-regularised assignment of Mahon & Lukasiewicz (AAAI
  2024): minimise ``sum_b cost[b, c_b] + sum_c log(n_c!)`` (minus ``sum_b log_prior[c_b]``)
  greedily, each next (point, cluster) pair being the one with the smallest
  ``cost[b, c] - log_prior[c] + log(n_c + 1)`` given the counts so far. Vectorised; it returns
  exactly what :func:`naive_greedy_hard_assign` (the literal loop, for tests) returns, ties
  included.
- :func:`sinkhorn` -- the Sinkhorn-Knopp (entropic, balanced) transport plan of a score
  matrix; the balanced baseline assigns each point to the argmax of its row.
- :func:`mean_assignment_kl` -- ``KL(mean soft assignment || uniform)``, the soft-assignment
  entropy regulariser baseline.
- :func:`distributed_assign` -- apply any of these to the batches of all ranks at once.

Ties and arithmetic
-------------------
The greedy compares triples ``(value, point, cluster)`` lexicographically: among pairs of equal
value the lowest point index wins, then the lowest cluster index. Values are computed in
float64 as ``base[b, c] + pen[n]`` with ``base = cost - log_prior`` (computed once) and
``pen[n] = log(n + 1)``; both implementations use exactly these float64 operations, so they
agree bit for bit even where rounding makes two different sums equal. Costs must be finite.

Why the vectorised greedy is exact
----------------------------------
Write ``v(b, c; n) = base[b, c] + pen[n]`` and ``≺`` for the order above. The greedy picks the
≺-smallest free pair at the current counts. Three facts carry the algorithm:

1. A cluster takes its points in a fixed order: ``c``'s candidate at any count is its first
   free point in ``(base[., c], index)`` order. This needs adding ``pen[n]`` never to merge two
   different costs of a column in float64; it is checked once per call (every gap between
   distinct sorted costs above two ulps of the largest sum), and when it fails the literal loop
   runs instead (only with costs ~1e-16 apart relative to their size).
2. Values only rise. Counts never decrease and ``pen`` is increasing, so the value at which a
   pair can still be taken is at least its value at the current counts.
3. Hence a whole prefix of each cluster's free list can be settled at once. Let ``b_1, b_2, ...``
   be ``c``'s free points in that order, ``w_j = v(b_j, c; n_c + j - 1)`` the value at which
   ``c`` would take ``b_j`` as its ``j``-th next point, and ``m_j = max(b_1..b_j)``. Entry ``j``
   is *safe* when ``(w_j, m_j, c) ≺ (v(b_j, c''; n_c''), b_j, c'')`` for every other cluster
   ``c''`` (the right side is, by fact 2, at most the triple with which ``c''`` could ever take
   ``b_j``). If entries ``1..j`` are all safe, ``b_1..b_j`` go to ``c`` as its next ``j``
   points in the true greedy run: were some ``b_j`` taken by ``c''`` while ``c`` still waits at
   ``b_{k+1}`` (``k < j``), the free pair ``(b_{k+1}, c)`` (value ``w_{k+1} <= w_j``, index
   ``<= m_j``) would be ≺ the pair taken, contradicting the greedy choice; and by fact 1 ``c``
   takes nothing else first. Settling every cluster's safe prefix at once and continuing the
   greedy from the new state gives the same remaining assignments: a cluster takes all of its
   prefix before any other point, so its count is the same in both runs whenever it takes a
   non-prefix point, while other clusters' counts are only higher and the free set only
   smaller, which cannot make any other pair the smallest. The ≺-smallest free pair overall is
   always safe (entry 1 of its cluster), so every round settles at least one point.

Cost: each round is ~25 tensor operations over the ``K x B`` lists (no sort; one stable sort per
call); the Python loop runs over rounds, not over points. Rounds are few when clusters are
separated (1-3) and many when every point sits at about the same distance from every centroid
(random initialisation: 40-90 rounds for B = 128-256, K = 10); during training on digits and
Fashion-MNIST the mean was 10-15 rounds per batch of 128-256. The worst case is one round per
point: the greedy is sequential by nature (who gets a contested point depends on the counts
every earlier choice produced), and no exact loop-free formulation is known to us.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "distributed_assign",
    "greedy_hard_assign",
    "greedy_hard_assign_with_rounds",
    "hard_objective",
    "mean_assignment_kl",
    "naive_greedy_hard_assign",
    "sinkhorn",
    "sinkhorn_assign",
]


def _prepare(cost: Tensor, log_prior: Tensor | None) -> tuple[Tensor, Tensor]:
    """``base = cost - log_prior`` and ``pen[n] = log(n + 1)`` in float64 (shared by both greedies)."""
    if cost.ndim != 2 or cost.shape[1] < 1:
        raise ValueError(f"cost must be (B, K) with K >= 1, got {tuple(cost.shape)}")
    base = cost.detach().to(torch.float64)
    if log_prior is not None:
        lp = log_prior.detach().to(device=base.device, dtype=torch.float64).reshape(-1)
        if lp.numel() != base.shape[1]:
            raise ValueError(f"log_prior must have {base.shape[1]} entries, got {lp.numel()}")
        base = base - lp
    if not torch.isfinite(base).all():
        raise ValueError("greedy_hard_assign needs finite costs and log_prior")
    pen = torch.arange(1, base.shape[0] + 1, dtype=torch.float64, device=base.device).log()
    return base, pen


def _one_greedy_step(base: Tensor, pen: Tensor, counts: Tensor, free: Tensor) -> tuple[int, int]:
    """The ≺-smallest free (point, cluster) pair at the current counts."""
    values = base + pen[counts]
    values = values.masked_fill(~free[:, None], math.inf)
    flat = int(torch.argmin(values.reshape(-1)))  # first minimum in row-major order: lowest point, then cluster
    return flat // base.shape[1], flat % base.shape[1]


@torch.no_grad()
def naive_greedy_hard_assign(cost: Tensor, log_prior: Tensor | None = None) -> Tensor:
    """The greedy hard assignment as a literal loop, one point per step (reference for tests).

    Args:
        cost: ``Tensor[B, K]``, e.g. ``||z_b - mu_c||^2 / sigma``.
        log_prior: optional ``Tensor[K]`` added to the log-likelihood (subtracted from the cost).

    Returns:
        ``LongTensor[B]`` of clusters.
    """
    base, pen = _prepare(cost, log_prior)
    n_points, k = base.shape
    counts = torch.zeros(k, dtype=torch.long, device=base.device)
    free = torch.ones(n_points, dtype=torch.bool, device=base.device)
    assign = torch.full((n_points,), -1, dtype=torch.long, device=base.device)
    for _ in range(n_points):
        b, c = _one_greedy_step(base, pen, counts, free)
        assign[b] = c
        counts[c] += 1
        free[b] = False
    return assign


def _order_is_count_free(sorted_base: Tensor, pen: Tensor) -> bool:
    """Whether adding any ``pen[n]`` keeps every two different costs of a cluster apart in float64.

    Distinct values more than one ulp of the largest possible sum apart stay strictly ordered
    after rounding, so each cluster's candidate order is ``(base, index)`` at every count.
    """
    gaps = sorted_base.diff(dim=1)
    gaps = gaps[gaps > 0]
    if gaps.numel() == 0:
        return True
    top = sorted_base.abs().max() + pen[-1]
    ulp = torch.nextafter(top, top.new_tensor(math.inf)) - top
    return bool(gaps.min() > 2 * ulp)


@torch.no_grad()
def greedy_hard_assign_with_rounds(cost: Tensor, log_prior: Tensor | None = None) -> tuple[Tensor, int]:
    """:func:`greedy_hard_assign` that also returns the number of rounds it took (0: the loop ran)."""
    base, pen = _prepare(cost, log_prior)
    n_points, k = base.shape
    device = base.device
    # Every cluster's points in (base, index) order, fixed for the whole run (fact 1).
    sorted_base, order = torch.sort(base.T, dim=1, stable=True)  # (K, B)
    if not _order_is_count_free(sorted_base, pen):
        return naive_greedy_hard_assign(cost, log_prior), 0
    counts = torch.zeros(k, dtype=torch.long, device=device)
    free = torch.ones(n_points, dtype=torch.bool, device=device)
    assign = torch.full((n_points,), -1, dtype=torch.long, device=device)
    rows = torch.arange(k, device=device)[:, None]
    flat_order = order.reshape(-1)
    remaining, rounds = n_points, 0
    while remaining > 0:
        rounds += 1
        listed = free.take(order)  # (K, B): which entries of each cluster's list are still free
        slot = (counts[:, None] + listed.cumsum(dim=1) - 1).clamp_min(0)  # c's count at its j-th next point
        w = sorted_base + pen.take(slot)  # the value at which c would take that entry
        if k > 1:
            # The best other cluster for each point, at today's counts (fact 2: values only rise).
            current = base + pen.take(counts)  # (B, K)
            best_v, best_c = current.min(dim=1)  # first minimum: lowest cluster among ties
            second_v, second_c = current.scatter(1, best_c[:, None], math.inf).min(dim=1)
            rival = torch.stack([best_v, second_v, best_c.to(base.dtype), second_c.to(base.dtype)], dim=1)
            best_v, second_v, best_c, second_c = rival.index_select(0, flat_order).view(k, n_points, 4).unbind(2)
            own = best_c == rows
            rival_v = torch.where(own, second_v, best_v)
            rival_c = torch.where(own, second_c, best_c)
            running_max = torch.cummax(order.masked_fill(~listed, -1), dim=1).values
            ok = (w < rival_v) | ((w == rival_v) & (running_max == order) & (rows < rival_c))
            # Taken entries are skipped; each cluster settles the free entries of its safe prefix.
            prefix = (ok | ~listed).cummin(dim=1).values & listed
        else:
            prefix = listed
        length = prefix.sum(dim=1)
        # A point lies in at most one safe prefix; scatter its cluster (-1 elsewhere).
        won = torch.full_like(assign, -1).scatter_reduce(
            0, flat_order, torch.where(prefix, rows, -1).reshape(-1), reduce="amax")
        assign = torch.where(won >= 0, won, assign)
        free &= won < 0
        counts += length
        settled = int(length.sum())
        if settled == 0:  # impossible by fact 3 (the smallest free pair is safe); guard against a hang
            raise RuntimeError("greedy_hard_assign made no progress; please report this input")
        remaining -= settled
    return assign, rounds


def greedy_hard_assign(cost: Tensor, log_prior: Tensor | None = None) -> Tensor:
    """Greedy hard-regularised assignment of a batch (vectorised, exact; see the module docstring).

    Minimises ``sum_b (cost[b, c_b] - log_prior[c_b]) + sum_c log(n_c!)`` greedily: the next pair
    is always the free point and cluster with the smallest ``cost - log_prior + log(n_c + 1)``;
    ties go to the lowest point index, then the lowest cluster index. Equal to
    :func:`naive_greedy_hard_assign`.

    Args:
        cost: ``Tensor[B, K]`` (finite), e.g. ``||z_b - mu_c||^2 / sigma``; not differentiated.
        log_prior: optional ``Tensor[K]``, log prior probabilities of the clusters.

    Returns:
        ``LongTensor[B]`` of clusters, on ``cost``'s device.
    """
    return greedy_hard_assign_with_rounds(cost, log_prior)[0]


def hard_objective(cost: Tensor, assign: Tensor, log_prior: Tensor | None = None) -> Tensor:
    """``(sum_b cost[b, c_b] - log_prior[c_b] + sum_c log(n_c!)) / B`` (differentiable in ``cost``)."""
    chosen = cost.gather(1, assign[:, None]).squeeze(1)
    if log_prior is not None:
        chosen = chosen - log_prior.to(chosen)[assign]
    counts = torch.bincount(assign, minlength=cost.shape[1]).to(chosen.dtype)
    return (chosen.sum() + torch.lgamma(counts + 1).sum()) / cost.shape[0]


def sinkhorn(scores: Tensor, n_iters: int = 15, epsilon: float = 0.5) -> Tensor:
    """Sinkhorn-Knopp plan of a score matrix with uniform marginals.

    The plan is ``diag(u) exp(scores / epsilon) diag(v)`` scaled so that rows sum to ``1/B`` and
    columns to ``1/K``; ``n_iters`` alternating column/row normalisations (in log space) end
    with the rows, which are therefore exact; columns converge as ``n_iters`` grows.

    Args:
        scores: ``Tensor[B, K]``, higher is better (e.g. ``-cost``); not differentiated.
        n_iters: normalisation rounds.
        epsilon: entropic temperature (smaller: closer to a hard transport).

    Returns:
        ``Tensor[B, K]`` (float32, or float64 for float64 input), the plan.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be (B, K), got {tuple(scores.shape)}")
    if epsilon <= 0 or n_iters < 1:
        raise ValueError(f"need epsilon > 0 and n_iters >= 1, got {epsilon}, {n_iters}")
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    log_q = scores.detach().to(dtype) / epsilon
    n_points, k = log_q.shape
    for _ in range(n_iters):
        log_q = log_q - (torch.logsumexp(log_q, dim=0, keepdim=True) + math.log(k))
        log_q = log_q - (torch.logsumexp(log_q, dim=1, keepdim=True) + math.log(n_points))
    return log_q.exp()


def sinkhorn_assign(cost: Tensor, n_iters: int = 15, epsilon: float = 0.5) -> Tensor:
    """Balanced assignment: argmax of each row of the Sinkhorn plan of ``-cost``."""
    return sinkhorn(-cost, n_iters, epsilon).argmax(dim=1)


def mean_assignment_kl(probs: Tensor, eps: float = 1e-12) -> Tensor:
    """``KL(p_bar || uniform) = sum_c p_bar_c log(K p_bar_c)``, ``p_bar`` the batch mean of ``probs`` (B, K)."""
    p_bar = probs.mean(dim=0)
    return (p_bar * (p_bar.clamp_min(eps).log() + math.log(probs.shape[1]))).sum()


@torch.no_grad()
def distributed_assign(cost: Tensor, assign_fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Assign the batches of all ranks jointly; each rank gets the clusters of its own rows.

    The (detached) costs of every rank are gathered, padded to the largest batch and trimmed
    again, concatenated in rank order, assigned with ``assign_fn`` (identically on every rank),
    and this rank's rows are returned. Without an initialised process group (or with one
    process) this is ``assign_fn(cost)``.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return assign_fn(cost)
    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([cost.shape[0]], device=cost.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes_l = [int(s) for s in sizes]
    padded = cost.detach().new_zeros((max(sizes_l), cost.shape[1]))
    padded[: cost.shape[0]] = cost.detach()
    blocks = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(blocks, padded)
    full = torch.cat([blk[:n] for blk, n in zip(blocks, sizes_l)])
    assign = assign_fn(full)
    start = sum(sizes_l[:rank])
    return assign[start : start + cost.shape[0]]
