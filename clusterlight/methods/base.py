"""The base LightningModule of every clustering method.

A method is one subclass of :class:`ClusteringModule` that fills in a few template hooks:

- :meth:`ClusteringModule.fit_step` -- one training step on a batch of images and their
  dataset indices. It returns the loss (automatic optimisation) or a dict of values to log
  (manual optimisation, where the method steps its own optimizers).
- :meth:`ClusteringModule.embed` -- images to embeddings (for figures, k-means, transfer).
- :meth:`ClusteringModule.cluster_outputs` -- images to a :class:`ClusterOutput`: the cluster,
  a confidence and, where the method has one, an out-of-distribution score.
- :meth:`ClusteringModule.eval_loss` -- a label-free quantity logged as ``val/loss``; checkpoint
  choice and early stopping use it, never ground-truth accuracy.
- :meth:`ClusteringModule.refresh_clusters` -- optional non-differentiable clustering step on the
  whole training split (k-means on embeddings, a target distribution, ...). The base calls it
  when the clusters are stale: before each validation during ``fit`` and before ``test`` or
  ``predict`` when the module was never clustered.

The base owns ``training_step``, ``validation_step``, ``test_step`` and ``predict_step``.
Subclasses may not override them: the base passes only the images and the dataset indices to
the method, so labels and OOD flags reach the evaluation metrics and nothing else. This is the
honesty guarantee of clusterlight, and ``tests/test_label_free.py`` checks it for every method.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DistributedSampler

from clusterlight import __version__
from clusterlight.errors import ClusterlightError
from clusterlight.metrics import ClusteringMetrics

_OWNED_HOOKS = ("training_step", "validation_step", "test_step", "predict_step")


@dataclass
class ClusterOutput:
    """What a method says about a batch of images.

    Attributes:
        cluster: ``LongTensor[B]``, the cluster of each image (``-1``: left unassigned).
        confidence: ``Tensor[B]`` in [0, 1].
        ood_score: ``Tensor[B]``, higher means more likely out-of-distribution; ``None`` when the
            method has no such score.
        embedding: ``Tensor[B, D]``, the embedding used for figures; ``None`` to skip them.
    """

    cluster: Tensor
    confidence: Tensor
    ood_score: Tensor | None = None
    embedding: Tensor | None = None


class ClusteringModule(LightningModule):
    """Base class of clusterlight's methods (see the module docstring for the hooks).

    Args:
        num_clusters: number of clusters; linked from the DataModule (its class count by default).
        input_shape: ``(channels, height, width)`` of the images; linked from the DataModule.
        optimizer: optimizer factory, e.g. ``torch.optim.Adam`` with its ``init_args``.
        lr_scheduler: optional learning-rate scheduler factory (stepped every epoch).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        overridden = [name for name in _OWNED_HOOKS if name in cls.__dict__]
        if overridden and not getattr(cls, "_allow_owned_hooks", False):
            raise TypeError(
                f"{cls.__name__} overrides {', '.join(overridden)}: implement fit_step/cluster_outputs instead, "
                "so labels stay out of the method"
            )

    def __init__(
        self,
        num_clusters: int = 10,
        input_shape: tuple[int, int, int] = (1, 28, 28),
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if num_clusters < 2:
            raise ClusterlightError(f"num_clusters must be at least 2, got {num_clusters}")
        if len(input_shape) != 3 or min(input_shape) < 1:
            raise ClusterlightError(f"input_shape must be (channels, height, width), got {tuple(input_shape)}")
        self.num_clusters = int(num_clusters)
        self.input_shape = tuple(int(v) for v in input_shape)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        # Optimizer/scheduler factories are callables: not hyperparameters (and not loadable with
        # weights_only). Methods name them optimizer*, lr_scheduler*.
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "optimizer_r", "optimizer_c",
                                          "lr_scheduler_r", "lr_scheduler_c"])
        self._clusters_stale = False
        self._metrics: dict[str, ClusteringMetrics] = {}
        self.last_metrics: dict[str, dict[str, float]] = {}

    # ------------------------------------------------------------------ template hooks
    def fit_step(self, images: Tensor, index: Tensor, batch_idx: int) -> Tensor | dict[str, Tensor]:
        """One training step. Return the loss, or (manual optimisation) a dict of values to log."""
        raise NotImplementedError

    def embed(self, images: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` to embeddings ``(B, D)``."""
        raise NotImplementedError

    def cluster_outputs(self, images: Tensor) -> ClusterOutput:
        """Images to clusters, confidences and (optionally) OOD scores."""
        raise NotImplementedError

    def eval_loss(self, images: Tensor, index: Tensor) -> Tensor | None:
        """A label-free loss on a validation batch, logged as ``val/loss`` (``None``: not logged)."""
        return None

    def refresh_clusters(self) -> None:
        """Recompute non-differentiable cluster state from the whole training split (optional)."""

    def clusters_ready(self) -> bool:
        """Whether the cluster state can be used for prediction (e.g. k-means centres fitted)."""
        return True

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}

    # ------------------------------------------------------------------ steps owned by the base
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        # Only the images and the dataset indices reach the method.
        out = self.fit_step(batch["image"], batch["index"], batch_idx)
        self._clusters_stale = True
        logs = out if isinstance(out, dict) else {"loss": out}
        for name, value in logs.items():
            if isinstance(value, Tensor) and value.numel() == 1 and not torch.isfinite(value).all():
                raise FloatingPointError(
                    f"{type(self).__name__}: non-finite {name} ({value.item()}) at global step {self.global_step}, "
                    f"epoch {self.current_epoch}, batch {batch_idx}; checkpoints written before it are kept"
                )
        bs = batch["image"].shape[0]
        self.log_dict({f"train/{k}": v.detach().float() for k, v in logs.items() if isinstance(v, Tensor)},
                      prog_bar=False, on_step=True, on_epoch=True, batch_size=bs)
        return out if not isinstance(out, dict) else None

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        out = self.cluster_outputs(batch["image"])
        pred = {"index": batch["index"], "cluster": out.cluster, "confidence": out.confidence}
        if out.ood_score is not None:
            pred["ood_score"] = out.ood_score
        return pred

    def _eval_step(self, batch: dict[str, Tensor], stage: str) -> dict[str, Tensor]:
        images, index = batch["image"], batch["index"]
        out = self.cluster_outputs(images)
        loss = self.eval_loss(images, index)
        if loss is not None:
            self.log(f"{stage}/loss", loss.float(), on_step=False, on_epoch=True, prog_bar=True,
                     batch_size=images.shape[0], sync_dist=True)
        # Labels and OOD flags are read here, for the metrics only.
        self._metrics[stage].update(out.cluster, batch["label"], index, batch["ood"], out.ood_score)
        result = {"index": index, "cluster": out.cluster, "confidence": out.confidence}
        if out.embedding is not None:
            result["embedding"] = out.embedding.detach()
        if out.ood_score is not None:
            result["ood_score"] = out.ood_score.detach()
        return result

    # ------------------------------------------------------------------ metrics
    def _datamodule(self) -> Any:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            raise ClusterlightError(f"{type(self).__name__} needs a clusterlight DataModule (trainer.fit(model, datamodule=...))")
        return dm

    def _new_metrics(self) -> ClusteringMetrics:
        dm = self._datamodule()
        counts = getattr(dm, "train_class_counts", None)
        metric = ClusteringMetrics(
            num_clusters=self.num_clusters,
            num_classes=int(dm.num_classes),
            train_class_counts=None if counts is None else [int(c) for c in counts],
        )
        return metric.to(self.device)

    def _start_eval(self, stage: str) -> None:
        self._metrics[stage] = self._new_metrics()
        if self._clusters_stale or not self.clusters_ready():
            if not self.trainer.sanity_checking:
                self.refresh_clusters()
                self._clusters_stale = False

    def _end_eval(self, stage: str) -> None:
        metric = self._metrics.pop(stage)
        if self.trainer.sanity_checking:
            return
        values = {k: float(v) for k, v in metric.compute().items() if not math.isnan(float(v))}
        self.last_metrics[stage] = values
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, sync_dist=False, rank_zero_only=False)

    def on_validation_epoch_start(self) -> None:
        self._start_eval("val")

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val")

    def on_test_epoch_start(self) -> None:
        self._start_eval("test")

    def on_test_epoch_end(self) -> None:
        self._end_eval("test")

    def on_predict_epoch_start(self) -> None:
        if not self.clusters_ready():
            self.refresh_clusters()

    # ------------------------------------------------------------------ summaries
    def on_fit_start(self) -> None:
        dm = self._datamodule()
        summary = getattr(dm, "split_summary", None)
        if summary:
            for logger in self.loggers:
                logger.log_hyperparams({"split": summary})

    def on_fit_end(self) -> None:
        self._print_summary("val", "fit")

    def on_test_end(self) -> None:
        self._print_summary("test", "test")

    def _print_summary(self, stage: str, when: str) -> None:
        values = self.last_metrics.get(stage)
        if not values:
            return
        dm = getattr(self.trainer, "datamodule", None)
        eval_on = getattr(dm, "eval_on", "?") if stage == "test" else "val split"
        keys = ["acc", "nmi", "ari", "tail_acc", "cluster_kl", "ood_auroc", "num_nonempty_clusters"]
        lines = [f"clusterlight {type(self).__name__} after {when} ({stage}, evaluated on: {eval_on})"]
        lines += [f"  {stage}/{k:<22} {values[k]:.4f}" for k in keys if k in values]
        rank_zero_info("\n".join(lines))

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["clusterlight"] = {"method": type(self).__name__, "version": __version__}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_method(checkpoint, type(self))

    # ------------------------------------------------------------------ whole-split passes
    @torch.no_grad()
    def compute_on_split(
        self, fn: Callable[[Tensor], Tensor] | None = None, split: str = "train", batch_size: int | None = None
    ) -> Tensor:
        """Apply ``fn`` (default :meth:`embed`) to every image of a split, in dataset order.

        Under DDP each rank processes its shard; the results are gathered and de-duplicated by
        dataset index (the distributed sampler pads with repeated samples), so every rank returns
        the same ``(N, ...)`` tensor, row ``i`` belonging to sample ``i`` of the split.

        ``fn`` runs under the Trainer's precision (autocast for ``bf16-mixed``/``16-mixed``, as in
        the training and evaluation steps, even though this is called from hooks outside them);
        the result is float32, and so is the clustering that follows.
        """
        fn = fn or self.embed
        dm = self._datamodule()
        dataset = getattr(dm, f"{split}_dataset")
        world = self.trainer.world_size if self._trainer is not None else 1
        sampler = None
        if world > 1:
            sampler = DistributedSampler(dataset, num_replicas=world, rank=self.global_rank, shuffle=False)
        loader = dm.embedding_dataloader(split, batch_size=batch_size, sampler=sampler)
        was_training = self.training
        self.eval()
        outs, idxs = [], []
        precision = self.trainer.precision_plugin if self._trainer is not None else None
        for batch in loader:
            with precision.forward_context() if precision is not None else contextlib.nullcontext():
                out = fn(batch["image"].to(self.device))
            outs.append(out.float())
            idxs.append(batch["index"].to(self.device))
        self.train(was_training)
        out, idx = torch.cat(outs), torch.cat(idxs)
        if world > 1:
            out = self.all_gather(out).flatten(0, 1)
            idx = self.all_gather(idx).flatten(0, 1)
        result = out.new_empty((len(dataset), *out.shape[1:]))
        result[idx] = out  # duplicates from padding carry identical rows
        return result

    def broadcast_tensor(self, value: Tensor | None, src: int = 0) -> Tensor:
        """Broadcast a tensor computed on rank ``src`` to every rank (every rank must call this)."""
        if self._trainer is None or self.trainer.world_size == 1:
            assert value is not None
            return value
        value = self.trainer.strategy.broadcast(None if value is None else value.cpu(), src=src)
        return value.to(self.device)


def check_checkpoint_method(checkpoint: dict[str, Any], cls: type) -> None:
    """Raise :class:`ClusterlightError` when a checkpoint was written by another method."""
    info = checkpoint.get("clusterlight")
    if info is None:
        raise ClusterlightError(f"this checkpoint was not written by clusterlight; cannot load it into {cls.__name__}")
    if info.get("method") != cls.__name__:
        raise ClusterlightError(
            f"checkpoint was written by method {info.get('method')}, not {cls.__name__}: pass --model {info.get('method')}"
        )
