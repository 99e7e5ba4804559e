"""How the methods' whole-split clustering steps grow with the number of samples N.

Synthetic features (a Gaussian mixture of 10 components: centres ~ N(0, spread^2 I), spread 1.5 as in
``scripts/bench_agglomeration.py``, unit within-component noise) of the dimension each method uses in its default config
(``configs/<method>/usps.yaml`` over the class defaults) go through the step each method runs on
the whole training split:

* ``kmeans_ae``: :func:`clusterlight.cluster.kmeans.kmeans` as ``AEKMeans.refresh_clusters`` runs it
  (``latent_dim`` 10, ``kmeans_n_init`` 10, ``kmeans_max_iter`` 300, k-means++).
* ``kmeans_dec`` (not in the default list; 2x ``kmeans_ae``): DEC's initial centres
  (``init_n_init`` 20, ``kmeans_max_iter`` 300, ``latent_dim`` 10).
* ``kmeans_debiased``: DebiasedClustering's k-means on R's features (``latent_dim`` 32,
  ``kmeans_n_init`` 10, ``kmeans()``'s default 100 iterations): ``refresh_clusters`` before each
  validation during pretraining (``init_clusters(monitor_only=True)``), and its whole
  initialisation under ``manifold: none``.
* ``debiased_init``: ``DebiasedClustering.init_clusters`` under ``manifold: umap`` (the default):
  R's standardised features (``latent_dim`` 32) to ``cluster_dim`` (10) dimensions by
  :func:`~clusterlight.cluster.umap_hdbscan.reduce_umap` (``umap_neighbors`` 15, fixed, not scaled
  with N), k-means (``kmeans_n_init`` 10) and the diagonal-Gaussian EM (``gmm_iters`` 100) on that
  space, both SPBs, and ``DebiasedClustering._distill`` (``distill_epochs`` 20 over the N samples),
  with the method's own functions on a real module; numba warm-up and ``--umap_limit`` as below.
* ``dec_target``: DEC's target step without its embedding pass (``update_target``): Student-t
  soft assignments ``Q`` of all N points to the K centres, ``P = target_distribution(Q)`` and the
  labels (``latent_dim`` 10).
* ``stats_pool``: DebiasedClustering's statistics pooling pass (:mod:`clusterlight.nn.stats_pool`):
  responsibilities of a partition, ``spb_r.reset_from`` on ``latent_dim`` (32) features,
  ``spb_c.reset_from`` on ``cluster_dim`` features (16 in the configs until commit 829f127, 10
  since; the record's ``cluster_dim`` says which), and the mixture posterior of all N points in that
  space (``mixture_log_posterior``, the pass that ``reject_quantile`` and the answers use).
* ``spc_labelling``: SPC's labelling of one ensemble member (``latent_dim`` 50):
  :func:`~clusterlight.cluster.umap_hdbscan.reduce_umap` to 2-D with
  ``n_neighbors = umap_neighbors_for(N, 30, umap_min_neighbors)`` (10 / 30 / 85 at 10k / 70k /
  200k), ``min_dist`` 0, then :func:`~clusterlight.cluster.umap_hdbscan.hdbscan_exact_k` with
  ``min_cluster_size = N // (2K)``, ``min_samples`` 10; with ``--spc_gmm`` also the Gaussian
  mixture option (:func:`~clusterlight.cluster.umap_hdbscan.gmm_k`) on the same 2-D points. numba
  compiles UMAP/pynndescent on a 5,000-point warm-up first (``compile_s``, a one-off per process,
  not in ``time_s``). UMAP runs 500 epochs up to 10,000 points and 200 above (its default). The
  labelling gets ``--umap_limit`` seconds (default 480) after the warm-up; a run past it is killed
  and recorded with what it had measured and UMAP's last progress lines (``timed_out``; UMAP runs
  with ``verbose`` switched on for these lines, nothing else changes).
* ``spc_clusterers``: the clusterers of SPC's labelling alone (HDBSCAN exactly K with the scaled
  ``min_cluster_size``, and the Gaussian mixture) on 2-D points shaped like a UMAP output (K
  separated blobs), so that their growth is visible at every N even where UMAP is too slow.
* JULE's agglomeration is benchmarked by ``scripts/bench_agglomeration.py`` (records in
  ``results/agglomeration_scaling.jsonl``); ``--report`` adds those rows, ``--agglomeration`` runs
  that script for ``--sizes`` (appending to its file) instead of duplicating it here.

Each (component, N) runs in its own process (``torch.set_num_threads(threads)``,
``OMP/MKL/OPENBLAS/NUMBA_NUM_THREADS=threads``; this parent imports neither torch nor clusterlight,
so a child's peak is its own). Reported: ``time_s`` (the step; components under a second are
repeated ``--repeat`` times and the median kept), per-stage times, ``peak_rss_mb`` (the process's peak
resident memory: ``ru_maxrss`` before the first ``VmHWM`` reset, then the stages' ``VmHWM``;
records written before that fix carry ``peak_rss_mb_derived``, see below), ``rss_base_mb`` (``VmRSS`` after the data was created) and ``peak_over_base_mb``
(``VmHWM`` during the step, reset through ``/proc/self/clear_refs`` after the data was created,
minus the base: what the step added; per stage for SPC). For scale: one dense N x N float32
matrix is 0.4 GB at 10k, 19.6 GB at 70k and 160 GB at 200k. ``--report`` also prints the growth
exponent between successive sizes (``log(t2/t1) / log(N2/N1)``: 1 is linear, 2 quadratic).

    python scripts/bench_scaling.py --out results/scaling.jsonl [--sizes 10000 70000 200000]
        [--components kmeans_ae kmeans_debiased dec_target stats_pool debiased_init spc_clusterers spc_labelling]
        [--spc_gmm] [--umap_limit 480] [--threads 1] [--agglomeration]
    python scripts/bench_scaling.py --report [--out results/scaling.jsonl]   # Markdown table

Not a test (minutes at 200k); ``tests/test_bench_scripts.py`` runs its smallest mode.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
AGGLOMERATION = REPO / "results" / "agglomeration_scaling.jsonl"

#: component -> (method class, config folder, what it runs)
COMPONENTS: dict[str, tuple[str, str, str]] = {
    "kmeans_ae": ("AEKMeans", "ae_kmeans", "AEKMeans refresh_clusters: k-means"),
    "kmeans_dec": ("DEC", "dec", "DEC initial centres: k-means"),
    "kmeans_debiased": ("DebiasedClustering", "debiased",
                        "DebiasedClustering refresh_clusters in pretraining: k-means on R's features"),
    "dec_target": ("DEC", "dec", "DEC update_target: Q, P, labels"),
    "stats_pool": ("DebiasedClustering", "debiased", "DebiasedClustering: SPB reset_from x2 + mixture posterior"),
    "spc_labelling": ("SPC", "spc", "SPC labelling of one member: UMAP 2-D + HDBSCAN exactly K"),
    "spc_clusterers": ("SPC", "spc", "SPC's clusterers alone on 2-D points: HDBSCAN exactly K, GMM"),
    "debiased_init": ("DebiasedClustering", "debiased",
                      "DebiasedClustering init_clusters: UMAP, k-means + diagonal EM, SPBs, distillation of C"),
}
DEFAULT_COMPONENTS = ["kmeans_ae", "kmeans_debiased", "dec_target", "stats_pool", "debiased_init", "spc_clusterers",
                      "spc_labelling"]
UMAP_COMPONENTS = ("spc_labelling", "debiased_init")  # numba warm-up first; --umap_limit applies


# ============================================================================== child process
def _status_mb(field: str, pid: int | str = "self") -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Memory:
    """Resident memory of this process: base after data creation, peak of each stage over it.

    Resetting ``VmHWM`` also resets what ``ru_maxrss`` reports afterwards, so the process peak is
    kept here: ``ru_maxrss`` before the first reset (imports, data, warm-up), then every stage's peak.
    """

    def __init__(self) -> None:
        self.base = _status_mb("VmRSS")
        self.peak = _maxrss_mb()
        self.can_reset = self.reset()

    @staticmethod
    def reset() -> bool:
        """Reset ``VmHWM`` (the peak) to the current RSS."""
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def stage_peak_over_base(self) -> float | None:
        """Peak RSS since the last reset, minus the base (then reset again for the next stage)."""
        peak = _status_mb("VmHWM") if self.can_reset else None
        self.peak = max(self.peak, peak or 0.0, _maxrss_mb())
        self.reset()
        return None if peak is None or self.base is None else round(peak - self.base, 1)


def method_args(cls_name: str, folder: str) -> dict[str, Any]:
    """The model arguments of ``configs/<folder>/usps.yaml`` over the class's own defaults."""
    import inspect

    import yaml

    from clusterlight import methods

    params = inspect.signature(getattr(methods, cls_name).__init__).parameters
    out = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    cfg = yaml.safe_load((REPO / "configs" / folder / "usps.yaml").read_text())
    out.update(cfg["model"].get("init_args") or {})
    return out


def _timed(fn: Any, repeat: int) -> tuple[float, Any]:
    """Median wall time of ``fn()`` over ``repeat`` runs (one run when the first takes over a second)."""
    times, out = [], None
    for i in range(max(1, repeat)):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        if i == 0 and times[0] > 1.0:
            break
    times.sort()
    return times[len(times) // 2], out


def _child(args: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(int(args["threads"]))
    import numpy as np
    from sklearn.metrics import normalized_mutual_info_score as nmi

    component, n, k = args["component"], int(args["n"]), int(args["components"])
    cls_name, folder, what = COMPONENTS[component]
    margs = method_args(cls_name, folder)
    dim = margs["latent_dim"]  # the features the step runs on (R's features for stats_pool)
    rec: dict[str, Any] = {"component": component, "what": what, "n": n, "dim": int(dim), "k": k,
                           "threads": int(args["threads"])}

    gen = torch.Generator().manual_seed(int(args["seed"]))
    truth = torch.randint(k, (n,), generator=gen)

    def mixture(d: int) -> torch.Tensor:
        centres = torch.randn(k, d, generator=gen) * float(args["spread"])
        return centres[truth] + torch.randn(n, d, generator=gen)

    x = mixture(int(dim))
    extra: dict[str, Any] = {}
    if component == "stats_pool":  # R's features (latent_dim) and C's features (cluster_dim) of the same samples
        z_c = mixture(int(margs["cluster_dim"]))
        extra["cluster_dim"] = int(margs["cluster_dim"])
    if component == "spc_clusterers":  # what UMAP hands over: K separated blobs in 2-D
        angle = torch.arange(k) * (2 * math.pi / k)
        centres = 20.0 * torch.stack([angle.cos(), angle.sin()], dim=1)
        x = centres[truth] + torch.randn(n, 2, generator=gen)
        rec["dim"] = 2
    if component in UMAP_COMPONENTS:
        import umap

        from clusterlight.cluster.umap_hdbscan import reduce_umap, umap_neighbors_for

        fit = umap.UMAP.fit

        def verbose_fit(self: Any, *a: Any, **kw: Any) -> Any:  # progress lines, for a run that times out
            self.verbose = True
            return fit(self, *a, **kw)

        umap.UMAP.fit = verbose_fit

        if component == "spc_labelling":
            neighbors = margs["umap_neighbors"] or umap_neighbors_for(n, 30.0, int(margs["umap_min_neighbors"]))
            mcs = margs["min_cluster_size"]
            min_dist, n_components = float(margs["umap_min_dist"]), 2
            rec["params"] = {"n_neighbors": int(neighbors), "min_dist": min_dist,
                             "min_cluster_size": int(mcs) if mcs else n // (2 * k),
                             "min_samples": int(margs["min_samples"])}
        else:  # debiased_init: UMAP of R's standardised features into cluster_dim dimensions
            neighbors, min_dist, n_components = int(margs["umap_neighbors"]), 0.0, int(margs["cluster_dim"])
            rec["params"] = {"n_neighbors": neighbors, "n_components": n_components, "manifold": margs["manifold"],
                             "kmeans_n_init": int(margs["kmeans_n_init"]), "gmm_iters": int(margs["gmm_iters"]),
                             "distill_epochs": int(margs["distill_epochs"])}
        print(json.dumps({"partial": "start", **rec}), flush=True)
        t0 = time.perf_counter()  # numba compilation, on a warm-up of the same dimension (> 4096: NNDescent path)
        warm = np.random.default_rng(1).standard_normal((5000, int(dim))).astype(np.float32)
        reduce_umap(warm, neighbors, 0, min_dist, n_components=n_components)
        rec["compile_s"] = round(time.perf_counter() - t0, 2)
        del warm
        print(json.dumps({"partial": "compiled", "compile_s": rec["compile_s"]}), flush=True)
    mem = Memory()
    rec["rss_base_mb"] = None if mem.base is None else round(mem.base, 1)
    if component in UMAP_COMPONENTS:
        print(json.dumps({"partial": "base", "rss_base_mb": rec["rss_base_mb"]}), flush=True)
    repeat = int(args["repeat"])

    if component.startswith("kmeans"):
        from clusterlight.cluster.kmeans import kmeans

        n_init = int(margs["init_n_init"] if component == "kmeans_dec" else margs["kmeans_n_init"])
        max_iter = int(margs["kmeans_max_iter"]) if "kmeans_max_iter" in margs else 100  # kmeans()'s default
        secs, res = _timed(lambda: kmeans(x, k, n_init=n_init, max_iter=max_iter, seed=int(margs["kmeans_seed"])),
                           repeat)
        rec.update(params={"n_init": n_init, "max_iter": max_iter}, time_s=round(secs, 3), n_iter=res.n_iter,
                   nmi=round(float(nmi(truth.numpy(), res.labels.numpy())), 4))
    elif component == "dec_target":
        from clusterlight.methods.ae_kmeans import squared_distances, student_t
        from clusterlight.methods.dec import target_distribution

        centers = x[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:k]].clone()
        alpha = float(margs["alpha"])

        def step() -> tuple[torch.Tensor, torch.Tensor]:
            q = student_t(squared_distances(x, centers), alpha)
            return target_distribution(q), q.argmax(dim=1)

        secs, (p, labels) = _timed(step, repeat)
        rec.update(params={"alpha": alpha}, time_s=round(secs, 4), target_rows_sum_to_1=bool(
            torch.allclose(p.sum(1), torch.ones(n), atol=1e-4)))
    elif component == "stats_pool":
        import torch.nn.functional as F

        from clusterlight.methods.debiased import mixture_log_posterior
        from clusterlight.nn.stats_pool import StatisticsPooling

        labels = truth  # a partition of the split (k-means' output in the method; its cost is kmeans_debiased)
        spb_r = StatisticsPooling(k, int(dim), float(margs["momentum"]))
        spb_c = StatisticsPooling(k, int(margs["cluster_dim"]), float(margs["momentum"]))

        def pool() -> None:
            onehot = F.one_hot(labels, k).float()
            spb_r.reset_from(x, onehot)
            spb_c.reset_from(z_c, onehot)

        def posterior() -> torch.Tensor:
            mean, var, _ = spb_c.stats()
            log_q, _ = mixture_log_posterior(z_c, mean, var, spb_c.prior().log())
            return log_q.argmax(dim=1)

        t_pool, _ = _timed(pool, repeat)
        t_post, pred = _timed(posterior, repeat)
        rec.update(params={"momentum": float(margs["momentum"])}, pool_s=round(t_pool, 4),
                   posterior_s=round(t_post, 4), time_s=round(t_pool + t_post, 4),
                   nmi=round(float(nmi(truth.numpy(), pred.numpy())), 4))
    elif component == "spc_labelling":
        from clusterlight.cluster.umap_hdbscan import gmm_k, hdbscan_exact_k

        seed = int(margs["seed"])
        t0 = time.perf_counter()
        x2d = reduce_umap(x.numpy(), neighbors, seed, min_dist)
        rec["umap_s"] = round(time.perf_counter() - t0, 2)
        rec["umap_peak_over_base_mb"] = mem.stage_peak_over_base()
        print(json.dumps({"partial": "umap", "umap_s": rec["umap_s"],
                          "umap_peak_over_base_mb": rec["umap_peak_over_base_mb"]}), flush=True)
        t0 = time.perf_counter()
        labels = hdbscan_exact_k(x2d, k, mcs, int(margs["min_samples"]), fallback_seed=seed)
        rec["hdbscan_s"] = round(time.perf_counter() - t0, 2)
        rec["hdbscan_peak_over_base_mb"] = mem.stage_peak_over_base()
        rec["nmi"] = round(float(nmi(truth.numpy(), labels)), 4)
        rec["noise_fraction"] = round(float((labels < 0).mean()), 4)
        rec["time_s"] = round(rec["umap_s"] + rec["hdbscan_s"], 2)
        if args["spc_gmm"]:
            t0 = time.perf_counter()
            g = gmm_k(x2d, k, seed)
            rec["gmm_s"] = round(time.perf_counter() - t0, 2)
            rec["gmm_peak_over_base_mb"] = mem.stage_peak_over_base()
            rec["gmm_nmi"] = round(float(nmi(truth.numpy(), g)), 4)
    elif component == "debiased_init":
        # DebiasedClustering.init_clusters (manifold: umap) on synthetic R features, with the
        # method's own pieces: the same standardisation and UMAP call, k-means and the diagonal EM
        # on the UMAP space, both SPBs, and C's distillation (DebiasedClustering._distill).
        import torch.nn.functional as F

        from clusterlight.cluster.kmeans import kmeans
        from clusterlight.cluster.mixture import diag_gmm_em
        from clusterlight.methods import DebiasedClustering

        module = DebiasedClustering(num_clusters=k, input_shape=(1, 16, 16), latent_dim=int(dim),
                                    cluster_dim=n_components, head_hidden=list(margs["head_hidden"]),
                                    momentum=float(margs["momentum"]), kmeans_seed=int(margs["kmeans_seed"]),
                                    distill_epochs=int(margs["distill_epochs"]), manifold="umap")
        seed = int(margs["kmeans_seed"])
        t0 = time.perf_counter()
        xs = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
        u = torch.from_numpy(reduce_umap(xs.numpy(), neighbors, seed=seed, n_components=n_components)).float()
        target = (u - u.mean(0)) / u.std(0).clamp_min(1e-6)
        rec["umap_s"] = round(time.perf_counter() - t0, 2)
        rec["umap_peak_over_base_mb"] = mem.stage_peak_over_base()
        print(json.dumps({"partial": "umap", "umap_s": rec["umap_s"],
                          "umap_peak_over_base_mb": rec["umap_peak_over_base_mb"]}), flush=True)
        t0 = time.perf_counter()
        labels = kmeans(target, k, n_init=int(margs["kmeans_n_init"]), seed=seed).labels
        rec["kmeans_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        resp = diag_gmm_em(target, F.one_hot(labels, k).float(), iters=int(margs["gmm_iters"]))[0]
        rec["gmm_s"] = round(time.perf_counter() - t0, 2)
        rec["kmeans_gmm_peak_over_base_mb"] = mem.stage_peak_over_base()
        t0 = time.perf_counter()
        module.spb_r.reset_from(x, resp)
        module._distill(x, target)
        with torch.no_grad():
            module.spb_c.reset_from(module._cluster_space(x), resp)
        rec["distill_s"] = round(time.perf_counter() - t0, 2)
        rec["distill_peak_over_base_mb"] = mem.stage_peak_over_base()
        rec["time_s"] = round(rec["umap_s"] + rec["kmeans_s"] + rec["gmm_s"] + rec["distill_s"], 2)
        rec["nmi"] = round(float(nmi(truth.numpy(), resp.argmax(1).numpy())), 4)
    elif component == "spc_clusterers":
        from clusterlight.cluster.umap_hdbscan import gmm_k, hdbscan_exact_k

        x2d, seed, mcs = x.numpy(), int(margs["seed"]), margs["min_cluster_size"]
        t0 = time.perf_counter()
        labels = hdbscan_exact_k(x2d, k, mcs, int(margs["min_samples"]), fallback_seed=seed)
        rec["hdbscan_s"] = round(time.perf_counter() - t0, 2)
        rec["hdbscan_peak_over_base_mb"] = mem.stage_peak_over_base()
        rec["nmi"] = round(float(nmi(truth.numpy(), labels)), 4)
        t0 = time.perf_counter()
        g = gmm_k(x2d, k, seed)
        rec["gmm_s"] = round(time.perf_counter() - t0, 2)
        rec["gmm_peak_over_base_mb"] = mem.stage_peak_over_base()
        rec["gmm_nmi"] = round(float(nmi(truth.numpy(), g)), 4)
        rec["time_s"] = rec["hdbscan_s"]
        rec["params"] = {"min_cluster_size": int(mcs) if mcs else n // (2 * k), "min_samples": int(margs["min_samples"])}
    else:
        raise ValueError(f"unknown component {component!r}")
    over = mem.stage_peak_over_base()
    stage_peaks = [v for key, v in rec.items() if key.endswith("_peak_over_base_mb") and v is not None]
    rec["peak_over_base_mb"] = max([v for v in [over, *stage_peaks] if v is not None], default=None)
    rec["peak_rss_mb"] = round(mem.peak, 1)  # the process peak (see Memory)
    rec["dense_nxn_float32_gb"] = round(4 * n * n / 1e9, 1)
    rec.update(extra)
    return rec


# ============================================================================== parent process
def run_child(args: dict[str, Any], timeout: float | None, umap_limit: float | None) -> dict[str, Any]:
    """Run one (component, N) process; kill it past ``timeout`` seconds, or ``umap_limit`` seconds
    after its UMAP warm-up, and then record what it had measured (its partial lines, UMAP's progress)."""
    threads = str(args["threads"])
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads,
               NUMBA_NUM_THREADS=threads, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    out: list[tuple[float, str]] = []
    err: list[str] = []
    readers = [threading.Thread(target=lambda: [out.append((time.perf_counter(), line.rstrip())) for line in proc.stdout],
                                daemon=True),
               threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)]
    for r in readers:
        r.start()
    deadline = None if timeout is None else t0 + timeout
    compiled_at = None
    killed = None
    while proc.poll() is None:
        time.sleep(0.2)
        if compiled_at is None:
            compiled_at = next((t for t, line in out if line.startswith('{"partial": "compiled"')), None)
            if compiled_at is not None and umap_limit is not None:
                deadline = min(deadline or math.inf, compiled_at + umap_limit)
        if deadline is not None and time.perf_counter() > deadline:
            at_kill = {key: _status_mb(field, proc.pid) for key, field in
                       (("rss_at_kill_mb", "VmRSS"), ("stage_peak_at_kill_mb", "VmHWM"))}
            proc.kill()
            killed = time.perf_counter()
    proc.wait()
    for r in readers:
        r.join(timeout=5)
    records = [json.loads(line) for _, line in out if line.startswith("{")]
    finished = [r for r in records if "partial" not in r]
    if killed is not None and not finished:
        rec: dict[str, Any] = {"component": args["component"], "n": args["n"], "threads": args["threads"],
                               "time_s": None, "timed_out": True, "timeout_s": timeout, "umap_limit_s": umap_limit}
        for part in records:
            rec.update({k: v for k, v in part.items() if k != "partial"})
        start = compiled_at or t0
        rec["killed_after_s"] = round(killed - start, 1)
        # the child's resident memory when it was stopped, and its peak since its last stage reset
        rec.update({key: None if value is None else round(value, 1) for key, value in at_kill.items()})
        peaks = [rec.get(key) for key in ("umap_peak_over_base_mb", "hdbscan_peak_over_base_mb")]
        if rec["stage_peak_at_kill_mb"] is not None and rec.get("rss_base_mb") is not None:
            peaks.append(round(rec["stage_peak_at_kill_mb"] - rec["rss_base_mb"], 1))
        peaks = [v for v in peaks if v is not None]
        rec["peak_over_base_mb"] = max(peaks) if peaks else None  # up to the kill
        rec["progress"] = [f"+{t - start:.1f} s {line.strip()}" for t, line in out
                           if t >= start and not line.startswith("{") and line.strip()][-25:]
        rec["process_s"] = round(killed - t0, 1)
        return rec
    if not finished:
        sys.stderr.write("\n".join(line for _, line in out)[-4000:] + "".join(err)[-8000:])
        raise SystemExit(f"{args['component']} at N={args['n']} failed with exit status {proc.returncode}")
    rec = finished[-1]
    rec["process_s"] = round(time.perf_counter() - t0, 1)
    return rec


def _exponent(rows: list[dict[str, Any]], key: str) -> list[str]:
    """Growth exponents ``log(v2/v1) / log(N2/N1)`` of ``key`` between successive sizes."""
    out = [""]
    for a, b in itertools.pairwise(rows):
        va, vb = a.get(key), b.get(key)
        if va is None or vb is None or va <= 0 or vb <= 0:
            out.append("")
        else:
            out.append(f"{math.log(vb / va) / math.log(b['n'] / a['n']):.2f}")
    return out


def report(path: Path, agglomeration: Path = AGGLOMERATION) -> str:
    groups: dict[str, dict[int, dict[str, Any]]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                groups.setdefault(rec["component"], {})[int(rec["n"])] = rec  # the last record of each size
    if agglomeration.exists():
        for line in agglomeration.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                rec = dict(rec, component="jule_agglomeration", time_s=rec["total_s"],
                           peak_over_base_mb=rec["rss_over_base_mb"],
                           detail=f"kNN {rec['knn_s']} s + merges {rec['agg_s']} s")
                groups.setdefault("jule_agglomeration", {})[int(rec["n"])] = rec
    head = ["step", "N", "dim", "time s", "time growth", "peak RSS MB", "+MB over base", "memory growth",
            "stages", "dense NxN f32 GB", "threads"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    order = [c for c in COMPONENTS if c in groups] + [c for c in groups if c not in COMPONENTS]
    for comp in order:
        rows = [groups[comp][n] for n in sorted(groups[comp])]
        tgrow, mgrow = _exponent(rows, "time_s"), _exponent(rows, "peak_over_base_mb")
        for r, tg, mg in zip(rows, tgrow, mgrow):
            if r.get("timed_out") and "umap_s" in r:
                mb = f" (+{r['umap_peak_over_base_mb']} MB)" if r.get("umap_peak_over_base_mb") is not None else ""
                stages = (f"UMAP {r['umap_s']} s{mb}, **HDBSCAN stopped unfinished after "
                          f"{r['killed_after_s'] - r['umap_s']:.0f} s** (limit {r['umap_limit_s']:.0f} s after the "
                          f"warm-up), n_neighbors {r.get('params', {}).get('n_neighbors', '?')}")
            elif r.get("timed_out") and comp in UMAP_COMPONENTS and "compile_s" in r:
                last = r["progress"][-1] if r.get("progress") else ""
                stages = (f"**UMAP stopped unfinished {r['killed_after_s']:.0f} s after the warm-up**; "
                          f"last UMAP output: {last}")
            elif r.get("timed_out"):
                stages = f"**stopped unfinished after {r['killed_after_s']:.0f} s** (--timeout {r['timeout_s']:g} s)"
            elif comp == "debiased_init":
                stages = (f"UMAP {r['umap_s']} s (+{r['umap_peak_over_base_mb']} MB), k-means {r['kmeans_s']} s + "
                          f"EM {r['gmm_s']} s (+{r['kmeans_gmm_peak_over_base_mb']} MB), SPBs + distillation "
                          f"{r['distill_s']} s (+{r['distill_peak_over_base_mb']} MB), n_neighbors "
                          f"{r['params']['n_neighbors']}, to {r['params']['n_components']}-D")
            elif comp == "spc_clusterers":
                stages = (f"HDBSCAN {r['hdbscan_s']} s (+{r['hdbscan_peak_over_base_mb']} MB), "
                          f"GMM {r['gmm_s']} s (+{r['gmm_peak_over_base_mb']} MB), NMI {r['nmi']} / {r['gmm_nmi']}")
            elif comp == "spc_labelling":
                stages = (f"UMAP {r['umap_s']} s (+{r['umap_peak_over_base_mb']} MB), HDBSCAN {r['hdbscan_s']} s "
                          f"(+{r['hdbscan_peak_over_base_mb']} MB), n_neighbors {r['params']['n_neighbors']}")
                if "gmm_s" in r:
                    stages += f", GMM {r['gmm_s']} s"
            elif comp == "stats_pool":
                stages = f"pool {r['pool_s']} s, posterior {r['posterior_s']} s"
            elif comp.startswith("kmeans"):
                stages = f"n_init {r['params']['n_init']}, max_iter {r['params']['max_iter']}"
            else:
                stages = r.get("detail", "")
            t = f"> {r['killed_after_s']:.0f}" if r.get("timed_out") else \
                "" if r.get("time_s") is None else f"{r['time_s']:g}"
            lines.append("| " + " | ".join([
                comp, f"{r['n']:,}", str(r.get("dim", "")), t, tg, f"{r.get('peak_rss_mb', '')}",
                f"{r.get('peak_over_base_mb', '')}", mg, stages, f"{4 * r['n'] ** 2 / 1e9:.1f}",
                str(r.get("threads", "")),
            ]) + " |")
    lines.append("")
    lines.append("Growth: log(value ratio) / log(N ratio) from the previous size (1 linear, 2 quadratic); "
                 f"jule_agglomeration rows come from {agglomeration.relative_to(REPO)} (scripts/bench_agglomeration.py).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 70_000, 200_000])
    parser.add_argument("--components", nargs="+", default=DEFAULT_COMPONENTS, choices=list(COMPONENTS))
    parser.add_argument("--k", dest="components_k", type=int, default=10, help="mixture components = clusters K")
    parser.add_argument("--spread", type=float, default=1.5, help="std of the component centres")
    parser.add_argument("--spc_gmm", action="store_true", help="also time SPC's Gaussian-mixture clusterer")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of sub-second steps (median)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per (component, N) process; a run past it is recorded as timed out")
    parser.add_argument("--umap_limit", type=float, default=480.0,
                        help="seconds allowed to SPC's labelling after the UMAP warm-up (default 8 min; 0: no limit)")
    parser.add_argument("--agglomeration", action="store_true",
                        help=f"also run scripts/bench_agglomeration.py for --sizes (appends to {AGGLOMERATION.name})")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "scaling.jsonl", help="append JSON lines")
    parser.add_argument("--report", action="store_true", help="print the Markdown table of --out and exit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))), flush=True)
        return
    if args.report:
        print(report(args.out))
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for component in args.components:
        for n in args.sizes:
            child = {"component": component, "n": n, "components": args.components_k, "spread": args.spread,
                     "spc_gmm": args.spc_gmm, "repeat": args.repeat, "threads": args.threads, "seed": args.seed}
            rec = run_child(child, args.timeout, args.umap_limit or None)
            print(json.dumps(rec), flush=True)
            with args.out.open("a") as f:
                f.write(json.dumps(rec) + "\n")
    if args.agglomeration:
        subprocess.run([sys.executable, str(REPO / "scripts" / "bench_agglomeration.py"), "--sizes",
                        *map(str, args.sizes), "--threads", str(args.threads), "--out", str(AGGLOMERATION)],
                       check=True, cwd=REPO)


if __name__ == "__main__":
    main()
