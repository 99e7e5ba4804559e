"""DDP equals one device: DEC (issue "DDP equals one device"; one DDP test per file)."""

from __future__ import annotations

import pytest

from clusterlight.methods import DEC
from tests.ddp_equivalence import (
    assert_ranks_identical,
    assert_same_as_one_process,
    fit_one_and_two,
)

pytestmark = pytest.mark.ddp


def test_two_gloo_processes_give_the_one_process_clusters(tmp_path) -> None:
    """Same seed, same global batch of 64: the k-means initialisation (rank 0, broadcast) and the
    target distribution over the gathered training split are the one-process ones, and so are the
    cluster of every test image and the target's labels of every training sample."""
    kwargs = {"widths": [16, 32], "kmeans_n_init": 2, "init_n_init": 2, "pretrain_epochs": 1, "norm": "group"}
    one, two = fit_one_and_two(DEC, kwargs, tmp_path, epochs=3, state_attrs=("_target_labels",))
    assert_ranks_identical(two, extra=("_target_labels",))
    assert_same_as_one_process(one, two[0], extra_exact=("_target_labels",))
