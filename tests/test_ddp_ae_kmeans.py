"""DDP equals one device: AEKMeans (issue "DDP equals one device"; one DDP test per file)."""

from __future__ import annotations

import pytest

from clusterlight.methods import AEKMeans
from tests.ddp_equivalence import (
    assert_ranks_identical,
    assert_same_as_one_process,
    fit_one_and_two,
)

pytestmark = pytest.mark.ddp


def test_two_gloo_processes_give_the_one_process_clusters(tmp_path) -> None:
    """Same seed, same global batch of 64: k-means on the gathered embeddings (rank 0, broadcast)
    gives every test image the cluster it gets on one process."""
    one, two = fit_one_and_two(AEKMeans, {"widths": [16, 32], "kmeans_n_init": 2, "norm": "group"}, tmp_path, epochs=3)
    assert_ranks_identical(two)
    assert_same_as_one_process(one, two[0])
