"""Clustering methods, each one LightningModule over :class:`ClusteringModule`."""

from clusterlight.methods.ae_kmeans import AEKMeans
from clusterlight.methods.base import ClusteringModule, ClusterOutput
from clusterlight.methods.debiased import DebiasedClustering
from clusterlight.methods.dec import DEC
from clusterlight.methods.jule import JULE
from clusterlight.methods.online_hard import OnlineHardClustering
from clusterlight.methods.spc import SPC

__all__ = ["AEKMeans", "DEC", "DebiasedClustering", "JULE", "ClusterOutput", "ClusteringModule", "OnlineHardClustering", "SPC"]
