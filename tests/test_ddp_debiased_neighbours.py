"""DDP equals one device: DebiasedClustering with neighbour views and the k-NN OOD score (one DDP test per file).

The pixel-space kNN table is computed on rank 0 and broadcast, and every rank keeps its mutual
pairs (``mutual_neighbours``, as in the Fashion-MNIST config; plain pairs run under DDP in
``tests/test_ddp_debiased_augment.py``); each image's neighbour is drawn by
its dataset index; the NT-Xent loss of ``R`` is computed over the gathered global batch of pairs
(every rank's pairs are the negatives, as on one process) with the gradient scaled by the world
size; the k-NN bank and scales come from the whole training split on every rank.
"""

from __future__ import annotations

import pytest
import torch

from clusterlight.methods import DebiasedClustering
from tests.ddp_equivalence import (
    assert_ranks_identical,
    assert_same_as_one_process,
    fit_one_and_two,
)

pytestmark = pytest.mark.ddp

#: A small flagship with neighbour views and the k-NN score (also used by ``tests/test_ddp_debiased_augment.py``).
#: ``manifold: none``, ``init_partition: kmeans`` and ``gmm_iters: 0`` for the reasons given in ``tests/test_ddp_debiased.py``.
NEIGHBOUR_KWARGS = {"widths": [16, 32], "kmeans_n_init": 2, "pretrain_epochs": 1, "latent_dim": 8, "cluster_dim": 4,
                    "head_hidden": [16], "norm": "group", "manifold": "none", "init_partition": "kmeans",
                    "gmm_iters": 0, "neighbours": 5, "ood_score": "knn", "ood_neighbours": [1, 4, 16]}


def test_two_gloo_processes_contrast_pairs_and_score_as_one_process(tmp_path) -> None:
    kwargs = {**NEIGHBOUR_KWARGS, "mutual_neighbours": True}
    one, two = fit_one_and_two(DebiasedClustering, kwargs, tmp_path, epochs=3,
                               state_attrs=("neighbour_index", "neighbour_count"))
    assert_ranks_identical(two)
    assert_same_as_one_process(one, two[0])
    table, count = one["neighbour_index"], one["neighbour_count"]
    assert table.shape[1] == 5 and table.shape[0] == one["state"]["ood_bank"].shape[0]  # a row per training image
    for rank in two:
        assert torch.equal(rank["neighbour_index"], table) and torch.equal(rank["neighbour_count"], count)
    # only mutual pairs are kept: j in the first count[i] entries of row i has i among its own kept entries
    rows = [set(table[j, : int(count[j])].tolist()) for j in range(len(table))]
    for i in range(len(table)):
        kept = table[i, : int(count[i])].tolist()
        assert kept == [i] or all(i in rows[j] for j in kept)
