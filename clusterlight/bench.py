"""Benchmark runner: a grid of method x dataset x split x seed x data seed, one JSON record per run.

    clusterlight bench run --budget fast --out results/bench_fast.jsonl
    clusterlight bench run --budget fast --methods dec jule --datasets usps --splits balanced lt10 --seeds 0 1 2
    clusterlight bench run --budget fast --methods debiased dec --datasets usps --splits lt10_ood --seeds 0 --data-seeds 1 2 3
    clusterlight bench run --budget paper --methods online_hard --datasets fashion_mnist \
        --override trainer.max_epochs=10 --override model.init_args.assignment=sinkhorn --variant sinkhorn_10ep
    clusterlight bench report results/bench_fast.jsonl --markdown results/bench_fast.md --figure results/bench_fast.png
    clusterlight bench compare results/*.jsonl --a debiased:rerun1206 --b ae_kmeans:rerun1206 --datasets fashion_mnist

(``python -m clusterlight.bench ...`` is the same.) Every run is ``clusterlight fit
--config configs/<method>/<dataset>.yaml --test_after_fit true`` in a process of its own (so its
peak memory is its own), with the split's data options, the seed, and for the ``fast`` budget the
shorter schedule of :data:`FAST`, then the ``--override`` options. The ``paper`` budget uses the
configs unchanged (the papers' schedules). ``--data-seeds`` sets the data module's split seed
(``data.init_args.seed``, 0 unless given): it draws the long-tailed splits' class order (which
classes are the head and which the tail), the sample cap and the held-out test images, while
``--seeds`` sets the training seed; a grid over several data seeds measures a setting on several
class orders, not only on the one it may have been tuned on. Records are appended to the results
file as JSON lines; a run whose key (method, variant, dataset, split, seed, data seed, budget) is
already there is skipped, so an interrupted grid resumes. Stopping the grid (Ctrl-C, or SIGTERM
from ``kill``, ``pkill`` or a job scheduler) stops the run in flight with it; that run leaves no
record. ``compare`` pairs two methods' records seed by seed (the same training and data seed; on
the same machine unless ``--any-machine``) and gives the mean difference of each metric with its
95% paired-t interval, how often the first is higher and the sign test's p.

Labels are read only by the test metrics, as in every clusterlight run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import clusterlight

REPO = Path(__file__).resolve().parents[1]

METHODS = ["ae_kmeans", "dec", "debiased", "spc", "online_hard", "jule"]
DATASETS = ["usps", "coil20", "fashion_mnist"]

#: Data options of each split. ``ood`` holds the dataset's last class out of training and mixes
#: it into the test split (20% of it), on top of ``imbalance_ratio`` 10.
SPLITS: dict[str, list[str]] = {
    "balanced": [],
    "lt10": ["--data.init_args.imbalance_ratio=10"],
    "lt100": ["--data.init_args.imbalance_ratio=100"],
    "lt10_ood": ["--data.init_args.imbalance_ratio=10", "--data.init_args.ood_classes=[{last}]",
                 "--data.init_args.ood_fraction=0.2"],
}
NUM_CLASSES = {"usps": 10, "coil20": 20, "fashion_mnist": 10, "digits": 10, "mnist": 10, "cifar10": 10}

#: The ``fast`` budget: minutes per run on 2 CPU cores. Fashion-MNIST trains on a stratified
#: 10,000-image subsample of its 60,000 training images (SPC: 6,000), tested on the official 10,000.
_FMNIST_CAP = ["--data.init_args.max_samples=10000"]
FAST: dict[str, dict[str, list[str]]] = {
    "ae_kmeans": {
        "usps": ["--trainer.max_epochs=10"],
        "coil20": ["--trainer.max_epochs=30"],
        "fashion_mnist": ["--trainer.max_epochs=5", *_FMNIST_CAP],
    },
    "dec": {
        "usps": ["--model.init_args.pretrain_epochs=8", "--trainer.max_epochs=14"],
        "coil20": ["--model.init_args.pretrain_epochs=25", "--trainer.max_epochs=40"],
        "fashion_mnist": ["--model.init_args.pretrain_epochs=4", "--trainer.max_epochs=7", *_FMNIST_CAP],
    },
    "debiased": {
        "usps": ["--model.init_args.pretrain_epochs=5", "--trainer.max_epochs=10"],
        "coil20": ["--model.init_args.pretrain_epochs=25", "--trainer.max_epochs=50"],
        "fashion_mnist": ["--model.init_args.pretrain_epochs=5", "--trainer.max_epochs=10", *_FMNIST_CAP],
    },
    "spc": {
        "usps": ["--model.init_args.num_members=3", "--model.init_args.pretrain_epochs=4",
                 "--model.init_args.epochs_per_meta=2", "--trainer.max_epochs=6"],
        "coil20": ["--model.init_args.num_members=3", "--model.init_args.pretrain_epochs=14",
                   "--model.init_args.epochs_per_meta=8", "--trainer.max_epochs=30"],
        "fashion_mnist": ["--model.init_args.num_members=3", "--model.init_args.pretrain_epochs=4",
                          "--model.init_args.epochs_per_meta=2", "--trainer.max_epochs=6",
                          "--data.init_args.max_samples=6000"],
    },
    "online_hard": {
        "usps": ["--trainer.max_epochs=10"],
        "coil20": ["--trainer.max_epochs=30"],
        "fashion_mnist": ["--trainer.max_epochs=8", *_FMNIST_CAP],
    },
    "jule": {
        "usps": ["--model.init_args.epochs_per_period=1", "--trainer.max_epochs=8"],
        "coil20": ["--model.init_args.epochs_per_period=5", "--trainer.max_epochs=25"],
        "fashion_mnist": ["--model.init_args.epochs_per_period=1", "--trainer.max_epochs=8", *_FMNIST_CAP],
    },
}
BUDGETS = ("fast", "paper")

#: Results reported by the papers (with labels in their loops), for the report. Each: (ACC, NMI,
#: dataset version). JULE reports NMI with geometric normalisation.
PAPER: dict[tuple[str, str], tuple[float | None, float | None, str]] = {
    ("spc", "usps"): (0.984, 0.954, "SPC paper (KI 2021), USPS 9,298 images"),
    ("spc", "fashion_mnist"): (0.679, 0.735, "SPC paper (KI 2021), Fashion-MNIST 70,000"),
    ("jule", "usps"): (0.950, 0.913, "JULE-RC (CVPR 2016), USPS 9,298 images, geometric NMI"),
    ("jule", "coil20"): (None, 1.000, "JULE-RC (CVPR 2016), COIL-20 1,440 images, geometric NMI"),
    ("online_hard", "fashion_mnist"): (0.506, 0.515, "authors' code run on 2 CPU cores, 10 epochs, epoch chosen by "
                                                     "true NMI; a second run gave 0.662 / 0.609 (Fashion-MNIST 70,000)"),
}

#: A ``fast`` ACC this much below the ``paper`` budget's is flagged in the report.
FAR_BELOW = 0.05

METRICS = ["acc", "nmi", "nmi_geometric", "ari", "tail_acc", "cluster_kl", "ood_auroc"]

CHILD = r"""
import json, resource, sys, time
import torch
from clusterlight import cli as C
from clusterlight.bench import cpu_name

marks = {}
_before, _after = C.ClusterlightCLI.before_fit, C.ClusterlightCLI.after_fit
def before_fit(self):
    _before(self)
    marks["fit0"] = time.time()
def after_fit(self):
    marks["fit1"] = time.time()
    _after(self)
C.ClusterlightCLI.before_fit, C.ClusterlightCLI.after_fit = before_fit, after_fit
result, args = sys.argv[1], sys.argv[2:]
sys.argv = sys.argv[:1]
t0 = time.time()
cli = C.main(args)
out = {k[5:]: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}
dm = cli.datamodule
out.update(wall_s=time.time() - t0, train_s=marks["fit1"] - marks["fit0"],
           peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           peak_gpu_mb=torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
           n_train=len(dm.train_dataset), n_test=len(dm.test_dataset), eval_on=dm.eval_on,
           cpu=cpu_name())
json.dump(out, open(result, "w"))
"""


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"cpu {platform.machine()} ({len(os.sched_getaffinity(0))} cores)"


def cpu_name(cpuinfo: str | None = None) -> str:
    """The processor and the kernel set torch picked on it, e.g. ``Intel(R) Xeon(R) Processor (family 6
    model 167), torch AVX512, 2 threads``: two machines with the same package releases can still give
    other figures (the vector kernels round differently, and UMAP and the mixtures amplify that).

    ``cpuinfo``: the text of ``/proc/cpuinfo`` (read when ``None``); its first processor's block is
    used: ``model name`` with ``cpu family`` and ``model`` (x86), or ``CPU implementer`` and ``CPU part``
    (ARM, which has no model name). The thread count is the calling process's: the bench's child
    computes it, as that is the process that trains.
    """
    import torch

    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as fh:
                cpuinfo = fh.read()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields and not line.strip():
                break  # the end of the first processor's block
            continue
        fields.setdefault(key.strip(), value.strip())
    processor = platform.processor()
    name = fields.get("model name") or (processor if processor not in ("", "unknown") else platform.machine())
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    elif "CPU implementer" in fields and "CPU part" in fields:
        name += f" (implementer {fields['CPU implementer']} part {fields['CPU part']})"
    return f"{name}, torch {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"


#: the run arguments that set the split seed (the second is jsonargparse's shorthand)
DATA_SEED_OPTIONS = ("--data.init_args.seed=", "--data.seed=")


def run_args(method: str, dataset: str, split: str, seed: int, budget: str, root: Path,
             overrides: list[str] = ()) -> list[str]:
    """The ``fit`` arguments of one run (``overrides``: ``KEY=VALUE`` options given after the budget's)."""
    config = REPO / "configs" / method / f"{dataset}.yaml"
    if not config.is_file():
        raise SystemExit(f"error: no config {config.relative_to(REPO)} for method {method} on {dataset}")
    split_args = [a.format(last=NUM_CLASSES[dataset] - 1) for a in SPLITS[split]]
    budget_args = FAST[method][dataset] if budget == "fast" else []
    return [
        "fit", "--config", str(config), *split_args, *budget_args, *(f"--{o}" for o in overrides),
        f"--seed_everything={seed}", "--test_after_fit=true", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={root}", "--figures.every_n_epochs=1000",
    ]


def config_hash(args: list[str]) -> str:
    """Hash of the config file's text and the overrides, the training and split seeds excluded: equal
    for the seeds of one cell."""
    config = Path(args[args.index("--config") + 1])
    skip = ("--seed_everything", "--trainer.default_root_dir", *DATA_SEED_OPTIONS)
    parts = [config.read_text()] + [a for a in args if not a.startswith(skip)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def data_seed(r: dict[str, Any]) -> int:
    """A record's split seed: its ``data_seed`` field; for records from before the field, the last
    ``--data.init_args.seed=`` (or ``--data.seed=``) among its run's arguments (an ``--override``),
    else 0 (the data module's default; no shipped config sets it)."""
    if r.get("data_seed") is not None:
        return int(r["data_seed"])
    given = [a.partition("=")[2] for a in r.get("args") or [] if isinstance(a, str) and a.startswith(DATA_SEED_OPTIONS)]
    return int(given[-1]) if given else 0


def key(r: dict[str, Any]) -> tuple:
    return (r["method"], r.get("variant", ""), r["dataset"], r["split"], int(r["seed"]), data_seed(r), r["budget"])


def label(r: dict[str, Any]) -> str:
    """The method as the report names it: ``method`` or ``method[variant]``."""
    return f"{r['method']}[{r['variant']}]" if r.get("variant") else r["method"]


def check_overrides(overrides: list[str], variant: str) -> None:
    """One-line errors for overrides that cannot be what the user meant, before any run."""
    for o in overrides:
        k, eq, v = o.partition("=")
        if not eq or not k or k.startswith("-") or k.split(".")[0] not in ("model", "data", "trainer"):
            raise SystemExit(f"error: --override takes KEY=VALUE with KEY under model., data. or trainer. "
                             f"(for example model.init_args.sigma=10), got {o!r}")
        if f"--{k}=" in DATA_SEED_OPTIONS:
            raise SystemExit(f"error: set the split seed with --data-seeds {v or 'D'}, not --override {o} "
                             "(records carry it as data_seed, and resume and compare key on it)")
    if overrides and not variant:
        raise SystemExit("error: --override changes the configs: name the variant with --variant, so its records "
                         "are not mixed with the plain configs'")
    if variant and not re.fullmatch(r"[A-Za-z0-9_.+-]+", variant):
        raise SystemExit(f"error: --variant takes letters, digits and _.+- only, got {variant!r}")


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise SystemExit(f"error: {path}:{n} is not a JSON record") from None
    return out


def load_run(folder: str | Path) -> tuple[Any, Any]:
    """The data module (set up for fit and test) and the trained model of one run that ``run --runs`` left.

    ``folder`` is ``<runs>/<budget>/<run name>``: its fit saved ``runs/*/config.yaml`` and
    ``runs/*/checkpoints/last.ckpt`` (the latest of each is taken). Both classes come from the
    config's ``class_path``. For diagnostics of finished runs (``scripts/partition_probe.py``,
    ``scripts/tail_probe.py``); the model is in eval mode, on the CPU.
    """
    import importlib

    import yaml

    found = {}
    for name, pattern in (("config", "runs/*/config.yaml"), ("checkpoint", "runs/*/checkpoints/last.ckpt")):
        paths = sorted(Path(folder).glob(pattern))
        if not paths:
            raise SystemExit(f"error: {folder} holds no {pattern} (a run folder of bench run --runs)")
        found[name] = paths[-1]
    with open(found["config"]) as f:
        config = yaml.safe_load(f)

    def cls(entry: dict[str, Any]) -> Any:
        module, _, name = entry["class_path"].rpartition(".")
        return getattr(importlib.import_module(module), name)

    data = cls(config["data"])(**config["data"].get("init_args", {}))
    data.setup("fit")
    data.setup("test")
    model = cls(config["model"]).load_from_checkpoint(str(found["checkpoint"]), map_location="cpu").eval()
    return data, model


@contextmanager
def _sigterm_stops_the_run_in_flight() -> Iterator[None]:
    """SIGTERM ends the grid the way Ctrl-C does: as an exception in the main thread, on which
    ``subprocess.run`` kills its child. Without it the bench process dies alone and the ``fit`` in
    flight runs on, orphaned, sharing the cores with whatever starts next (exit status 143)."""
    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_grid(a: argparse.Namespace) -> int:
    with _sigterm_stops_the_run_in_flight():
        return _run_grid(a)


def _run_grid(a: argparse.Namespace) -> int:
    out = Path(a.out)
    check_overrides(a.override, a.variant)
    done = {key(r) for r in read_records(out)}
    data_seeds = list(dict.fromkeys(a.data_seeds))
    if any(ds < 0 for ds in data_seeds):
        raise SystemExit(f"error: --data-seeds takes integers >= 0, got {' '.join(map(str, data_seeds))}")
    grid = [(m, d, s, seed, ds) for d in a.datasets for s in a.splits for ds in data_seeds for m in a.methods
            for seed in dict.fromkeys(a.seeds)]
    for m, d, *_ in grid:  # bad input: one line, before any run
        if not (REPO / "configs" / m / f"{d}.yaml").is_file():
            raise SystemExit(f"error: no config configs/{m}/{d}.yaml for method {m} on {d}")
    todo = [g for g in grid if (g[0], a.variant, *g[1:], a.budget) not in done]
    if a.override:  # an unknown or mistyped option: one line now, not a failure per run
        for m, d in sorted({(g[0], g[1]) for g in todo}):
            args = run_args(m, d, "balanced", 0, a.budget, Path(a.runs).resolve() / "check", a.override)
            proc = subprocess.run([sys.executable, "-m", "clusterlight", *args, "--print_config"], capture_output=True,
                                  text=True, cwd=REPO, env={**os.environ, "WANDB_MODE": "disabled"})
            if proc.returncode != 0:
                lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
                why = [ln for ln in lines if ln.startswith("error:") or "not accepted" in ln] or lines[-1:] or ["?"]
                raise SystemExit(f"error: --override is refused by configs/{m}/{d}.yaml: "
                                 + " ".join(w.removeprefix("error: ") for w in why))
    print(f"bench: {len(grid)} runs in the grid, {len(grid) - len(todo)} already in {out}, {len(todo)} to run", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    failures = 0
    t_grid = time.time()
    packages = package_versions()
    for i, (m, d, s, seed, ds) in enumerate(todo, 1):
        name = f"{m}-{a.variant}" if a.variant else m
        where = f" data seed {ds}" if ds else ""
        # the child runs in the repository; data seed 0 keeps the folder name of the records before --data-seeds
        root = Path(a.runs).resolve() / a.budget / f"{name}-{d}-{s}-seed{seed}{f'-dseed{ds}' if ds else ''}"
        args = run_args(m, d, s, seed, a.budget, root, [*a.override, *([f"data.init_args.seed={ds}"] if ds else [])])
        result = root / "result.json"
        root.mkdir(parents=True, exist_ok=True)
        result.unlink(missing_ok=True)
        t0 = time.time()
        log = root / "log.txt"
        with open(log, "w") as fh:
            proc = subprocess.run([sys.executable, "-c", CHILD, str(result), *args], stdout=fh, stderr=subprocess.STDOUT,
                                  cwd=REPO, env={**os.environ, "WANDB_MODE": "disabled"})
        if proc.returncode != 0 or not result.is_file():
            failures += 1
            print(f"[{i}/{len(todo)}] {name} {d} {s} seed {seed}{where}: FAILED (exit {proc.returncode}), see {log}", flush=True)
            continue
        r = json.loads(result.read_text())
        record = {"method": m, **({"variant": a.variant} if a.variant else {}),
                  "dataset": d, "split": s, "seed": seed, "data_seed": ds, "budget": a.budget,
                  **{k: r.get(k) for k in METRICS},
                  "train_s": round(r["train_s"], 1), "wall_s": round(r["wall_s"], 1),
                  "peak_rss_mb": round(r["peak_rss_mb"]), "peak_gpu_mb": r["peak_gpu_mb"],
                  "n_train": r["n_train"], "n_test": r["n_test"], "eval_on": r["eval_on"],
                  "device": device_name(), "cpu": r.get("cpu"), "config_hash": config_hash(args), "version": clusterlight.__version__,
                  "packages": packages, "args": args[1:]}
        with open(out, "a") as fh:  # one whole line per run: an interrupted grid loses at most the run in flight
            fh.write(json.dumps(record) + "\n")
        print(f"[{i}/{len(todo)}] {name} {d} {s} seed {seed}{where}: acc {r.get('acc', float('nan')):.3f} "
              f"nmi {r.get('nmi', float('nan')):.3f} train {r['train_s']:.0f}s ({time.time() - t0:.0f}s with startup)",
              flush=True)
    print(f"bench: grid done in {time.time() - t_grid:.0f}s, {failures} failed", flush=True)
    return 1 if failures else 0


#: the packages whose versions go into every record: the same code and seed give other figures
#: under other releases of these (UMAP's layout, the mixture's EM, the network's kernels)
RECORDED_PACKAGES = ("torch", "lightning", "numpy", "scipy", "scikit-learn", "umap-learn", "pynndescent", "numba")


def package_versions() -> dict[str, str | None]:
    """The installed version of each of :data:`RECORDED_PACKAGES` (``None``: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in RECORDED_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


# ----------------------------------------------------------------------------------------- report
def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def aggregate(records: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """(budget, dataset, split, method) -> {metric: (mean, std, n)}, plus wall/memory means."""
    cells: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        cells[(r["budget"], r["dataset"], r["split"], label(r))].append(r)
    out = {}
    for cell, rs in cells.items():
        agg: dict[str, Any] = {"n": len(rs)}
        for k in [*METRICS, "train_s", "peak_rss_mb"]:
            vals = [float(r[k]) for r in rs if r.get(k) is not None]
            if vals:
                agg[k] = _mean_std(vals)
        agg["data_seeds"] = sorted({data_seed(r) for r in rs})
        agg["n_train"] = rs[0].get("n_train")
        agg["device"] = rs[0].get("device")
        out[cell] = agg
    return out


def _fmt(agg: dict[str, Any], k: str) -> str:
    if k not in agg:
        return ""
    m, sd = agg[k]
    return f"{m:.3f} ± {sd:.3f}" if agg["n"] > 1 else f"{m:.3f}"


def _runs(agg: dict[str, Any]) -> str:
    """The report's last column: the number of runs, and their split seeds unless all are 0."""
    seeds = agg.get("data_seeds") or [0]
    return str(agg["n"]) if seeds == [0] else f"{agg['n']} (data seeds {', '.join(map(str, seeds))})"


def markdown(records: list[dict[str, Any]]) -> str:
    agg = aggregate(records)
    order = {m: i for i, m in enumerate(METHODS)}
    lines = []
    for budget in sorted({c[0] for c in agg}):
        lines += [f"### Budget `{budget}`", "",
                  "| dataset | split | method | ACC | NMI | NMI (geo) | ARI | tail ACC | cluster KL | OOD AUROC | train s | peak RSS MB | seeds |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        cells = sorted((c for c in agg if c[0] == budget),
                       key=lambda c: (c[1], list(SPLITS).index(c[2]) if c[2] in SPLITS else 99,
                                      order.get(c[3].split("[")[0], 99), c[3]))
        for c in cells:
            a = agg[c]
            lines.append(f"| {c[1]} | {c[2]} | {c[3]} | " + " | ".join(_fmt(a, k) for k in METRICS) +
                         f" | {a['train_s'][0]:.0f} | {a['peak_rss_mb'][0]:.0f} | {_runs(a)} |")
        lines.append("")
    # only cells measured on the same split seeds (class orders) at both budgets
    both = sorted(c[1:] for c in agg if c[0] == "fast" and ("paper", *c[1:]) in agg
                  and agg[c]["data_seeds"] == agg[("paper", *c[1:])]["data_seeds"])
    if both:
        lines += ["### `fast` against `paper` budget", "",
                  ("Cells run at both budgets on the same split seeds. **far below** marks a `fast` ACC more than "
                   f"{FAR_BELOW:.2f} under the `paper` one."),
                  "", "| dataset | split | method | fast ACC | paper ACC | paper - fast | |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for d, s, m in both:
            fast, paper = agg[("fast", d, s, m)]["acc"][0], agg[("paper", d, s, m)]["acc"][0]
            flag = "**far below**" if paper - fast > FAR_BELOW else ""
            lines.append(f"| {d} | {s} | {m} | {fast:.3f} | {paper:.3f} | {paper - fast:+.3f} | {flag} |")
        lines.append("")
    papers = [(m, d, v) for (m, d), v in PAPER.items()]
    if papers:
        lines += ["### The papers' numbers (labels in their loops; their dataset versions)", "",
                  "| method | dataset | paper ACC | paper NMI | source and dataset version |", "| --- | --- | --- | --- | --- |"]
        for m, d, (acc, nmi, note) in papers:
            lines.append(f"| {m} | {d} | {'' if acc is None else f'{acc:.3f}'} | {'' if nmi is None else f'{nmi:.3f}'} | {note} |")
        lines.append("")
    devices = sorted({r.get("device", "?") for r in records})
    lines.append(f"Device(s): {', '.join(devices)}. Mean ± sample std over seeds (training seeds, and the split "
                 "seeds the last column names); train s and peak RSS are means.")
    return "\n".join(lines)


def imbalance_figure(records: list[dict[str, Any]], path: Path) -> None:
    """ACC and tail accuracy against the imbalance ratio (1 = balanced), one line per method, per dataset.

    One budget per figure: ``fast`` when the records have it.
    """
    from matplotlib.figure import Figure

    ratio = {"balanced": 1, "lt10": 10, "lt100": 100}
    budgets = {r["budget"] for r in records}
    budget = "fast" if "fast" in budgets else sorted(budgets)[0]  # one budget per figure
    agg = aggregate([r for r in records if r["split"] in ratio and r["budget"] == budget])
    datasets = sorted({c[1] for c in agg})
    if not datasets:
        raise SystemExit("error: no balanced or long-tailed records to plot")
    fig = Figure(figsize=(4.2 * len(datasets), 7))
    axes = fig.subplots(2, len(datasets), squeeze=False)
    for j, d in enumerate(datasets):
        for i, (k, name) in enumerate((("acc", "ACC"), ("tail_acc", "tail ACC"))):
            ax = axes[i][j]
            for m in METHODS:
                pts = sorted((ratio[c[2]], agg[c][k]) for c in agg if c[1] == d and c[3] == m and k in agg[c])
                if pts:
                    xs = [p[0] for p in pts]
                    ax.errorbar(xs, [p[1][0] for p in pts], yerr=[p[1][1] for p in pts], marker="o", capsize=3, label=m)
            ax.set_xscale("log")
            ax.set_xlabel("imbalance ratio")
            ax.set_ylabel(name)
            ax.set_title(f"{d}: {name}")
            ax.set_ylim(0, 1)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


README_BEGIN = "<!-- bench report: begin (generated by `clusterlight bench report --readme`; do not edit) -->"
README_END = "<!-- bench report: end -->"


def update_readme(readme: Path, text: str) -> None:
    """Replace the text between the README's bench-report markers (written atomically)."""
    old = readme.read_text()
    if old.count(README_BEGIN) != 1 or old.count(README_END) != 1 or old.index(README_BEGIN) > old.index(README_END):
        raise SystemExit(f"error: {readme} needs exactly one pair of lines {README_BEGIN!r} ... {README_END!r}")
    head, rest = old.split(README_BEGIN)
    _, tail = rest.split(README_END)
    tmp = readme.with_name(readme.name + ".tmp")
    tmp.write_text(f"{head}{README_BEGIN}\n{text}\n{README_END}{tail}")
    os.replace(tmp, readme)


def load_results(results: list[str]) -> list[dict[str, Any]]:
    """The records of every results file, in order; a one-line error for a missing file or a line
    that is not a bench record."""
    paths = [Path(p) for p in results]
    for p in paths:
        if not p.is_file():
            raise SystemExit(f"error: results file {p} does not exist (make it with `clusterlight bench run --out {p}`)")
    records = []
    for p in paths:
        for n, r in enumerate(read_records(p), 1):
            missing = [k for k in ("method", "dataset", "split", "seed", "budget") if k not in r]
            if missing:
                raise SystemExit(f"error: {p}: record {n} is not a bench record (no {', '.join(missing)})")
            records.append(r)
    return records


def report(a: argparse.Namespace) -> int:
    records = load_results(a.results)
    if not records:
        raise SystemExit(f"error: no records in {' '.join(a.results)}")
    if a.readme and not Path(a.readme).is_file():
        raise SystemExit(f"error: README {a.readme} does not exist")
    text = markdown(records)
    if a.figure:
        imbalance_figure(records, Path(a.figure))

    def with_figure(page: Path | None) -> str:
        """The tables, then the figure linked relative to the page that shows it (as given when printed)."""
        if not a.figure:
            return text
        link = Path(a.figure) if page is None else Path(os.path.relpath(Path(a.figure).resolve(), page.resolve().parent))
        return f"{text}\n\n![ACC and tail ACC against the imbalance ratio]({link.as_posix()})"

    if a.markdown:
        Path(a.markdown).write_text(with_figure(Path(a.markdown)) + "\n")
    if a.readme:
        command = "clusterlight bench report " + " ".join(a.results) + (f" --figure {a.figure}" if a.figure else "") + \
            f" --readme {a.readme}"
        update_readme(Path(a.readme), f"Generated by `{command}` from {len(records)} records.\n\n{with_figure(Path(a.readme))}")
    if not (a.markdown or a.readme):
        print(with_figure(None))
    return 0


# ---------------------------------------------------------------------------------------- compare
COMPARE_METRICS = ["acc", "nmi", "ari", "tail_acc", "ood_auroc"]


def parse_side(spec: str) -> tuple[str, set[str]]:
    """``method`` or ``method:variant[,variant...]`` -> (method, variants); ``""`` is the unlabelled records."""
    method, colon, variants = spec.partition(":")
    if method not in METHODS:
        raise SystemExit(f"error: --a/--b takes METHOD[:VARIANT[,VARIANT...]] with METHOD one of {', '.join(METHODS)}, got {spec!r}")
    names = set(variants.split(",")) if colon else {""}
    bad = sorted(v for v in names if v and not re.fullmatch(r"[A-Za-z0-9_.+-]+", v))
    if bad:
        raise SystemExit(f"error: variant names take letters, digits and _.+- only, got {bad[0]!r} in {spec!r}")
    return method, names


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test (ties dropped): ``P(X <= min) + P(X >= max)`` for X ~ Binomial(n, 1/2), at most 1."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def paired_t_interval(diffs: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """The paired-t interval of the mean difference (``None`` below two pairs)."""
    n = len(diffs)
    if n < 2:
        return None
    from scipy.stats import t

    mean, sd = _mean_std(diffs)
    half = float(t.ppf(0.5 + level / 2.0, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half


def pair_records(records: list[dict[str, Any]], a: tuple[str, set[str]], b: tuple[str, set[str]],
                 any_machine: bool = False) -> dict[tuple, list[tuple[dict[str, Any], dict[str, Any]]]]:
    """(budget, dataset, split) -> the pairs (record of a, record of b) of the same seed, data seed (and machine).

    A record's machine is its ``cpu`` field (``""`` when it has none: such records pair only with
    each other). Two records of one side with the same cell, seed, data seed (and machine) are an error: name
    the variants so that one is left.
    """
    sides: list[dict[tuple, dict[tuple, dict[str, Any]]]] = [defaultdict(dict), defaultdict(dict)]
    for r in records:
        for side, (method, variants) in zip(sides, (a, b)):
            if r["method"] != method or (r.get("variant") or "") not in variants:
                continue
            cell = (r["budget"], r["dataset"], r["split"])
            k = (int(r["seed"]), data_seed(r)) + (() if any_machine else (r.get("cpu") or "",))
            if k in side[cell]:
                where = "" if any_machine else f" on {k[2] or 'an unnamed machine'}"
                order = f" data seed {k[1]}" if k[1] else ""
                raise SystemExit(f"error: two records of {label(r)} ({label(side[cell][k])} too) for {' '.join(cell[1:])} "
                                 f"{cell[0]} seed {k[0]}{order}{where}: name fewer variants")
            side[cell][k] = r
    out = {}
    for cell in sorted(set(sides[0]) & set(sides[1])):
        keys = sorted(set(sides[0][cell]) & set(sides[1][cell]))
        if keys:
            out[cell] = [(sides[0][cell][k], sides[1][cell][k]) for k in keys]
    return out


def compare_markdown(pairs: dict[tuple, list[tuple[dict[str, Any], dict[str, Any]]]], a: str, b: str,
                     metrics: list[str], any_machine: bool = False) -> str:
    """One row per cell and metric: means, mean difference, its paired-t interval, wins, sign test."""
    where = "" if any_machine else " on the same machine"
    head = (f"A = `{a}`, B = `{b}`; pairs of the same training and data seed{where}; 95% interval of the mean difference: paired t; "
            "sign test: two-sided, ties dropped.")
    lines = [head, "",
             "| budget | dataset | split | metric | pairs | A | B | A − B | 95% interval | A higher | sign test p |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (budget, dataset, split), ps in pairs.items():
        for m in metrics:
            both = [(float(ra[m]), float(rb[m])) for ra, rb in ps if ra.get(m) is not None and rb.get(m) is not None]
            if not both:
                continue
            diffs = [x - y for x, y in both]
            wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
            ties = len(diffs) - wins - losses
            ci = paired_t_interval(diffs)
            mean_a, mean_b = _mean_std([x for x, _ in both])[0], _mean_std([y for _, y in both])[0]
            lines.append(f"| {budget} | {dataset} | {split} | {m} | {len(both)} | {mean_a:.3f} | {mean_b:.3f} | "
                         f"{mean_a - mean_b:+.3f} | {'' if ci is None else f'[{ci[0]:+.3f}, {ci[1]:+.3f}]'} | "
                         f"{wins} of {len(both)}{f' ({ties} tied)' if ties else ''} | {sign_test_p(wins, losses):.3f} |")
    return "\n".join(lines)


def compare(a: argparse.Namespace) -> int:
    side_a, side_b = parse_side(a.a), parse_side(a.b)
    unknown = sorted(set(a.metrics) - set(METRICS))
    if unknown:
        raise SystemExit(f"error: --metrics takes names of {', '.join(METRICS)}, got {', '.join(unknown)}")
    records = [r for r in load_results(a.results)
               if (a.budget is None or r["budget"] == a.budget) and (not a.datasets or r["dataset"] in a.datasets)
               and (not a.splits or r["split"] in a.splits) and (not a.data_seeds or data_seed(r) in a.data_seeds)
               and (not a.seeds or int(r["seed"]) in a.seeds)]
    pairs = pair_records(records, side_a, side_b, a.any_machine)
    if not pairs:
        raise SystemExit(f"error: no seed has records of both {a.a} and {a.b}"
                         f"{'' if a.any_machine else ' on one machine (--any-machine pairs across machines)'}")
    text = compare_markdown(pairs, a.a, a.b, a.metrics, a.any_machine)
    if a.markdown:
        Path(a.markdown).write_text(text + "\n")
    else:
        print(text)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clusterlight bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a grid, appending one JSON record per run (already recorded runs are skipped)")
    r.add_argument("--budget", choices=BUDGETS, default="fast")
    r.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    r.add_argument("--datasets", nargs="+", default=DATASETS, choices=sorted(NUM_CLASSES))
    r.add_argument("--splits", nargs="+", choices=list(SPLITS), default=["balanced", "lt10"])
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (seed_everything)")
    r.add_argument("--data-seeds", nargs="+", type=int, default=[0], metavar="D",
                   help="split seeds (data.init_args.seed): each draws another class order of the long-tailed splits, "
                        "another sample cap and other held-out test images; every training seed runs on each")
    r.add_argument("--out", default="results/bench_fast.jsonl", help="results file (JSON lines)")
    r.add_argument("--runs", default="runs/bench", help="each run's checkpoints, figures and log go under this folder")
    r.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="a config option given to every run after the budget's, e.g. model.init_args.assignment=sinkhorn "
                        "(repeatable; needs --variant)")
    r.add_argument("--variant", default="", help="name of the overridden configs: records carry it and the report "
                                                 "shows the method as method[variant]")
    q = sub.add_parser("report", help="render results files as a Markdown table and an imbalance figure")
    q.add_argument("results", nargs="+")
    q.add_argument("--markdown", help="write the table here (default: print it)")
    q.add_argument("--figure", help="write the ACC / tail-ACC vs imbalance ratio figure (PNG) here")
    q.add_argument("--readme", help="replace the report between this README's bench-report markers")
    c = sub.add_parser("compare", help="pair two methods' records seed by seed: mean differences, 95%% intervals, sign tests")
    c.add_argument("results", nargs="+", help="bench results files (JSON lines of `bench run`)")
    c.add_argument("--a", required=True, metavar="METHOD[:VARIANT,...]",
                   help="the first side: a method's records of these variants (an empty name: the unlabelled ones; "
                        "default: only those), e.g. debiased:,rerun1206")
    c.add_argument("--b", required=True, metavar="METHOD[:VARIANT,...]", help="the second side, likewise")
    c.add_argument("--budget", choices=BUDGETS)
    c.add_argument("--datasets", nargs="+")
    c.add_argument("--splits", nargs="+")
    c.add_argument("--metrics", nargs="+", default=COMPARE_METRICS)
    c.add_argument("--seeds", nargs="+", type=int, help="only the records of these training seeds (default: all)")
    c.add_argument("--data-seeds", nargs="+", type=int, metavar="D",
                   help="only the records of these split seeds (default: all; pairs always share the split seed)")
    c.add_argument("--any-machine", action="store_true",
                   help="pair by training and split seed alone (default: also by machine, the records' cpu field)")
    c.add_argument("--markdown", help="write the table here (default: print it)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.command == "run":
        if a.budget == "fast":
            for m in a.methods:
                for d in a.datasets:
                    if d not in FAST[m]:
                        raise SystemExit(f"error: the fast budget has no schedule for {m} on {d}; use --budget paper")
        return run_grid(a)
    if a.command == "compare":
        return compare(a)
    return report(a)


if __name__ == "__main__":
    raise SystemExit(main())
