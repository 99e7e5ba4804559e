"""DDP equals one device: JULE (issue "DDP equals one device"; one DDP test per file)."""

from __future__ import annotations

import pytest

from clusterlight.methods import JULE
from tests.ddp_equivalence import (
    assert_ranks_identical,
    assert_same_as_one_process,
    fit_one_and_two,
)

pytestmark = pytest.mark.ddp


def test_two_gloo_processes_give_the_one_process_clusters(tmp_path) -> None:
    """Same seed, same global batch of 64: the triplets come from the gathered global batch and the
    negatives from a per-batch generator (the same on every rank), the agglomeration runs on rank 0
    on the gathered features and is broadcast; the recurrent process's clusters of the training
    split, the epoch it stops and the cluster of every test image are the one-process ones."""
    kwargs = {"conv_channels": 16, "feature_dim": 32, "epochs_per_period": 1, "unfolding_rate": 0.7,
              "norm": "group"}
    attrs = ("_labels", "_period", "_finished")
    one, two = fit_one_and_two(JULE, kwargs, tmp_path, epochs=6, state_attrs=attrs)
    assert one["_finished"]  # reached num_clusters: the whole recurrent process ran
    assert_ranks_identical(two, extra=attrs)
    assert_same_as_one_process(one, two[0], extra_exact=attrs)
