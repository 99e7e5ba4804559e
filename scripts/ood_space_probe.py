"""Offline probe: the flagship's k-NN OOD score with its bank in other feature spaces.

Loads the run folders that ``clusterlight bench run --runs`` left for ``DebiasedClustering`` runs
(each run's saved config and ``last.ckpt``) and scores the test split's held-out samples in several spaces of the same trained model. Each space
ranks by the mean log distance to the ``k``-th nearest training sample over the run's own
``ood_neighbours`` (fractions of the training split; ``ood_scaling: global``):

- ``model``: the run's own ``ood_score`` (its config's settings), as ``test/ood_auroc`` scores it;
- ``pixels``: the images themselves;
- ``stage1`` ... ``stageS``: each convolutional stage of R's encoder, averaged over positions;
- ``conv``: the last stage's whole feature map, flattened (what R's linear layer reads);
- ``latent``: R's features (the space the score uses);
- ``latent+conv``: the sum of the two scores, each standardised by the scores of 3,000 training
  samples (each without itself);
- ``reconstruction``: R's per-image reconstruction error.

The training split (no held-out class in it) is the bank. Labels are read only for the AUROC;
no method reads this script.

    python scripts/ood_space_probe.py runs/pscale/paper/debiased-scale_s15-fashion_mnist-lt10_ood-seed{0,1,2,3,4}
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from clusterlight.bench import load_run


def mean_log_kth(bank: torch.Tensor, queries: torch.Tensor, ks: list[int], skip_first: bool = False) -> torch.Tensor:
    """Mean over ``ks`` of the log distance of each query to its ``k``-th nearest bank row.

    ``skip_first``: the queries are bank rows, and their nearest row (themselves) is not counted.
    """
    extra = int(skip_first)
    out = []
    for start in range(0, len(queries), 1024):
        top = torch.cdist(queries[start:start + 1024].double(), bank.double()).topk(max(ks) + extra, largest=False).values
        out.append(torch.stack([top[:, k - 1 + extra].clamp_min(1e-12).log() for k in ks], 1).mean(1))
    return torch.cat(out)


@torch.no_grad()
def encoder_spaces(encoder: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """``pixels``, ``stage1``..``stageS`` (position means), ``conv`` (last stage flattened), ``latent``."""
    spaces: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(images), 1024):
        h = images[start:start + 1024]
        spaces.setdefault("pixels", []).append(h.flatten(1))
        stage = 0
        for layer in encoder.features:
            h = layer(h)
            if isinstance(layer, torch.nn.ReLU):
                stage += 1
                spaces.setdefault(f"stage{stage}", []).append(h.mean((2, 3)))
        spaces.setdefault("conv", []).append(h.flatten(1))
        spaces.setdefault("latent", []).append(encoder.fc(h.flatten(1)))
    return {name: torch.cat(parts) for name, parts in spaces.items()}


@torch.no_grad()
def probe(folder: str | Path, standardise_on: int = 3000) -> dict[str, float]:
    dm, model = load_run(folder)
    train = torch.cat([b["image"] for b in dm.embedding_dataloader("train")])  # the whole split, as the bank
    test, ood = zip(*[(b["image"], b["ood"]) for b in dm.test_dataloader()])
    test, y = torch.cat(test), torch.cat(ood).numpy().astype(int)
    ks = model._ks(len(train))
    encoder = model.representation.encoder
    bank, query = encoder_spaces(encoder, train), encoder_spaces(encoder, test)
    outputs = [model._outputs(test[i:i + 512]) for i in range(0, len(test), 512)]
    res = {"model": roc_auc_score(y, torch.cat([o.ood_score for o in outputs]).numpy())}
    recon = torch.cat([(model.representation(test[i:i + 1024])[1] - test[i:i + 1024]).pow(2).flatten(1).mean(1)
                       for i in range(0, len(test), 1024)])
    res["reconstruction"] = roc_auc_score(y, recon.numpy())
    rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:standardise_on]
    standardised = {}
    for name in bank:
        score = mean_log_kth(bank[name], query[name], ks)
        res[name] = roc_auc_score(y, score.numpy())
        if name in ("latent", "conv"):
            own = mean_log_kth(bank[name], bank[name][rows], ks, skip_first=True)
            standardised[name] = (score - own.mean()) / own.std()
    res["latent+conv"] = roc_auc_score(y, (standardised["latent"] + standardised["conv"]).numpy())
    return res


def run(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+", help="run folders of bench run --runs (<runs>/<budget>/<run name>)")
    a = p.parse_args(argv)
    table, header = [], None
    for folder in a.folders:
        res = probe(folder)
        if header is None:
            header = list(res)
            print("| run | " + " | ".join(header) + " |")
            print("| --- |" + " --- |" * len(header))
        table.append([res[s] for s in header])
        print(f"| {Path(folder).name} | " + " | ".join(f"{res[s]:.3f}" for s in header) + " |", flush=True)
    table = np.array(table)
    print("| mean | " + " | ".join(f"{m:.3f}" for m in table.mean(0)) + " |")
    print("| runs at 0.9 or above | " + " | ".join(str(int(c)) for c in (table >= 0.9).sum(0)) + " |")


if __name__ == "__main__":
    run()
