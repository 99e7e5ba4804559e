"""Shared fixtures: small, fast command lines for the real entry point."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests run on 2 shared cores: one torch thread avoids oversubscription stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def base_args(tmp_path: Path, *, epochs: int = 2, logger: str = "csv") -> list[str]:
    """Trainer options for quick CPU runs that write only under ``tmp_path``."""
    args = [
        f"--trainer.max_epochs={epochs}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--figures.enabled=false",
    ]
    if logger == "csv":
        args += ["--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={tmp_path / 'runs'}"]
    elif logger == "wandb":
        args += [f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"]
    else:
        args += ["--trainer.logger=false"]
    return args


#: Small, fast settings for every method on ``digits`` (joined by later methods).
METHOD_ARGS: dict[str, list[str]] = {
    "AEKMeans": ["--model=AEKMeans", "--model.widths=[16, 32]", "--model.kmeans_n_init=2"],
    "DEC": ["--model=DEC", "--model.widths=[16, 32]", "--model.kmeans_n_init=2", "--model.init_n_init=2",
            "--model.pretrain_epochs=1"],
    "DebiasedClustering": ["--model=DebiasedClustering", "--model.widths=[16, 32]", "--model.kmeans_n_init=2",
                           "--model.pretrain_epochs=1", "--model.latent_dim=8", "--model.cluster_dim=4",
                           "--model.head_hidden=[16]"],
    "DebiasedClustering-neighbours": ["--model=DebiasedClustering", "--model.widths=[16, 32]", "--model.kmeans_n_init=2",
                                      "--model.pretrain_epochs=1", "--model.latent_dim=8", "--model.cluster_dim=4",
                                      "--model.head_hidden=[16]", "--model.neighbours=5", "--model.ood_score=knn",
                                      "--model.ood_neighbours=[1, 4, 16]"],
    "DebiasedClustering-augment": ["--model=DebiasedClustering", "--model.widths=[16, 32]", "--model.kmeans_n_init=2",
                                   "--model.pretrain_epochs=1", "--model.latent_dim=8", "--model.cluster_dim=4",
                                   "--model.head_hidden=[16]", "--model.neighbours=5", "--model.augment=1.0",
                                   "--model.ood_score=knn", "--model.ood_scaling=global",
                                   "--model.ood_neighbours=[1, 2, 4]"],
    "JULE": ["--model=JULE", "--model.conv_channels=16", "--model.feature_dim=32", "--model.epochs_per_period=1",
             "--model.unfolding_rate=0.7"],
    "OnlineHardClustering": ["--model=OnlineHardClustering", "--model.widths=[16, 32]", "--model.latent_dim=16",
                             "--model.centroid_init=kmeans", "--model.kmeans_n_init=1"],
    "OnlineHardClustering-sinkhorn": ["--model=OnlineHardClustering", "--model.widths=[16, 32]",
                                      "--model.latent_dim=16", "--model.assignment=sinkhorn",
                                      "--model.centroid_init=kmeans", "--model.kmeans_n_init=1"],
    "OnlineHardClustering-neighbours": ["--model=OnlineHardClustering", "--model.widths=[16, 32]",
                                        "--model.latent_dim=16", "--model.neighbours=5",
                                        "--model.centroid_init=kmeans", "--model.kmeans_n_init=1"],
    "SPC": ["--model=SPC", "--model.num_members=2", "--model.latent_dim=8", "--model.widths=[16, 32]",
            "--model.head_hidden=8", "--model.pretrain_epochs=1", "--model.epochs_per_meta=1",
            "--model.clusterer=gmm", "--model.noise=0.1", "--model.optimizer=torch.optim.Adam",
            "--model.optimizer.lr=0.01",  # a few steps only: heads need a large step to leave their init
            "--trainer.callbacks+=clusterlight.methods.spc.PseudoLabelPrecision"],
}


def slow_cases(cases, slow) -> list:
    """``cases`` as ``pytest.mark.parametrize`` values, in order, those in ``slow`` marked ``slow``."""
    return [pytest.param(c, marks=pytest.mark.slow) if c in slow else c for c in cases]


def data_args(dataset: str = "digits", **options) -> list[str]:
    args = ["--data=ClusteringDataModule", f"--data.dataset={dataset}", "--data.batch_size=128"]
    args += [f"--data.{k}={v}" for k, v in options.items()]
    return args
