"""Same-class share of plain and of mutual pixel-space neighbour pairs, per class of a training split.

A diagnostic for ``mutual_neighbours`` (the neighbour pairs of the flagship and of online hard
clustering): on a training split (long-tailed or not), how often an image's plain ``k`` nearest
training images share its class, against the mutual ones only
(``clusterlight.methods.neighbours.mutual_knn``), and how many images keep no mutual neighbour.
Labels are read here to measure it and nowhere else; no method reads this script.

    python scripts/mutual_purity.py --config configs/debiased/fashion_mnist.yaml --k 10 -- \\
        --data.init_args.imbalance_ratio=10 "--data.init_args.ood_classes=[9]" \\
        --data.init_args.ood_fraction=0.2 --data.init_args.max_samples=10000

The arguments after ``--`` are data options as ``clusterlight fit`` takes them (the bench's
``lt10_ood`` split and ``fast`` cap above); the training split is the one a fit would use.
"""

from __future__ import annotations

import argparse

import torch

from clusterlight.cluster.agglomerative import knn_graph
from clusterlight.methods.neighbours import mutual_knn


def pair_purity(table: torch.Tensor, count: torch.Tensor | None, y: torch.Tensor) -> dict[int, float]:
    """Per class: the share of the pairs (row ``i``, entry ``j``) with ``y[j] == y[i]``.

    ``count`` (mutual tables): only each row's first ``count[i]`` entries are pairs (``None``:
    every entry). A class with no pair is left out.
    """
    k = table.shape[1]
    valid = torch.ones_like(table, dtype=torch.bool) if count is None else torch.arange(k)[None, :] < count[:, None]
    same = (y[table] == y[:, None]) & valid
    out = {}
    for c in y.unique().tolist():
        rows = y == c
        n = int(valid[rows].sum())
        if n:
            out[c] = float(same[rows].sum()) / n
    return out


def main(argv: list[str] | None = None) -> dict[str, dict[int, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a clusterlight config (its data section is used)")
    parser.add_argument("--k", type=int, default=10, help="neighbours per image")
    parser.add_argument("data_args", nargs="*", help="data options after --, as clusterlight fit takes them")
    a = parser.parse_args(argv)
    from clusterlight.cli import main as cli_main

    cli = cli_main(["--config", a.config, *a.data_args, "--trainer.logger=false"], run=False)
    dm = cli.datamodule
    dm.setup("fit")
    images = dm.train_dataset.images.flatten(1).float() / 255.0
    y = torch.as_tensor(dm.train_dataset.labels).long()
    table = knn_graph(images, a.k)[0]
    kept, count = mutual_knn(table)
    plain, mutual = pair_purity(table, None, y), pair_purity(kept, count, y)
    print(f"class  images  plain  mutual  mutual per image  without one   (k = {a.k})")
    for c in sorted(plain, key=lambda c: -int((y == c).sum())):
        rows = y == c
        print(f"{c:5d}  {int(rows.sum()):6d}  {plain[c]:.3f}  {mutual.get(c, float('nan')):.3f}  "
              f"{float(count[rows].float().mean()):16.2f}  {float((count[rows] == 0).float().mean()):11.2f}")
    return {"plain": plain, "mutual": mutual}


if __name__ == "__main__":
    main()
