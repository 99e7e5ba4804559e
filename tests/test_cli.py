"""The real entry point end to end: fit, test, predict, configs, bad input."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from clusterlight.cli import main
from clusterlight.errors import ClusterlightError
from tests.conftest import METHOD_ARGS, base_args, data_args

REPO = Path(__file__).resolve().parents[1]


def _predict_all(model, dataset) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        x = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
        return model.cluster_outputs(x).cluster.numpy()


def test_fit_test_predict_end_to_end(tmp_path: Path) -> None:
    common = METHOD_ARGS["AEKMeans"] + data_args("digits") + base_args(tmp_path, epochs=3)
    cli = main(["fit", *common])
    metrics = cli.trainer.callback_metrics
    for key in ("val/acc", "val/nmi", "val/ari", "val/loss", "val/cluster_kl", "val/tail_acc"):
        assert key in metrics, key
    ckpt_dir = Path(cli.trainer.checkpoint_callback.dirpath)
    assert (ckpt_dir / "last.ckpt").is_file()
    best = cli.trainer.checkpoint_callback.best_model_path
    assert best and Path(best).is_file()
    run_dir = ckpt_dir.parent
    assert (run_dir / "config.yaml").is_file()

    # test from the checkpoint in a fresh CLI; the logged metrics must agree with scikit-learn
    # on the model's own predictions for the test split.
    cli_t = main(["test", *common, f"--ckpt_path={best}"])
    dm, model = cli_t.datamodule, cli_t.model
    pred = _predict_all(model, dm.test_dataset)
    labels = dm.test_dataset.labels.numpy()
    got = cli_t.trainer.callback_metrics
    assert float(got["test/nmi"]) == pytest.approx(normalized_mutual_info_score(labels, pred), abs=1e-5)
    assert float(got["test/ari"]) == pytest.approx(adjusted_rand_score(labels, pred), abs=1e-5)
    assert 0.3 < float(got["test/acc"]) <= 1.0  # far above chance (0.1) after 3 epochs

    # predict writes one row per test sample with the model's clusters
    out = tmp_path / "preds.csv"
    main(["predict", *common, f"--ckpt_path={best}", f"--predictions.path={out}"])
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(dm.test_dataset)
    assert [int(r["index"]) for r in rows] == list(range(len(rows)))
    assert np.array_equal(np.array([int(r["cluster"]) for r in rows]), pred)
    assert all(0.0 <= float(r["confidence"]) <= 1.0 for r in rows)
    assert "ood_score" in rows[0]


def test_two_runs_keep_their_own_config(tmp_path: Path) -> None:
    common = METHOD_ARGS["AEKMeans"] + data_args("digits", max_samples=300) + base_args(tmp_path, epochs=1)
    a = main(["fit", *common, "--model.latent_dim=4"])
    b = main(["fit", *common, "--model.latent_dim=6"])
    ca = Path(a.trainer.checkpoint_callback.dirpath).parent / "config.yaml"
    cb = Path(b.trainer.checkpoint_callback.dirpath).parent / "config.yaml"
    assert ca != cb and ca.is_file() and cb.is_file()
    assert "latent_dim: 4" in ca.read_text() and "latent_dim: 6" in cb.read_text()


def test_wandb_offline_run_has_its_own_dir(tmp_path: Path) -> None:
    common = METHOD_ARGS["AEKMeans"] + data_args("digits", max_samples=300) + base_args(tmp_path, epochs=1,
                                                                                         logger="wandb")
    cli = main(["fit", *common, "--figures.enabled=true", "--figures.every_n_epochs=1"])
    run_dir = Path(cli.trainer.checkpoint_callback.dirpath).parent
    assert (run_dir / "config.yaml").is_file()
    assert {p.name for p in (run_dir / "figures").iterdir()} >= {
        "val_epoch000_embedding_map.png", "val_epoch000_confusion.png", "val_epoch000_cluster_sizes.png"}
    assert list((tmp_path / "runs" / "wandb").glob("offline-run-*"))


def test_num_clusters_and_shape_flow_from_data(tmp_path: Path) -> None:
    cli = main(["fit", *METHOD_ARGS["AEKMeans"], *data_args("coil20", image_size=16, ood_classes="[0, 1]"),
                *base_args(tmp_path), "--trainer.max_epochs=0"])
    assert cli.model.num_clusters == 18
    assert cli.model.input_shape == (1, 16, 16)


def test_composed_configs_and_overrides(tmp_path: Path) -> None:
    cli = main(["fit", "--config", str(REPO / "configs/ae_kmeans/digits.yaml"),
                "--config", str(REPO / "configs/logging/csv.yaml"), "--model.latent_dim=3",
                *base_args(tmp_path), "--trainer.max_epochs=0"])
    assert cli.model.autoencoder.encoder.latent_dim == 3
    assert type(cli.trainer.logger).__name__ == "CSVLogger"


def test_print_config_lists_model_arguments(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "clusterlight", "fit", "--config",
                           str(REPO / "configs/dec/usps.yaml"), "--print_config"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "pretrain_epochs: 20" in proc.stdout and "dataset: usps" in proc.stdout
    assert not list(tmp_path.iterdir())


BAD_INPUTS = [
    (["--data.dataset=nonsense"], "nonsense"),
    (["--data.dataset=npz", "--data.root=/does/not/exist.npz"], "/does/not/exist.npz"),
    (["--data.num_clusters=1"], "num_clusters"),
    (["--data.imbalance_ratio=0.5"], "imbalance_ratio"),
    (["--data.ood_classes=[12]"], "ood_classes"),
    (["--data.ood_classes=[0,1,2,3,4,5,6,7,8,9]"], "ood_classes"),
    (["--data.num_clusters=5000"], "num_clusters"),
]


@pytest.mark.parametrize(("extra", "needle"), BAD_INPUTS)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, extra: list[str], needle: str) -> None:
    args = ["fit", *METHOD_ARGS["AEKMeans"], *data_args("digits"), *base_args(tmp_path / "out"), *extra]
    with pytest.raises(ClusterlightError) as info:
        main(args)
    message = str(info.value)
    assert "\n" not in message and needle in message
    assert not (tmp_path / "out").exists()


def test_console_script_prints_one_error_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "clusterlight", "fit", "--model=AEKMeans",
                           "--data=ClusteringDataModule", "--data.imbalance_ratio=0.2"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert "Traceback" not in proc.stderr
    assert len(errors) == 1 and errors[0].startswith("error:") and "imbalance_ratio" in errors[0]
    assert proc.stderr.strip().splitlines()[-1] == errors[0]
    assert not list(tmp_path.iterdir())


def test_checkpoint_from_another_method_is_refused(tmp_path: Path) -> None:
    common = data_args("digits", max_samples=300) + base_args(tmp_path, epochs=1)
    cli = main(["fit", *METHOD_ARGS["AEKMeans"], *common])
    ckpt = cli.trainer.checkpoint_callback.last_model_path
    with pytest.raises(ClusterlightError, match="AEKMeans"):
        main(["test", *METHOD_ARGS["DEC"], *common, f"--ckpt_path={ckpt}"])
