"""Offline probe: the flagship's initial partition from one UMAP embedding against a vote of several.

For each run folder that ``clusterlight bench run --runs DIR`` left for a ``DebiasedClustering``
run (``DIR/<budget>/<run name>``, holding ``runs/*/config.yaml`` and
``runs/*/checkpoints/last.ckpt``), the trained ``R`` embeds the training split; UMAP embeds those
features (standardised, as :meth:`DebiasedClustering.init_clusters` does) with seeds
``0 .. --umap-runs - 1``, each embedding gets the full-covariance mixture partition the method
uses, and the partitions are combined by :func:`~clusterlight.cluster.consensus.consensus_responsibilities`.
Each partition reaches the test split by a ``--knn``-nearest-neighbour vote in ``R``'s
(standardised) features, a stand-in for ``C``, which the probe does not train. Printed per run,
as ``[ACC, tail ACC, NMI]`` of the test split's in-distribution samples: ``model`` (the run's
own clusters), ``umap<s>`` (the partition of seed ``s``'s embedding) and ``vote``. Labels are
read only by the metrics.

    clusterlight bench run --budget fast --methods debiased --datasets fashion_mnist --splits lt100 \\
        --seeds 0 1 2 3 4 --out /tmp/probe.jsonl --runs runs/probe
    python scripts/partition_probe.py runs/probe/fast/debiased-fashion_mnist-lt100-seed*
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.neighbors import KNeighborsClassifier

from clusterlight.bench import load_run
from clusterlight.cluster.consensus import consensus_responsibilities
from clusterlight.cluster.mixture import full_gmm
from clusterlight.cluster.umap_hdbscan import reduce_umap
from clusterlight.methods import DebiasedClustering
from clusterlight.metrics import (
    group_accuracy,
    matched_accuracy,
    normalized_mutual_info,
    per_class_recall,
)


@torch.no_grad()
def _features(model: DebiasedClustering, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``R``'s features and the model's own clusters, in batches of 1024."""
    feats, clusters = [], []
    for i in range(0, len(images), 1024):
        z = model.representation.encode(images[i:i + 1024].float() / 255.0)
        feats.append(z)
        clusters.append(model._posterior(model._cluster_space(z))[0].argmax(1))
    return torch.cat(feats).double().numpy(), torch.cat(clusters).numpy()


def _score(pred: np.ndarray, target: np.ndarray, counts: list[int], k: int) -> list[float]:
    p, t = torch.as_tensor(pred), torch.as_tensor(target)
    tail = group_accuracy(per_class_recall(p, t, len(counts), k), counts)["tail_acc"]
    return [round(matched_accuracy(p, t), 3), round(float(tail), 3), round(float(normalized_mutual_info(p, t)), 3)]


def probe(run: Path, umap_runs: int, knn: int) -> dict:
    data, model = load_run(run)
    train, test = data.split_dataset("train"), data.split_dataset("test")
    counts, k = [int(c) for c in data.train_class_counts], model.num_clusters
    z_train, _ = _features(model, train.images)
    z_test, own = _features(model, test.images)
    keep = ~test.ood.numpy()
    target = test.labels.numpy()[keep]
    mean, std = z_train.mean(0), z_train.std(0) + 1e-6
    x_train, x_test = (z_train - mean) / std, (z_test - mean) / std
    row = {"run": run.name, "model": _score(own[keep], target, counts, k)}
    parts = []
    for seed in range(umap_runs):
        u = reduce_umap(x_train.astype(np.float32), model.umap_neighbors, seed=seed,
                        n_components=model.manifold_target.shape[1])
        u = (u - u.mean(0)) / u.std(0)
        parts.append(full_gmm(torch.as_tensor(u), k, model.kmeans_n_init, model.kmeans_seed))

    def to_test(labels: np.ndarray) -> np.ndarray:
        return KNeighborsClassifier(knn).fit(x_train, labels).predict(x_test)[keep]

    for seed, resp in enumerate(parts):
        row[f"umap{seed}"] = _score(to_test(resp.argmax(1).numpy()), target, counts, k)
    vote, _ = consensus_responsibilities(torch.stack(parts))
    row["vote"] = _score(to_test(vote.argmax(1)), target, counts, k)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders left by clusterlight bench run --runs")
    parser.add_argument("--umap-runs", type=int, default=5)
    parser.add_argument("--knn", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(2)
    for run in args.runs:
        print(json.dumps(probe(run, args.umap_runs, args.knn)), flush=True)


if __name__ == "__main__":
    main()
