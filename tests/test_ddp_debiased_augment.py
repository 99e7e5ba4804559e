"""DDP equals one device: DebiasedClustering with augmented neighbour views (one DDP test per file).

Each image's neighbour and the random affine map of that view (``augment``) are drawn for every
dataset index with the batch's generator, and each rank keeps its own rows: two gloo processes
must see the views one process sees. The k-NN OOD score runs as in the USPS configs
(``ood_scaling: global``, ``ood_local_weight: 0.5``), so the bank scores of its local correction
are compared too.
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

pytestmark = pytest.mark.ddp


def test_two_gloo_processes_draw_the_augmented_views_of_one_process(tmp_path) -> None:
    kwargs = {**NEIGHBOUR_KWARGS, "augment": 1.0, "ood_scaling": "global", "ood_neighbours": [1, 2, 4],
              "ood_local_weight": 0.5, "ood_local_neighbours": 8}
    one, two = fit_one_and_two(DebiasedClustering, kwargs, tmp_path, epochs=3)
    assert_ranks_identical(two)
    assert_same_as_one_process(one, two[0])
