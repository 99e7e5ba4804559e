"""K-means in PyTorch, on CPU or GPU tensors, in one process or data-parallel.

- :func:`kmeans` -- Lloyd's algorithm with (greedy) k-means++ seeding, best of ``n_init`` runs.
- :func:`distributed_kmeans` -- the same on points sharded over the ranks of a
  ``torch.distributed`` process group: local E-step, all-reduced M-step, identical centres on
  every rank.
- :func:`assign` -- nearest centre and squared distance of each point, chunk by chunk.
- :func:`kmeans_plusplus` -- k-means++ initial centres only.

Memory is O(N·k + chunk_size·k) on top of the data: squared distances are computed one chunk of
points at a time as ``‖x‖² - 2 x·c + ‖c‖²`` (clamped at 0), never as an N x N matrix and without
``torch.cdist``. The arithmetic is float32 (half and bfloat16 inputs are upcast one chunk at a
time; float64 inputs stay float64), also under ``torch.autocast``, which is switched off inside.
Points are shifted by the data mean before that expansion, as scikit-learn does, so that data far
from the origin loses no precision. On CUDA, when the global float32 matmul precision allows TF32
(``torch.set_float32_matmul_precision("high")``), the cross term is computed with a split-operand
scheme (three TF32 products) that keeps float32 accuracy; the global setting itself is never
changed. Cluster sums and the inertia accumulate in float64.

All randomness comes from a local ``torch.Generator`` seeded with ``seed``: the global RNG state
is left untouched, and the same seed gives the same result.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from clusterlight.errors import ClusterlightError
from clusterlight.precision import float32_math

__all__ = ["KMeansResult", "assign", "distributed_kmeans", "kmeans", "kmeans_plusplus"]

_INITS = ("k-means++", "random")
# Keeps sign, exponent and the top 10 mantissa bits of a float32 (0xFFFFE000): a TF32 value.
_TF32_MASK = -8192


class KMeansResult(NamedTuple):
    """The outcome of :func:`kmeans` or :func:`distributed_kmeans`.

    Attributes:
        centers: ``Tensor[k, D]`` (float32, or float64 for float64 input) on the device of the input.
        labels: ``LongTensor[N]``, the nearest centre of each (local) point.
        inertia: the sum of squared distances of the points to their centres (over all ranks).
        n_iter: Lloyd iterations of the best run.
    """

    centers: Tensor
    labels: Tensor
    inertia: float
    n_iter: int


# ----------------------------------------------------------------------------------------------
# Communication: one interface for a single process and for a process group.


class _LocalComm:
    """Collectives of a world of one process: all of them are identities."""

    world_size = 1
    rank = 0

    def all_reduce(self, t: Tensor) -> Tensor:
        return t

    def all_gather(self, t: Tensor) -> Tensor:
        return t

    def broadcast(self, t: Tensor) -> Tensor:
        return t


class _DistComm:
    """Collectives over a ``torch.distributed`` process group (gloo tensors travel on the CPU)."""

    def __init__(self, group: dist.ProcessGroup | None, device: torch.device) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.src = 0 if group is None else dist.get_global_rank(group, 0)
        self.device = torch.device("cpu") if dist.get_backend(group) == "gloo" else device

    def all_reduce(self, t: Tensor) -> Tensor:
        """Sum over ranks."""
        u = t.to(self.device).contiguous()
        dist.all_reduce(u, op=dist.ReduceOp.SUM, group=self.group)
        return u.to(t.device)

    def all_gather(self, t: Tensor) -> Tensor:
        """Concatenation along dim 0 of the equally shaped tensors of all ranks, in rank order."""
        u = t.to(self.device).contiguous()
        out = [torch.empty_like(u) for _ in range(self.world_size)]
        dist.all_gather(out, u, group=self.group)
        return torch.cat(out).to(t.device)

    def broadcast(self, t: Tensor) -> Tensor:
        """The tensor of group rank 0, on every rank."""
        u = t.to(self.device).contiguous()
        dist.broadcast(u, src=self.src, group=self.group)
        return u.to(t.device)


# ----------------------------------------------------------------------------------------------
# Chunked arithmetic.


def _work_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _reduced_fp32_matmul(device: torch.device) -> bool:
    """Whether float32 matmuls on ``device`` may run in reduced precision (TF32)."""
    if device.type != "cuda":
        return False
    try:
        precision = torch.backends.cuda.matmul.fp32_precision
        if precision == "none":
            precision = torch.backends.fp32_precision
        return precision not in ("ieee", "none")
    except (AttributeError, RuntimeError):  # another torch: assume TF32, the split product is exact anyway
        return True


def _split_tf32(t: Tensor) -> tuple[Tensor, Tensor]:
    hi = (t.view(torch.int32) & _TF32_MASK).view(torch.float32)
    return hi, t - hi


def _split_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b.T`` for float32 operands with float32 accuracy even when matmuls use TF32.

    Each operand is split into a TF32-representable high part and a remainder; the products
    ``hi·hi``, ``hi·lo`` and ``lo·hi`` are (nearly) exact in TF32 and ``lo·lo`` is negligible.
    """
    a_hi, a_lo = _split_tf32(a.contiguous())
    b_hi, b_lo = _split_tf32(b.contiguous())
    return a_hi @ b_hi.T + (a_hi @ b_lo.T + a_lo @ b_hi.T)


class _Data:
    """Points ``x`` seen as shifted, work-precision chunks (never all upcast at once)."""

    def __init__(
        self, x: Tensor, shift: Tensor | None, chunk_size: int, dtype: torch.dtype | None = None
    ) -> None:
        self.x = x
        self.n, self.dim = x.shape
        self.device = x.device
        self.dtype = dtype if dtype is not None else _work_dtype(x.dtype)
        self.shift = None if shift is None else shift.to(self.device, self.dtype)
        self.chunk_size = chunk_size
        self.split = self.dtype == torch.float32 and _reduced_fp32_matmul(self.device)
        self._sq_norms: Tensor | None = None

    def _prep(self, rows: Tensor) -> Tensor:
        rows = rows.to(self.dtype)
        return rows if self.shift is None else rows - self.shift

    def rows(self, idx: Tensor) -> Tensor:
        return self._prep(self.x[idx.to(self.device)])

    def chunks(self) -> Iterator[tuple[int, int, Tensor]]:
        for start in range(0, self.n, self.chunk_size):
            stop = min(start + self.chunk_size, self.n)
            yield start, stop, self._prep(self.x[start:stop])

    def sq_norms(self) -> Tensor:
        if self._sq_norms is None:
            sq = torch.empty(self.n, dtype=self.dtype, device=self.device)
            for start, stop, xc in self.chunks():
                sq[start:stop] = (xc * xc).sum(1)
            self._sq_norms = sq
        return self._sq_norms

    def sq_dists(self, xc: Tensor, xc_sq: Tensor, c: Tensor, c_sq: Tensor) -> Tensor:
        """Squared distances ``[chunk, m]`` from a chunk of points to the rows of ``c``."""
        if self.split:
            d = _split_matmul(xc, c).mul_(-2.0).add_(c_sq.unsqueeze(0))
        else:
            d = torch.addmm(c_sq.unsqueeze(0), xc, c.T, alpha=-2.0)
        return d.add_(xc_sq.unsqueeze(1)).clamp_min_(0.0)

    def dists_to(self, c: Tensor) -> Tensor:
        """Squared distances ``[N, m]`` from all points to a few rows ``c`` (k-means++ candidates)."""
        c = c.to(self.dtype)
        c_sq = (c * c).sum(1)
        out = torch.empty(self.n, c.shape[0], dtype=self.dtype, device=self.device)
        sq = self.sq_norms()
        for start, stop, xc in self.chunks():
            out[start:stop] = self.sq_dists(xc, sq[start:stop], c, c_sq)
        return out

    def estep(self, centers: Tensor, want_sums: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Labels, squared distances and (optionally) float64 per-cluster sums and counts."""
        k = centers.shape[0]
        c = centers.to(self.dtype)
        c_sq = (c * c).sum(1)
        labels = torch.empty(self.n, dtype=torch.long, device=self.device)
        d2 = torch.empty(self.n, dtype=self.dtype, device=self.device)
        sums = torch.zeros(k, self.dim, dtype=torch.float64, device=self.device) if want_sums else None
        sq = self.sq_norms()
        for start, stop, xc in self.chunks():
            dmin, lab = self.sq_dists(xc, sq[start:stop], c, c_sq).min(dim=1)
            d2[start:stop] = dmin
            labels[start:stop] = lab
            if sums is not None:
                sums.index_add_(0, lab, xc.to(torch.float64))
        counts = torch.bincount(labels, minlength=k).to(torch.float64) if want_sums else None
        return labels, d2, sums, counts


# ----------------------------------------------------------------------------------------------
# Initialisation.


def _kmeans_pp(data: _Data, k: int, gen: torch.Generator, n_local_trials: int | None) -> Tensor:
    """Greedy k-means++ on ``data``: ``[k, D]`` centres in the (shifted) work coordinates."""
    n = data.n
    trials = n_local_trials if n_local_trials is not None else 2 + int(math.log(k))
    centers = torch.empty(k, data.dim, dtype=data.dtype, device=data.device)
    first = torch.randint(n, (1,), generator=gen)
    centers[0] = data.rows(first)[0]
    closest = data.dists_to(centers[:1])[:, 0]
    for c in range(1, k):
        cums = torch.cumsum(closest, 0, dtype=torch.float64)
        pot = float(cums[-1])
        if pot > 0.0:
            # D² sampling: the first index whose cumulative weight exceeds u·pot has weight > 0.
            u = torch.rand(trials, generator=gen, dtype=torch.float64) * pot
            idx = torch.searchsorted(cums, u.to(cums.device), right=True).clamp_(max=n - 1)
        else:  # every point sits on a centre already (duplicates): any point will do
            idx = torch.randint(n, (trials,), generator=gen)
        cand = data.rows(idx)
        new_closest = torch.minimum(closest.unsqueeze(1), data.dists_to(cand))
        best = int(torch.argmin(new_closest.sum(0, dtype=torch.float64)))
        centers[c] = cand[best]
        closest = new_closest[:, best].contiguous()
    return centers


def _init_centers(data: _Data, k: int, init: str, gen: torch.Generator) -> Tensor:
    if init == "k-means++":
        return _kmeans_pp(data, k, gen, None)
    return data.rows(torch.randperm(data.n, generator=gen)[:k])


def _gather_sample(data: _Data, comm: _DistComm, n_ranks: list[int], per_rank: int, seed: int) -> _Data:
    """The same bounded random sample of the points of all ranks, on every rank (rank order)."""
    takes = [min(n_r, per_rank) for n_r in n_ranks]
    width = max(takes)
    rank_gen = torch.Generator().manual_seed((seed * 1_000_003 + 7919 * (comm.rank + 1)) % (2**63))
    idx = torch.randperm(data.n, generator=rank_gen)[: takes[comm.rank]].sort().values
    padded = torch.zeros(width, data.dim, dtype=data.dtype, device=data.device)
    padded[: idx.numel()] = data.rows(idx)
    gathered = comm.all_gather(padded)
    sample = torch.cat([gathered[r * width : r * width + takes[r]] for r in range(comm.world_size)])
    return _Data(sample, None, data.chunk_size)


# ----------------------------------------------------------------------------------------------
# Lloyd iterations.


def _relocate_empty(
    data: _Data, comm: _LocalComm | _DistComm, sums: Tensor, counts: Tensor, labels: Tensor, d2: Tensor
) -> None:
    """Re-seed each empty cluster with one of the points farthest from their centre (in place).

    Candidates are the globally farthest points (ties: lower rank, then the order of ``topk``);
    each moves out of its old cluster unless that would empty it. Every rank computes the same.
    """
    empty = (counts == 0).nonzero().flatten().tolist()
    m = len(empty)
    local_m = min(m, data.n)
    vals, idx = torch.topk(d2, local_m)
    cand = torch.full((m, data.dim + 2), -math.inf, dtype=torch.float64, device=data.device)
    cand[:local_m, 0] = vals.to(torch.float64)
    cand[:local_m, 1] = labels[idx].to(torch.float64)
    cand[:local_m, 2:] = data.rows(idx).to(torch.float64)
    cand = comm.all_gather(cand)
    order = torch.sort(cand[:, 0], descending=True, stable=True).indices[:m]
    for cluster, j in zip(empty, order.tolist(), strict=True):
        point = cand[j, 2:]
        old = int(cand[j, 1])
        if counts[old] > 1:
            sums[old] -= point
            counts[old] -= 1
        sums[cluster] = point
        counts[cluster] = 1


def _lloyd(
    data: _Data, comm: _LocalComm | _DistComm, centers: Tensor, max_iter: int, tol_abs: float
) -> tuple[Tensor, Tensor, float, int]:
    """One k-means run from ``centers``; returns float64 centres, labels, inertia, iterations.

    All break decisions use all-reduced quantities, so every rank runs the same collectives.
    """
    k, dim = centers.shape
    centers64 = centers.to(torch.float64)
    labels_prev: Tensor | None = None
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        labels, d2, sums, counts = data.estep(centers64, want_sums=True)
        assert sums is not None and counts is not None
        changed = data.n if labels_prev is None else int((labels != labels_prev).sum())
        changed_t = torch.tensor([float(changed)], dtype=torch.float64, device=data.device)
        packed = comm.all_reduce(torch.cat([sums.flatten(), counts, changed_t]))
        sums, counts = packed[: k * dim].view(k, dim), packed[k * dim : k * dim + k]
        changed_all = float(packed[-1])
        if bool((counts == 0).any()):
            _relocate_empty(data, comm, sums, counts, labels, d2)
        new = torch.where((counts > 0).unsqueeze(1), sums / counts.clamp_min(1).unsqueeze(1), centers64)
        shift = float(((new - centers64) ** 2).sum())
        centers64, labels_prev = new, labels
        if changed_all == 0 or shift <= tol_abs:
            break
    labels, d2, _, _ = data.estep(centers64, want_sums=False)
    inertia = float(comm.all_reduce(d2.sum(dtype=torch.float64).reshape(1))[0])
    return centers64, labels, inertia, n_iter


# ----------------------------------------------------------------------------------------------
# Drivers.


def _check_args(
    x: Tensor, k: int, n_init: int, max_iter: int, tol: float, chunk_size: int, init: str | Tensor
) -> None:
    if x.ndim != 2:
        raise ClusterlightError(f"k-means expects points of shape [N, D], got {tuple(x.shape)}")
    if x.is_complex() or x.dtype == torch.bool:
        raise ClusterlightError(f"k-means expects real-valued points, got {x.dtype}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ClusterlightError(f"k must be a positive integer, got {k!r}")
    if n_init < 1 or max_iter < 1 or chunk_size < 1:
        raise ClusterlightError(
            f"n_init, max_iter and chunk_size must be >= 1, got {n_init}, {max_iter}, {chunk_size}"
        )
    if not tol >= 0:
        raise ClusterlightError(f"tol must be >= 0, got {tol}")
    if isinstance(init, Tensor):
        if init.shape != (k, x.shape[1]):
            raise ClusterlightError(
                f"initial centres must have shape {(k, x.shape[1])}, got {tuple(init.shape)}"
            )
    elif init not in _INITS:
        raise ClusterlightError(f"init must be one of {_INITS} or a [k, D] tensor, got {init!r}")


def _fit(
    x: Tensor,
    k: int,
    n_init: int,
    max_iter: int,
    tol: float,
    seed: int,
    chunk_size: int,
    init: str | Tensor,
    comm: _LocalComm | _DistComm,
    init_sample_size: int,
) -> KMeansResult:
    _check_args(x, k, n_init, max_iter, tol, chunk_size, init)
    x = x.detach()
    device = x.device

    # Shapes of all shards (one collective), then global mean / variance / finiteness (one more).
    shapes = comm.all_gather(torch.tensor([[x.shape[0], x.shape[1]]], dtype=torch.long)).tolist()
    if len({d for _, d in shapes}) != 1:
        dims = [d for _, d in shapes]
        raise ClusterlightError(f"all ranks must hold points of the same dimension, got {dims}")
    n_ranks = [n for n, _ in shapes]
    n_total = sum(n_ranks)
    if k > n_total:
        raise ClusterlightError(f"k-means needs at least k={k} points, got {n_total}")
    raw = _Data(x, None, chunk_size)
    stats = torch.zeros(2 * raw.dim + 1, dtype=torch.float64, device=device)
    for _, _, xc in raw.chunks():
        xc64 = xc.to(torch.float64)
        stats[: raw.dim] += xc64.sum(0)
        stats[raw.dim : 2 * raw.dim] += (xc64 * xc64).sum(0)
        stats[-1] += float((~torch.isfinite(xc)).sum())
    stats = comm.all_reduce(stats)
    if float(stats[-1]) > 0:
        raise ClusterlightError("k-means input contains NaN or infinite values")
    mean64 = stats[: raw.dim] / n_total
    variance = (stats[raw.dim : 2 * raw.dim] / n_total - mean64 * mean64).clamp_min(0)
    tol_abs = tol * float(variance.mean())
    data = _Data(x, mean64, chunk_size)

    gen = torch.Generator().manual_seed(seed)
    if isinstance(init, Tensor):
        n_init = 1
        sample = data
    elif comm.world_size > 1:
        assert isinstance(comm, _DistComm)
        sample = _gather_sample(data, comm, n_ranks, max(init_sample_size, k), seed)
    else:
        sample = data

    best: tuple[Tensor, Tensor, float, int] | None = None
    for _ in range(n_init):
        if isinstance(init, Tensor):
            start = (init.detach().to(device, torch.float64) - mean64).to(data.dtype)
        else:
            start = _init_centers(sample, k, init, gen)
        start = comm.broadcast(start)
        run = _lloyd(data, comm, start, max_iter, tol_abs)
        if best is None or run[2] < best[2]:
            best = run
    assert best is not None
    centers64, labels, inertia, n_iter = best
    centers = comm.broadcast((centers64 + mean64).to(data.dtype))
    return KMeansResult(centers=centers, labels=labels, inertia=inertia, n_iter=n_iter)


@float32_math
@torch.no_grad()
def kmeans(
    x: Tensor,
    k: int,
    *,
    n_init: int = 3,
    max_iter: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    chunk_size: int = 8192,
    init: str | Tensor = "k-means++",
) -> KMeansResult:
    """Cluster the rows of ``x`` into ``k`` groups with Lloyd's algorithm (single process).

    Args:
        x: ``Tensor[N, D]`` on any device; half/bfloat16 are upcast to float32 chunk by chunk,
            float64 stays float64. Never modified.
        k: number of clusters, ``1 <= k <= N``.
        n_init: independent runs; the one with the lowest inertia is returned (ignored, i.e. one
            run, when ``init`` is a tensor).
        max_iter: Lloyd iterations per run at most.
        tol: stop a run when the squared Frobenius norm of the centre shift is at most
            ``tol`` times the mean per-feature variance of ``x`` (scikit-learn's rule), or when
            no label changed. ``tol=0`` iterates to a fixed point (or ``max_iter``).
        seed: seeds a local ``torch.Generator``; the global RNG state is not touched.
        chunk_size: points per distance block; memory is O(N·k + chunk_size·k).
        init: ``"k-means++"`` (greedy, ``2 + log k`` local trials), ``"random"`` (k distinct
            points), or a ``Tensor[k, D]`` of initial centres.

    Returns:
        A :class:`KMeansResult`. ``labels`` are the nearest-centre assignment for the returned
        ``centers`` (a final E-step runs after the last update). Empty clusters are re-seeded
        with the points farthest from their centres, so centres are always finite.

    Raises:
        ClusterlightError: bad arguments, ``k > N``, or non-finite input.
    """
    return _fit(x, k, n_init, max_iter, tol, seed, chunk_size, init, _LocalComm(), 0)


@float32_math
@torch.no_grad()
def distributed_kmeans(
    x_local: Tensor,
    k: int,
    *,
    n_init: int = 3,
    max_iter: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    chunk_size: int = 8192,
    init: str | Tensor = "k-means++",
    process_group: dist.ProcessGroup | None = None,
    init_sample_size: int = 10_000,
) -> KMeansResult:
    """Data-parallel k-means: each rank holds its own shard ``x_local`` of the points.

    Every rank of the group must call this with the same arguments (except ``x_local``, whose
    number of rows may differ and may be 0). The E-step is local; the M-step all-reduces
    per-cluster sums, counts and the number of changed labels, and convergence is decided on
    those all-reduced values, so every rank runs the same collectives the same number of times.
    Initial centres: every rank draws up to ``max(init_sample_size, k)`` of its points (a
    per-rank generator derived from ``seed``), all ranks all-gather these samples, run the same
    seeded k-means++ on the union, and the centres of group rank 0 are broadcast. With NCCL the
    collectives run on the device of ``x_local``; with gloo on the CPU.

    When ``torch.distributed`` is not initialised, or the group has a single rank, this is
    exactly :func:`kmeans`. See :func:`kmeans` for the other arguments.

    Args:
        x_local: ``Tensor[N_rank, D]``, this rank's points.
        process_group: the group to cluster over; ``None`` for the default (world) group.
        init_sample_size: points per rank gathered for the k-means++ initialisation.

    Returns:
        A :class:`KMeansResult` with the same ``centers``, ``inertia`` (over all ranks) and
        ``n_iter`` on every rank, and the ``labels`` of this rank's points.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1:
        comm: _LocalComm | _DistComm = _DistComm(process_group, x_local.device)
    else:
        comm = _LocalComm()
    if init_sample_size < 1:
        raise ClusterlightError(f"init_sample_size must be >= 1, got {init_sample_size}")
    return _fit(x_local, k, n_init, max_iter, tol, seed, chunk_size, init, comm, init_sample_size)


@float32_math
@torch.no_grad()
def assign(x: Tensor, centers: Tensor, chunk_size: int = 8192) -> tuple[Tensor, Tensor]:
    """Nearest centre of each point, computed chunk by chunk.

    Args:
        x: ``Tensor[N, D]``.
        centers: ``Tensor[k, D]`` (moved to the device of ``x``).
        chunk_size: points per distance block; memory is O(N + chunk_size·k).

    Returns:
        ``(labels, sq_distances)``: ``LongTensor[N]`` (ties go to the lower index) and the squared
        Euclidean distance to that centre, float32 (float64 if either input is float64).
    """
    if x.ndim != 2 or centers.ndim != 2 or x.shape[1] != centers.shape[1] or centers.shape[0] < 1:
        raise ClusterlightError(
            f"assign expects x [N, D] and centers [k, D], got {tuple(x.shape)} and {tuple(centers.shape)}"
        )
    if chunk_size < 1:
        raise ClusterlightError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = _work_dtype(x.dtype, centers.dtype)
    c = centers.detach().to(x.device, dtype)
    shift = c.mean(0)
    data = _Data(x.detach(), shift, chunk_size, dtype)
    labels, d2, _, _ = data.estep(c - shift, want_sums=False)
    return labels, d2


@float32_math
@torch.no_grad()
def kmeans_plusplus(
    x: Tensor, k: int, *, seed: int = 0, n_local_trials: int | None = None, chunk_size: int = 8192
) -> Tensor:
    """Greedy k-means++ initial centres (D² sampling with a local generator seeded by ``seed``).

    Args:
        x: ``Tensor[N, D]``.
        k: number of centres, ``1 <= k <= N``.
        seed: seeds a local ``torch.Generator``; the global RNG state is not touched.
        n_local_trials: candidates tried per centre, keeping the one that lowers the potential
            most; ``None`` for ``2 + int(log k)``, 1 for classic k-means++.
        chunk_size: points per distance block.

    Returns:
        ``Tensor[k, D]``: rows of ``x`` (float32, or float64 for float64 input).
    """
    _check_args(x, k, 1, 1, 0.0, chunk_size, "k-means++")
    if k > x.shape[0]:
        raise ClusterlightError(f"k-means++ needs at least k={k} points, got {x.shape[0]}")
    if n_local_trials is not None and n_local_trials < 1:
        raise ClusterlightError(f"n_local_trials must be >= 1, got {n_local_trials}")
    x = x.detach()
    shift = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], chunk_size):
        shift += x[start : start + chunk_size].to(torch.float64).sum(0)
    shift /= x.shape[0]
    data = _Data(x, shift, chunk_size)
    centers = _kmeans_pp(data, k, torch.Generator().manual_seed(seed), n_local_trials)
    return (centers.to(torch.float64) + shift).to(data.dtype)
