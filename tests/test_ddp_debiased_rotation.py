"""DDP equals one device: DebiasedClustering with rotated negatives (one DDP test per file).

With ``rotation_negatives`` each rank encodes its rows at four rotations; the gathered global
batch orders the pairs by rank first, rotation second, while one process orders them by rotation
first. NT-Xent does not depend on the order of the pairs, so two gloo processes must still train
as one process does.
"""

from __future__ import annotations

import pytest

from clusterlight.methods import DebiasedClustering
from tests.ddp_equivalence import (
    assert_ranks_identical,
    assert_same_as_one_process,
    fit_one_and_two,
)
from tests.test_ddp_debiased_neighbours import NEIGHBOUR_KWARGS

pytestmark = [pytest.mark.ddp, pytest.mark.slow]  # an option no shipped config sets


def test_two_gloo_processes_train_with_rotated_negatives_as_one_process(tmp_path) -> None:
    kwargs = {**NEIGHBOUR_KWARGS, "augment": 1.0, "rotation_negatives": True}
    one, two = fit_one_and_two(DebiasedClustering, kwargs, tmp_path, epochs=3)
    assert_ranks_identical(two)
    assert_same_as_one_process(one, two[0])
