"""Training throughput and peak memory of every method: the Lightning Trainer against a plain PyTorch loop.

For each method, two kinds of run train the *same* network on the *same* batches:

* ``lightning``: ``Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
  max_epochs=-1)`` fits the method; the only callback is the step clock below (no clusterlight
  callbacks), which stops the fit after ``warmup + steps`` batches (``max_steps`` would count
  optimizer steps, two per batch for DebiasedClustering). Everything the base module does per step is included: ``training_step``
  (the non-finite loss check, ``self.log_dict(..., on_step=True, on_epoch=True)``), the methods'
  own ``self.log`` calls, Lightning's loop, hooks, optimizer wrapping and result collection.
* ``plain``: the same module class built with the same arguments after the same
  ``seed_everything`` (hence the same initial weights), the DataModule's own ``train_dataloader()``
  (the same ``GlobalBatchSampler``, ``set_epoch`` called every epoch as Lightning does: the same
  batches in the same order), and per batch ``fit_step(images, index, batch_idx)`` followed by
  ``zero_grad / backward / step`` of the optimizer(s) from the module's ``configure_optimizers()``.
  No Trainer is attached: the module's ``self.log`` calls return at once (Lightning warns and
  returns when no Trainer is registered; the warning is filtered), as a plain loop would not log.
  DebiasedClustering optimises manually (``self.optimizers()``, ``self.manual_backward``): the
  plain run binds ``module.optimizers`` to return the plain torch optimizers and
  ``module.manual_backward`` to ``loss.backward()``, so ``fit_step`` steps them itself (its
  ``grad_clip`` is ``None`` in the configs, so Lightning's ``on_before_optimizer_step`` clipping
  hook has nothing to do on either side). The other five methods use automatic optimisation.

**Phase measured.** The modules are built from ``configs/<method>/<dataset>.yaml`` (model
arguments, optimizer, batch size), with the overrides listed in ``METHODS`` below, and brought into
their *main* training phase before the first step, identically on both sides and outside the
timing (``prime_*``; the whole-split passes run in dataset order with the DataModule's batch size,
as ``compute_on_split`` does on one process):

* AEKMeans: reconstruction (its only training phase).
* DEC: phase 2, ``KL(P || Q)`` with trainable centres (``pretrain_epochs: 0``); the centres come
  from k-means (``init_n_init`` restarts) on the untrained encoder's embeddings and ``P`` is
  computed once over the training split, as DEC's first phase-2 epoch does.
* SPC: pseudo-label training after a labelling (members' heads on the agreed samples plus
  reconstruction). The labelling is the method's consensus (``consensus`` + ``select_agreed``)
  of per-member labelings, which come from k-means on each voter's latents instead of UMAP +
  HDBSCAN (the per-step cost depends only on which samples agree; the labelling itself is
  benchmarked by ``scripts/bench_scaling.py``). The agreed fraction is recorded.
* OnlineHardClustering: hard-assignment training (its only phase; random centroids, the default).
* JULE: the triplet loss of the first period, on the initial clusters (1-NN components of the
  normalised pixels, as ``JULE._initialise`` builds them).
* DebiasedClustering: co-training after pretraining (one R step and one C step per batch, two
  optimizers), after its ``init_clusters``: k-means (+ diagonal-Gaussian EM) responsibilities, both
  statistics pooling blocks, and with ``manifold: umap`` (the default) the clustering-space target
  and ``C``'s distillation onto it -- the target being a seeded random projection of R's
  standardised features instead of their UMAP embedding (same shape, same per-step lookup; UMAP's
  cost is benchmarked by ``scripts/bench_scaling.py``, component ``debiased_init``).

**Epoch-boundary clustering hooks** (DEC's target update, SPC's labelling, JULE's initialisation
and forward pass, DebiasedClustering's initialisation) are replaced by no-ops on the module
instance on *both* sides after priming: only training steps are timed, and a new target, labelling
or merge never changes the network between the two sides. Lightning's own epoch-boundary work
(``on_train_epoch_end``, epoch-level reduction of the ``on_epoch=True`` logs, a new data-loader
iterator) stays inside the timed window, as the plain loop's new iterator does.

**Timing.** A clock shared by both loops reads the wall time and the process CPU time after every
batch's optimizer step(s) (Lightning: ``Callback.on_train_batch_end``; plain: after
``optimizer.step()``). The window runs from the end of step ``warmup`` to the end of step
``warmup + steps``; ``images_per_s = steps * batch_size / window`` (wall), ``images_per_cpu_s`` the
same per CPU second. The CPU figures are kept because the two cores are shared: another process
slows a run's wall time much more than its CPU time. The median step time of the window is also kept.

**Memory.** ``peak_rss_mb`` is the run's process peak resident memory (``ru_maxrss``: imports, data,
priming and training); ``train_peak_over_base_mb`` is the peak resident memory while training
(``VmHWM``, reset through ``/proc/self/clear_refs`` just before ``fit``/the loop) minus the resident
memory at that moment (``VmRSS``), i.e. what training added. RSS, not ``tracemalloc``: PyTorch's
allocations are not traced by it.

**Isolation.** Every run is its own process (so its peak memory is its own; this parent process
imports neither torch nor clusterlight), with ``torch.set_num_threads(threads)`` and
``OMP/MKL/OPENBLAS/NUMBA_NUM_THREADS=threads``. For each method the two kinds alternate
(``lightning, plain`` then ``plain, lightning``, ...) for ``reps`` repetitions; the record keeps the
medians, and ``ratio`` is the median over repetitions of the paired ratio (lightning images/s ÷
plain images/s of the same repetition), ``overhead_pct = 100 * (1 / ratio - 1)``: the extra wall
time per step under Lightning (``ratio_cpu``/``overhead_pct_cpu``: the same from CPU time).
``losses_match`` says whether the losses of the first ``record_losses`` steps were bit-identical in
every run of both kinds (they are: same initial weights, same batches, same arithmetic). ``--diagnose`` adds a third kind, ``lightning_nolog``: the Lightning
run with the module's ``log``/``log_dict`` replaced by no-ops, which separates the cost of logging
from the rest of the Trainer.

    python scripts/bench_throughput.py --out results/throughput.jsonl [--methods AEKMeans DEC ...]
        [--dataset usps] [--steps 300] [--warmup 20] [--reps 3] [--threads 1] [--diagnose]
        [--steps_for SPC=100 JULE=400] [--reps_for JULE=5]
    python scripts/bench_throughput.py --probe --diagnose [--chunks 6] [--steps 50] [--steps_for SPC=15]
    python scripts/bench_throughput.py --report [--out results/throughput.jsonl]   # Markdown table(s)

**Probe (diagnosis).** On shared cores the load drifts over seconds, and one run's speed moves by
up to +-20 % from the next one's, far more than Lightning's per-step cost. ``--probe`` measures
that cost differently: one process per method holds one identically seeded and primed module per
kind and alternates them in chunks of ``--steps`` batches (``--chunks`` per kind; Lightning as a
fresh ``Trainer.fit`` per chunk, the plain loop resumed), so that the kinds of a chunk see the same
load; the overhead is the median of the paired per-chunk ratios (``results/throughput_probe.jsonl``;
no memory figures in this mode).

Not a test (minutes per method); ``tests/test_bench_scripts.py`` runs its smallest mode.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

#: method -> config folder, argument overrides (on top of configs/<folder>/<dataset>.yaml),
#: the config file to use instead of <dataset>.yaml (None: <dataset>.yaml), and the phase measured.
METHODS: dict[str, dict[str, Any]] = {
    "AEKMeans": {"folder": "ae_kmeans", "overrides": {}, "config": None,
                 "phase": "reconstruction (only phase)"},
    "DEC": {"folder": "dec", "overrides": {"pretrain_epochs": 0}, "config": None,
            "phase": "phase 2: KL to the target P, trainable centres"},
    "SPC": {"folder": "spc", "overrides": {}, "config": None,
            "phase": "pseudo-label training (heads + reconstruction) after a k-means consensus labelling"},
    "OnlineHardClustering": {"folder": "online_hard", "overrides": {}, "config": None,
                             "phase": "hard-assignment training (only phase)"},
    "JULE": {"folder": "jule", "overrides": {}, "config": None,
             "phase": "triplet loss, first period (1-NN pixel components)"},
    "DebiasedClustering": {"folder": "debiased", "overrides": {}, "config": None,
                           "phase": "co-training: R step + C step (two optimizers, manual) after init_clusters"},
}

#: the dataset's ``root`` when the config has none (Fashion-MNIST from the Debian package).
DEFAULT_ROOTS = {"fashion_mnist": "/usr/share/datasets/fashion-mnist"}

KINDS = ("lightning", "plain")


# ============================================================================== child process
def _rss_mb(field: str = "VmRSS") -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-memory high-water mark (``VmHWM``) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _optimizer_factory(spec: Any) -> Any:
    """A config's ``{class_path, init_args}`` optimizer to a factory ``params -> optimizer``."""
    import functools
    import importlib

    if not isinstance(spec, dict) or "class_path" not in spec:
        return spec
    module, _, name = spec["class_path"].rpartition(".")
    return functools.partial(getattr(importlib.import_module(module), name), **(spec.get("init_args") or {}))


def load_config(method: str, dataset: str) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """``(config path, model init_args, data init_args)`` of a method's config for ``dataset``."""
    import yaml

    spec = METHODS[method]
    path = REPO / "configs" / spec["folder"] / f"{spec['config'] or dataset}.yaml"
    cfg = yaml.safe_load(path.read_text())
    model = dict(cfg["model"].get("init_args") or {})
    model.update(spec["overrides"])
    data = dict(cfg["data"].get("init_args") or {})
    return path, model, data


class StepClock:
    """Wall and CPU time at the end of every step; the window is steps ``warmup+1 .. warmup+steps``.

    CPU time is the process's (``time.process_time``: every thread of it), which other processes
    on the shared cores barely change, unlike wall time.
    """

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.step = 0
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.faults: list[int] = []

    def tick(self) -> None:
        self.step += 1
        if self.step >= self.warmup:
            self.wall.append(time.perf_counter())
            self.cpu.append(time.process_time())
            if self.step in (self.warmup, self.warmup + self.steps):
                import resource

                self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)

    def minor_faults_per_step(self) -> float:
        """Minor page faults per timed step (fresh memory pages the allocator had to map)."""
        return (self.faults[-1] - self.faults[0]) / self.steps if len(self.faults) == 2 else float("nan")

    @property
    def total(self) -> int:
        return self.warmup + self.steps

    def window(self) -> dict[str, float]:
        """Window wall and CPU seconds, and the median step of each."""
        if len(self.wall) < self.steps + 1:
            raise RuntimeError(f"only {len(self.wall) - 1} of {self.steps} timed steps ran")
        out = {}
        for name, t in (("wall", self.wall[: self.steps + 1]), ("cpu", self.cpu[: self.steps + 1])):
            out[f"{name}_s"] = t[-1] - t[0]
            out[f"{name}_step_median_s"] = statistics.median(b - a for a, b in itertools.pairwise(t))
        return out


def _setup(args: dict[str, Any]) -> dict[str, Any]:
    """Threads, imports, the DataModule, and a factory of identically seeded, primed modules."""
    import warnings

    threads = int(args["threads"])
    import torch

    torch.set_num_threads(threads)
    import torch.nn.functional as F
    from lightning.pytorch import seed_everything

    from clusterlight import methods
    from clusterlight.data import ClusteringDataModule

    warnings.filterwarnings("ignore", message=".*self.log.*")  # plain runs: no Trainer registered
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning")
    method, dataset = args["method"], args["dataset"]
    config_path, model_args, data_args = load_config(method, dataset)
    batch_size = int(args["batch_size"] or data_args.get("batch_size", 256))
    root = args["root"] or data_args.get("root") or DEFAULT_ROOTS.get(dataset)

    seed_everything(int(args["seed"]), verbose=False)  # the training order's seed (PL_GLOBAL_SEED)
    dm = ClusteringDataModule(**{**data_args, "dataset": dataset, "root": root, "batch_size": batch_size})
    dm.setup("fit")
    kwargs = {k: _optimizer_factory(v) if k.startswith("optimizer") else v for k, v in model_args.items()}

    def make_module() -> tuple[Any, dict[str, Any]]:
        seed_everything(int(args["seed"]), verbose=False)  # the same initial weights on both sides
        module = getattr(methods, method)(num_clusters=dm.num_clusters, input_shape=dm.input_shape, **kwargs)

        @torch.no_grad()
        def split_outputs(fn: Any) -> torch.Tensor:
            """``fn`` over the whole training split in dataset order (``compute_on_split`` on one process)."""
            was = module.training
            module.eval()
            out = torch.cat([fn(batch["image"]).float() for batch in dm.embedding_dataloader("train")])
            module.train(was)
            return out

        return module, prime(method, module, split_outputs, torch, F)

    return {"torch": torch, "dm": dm, "batch_size": batch_size, "config_path": config_path, "threads": threads,
            "make_module": make_module}


def _no_log(module: Any) -> None:
    """``self.log``/``self.log_dict`` as no-ops on this instance (the ``lightning_nolog`` kind)."""
    module.log = lambda *a, **k: None
    module.log_dict = lambda *a, **k: None


def lightning_run(module: Any, dm: Any, clock: StepClock) -> None:
    """``Trainer.fit`` with the benchmark's flags, stopped by ``clock`` after ``clock.total`` batches."""
    from lightning.pytorch import Callback, Trainer

    class Clock(Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            clock.tick()
            if clock.step >= clock.total:
                trainer.should_stop = True

    # Stopped by the clock after `total` batches: Lightning's max_steps counts optimizer steps,
    # two per batch for DebiasedClustering's two optimizers.
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      num_sanity_val_steps=0, max_steps=-1, max_epochs=-1, callbacks=[Clock()])
    trainer.fit(module, datamodule=dm)
    if clock.step != clock.total:
        raise RuntimeError(f"Lightning ran {clock.step} batches, not {clock.total}")


def _child(args: dict[str, Any]) -> dict[str, Any]:
    """One run (``args["kind"]``), in its own process: build, prime, train, measure."""
    ctx = _setup(args)
    torch, dm, batch_size = ctx["torch"], ctx["dm"], ctx["batch_size"]
    method, kind = args["method"], args["kind"]
    module, info = ctx["make_module"]()
    n_train = len(dm.train_dataset)

    # Record the first losses (outside the timed window) on both sides.
    losses: list[float] = []
    fit_step = module.fit_step

    def recording_fit_step(images: Any, index: Any, batch_idx: int) -> Any:
        out = fit_step(images, index, batch_idx)
        if len(losses) < int(args["record_losses"]):
            value = out.get("loss") if isinstance(out, dict) else out
            losses.append(float("nan") if value is None else float(value.detach()))
        return out

    module.fit_step = recording_fit_step
    if kind == "lightning_nolog":
        _no_log(module)

    clock = StepClock(int(args["warmup"]), int(args["steps"]))
    rss_base = _rss_mb()
    maxrss_before = _maxrss_mb()
    peak_reset = _reset_peak_rss()
    t_start = time.perf_counter()
    if kind in ("lightning", "lightning_nolog"):
        lightning_run(module, dm, clock)
    elif kind == "plain":
        plain_loop(module, dm, clock, torch)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    total_s = time.perf_counter() - t_start
    win = clock.window()
    train_peak = _rss_mb("VmHWM") if peak_reset else None
    return {
        "method": method, "kind": kind, "dataset": args["dataset"],
        "config": str(ctx["config_path"].relative_to(REPO)),
        "overrides": METHODS[method]["overrides"], "phase": METHODS[method]["phase"], "batch_size": batch_size,
        "train_samples": n_train, "warmup": clock.warmup, "steps": clock.steps, "seed": int(args["seed"]),
        "window_s": round(win["wall_s"], 4), "window_cpu_s": round(win["cpu_s"], 4),
        "step_ms_median": round(win["wall_step_median_s"] * 1000, 3),
        "step_cpu_ms_median": round(win["cpu_step_median_s"] * 1000, 3),
        "images_per_s": round(clock.steps * batch_size / win["wall_s"], 2),
        "images_per_cpu_s": round(clock.steps * batch_size / win["cpu_s"], 2), "run_s": round(total_s, 2),
        "minor_faults_per_step": round(clock.minor_faults_per_step(), 1),
        "first_losses": losses, "peak_rss_mb": round(max(maxrss_before, _maxrss_mb()), 1),
        "rss_base_mb": None if rss_base is None else round(rss_base, 1),
        "train_peak_over_base_mb": None if train_peak is None or rss_base is None else round(train_peak - rss_base, 1),
        "torch_threads": torch.get_num_threads(), "torch_threads_set": ctx["threads"],
        "torch": torch.__version__, **info,
    }


def _probe(args: dict[str, Any]) -> dict[str, Any]:
    """Diagnosis (``--probe``): the kinds alternate in chunks of ``steps`` batches inside one process.

    One module per kind (identically seeded and primed); chunk ``c`` runs every kind once (order
    alternating), Lightning as a fresh ``Trainer.fit`` of its module, the plain loop resumed where
    it stopped. Load that drifts over seconds then hits the kinds of one chunk alike, so the paired
    per-chunk ratios are far less noisy than separate processes; memory is not measured here.
    """
    ctx = _setup(args)
    torch, dm, batch_size = ctx["torch"], ctx["dm"], ctx["batch_size"]
    kinds = list(args["kinds"])
    modules = {}
    for kind in kinds:
        modules[kind] = ctx["make_module"]()[0]
        if kind == "lightning_nolog":
            _no_log(modules[kind])
    plain = plain_steps(modules["plain"], dm, torch) if "plain" in kinds else None
    chunks: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
    for c in range(int(args["chunks"])):
        for kind in kinds if c % 2 == 0 else kinds[::-1]:
            clock = StepClock(1, int(args["steps"]))
            if kind == "plain":
                assert plain is not None
                for _ in range(clock.total):
                    next(plain)
                    clock.tick()
            else:
                lightning_run(modules[kind], dm, clock)
            chunks[kind].append(clock.window())
    out: dict[str, Any] = {"method": args["method"], "dataset": args["dataset"], "batch_size": batch_size,
                           "mode": "probe", "chunks": int(args["chunks"]), "steps_per_chunk": int(args["steps"]),
                           "torch_threads": torch.get_num_threads()}
    for kind in kinds:
        out[f"step_ms_{kind}"] = round(statistics.median(ch["wall_s"] for ch in chunks[kind]) / int(args["steps"])
                                       * 1000, 3)
        out[f"step_cpu_ms_{kind}"] = round(statistics.median(ch["cpu_s"] for ch in chunks[kind])
                                           / int(args["steps"]) * 1000, 3)
    for kind in kinds:
        if kind == "plain":
            continue
        for clk, key in (("wall_s", "overhead_pct"), ("cpu_s", "overhead_pct_cpu")):
            pairs = [a[clk] / b[clk] - 1 for a, b in zip(chunks[kind], chunks["plain"])]
            suffix = "" if kind == "lightning" else "_nolog"
            out[f"{key}{suffix}"] = round(100 * statistics.median(pairs), 2)
            out[f"{key}{suffix}_chunks"] = [round(100 * v, 1) for v in pairs]
        extra = [(a["wall_s"] - b["wall_s"]) / int(args["steps"]) * 1000
                 for a, b in zip(chunks[kind], chunks["plain"])]
        out[f"extra_ms_per_step{'' if kind == 'lightning' else '_nolog'}"] = round(statistics.median(extra), 3)
    return out


def plain_steps(module: Any, dm: Any, torch: Any) -> Any:
    """The plain PyTorch loop as a generator, one training step per ``next()``: the DataModule's
    training loader (``set_epoch`` every epoch), ``fit_step``, then zero_grad/backward/step of the
    optimizers of ``configure_optimizers()`` (manual optimisation: ``fit_step`` steps them itself)."""
    config = module.configure_optimizers()
    if isinstance(config, dict):
        config = config["optimizer"]
    if isinstance(config, tuple) and len(config) == 2 and isinstance(config[0], list):
        config = config[0]  # ([optimizers], [schedulers]); no scheduler in the configs benchmarked
    optimizers = list(config) if isinstance(config, (list, tuple)) else [config]
    manual = not module.automatic_optimization
    if manual:  # what Lightning provides to a manually optimised fit_step, without a Trainer
        module.optimizers = lambda use_pl_optimizer=True: optimizers[0] if len(optimizers) == 1 else optimizers
        module.manual_backward = lambda loss, *a, **k: loss.backward(*a, **k)
    module.train()
    loader = dm.train_dataloader()
    sampler = loader.sampler
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        for batch_idx, batch in enumerate(loader):
            out = module.fit_step(batch["image"], batch["index"], batch_idx)
            if not manual and isinstance(out, torch.Tensor):
                for opt in optimizers:
                    opt.zero_grad()
                out.backward()
                for opt in optimizers:
                    opt.step()
            yield
        epoch += 1


def plain_loop(module: Any, dm: Any, clock: StepClock, torch: Any) -> None:
    """``clock.total`` steps of :func:`plain_steps`, ticking ``clock`` after each."""
    steps = plain_steps(module, dm, torch)
    while clock.step < clock.total:
        next(steps)
        clock.tick()


# ------------------------------------------------------------------------------ priming
def _disable(module: Any, *hooks: str) -> None:
    """Replace epoch-boundary clustering hooks by no-ops on this instance (both sides)."""
    for name in hooks:
        setattr(module, name, lambda *a, **k: None)


def prime(method: str, module: Any, split_outputs: Any, torch: Any, F: Any) -> dict[str, Any]:
    """Bring ``module`` into its main training phase (the same on both sides); returns what was done."""
    from clusterlight.cluster.kmeans import kmeans

    k = module.num_clusters
    if method == "DEC":
        from clusterlight.methods.dec import target_distribution

        z = split_outputs(module.embed)
        centers = kmeans(z, k, n_init=module.init_n_init, max_iter=module.kmeans_max_iter,
                         seed=module.kmeans_seed).centers
        with torch.no_grad():
            module.centers.copy_(centers)
            module.centers_fitted.fill_(True)
            module.clustering_started.fill_(True)
            q = module.soft_assign(z)[0]
        module._target, module._target_labels = target_distribution(q).detach(), q.argmax(1)
        _disable(module, "on_train_epoch_start")
        return {"primed": "k-means centres + target P over the split"}
    if method == "SPC":
        import numpy as np

        from clusterlight.cluster.consensus import consensus, select_agreed

        lat = split_outputs(module.embed).view(-1, module.num_members, module.latent_dim).numpy()
        labelings = np.stack([kmeans(torch.from_numpy(np.ascontiguousarray(x)), k, n_init=1, seed=module.seed + v)
                              .labels.numpy() for v, x in enumerate(module._voter_latents(lat))])
        aligned, labels, agreement = consensus(labelings, k, module.pivot, module.consensus_iters)
        mask = select_agreed(aligned, module.agreement_threshold)
        module.pseudo_labels = torch.from_numpy(labels).long()
        module.agreed_mask = torch.from_numpy(mask).bool()
        module.agreement = torch.from_numpy(agreement).float()
        module.labelling_version = 1
        module.labelled.fill_(True)
        _disable(module, "on_train_epoch_start")
        return {"primed": "k-means labelings per voter + consensus", "agreed_fraction": round(float(mask.mean()), 4),
                "num_members": module.num_members}
    if method == "JULE":
        from clusterlight.cluster.agglomerative import build_graph, initial_clusters

        z = split_outputs(lambda x: F.normalize(x.flatten(1).float(), dim=1))
        labels = initial_clusters(build_graph(z, module.k_s, keep_features=False).indices)
        if int(labels.max()) + 1 < k:
            labels = torch.arange(z.shape[0])
        module._labels, module._period, module._period_start = labels.long(), 1, 0
        module._finished = module.num_current_clusters <= k
        _disable(module, "on_train_epoch_start", "on_train_batch_end")
        return {"primed": "1-NN components of the pixels", "clusters": module.num_current_clusters}
    if method == "DebiasedClustering":
        # init_clusters, with one stand-in: under manifold "umap" the clustering-space target is a
        # seeded random projection of R's standardised features (not UMAP: its numba compilation
        # and run would dominate every run; the per-step cost is the same lookup either way, and
        # UMAP's own cost is in scripts/bench_scaling.py, component debiased_init).
        z_r = split_outputs(module.representation.encode)
        manifold = getattr(module, "manifold", "none") == "umap"
        space = z_r
        if manifold:
            gen = torch.Generator().manual_seed(module.kmeans_seed)
            x = (z_r - z_r.mean(0)) / z_r.std(0).clamp_min(1e-6)
            target = x @ torch.randn(x.shape[1], module.manifold_target.shape[1], generator=gen)
            module.manifold_target = ((target - target.mean(0)) / target.std(0).clamp_min(1e-6)).float()
            space = module.manifold_target
        resp = F.one_hot(kmeans(space, k, n_init=module.kmeans_n_init, seed=module.kmeans_seed).labels, k).float()
        if getattr(module, "gmm_iters", 0) > 0:
            from clusterlight.cluster.mixture import diag_gmm_em

            resp = diag_gmm_em(space, resp, iters=module.gmm_iters)[0]
        module.spb_r.reset_from(z_r, resp)
        if manifold:
            module._distill(z_r, module.manifold_target)
        z_c = split_outputs(lambda x: module._cluster_space(module.representation.encode(x)))
        module.spb_c.reset_from(z_c, resp)
        module.clustering_started.fill_(True)
        _disable(module, "on_train_epoch_start")
        return {"primed": "init_clusters" + (" (manifold target: random projection, not UMAP)" if manifold else ""),
                "manifold": getattr(module, "manifold", None)}
    return {"primed": "nothing (single training phase)"}


# ============================================================================== parent process
def run_child(args: dict[str, Any], flag: str = "--child") -> dict[str, Any]:
    threads = str(args["threads"])
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads,
               NUMBA_NUM_THREADS=threads, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, __file__, flag, json.dumps(args)], capture_output=True, text=True,
                          cwd=REPO, env=env, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{args['method']} ({args.get('kind', 'probe')}) failed with exit status {proc.returncode}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def summarise(method: str, runs: dict[str, list[dict[str, Any]]], reps: int) -> dict[str, Any]:
    """One JSON record per method from its runs (medians; paired ratios)."""
    lit, pln = runs["lightning"], runs["plain"]
    ratios = [a["images_per_s"] / b["images_per_s"] for a, b in zip(lit, pln)]
    ratio = _median(ratios)
    ratios_cpu = [a["images_per_cpu_s"] / b["images_per_cpu_s"] for a, b in zip(lit, pln)]
    ratio_cpu = _median(ratios_cpu)
    first = lit[0]
    rec: dict[str, Any] = {
        "method": method, "dataset": first["dataset"], "config": first["config"], "overrides": first["overrides"],
        "phase": first["phase"], "batch_size": first["batch_size"], "train_samples": first["train_samples"],
        "warmup": first["warmup"], "steps": first["steps"], "reps": reps,
        "images_per_s_lightning": round(_median([r["images_per_s"] for r in lit]), 1),
        "images_per_s_plain": round(_median([r["images_per_s"] for r in pln]), 1),
        "ratio": round(ratio, 4), "overhead_pct": round(100 * (1 / ratio - 1), 2),
        "ratios": [round(r, 4) for r in ratios],
        "images_per_cpu_s_lightning": round(_median([r["images_per_cpu_s"] for r in lit]), 1),
        "images_per_cpu_s_plain": round(_median([r["images_per_cpu_s"] for r in pln]), 1),
        "ratio_cpu": round(ratio_cpu, 4), "overhead_pct_cpu": round(100 * (1 / ratio_cpu - 1), 2),
        "ratios_cpu": [round(r, 4) for r in ratios_cpu],
        "step_ms_lightning": round(_median([r["step_ms_median"] for r in lit]), 3),
        "step_ms_plain": round(_median([r["step_ms_median"] for r in pln]), 3),
        "step_cpu_ms_lightning": round(_median([r["step_cpu_ms_median"] for r in lit]), 3),
        "step_cpu_ms_plain": round(_median([r["step_cpu_ms_median"] for r in pln]), 3),
        "peak_rss_mb_lightning": round(_median([r["peak_rss_mb"] for r in lit]), 1),
        "peak_rss_mb_plain": round(_median([r["peak_rss_mb"] for r in pln]), 1),
    }
    for kind, rs in (("lightning", lit), ("plain", pln)):
        vals = [r["train_peak_over_base_mb"] for r in rs if r["train_peak_over_base_mb"] is not None]
        rec[f"train_peak_over_base_mb_{kind}"] = round(_median(vals), 1) if vals else None
    if "lightning_nolog" in runs:
        nolog = runs["lightning_nolog"]
        r_nolog = _median([a["images_per_s"] / b["images_per_s"] for a, b in zip(nolog, pln)])
        r_nolog_cpu = _median([a["images_per_cpu_s"] / b["images_per_cpu_s"] for a, b in zip(nolog, pln)])
        rec["images_per_s_lightning_nolog"] = round(_median([r["images_per_s"] for r in nolog]), 1)
        rec["overhead_pct_nolog"] = round(100 * (1 / r_nolog - 1), 2)
        rec["overhead_pct_cpu_nolog"] = round(100 * (1 / r_nolog_cpu - 1), 2)
    rec["first_losses_lightning"] = first["first_losses"]
    rec["first_losses_plain"] = pln[0]["first_losses"]
    # the same network on the same batches: the first losses agree bit for bit in every run
    rec["losses_match"] = all(r["first_losses"] == first["first_losses"] for rs in runs.values() for r in rs)
    rec["torch_threads"] = first["torch_threads"]
    rec["torch_threads_plain"] = pln[0]["torch_threads"]
    for key in ("agreed_fraction", "num_members", "clusters", "primed", "manifold"):
        if key in first:
            rec[key] = first[key]
    rec["torch"] = first["torch"]
    rec["cpu_count"] = os.cpu_count()
    rec["load_avg_1min_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None  # after the runs
    rec["runs"] = {kind: [{k: r[k] for k in ("images_per_s", "images_per_cpu_s", "step_ms_median",
                                             "step_cpu_ms_median", "peak_rss_mb", "train_peak_over_base_mb",
                                             "run_s")} for r in rs]
                   for kind, rs in runs.items()}
    return rec


def report(path: Path) -> str:
    """A Markdown table of the last record of each (method, dataset) in ``path``."""
    records: dict[tuple[str, str], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            records[(rec["dataset"], rec["method"])] = rec
    diag = any("overhead_pct_nolog" in r for r in records.values())
    head = ["method", "dataset", "batch", "steps x reps", "images/s Lightning", "images/s plain", "ratio",
            "overhead (wall)", "overhead (CPU time)", "peak RSS MB Lightning / plain",
            "training +MB Lightning / plain", "first losses equal"]
    if diag:
        head.append("overhead without self.log (wall / CPU)")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for (_, _), r in sorted(records.items(), key=lambda kv: (kv[0][0], list(METHODS).index(kv[0][1]))):
        def pct(value: float) -> str:
            return f"{value:+.1f}%" + (" **>10%**" if value > 10 else "")

        row = [r["method"], r["dataset"], str(r["batch_size"]), f"{r['steps']} x {r['reps']}",
               f"{r['images_per_s_lightning']:.0f}", f"{r['images_per_s_plain']:.0f}", f"{r['ratio']:.3f}",
               pct(r["overhead_pct"]), pct(r["overhead_pct_cpu"]),
               f"{r['peak_rss_mb_lightning']:.0f} / {r['peak_rss_mb_plain']:.0f}",
               f"{r['train_peak_over_base_mb_lightning']} / {r['train_peak_over_base_mb_plain']}",
               "yes" if r.get("losses_match") else "**no**"]
        if diag:
            row.append(f"{r['overhead_pct_nolog']:+.1f}% / {r['overhead_pct_cpu_nolog']:+.1f}%"
                       if "overhead_pct_nolog" in r else "")
        lines.append("| " + " | ".join(row) + " |")
    any_rec = next(iter(records.values()))
    lines.append("")
    lines.append(f"torch threads per run: {any_rec['torch_threads']}; {any_rec['cpu_count']} CPU cores; "
                 "medians over repetitions; ratio = median of the paired lightning/plain images/s (wall); "
                 "overhead = 1/ratio - 1, from wall time and from process CPU time; "
                 "training +MB = peak RSS during training over the RSS before it.")
    return "\n".join(lines)


def probe_report(path: Path) -> str:
    """A Markdown table of the last ``--probe`` record of each (method, dataset) in ``path``."""
    records: dict[tuple[str, str], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            records[(rec["dataset"], rec["method"])] = rec
    head = ["method", "dataset", "batch", "chunks x steps", "ms/step Lightning", "ms/step plain",
            "extra ms/step", "overhead (wall)", "overhead (CPU time)", "ms/step without self.log",
            "overhead without self.log (wall / CPU)", "per-chunk overheads (wall)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for (_, _), r in sorted(records.items(), key=lambda kv: (kv[0][0], list(METHODS).index(kv[0][1]))):
        nolog = "overhead_pct_nolog" in r
        flag = " **>10%**" if r["overhead_pct"] > 10 else ""
        lines.append("| " + " | ".join([
            r["method"], r["dataset"], str(r["batch_size"]), f"{r['chunks']} x {r['steps_per_chunk']}",
            f"{r['step_ms_lightning']:.2f}", f"{r['step_ms_plain']:.2f}", f"{r['extra_ms_per_step']:+.2f}",
            f"{r['overhead_pct']:+.1f}%{flag}", f"{r['overhead_pct_cpu']:+.1f}%",
            f"{r['step_ms_lightning_nolog']:.2f}" if nolog else "",
            f"{r['overhead_pct_nolog']:+.1f}% / {r['overhead_pct_cpu_nolog']:+.1f}%" if nolog else "",
            ", ".join(f"{v:+.0f}" for v in r["overhead_pct_chunks"]),
        ]) + " |")
    lines.append("")
    lines.append("Probe: the kinds alternate in chunks inside one process per method (medians over chunks; "
                 "overhead = median of the paired per-chunk time ratios - 1).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--dataset", default="usps")
    parser.add_argument("--root", default=None, help="dataset root (default: the config's, or a known location)")
    parser.add_argument("--batch_size", type=int, default=None, help="default: the config's")
    parser.add_argument("--steps", type=int, default=300, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps before the window")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each kind (interleaved)")
    parser.add_argument("--steps_for", nargs="*", default=[], metavar="METHOD=N",
                        help="per-method --steps, e.g. SPC=100 (slow steps) JULE=400 (fast steps)")
    parser.add_argument("--reps_for", nargs="*", default=[], metavar="METHOD=N", help="per-method --reps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record_losses", type=int, default=3, help="losses of the first steps to record")
    parser.add_argument("--diagnose", action="store_true",
                        help="also run Lightning with self.log/self.log_dict as no-ops (lightning_nolog)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "throughput.jsonl",
                        help="append one JSON record per method")
    parser.add_argument("--probe", action="store_true",
                        help="diagnosis instead: the kinds alternate in chunks of --steps batches inside one process "
                             "per method (no memory figures), records to --probe_out")
    parser.add_argument("--chunks", type=int, default=8, help="--probe: chunks per kind")
    parser.add_argument("--probe_out", type=Path, default=REPO / "results" / "throughput_probe.jsonl",
                        help="--probe: append one JSON record per method")
    parser.add_argument("--report", action="store_true",
                        help="print the Markdown table of --out (and of --probe_out if it exists) and exit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--probe_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))), flush=True)
        return
    if args.probe_child:
        print(json.dumps(_probe(json.loads(args.probe_child))), flush=True)
        return
    if args.report:
        print(report(args.out))
        if args.probe_out.exists():
            print()
            print(probe_report(args.probe_out))
        return
    if args.warmup < 1 or args.steps < 1 or args.reps < 1:
        parser.error("--warmup, --steps and --reps must be at least 1")
    kinds = list(KINDS) + (["lightning_nolog"] if args.diagnose else [])

    def per_method(items: list[str], option: str) -> dict[str, int]:
        out = {}
        for item in items:
            name, _, value = item.partition("=")
            if name not in METHODS or not value.isdigit() or int(value) < 1:
                parser.error(f"{option} takes METHOD=N with a method of {', '.join(METHODS)}, got {item!r}")
            out[name] = int(value)
        return out

    steps_for, reps_for = per_method(args.steps_for, "--steps_for"), per_method(args.reps_for, "--reps_for")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.probe:
        for method in args.methods:
            child = {"method": method, "kinds": kinds, "dataset": args.dataset, "root": args.root,
                     "batch_size": args.batch_size, "steps": steps_for.get(method, args.steps),
                     "chunks": args.chunks, "threads": args.threads, "seed": args.seed}
            rec = run_child(child, "--probe_child")
            print(f"{method:<22} probe: step {rec['step_ms_lightning']:.2f} ms Lightning, "
                  f"{rec['step_ms_plain']:.2f} ms plain: overhead {rec['overhead_pct']:+.1f}% "
                  f"(+{rec['extra_ms_per_step']:.2f} ms/step), CPU {rec['overhead_pct_cpu']:+.1f}%"
                  + (f"; without self.log {rec['overhead_pct_nolog']:+.1f}%" if "overhead_pct_nolog" in rec else ""),
                  flush=True)
            with args.probe_out.open("a") as f:
                f.write(json.dumps(rec) + "\n")
        return
    for method in args.methods:
        runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
        steps, reps = steps_for.get(method, args.steps), reps_for.get(method, args.reps)
        for rep in range(reps):
            order = kinds if rep % 2 == 0 else kinds[::-1]
            for kind in order:
                child = {"method": method, "kind": kind, "dataset": args.dataset, "root": args.root,
                         "batch_size": args.batch_size, "steps": steps, "warmup": args.warmup,
                         "threads": args.threads, "seed": args.seed, "record_losses": args.record_losses}
                rec = run_child(child)
                runs[kind].append(rec)
                print(f"{method:<22} rep {rep} {kind:<16} {rec['images_per_s']:>9.1f} images/s "
                      f"({rec['images_per_cpu_s']:>9.1f} per CPU s) step {rec['step_ms_median']:>8.2f} ms "
                      f"(CPU {rec['step_cpu_ms_median']:>8.2f} ms)  peak {rec['peak_rss_mb']:>7.1f} MB  "
                      f"(+{rec['train_peak_over_base_mb']} MB training)  run {rec['run_s']:.0f} s", flush=True)
        rec = summarise(method, runs, reps)
        print(f"{method}: ratio {rec['ratio']:.3f}, overhead {rec['overhead_pct']:+.1f}% "
              f"(CPU time: ratio {rec['ratio_cpu']:.3f}, overhead {rec['overhead_pct_cpu']:+.1f}%)", flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
