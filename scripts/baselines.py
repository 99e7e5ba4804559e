"""Evidence for the baselines: each config's test metrics, wall time and peak memory, beside
k-means (scikit-learn) on the raw pixels of the same split.

    python scripts/baselines.py --out results/baselines.jsonl [--only usps]

Each run is a separate process (``python -m clusterlight fit --test_after_fit true``) so peak
memory is the run's own. Records are appended as JSON lines; runs already recorded are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RUNS = [
    # (name, config, extra args)
    ("digits", "digits", []),
    ("usps", "usps", []),
    ("coil20", "coil20", []),
    ("usps_lt10", "usps", ["--data.init_args.imbalance_ratio=10"]),
]
METHODS = ["ae_kmeans", "dec"]

CHILD = r"""
import json, resource, sys, time
from clusterlight.cli import main
t0 = time.time()
cli = main(sys.argv[2:])
wall = time.time() - t0
m = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}
dm = cli.datamodule
m.update(wall_s=wall, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
         eval_on=dm.eval_on, n_train=len(dm.train_dataset), n_test=len(dm.test_dataset))
json.dump(m, open(sys.argv[1], "w"))
"""


def raw_kmeans(extra: list[str], config: str) -> dict:
    """k-means (scikit-learn, n_init=10) fit on the training split's raw pixels, evaluated on its test split."""
    import numpy as np
    from sklearn.cluster import KMeans

    from clusterlight.cli import main
    from clusterlight.metrics import adjusted_rand_index, matched_accuracy, normalized_mutual_info

    cli = main(["--config", str(REPO / config), *extra, "--trainer.logger=false"], run=False)
    dm = cli.datamodule
    dm.setup("fit")
    t0 = time.time()
    xtr = dm.train_dataset.images.reshape(len(dm.train_dataset), -1).float().numpy() / 255
    xte = dm.test_dataset.images.reshape(len(dm.test_dataset), -1).float().numpy() / 255
    km = KMeans(dm.num_clusters, n_init=10, random_state=0).fit(xtr)
    pred = km.predict(xte)
    y = dm.test_dataset.labels.numpy()
    keep = ~dm.test_dataset.ood.numpy()
    pred, y = pred[keep], y[keep]
    return {"test/acc": matched_accuracy(pred, y), "test/nmi": normalized_mutual_info(pred, y),
            "test/ari": adjusted_rand_index(pred, y), "wall_s": time.time() - t0, "eval_on": dm.eval_on,
            "n_train": int(len(xtr)), "n_test": int(keep.sum())}


def report(path: Path) -> str:
    """The records as a Markdown table (one row per method and split)."""
    rows = ["| split | method | ACC | NMI | ARI | tail ACC | wall s | peak RSS MB | train / test samples |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in map(json.loads, path.read_text().splitlines()):
        tail = r.get("test/tail_acc")
        rss = r.get("peak_rss_mb")
        rows.append(f"| {r['split']} | {r['method']} | {r['test/acc']:.3f} | {r['test/nmi']:.3f} | {r['test/ari']:.3f} | "
                    f"{'' if tail is None else f'{tail:.3f}'} | {r['wall_s']:.0f} | {'' if rss is None else f'{rss:.0f}'} | "
                    f"{r['n_train']} / {r['n_test']} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/baselines.jsonl")
    parser.add_argument("--report", action="store_true", help="print the records as a Markdown table and exit")
    parser.add_argument("--only", nargs="*", default=None, help="names of RUNS to do")
    parser.add_argument("--methods", nargs="*", default=METHODS + ["raw_kmeans"])
    args = parser.parse_args()
    out = Path(args.out)
    if args.report:
        print(report(out))
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        done = {(r["method"], r["split"]) for r in map(json.loads, out.read_text().splitlines())}
    for name, dataset, extra in RUNS:
        if args.only and name not in args.only:
            continue
        for method in args.methods:
            if (method, name) in done:
                continue
            config = f"configs/{'ae_kmeans' if method == 'raw_kmeans' else method}/{dataset}.yaml"
            if method == "raw_kmeans":
                metrics = raw_kmeans(extra, config)
            else:
                tmp = out.parent / f".{method}-{name}.json"
                cmd = [sys.executable, "-c", CHILD, str(tmp), "fit", "--config", str(REPO / config), *extra,
                       "--config", str(REPO / "configs/logging/csv.yaml"), "--test_after_fit=true",
                       "--trainer.enable_progress_bar=false", "--figures.enabled=false"]
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"})
                if proc.returncode != 0:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"{method} on {name} failed")
                metrics = json.loads(tmp.read_text())
                tmp.unlink()
            record = {"method": method, "split": name, "config": config, "extra": extra, **metrics}
            with out.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            print(f"{method:>10} {name:<10} acc {record['test/acc']:.3f} nmi {record['test/nmi']:.3f} "
                  f"ari {record['test/ari']:.3f}  {record['wall_s']:.0f}s", flush=True)


if __name__ == "__main__":
    main()
