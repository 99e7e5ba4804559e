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
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from clusterlight import __version__
from clusterlight.data.datamodule import ShardedSequentialSampler, run_seed
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

    def check_data(self, datamodule: Any) -> None:
        """Raise :class:`ClusterlightError` (one line) for training data this method cannot use.

        Called by the CLI (``fit``) after the DataModule has built its splits and before the
        Trainer starts, so bad input stops the run before anything is written; with
        ``data.download: true`` the splits are built at the Trainer's setup, and a method that
        needs the check calls it again when fitting starts. Default: nothing to check.
        """

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
        # The seed fixes the training order and the per-batch draws: a resumed fit must keep it.
        checkpoint["clusterlight"] = {"method": type(self).__name__, "version": __version__, "seed": run_seed(0)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_method(checkpoint, type(self))

    # ------------------------------------------------------------------ whole-split passes
    @torch.no_grad()
    def compute_on_split(
        self, fn: Callable[[Tensor], Tensor] | None = None, split: str = "train", batch_size: int | None = None
    ) -> Tensor:
        """Apply ``fn`` (default :meth:`embed`) to every image of a split, in dataset order.

        The split goes through in global batches of ``batch_size`` (default: the DataModule's)
        consecutive samples, whatever the number of processes: under DDP each rank takes a
        contiguous chunk of every global batch (:class:`~clusterlight.data.datamodule.ShardedSequentialSampler`;
        nothing is padded or repeated; a rank whose chunk of the last batch is empty calls ``fn`` on
        an empty batch, so that collectives inside ``fn`` -- synchronised batch norm -- match), then
        the results are gathered and placed by dataset index. Every rank returns the same
        ``(N, ...)`` tensor, row ``i`` belonging to sample ``i`` of the split.

        ``fn`` runs under the Trainer's precision (autocast for ``bf16-mixed``/``16-mixed``, as in
        the training and evaluation steps, even though this is called from hooks outside them);
        the result is float32, and so is the clustering that follows.
        """
        fn = fn or self.embed
        dm = self._datamodule()
        dataset = dm.split_dataset(split)
        world = self.trainer.world_size if self._trainer is not None else 1
        batch_size = int(batch_size or dm.batch_size)
        sampler = ShardedSequentialSampler(len(dataset), batch_size, world, self.global_rank if world > 1 else 0)
        loader = dm.embedding_dataloader(split, batch_size=sampler.local_batch_size,
                                         sampler=sampler if world > 1 else None)
        was_training = self.training
        self.eval()
        outs, idxs = [], []
        precision = self.trainer.precision_plugin if self._trainer is not None else None

        def run(images: Tensor) -> None:
            with precision.forward_context() if precision is not None else contextlib.nullcontext():
                out = fn(images)
            outs.append(out.float())

        for batch in loader:
            run(batch["image"].to(self.device))
            idxs.append(batch["index"].to(self.device))
        while len(outs) < sampler.num_batches or not outs:  # an empty last chunk (or split): an empty batch
            run(torch.zeros((0, *dataset.images.shape[1:]), device=self.device))
            idxs.append(torch.zeros(0, dtype=torch.long, device=self.device))
        self.train(was_training)
        out, idx = torch.cat(outs), torch.cat(idxs)
        if world > 1:
            size = sampler.max_local_samples  # equal shapes for the gather; rows past this rank's count: index -1
            out = torch.cat([out, out.new_zeros((size - len(out), *out.shape[1:]))])
            idx = torch.cat([idx, idx.new_full((size - len(idx),), -1)])
            out = self.all_gather(out).flatten(0, 1)
            idx = self.all_gather(idx).flatten(0, 1)
            keep = idx >= 0
            out, idx = out[keep], idx[keep]
        result = out.new_zeros((len(dataset), *out.shape[1:]))
        result[idx] = out
        return result

    # ------------------------------------------------------------------ global batches under DDP
    def gather_batch(self, x: Tensor) -> tuple[Tensor, int]:
        """The global training batch of a per-sample tensor, and where this rank's rows start in it.

        Under DDP the global batch is every rank's batch concatenated in rank order, which is the
        one-process batch (see :class:`~clusterlight.data.datamodule.GlobalBatchSampler`). This
        rank's rows keep their autograd graph, the other ranks' rows are constants: a loss computed
        from it on every rank needs :meth:`gathered_loss`. Every rank must call this. On one
        process: ``(x, 0)``.
        """
        world = self.trainer.world_size if self._trainer is not None else 1
        if world == 1:
            return x, 0
        sizes = self.all_gather(torch.tensor([x.shape[0]], device=x.device)).view(-1).tolist()
        most = max(sizes)
        send = x.detach().to(torch.uint8) if x.dtype == torch.bool else x.detach()  # gloo gathers no bool
        if most > x.shape[0]:
            send = torch.cat([send, send.new_zeros((most - x.shape[0], *x.shape[1:]))])
        parts = [part.to(x.dtype) for part in self.all_gather(send).unbind(0)]
        rank = self.global_rank
        parts = [part[:n] for part, n in zip(parts, sizes)]
        parts[rank] = x
        return torch.cat(parts), int(sum(sizes[:rank]))

    def gathered_loss(self, loss: Tensor) -> Tensor:
        """A loss computed identically on every rank from :meth:`gather_batch` tensors: same value,
        gradient times the world size, so that DDP's averaging of the ranks' gradients gives the
        one-process gradient (each rank's gradient only reaches its own rows)."""
        world = self.trainer.world_size if self._trainer is not None else 1
        return loss if world == 1 else loss + (world - 1) * (loss - loss.detach())

    def global_batch_sum(self, x: Tensor) -> Tensor:
        """``x`` summed over the ranks (no gradient): per-rank sums become sums over the global batch."""
        world = self.trainer.world_size if self._trainer is not None else 1
        if world == 1:
            return x.detach()
        return self.trainer.strategy.reduce(x.detach().clone(), reduce_op="sum")

    def batch_generator(self, batch_idx: int, purpose: str) -> torch.Generator:
        """A generator for the random draws of one training batch, the same on every rank and for any
        number of processes: seeded by the run's seed (``seed_everything``), the epoch, the batch and
        ``purpose``. Draw the whole global batch's values on every rank and keep this rank's rows."""
        seed = run_seed(0)
        state = np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, int(self.current_epoch),
                                        int(batch_idx), zlib.crc32(purpose.encode())]).generate_state(2)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(state[0]) << 31 ^ int(state[1]))
        return gen

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
