"""DDP equals one device: OnlineHardClustering with neighbour pairs (one DDP test per file).

The kNN table is computed on rank 0 and broadcast, and each sample's neighbour is drawn by its
dataset index from a generator seeded by the run, epoch, batch and draw: with ``global_assignment``
the two processes group every image with the same two neighbours (``neighbour_draws: 2``) as one
process does, assign the same global batch of groups, and end with the same clusters. With
``neighbour_bank: 3`` each rank stores every rank's batch embeddings (``all_gather``), so both ranks
end with the bank one process has and read the same banked costs.
"""

from __future__ import annotations

import pytest
import torch

from clusterlight.data import ClusteringDataModule
from clusterlight.methods import OnlineHardClustering
from tests.ddp_equivalence import (
    assert_ranks_identical,
    assert_same_as_one_process,
    fit_one_and_two,
)

pytestmark = pytest.mark.ddp


def test_two_gloo_processes_pair_and_cluster_as_one_process(tmp_path) -> None:
    kwargs = {"widths": [16, 32], "latent_dim": 16, "centroid_init": "kmeans", "kmeans_n_init": 1,
              "global_assignment": True, "norm": "group", "neighbours": 5, "neighbour_draws": 2, "neighbour_bank": 3}
    one, two = fit_one_and_two(OnlineHardClustering, kwargs, tmp_path, epochs=3,
                               state_attrs=("neighbour_index", "bank", "bank_filled"))
    assert_ranks_identical(two, extra=("bank", "bank_filled"))
    assert_same_as_one_process(one, two[0], extra_exact=("bank_filled",))
    assert bool(one["bank_filled"].all())  # every training image was in a batch
    torch.testing.assert_close(two[0]["bank"], one["bank"], atol=1e-4, rtol=1e-4)
    dm = ClusteringDataModule(dataset="digits", max_samples=300, batch_size=64)
    dm.setup("fit")
    table = one["neighbour_index"]
    assert table.shape == (len(dm.train_dataset), 5)  # one row per training image
    assert torch.equal(two[0]["neighbour_index"], table) and torch.equal(two[1]["neighbour_index"], table)
