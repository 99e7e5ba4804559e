"""DDP equals one device: OnlineHardClustering with embedding-space neighbours (one DDP test per file).

With ``neighbour_space: embedding`` every epoch after the first starts by embedding the whole
training split on every rank (gathered by dataset index) and rebuilding the kNN table on rank 0
(broadcast): both ranks reach the same collectives, keep the same table, and two processes end
with the clusters, weights and table of one process.
"""

from __future__ import annotations

import pytest
import torch

from clusterlight.methods import OnlineHardClustering
from tests.ddp_equivalence import (
    assert_ranks_identical,
    assert_same_as_one_process,
    fit_one_and_two,
)

pytestmark = [pytest.mark.ddp, pytest.mark.slow]  # an option no shipped config sets


def test_two_gloo_processes_refresh_the_same_embedding_neighbours(tmp_path) -> None:
    kwargs = {"widths": [16, 32], "latent_dim": 16, "centroid_init": "kmeans", "kmeans_n_init": 1,
              "global_assignment": True, "norm": "group", "neighbours": 5, "neighbour_space": "embedding"}
    one, two = fit_one_and_two(OnlineHardClustering, kwargs, tmp_path, epochs=3, state_attrs=("neighbour_index",))
    assert_ranks_identical(two)
    assert_same_as_one_process(one, two[0])
    table = one["neighbour_index"]
    assert torch.equal(two[0]["neighbour_index"], two[1]["neighbour_index"])
    # the last table is the one of epoch 2's embedding; a float tie may order two neighbours differently
    same_rows = (two[0]["neighbour_index"].sort(1).values == table.sort(1).values).all(1).float().mean()
    assert float(same_rows) > 0.98
