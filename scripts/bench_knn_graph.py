"""Timing of ``clusterlight.cluster.agglomerative.knn_graph`` at large k: the default against the
running top-k merged block by block (``chunk_size=256, col_chunk_size=2048``, the CPU path for
k up to 512, which the default takes above that).

Random standard-normal points (seed 0, float32). Per (N, k): seconds of each path, the largest
difference of the squared distances and the share of identical neighbour entries. The old path
is skipped for N above ``--compare-up-to`` (it takes minutes there).

    python scripts/bench_knn_graph.py --sizes 19969 54000 --ks 256 600 1383 3740 --dim 32
"""

from __future__ import annotations

import argparse
import time

import torch

from clusterlight.cluster.agglomerative import knn_graph


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[19969, 54000])
    parser.add_argument("--ks", type=int, nargs="+", default=[256, 600, 1383, 3740])
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--compare-up-to", type=int, default=30000)
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    for n in args.sizes:
        x = torch.randn(n, args.dim, generator=gen)
        for k in args.ks:
            if not 1 <= k < n:
                continue
            start = time.perf_counter()
            idx, dist = knn_graph(x, k)
            line = f"N={n} k={k}: default {time.perf_counter() - start:.1f} s"
            if n <= args.compare_up_to:
                start = time.perf_counter()
                idx0, dist0 = knn_graph(x, k, chunk_size=256, col_chunk_size=2048)
                line += (f", block merge {time.perf_counter() - start:.1f} s, max |d - d0| "
                         f"{float((dist - dist0).abs().max()):.1e}, same entries {float((idx == idx0).float().mean()):.5f}")
            print(line, flush=True)


if __name__ == "__main__":
    main()
