"""Data-parallel k-means: two gloo processes on the CPU, each holding an unequal shard."""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clusterlight.cluster.kmeans import distributed_kmeans, kmeans

pytestmark = pytest.mark.ddp

WORLD = 2
SPLIT = 700  # rank 0 holds points [:700], rank 1 the other 1300
DUP_SPLIT = 4  # duplicated-points case: rank 0 holds 4 points, rank 1 the other 26


def _worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp}/store",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),  # a collective mismatch fails instead of hanging
    )
    try:
        data = torch.load(f"{tmp}/data.pt")
        x, dup = data["x"], data["dup"]
        shard = x[:SPLIT] if rank == 0 else x[SPLIT:]
        res = distributed_kmeans(shard, 5, seed=0, init_sample_size=300)
        dup_shard = dup[:DUP_SPLIT] if rank == 0 else dup[DUP_SPLIT:]
        dup_res = distributed_kmeans(dup_shard, 6, seed=1, init="random")
        torch.save(
            {
                "centers": res.centers,
                "labels": res.labels,
                "inertia": res.inertia,
                "n_iter": res.n_iter,
                "dup_centers": dup_res.centers,
                "dup_labels": dup_res.labels,
                "dup_inertia": dup_res.inertia,
            },
            f"{tmp}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_agree_with_single_process(tmp_path: Path):
    # sklearn is imported here, not at module level: the spawned workers re-import this module.
    from sklearn.datasets import make_blobs
    from sklearn.metrics import adjusted_rand_score

    x, y = make_blobs(n_samples=2000, n_features=10, centers=5, cluster_std=1.0, random_state=0)
    x = torch.from_numpy(x.astype(np.float32))
    dup = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, -2.0]]).repeat(10, 1)  # 3 distinct points
    torch.save({"x": x, "dup": dup}, tmp_path / "data.pt")

    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))

    # Identical centres (bit for bit), inertia and iteration count on both ranks.
    assert torch.equal(r0["centers"], r1["centers"])
    assert r0["inertia"] == r1["inertia"] and r0["n_iter"] == r1["n_iter"]
    assert r0["labels"].shape == (SPLIT,) and r1["labels"].shape == (2000 - SPLIT,)
    labels = torch.cat([r0["labels"], r1["labels"]])
    assert adjusted_rand_score(y, labels.numpy()) == 1.0

    single = kmeans(x, 5, seed=0)
    assert abs(r0["inertia"] - single.inertia) <= 1e-3 * single.inertia
    # The reported inertia is the one of the returned centres and the concatenated labels.
    direct = ((x.double() - r0["centers"].double()[labels]) ** 2).sum().item()
    assert r0["inertia"] == pytest.approx(direct, rel=1e-5)

    # More clusters than distinct points, shards of unequal size: empty clusters are re-seeded
    # identically on both ranks and no centre is NaN.
    assert torch.equal(r0["dup_centers"], r1["dup_centers"])
    assert torch.isfinite(r0["dup_centers"]).all()
    assert r0["dup_inertia"] == pytest.approx(0.0, abs=1e-6)
    dup_labels = torch.cat([r0["dup_labels"], r1["dup_labels"]])
    assert dup_labels.shape == (30,) and dup_labels.min() >= 0 and dup_labels.max() < 6
