"""The Lightning data module: splits, long-tail subsampling and out-of-distribution mixing."""

from __future__ import annotations

import math
import numbers
import os
import zlib
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from clusterlight.data.datasets import DATASETS, ImageArrays, convert_images
from clusterlight.data.splits import (
    long_tail_counts,
    split_rng,
    stratified_holdout,
    stratified_sample,
    subsample_per_class,
)
from clusterlight.errors import ClusterlightError

__all__ = ["ClusteringDataModule", "ClusteringDataset", "GlobalBatchSampler", "ShardedSequentialSampler", "run_seed"]

SPLIT_NAMES = ("train", "val", "test", "predict")


class ClusteringDataset(Dataset):
    """Images of one split, kept as a uint8 tensor ``(N, C, H, W)``.

    Items are dicts ``{"image": float32 (C, H, W) in [0, 1], "index": int, "label": int,
    "ood": bool}``; ``index`` is the position in this dataset (``0..len-1``). Labels are the
    remapped in-distribution class ids ``0..C'-1``; out-of-distribution samples and samples
    of unlabelled data have label ``-1`` (``ood`` tells them apart).

    Attributes:
        images: uint8 tensor ``(N, C, H, W)``.
        labels: int64 tensor ``(N,)``.
        ood: bool tensor ``(N,)``.
        paths: the file of each sample (``None`` entries for samples without one), or ``None``.
        source_index: int64 array ``(N,)``, the sample's position in its source's ``split="all"``
            data (the OOD data set's for samples of ``ood_dataset``).
        original_labels: int64 array ``(N,)``, the class id in the sample's source (the OOD data
            set's for samples of ``ood_dataset``; ``-1`` for unlabelled sources).
        class_names: names of the in-distribution classes, or ``None``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | np.ndarray | None = None,
                 ood: torch.Tensor | np.ndarray | None = None, paths: list[str | None] | None = None,
                 source_index: np.ndarray | None = None, original_labels: np.ndarray | None = None,
                 class_names: list[str] | None = None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be a uint8 tensor (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        n = len(images)
        self.images = images
        self.labels = torch.full((n,), -1, dtype=torch.int64) if labels is None \
            else torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        self.ood = torch.zeros(n, dtype=torch.bool) if ood is None else torch.as_tensor(np.asarray(ood), dtype=torch.bool)
        self.paths = paths
        self.source_index = np.arange(n, dtype=np.int64) if source_index is None \
            else np.asarray(source_index, dtype=np.int64)
        self.original_labels = np.full(n, -1, dtype=np.int64) if original_labels is None \
            else np.asarray(original_labels, dtype=np.int64)
        self.class_names = class_names
        for name in ("labels", "ood", "source_index", "original_labels"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} must have {n} entries, got {len(getattr(self, name))}")
        if paths is not None and len(paths) != n:
            raise ValueError(f"paths must have {n} entries, got {len(paths)}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_ood(self) -> int:
        """Number of out-of-distribution samples."""
        return int(self.ood.sum())

    def _position(self, index: int) -> int:
        n = len(self)
        i = int(index)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} samples")
        return i % n

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = self._position(index)
        return {"image": self.images[i].float().div_(255.0), "index": i, "label": int(self.labels[i]),
                "ood": bool(self.ood[i])}

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """A batch of items with one gather and one float conversion (default collate still applies)."""
        positions = [self._position(i) for i in indices]
        idx = torch.as_tensor(positions, dtype=torch.long)
        images = self.images.index_select(0, idx).float().div_(255.0)
        labels = self.labels[idx].tolist()
        ood = self.ood[idx].tolist()
        return [{"image": images[k], "index": positions[k], "label": labels[k], "ood": ood[k]}
                for k in range(len(positions))]

    def __repr__(self) -> str:
        c, h, w = self.images.shape[1:]
        return f"ClusteringDataset(n={len(self)}, shape=({c}, {h}, {w}), ood={self.num_ood})"


def run_seed(default: int = 0) -> int:
    """The run's seed: the one ``seed_everything`` set (``PL_GLOBAL_SEED``), else ``default``."""
    value = os.environ.get("PL_GLOBAL_SEED")
    return default if value is None else int(value)


def _divisible_hint(batch_size: int, world: int) -> str:
    low, high = batch_size // world * world, -(-batch_size // world) * world
    options = " or ".join(str(v) for v in dict.fromkeys(v for v in (low, high) if v > 0))
    return (f"batch_size {batch_size} is the global batch size (summed over processes) and must be divisible by "
            f"the {world} processes (devices x nodes); use {options}")


class GlobalBatchSampler(DistributedSampler):
    """Shuffled training order whose global batches do not depend on the number of processes.

    Every epoch draws one permutation ``perm`` of the ``N`` samples from ``(seed, epoch)`` with a
    local generator (the global RNG is never touched; Lightning calls :meth:`set_epoch`). Global
    batch ``t`` is ``perm[t*B : (t+1)*B]`` with ``B = batch_size``, the **global** batch size.
    Process ``r`` of ``W`` yields ``perm[t*B + r*b : t*B + (r+1)*b]`` with ``b = B / W`` (load it
    with ``DataLoader(batch_size=b)``), so the union of the processes' batch ``t`` is exactly the
    one-process batch ``t`` and every process takes the same number of equal steps.

    The last ``N mod B`` samples of the epoch (different ones every epoch) do not fill a global
    batch: with ``drop_last`` they are skipped. Without it they form a last, smaller batch, split
    into ``W`` contiguous chunks of ``ceil(n / W)`` samples, a short chunk padded with the epoch's
    first samples (as ``DistributedSampler`` pads); under ``W > 1`` that batch equals the
    one-process batch only when ``n`` is a multiple of ``W``.

    A ``DistributedSampler`` subclass, so Lightning injects no sampler of its own.

    Args:
        dataset: the training dataset (only its length is used).
        batch_size: the global batch size ``B``; must be divisible by ``num_replicas``.
        num_replicas: number of processes ``W``.
        rank: this process's rank ``r``.
        seed: seed of the permutations (the run's seed).
        drop_last: skip the samples that do not fill a last global batch.
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 drop_last: bool = True) -> None:
        if batch_size < 1 or num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"bad batch_size {batch_size}, num_replicas {num_replicas} or rank {rank}")
        if batch_size % num_replicas:
            raise ClusterlightError(_divisible_hint(batch_size, num_replicas))
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=drop_last)
        n = self.length = len(dataset)
        self.global_batch_size = int(batch_size)
        self.local_batch_size = self.global_batch_size // num_replicas
        self.num_full_batches = n // self.global_batch_size
        self.remainder = n - self.num_full_batches * self.global_batch_size
        last = 0 if drop_last or self.remainder == 0 else -(-self.remainder // num_replicas)
        self.num_samples = self.num_full_batches * self.local_batch_size + last
        self.total_size = self.num_samples * num_replicas
        self.num_batches = self.num_full_batches + (1 if last else 0)
        self._resume: tuple[int, int] | None = None

    def resume(self, epoch: int, batches_done: int) -> None:
        """Continue an interrupted epoch: the next iteration is epoch ``epoch`` without its first
        ``batches_done`` global batches (once; later epochs are whole). An epoch whose batches were
        all done continues with the next epoch."""
        if batches_done >= self.num_batches:
            epoch, batches_done = epoch + 1, 0
        self.set_epoch(int(epoch))
        self._resume = (int(epoch), int(batches_done))

    def __len__(self) -> int:
        return self.num_samples

    def permutation(self) -> np.ndarray:
        """This epoch's order of the samples (the same on every process)."""
        rng = np.random.default_rng([int(self.seed) & 0xFFFFFFFF, int(self.seed) >> 32 & 0xFFFFFFFF,
                                     zlib.crc32(b"train_order"), int(self.epoch)])
        return rng.permutation(self.length)

    def global_batches(self) -> list[list[int]]:
        """This epoch's one-process batches (what ``W = 1`` yields, batch by batch)."""
        perm = self.permutation().tolist()
        b = self.global_batch_size
        batches = [perm[t * b:(t + 1) * b] for t in range(self.num_full_batches)]
        if not self.drop_last and self.remainder:
            batches.append(perm[self.num_full_batches * b:])
        return batches

    def __iter__(self) -> Iterator[int]:
        perm = self.permutation()
        big, small, r = self.global_batch_size, self.local_batch_size, self.rank
        full = perm[:self.num_full_batches * big].reshape(self.num_full_batches, big)
        mine = full[:, r * small:(r + 1) * small].reshape(-1).tolist()
        if not self.drop_last and self.remainder:
            chunk = -(-self.remainder // self.num_replicas)
            tail = perm[self.num_full_batches * big:][r * chunk:(r + 1) * chunk].tolist()
            mine += tail + perm[:chunk - len(tail)].tolist()  # pad a short chunk with the epoch's first samples
        if self._resume is not None:
            epoch, done = self._resume
            self._resume = None
            if epoch == self.epoch:  # batches are contiguous runs of local_batch_size in ``mine``
                mine = mine[done * small:]
        return iter(mine)


class TrainLoader(DataLoader):
    """The training DataLoader, resumable mid-epoch.

    Lightning stores :meth:`state_dict` in every checkpoint (``loops.fit_loop.state_dict.combined_loader``)
    and, when fitting resumes from one, calls :meth:`load_state_dict` before it iterates: the
    :class:`GlobalBatchSampler` then continues the interrupted epoch's permutation after its last
    finished batch, so a resumed run sees the batches that the uninterrupted run would have seen.

    Args:
        progress: returns ``(epoch, batches finished in it)`` of the running fit (read when a
            checkpoint is saved).
    """

    def __init__(self, *args: Any, progress: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._progress = progress

    def state_dict(self) -> dict[str, int]:
        sampler = self.sampler
        epoch, done = self._progress() if self._progress is not None else (int(sampler.epoch), 0)
        return {"epoch": int(epoch), "batches_done": int(done), "num_batches": int(sampler.num_batches),
                "global_batch_size": int(sampler.global_batch_size), "num_samples": int(sampler.length)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = self.sampler
        if not state:
            return
        same = (state.get("global_batch_size"), state.get("num_samples")) == (sampler.global_batch_size, sampler.length)
        if not same:
            raise ClusterlightError(
                f"the checkpoint's training order has global batch size {state.get('global_batch_size')} over "
                f"{state.get('num_samples')} samples, this run {sampler.global_batch_size} over {sampler.length}: "
                "resume with the data settings of the interrupted run")
        sampler.resume(state["epoch"], state["batches_done"])


class ShardedSequentialSampler(Sampler[int]):
    """The samples in order, for whole-split passes under DDP, in global batches of the one-process size.

    Global batch ``t`` is ``[t*B, (t+1)*B)`` (cut at ``N``); process ``r`` of ``W`` takes a
    contiguous chunk of it: ``[t*B + r*c, t*B + (r+1)*c)`` with ``c = ceil(B / W)`` for the full
    batches, and for the last, partial one near-equal parts (sizes differ by at most one; a process
    gets none only when that batch has fewer than ``W`` samples). Nothing is padded or repeated, so
    gathered results need no de-duplication, and a layer that pools over a batch (synchronised batch
    norm in training mode) sees the same batches as one process. Load it with
    ``DataLoader(batch_size=c)``: the loader yields the chunks one by one, :attr:`num_batches` of
    them, one fewer where this process's last chunk is empty (callers then run an empty batch, so
    that collectives match).

    Args:
        length: number of samples ``N``.
        batch_size: the global batch size ``B``.
        num_replicas: number of processes ``W``.
        rank: this process's rank ``r``.
    """

    def __init__(self, length: int, batch_size: int, num_replicas: int = 1, rank: int = 0) -> None:
        if batch_size < 1 or num_replicas < 1 or not 0 <= rank < num_replicas or length < 0:
            raise ValueError(f"bad length {length}, batch_size {batch_size}, num_replicas {num_replicas} or rank {rank}")
        self.length, self.num_replicas, self.rank = int(length), int(num_replicas), int(rank)
        self.local_batch_size = -(-int(batch_size) // self.num_replicas)
        self.global_batch_size = self.local_batch_size * self.num_replicas
        self.num_batches = -(-self.length // self.global_batch_size)

    def chunks(self, rank: int | None = None) -> list[range]:
        """The chunk of every global batch for ``rank`` (default: this process)."""
        r = self.rank if rank is None else rank
        big, c, w = self.global_batch_size, self.local_batch_size, self.num_replicas
        full = self.length // big
        out = [range(t * big + r * c, t * big + (r + 1) * c) for t in range(full)]
        if full < self.num_batches:  # the partial last batch: near-equal parts, the larger ones first
            base, extra = divmod(self.length - full * big, w)
            start = full * big + r * base + min(r, extra)
            out.append(range(start, start + base + (r < extra)))
        return out

    @property
    def max_local_samples(self) -> int:
        """The most samples any process gets (rank 0's count), for equal-size gathers."""
        return sum(len(chunk) for chunk in self.chunks(0))

    def __iter__(self) -> Iterator[int]:
        return (i for chunk in self.chunks() for i in chunk)

    def __len__(self) -> int:
        return sum(len(chunk) for chunk in self.chunks())


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


class ClusteringDataModule(pl.LightningDataModule):
    """Image data for clustering, with long-tailed and out-of-distribution splits.

    The split is deterministic in ``seed`` (independent of the training seed): a held-out
    test split (the official one, or a stratified ``test_fraction`` of the data), held-out
    OOD classes, an optional stratified cap (``max_samples``), a long-tail subsample with a
    seed-permuted class order, a stratified train/val split, then OOD samples mixed into
    val and test. In-distribution labels are remapped to ``0..C'-1`` in the order of the
    original class ids; OOD samples have label ``-1`` and ``ood=True``.

    Args:
        dataset: Data source, one of the names in ``clusterlight.data.DATASETS`` (digits, usps,
            coil20, mnist, fashion_mnist, cifar10, stl10, folder, npz).
        root: Where the data lives: a folder for mnist/fashion_mnist/cifar10/stl10 (default
            ~/.cache/clusterlight), the class-folder tree for folder, the .npz file for npz; for usps
            and coil20 a folder holding usps.npz/coil20.npz (default: the shipped copy).
        download: Download torchvision data sets into root when missing.
        batch_size: The global batch size of all data loaders: under DDP each of the W processes
            (devices x nodes) loads batch_size / W samples per step, so the global batches, and the
            results, do not depend on W (training needs batch_size divisible by W). Training batches
            come from :class:`GlobalBatchSampler`: one permutation per epoch from the run's seed
            (``seed_everything``; ``seed`` when it was not called) and the epoch, the same global
            batches on any number of processes.
        num_workers: Data loader worker processes (0 loads in the main process).
        val_fraction: Stratified fraction of the (long-tailed) training pool kept for validation, in [0, 1).
        test_fraction: Stratified fraction held out as test split for sources without an official
            test split (digits, usps, coil20, folder, npz), in [0, 1); unused with eval_on "all".
        imbalance_ratio: Head-to-tail ratio of the long-tailed training pool (1 = keep the class balance).
        imbalance_profile: Long-tail profile: "exp" (exponential decay over class ranks) or "step"
            (half the classes keep all samples, the other half get 1/imbalance_ratio of them).
        imbalance_test: Apply the long-tail profile (same class order and ratio) to the test split too;
            by default the test split keeps its natural class balance.
        ood_classes: Class ids (0-based, of the source) held out of training entirely and mixed into
            val/test as out-of-distribution samples.
        ood_dataset: A second data source (a name as for dataset) whose images are mixed into val/test as
            out-of-distribution samples, resized to the main images' size and channels.
        ood_root: Root of ood_dataset (as root for dataset).
        ood_fraction: Fraction of each val/test split that is OOD when ood_classes or ood_dataset is set,
            in [0, 1): n_ood = round(f / (1 - f) * n_in_distribution), capped by the OOD samples available.
        seed: Seed of the data split (independent of the training seed).
        num_clusters: Number of clusters (default: the number of in-distribution classes; required
            for unlabelled data).
        eval_on: "test": evaluate on the held-out test split; "all": train on the whole data set
            (official train + test, no held-out part) and evaluate on train + val (+ OOD), the protocol
            of most clustering papers.
        image_size: Resize images to image_size x image_size (bilinear, antialiased).
        channels: Convert images to 1 (grayscale) or 3 (RGB) channels.
        max_samples: Stratified cap on the training pool (before long-tail subsampling), for quick runs.
        skip_corrupt: Skip unreadable image files of a folder source (counted in the summary) instead
            of failing.
        pin_memory: Pin batches in page-locked memory (only when CUDA is available).
        drop_last: Skip the training samples that do not fill a last global batch (the N mod batch_size
            last of each epoch's order, different ones every epoch), so that every step has batch_size
            samples; false keeps them as a smaller last batch (under DDP then equal to one process only
            when their number is a multiple of the process count).
    """

    def __init__(
        self,
        dataset: str = "digits",
        root: str | None = None,
        download: bool = False,
        batch_size: int = 256,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        imbalance_ratio: float = 1.0,
        imbalance_profile: Literal["exp", "step"] = "exp",
        imbalance_test: bool = False,
        ood_classes: list[int] | None = None,
        ood_dataset: str | None = None,
        ood_root: str | None = None,
        ood_fraction: float = 0.2,
        seed: int = 0,
        num_clusters: int | None = None,
        eval_on: Literal["test", "all"] = "test",
        image_size: int | None = None,
        channels: int | None = None,
        max_samples: int | None = None,
        skip_corrupt: bool = False,
        pin_memory: bool = True,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        self._validate_options(locals())
        self.dataset = dataset
        self.root = root
        self.download = bool(download)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.imbalance_ratio = float(imbalance_ratio)
        self.imbalance_profile = imbalance_profile
        self.imbalance_test = bool(imbalance_test)
        self.ood_classes = None if ood_classes is None else [int(c) for c in ood_classes]
        self.ood_dataset = ood_dataset
        self.ood_root = ood_root
        self.ood_fraction = float(ood_fraction)
        self.seed = int(seed)
        self.eval_on = eval_on
        self.image_size = image_size
        self.channels = channels
        self.max_samples = max_samples
        self.skip_corrupt = bool(skip_corrupt)
        self.pin_memory = bool(pin_memory)
        self.drop_last = bool(drop_last)

        self.source = DATASETS[dataset]
        self.source.check(root, self.download)
        if ood_dataset is not None:
            DATASETS[ood_dataset].check(ood_root, self.download)
        shape, total_classes, names = self.source.info(root)
        self.source_num_classes: int | None = total_classes
        self._check_classes(total_classes)

        if total_classes is None:
            self.num_classes: int | None = None
            self.class_names: list[str] | None = None
            self.id_classes = np.zeros(0, dtype=np.int64)
        else:
            held = set(self.ood_classes or ())
            self.id_classes = np.array([c for c in range(total_classes) if c not in held], dtype=np.int64)
            self.num_classes = len(self.id_classes)
            self.class_names = None if names is None else [names[c] for c in self.id_classes.tolist()]
        if num_clusters is None:
            if self.num_classes is None:
                raise ClusterlightError(f"num_clusters is required: dataset {dataset!r} at {root!r} is unlabelled "
                                        "(no class folders / no 'labels'); set num_clusters >= 2")
            if self.num_classes < 2:
                raise ClusterlightError(f"ood_classes {self.ood_classes} leave {self.num_classes} in-distribution "
                                        "class; keep at least 2 classes or set num_clusters >= 2")
            num_clusters = self.num_classes
        self.num_clusters: int = int(num_clusters)
        # Record the resolved num_clusters: the model gets it through the CLI link, and Lightning refuses
        # to log data and model hparams that share a key with different values. The first call takes the
        # arguments (under LightningCLI: the parsed config, with its class path); the second replaces it.
        self.save_hyperparameters()
        self.save_hyperparameters({**self.hparams, "num_clusters": self.num_clusters})
        c, h, w = shape
        self.input_shape: tuple[int, int, int] = (
            int(channels or c), int(image_size or h), int(image_size or w))

        self.train_dataset: ClusteringDataset | None = None
        self.val_dataset: ClusteringDataset | None = None
        self.test_dataset: ClusteringDataset | None = None
        self.predict_dataset: ClusteringDataset | None = None
        self.train_class_counts: np.ndarray = np.zeros(0, dtype=np.int64)
        self.split_summary: dict[str, Any] = {}

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _validate_options(args: dict[str, Any]) -> None:
        """Checks that need no data; one-line :class:`ClusterlightError` messages."""
        known = ", ".join(sorted(DATASETS))
        for key in ("dataset", "ood_dataset"):
            name = args[key]
            if name is None and key == "ood_dataset":
                continue
            if not isinstance(name, str) or name not in DATASETS:
                raise ClusterlightError(f"{key} {name!r} is unknown; known datasets: {known}")
        for key in ("root", "ood_root"):
            if args[key] is not None and (not isinstance(args[key], str) or not args[key]):
                raise ClusterlightError(f"{key} must be a path (a non-empty string), got {args[key]!r}")
        for key in ("download", "imbalance_test", "skip_corrupt", "pin_memory", "drop_last"):
            if not isinstance(args[key], (bool, np.bool_)):
                raise ClusterlightError(f"{key} must be true or false, got {args[key]!r}")
        for key, low in (("batch_size", 1), ("num_workers", 0)):
            if not _is_int(args[key]) or args[key] < low:
                raise ClusterlightError(f"{key} must be an integer >= {low}, got {args[key]!r}")
        for key in ("val_fraction", "test_fraction", "ood_fraction"):
            value = args[key]
            if not _is_number(value) or not 0 <= value < 1:
                raise ClusterlightError(f"{key} must be a number in [0, 1), got {value!r}")
        ratio = args["imbalance_ratio"]
        if not _is_number(ratio) or not math.isfinite(ratio) or ratio < 1:
            raise ClusterlightError(f"imbalance_ratio must be a finite number >= 1 (1 = balanced), got {ratio!r}")
        if args["imbalance_profile"] not in ("exp", "step"):
            raise ClusterlightError(f"imbalance_profile must be 'exp' or 'step', got {args['imbalance_profile']!r}")
        if args["eval_on"] not in ("test", "all"):
            raise ClusterlightError(f"eval_on must be 'test' or 'all', got {args['eval_on']!r}")
        if not _is_int(args["seed"]):
            raise ClusterlightError(f"seed must be an integer, got {args['seed']!r}")
        for key, low in (("num_clusters", 2), ("image_size", 1), ("max_samples", 1)):
            if args[key] is not None and (not _is_int(args[key]) or args[key] < low):
                raise ClusterlightError(f"{key} must be an integer >= {low} or null, got {args[key]!r}")
        if args["channels"] is not None and (not _is_int(args["channels"]) or args["channels"] not in (1, 3)):
            raise ClusterlightError(f"channels must be 1 (grayscale), 3 (RGB) or null, got {args['channels']!r}")
        ood_classes = args["ood_classes"]
        if ood_classes is not None:
            if isinstance(ood_classes, (str, bytes)) or not isinstance(ood_classes, Sequence) \
                    or not all(_is_int(c) for c in ood_classes):
                raise ClusterlightError(f"ood_classes must be a list of class ids (integers), got {ood_classes!r}")
            if len(set(ood_classes)) != len(ood_classes):
                raise ClusterlightError(f"ood_classes {list(ood_classes)} lists a class id twice; give each once")
            if args["ood_dataset"] is not None and len(ood_classes):
                raise ClusterlightError("ood_classes and ood_dataset are both set; choose one source of "
                                        "out-of-distribution samples")
        if args["ood_root"] is not None and args["ood_dataset"] is None:
            raise ClusterlightError("ood_root is set but ood_dataset is not; set ood_dataset too or drop ood_root")
        if args["ood_dataset"] is not None and args["ood_dataset"] == args["dataset"] \
                and args["ood_root"] == args["root"]:
            raise ClusterlightError(f"ood_dataset {args['ood_dataset']!r} is the main dataset itself; use "
                                    "another dataset (or another ood_root), or ood_classes")
        source = DATASETS[args["dataset"]]
        if args["eval_on"] == "test" and not source.has_test_split and args["test_fraction"] == 0:
            raise ClusterlightError(f"test_fraction is 0 but dataset {args['dataset']!r} has no official test split "
                                    "and eval_on is 'test'; set test_fraction in (0, 1) or eval_on: all")
        if source.requires_root and args["root"] is None:
            raise ClusterlightError(f"dataset {args['dataset']!r} needs root (a "
                                    f"{'.npz file' if args['dataset'] == 'npz' else 'folder'} path)")
        if args["ood_dataset"] is not None and DATASETS[args["ood_dataset"]].requires_root \
                and args["ood_root"] is None:
            raise ClusterlightError(f"ood_dataset {args['ood_dataset']!r} needs ood_root (a file or folder path)")
        for key, path in (("root", args["root"]), ("ood_root", args["ood_root"])):
            if path is not None and not args["download"] and not os.path.exists(os.path.expanduser(path)):
                raise ClusterlightError(f"{key} {path!r} does not exist; give an existing path"
                                        " (or download: true for torchvision datasets)")

    def _check_classes(self, total: int | None) -> None:
        ood = self.ood_classes
        if total is None:
            if ood:
                raise ClusterlightError(f"ood_classes needs labels but dataset {self.dataset!r} at {self.root!r} is "
                                        "unlabelled; use ood_dataset instead or add class folders/labels")
            if self.imbalance_ratio > 1:
                raise ClusterlightError(f"imbalance_ratio > 1 needs labels but dataset {self.dataset!r} at "
                                        f"{self.root!r} is unlabelled; use imbalance_ratio: 1")
            return
        if ood:
            bad = [c for c in ood if not 0 <= c < total]
            if bad:
                raise ClusterlightError(f"ood_classes {bad} not in 0..{total - 1} (dataset {self.dataset!r} has "
                                        f"{total} classes)")
            if len(ood) >= total:
                raise ClusterlightError(f"ood_classes names all {total} classes of dataset {self.dataset!r}; "
                                        "leave at least one class in distribution")

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Download the data sets (``download=True`` only)."""
        if self.download:
            self.source.prepare(self.root, True)
            if self.ood_dataset is not None:
                DATASETS[self.ood_dataset].prepare(self.ood_root, True)

    def setup(self, stage: str | None = None) -> None:
        """Load the data and build all splits (idempotent; the same for every stage)."""
        if self.train_dataset is not None:
            return
        size = None if self.image_size is None else (self.image_size, self.image_size)
        source = self.source

        def load(part: str) -> ImageArrays:
            return source.load(self.root, self.download, part, skip_corrupt=self.skip_corrupt, size=size)

        if self.eval_on == "all" or not source.has_test_split:
            base = load("all")
        else:
            base = load("train")
            n_official_train = len(base)
            base = base.concat(load("test"))
        n = len(base)
        labelled = base.labels is not None and self.source_num_classes is not None
        if base.labels is not None and self.source_num_classes is not None \
                and (base.labels.min(initial=0) < 0 or base.labels.max(initial=0) >= self.source_num_classes):
            raise ClusterlightError(f"dataset {self.dataset!r} has labels outside 0..{self.source_num_classes - 1}")
        if labelled:
            remap = np.full(self.source_num_classes, -1, dtype=np.int64)
            remap[self.id_classes] = np.arange(len(self.id_classes))
            y = remap[base.labels]
        else:
            y = np.full(n, -1, dtype=np.int64)

        # 1. pool and test positions into `base`
        if self.eval_on == "all":
            pool, test = np.arange(n), np.zeros(0, dtype=np.int64)
        elif source.has_test_split:
            pool, test = np.arange(n_official_train), np.arange(n_official_train, n)
        else:
            kept, held = stratified_holdout(base.labels if labelled else None, self.test_fraction,
                                            split_rng(self.seed, "test"), n=n)
            pool, test = kept, held
        # 2. held-out OOD classes
        pool_ood, test_ood = pool[:0], test[:0]
        if labelled:
            pool_ood, test_ood = pool[y[pool] < 0], test[y[test] < 0]
            pool, test = pool[y[pool] >= 0], test[y[test] >= 0]
        # 3. quick-run cap
        if self.max_samples is not None and len(pool) > self.max_samples:
            pool = pool[stratified_sample(y[pool] if labelled else None, self.max_samples,
                                          split_rng(self.seed, "max_samples"), n=len(pool))]
        # 4. long tail (class order from the seed only)
        k = self.num_classes or 0
        order = split_rng(self.seed, "class_order").permutation(k)
        long_tail = labelled and self.imbalance_ratio > 1
        if long_tail:
            counts = long_tail_counts(np.bincount(y[pool], minlength=k), self.imbalance_ratio,
                                      self.imbalance_profile, order)
            pool = pool[subsample_per_class(y[pool], counts, split_rng(self.seed, "long_tail"))]
        # 5. train / val
        kept, held = stratified_holdout(y[pool] if labelled else None, self.val_fraction,
                                        split_rng(self.seed, "val"), n=len(pool))
        train, val = pool[kept], pool[held]
        if len(train) == 0:
            raise ClusterlightError(f"dataset {self.dataset!r} leaves no training sample after the splits; lower "
                                    "val_fraction/test_fraction or raise max_samples")
        if self.num_clusters > len(train):
            raise ClusterlightError(f"num_clusters {self.num_clusters} exceeds the {len(train)} training samples of "
                                    f"dataset {self.dataset!r}; lower num_clusters or use more data")
        # 6. test split
        if self.eval_on == "all":
            test = np.concatenate([train, val])
        elif long_tail and self.imbalance_test:
            counts_test = long_tail_counts(np.bincount(y[test], minlength=k), self.imbalance_ratio,
                                           self.imbalance_profile, order)
            test = test[subsample_per_class(y[test], counts_test, split_rng(self.seed, "long_tail_test"))]

        # 7. OOD samples
        f = self.ood_fraction
        want_val, want_test = (round(f / (1 - f) * len(val)), round(f / (1 - f) * len(test)))
        ood_base: ImageArrays | None = None
        if self.ood_dataset is not None:
            ood_base = DATASETS[self.ood_dataset].load(self.ood_root, self.download, "all", size=self.input_shape[1:],
                                                       skip_corrupt=self.skip_corrupt)
            cand_val = cand_test = split_rng(self.seed, "ood").permutation(len(ood_base))
        elif self.ood_classes:
            cand_val = split_rng(self.seed, "ood").permutation(pool_ood)
            cand_test = cand_val if self.eval_on == "all" else split_rng(self.seed, "ood_test").permutation(test_ood)
        else:
            cand_val = cand_test = np.zeros(0, dtype=np.int64)
            want_val = want_test = 0
        if self.ood_dataset is not None and self.eval_on == "test":
            # one candidate list shared by val and test: give each a disjoint part
            n_val_ood = min(want_val, len(cand_val))
            n_test_ood = min(want_test, len(cand_val) - n_val_ood)
            if want_val + want_test > len(cand_val):  # not enough: share proportionally
                n_val_ood = round(len(cand_val) * want_val / (want_val + want_test))
                n_test_ood = len(cand_val) - n_val_ood
            ood_val, ood_test = cand_val[:n_val_ood], cand_val[n_val_ood:n_val_ood + n_test_ood]
        else:  # disjoint candidate lists, or eval_on "all" where test (a superset of val) reuses val's OOD
            ood_val, ood_test = cand_val[:want_val], cand_test[:want_test]
        if len(ood_val) < want_val or len(ood_test) < want_test:
            rank_zero_warn(f"ood_fraction {f:g} asks for {want_val} val / {want_test} test OOD samples but only "
                           f"{len(ood_val)} / {len(ood_test)} are available; using those")

        # 8. materialise
        channels, hw = self.input_shape[0], self.input_shape[1:]

        def part(arrays: ImageArrays, positions: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
            positions = np.asarray(positions, dtype=np.int64)
            return {"images": convert_images(arrays.images[positions], channels, hw),
                    "labels": np.full(len(positions), -1, dtype=np.int64) if labels is None else labels,
                    "ood": np.full(len(positions), labels is None),
                    "paths": None if arrays.paths is None else [arrays.paths[i] for i in positions.tolist()],
                    "source_index": positions,
                    "original_labels": np.full(len(positions), -1, dtype=np.int64) if arrays.labels is None
                    else arrays.labels[positions]}

        def dataset(*parts: dict[str, Any]) -> ClusteringDataset:
            paths = None
            if any(p["paths"] is not None for p in parts):
                paths = [x for p in parts for x in (p["paths"] or [None] * len(p["source_index"]))]
            images = parts[0]["images"] if len(parts) == 1 else torch.cat([p["images"] for p in parts])
            return ClusteringDataset(images,
                                     np.concatenate([p["labels"] for p in parts]),
                                     np.concatenate([p["ood"] for p in parts]), paths,
                                     np.concatenate([p["source_index"] for p in parts]),
                                     np.concatenate([p["original_labels"] for p in parts]), self.class_names)

        def cut(p: dict[str, Any], start: int, stop: int | None) -> dict[str, Any]:
            return {key: None if value is None else value[start:stop] for key, value in p.items()}

        ood_arrays = ood_base if ood_base is not None else base
        if self.eval_on == "all":
            # test = [train, val, OOD]; train's images are a view into test's (no second copy)
            train_val = np.concatenate([train, val])
            train_val_part = part(base, train_val, y[train_val])
            self.test_dataset = dataset(train_val_part, part(ood_arrays, ood_test, None))
            train_part = cut(train_val_part, 0, len(train))
            train_part["images"] = self.test_dataset.images[:len(train)]
            val_part = cut(train_val_part, len(train), None)
            val_part["images"] = self.test_dataset.images[len(train):len(train_val)]
        else:
            train_part, val_part = part(base, train, y[train]), part(base, val, y[val])
            self.test_dataset = dataset(part(base, test, y[test]), part(ood_arrays, ood_test, None))
        self.train_dataset = dataset(train_part)
        self.val_dataset = dataset(val_part, part(ood_arrays, ood_val, None))
        self.predict_dataset = self.test_dataset

        self.train_class_counts = np.bincount(y[train], minlength=k).astype(np.int64) if labelled \
            else np.zeros(0, dtype=np.int64)
        self._summarise(order if long_tail else None, y, train, val, test, base, ood_val, ood_test)

    def _summarise(self, order: np.ndarray | None, y: np.ndarray, train: np.ndarray, val: np.ndarray,
                   test: np.ndarray, base: ImageArrays, ood_val: np.ndarray, ood_test: np.ndarray) -> None:
        k = self.num_classes or 0
        labelled = k > 0

        def counts(positions: np.ndarray) -> list[int]:
            return np.bincount(y[positions], minlength=k).tolist() if labelled else []

        ood_source = None
        if self.ood_dataset is not None:
            ood_source = f"dataset {self.ood_dataset}"
        elif self.ood_classes:
            ood_source = f"classes {self.ood_classes}"
        self.split_summary = {
            "dataset": self.dataset,
            "seed": self.seed,
            "eval_on": self.eval_on,
            "imbalance_profile": self.imbalance_profile,
            "imbalance_ratio": self.imbalance_ratio,
            "class_order": None if order is None else order.tolist(),
            "num_classes": self.num_classes,
            "num_clusters": self.num_clusters,
            "input_shape": self.input_shape,
            "sizes": {"train": len(self.train_dataset), "val": len(self.val_dataset), "test": len(self.test_dataset)},
            "n_ood": {"train": 0, "val": len(ood_val), "test": len(ood_test)},
            "ood_source": ood_source,
            "train_class_counts": counts(train),
            "val_class_counts": counts(val),
            "test_class_counts": counts(test),
            "skipped_corrupt": len(base.skipped),
        }
        s = self.split_summary
        names = self.class_names or [str(i) for i in range(k)]
        per_class = ", ".join(f"{name}: {c}" for name, c in zip(names, s["train_class_counts"]))
        text = (f"Data {self.dataset} (split seed {self.seed}, eval_on {self.eval_on}): train {s['sizes']['train']}, "
                f"val {s['sizes']['val']} ({s['n_ood']['val']} OOD), test {s['sizes']['test']} "
                f"({s['n_ood']['test']} OOD), input shape {self.input_shape}, {self.num_clusters} clusters.")
        if ood_source:
            text += f" OOD samples from {ood_source}."
        if order is not None:
            text += (f" Long tail {self.imbalance_profile} ratio {self.imbalance_ratio:g}"
                     f"{' (test too)' if self.imbalance_test and self.eval_on == 'test' else ''}, "
                     f"head-to-tail class order {order.tolist()}.")
        if labelled:
            text += f" Train samples per class: {per_class}."
        if base.skipped:
            text += f" Skipped {len(base.skipped)} unreadable files."
            rank_zero_warn(f"skipped {len(base.skipped)} unreadable image files, e.g. {base.skipped[0]!r}")
        rank_zero_info(text)

    # ------------------------------------------------------------------ data loaders
    def _ensure_setup(self) -> None:
        if self.train_dataset is None:
            self.setup()

    def _world(self) -> tuple[int, int]:
        """``(world size, global rank)`` of the attached trainer (``(1, 0)`` without one)."""
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def _local_batch_size(self) -> int:
        """This process's share of the global ``batch_size`` (rounded up)."""
        return -(-self.batch_size // self._world()[0])

    def _loader(self, dataset: Dataset, shuffle: bool, batch_size: int | None = None,
                sampler: Sampler | None = None, loader_cls: type[DataLoader] = DataLoader, **extra: Any) -> DataLoader:
        return loader_cls(
            dataset,
            batch_size=batch_size or self._local_batch_size(),
            shuffle=shuffle if sampler is None else False,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            drop_last=False,
            persistent_workers=self.num_workers > 0,
            **extra,
        )

    def train_sampler(self) -> GlobalBatchSampler:
        """The training order: global batches of ``batch_size`` that do not depend on the process count."""
        self._ensure_setup()
        world, rank = self._world()
        sampler = GlobalBatchSampler(self.train_dataset, self.batch_size, world, rank, seed=run_seed(self.seed),
                                     drop_last=self.drop_last)
        if len(sampler) == 0:
            raise ClusterlightError(f"the training split has {len(self.train_dataset)} samples, fewer than batch_size "
                                    f"{self.batch_size} (the global batch size), and drop_last is true: lower "
                                    "batch_size or set drop_last: false")
        return sampler

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of the training split (see :class:`GlobalBatchSampler`); per process
        ``batch_size / W`` samples."""
        sampler = self.train_sampler()
        return self._loader(self.train_dataset, shuffle=False, batch_size=sampler.local_batch_size, sampler=sampler,
                            loader_cls=TrainLoader, progress=self._fit_progress)

    def _fit_progress(self) -> tuple[int, int]:
        """``(epoch, training batches finished in it)`` of the attached trainer's fit."""
        loop = self.trainer.fit_loop
        return int(loop.epoch_progress.current.processed), int(loop.epoch_loop.batch_progress.current.processed)

    def val_dataloader(self) -> DataLoader:
        """Batches of the validation split (in-distribution + OOD), in order."""
        self._ensure_setup()
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Batches of the test split, in order."""
        self._ensure_setup()
        return self._loader(self.test_dataset, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Batches of the test split, in order."""
        self._ensure_setup()
        return self._loader(self.predict_dataset, shuffle=False)

    def split_dataset(self, split: str) -> ClusteringDataset:
        """The dataset of ``split`` (``"train"``, ``"val"``, ``"test"`` or ``"predict"``)."""
        if split not in SPLIT_NAMES:
            raise ClusterlightError(f"split {split!r} is unknown; allowed: {', '.join(SPLIT_NAMES)}")
        self._ensure_setup()
        return getattr(self, f"{split}_dataset")

    def embedding_dataloader(self, split: str = "train", batch_size: int | None = None,
                             sampler: Sampler | None = None) -> DataLoader:
        """A non-shuffled loader over ``split`` for full-data steps (embedding, k-means).

        Args:
            split: ``"train"``, ``"val"``, ``"test"`` or ``"predict"``.
            batch_size: Batch size of this loader (default: this process's share of ``batch_size``).
            sampler: Optional sampler, e.g. a :class:`ShardedSequentialSampler` under DDP.
        """
        return self._loader(self.split_dataset(split), shuffle=False, batch_size=batch_size, sampler=sampler)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Nothing to save: the split is rebuilt from the hyperparameters and ``seed``."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore (see :meth:`state_dict`)."""
