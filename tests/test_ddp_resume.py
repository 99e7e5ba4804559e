"""Exact resume under DDP: two gloo processes, a mid-epoch checkpoint, a resumed two-process fit.

A two-process fit writes a checkpoint in the middle of its second epoch (every rank takes part,
as in a periodic ``last`` checkpoint) and runs on to the end. A new two-process fit resumed from
that checkpoint -- as after a hard kill right after it -- must end with the same weights, buffers
(all-reduced statistics pooling sums, cluster state) and test clusters, bit for bit: each rank's
training order continues after the checkpoint's batch (``TrainLoader`` state), and rank 0's
clustering state is what every rank loads. One DDP test file, as DDP tests run in files of their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.strategies import DDPStrategy

from clusterlight.data import ClusteringDataModule
from clusterlight.methods import JULE, SPC, AEKMeans, DebiasedClustering, OnlineHardClustering
from tests.conftest import slow_cases
from tests.ddp_equivalence import PROCESS_GROUP_TIMEOUT, RecordFit, assert_ranks_identical

pytestmark = pytest.mark.ddp

DATA = {"dataset": "digits", "max_samples": 300, "batch_size": 32}
MODELS: dict[str, tuple[type, dict[str, Any]]] = {
    "DebiasedClustering": (DebiasedClustering, {"widths": [16, 32], "kmeans_n_init": 2, "pretrain_epochs": 1,
                                                "latent_dim": 8, "cluster_dim": 4, "head_hidden": [16],
                                                "norm": "group"}),
    "AEKMeans": (AEKMeans, {"widths": [16, 32], "kmeans_n_init": 2, "norm": "group"}),
    "JULE": (JULE, {"conv_channels": 16, "feature_dim": 32, "epochs_per_period": 1, "unfolding_rate": 0.7,
                    "norm": "group"}),
    "OnlineHardClustering": (OnlineHardClustering, {"widths": [16, 32], "latent_dim": 16, "centroid_init": "kmeans",
                                                    "kmeans_n_init": 1, "norm": "group"}),
    "SPC": (SPC, {"num_members": 2, "latent_dim": 8, "widths": [16, 32], "head_hidden": 8, "pretrain_epochs": 1,
                  "epochs_per_meta": 1, "clusterer": "gmm", "noise": 0.1, "norm": "group"}),
}


class SaveAt(Callback):
    """Every rank saves the trainer's checkpoint to ``path`` after training batch ``step`` (1-based, over epochs)."""

    def __init__(self, path: str, step: int) -> None:
        self.path, self.step, self.seen = path, step, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen += 1
        if self.seen == self.step:
            trainer.save_checkpoint(self.path)


def _fit(method: str, out: Path, *, callbacks: list, ckpt_path: str | None = None) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(11, verbose=False)
    dm = ClusteringDataModule(**DATA)
    cls, kwargs = MODELS[method]
    model = cls(num_clusters=dm.num_clusters, input_shape=dm.input_shape, **kwargs)
    strategy = DDPStrategy(start_method="spawn", process_group_backend="gloo", timeout=PROCESS_GROUP_TIMEOUT)
    trainer = Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=3, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, default_root_dir=out, callbacks=[RecordFit(str(out)), *callbacks])
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("method", slow_cases(list(MODELS), set(MODELS) - {"DebiasedClustering"}))
def test_two_process_resume_from_mid_epoch_checkpoint(tmp_path: Path, method: str) -> None:
    ckpt = tmp_path / "mid.ckpt"
    full = _fit(method, tmp_path / "full", callbacks=[SaveAt(str(ckpt), step=13)])
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    loader = state["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader["epoch"] == 1 and 0 < loader["batches_done"] < loader["num_batches"]  # mid second epoch
    resumed = _fit(method, tmp_path / "resumed", callbacks=[], ckpt_path=str(ckpt))
    assert_ranks_identical(full)  # rank 0's clustering steps (UMAP, k-means, merges) were broadcast
    for rank in range(2):
        a, b = full[rank], resumed[rank]
        assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
        assert torch.equal(a["cluster"], b["cluster"]), f"rank {rank}: test clusters differ after resume"
        for key, value in a["state"].items():
            assert torch.equal(value, b["state"][key]), f"rank {rank}: {key} differs after resume"
