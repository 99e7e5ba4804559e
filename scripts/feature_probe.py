"""Offline probe: k-means on a run's learned features, to tell a representation from its clustering.

A method's tail ACC mixes two things: how far apart its features hold the smallest classes, and
what its own clustering step makes of those features. This probe fixes the second: for each run
folder that ``clusterlight bench run --runs DIR`` left (``DIR/<budget>/<run name>``, any method),
the trained model embeds the training and test splits (``DebiasedClustering``: ``R``'s features;
the other methods: ``embed``), both standardised by the training features' mean and standard
deviation; clusterlight's k-means (``num_clusters`` centres, ``--n-init`` starts, ``--seed``)
partitions the training features and every test image goes to its nearest centre. Printed per run
as JSON, over the test split's in-distribution images:

* ``kmeans`` and ``model`` (the run's own clusters): ``[ACC, tail ACC, NMI]``;
* ``tail_recall``: for each tail class (fewest training images first, as ``tail_acc`` groups
  them), its matched recall under ``kmeans`` and under ``model``.

Labels are read here only by the metrics; no method reads this script.

    python scripts/feature_probe.py runs/recipe/fast/{debiased,ae_kmeans}-rerun1206-fashion_mnist-lt10_ood-seed0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from clusterlight.bench import load_run
from clusterlight.cluster.kmeans import kmeans
from clusterlight.metrics import (
    _groups,
    group_accuracy,
    matched_accuracy,
    normalized_mutual_info,
    per_class_recall,
)


def nearest_centre(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index of each row's nearest centre (Euclidean; the lower index on a tie)."""
    return torch.cdist(x.double(), centres.double()).argmin(1)


def scores(pred: np.ndarray, target: np.ndarray, counts: list[int], k: int) -> tuple[list[float], list[float]]:
    """``[ACC, tail ACC, NMI]`` and the tail classes' recalls (fewest training images first)."""
    p, t = torch.as_tensor(pred), torch.as_tensor(target)
    recall = per_class_recall(p, t, len(counts), k)
    tail = group_accuracy(recall, counts)["tail_acc"]
    summary = [round(matched_accuracy(p, t), 3), round(float(tail), 3), round(float(normalized_mutual_info(p, t)), 3)]
    return summary, [round(float(recall[c]), 3) for c in _groups(counts)[2]]


@torch.no_grad()
def features(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """The features the probe partitions and the model's own clusters, in batches of 1024."""
    encode = model.representation.encode if hasattr(model, "representation") else model.embed
    feats, own = [], []
    for i in range(0, len(images), 1024):
        x = images[i:i + 1024].float() / 255.0
        feats.append(encode(x).double())
        own.append(model.cluster_outputs(x).cluster)
    return torch.cat(feats), torch.cat(own).numpy()


def probe(run: Path, n_init: int, seed: int) -> dict:
    data, model = load_run(run)
    train, test = data.split_dataset("train"), data.split_dataset("test")
    counts, k = [int(c) for c in data.train_class_counts], model.num_clusters
    z_train, _ = features(model, train.images)
    if hasattr(model, "_fit_ood_statistics"):  # the flagship's bank of training features, as its test refits it
        model._fit_ood_statistics(z_train.float())
    z_test, own = features(model, test.images)
    mean, std = z_train.mean(0), z_train.std(0) + 1e-6
    centres = kmeans((z_train - mean) / std, k, n_init=n_init, seed=seed).centers
    pred = nearest_centre((z_test - mean) / std, centres).numpy()
    keep = ~test.ood.numpy()
    target = test.labels.numpy()[keep]
    km, km_tail = scores(pred[keep], target, counts, k)
    mine, mine_tail = scores(own[keep], target, counts, k)
    tail_classes = _groups(counts)[2].tolist()
    return {"run": run.name, "kmeans": km, "model": mine,
            "tail_recall": {str(c): [a, b] for c, a, b in zip(tail_classes, km_tail, mine_tail)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders left by clusterlight bench run --runs")
    parser.add_argument("--n-init", type=int, default=10, help="k-means starts")
    parser.add_argument("--seed", type=int, default=0, help="k-means seed")
    args = parser.parse_args()
    if args.n_init < 1:
        parser.error("--n-init must be at least 1")
    torch.set_num_threads(2)
    for run in args.runs:
        print(json.dumps(probe(run, args.n_init, args.seed)), flush=True)


if __name__ == "__main__":
    main()
