"""How often an image's k nearest training images share its class, in a few feature spaces.

A diagnostic for the neighbour pairs of online hard clustering and of the flagship (each image
is paired with one of its ``k`` nearest neighbours): the pairs can only be as right as this
fraction. Labels are read here to measure it and nowhere else; no method reads this script.

    python scripts/knn_purity.py --dataset fashion_mnist --root /usr/share/datasets/fashion-mnist \
        --n 63000 --ks 10 50 200 500

The images are the data set's ``all`` split (clusterlight's loader); ``--n`` of them are drawn
(seeded), every ``--stride``-th of those is a query, and each query's neighbours are searched
among all ``--n`` (itself excluded). Spaces: raw pixels in [0, 1], the first 50 principal
components, pixels scaled to unit length (cosine), and each image standardised on its own.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from clusterlight.data.datasets import DATASETS


def neighbour_purity(x: torch.Tensor, y: torch.Tensor, ks: list[int], queries: torch.Tensor) -> dict[int, float]:
    """Mean fraction of the ``k`` nearest neighbours (squared Euclidean, self excluded) of each
    query row that share its label, for each ``k`` of ``ks``."""
    x = x.double()
    sq = (x * x).sum(1)
    out: dict[int, list[float]] = {k: [] for k in ks}
    for start in range(0, len(queries), 1024):
        q = queries[start:start + 1024]
        d = sq[q, None] - 2 * x[q] @ x.T + sq[None]
        d[torch.arange(len(q)), q] = float("inf")
        nn = d.topk(max(ks), largest=False).indices
        for k in ks:
            out[k].append((y[nn[:, :k]] == y[q, None]).double().sum().item())
    return {k: sum(v) / (len(queries) * k) for k, v in out.items()}


def main(argv: list[str] | None = None) -> dict[str, dict[int, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion_mnist", choices=sorted(DATASETS))
    parser.add_argument("--root", default="/usr/share/datasets/fashion-mnist", help="the data set's root")
    parser.add_argument("--n", type=int, default=63000, help="images drawn (seeded) from the whole data set")
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 50, 200, 500])
    parser.add_argument("--stride", type=int, default=10, help="every stride-th image is a query")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    data = DATASETS[args.dataset].load(args.root, split="all")
    x, y = data.images.reshape(len(data.images), -1).astype(np.float32) / 255.0, data.labels
    keep = np.random.default_rng(args.seed).permutation(len(y))[: args.n]
    pixels, labels = torch.from_numpy(x[keep]), torch.from_numpy(y[keep].astype(np.int64))
    queries = torch.arange(0, len(labels), args.stride)
    centred = pixels - pixels.mean(0)
    _, _, v = torch.pca_lowrank(centred, q=50, center=False)
    spaces = {
        "pixels": pixels,
        "pca50": centred @ v,
        "cosine": pixels / pixels.norm(dim=1, keepdim=True).clamp_min(1e-12),
        "per-image standardised": (pixels - pixels.mean(1, keepdim=True)) / pixels.std(1, keepdim=True).clamp_min(1e-12),
    }
    results = {}
    for name, feats in spaces.items():
        results[name] = neighbour_purity(feats, labels, args.ks, queries)
        print(name, " ".join(f"k={k}: {p:.3f}" for k, p in results[name].items()), flush=True)
    return results


if __name__ == "__main__":
    main()
