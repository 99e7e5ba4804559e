"""Offline probe: other spaces and test-time views for the flagship's k-NN OOD score.

Loads the checkpoints that ``clusterlight bench run`` left for ``DebiasedClustering`` runs and
ranks the test split's held-out samples by five scores, each the mean log distance to the
1st, 2nd and 4th nearest training sample (what ``ood_scaling: global`` with ``ood_neighbours:
[1, 2, 4]`` ranks by):

- ``model``: the run's own ``ood_score`` (its config's settings), as ``test/ood_auroc`` scores it;
- ``features``: in ``R``'s features;
- ``features_views``: the same, averaged over the image and ``--views`` affine copies of it;
- ``projection``: in the unit-length outputs of ``R``'s projection head (the space its
  NT-Xent loss trains);
- ``projection_views``: that, averaged over the image and the copies.

The copies are the same ``--views`` affine maps for every image (``clusterlight.nn.augment`` at
``--strength``, drawn once from a seeded generator). The training split (no OOD class in it) is
the bank. Labels are read only for the AUROC; no method reads this script.

    python scripts/ood_view_probe.py results/bench_fast_flagship.jsonl --dataset usps --split lt10_ood --seeds 0 1 2 3 4 \\
        --variants nolocal --override model.init_args.ood_local_weight=0
    python scripts/ood_view_probe.py results/bench_fast_flagship_ood_classes.jsonl --dataset usps \\
        --split lt10_ood --seeds 0 --variants ood0 ood1 ood2 ood3 ood4 ood5 ood6 ood7 ood8 \\
        --override model.init_args.ood_local_weight=0
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from clusterlight.cli import main
from clusterlight.nn.augment import affine_theta, warp

SCORES = ("model", "features", "features_views", "projection", "projection_views")


def log_knn_distance(bank: torch.Tensor, queries: torch.Tensor, ks: tuple[int, ...] = (1, 2, 4)) -> torch.Tensor:
    """Mean over ``ks`` of the log distance of each query to its ``k``-th nearest bank row."""
    out = []
    for start in range(0, len(queries), 1024):
        top = torch.cdist(queries[start:start + 1024], bank).topk(max(ks), largest=False).values
        out.append(torch.stack([top[:, k - 1].clamp_min(1e-6).log() for k in ks], 1).mean(1))
    return torch.cat(out)


def load_run(record: dict, overrides: list[str] = ()):
    args = [a for a in record["args"] if not a.startswith("--test_after_fit")] + [f"--{o}" for o in overrides]
    root = next(a.split("=", 1)[1] for a in args if a.startswith("--trainer.default_root_dir"))
    ckpts = sorted(glob.glob(f"{root}/runs/*/checkpoints/last.ckpt"))
    if not ckpts:
        raise SystemExit(f"no checkpoint under {root}: rerun its bench command first")
    cli = main(args, run=False)
    dm = cli.datamodule
    dm.setup("fit")
    dm.setup("test")
    model = cli.model
    model.load_state_dict(torch.load(ckpts[-1], map_location="cpu", weights_only=False)["state_dict"])
    if getattr(model, "ood_score_kind", None) == "knn" and model.ood_bank.shape[0] == 0:
        raise SystemExit(f"{ckpts[-1]}: its OOD bank was made with other OOD settings than the config's today "
                         "(its bank was dropped on loading): pass the run's settings with --override")
    return model.eval(), dm


@torch.no_grad()
def probe(record: dict, views: int, strength: float, overrides: list[str] = ()) -> dict[str, float]:
    model, dm = load_run(record, overrides)
    if model.projector is None:
        raise SystemExit("this run has no projection head (no neighbours, no augment)")
    train = torch.cat([b["image"] for b in dm.train_dataloader()])
    test, ood = zip(*[(b["image"], b["ood"]) for b in dm.test_dataloader()])
    test, y = torch.cat(test), torch.cat(ood).numpy().astype(int)

    def encode(x):
        return torch.cat([model.representation.encode(x[i:i + 1024]) for i in range(0, len(x), 1024)])

    def project(z):
        return F.normalize(model.projector(z), dim=1)

    u = torch.rand((views, 4), generator=torch.Generator().manual_seed(0))
    thetas = affine_theta(u, strength, tuple(test.shape[-2:]))
    z_train = encode(train)
    z_all = [encode(test)] + [encode(warp(test, thetas[j:j + 1].expand(len(test), 2, 3))) for j in range(views)]
    p_train = project(z_train)
    # per view (the image first, then its copies): the score in R's features and in the projections
    feat = torch.stack([log_knn_distance(z_train, z) for z in z_all])
    proj = torch.stack([log_knn_distance(p_train, project(z)) for z in z_all])
    scores = {
        "model": torch.cat([model._outputs(test[i:i + 512]).ood_score for i in range(0, len(test), 512)]),
        "features": feat[0],
        "features_views": feat.mean(0),
        "projection": proj[0],
        "projection_views": proj.mean(0),
    }
    return {name: float(roc_auc_score(y, s.numpy())) for name, s in scores.items()}


def run(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", help="a bench .jsonl file")
    p.add_argument("--dataset", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", nargs="+", default=[None], help="bench variants (default: the config's records)")
    p.add_argument("--views", type=int, default=8)
    p.add_argument("--strength", type=float, default=0.5)
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="config values the runs were made with, where the config differs today "
                        "(e.g. model.init_args.ood_local_weight=0 for the nolocal records)")
    a = p.parse_args(argv)
    records = [json.loads(line) for line in Path(a.results).read_text().splitlines() if line.strip()]
    rows = []
    print("| variant | seed | " + " | ".join(SCORES) + " |")
    print("| --- | --- |" + " --- |" * len(SCORES))
    for variant in a.variants:
        for seed in a.seeds:
            match = [r for r in records if r.get("method") == "debiased" and r.get("dataset") == a.dataset
                     and r.get("split") == a.split and r.get("seed") == seed and r.get("variant") == variant]
            if not match:
                raise SystemExit(f"no debiased record for {a.dataset} {a.split} seed {seed} variant {variant}")
            res = probe(match[-1], a.views, a.strength, a.override)
            rows.append([res[s] for s in SCORES])
            print(f"| {variant or '-'} | {seed} | " + " | ".join(f"{res[s]:.3f}" for s in SCORES) + " |", flush=True)
    mean = np.mean(rows, 0)
    print("| mean | | " + " | ".join(f"{m:.3f}" for m in mean) + " |")


if __name__ == "__main__":
    run()
