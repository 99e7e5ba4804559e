"""Smallest modes of the benchmark scripts (``scripts/bench_throughput.py``, ``scripts/bench_scaling.py``).

Not benchmarks: they check that the scripts run, write the documented JSON records and render
their reports, and -- independently of the scripts -- that the Lightning run and the plain loop
of the throughput benchmark train the same network on the same batch: both record the step-1
loss that this test computes itself from a freshly seeded AEKMeans and the DataModule's first
training batch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"


def _run(script: str, *args: str, timeout: float = 600) -> str:
    proc = subprocess.run([sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _script(name: str):
    """``scripts/<name>.py`` imported as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _step1_loss_by_hand(monkeypatch: pytest.MonkeyPatch) -> float:
    """AEKMeans's reconstruction loss on the first training batch of USPS, computed here."""
    from clusterlight.data import ClusteringDataModule
    from clusterlight.methods import AEKMeans

    cfg = yaml.safe_load((REPO / "configs" / "ae_kmeans" / "usps.yaml").read_text())
    args = cfg["model"]["init_args"]
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # what seed_everything(0) sets: the training order's seed
    dm = ClusteringDataModule(dataset="usps", batch_size=cfg["data"]["init_args"]["batch_size"], seed=0)
    dm.setup("fit")
    with torch.random.fork_rng():
        torch.manual_seed(0)  # seed_everything(0) before the model, as in both kinds of benchmark run
        model = AEKMeans(num_clusters=dm.num_clusters, input_shape=dm.input_shape, latent_dim=args["latent_dim"],
                         widths=args["widths"], kmeans_n_init=args["kmeans_n_init"])
    batch = next(iter(dm.train_dataloader()))  # epoch 0 of the global-batch sampler
    model.train()
    with torch.no_grad():
        _, recon = model.autoencoder(batch["image"])
        return float(F.mse_loss(recon.float(), batch["image"].float()))


@pytest.mark.slow
def test_throughput_smallest_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "throughput.jsonl"
    _run("bench_throughput.py", "--methods", "AEKMeans", "--steps", "5", "--warmup", "2", "--reps", "1",
         "--out", str(out))
    (rec,) = _records(out)
    for key in ("method", "dataset", "batch_size", "steps", "images_per_s_lightning", "images_per_s_plain",
                "ratio", "overhead_pct", "ratio_cpu", "overhead_pct_cpu", "peak_rss_mb_lightning",
                "peak_rss_mb_plain", "train_peak_over_base_mb_lightning", "train_peak_over_base_mb_plain",
                "torch_threads", "first_losses_lightning", "first_losses_plain", "losses_match", "phase"):
        assert key in rec, key
    assert rec["method"] == "AEKMeans" and rec["dataset"] == "usps" and rec["steps"] == 5
    assert rec["batch_size"] == 256  # from configs/ae_kmeans/usps.yaml
    assert rec["images_per_s_lightning"] > 0 and rec["images_per_s_plain"] > 0
    assert rec["ratio"] == pytest.approx(rec["images_per_s_lightning"] / rec["images_per_s_plain"], rel=1e-3)
    assert rec["overhead_pct"] == pytest.approx(100 * (1 / rec["ratio"] - 1), abs=0.02)
    assert rec["peak_rss_mb_lightning"] > 0 and rec["peak_rss_mb_plain"] > 0
    assert rec["torch_threads"] == 1 and rec["torch_threads_plain"] == 1

    # The same network on the same batch: both loops' step-1 loss is the one computed here.
    expected = _step1_loss_by_hand(monkeypatch)
    assert rec["first_losses_lightning"][0] == pytest.approx(expected, rel=1e-6)
    assert rec["first_losses_plain"][0] == pytest.approx(expected, rel=1e-6)
    assert rec["losses_match"] and rec["first_losses_lightning"] == rec["first_losses_plain"]

    table = _run("bench_throughput.py", "--report", "--out", str(out))
    assert table.startswith("| method | dataset |") and "| AEKMeans | usps | 256 | 5 x 1 |" in table


@pytest.mark.slow
def test_throughput_probe_mode(tmp_path: Path) -> None:
    out = tmp_path / "probe.jsonl"
    _run("bench_throughput.py", "--probe", "--diagnose", "--methods", "JULE", "--steps", "3", "--chunks", "2",
         "--probe_out", str(out))
    (rec,) = _records(out)
    assert rec["mode"] == "probe" and rec["method"] == "JULE" and rec["chunks"] == 2
    for key in ("step_ms_lightning", "step_ms_plain", "step_ms_lightning_nolog", "overhead_pct", "overhead_pct_cpu",
                "overhead_pct_nolog", "extra_ms_per_step"):
        assert key in rec, key
    assert len(rec["overhead_pct_chunks"]) == 2


@pytest.mark.slow
def test_scaling_smallest_mode(tmp_path: Path) -> None:
    out = tmp_path / "scaling.jsonl"
    components = ["kmeans_ae", "dec_target", "stats_pool", "spc_clusterers"]
    _run("bench_scaling.py", "--sizes", "2000", "--components", *components, "--repeat", "1", "--out", str(out))
    recs = {r["component"]: r for r in _records(out)}
    assert sorted(recs) == sorted(components)
    for rec in recs.values():
        for key in ("n", "dim", "time_s", "peak_rss_mb", "rss_base_mb", "peak_over_base_mb", "threads"):
            assert key in rec, (rec["component"], key)
        assert rec["n"] == 2000 and rec["threads"] == 1 and rec["time_s"] >= 0
        assert rec["peak_rss_mb"] >= rec["rss_base_mb"] > 0
    # dimensions of the methods' default configs
    def config(folder: str) -> dict:
        return yaml.safe_load((REPO / "configs" / folder / "usps.yaml").read_text())["model"]["init_args"]

    assert recs["kmeans_ae"]["dim"] == config("ae_kmeans")["latent_dim"]
    assert recs["dec_target"]["dim"] == config("dec")["latent_dim"]
    assert recs["stats_pool"]["dim"] == config("debiased")["latent_dim"]
    assert recs["stats_pool"]["cluster_dim"] == config("debiased")["cluster_dim"]
    assert recs["kmeans_ae"]["params"] == {"n_init": config("ae_kmeans")["kmeans_n_init"], "max_iter": 300}
    assert recs["spc_clusterers"]["params"]["min_cluster_size"] == 2000 // 20  # N // (2K)
    assert recs["kmeans_ae"]["nmi"] > 0.9 and recs["spc_clusterers"]["nmi"] > 0.9  # separated mixtures
    assert recs["dec_target"]["target_rows_sum_to_1"]

    table = _run("bench_scaling.py", "--report", "--out", str(out))
    assert table.startswith("| step | N |")
    for comp in components:
        assert f"| {comp} | 2,000 |" in table

    # a process past --timeout is stopped and recorded as unfinished, not dropped
    _run("bench_scaling.py", "--sizes", "200000", "--components", "spc_clusterers", "--timeout", "2",
         "--out", str(out))
    last = _records(out)[-1]
    assert last["timed_out"] and last["time_s"] is None and last["n"] == 200_000
    assert "| spc_clusterers | 200,000 |  | > " in _run("bench_scaling.py", "--report", "--out", str(out))


@pytest.mark.slow
def test_scaling_umap_steps(tmp_path: Path) -> None:
    """SPC's UMAP + HDBSCAN labelling and the flagship's UMAP initialisation (numba compiles UMAP
    first in each process: a minute or two each)."""
    out = tmp_path / "scaling.jsonl"
    _run("bench_scaling.py", "--sizes", "5000", "--components", "spc_labelling", "debiased_init", "--spc_gmm",
         "--out", str(out))
    spc, debiased = _records(out)
    assert not spc.get("timed_out") and not debiased.get("timed_out")
    assert spc["params"]["n_neighbors"] == 10  # max(umap_min_neighbors 10, 30 * 5000 // 70000)
    assert spc["params"]["min_cluster_size"] == 250 and spc["params"]["min_samples"] == 10
    assert spc["umap_s"] > 0 and spc["hdbscan_s"] >= 0 and spc["gmm_s"] >= 0 and spc["compile_s"] > 0
    assert spc["nmi"] > 0.9
    assert debiased["params"]["manifold"] == "umap" and debiased["umap_s"] > 0 and debiased["distill_s"] > 0
    assert debiased["nmi"] > 0.9


def test_bench_knn_graph_smallest_mode() -> None:
    """``scripts/bench_knn_graph.py`` runs and reports both paths agreeing (k = 600 > 512 takes whole rows)."""
    out = _run("bench_knn_graph.py", "--sizes", "700", "--ks", "20", "600", "--dim", "4")
    lines = [line for line in out.splitlines() if line.startswith("N=700")]
    assert [line.split(":")[0] for line in lines] == ["N=700 k=20", "N=700 k=600"]
    for line in lines:
        diff = float(line.split("max |d - d0| ")[1].split(",")[0])
        same = float(line.split("same entries ")[1])
        assert diff < 1e-4 and same > 0.99


def test_knn_purity_against_scikit_learn() -> None:
    """``scripts/knn_purity.py``'s neighbour agreement against scikit-learn's exact neighbours."""
    from sklearn.neighbors import NearestNeighbors

    mod = _script("knn_purity")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 5))
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5)
    queries = np.arange(0, 300, 7)
    ours = mod.neighbour_purity(torch.from_numpy(x), torch.from_numpy(y), [1, 5, 20], torch.from_numpy(queries))
    idx = NearestNeighbors(n_neighbors=21).fit(x).kneighbors(x[queries], return_distance=False)[:, 1:]
    for k in (1, 5, 20):
        assert ours[k] == pytest.approx((y[idx[:, :k]] == y[queries, None]).mean(), abs=1e-12)


def test_ood_view_probe_distance_against_scikit_learn() -> None:
    """``scripts/ood_view_probe.py``'s mean log k-NN distance against scikit-learn's exact neighbours."""
    from sklearn.neighbors import NearestNeighbors

    mod = _script("ood_view_probe")
    rng = np.random.default_rng(4)
    bank, queries = rng.normal(size=(1500, 6)), rng.normal(size=(1100, 6)) * 1.5
    ours = mod.log_knn_distance(torch.from_numpy(bank), torch.from_numpy(queries), (1, 2, 4)).numpy()
    dist = NearestNeighbors(n_neighbors=4).fit(bank).kneighbors(queries)[0]
    np.testing.assert_allclose(ours, np.log(dist[:, [0, 1, 3]]).mean(1), rtol=1e-9, atol=1e-9)


def test_mutual_purity_by_hand() -> None:
    """``scripts/mutual_purity.py``'s per-class same-class share of pairs, on a hand-made table."""
    mod = _script("mutual_purity")
    y = torch.tensor([0, 0, 0, 1, 1])
    table = torch.tensor([[1, 3], [0, 2], [3, 4], [4, 0], [3, 2]])
    # class 0: pairs 0-1, 0-3, 1-0, 1-2, 2-3, 2-4 -> 3 of 6 within; class 1: 3-4, 3-0, 4-3, 4-2 -> 2 of 4
    assert mod.pair_purity(table, None, y) == {0: pytest.approx(0.5), 1: pytest.approx(0.5)}
    # only the first count[i] entries: class 0 rows keep 1, 2, 0 -> pairs 0-1, 1-0 (2 of 2); class 1: 3-4, 4-3 (2 of 2)
    count = torch.tensor([1, 1, 0, 1, 1])
    assert mod.pair_purity(table, count, y) == {0: pytest.approx(1.0), 1: pytest.approx(1.0)}
    # class 1 without any pair is left out
    assert mod.pair_purity(table, torch.tensor([2, 2, 2, 0, 0]), y) == {0: pytest.approx(0.5)}


def test_tail_probe_cross_purity_against_scikit_learn() -> None:
    """``scripts/tail_probe.py``'s test-to-training neighbour agreement against scikit-learn's neighbours."""
    from sklearn.neighbors import NearestNeighbors

    mod = _script("tail_probe")
    rng = np.random.default_rng(5)
    train, test = rng.normal(size=(1300, 4)), rng.normal(size=(1100, 4))
    y_train, y_test = rng.integers(0, 3, 1300), rng.integers(0, 3, 1100)
    y_train[train[:, 0] > 1] = 2  # some structure, so that the shares are not all about 1/3
    y_test[test[:, 0] > 1] = 2
    ours = mod.cross_purity(torch.from_numpy(train), y_train, torch.from_numpy(test), y_test, 5)
    idx = NearestNeighbors(n_neighbors=5).fit(train).kneighbors(test, return_distance=False)
    np.testing.assert_allclose(ours, (y_train[idx] == y_test[:, None]).mean(1), atol=1e-12)


def test_tail_probe_routes_by_hand() -> None:
    """``scripts/tail_probe.py``'s per-class table on a hand-made case: three classes, two clusters."""
    mod = _script("tail_probe")
    # training: cluster 0 holds classes 0, 0, 1, 2; cluster 1 holds 1, 2
    table = mod.routes(np.array([0, 0, 0, 1, 1, 0]), np.array([0, 0, 1, 1, 2, 2]),
                       # test: cluster 0 gets 0, 0, 2; cluster 1 gets 1, 1; one class-1 image unassigned (-1)
                       np.array([0, 0, 1, 1, -1, 0]), np.array([0, 0, 1, 1, 1, 2]), 2, 3)
    # matching: cluster 0 -> class 0 (2 images), cluster 1 -> class 1 (2 of its 3); class 2 gets none
    assert [(r["n"], r["train_top"], r["cluster"], r["cluster_largest_class"], r["recall"]) for r in table] == [
        (2, 1.0, 0, 0, 1.0), (2, 0.5, 0, 0, round(2 / 3, 3)), (2, 0.5, 0, 0, 0.0)]


def test_feature_probe_nearest_centre_against_scipy() -> None:
    """``scripts/feature_probe.py``'s test assignment against scipy's distances."""
    from scipy.spatial.distance import cdist

    mod = _script("feature_probe")
    rng = np.random.default_rng(11)
    x, centres = rng.normal(size=(500, 6)), rng.normal(size=(7, 6))
    ours = mod.nearest_centre(torch.from_numpy(x).float(), torch.from_numpy(centres).float()).numpy()
    np.testing.assert_array_equal(ours, cdist(x, centres).argmin(1))


def test_feature_probe_scores_by_hand() -> None:
    """``scripts/feature_probe.py``'s summary and tail recalls on a hand-made case: three classes, three clusters."""
    mod = _script("feature_probe")
    # training counts: class 2 the fewest, then class 0, then class 1 (tail: class 2 alone, g = 1)
    counts = [5, 9, 2]
    # cluster 0 holds three class-0 images and one class-2 image; cluster 1 two class-1 images;
    # cluster 2 one class-2 and one class-0 image
    pred = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    target = np.array([0, 0, 0, 2, 1, 1, 2, 0])
    summary, tail = mod.scores(pred, target, counts, 3)
    # matching 0->0, 1->1, 2->2: 3 + 2 + 1 of 8 right; class 2's recall 1 of 2
    assert summary[:2] == [round(6 / 8, 3), 0.5]
    assert tail == [0.5]


def test_cluster_contents_by_hand() -> None:
    """``scripts/cluster_contents.py`` on a hand-made case: four classes, four clusters, one class
    drawn as two clusters and two classes sharing one, one cluster empty."""
    mod = _script("cluster_contents")
    names = ["a", "b", "c", "d"]
    # cluster 0: a x3 + c x1; cluster 1: a x2; cluster 2: b x2 + d x1 + c x1; cluster 3: empty
    pred = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    target = np.array([0, 0, 0, 2, 0, 0, 1, 1, 3, 2])
    lines, lost = mod.contents(pred, target, 4, names)
    # matching: 0 -> a (3), 2 -> b (2), then 1 and 3 take c and d (0 each: a zero-count pair either way)
    assert lines[0] == "a <- a 3 + c 1"
    assert lines[1].endswith("<- a 2") and lines[1].split(" <- ")[0] in ("c", "d")
    assert lines[2] == "b <- b 2 + c 1"
    assert lines[3].endswith("<- empty")
    assert lost == []
    lines, lost = mod.contents(pred, target, 3, names)  # three clusters, four classes: one class has none
    assert lines == ["a <- a 3 + c 1", lines[1], "b <- b 2 + c 1"] and lines[1].split(" <- ")[0] in ("c", "d")
    assert len(lost) == 1 and lost[0] in ("c", "d") and lost[0] != lines[1].split(" <- ")[0]


def test_initial_partition_summary_by_hand() -> None:
    """``scripts/initial_partition.py``'s summary on a hand-made case: class a drawn as two clusters,
    classes c and d sharing one (c the larger), an empty cluster skipped."""
    mod = _script("initial_partition")
    names = ["a", "b", "c", "d"]
    # cluster 0: a x3 + b x1; cluster 1: a x2; cluster 2: b x2; cluster 3: empty; cluster 4: c x3 + d x1
    pred = np.array([0, 0, 0, 0, 1, 1, 2, 2, 4, 4, 4, 4])
    target = np.array([0, 0, 0, 1, 0, 0, 1, 1, 2, 2, 3, 2])
    lines, twice, none = mod.summary(pred, target, 5, names)
    assert lines == ["4: a 3 + b 1", "4: c 3 + d 1", "2: a 2", "2: b 2"]
    assert twice == ["a"] and none == ["d"]
    line = mod.describe(7, "moved", pred, target, 5, names)
    assert line == "seed 7 moved | 2+ clusters: a | majority in none: d | 4: a 3 + b 1 | 4: c 3 + d 1 | 2: a 2 | 2: b 2"


@pytest.mark.slow
def test_initial_partition_through_a_fit() -> None:
    """``scripts/initial_partition.py`` stops a real fit (digits ``lt100``, one pretraining epoch) at
    the initial partition and returns it: the moved partition is ``refine_by_cut`` of the initial
    one on the 15-NN graph of R's standardised features, that graph built here by scikit-learn
    (this case makes moves: 103 training images change cluster on the Xeon machine type)."""
    from sklearn.neighbors import NearestNeighbors

    from clusterlight.cluster.mixture import refine_by_cut
    from clusterlight.methods import debiased as D

    mod = _script("initial_partition")
    hooks = (D.DebiasedClustering.init_clusters, D.DebiasedClustering._refine_by_cut)
    got = mod.initial_partition("digits", "lt100", 0, "paper", [
        "model.init_args.pretrain_epochs=1", "trainer.max_epochs=3", "model.init_args.refine_cut=15"])
    n, k = got["initial"].shape
    assert (D.DebiasedClustering.init_clusters, D.DebiasedClustering._refine_by_cut) == hooks  # restored
    assert k == 10 and got["moved"].shape == (n, k) and got["z_r"].shape[0] == n == got["labels"].shape[0]
    assert set(got["labels"].tolist()) == set(range(10)) and got["names"] == [str(c) for c in range(10)]
    z = got["z_r"].double().numpy()
    z = (z - z.mean(0)) / np.maximum(z.std(0, ddof=1), 1e-6)
    graph = NearestNeighbors(n_neighbors=16).fit(z).kneighbors(z, return_distance=False)[:, 1:]
    moved, _ = refine_by_cut(got["initial"], torch.from_numpy(graph), got["space"], seed=0)
    np.testing.assert_array_equal(moved.argmax(1).numpy(), got["moved"].argmax(1).numpy())
    assert bool((got["initial"].argmax(1) != got["moved"].argmax(1)).any())  # the moves were made, not skipped


def test_ood_space_probe_against_references() -> None:
    """``scripts/ood_space_probe.py``: its spaces against the encoder's own layers, its distances against scikit-learn."""
    from sklearn.neighbors import NearestNeighbors

    from clusterlight.nn.backbones import ConvEncoder

    mod = _script("ood_space_probe")
    torch.manual_seed(0)
    encoder = ConvEncoder((1, 12, 12), latent_dim=5, widths=(4, 6)).eval()
    images = torch.rand(7, 1, 12, 12)
    spaces = mod.encoder_spaces(encoder, images)
    with torch.no_grad():
        first = encoder.features[:3](images)  # conv, norm, ReLU
        torch.testing.assert_close(spaces["stage1"], first.mean((2, 3)))
        torch.testing.assert_close(spaces["conv"], encoder.features(images).flatten(1))
        torch.testing.assert_close(spaces["latent"], encoder(images))
    torch.testing.assert_close(spaces["pixels"], images.flatten(1))
    assert sorted(spaces) == ["conv", "latent", "pixels", "stage1", "stage2"]

    rng = np.random.default_rng(6)
    bank = rng.normal(size=(900, 5))
    dist = NearestNeighbors(n_neighbors=5).fit(bank).kneighbors(bank[:300])[0]  # column 0: the row itself
    ours = mod.mean_log_kth(torch.from_numpy(bank), torch.from_numpy(bank[:300]), [1, 4], skip_first=True).numpy()
    np.testing.assert_allclose(ours, np.log(dist[:, [1, 4]]).mean(1), rtol=1e-9, atol=1e-9)
