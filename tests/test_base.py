"""The base module's own guarantees: owned hooks, non-finite losses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from clusterlight.data import ClusteringDataModule
from clusterlight.methods import AEKMeans, ClusteringModule


def test_methods_cannot_take_over_the_steps_that_see_labels() -> None:
    with pytest.raises(TypeError, match="training_step"):
        type("Sneaky", (ClusteringModule,), {"training_step": lambda self, batch, i: None})


class _NaNAfter(AEKMeans):
    """AEKMeans whose loss turns NaN at global step 7."""

    def fit_step(self, images, index, batch_idx):
        loss = super().fit_step(images, index, batch_idx)
        return loss * float("nan") if self.global_step >= 7 else loss


def test_non_finite_loss_stops_with_method_and_step_and_keeps_checkpoints(tmp_path: Path) -> None:
    dm = ClusteringDataModule(dataset="digits", max_samples=300, batch_size=64)
    model = _NaNAfter(num_clusters=10, input_shape=dm.input_shape, widths=[8, 16], kmeans_n_init=1)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=2)
    trainer = Trainer(max_epochs=5, accelerator="cpu", logger=False, callbacks=[ckpt], enable_progress_bar=False,
                      default_root_dir=tmp_path, num_sanity_val_steps=0)
    with pytest.raises(FloatingPointError, match=r"_NaNAfter: non-finite loss .* global step 7"):
        trainer.fit(model, datamodule=dm)
    saved = sorted(p.name for p in tmp_path.glob("*.ckpt"))
    assert "last.ckpt" in saved and any("step=6" in name for name in saved), saved
    state = torch.load(tmp_path / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
