"""Time and memory of JULE's agglomerative clustering (clusterlight.cluster.agglomerative).

Synthetic Gaussian-mixture features (10 components, 32 dimensions by default) are clustered
from the 1-NN initial clusters down to 10 clusters. Each size runs in its own process so the
peak memory is that run's own; reported:

* ``knn_s``: building the kNN graph (K_s neighbours, chunked matmul),
* ``agg_s``: initial clusters + all merges down to the target,
* ``peak_rss_mb``: the process's peak resident memory (``ru_maxrss``), and ``rss_over_base_mb``:
  that peak minus the resident memory after the data was created (what the clustering added),
* ``nmi``: NMI against the mixture components (a sanity check, not a benchmark).

    python scripts/bench_agglomeration.py --sizes 10000 70000 [--threads 1] [--out bench.jsonl]

Not a test: it takes tens of seconds per size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
import torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
from sklearn.metrics import normalized_mutual_info_score
from clusterlight.cluster.agglomerative import Agglomeration, build_graph, forward_step_merges

def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")

gen = torch.Generator().manual_seed(args["seed"])
n, d, comps = args["n"], args["dim"], args["components"]
centres = torch.randn(comps, d, generator=gen) * args["spread"]
truth = torch.randint(comps, (n,), generator=gen)
x = centres[truth] + torch.randn(n, d, generator=gen)
base = rss_mb()
t0 = time.perf_counter()
graph = build_graph(x, args["k_s"])
t1 = time.perf_counter()
state = Agglomeration(graph, None, k_c=args["k_c"], round_fraction=args["round_fraction"])
n_init = state.n_clusters
steps = 0
while state.n_clusters > args["target"]:
    state.merge(forward_step_merges(state.n_clusters, args["target"], args["unfolding_rate"]))
    steps += 1
t2 = time.perf_counter()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({
    "n": n, "dim": d, "k_s": args["k_s"], "threads": args["threads"],
    "round_fraction": args["round_fraction"],
    "initial_clusters": n_init, "final_clusters": state.n_clusters, "forward_steps": steps,
    "knn_s": round(t1 - t0, 2), "agg_s": round(t2 - t1, 2), "total_s": round(t2 - t0, 2),
    "peak_rss_mb": round(peak, 1), "rss_over_base_mb": round(peak - base, 1),
    "nmi": round(float(normalized_mutual_info_score(truth.numpy(), state.labels)), 4),
}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 70_000, 200_000])
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--components", type=int, default=10)
    parser.add_argument("--spread", type=float, default=1.5, help="std of the component centres")
    parser.add_argument("--target", type=int, default=10)
    parser.add_argument("--k_s", type=int, default=20)
    parser.add_argument("--k_c", type=int, default=5)
    parser.add_argument("--unfolding_rate", type=float, default=0.9)
    parser.add_argument("--round_fraction", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="append the records as JSON lines")
    args = parser.parse_args()
    header = ("N", "init C", "knn s", "agg s", "total s", "peak MB", "+MB", "NMI")
    widths = (8, 7, 7, 7, 8, 8, 7, 6)
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, widths)))
    for n in args.sizes:
        child = {k: v for k, v in vars(args).items() if k not in ("sizes", "out")} | {"n": n}
        cmd = [sys.executable, "-c", CHILD, json.dumps(child)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            raise SystemExit(proc.returncode)
        rec = json.loads(proc.stdout.strip().splitlines()[-1])
        keys = ("n", "initial_clusters", "knn_s", "agg_s", "total_s", "peak_rss_mb", "rss_over_base_mb",
                "nmi")
        print(" ".join(f"{rec[k]!s:>{w}}" for k, w in zip(keys, widths)), flush=True)
        if args.out is not None:
            with args.out.open("a") as f:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
