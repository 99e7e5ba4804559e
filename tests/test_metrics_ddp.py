"""ClusteringMetrics under real DDP: two gloo processes on CPU with DistributedSampler padding."""

import datetime

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

from clusterlight.metrics import ClusteringMetrics, MatchedAccuracy

N = 101  # odd: the sampler pads rank 1 with a duplicate of an early sample
K, C = 6, 4
COUNTS = [50, 30, 10, 3]
WORLD = 2


def dataset():
    """Per-sample cluster id, class id (-1 for OOD), OOD flag and OOD score, fixed by a seed."""
    rng = np.random.default_rng(1234)
    target = rng.integers(0, C, N)
    pred = np.where(rng.random(N) < 0.7, (target * 5 + 1) % K, rng.integers(0, K, N))
    is_ood = rng.random(N) < 0.2
    target = np.where(is_ood, -1, target)
    score = rng.normal(size=N) + is_ood
    return (
        torch.as_tensor(pred),
        torch.as_tensor(target),
        torch.as_tensor(is_ood),
        torch.as_tensor(score, dtype=torch.float32),
    )


def _worker(rank, store_dir, results):
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store_dir}/store",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.set_num_threads(1)
        pred, target, is_ood, score = dataset()
        out = {}
        for shuffle in (False, True):
            sampler = DistributedSampler(range(N), num_replicas=WORLD, rank=rank, shuffle=shuffle, seed=7)
            idx = torch.as_tensor(list(sampler))
            metric = ClusteringMetrics(K, C, train_class_counts=COUNTS)
            acc = MatchedAccuracy(K, C)
            step = 9 if rank == 0 else 16  # different batch counts on the two ranks
            for start in range(0, len(idx), step):
                b = idx[start : start + step]
                metric.update(pred[b], target[b], b, is_ood[b], score[b])
                acc.update(pred[b], target[b], b, is_ood[b])
            out[shuffle] = {"metrics": metric.compute(), "acc": acc.compute(), "n_local": len(idx)}
        torch.save(out, results[rank])
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_ddp_compute_matches_single_process(tmp_path):
    results = [str(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    mp.spawn(_worker, args=(str(tmp_path), results), nprocs=WORLD, join=True)

    pred, target, is_ood, score = dataset()
    ref = ClusteringMetrics(K, C, train_class_counts=COUNTS)
    ref.update(pred, target, torch.arange(N), is_ood, score)
    want = ref.compute()
    assert "ood_auroc" in want and "tail_acc" in want

    for rank, path in enumerate(results):
        out = torch.load(path)
        for shuffle in (False, True):
            got = out[shuffle]
            assert got["n_local"] * WORLD == N + 1  # padding did happen
            assert got["metrics"].keys() == want.keys(), (rank, shuffle)
            for key in want:
                torch.testing.assert_close(
                    got["metrics"][key], want[key], equal_nan=True, msg=f"rank {rank} {shuffle} {key}"
                )
            torch.testing.assert_close(got["acc"], want["acc"])
