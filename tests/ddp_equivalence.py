"""Helpers of the ``tests/test_ddp_<method>.py`` files: one fit on one process, one on two gloo processes.

Both fits use the same seed, the same data and the same *global* batch size (the DataModule's
``batch_size``; each of the two processes loads half of it, see
:class:`~clusterlight.data.datamodule.GlobalBatchSampler`) and the ``ddp_spawn`` strategy (``ddp``
would re-execute the pytest command line in the second process). The models use ``norm: group``:
batch norm normalises by the statistics of each process's half batch, and PyTorch's DDP refuses
``SyncBatchNorm`` on CPU modules ("SyncBatchNorm layers only work with GPU modules"), so on gloo
only a per-sample normalisation makes the two runs the same computation.
At the end of fit every process writes what it knows: the cluster, confidence and OOD score of
every test image (eval mode, its own copy of the model), its weights and buffers, and any
method state the test asks for. Each DDP test lives in a file of its own, as the issue asks.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.strategies import DDPStrategy

from clusterlight.data import ClusteringDataModule
from clusterlight.methods.base import ClusteringModule

#: A rank that waits on a collective no other rank enters fails after this long instead of hanging.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(seconds=120)


class RecordFit(Callback):
    """Writes ``rank<r>.pt`` into ``out_dir`` at the end of fit (in every process)."""

    def __init__(self, out_dir: str, state_attrs: tuple[str, ...] = ()) -> None:
        self.out_dir = out_dir
        self.state_attrs = state_attrs

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        torch.set_num_threads(1)  # 2 shared cores: one thread per process (spawned workers start with all)

    @torch.no_grad()
    def on_fit_end(self, trainer: Trainer, pl_module: ClusteringModule) -> None:
        test = trainer.datamodule.split_dataset("test")
        images = test.images.float().div(255.0).to(pl_module.device)
        was_training = pl_module.training
        pl_module.eval()
        out = pl_module.cluster_outputs(images)
        pl_module.train(was_training)
        record: dict[str, Any] = {
            "cluster": out.cluster.cpu(),
            "confidence": out.confidence.float().cpu(),
            "ood_score": None if out.ood_score is None else out.ood_score.float().cpu(),
            "state": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
        }
        for name in self.state_attrs:
            value = getattr(pl_module, name)
            record[name] = value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value
        torch.save(record, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


def fit_and_record(model_cls: type[ClusteringModule], model_kwargs: dict[str, Any], out_dir: Path, *,
                   devices: int, epochs: int, seed: int = 7, state_attrs: tuple[str, ...] = (),
                   **data_kwargs: Any) -> list[dict[str, Any]]:
    """Fit on ``devices`` CPU processes; return what each process recorded (rank order)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(seed, verbose=False)
    data = {"dataset": "digits", "max_samples": 300, "batch_size": 64, **data_kwargs}
    dm = ClusteringDataModule(**data)
    model = model_cls(num_clusters=dm.num_clusters, input_shape=dm.input_shape, **model_kwargs)
    strategy: Any = "auto"
    if devices > 1:
        strategy = DDPStrategy(start_method="spawn", process_group_backend="gloo", timeout=PROCESS_GROUP_TIMEOUT)
    trainer = Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=epochs,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=out_dir,
                      callbacks=[RecordFit(str(out_dir), state_attrs)])
    trainer.fit(model, datamodule=dm)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(devices)]


def fit_one_and_two(model_cls: type[ClusteringModule], model_kwargs: dict[str, Any], tmp_path: Path, *,
                    epochs: int, state_attrs: tuple[str, ...] = (),
                    **data_kwargs: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The one-process record and the two processes' records of the same run."""
    one = fit_and_record(model_cls, model_kwargs, tmp_path / "one", devices=1, epochs=epochs,
                         state_attrs=state_attrs, **data_kwargs)[0]
    two = fit_and_record(model_cls, model_kwargs, tmp_path / "two", devices=2, epochs=epochs,
                         state_attrs=state_attrs, **data_kwargs)
    assert one["world_size"] == 1 and [r["world_size"] for r in two] == [2, 2]
    return one, two


def assert_ranks_identical(two: list[dict[str, Any]], extra: tuple[str, ...] = ()) -> None:
    """Every clustering step on rank 0 was broadcast: both ranks answer bit for bit alike."""
    a, b = two
    for key in ("cluster", "confidence", "ood_score", *extra):
        if a[key] is None:
            assert b[key] is None, key
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), f"{key} differs between the ranks"
        else:
            assert a[key] == b[key], key
    for key, value in a["state"].items():
        assert torch.equal(value, b["state"][key]), f"{key} differs between the ranks"
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])


def assert_same_as_one_process(one: dict[str, Any], ddp: dict[str, Any], *, atol: float = 1e-4,
                               extra_exact: tuple[str, ...] = ()) -> None:
    """Identical cluster assignments (and method state in ``extra_exact``); continuous values within
    ``atol`` (the two runs add the same numbers in different orders: the ranks' gradients are summed
    by an all-reduce, synchronised batch norm sums its moments per rank)."""
    assert (one["epoch"], one["global_step"]) == (ddp["epoch"], ddp["global_step"])
    mismatch = int((one["cluster"] != ddp["cluster"]).sum())
    assert mismatch == 0, f"{mismatch} of {len(one['cluster'])} test images changed cluster"
    for key in extra_exact:
        assert torch.equal(torch.as_tensor(one[key]), torch.as_tensor(ddp[key])), f"{key} differs from one process"
    torch.testing.assert_close(ddp["confidence"], one["confidence"], atol=atol, rtol=0)
    if one["ood_score"] is not None:
        torch.testing.assert_close(ddp["ood_score"], one["ood_score"], atol=atol, rtol=atol)
    assert one["state"].keys() == ddp["state"].keys()
    for key, value in one["state"].items():
        if value.is_floating_point():
            torch.testing.assert_close(ddp["state"][key], value, atol=atol, rtol=atol, msg=f"{key} differs")
        else:
            assert torch.equal(ddp["state"][key], value), f"{key} differs from one process"
