"""``torchrun`` launches clusterlight: two CPU ranks, one run folder, one set of checkpoints.

The command is the README's (``Multi-GPU and multi-node``) on a small run, as a subprocess through
``python -m torch.distributed.run`` (the ``torchrun`` script of the same interpreter, so the test
is venv-safe). Lightning must detect the torchelastic environment and run inside the two
processes torchrun started, not spawn its own: each rank writes a marker file (a callback loaded
from this module) with its rank, the world size and the cluster environment Lightning chose.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch import Callback, LightningModule, Trainer

REPO = Path(__file__).resolve().parents[1]


class RankMarker(Callback):
    """Test helper: at the end of ``fit`` every rank writes ``rank<global rank>.json`` into ``directory``.

    Args:
        directory: where the marker files go.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        os.makedirs(self.directory, exist_ok=True)
        info = {
            "global_rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "environment": type(trainer.strategy.cluster_environment).__name__,
            "strategy": type(trainer.strategy).__name__,
            "pid": os.getpid(),
            "local_rank_env": os.environ.get("LOCAL_RANK"),
            "best_model_path": getattr(trainer.checkpoint_callback, "best_model_path", ""),
        }
        with open(os.path.join(self.directory, f"rank{trainer.global_rank}.json"), "w") as fh:
            json.dump(info, fh)


@pytest.mark.ddp
def test_torchrun_two_cpu_ranks(tmp_path: Path) -> None:
    root, markers = tmp_path / "root", tmp_path / "markers"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "clusterlight", "fit",
        "--model=AEKMeans", "--model.widths=[16, 32]", "--model.kmeans_n_init=2",
        "--data=ClusteringDataModule", "--data.dataset=digits", "--data.max_samples=400",
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
        "--trainer.max_epochs=2", "--trainer.logger=false", f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--figures.enabled=false",
        "--trainer.callbacks+=tests.test_torchrun.RankMarker", f"--trainer.callbacks.directory={markers}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]

    # Both ranks ran, in the world of two that torchrun made (Lightning spawned nothing itself).
    assert "Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/2" in output, output[-4000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in output, output[-4000:]
    infos = sorted((json.loads(p.read_text()) for p in markers.glob("rank*.json")),
                   key=lambda info: info["global_rank"])
    assert [i["global_rank"] for i in infos] == [0, 1]
    assert all(i["world_size"] == 2 for i in infos)
    assert all(i["environment"] == "TorchElasticEnvironment" for i in infos), infos
    assert all(i["strategy"] == "DDPStrategy" for i in infos), infos
    assert [i["local_rank_env"] for i in infos] == ["0", "1"]
    assert infos[0]["pid"] != infos[1]["pid"]
    assert infos[0]["best_model_path"] == infos[1]["best_model_path"] != ""

    # Exactly one run folder with one config and one set of checkpoints (rank 0 writes them).
    runs = sorted((root / "runs").iterdir())
    assert len(runs) == 1, runs
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    ckpts = [f for f in files if f.endswith(".ckpt")]
    best = Path(infos[0]["best_model_path"]).name
    assert sorted(Path(f).name for f in ckpts) == sorted(["last.ckpt", best])
    assert all(Path(f).parent == runs[0].relative_to(root) / "checkpoints" for f in ckpts), files
    assert [f for f in files if f.endswith("config.yaml")] == [str(runs[0].relative_to(root) / "config.yaml")]
    assert set(files) == set(ckpts) | {str(runs[0].relative_to(root) / "config.yaml")}, files
