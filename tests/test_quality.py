"""Real-data quality: the baselines beat k-means on raw pixels on USPS with a small budget."""

from __future__ import annotations

from pathlib import Path

import pytest
from sklearn.cluster import KMeans

from clusterlight.cli import main
from clusterlight.metrics import matched_accuracy, normalized_mutual_info
from tests.conftest import base_args, slow_cases

REPO = Path(__file__).resolve().parents[1]

BUDGETS = {
    "ae_kmeans": ["--trainer.max_epochs=6", "--model.kmeans_n_init=3"],
    "dec": ["--trainer.max_epochs=8", "--model.pretrain_epochs=5", "--model.init_n_init=3",
            "--model.kmeans_n_init=3"],
}


@pytest.fixture(scope="module")
def raw_pixels_kmeans():
    cli = main(["--config", str(REPO / "configs/ae_kmeans/usps.yaml"), "--trainer.logger=false"], run=False)
    dm = cli.datamodule
    dm.setup("fit")
    xtr = dm.train_dataset.images.flatten(1).float().numpy() / 255
    xte = dm.test_dataset.images.flatten(1).float().numpy() / 255
    pred = KMeans(dm.num_clusters, n_init=3, random_state=0).fit(xtr).predict(xte)
    y = dm.test_dataset.labels.numpy()
    return matched_accuracy(pred, y), normalized_mutual_info(pred, y)


# DEC (AE pretraining, then its own loss) in the default suite; AE + k-means, slow
@pytest.mark.parametrize("method", slow_cases(sorted(BUDGETS), {"ae_kmeans"}))
def test_baseline_beats_raw_pixel_kmeans_on_usps(tmp_path: Path, method: str, raw_pixels_kmeans) -> None:
    cli = main(["fit", "--config", str(REPO / f"configs/{method}/usps.yaml"), *base_args(tmp_path, logger="none"),
                *BUDGETS[method], "--trainer.max_epochs=" + BUDGETS[method][0].split("=")[1], "--test_after_fit=true"])
    m = cli.trainer.callback_metrics
    raw_acc, raw_nmi = raw_pixels_kmeans
    assert float(m["test/acc"]) > raw_acc + 0.03, (float(m["test/acc"]), raw_acc)
    assert float(m["test/nmi"]) > raw_nmi + 0.03, (float(m["test/nmi"]), raw_nmi)
