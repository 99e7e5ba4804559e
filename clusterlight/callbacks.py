"""Callbacks: per-run config saving, evaluation figures and the prediction CSV writer."""

from __future__ import annotations

import csv
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from clusterlight.errors import ClusterlightError


def run_dir(trainer: Trainer) -> str:
    """The run's own directory: the same on every rank, and never shared by two runs.

    WandbLogger: ``<save_dir>/<project>/<run id>``; CSV/TensorBoard: the logger's versioned
    ``log_dir``; no logger: ``<default_root_dir>/runs/<time>-<pid>``. Checkpoints go to
    ``<run dir>/checkpoints`` (Lightning's own layout). Every rank must call this the first time
    (it broadcasts rank 0's answer); later calls return the cached value.
    """
    cached = getattr(trainer, "_clusterlight_run_dir", None)
    if cached is not None:
        return cached
    path = None
    if trainer.is_global_zero:
        logger = trainer.logger
        if isinstance(logger, WandbLogger):
            _ = logger.experiment  # starts the run so that its id exists
            path = os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), str(logger.version))
        elif logger is not None and getattr(logger, "log_dir", None):
            path = str(logger.log_dir)
        else:  # a resumed fit continues in the folder of the run it resumes (clusterlight.resume)
            path = getattr(trainer, "_clusterlight_resume_dir", None) or os.path.join(
                trainer.default_root_dir, "runs", time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}")
    path = trainer.strategy.broadcast(path)
    trainer._clusterlight_run_dir = path  # type: ignore[attr-defined]
    if trainer.logger is None:
        # Without a logger Lightning would put every run's checkpoints in one shared folder.
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
                cb.dirpath = os.path.join(path, "checkpoints")
    return path


class ClusteringCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, plus a ``last`` checkpoint for resuming interrupted fits.

    - On SIGTERM (a scheduler's pre-emption, ``kill``, ``scancel``) Lightning finishes the running
      training batch and stops; this callback then writes the whole training state to the
      ``last`` checkpoint, mid-epoch, and ``fit --ckpt_path last`` continues from the next batch.
    - Against a hard kill (SIGKILL, a lost node) ``last_every_n_batches`` also writes ``last``
      every so many training batches, besides the per-validation checkpoints; a resumed fit then
      trains the batches after it again, with the same result.

    Args:
        last_every_n_batches: also save ``last`` after every this many training batches (0: only
            at validations and on SIGTERM). Needs ``save_last``.
        **kwargs: the arguments of Lightning's ``ModelCheckpoint``.
    """

    def __init__(self, *args: Any, last_every_n_batches: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if last_every_n_batches < 0:
            raise ClusterlightError(f"checkpoint.last_every_n_batches must be >= 0, got {last_every_n_batches}")
        if last_every_n_batches and not self.save_last:
            raise ClusterlightError("checkpoint.last_every_n_batches needs checkpoint.save_last: true")
        self.last_every_n_batches = int(last_every_n_batches)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        n = self.last_every_n_batches
        if n and (trainer.fit_loop.total_batch_idx + 1) % n == 0 and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit" and self.save_last:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            rank_zero_info(f"clusterlight: stopped by SIGTERM at global step {trainer.global_step}; saved "
                           f"{self.last_model_path} (resume with: fit ... --ckpt_path last)")


class SaveRunConfig(SaveConfigCallback):
    """Saves the resolved config as ``config.yaml`` in the run's own directory (see :func:`run_dir`).

    Lightning's default writes to ``trainer.log_dir``, which with WandbLogger is the shared
    ``save_dir``: a second run would clash with the first. Here each run has its own file.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        directory = run_dir(trainer)
        if trainer.is_global_zero:
            os.makedirs(directory, exist_ok=True)
            path = os.path.join(directory, self.config_filename)
            if stage == "fit" and self.config.get("ckpt_path") and os.path.exists(path):
                # a resumed fit keeps the interrupted run's config and adds its own beside it
                stem, ext = os.path.splitext(self.config_filename)
                path = os.path.join(directory, f"{stem}.resumed-{time.strftime('%Y%m%d-%H%M%S')}{ext}")
            self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=self.multifile)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


class ClusteringFigures(Callback):
    """Evaluation figures as PNG files in the run directory and images in W&B.

    At the end of every ``every_n_epochs``-th validation and of ``test``: a 2-D map of the
    embeddings coloured by cluster and by class, the confusion matrix after Hungarian matching,
    the cluster sizes beside the true class sizes, and a grid of sample images of every cluster
    (``<tag>_samples.png``). Figures use up to ``max_points`` samples seen by rank 0 (under DDP:
    rank 0's shard); labels are read for the figures only.

    The sample grid draws from a uniform random sample of all the images the stage evaluated
    (reservoir sampling with a fixed seed), so memory stays at ``sample_images`` images whatever
    the size of the split, and the sample does not depend on the order of the split.

    Args:
        enabled: make figures at all.
        every_n_epochs: make validation figures every this many epochs (test figures always).
        max_points: at most this many samples in the figures.
        embedding_map: 2-D projection: ``pca`` (fast), ``umap`` or ``tsne``.
        sample_images: keep at most this many images for the sample grid (0: no sample grid).
        samples_per_cluster: at most this many images per cluster in the sample grid.
    """

    def __init__(
        self,
        enabled: bool = True,
        every_n_epochs: int = 5,
        max_points: int = 3000,
        embedding_map: Literal["pca", "umap", "tsne"] = "pca",
        sample_images: int = 400,
        samples_per_cluster: int = 8,
    ) -> None:
        super().__init__()
        if sample_images < 0 or samples_per_cluster < 1:
            raise ClusterlightError(f"figures: sample_images must be >= 0 and samples_per_cluster >= 1, got "
                                    f"{sample_images} and {samples_per_cluster}")
        self.enabled = enabled
        self.every_n_epochs = max(1, every_n_epochs)
        self.max_points = max_points
        self.embedding_map = embedding_map
        self.sample_images = sample_images
        self.samples_per_cluster = samples_per_cluster
        self._buffer: dict[str, list[np.ndarray]] = {}
        self._reset_samples()
        self.last_files: list[str] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.enabled:
            run_dir(trainer)

    def _active(self, trainer: Trainer, stage: str) -> bool:
        if not self.enabled or trainer.sanity_checking or not trainer.is_global_zero:
            return False
        if stage == "val":
            return (trainer.current_epoch + 1) % self.every_n_epochs == 0 or trainer.current_epoch + 1 == trainer.max_epochs
        return True

    def _reset_samples(self) -> None:
        """Empty the image reservoir (its generator restarts from the same seed)."""
        self._sample_x: np.ndarray | None = None  # (sample_images, C, H, W) float16, first _sample_n rows used
        self._sample_cluster = np.zeros(self.sample_images, dtype=np.int64)
        self._sample_n = 0  # rows of the reservoir in use
        self._sample_seen = 0  # samples offered to the reservoir so far
        self._sample_rng = np.random.default_rng(0)

    def _collect_samples(self, images: torch.Tensor, cluster: torch.Tensor) -> None:
        """Reservoir sampling (Vitter's algorithm R): every image seen is kept with equal probability."""
        size = self.sample_images
        if size == 0 or len(images) == 0:
            return
        position = self._sample_seen + np.arange(len(images))  # each image's position in the stream
        slot = np.where(position < size, position, self._sample_rng.integers(0, position + 1))
        take = np.flatnonzero(slot < size)
        self._sample_seen += len(images)
        if not len(take):
            return
        x = images[torch.as_tensor(take, device=images.device)].detach().to("cpu", torch.float16).numpy()
        c = cluster[torch.as_tensor(take, device=cluster.device)].detach().cpu().long().numpy()
        if self._sample_x is None:
            self._sample_x = np.empty((size, *x.shape[1:]), dtype=np.float16)
        for k, s in enumerate(slot[take]):  # in stream order: a later image replaces an earlier one
            self._sample_x[s], self._sample_cluster[s] = x[k], c[k]
        self._sample_n = min(size, self._sample_seen)

    def _collect(self, trainer: Trainer, outputs: Any, batch: dict[str, Any], stage: str) -> None:
        if not self._active(trainer, stage) or not isinstance(outputs, dict):
            return
        self._collect_samples(batch["image"], outputs["cluster"])
        have = sum(len(a) for a in self._buffer.get("cluster", []))
        if have >= self.max_points:
            return
        take = self.max_points - have
        parts = {
            "cluster": outputs["cluster"],
            "label": batch["label"],
            "ood": batch["ood"],
        }
        if "embedding" in outputs:
            parts["embedding"] = outputs["embedding"]
        for key, value in parts.items():
            self._buffer.setdefault(key, []).append(value[:take].detach().float().cpu().numpy())

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(trainer, outputs, batch, "val")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(trainer, outputs, batch, "test")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._render(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._render(trainer, pl_module, "test")

    def _render(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        buffer, self._buffer = self._buffer, {}
        samples = (self._sample_x, self._sample_cluster, self._sample_n)
        self._reset_samples()
        if not self._active(trainer, stage) or not buffer:
            return
        data = {k: np.concatenate(v) for k, v in buffer.items()}
        from clusterlight import plots

        keep = data["ood"] < 0.5
        cluster, label = data["cluster"][keep].astype(int), data["label"][keep].astype(int)
        dm = getattr(trainer, "datamodule", None)
        class_names = getattr(dm, "class_names", None)
        out_dir = Path(run_dir(trainer)) / "figures"
        out_dir.mkdir(parents=True, exist_ok=True)
        tag = f"{stage}_epoch{trainer.current_epoch:03d}" if stage == "val" else "test"
        figures = {
            "confusion": plots.confusion_figure(cluster, label, pl_module.num_clusters, class_names),
            "cluster_sizes": plots.sizes_figure(cluster, label, pl_module.num_clusters),
        }
        if "embedding" in data:
            figures["embedding_map"] = plots.embedding_figure(
                data["embedding"], data["cluster"].astype(int), data["label"].astype(int), data["ood"] > 0.5,
                method=self.embedding_map,
            )
        sample_x, sample_cluster, sample_n = samples
        if sample_n:
            figures["samples"] = plots.sample_grid_figure(
                sample_x[:sample_n], sample_cluster[:sample_n], pl_module.num_clusters, self.samples_per_cluster
            )
        files = []
        for name, fig in figures.items():
            path = out_dir / f"{tag}_{name}.png"
            fig.savefig(path, dpi=100, bbox_inches="tight")
            plots.close(fig)
            files.append(str(path))
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(key=f"{stage}/{name}", images=[str(path)], step=trainer.global_step)
        self.last_files = files


class PredictionWriter(Callback):
    """Writes one CSV row per predicted sample: index, cluster, confidence, OOD score, file path.

    Set ``path`` (``--predictions.path preds.csv`` on the command line) to enable it. Under DDP
    the rows of all ranks are gathered and rank 0 writes the file; the file is written to a
    temporary name and renamed, so a failed run never leaves a half-written CSV.

    Args:
        path: where to write the CSV (``None``: write nothing).
    """

    def __init__(self, path: str | None = None) -> None:
        super().__init__()
        self.path = path
        self._rows: list[dict[str, np.ndarray]] = []

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._rows = []
        if self.path is not None:
            parent = Path(self.path).expanduser().resolve().parent
            if not parent.is_dir():
                raise ClusterlightError(f"predictions.path: folder {parent} does not exist")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.path is None:
            return
        self._rows.append({k: v.detach().float().cpu().numpy() for k, v in outputs.items()})

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.path is None:
            return
        rows = {k: np.concatenate([r[k] for r in self._rows]) for k in self._rows[0]} if self._rows else {}
        if torch.distributed.is_available() and torch.distributed.is_initialized() and trainer.world_size > 1:
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, rows)
            parts = [g for g in gathered if g]
            rows = {k: np.concatenate([g[k] for g in parts]) for k in parts[0]} if parts else {}
        if not trainer.is_global_zero or not rows:
            return
        index = rows["index"].astype(np.int64)
        _, first = np.unique(index, return_index=True)  # sorted by index, duplicates dropped
        dataset = getattr(getattr(trainer, "datamodule", None), "predict_dataset", None)
        paths = getattr(dataset, "paths", None)
        columns = ["index", "cluster", "confidence"] + (["ood_score"] if "ood_score" in rows else [])
        target = Path(self.path).expanduser()
        fd, tmp = tempfile.mkstemp(prefix=".predictions-", suffix=".csv", dir=target.resolve().parent)
        try:
            with os.fdopen(fd, "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(columns + (["path"] if paths is not None else []))
                for i in first:
                    row = [int(index[i]), int(rows["cluster"][i]), f"{rows['confidence'][i]:.6f}"]
                    if "ood_score" in rows:
                        row.append(f"{rows['ood_score'][i]:.6g}")
                    if paths is not None:
                        row.append(paths[int(index[i])])
                    writer.writerow(row)
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        rank_zero_info(f"clusterlight: wrote {len(first)} predictions to {target}")


class CollapseMonitor(Callback):
    """Warns, and logs ``val/collapsed`` (0 or 1), when a clustering collapses.

    Collapse: more than ``max_cluster_frac`` of the in-distribution validation samples in one
    cluster, or fewer non-empty clusters than ``min_nonempty_frac`` times the clusters asked for.
    Reads the label-free size statistics the base module computes (``largest_cluster_frac``,
    ``num_nonempty_clusters``); it changes nothing in training.

    Args:
        max_cluster_frac: largest allowed share of the samples in one cluster.
        min_nonempty_frac: smallest allowed share of the clusters that are non-empty.
    """

    def __init__(self, max_cluster_frac: float = 0.5, min_nonempty_frac: float = 1.0) -> None:
        super().__init__()
        self.max_cluster_frac = max_cluster_frac
        self.min_nonempty_frac = min_nonempty_frac
        self.history: list[bool] = []

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        values = getattr(pl_module, "last_metrics", {}).get("val")
        if trainer.sanity_checking or not values or "largest_cluster_frac" not in values:
            return
        asked = getattr(pl_module, "num_clusters", 0)
        largest, nonempty = values["largest_cluster_frac"], values.get("num_nonempty_clusters", asked)
        collapsed = largest > self.max_cluster_frac or nonempty < self.min_nonempty_frac * asked
        self.history.append(collapsed)
        if collapsed:
            rank_zero_warn(f"{type(pl_module).__name__}: clustering collapse at epoch {trainer.current_epoch}: "
                           f"{largest:.1%} of the samples in one cluster, {nonempty:.0f} of {asked} clusters non-empty")
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({"val/collapsed": float(collapsed)}, step=trainer.global_step)
