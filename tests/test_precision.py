"""Mixed precision: every method fits under ``--trainer.precision bf16-mixed`` on the CPU.

**What is compared.** The same tiny run (``METHOD_ARGS`` of ``conftest.py`` plus the ``entropy``
assignment of online hard clustering; ``digits`` capped at 400 samples: 360 for training, 40 for
validation; 3 epochs, seed 7) is fitted
at ``32-true`` and at ``bf16-mixed`` and tested on the held-out test split (359 images). Both runs
must complete (a non-finite training loss stops a run with an error), end with finite losses, and
give test ACC and NMI within the tolerances below.

**Tolerances, and why they are wide.** bfloat16 keeps about 3 significant digits, so the first
steps of the two runs already differ in the third digit; a clustering run turns such a
perturbation into different k-means restarts, UMAP layouts or merge orders, and borderline points
(or whole small clusters) change sides. Measured on this configuration (2-core x86-64 CPU, seeds
7, 8 and 9, every method): the largest |bf16 - fp32| difference of one pair of runs was 0.075 in
NMI and 0.145 in ACC (SPC: 0.154 NMI, 0.120 ACC); for the seed the test uses, 0.069 NMI / 0.145
ACC (AEKMeans) and 0.062 NMI (SPC). The fp32 runs of different seeds differ from each other by as
much (NMI range over the three seeds: up to 0.25 for SPC, ACC range up to 0.17 for JULE): bf16
perturbs a run about as much as another seed does. Hence, per pair of runs,
``|ΔNMI| <= 0.1`` and ``|ΔACC| <= 0.2`` (ACC moves in steps of a whole cluster under Hungarian
matching), and ``0.2`` / ``0.2`` for SPC (two members, UMAP + a Gaussian mixture on 360 points)
and for DebiasedClustering since its initial partition is a full-covariance Gaussian mixture on
UMAP (``init_partition: gmm``): its pairs differed by 0.008, 0.083 and 0.132 in NMI (seeds 7, 8,
9; 0.111 for seed 7 inside the test session), its fp32 runs by 0.19-0.36 NMI between seeds.
The slow test compares means over three seeds on the whole of ``digits`` (5 epochs), where the
methods cluster for real (fp32 NMI 0.18-0.79): ``|mean ΔNMI| <= 0.1`` and ``|mean ΔACC| <= 0.1``
(measured before `init_partition: gmm`: at most 0.064 and 0.048; the flagship passes it with the mixture start too). It leaves SPC out: its UMAP labelling makes those six runs
take several minutes.

**The checks that cannot pass by accident.** A run that silently stayed in float32 would match
its twin exactly, so the metric comparison alone proves nothing about bf16. A callback records
the dtypes of the outputs of every parametrised layer during training steps: the bf16 run must
show ``bfloat16`` (autocast was on), the 32-bit run only ``float32``. The clustering arithmetic
must stay float32 under autocast: the confidences and OOD scores of the test steps must be
float32 in both runs, and :func:`test_float32_regions_under_autocast` checks the distance,
mixture, pooling, triplet, k-means and kNN code against float32 references under autocast, and,
for the decorated functions, that without their guard autocast would have changed the result (so
that test can fail).
:func:`test_grad_scaler_with_manual_optimisation` runs DebiasedClustering's two optimizers with a
GradScaler (fp16 autocast on the CPU, the ``16-mixed`` code path of a GPU) and checks that
gradient clipping sees unscaled gradients.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from clusterlight.cli import main
from clusterlight.cluster.agglomerative import knn_graph
from clusterlight.cluster.kmeans import kmeans
from clusterlight.methods import DebiasedClustering
from clusterlight.methods.ae_kmeans import squared_distances
from clusterlight.methods.debiased import mixture_log_posterior
from clusterlight.methods.jule import weighted_triplet_loss
from clusterlight.nn.stats_pool import pooled_moments
from tests.conftest import METHOD_ARGS, base_args, data_args, slow_cases

PRECISION_ARGS: dict[str, list[str]] = {
    **METHOD_ARGS,
    "OnlineHardClustering-entropy": ["--model=OnlineHardClustering", "--model.widths=[16, 32]",
                                     "--model.latent_dim=16", "--model.assignment=entropy",
                                     "--model.centroid_init=kmeans", "--model.kmeans_n_init=1"],
}
#: Largest allowed |bf16 - fp32| of one pair of short runs: (NMI, ACC). See the module docstring.
TOLERANCE = {"default": (0.1, 0.2), "SPC": (0.2, 0.2), "DebiasedClustering": (0.2, 0.2),
             "DebiasedClustering-neighbours": (0.2, 0.2), "DebiasedClustering-augment": (0.2, 0.2)}
#: Largest allowed |mean bf16 - mean fp32| over three seeds (slow test): (NMI, ACC).
MEAN_TOLERANCE = (0.1, 0.1)


class PrecisionProbe(Callback):
    """Test helper: dtypes of layer outputs in training steps and of test-step outputs."""

    def __init__(self) -> None:
        self.layer_dtypes: set[torch.dtype] = set()
        self.eval_dtypes: set[torch.dtype] = set()
        self.fit_metrics: dict[str, float] = {}
        self._active = False
        self._handles: list = []

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for module in pl_module.modules():
            leaf = next(module.children(), None) is None
            if leaf and any(True for _ in module.parameters(recurse=False)):
                self._handles.append(module.register_forward_hook(self._record))

    def _record(self, module: torch.nn.Module, args: tuple, output: object) -> None:
        if self._active and isinstance(output, Tensor) and output.is_floating_point():
            self.layer_dtypes.add(output.dtype)

    def on_train_batch_start(self, *args: object) -> None:
        self._active = True

    def on_train_batch_end(self, *args: object) -> None:
        self._active = False

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: dict,
                          *args: object) -> None:
        for key in ("confidence", "ood_score"):
            if outputs.get(key) is not None:
                self.eval_dtypes.add(outputs[key].dtype)


def _fit(tmp_path: Path, method: str, precision: str, *, seed: int = 7, epochs: int = 3,
         max_samples: int | None = 400):
    options = {} if max_samples is None else {"max_samples": max_samples}
    cli = main(["fit", *PRECISION_ARGS[method], *data_args("digits", **options),
                *base_args(tmp_path, epochs=epochs, logger="none"), f"--seed_everything={seed}",
                f"--trainer.precision={precision}", "--test_after_fit=true",
                "--trainer.callbacks+=tests.test_precision.PrecisionProbe"])
    probe = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "PrecisionProbe")
    return cli, probe


def _check_run(cli, probe: PrecisionProbe, precision: str) -> dict[str, float]:
    assert cli.trainer.precision == precision
    assert math.isfinite(probe.fit_metrics["train/loss_epoch"]), probe.fit_metrics
    assert math.isfinite(float(cli.trainer.callback_metrics["test/loss"]))
    if precision == "bf16-mixed":
        assert torch.bfloat16 in probe.layer_dtypes, probe.layer_dtypes  # autocast really ran
    else:
        assert probe.layer_dtypes == {torch.float32}, probe.layer_dtypes
    # Confidences and OOD scores leave the (float32) clustering code as float32 (embeddings may be bf16).
    assert probe.eval_dtypes and probe.eval_dtypes <= {torch.float32}, probe.eval_dtypes
    test = cli.model.last_metrics["test"]
    assert all(math.isfinite(test[k]) for k in ("acc", "nmi")), test
    return test


#: Run only with ``-m slow``: ``DebiasedClustering-augment`` has the neighbour pairs too, and the
#: online method's neighbour pairs and soft assignments are options no shipped config sets (they use
#: ``hard`` assignments without pairs).
SLOW_PRECISION = ("DebiasedClustering-neighbours", "OnlineHardClustering-entropy", "OnlineHardClustering-sinkhorn",
                  "OnlineHardClustering-neighbours")


@pytest.mark.parametrize("method", slow_cases(sorted(PRECISION_ARGS), SLOW_PRECISION))
def test_bf16_mixed_matches_fp32(tmp_path: Path, method: str) -> None:
    full = _check_run(*_fit(tmp_path / "fp32", method, "32-true"), "32-true")
    bf16 = _check_run(*_fit(tmp_path / "bf16", method, "bf16-mixed"), "bf16-mixed")
    tol_nmi, tol_acc = TOLERANCE.get(method, TOLERANCE["default"])
    d_nmi, d_acc = bf16["nmi"] - full["nmi"], bf16["acc"] - full["acc"]
    assert abs(d_nmi) <= tol_nmi and abs(d_acc) <= tol_acc, (
        f"{method}: fp32 NMI {full['nmi']:.3f} ACC {full['acc']:.3f}, "
        f"bf16 NMI {bf16['nmi']:.3f} ACC {bf16['acc']:.3f}")


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(m for m in PRECISION_ARGS if m != "SPC"))
def test_bf16_mixed_matches_fp32_mean_of_seeds(tmp_path: Path, method: str) -> None:
    results: dict[str, list[dict[str, float]]] = {"32-true": [], "bf16-mixed": []}
    for seed in (7, 8, 9):
        for precision, runs in results.items():
            cli, probe = _fit(tmp_path / f"{precision}-{seed}", method, precision, seed=seed, epochs=5,
                              max_samples=None)
            runs.append(_check_run(cli, probe, precision))

    def mean(precision: str, key: str) -> float:
        return sum(r[key] for r in results[precision]) / len(results[precision])

    d_nmi = mean("bf16-mixed", "nmi") - mean("32-true", "nmi")
    d_acc = mean("bf16-mixed", "acc") - mean("32-true", "acc")
    assert abs(d_nmi) <= MEAN_TOLERANCE[0], (method, d_nmi, results)
    assert abs(d_acc) <= MEAN_TOLERANCE[1], (method, d_acc, results)


def test_float32_regions_under_autocast() -> None:
    """The clustering arithmetic gives float32 results equal to float32 references under autocast.

    ``__wrapped__`` is the function without its :func:`clusterlight.precision.float32_math`
    guard: under autocast it is measurably off, so this test would catch a lost guard.
    """
    g = torch.Generator().manual_seed(0)
    z = torch.randn(256, 10, generator=g) * 2 + 5
    centers = torch.randn(10, 10, generator=g) * 2 + 5
    var = torch.rand(10, 10, generator=g) + 0.5
    weights = torch.softmax(torch.randn(256, 10, generator=g), dim=1)
    cases = [
        (squared_distances, (z, centers)),
        (mixture_log_posterior, (z, centers, var, torch.full((10,), -math.log(10)))),
        (pooled_moments, (z, weights)),
    ]
    for fn, args in cases:
        ref = fn(*args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fn(*args)
            raw = fn.__wrapped__(*args)
        refs, gots, raws = [(v if isinstance(v, tuple) else (v,)) for v in (ref, got, raw)]
        for r, o, w in zip(refs, gots, raws):
            assert o.dtype == torch.float32, fn.__name__
            torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6, msg=fn.__name__)
        off = [float((w.float() - r).abs().max() / r.abs().max()) for r, w in zip(refs, raws)]
        assert max(off) > 1e-3, (fn.__name__, off)  # autocast would have changed the result

    feats = torch.nn.functional.normalize(torch.randn(64, 16, generator=g), dim=1)
    labels = torch.randint(0, 5, (64,), generator=g)
    ref = weighted_triplet_loss(feats, labels, num_negatives=None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = weighted_triplet_loss(feats, labels, num_negatives=None)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)

    ref_km = kmeans(z, 5, seed=0, n_init=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_km = kmeans(z, 5, seed=0, n_init=2)
        raw_km = kmeans.__wrapped__(z, 5, seed=0, n_init=2)
    assert torch.equal(got_km.labels, ref_km.labels)
    torch.testing.assert_close(got_km.centers, ref_km.centers)
    assert not torch.allclose(raw_km.centers, ref_km.centers, rtol=1e-4, atol=1e-4)

    ref_i, ref_d = knn_graph(z, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_i, got_d = knn_graph(z, 5)
    assert torch.equal(got_i, ref_i) and got_d.dtype == torch.float32
    torch.testing.assert_close(got_d, ref_d)


class ClipProbeDebiased(DebiasedClustering):
    """Test helper: DebiasedClustering that records the gradient norm each optimizer steps with."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.step_grad_norms: list[float] = []

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().on_before_optimizer_step(optimizer)  # clips
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.step_grad_norms.append(float(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(grad.float()) for grad in grads]))))


@pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"), reason="torch.amp.GradScaler needs torch >= 2.3")
def test_grad_scaler_with_manual_optimisation(tmp_path: Path) -> None:
    """``16-mixed`` with a GradScaler: manual_backward scales, opt.step() unscales, then clipping.

    On a GPU ``--trainer.precision 16-mixed`` builds this plugin with a CUDA GradScaler; here fp16
    autocast and the scaler run on the CPU. If clipping ran before the scaler unscaled the
    gradients, the steps would use norms of ``grad_clip / scale`` instead of ``grad_clip``.
    """
    from lightning.pytorch.plugins.precision import MixedPrecision

    clip = 1e-3
    args = [a for a in PRECISION_ARGS["DebiasedClustering"] if not a.startswith("--model=")]
    cli = main(["--model=tests.test_precision.ClipProbeDebiased", *args, f"--model.grad_clip={clip}",
                *data_args("digits", max_samples=400), *base_args(tmp_path, epochs=3, logger="none")],
               run=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=3, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    trainer.fit(cli.model, datamodule=cli.datamodule)
    norms = cli.model.step_grad_norms
    # batches per epoch from the training loader (drop_last: full global batches only);
    # 1 pretraining epoch (one R step each), 2 clustering epochs (an R and a C step each)
    per_epoch = len(cli.datamodule.train_dataset) // cli.datamodule.batch_size
    assert per_epoch >= 2 and trainer.num_training_batches == per_epoch
    assert len(norms) == per_epoch + 2 * per_epoch * 2
    # a step whose fp16 gradients overflowed reaches the hook with a non-finite norm; the scaler then
    # skips it and halves its scale (a few such steps at the start are normal GradScaler behaviour)
    finite = [n for n in norms if math.isfinite(n)]
    assert len(norms) - len(finite) <= 2, norms
    assert all(abs(n - clip) <= 1e-3 * clip for n in finite), norms
    assert scaler._scale is not None  # the scaler was in use (it is created lazily at the first scale)
    if len(finite) < len(norms):
        assert scaler.get_scale() < 2.0**12
    assert math.isfinite(float(trainer.callback_metrics["train/loss_epoch"]))
