"""Clustering methods, each one LightningModule over :class:`ClusteringModule`."""

from clusterlight.methods.ae_kmeans import AEKMeans
from clusterlight.methods.base import ClusteringModule, ClusterOutput
from clusterlight.methods.debiased import DebiasedClustering
from clusterlight.methods.dec import DEC

__all__ = ["AEKMeans", "DEC", "DebiasedClustering", "ClusterOutput", "ClusteringModule"]
