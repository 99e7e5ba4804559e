"""The statistics pooling block across two gloo processes equals one process on all the data."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clusterlight.nn.stats_pool import StatisticsPooling


def _worker(rank: int, store_path: str, x: np.ndarray, w: np.ndarray, out_dir: str) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    try:
        spb = StatisticsPooling(3, x.shape[1], momentum=0.5, min_var=0.0, full_covariance=True)
        shards = [(slice(0, 17), slice(17, 40)), (slice(40, 52), slice(52, 90))]  # unequal shards, 2 steps
        for step in range(2):
            part = shards[step][rank]
            spb.update(torch.as_tensor(x[part], dtype=torch.float32), torch.as_tensor(w[part], dtype=torch.float32))
        mean, var, n = spb.stats()
        torch.save({"mean": mean, "var": var, "n": n, "cov": spb.covariance()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_spb_all_reduce_matches_single_process(tmp_path) -> None:
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(90, 4)), rng.dirichlet(np.ones(3), 90)
    mp.spawn(_worker, args=(str(tmp_path / "store"), x, w, str(tmp_path)), nprocs=2, join=True)
    single = StatisticsPooling(3, 4, momentum=0.5, min_var=0.0, full_covariance=True)
    single.update(torch.as_tensor(x[:40], dtype=torch.float32), torch.as_tensor(w[:40], dtype=torch.float32))
    single.update(torch.as_tensor(x[40:], dtype=torch.float32), torch.as_tensor(w[40:], dtype=torch.float32))
    ref = dict(zip(("mean", "var", "n"), single.stats()), cov=single.covariance())
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-5)
