"""Every shipped config parses and builds its model and DataModule (no typo survives)."""

from __future__ import annotations

from pathlib import Path

import pytest

from clusterlight.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name != "logging")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_builds(config: Path) -> None:
    if "fashion_mnist" in config.stem and not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Fashion-MNIST files not installed (apt-get install dataset-fashion-mnist)")
    cli = main(["--config", str(config), "--trainer.logger=false"], run=False)
    assert cli.model.num_clusters == cli.datamodule.num_clusters
    assert tuple(cli.model.input_shape) == tuple(cli.datamodule.input_shape)
    assert cli.datamodule.dataset in config.read_text()
