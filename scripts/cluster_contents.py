"""Offline probe: what each of a run's clusters holds on the test split, and which classes have none.

For each run folder that ``clusterlight bench run --runs DIR`` left (``DIR/<budget>/<run name>``,
any method), the trained model assigns the test split's in-distribution images (its own
clusters, ``cluster_outputs``); each cluster is printed with the class the metrics match it to
(the Hungarian matching of ``matched_accuracy``) and its two largest classes with their counts,
then the classes matched to no cluster. One line per run:

    seed 0 | sandal <- sandal 848 + sneaker 246 | pullover <- bag 371 + shirt 7 | ... | no cluster: dress

A cluster matched to a class it barely holds ("pullover <- bag 371") is the second half of a
class drawn as two clusters. Labels are read here only to describe the clusters; no method
reads this script.

    python scripts/cluster_contents.py runs/cut/fast/debiased-cut15_1206-fashion_mnist-lt10_ood-seed{0,1,2}
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from clusterlight.bench import load_run
from clusterlight.metrics import contingency, match_clusters


def contents(pred: np.ndarray, target: np.ndarray, num_clusters: int, names: list[str]) -> tuple[list[str], list[str]]:
    """Per cluster ``"<matched class> <- <class> <n> + <class> <n>"`` (its two largest classes;
    ``"-"`` when unmatched, one class when it holds one), and the classes present in ``target``
    that no cluster is matched to."""
    counts = contingency(torch.as_tensor(pred), torch.as_tensor(target), num_clusters, len(names)).numpy()
    mapping = match_clusters(torch.as_tensor(pred), torch.as_tensor(target), num_clusters, len(names)).tolist()
    lines = []
    for k in range(num_clusters):
        top = [c for c in np.argsort(-counts[k], kind="stable")[:2] if counts[k, c] > 0]
        held = " + ".join(f"{names[c]} {counts[k, c]}" for c in top) or "empty"
        lines.append(f"{names[mapping[k]] if mapping[k] >= 0 else '-'} <- {held}")
    present = sorted(set(np.asarray(target).tolist()))
    return lines, [names[c] for c in present if c not in mapping]


@torch.no_grad()
def probe(run: Path) -> str:
    data, model = load_run(run)
    test = data.split_dataset("test")
    keep = ~test.ood.numpy()
    own = torch.cat([model.cluster_outputs(test.images[i:i + 1024].float() / 255.0).cluster
                     for i in range(0, len(test.images), 1024)]).numpy()
    names = list(data.class_names or [str(c) for c in range(data.num_classes)])  # the in-distribution classes
    lines, lost = contents(own[keep], test.labels.numpy()[keep], model.num_clusters, names)
    return " | ".join([run.name, *lines, f"no cluster: {', '.join(lost) or 'none'}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders left by clusterlight bench run --runs")
    args = parser.parse_args()
    torch.set_num_threads(2)
    for run in args.runs:
        print(probe(run), flush=True)


if __name__ == "__main__":
    main()
