"""Collapse gives a warning and a logged metric; a healthy clustering does not."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from clusterlight.cli import main
from tests.conftest import METHOD_ARGS, base_args, data_args


def _logged(run_dir: Path, key: str) -> list[float]:
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    return [float(r[key]) for r in rows if r.get(key)]


def test_collapse_is_warned_and_logged(tmp_path: Path) -> None:
    # nearest-centroid assignment without regularisation: the collapse the hard assignment prevents
    args = ["--model=OnlineHardClustering", "--model.assignment=argmin", "--model.widths=[16, 32]"]
    with pytest.warns(UserWarning, match="clustering collapse"):
        cli = main(["fit", *args, *data_args("digits", max_samples=600), *base_args(tmp_path, epochs=2)])
    assert _logged(Path(cli.trainer.logger.log_dir), "val/collapsed")[-1] == 1.0


def test_healthy_clustering_is_not_flagged(tmp_path: Path) -> None:
    cli = main(["fit", *METHOD_ARGS["AEKMeans"], *data_args("digits", max_samples=600), *base_args(tmp_path, epochs=2)])
    assert cli.model.last_metrics["val"]["largest_cluster_frac"] < 0.5
    assert _logged(Path(cli.trainer.logger.log_dir), "val/collapsed") == [0.0, 0.0]
