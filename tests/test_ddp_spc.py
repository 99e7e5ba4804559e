"""DDP equals one device: SPC (issue "DDP equals one device"; one DDP test per file).

SPC's labelling (UMAP to 2-D, then HDBSCAN or a Gaussian mixture) runs on rank 0 on the gathered
latents and is broadcast, so both ranks always hold the same pseudo-labels. It is deterministic
but not continuous in its input: moving the latents by 1e-6 (the size of the rounding differences
between a one-process run and a DDP run, whose gradients are summed by an all-reduce in another
order) changes a member's UMAP + mixture labelling to an ARI of 0.77-0.95 against the unmoved one
(measured on 270 digits), and the runs then diverge. So this test checks SPC's training under DDP
-- gathered latents, broadcast labelling, latent noise of the global batch, losses averaged over
the global batch's agreed and non-agreed samples -- with the labelling replaced by k-means on each
member's latents (continuous away from ties), where the one-process and DDP runs must agree.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from clusterlight.cluster.kmeans import kmeans
from clusterlight.methods import SPC
from tests.ddp_equivalence import (
    assert_ranks_identical,
    assert_same_as_one_process,
    fit_one_and_two,
)

pytestmark = pytest.mark.ddp


class KMeansLabellingSPC(SPC):
    """SPC whose members are labelled by k-means on their latents instead of UMAP + a mixture."""

    def label_members(self, lat: np.ndarray) -> np.ndarray:
        return np.stack([kmeans(torch.from_numpy(x), self.num_clusters, n_init=2, seed=self.seed + v).labels.numpy()
                         for v, x in enumerate(self._voter_latents(lat))])


def test_two_gloo_processes_give_the_one_process_clusters(tmp_path) -> None:
    """Same seed, same global batch of 64: the pseudo-labels of every training sample, the weights
    and the cluster of every test image are the one-process ones."""
    kwargs = {"num_members": 2, "latent_dim": 8, "widths": [16, 32], "head_hidden": 8, "pretrain_epochs": 1,
              "epochs_per_meta": 1, "noise": 0.1, "norm": "group",
              "optimizer": functools.partial(torch.optim.Adam, lr=0.01)}
    attrs = ("pseudo_labels", "agreed_mask")
    one, two = fit_one_and_two(KMeansLabellingSPC, kwargs, tmp_path, epochs=3, state_attrs=attrs)
    assert bool(one["state"]["heads_trained"]) and 0 < float(one["agreed_mask"].float().mean()) < 1
    assert_ranks_identical(two, extra=attrs)
    assert_same_as_one_process(one, two[0], extra_exact=attrs)
