"""Pixel-space neighbours of the training images: a label-free stand-in for augmented views.

Shared by the methods that pair each training image with one of its ``k`` nearest training
images in pixel space (:class:`~clusterlight.methods.OnlineHardClustering` and
:class:`~clusterlight.methods.DebiasedClustering`).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from clusterlight.cluster.agglomerative import knn_graph
from clusterlight.errors import ClusterlightError

__all__ = ["PixelNeighbours", "mutual_knn"]


def mutual_knn(table: Tensor, chunk_rows: int = 8192) -> tuple[Tensor, Tensor]:
    """Keep each row's *mutual* neighbours: ``j`` in row ``i`` stays only if ``i`` is in row ``j``.

    ``table`` is a ``(N, k)`` kNN table (each row nearest first). Returns ``(kept, count)``: each
    row's mutual neighbours first, in their original order, then the row's own index as filler;
    ``count[i]`` is the number of mutual neighbours of ``i`` (a row with none holds only itself).
    The edges are sorted once as ``i * N + j`` keys; the reverse edges of ``chunk_rows`` rows at a
    time are looked up by binary search, so the memory beyond the table and the result is one
    sorted copy of the keys (``N * k * 8`` bytes) and a chunk's work, for any ``k``.
    """
    n, k = table.shape
    rows = torch.arange(n, device=table.device).unsqueeze(1)
    sorted_keys = (rows * n + table).flatten().sort().values
    kept = torch.empty_like(table)
    count = torch.empty(n, dtype=torch.long, device=table.device)
    for start in range(0, n, chunk_rows):
        part, own = table[start:start + chunk_rows], rows[start:start + chunk_rows]
        back = part * n + own  # the edge j -> i for every i -> j of these rows
        pos = torch.searchsorted(sorted_keys, back.flatten()).clamp_max(len(sorted_keys) - 1).view_as(part)
        mutual = sorted_keys[pos] == back
        count[start:start + chunk_rows] = mutual.sum(1)
        # stable: mutual entries first in nearest-first order, the rest replaced by the row itself
        order = (~mutual).to(torch.int8).argsort(dim=1, stable=True)
        kept[start:start + chunk_rows] = torch.where(mutual.gather(1, order), part.gather(1, order), own)
    return kept, count


class PixelNeighbours:
    """Mixin for a :class:`~clusterlight.methods.base.ClusteringModule` (put it first in the bases).

    ``neighbours: k`` (``0``: off). When a fit starts, the ``k`` nearest neighbours of every
    training image in pixel space are computed on rank 0 (:func:`knn_graph`) and broadcast. The
    table is a non-persistent buffer: checkpoints do not carry it (it would take ``N * k * 8``
    bytes, 216 MB for Fashion-MNIST at ``k`` = 500) and a resumed fit computes the same table
    again. :meth:`_neighbour_images` draws one neighbour per image, by dataset index, with the
    batch's generator: the same draw for a sample whatever the number of processes.

    ``neighbour_space: embedding`` (for the methods that expose it): from the second epoch on,
    the table is recomputed at the start of every epoch as the ``k`` nearest neighbours in the
    current embedding (:meth:`embed` of the whole training split, gathered on every rank; the
    kNN on rank 0, broadcast). A fit resumed from an end-of-epoch checkpoint recomputes the same
    table from the same weights; one resumed mid-epoch uses the pixel table until the next epoch.

    ``mutual_neighbours: true`` keeps only *mutual* neighbours (:func:`mutual_knn`): ``j``
    is a neighbour of ``i`` only if ``i`` is also among the ``k`` nearest of ``j``. On long-tailed
    data the ``k`` nearest images of a tail-class image are mostly head-class images (there are
    more of them everywhere), while those head images have nearer ones of their own class: the
    plain table pairs tail images with head images and pulls them into head clusters, the mutual
    one keeps the pairs a density imbalance does not create. An image with no mutual neighbour
    is paired with itself (with ``augment``, an augmented copy of itself).
    """

    neighbours: int
    neighbour_space: str
    neighbour_index: Tensor
    neighbour_count: Tensor
    mutual_neighbours: bool

    def _init_neighbours(self, neighbours: int, space: str = "pixel", mutual: bool = False) -> None:
        if isinstance(neighbours, bool) or not isinstance(neighbours, int) or neighbours < 0:
            raise ClusterlightError(f"neighbours must be a non-negative integer, got {neighbours!r}")
        if space not in ("pixel", "embedding"):
            raise ClusterlightError(f"neighbour_space must be 'pixel' or 'embedding', got {space!r}")
        if not isinstance(mutual, bool):
            raise ClusterlightError(f"mutual_neighbours must be true or false, got {mutual!r}")
        if mutual and neighbours == 0:
            raise ClusterlightError("mutual_neighbours needs neighbours > 0")
        self.neighbours = neighbours
        self.neighbour_space = space
        self.mutual_neighbours = mutual
        self.register_buffer("neighbour_index", torch.zeros(0, neighbours, dtype=torch.long), persistent=False)
        # with mutual_neighbours: how many of each row's entries are mutual neighbours (at least 1)
        self.register_buffer("neighbour_count", torch.zeros(0, dtype=torch.long), persistent=False)

    def _set_neighbour_table(self, table: Tensor, what: str) -> None:
        """Store the broadcast table (every rank); with ``mutual_neighbours``, only the mutual ones."""
        table = table.long()
        if self.mutual_neighbours:
            table, count = mutual_knn(table)
            alone = int((count == 0).sum())
            self.neighbour_count = count.clamp_min(1)  # none: the row's first entry, the image itself
            rank_zero_info(f"{type(self).__name__}: {what}: {float(count.float().mean()):.1f} mutual of {self.neighbours} "
                           f"per image on average, {alone} of {len(table)} images without one (paired with themselves)")
        self.neighbour_index = table

    def check_data(self, datamodule: Any) -> None:
        super().check_data(datamodule)  # type: ignore[misc]
        n = len(datamodule.train_dataset)
        if self.neighbours and self.neighbours >= n:
            raise ClusterlightError(f"neighbours must be below the number of training images ({n}), got {self.neighbours}")

    def on_fit_start(self) -> None:
        super().on_fit_start()  # type: ignore[misc]
        if self.neighbours > 0:
            self._fit_neighbours()

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()  # type: ignore[misc]
        if self.neighbours > 0 and self.neighbour_space == "embedding" and self.current_epoch >= 1:
            self._fit_embedding_neighbours()

    @torch.no_grad()
    def _fit_embedding_neighbours(self) -> None:
        """The kNN table of the training split in the current embedding; every rank calls this."""
        z = self.compute_on_split(self.embed).float()  # every rank: the whole split, by dataset index
        table = knn_graph(z, self.neighbours)[0] if self.trainer.is_global_zero else None
        self._set_neighbour_table(self.broadcast_tensor(table), f"epoch {self.current_epoch}")
        rank_zero_info(f"{type(self).__name__}: epoch {self.current_epoch}, {self.neighbours} embedding-space "
                       f"neighbours of {len(z)} training images")

    def _fit_neighbours(self) -> None:
        """The pixel-space kNN table of the training split (rank 0, broadcast); every rank calls this."""
        dm = self._datamodule()
        self.check_data(dm)
        images = dm.train_dataset.images
        table = None
        if self.trainer.is_global_zero:
            table = knn_graph(images.flatten(1).float().div(255.0).to(self.device), self.neighbours)[0]
        self._set_neighbour_table(self.broadcast_tensor(table), "pixel space")
        rank_zero_info(f"{type(self).__name__}: {self.neighbours} pixel-space neighbours of {len(images)} training images")

    def _neighbour_images(self, index: Tensor, batch_idx: int, draw_id: int = 0) -> Tensor:
        """One of the ``k`` pixel-space neighbours of each sample (scaled to [0, 1]), drawn per
        dataset index (the same draw for a sample whatever the number of processes). ``draw_id``
        picks an independent draw of the same step (``0``: the first)."""
        table = self.neighbour_index
        purpose = "neighbour" if draw_id == 0 else f"neighbour{draw_id}"
        gen = self.batch_generator(batch_idx, purpose)
        if self.mutual_neighbours:  # uniform over each row's mutual neighbours (the first count[i] entries)
            u = torch.rand((table.shape[0],), generator=gen, device=self.device).to(table.device)
            draw = (u * self.neighbour_count).long().clamp_max(self.neighbour_count - 1)
        else:
            draw = torch.randint(self.neighbours, (table.shape[0],), generator=gen, device=self.device)
        rows = index.to(table.device)
        nbr = table[rows, draw[rows].to(table.device)]
        images = self._datamodule().train_dataset.images
        return images[nbr.cpu()].to(self.device).float().div_(255.0)
