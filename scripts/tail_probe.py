"""Where the smallest classes go: a diagnostic of the flagship's runs on long-tailed splits.

Per run it prints the sizes of C's training clusters (``cluster_sizes``: C's assignments, the
clusters the k-NN bank holds) and, for each class from the fewest training images up:

* ``n``: the class's training images;
* ``train_top``: the share of those images in the cluster that takes most of them, ``cluster``
  that cluster and ``cluster_largest_class`` its largest class (another class's when the class
  is hidden in it);
* ``recall``: the class's test recall after the one-to-one matching of clusters to classes
  (the model's own assignments, ``assign_neighbours`` included);
* ``R`` and ``C``: the mean share of a test image's ``--k`` nearest training images that are of
  its class, in R's features and in C's embedding (the space C's partition is made in).

Labels are read here to measure and nowhere else; no method reads this script.

    python scripts/tail_probe.py runs/vote/paper/debiased-usps-lt100-seed0 --classes 4

Each argument is a run folder left by ``clusterlight bench run --runs`` (its ``runs/*/config.yaml``
and ``runs/*/checkpoints/last.ckpt``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from clusterlight.bench import load_run
from clusterlight.methods import DebiasedClustering


def cross_purity(train: torch.Tensor, train_labels: np.ndarray, test: torch.Tensor, test_labels: np.ndarray,
                 k: int) -> np.ndarray:
    """For each test row, the share of its ``k`` nearest training rows (Euclidean) with its label."""
    out = []
    for i in range(0, len(test), 1024):
        nn = torch.cdist(test[i:i + 1024].double(), train.double()).topk(k, largest=False).indices.numpy()
        out.append((train_labels[nn] == test_labels[i:i + 1024, None]).mean(1))
    return np.concatenate(out)


def routes(train_clusters: np.ndarray, train_labels: np.ndarray, test_clusters: np.ndarray,
           test_labels: np.ndarray, num_clusters: int, num_classes: int) -> list[dict]:
    """Per class: its training images' main cluster, that cluster's largest class, and its matched test recall.

    The matching is the one-to-one assignment of clusters to classes that maximises the test
    samples on the diagonal (as the matched accuracy's); a class left without a cluster (more
    classes than clusters) has recall 0. A test cluster of -1 (left unassigned) counts as a miss.
    """
    train_counts = np.zeros((num_clusters, num_classes), dtype=np.int64)
    np.add.at(train_counts, (train_clusters, train_labels), 1)
    test_counts = np.zeros((num_clusters, num_classes), dtype=np.int64)
    assigned = test_clusters >= 0
    np.add.at(test_counts, (test_clusters[assigned], test_labels[assigned]), 1)
    rows, cols = linear_sum_assignment(-test_counts)
    matched = dict(zip(cols.tolist(), rows.tolist()))
    out = []
    for y in range(num_classes):
        n = int(train_counts[:, y].sum())
        top = int(train_counts[:, y].argmax())
        n_test = int((test_labels == y).sum())
        recall = test_counts[matched[y], y] / n_test if y in matched and n_test else 0.0
        out.append({"class": y, "n": n, "train_top": round(train_counts[top, y] / max(n, 1), 3),
                    "cluster": top, "cluster_largest_class": int(train_counts[top].argmax()),
                    "recall": round(float(recall), 3)})
    return out


@torch.no_grad()
def _encode(model: DebiasedClustering, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """R's features, C's embedding and C's clusters (as the k-NN bank holds them), in batches of 1024."""
    parts = [], [], []
    for i in range(0, len(images), 1024):
        z = model.representation.encode(images[i:i + 1024].float() / 255.0)
        z_c = model._cluster_space(z)
        parts[0].append(z)
        parts[1].append(z_c)
        parts[2].append(model._posterior(z_c)[0].argmax(1))
    return torch.cat(parts[0]), torch.cat(parts[1]), torch.cat(parts[2]).numpy()


@torch.no_grad()
def _assign(model: DebiasedClustering, images: torch.Tensor) -> np.ndarray:
    """The model's own clusters (``assign_neighbours`` included), in batches of 1024."""
    return torch.cat([model.cluster_outputs(images[i:i + 1024].float() / 255.0).cluster
                      for i in range(0, len(images), 1024)]).numpy()


def probe(run: Path, k: int, classes: int) -> dict:
    data, model = load_run(run)
    if not isinstance(model, DebiasedClustering):
        raise SystemExit(f"tail_probe: {run} is a {type(model).__name__} run, not a DebiasedClustering one")
    train, test = data.split_dataset("train"), data.split_dataset("test")
    r_train, c_train, k_train = _encode(model, train.images)
    with torch.no_grad():
        model._fit_ood_statistics(r_train)  # the bank of C's training assignments, as test does
    r_test, c_test, _ = _encode(model, test.images)
    k_test = _assign(model, test.images)
    keep = ~test.ood.numpy()
    y_train, y_test = train.labels.numpy(), test.labels.numpy()[keep]
    num_classes = len(data.train_class_counts)
    table = routes(k_train, y_train, k_test[keep], y_test, model.num_clusters, num_classes)
    pure_r = cross_purity(r_train, y_train, r_test[keep], y_test, k)
    pure_c = cross_purity(c_train, y_train, c_test[keep], y_test, k)
    for row in table:
        row["R"] = round(float(pure_r[y_test == row["class"]].mean()), 3)
        row["C"] = round(float(pure_c[y_test == row["class"]].mean()), 3)
    table.sort(key=lambda row: row["n"])
    return {"run": run.name, "cluster_sizes": np.bincount(k_train, minlength=model.num_clusters).tolist(),
            "classes": table[:classes]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders left by clusterlight bench run --runs")
    parser.add_argument("--k", type=int, default=5, help="nearest training images per test image")
    parser.add_argument("--classes", type=int, default=4, help="how many of the smallest classes to print")
    args = parser.parse_args()
    if args.k < 1 or args.classes < 1:
        parser.error("--k and --classes must be at least 1")
    torch.set_num_threads(2)
    for run in args.runs:
        print(json.dumps(probe(run, args.k, args.classes)), flush=True)


if __name__ == "__main__":
    main()
