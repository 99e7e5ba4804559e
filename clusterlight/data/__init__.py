"""Data: image sources, split helpers and the Lightning data module."""

from clusterlight.data.datamodule import ClusteringDataModule, ClusteringDataset
from clusterlight.data.datasets import (
    DATASETS,
    ImageArrays,
    ImageSource,
    SourceInfo,
    register_dataset,
)
from clusterlight.data.splits import long_tail_counts

__all__ = [
    "DATASETS",
    "ClusteringDataModule",
    "ClusteringDataset",
    "ImageArrays",
    "ImageSource",
    "SourceInfo",
    "long_tail_counts",
    "register_dataset",
]
