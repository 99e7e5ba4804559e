"""Labels reach only the metrics: shuffling them must not change a single weight.

Every method joins this test through ``METHOD_ARGS`` in ``conftest.py``. Two short fits at the
same seed, one with the true labels and one with the labels randomly permuted across samples
(after the split is built, so the images are the same), must give bit-identical weights and
cluster assignments, while the label-based metrics differ (proof that the labels did change).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from clusterlight.cli import main
from clusterlight.data import ClusteringDataModule
from tests.conftest import METHOD_ARGS, base_args, data_args


class PermutedLabelsDataModule(ClusteringDataModule):
    """The regular DataModule with every split's labels and OOD flags shuffled after setup.

    Args:
        permute_seed: seed of the shuffle; ``None`` keeps the true labels.
    """

    def __init__(self, permute_seed: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.permute_seed = permute_seed
        self._permuted = False

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.permute_seed is None or self._permuted:
            return
        rng = np.random.default_rng(self.permute_seed)
        for ds in (self.train_dataset, self.val_dataset, self.test_dataset):
            perm = torch.as_tensor(rng.permutation(len(ds)))
            ds.labels = ds.labels[perm].clone()
            ds.ood = ds.ood[perm].clone()
        self._permuted = True


#: Options that change which code a method runs but are off in the configs the tests fit: covered
#: here only (the precision and resume tests keep to ``METHOD_ARGS``).
OPTION_ARGS: dict[str, list[str]] = {
    # the flagship's vote over UMAP embeddings (clusterlight.cluster.consensus aligns the partitions)
    "DebiasedClustering-umapruns": METHOD_ARGS["DebiasedClustering"] + ["--model.umap_runs=3"],
    # the merge-and-split moves on the initial partition (set by the Fashion-MNIST config, which the
    # tests do not fit: its data is not on every machine)
    "DebiasedClustering-refinecut": METHOD_ARGS["DebiasedClustering"] + ["--model.refine_cut=5"],
}
#: The same, run only with ``-m slow`` (the default suite is at its time limit).
SLOW_OPTION_ARGS: dict[str, list[str]] = {
    # the flagship rebuilding its clustering space every epoch after clustering starts
    "DebiasedClustering-recluster": METHOD_ARGS["DebiasedClustering"] + ["--model.recluster_every=1"],
    # the same, each rebuild started from the current clustering
    "DebiasedClustering-reclusterwarm": METHOD_ARGS["DebiasedClustering"] + ["--model.recluster_every=1",
                                                                             "--model.recluster_warm=true"],
    # the mixture over-clustered, its components merged along the clustering space's k-NN graph
    "DebiasedClustering-overgraph": METHOD_ARGS["DebiasedClustering"] + ["--model.overcluster=2",
                                                                         "--model.overcluster_merge=graph"],
}


def _fit(tmp_path: Path, method: str, permute_seed: int | None):
    args = data_args("digits", max_samples=400, ood_classes="[9]", ood_fraction=0.2)
    args[0] = "--data=tests.test_label_free.PermutedLabelsDataModule"
    if permute_seed is not None:
        args.append(f"--data.permute_seed={permute_seed}")
    options = {**METHOD_ARGS, **OPTION_ARGS, **SLOW_OPTION_ARGS}[method]
    return main(["fit", *options, *args, *base_args(tmp_path, epochs=3, logger="none"),
                 "--seed_everything=7"])


@pytest.mark.parametrize("method", sorted(METHOD_ARGS) + sorted(OPTION_ARGS)
                         + [pytest.param(m, marks=pytest.mark.slow) for m in sorted(SLOW_OPTION_ARGS)])
def test_labels_do_not_change_training(tmp_path: Path, method: str) -> None:
    true = _fit(tmp_path / "a", method, None)
    shuffled = _fit(tmp_path / "b", method, 123)
    assert not torch.equal(true.datamodule.train_dataset.labels, shuffled.datamodule.train_dataset.labels)
    sa, sb = true.model.state_dict(), shuffled.model.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"{method}: {key} differs"
    x = torch.stack([true.datamodule.train_dataset[i]["image"] for i in range(len(true.datamodule.train_dataset))])
    true.model.eval()
    shuffled.model.eval()
    with torch.no_grad():
        assert torch.equal(true.model.cluster_outputs(x).cluster, shuffled.model.cluster_outputs(x).cluster)
    # the metrics saw the permuted labels. Not ACC alone: a run whose validation clusters collapse
    # into one scores the largest class's share, which a permutation keeps; the OOD AUROC (flags
    # permuted across samples of different scores) and the other metrics move.
    assert true.model.last_metrics["val"] != shuffled.model.last_metrics["val"]
