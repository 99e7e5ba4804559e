"""Offline probe: the flagship's initial partition of the training split, before and after ``refine_cut``.

For one cell of the benchmark grid (``DebiasedClustering``'s config for ``--dataset``, the
``--split``'s data options, the ``--budget``'s options and any ``--override``, as ``clusterlight
bench run`` composes them), each seed's fit runs only until the initial partition is made (R
pretrained, UMAP, the mixture, ``refine_cut``'s moves when the config sets them) and the
networks' statistics are set from it, and is stopped there, before any co-training epoch. What each cluster of that partition holds is printed by class, before the moves
(``initial``) and after them (``moved``; the same partition when no move was made):

    seed 0 initial | 2+ clusters: T-shirt/top, Bag | majority in none: Dress, Coat, Shirt | 545: Bag 530 + Sandal 9 | ...

"2+ clusters" names the classes that are the largest class of two clusters or more, "majority in
none" the classes that are the largest class of no cluster; then each cluster's size and its two
largest classes. The training labels are read here only to describe the partition; no method
reads this script. ``--save DIR`` also writes each seed's R features, responsibilities (before
and after the moves), labels and, when the config sets ``refine_cut``, the space the moves split
in (the first UMAP embedding with ``umap_runs > 1``) to ``DIR/<split>-seed<s>.pt``, for offline
work on the moves. The ``fast`` budget has options for USPS, COIL-20 and Fashion-MNIST only;
other datasets take ``--budget paper`` (their configs' schedules) with ``--override``s.

    python scripts/initial_partition.py --dataset fashion_mnist --split lt10_ood --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from clusterlight import cli as C
from clusterlight.bench import FAST, NUM_CLASSES, SPLITS, run_args
from clusterlight.methods import debiased as D


class _Stop(Exception):
    """Raised once the initial partition is made: the fit ends there."""


def summary(pred: np.ndarray, target: np.ndarray, num_clusters: int, names: list[str]) -> tuple[list[str], list[str], list[str]]:
    """What a partition holds: per non-empty cluster ``"<size>: <class> <n> + <class> <n>"`` (its
    two largest classes, largest first, ties by class index), sorted by size, largest first; the
    classes that are the largest class of two clusters or more; and the classes present in
    ``target`` that are the largest class of none."""
    pred, target = np.asarray(pred), np.asarray(target)
    lines, majority = [], []
    for k in range(num_clusters):
        members = target[pred == k]
        if members.size == 0:
            continue
        counts = np.bincount(members, minlength=len(names))
        top = [c for c in np.argsort(-counts, kind="stable")[:2] if counts[c] > 0]
        majority.append(int(top[0]))
        lines.append((members.size, f"{members.size}: " + " + ".join(f"{names[c]} {counts[c]}" for c in top)))
    lines.sort(key=lambda item: -item[0])
    seen = np.bincount(np.asarray(majority, dtype=int), minlength=len(names))
    present = sorted(set(target.tolist()))
    return ([text for _, text in lines], [names[c] for c in present if seen[c] >= 2],
            [names[c] for c in present if seen[c] == 0])


def describe(seed: int, stage: str, pred: np.ndarray, target: np.ndarray, num_clusters: int, names: list[str]) -> str:
    lines, twice, none = summary(pred, target, num_clusters, names)
    return " | ".join([f"seed {seed} {stage}", f"2+ clusters: {', '.join(twice) or 'none'}",
                       f"majority in none: {', '.join(none) or 'none'}", *lines])


def initial_partition(dataset: str, split: str, seed: int, budget: str, overrides: list[str]) -> dict:
    """Run the fit of one seed until the initial partition is made; return it with the training labels."""
    got: dict = {}
    original_init, original_refine = D.DebiasedClustering.init_clusters, D.DebiasedClustering._refine_by_cut

    def refine(self, z_r, space, resp):
        got["initial"], got["space"] = resp.detach().cpu(), space.detach().cpu()
        return original_refine(self, z_r, space, resp)

    def init_clusters(self, monitor_only: bool = False) -> None:
        if monitor_only:
            return original_init(self, monitor_only)
        original_reset = self.spb_r.reset_from

        def reset_from(z, resp):  # the partition every rank holds after init_clusters' broadcast
            got["moved"], got["z_r"] = resp.detach().cpu(), z.detach().cpu()
            return original_reset(z, resp)

        self.spb_r.reset_from = reset_from
        try:
            original_init(self, monitor_only)
        finally:
            del self.spb_r.reset_from
        dm = self._datamodule()
        got["labels"] = dm.split_dataset("train").labels.cpu()
        got["names"] = list(dm.class_names or [str(c) for c in range(dm.num_classes)])
        raise _Stop

    D.DebiasedClustering.init_clusters, D.DebiasedClustering._refine_by_cut = init_clusters, refine
    try:
        with tempfile.TemporaryDirectory() as root:
            args = run_args("debiased", dataset, split, seed, budget, Path(root), overrides)
            try:
                C.main(args)
            except _Stop:
                pass
    finally:
        D.DebiasedClustering.init_clusters, D.DebiasedClustering._refine_by_cut = original_init, original_refine
    if "moved" not in got:
        raise SystemExit(f"error: the fit of seed {seed} ended before the initial partition was made")
    got.setdefault("initial", got["moved"])
    return got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True, help="a dataset with a configs/debiased/<dataset>.yaml")
    parser.add_argument("--split", required=True, choices=sorted(SPLITS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds, one fit each")
    parser.add_argument("--budget", choices=["fast", "paper"], default="fast",
                        help="the budget's options, as for bench run (fast: usps, coil20, fashion_mnist)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="an option after the budget's, as for bench run (repeatable)")
    parser.add_argument("--save", type=Path, metavar="DIR", help="write each seed's tensors to DIR/<split>-seed<s>.pt")
    args = parser.parse_args()
    if not (Path(__file__).resolve().parents[1] / "configs" / "debiased" / f"{args.dataset}.yaml").is_file():
        raise SystemExit(f"error: no config configs/debiased/{args.dataset}.yaml")
    if args.budget == "fast" and args.dataset not in FAST["debiased"]:
        raise SystemExit(f"error: the fast budget has no options for {args.dataset} "
                         f"(it has {', '.join(sorted(FAST['debiased']))}); use --budget paper")
    if args.dataset not in NUM_CLASSES:
        raise SystemExit(f"error: bench's splits do not know {args.dataset} (they know {', '.join(sorted(NUM_CLASSES))})")
    os.environ.setdefault("WANDB_MODE", "disabled")
    for seed in args.seeds:
        got = initial_partition(args.dataset, args.split, seed, args.budget, args.override)
        target, k = got["labels"].numpy(), got["moved"].shape[1]
        for stage in ("initial", "moved"):
            print(describe(seed, stage, got[stage].argmax(1).numpy(), target, k, got["names"]), flush=True)
        if args.save is not None:
            args.save.mkdir(parents=True, exist_ok=True)
            torch.save({key: got[key] for key in ("z_r", "initial", "moved", "labels", "names") if key in got}
                       | ({"space": got["space"]} if "space" in got else {}), args.save / f"{args.split}-seed{seed}.pt")


if __name__ == "__main__":
    main()
