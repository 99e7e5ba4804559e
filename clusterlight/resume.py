"""Resuming an interrupted ``fit``: ``clusterlight fit ... --ckpt_path last``.

Every run writes into its own folder (:func:`clusterlight.callbacks.run_dir`), so Lightning's own
``ckpt_path="last"`` (which looks in the *new* run's empty checkpoint folder) would find nothing.
Here ``last`` means: the newest ``checkpoints/last*.ckpt`` among the earlier runs of the same
logger location that were written by the same method on the same data settings; the resumed run
continues in that run's folder (and, with W&B, under the same run id). A logger given an explicit
run id or version looks in that run alone. When no earlier run matches, the fit starts afresh (as
Lightning does), so a scheduler can always pass ``--ckpt_path last``.

A checkpoint holds the whole training state: weights, optimizers and schedulers, the loops'
progress, the method's cluster state, the callbacks' state and the training order's position
(:class:`clusterlight.data.datamodule.TrainLoader`); with the same seed, a resumed run ends as the
uninterrupted run would have.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from clusterlight.errors import ClusterlightError


@dataclass
class RunLocation:
    """Where a logger keeps its runs: ``<root>/<version>/checkpoints``.

    Attributes:
        root: the folder holding one sub-folder per run.
        version: the run's folder name when the config fixes it (W&B ``id``, CSV ``version``), else ``None``.
        key: the logger's init argument that names the run folder (``id``, ``version``), ``None``
            when the folder name cannot be chosen (no logger: ``default_root_dir/runs/<time>-<pid>``).
    """

    root: str
    version: str | None
    key: str | None


def run_location(trainer_cfg: Any) -> RunLocation | None:
    """The run folders of the logger in a ``trainer`` config (``None``: an unknown logger)."""
    default_root = trainer_cfg.get("default_root_dir") or os.getcwd()
    logger = trainer_cfg.get("logger")
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    if logger in (None, False):
        return RunLocation(os.path.join(default_root, "runs"), None, None)
    if logger is True or not hasattr(logger, "get") or not logger.get("class_path"):
        return None
    cls = str(logger.get("class_path")).rsplit(".", 1)[-1]
    args = logger.get("init_args") or {}
    save_dir = args.get("save_dir") or default_root
    if cls == "WandbLogger":
        version = args.get("id") or args.get("version")
        return RunLocation(os.path.join(save_dir, args.get("project") or "lightning_logs"),
                           None if version is None else str(version), "id")
    if cls in ("CSVLogger", "TensorBoardLogger"):
        version = args.get("version")
        if isinstance(version, int):
            version = f"version_{version}"
        name = args.get("name", "lightning_logs") or ""  # name None: runs directly in save_dir
        return RunLocation(os.path.join(save_dir, name),
                           None if version is None else str(version), "version")
    return None


def _normalised(value: Any) -> str:
    def plain(v: Any) -> Any:
        if hasattr(v, "as_dict"):
            v = v.as_dict()
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return json.dumps(plain(value), sort_keys=True, default=str)


def find_last_checkpoint(location: RunLocation, method: str, data_class: str, data_args: Any) -> str | None:
    """The newest ``last*.ckpt`` of an earlier run written by ``method`` on the same data settings."""
    pattern = os.path.join(location.root, glob.escape(location.version) if location.version else "*",
                           "checkpoints", "last*.ckpt")
    candidates = sorted(glob.glob(pattern), key=os.path.getmtime, reverse=True)
    wanted_args = dict(data_args.as_dict() if hasattr(data_args, "as_dict") else data_args)
    # the DataModule records the number of clusters it resolved from an unset ``num_clusters``
    resolved = [key for key in ("num_clusters",) if wanted_args.get(key) is None]
    wanted = _normalised({k: v for k, v in wanted_args.items() if k not in resolved})
    for path in candidates:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - an unreadable candidate is skipped, like a foreign one
            continue
        info = ckpt.get("clusterlight") or {}
        if info.get("method") != method:
            continue
        data = dict(ckpt.get("datamodule_hyper_parameters") or {})
        written_class = str(data.pop("_class_path", data_class)).rsplit(".", 1)[-1]
        data.pop("_instantiator", None)
        for key in resolved:
            data.pop(key, None)
        if written_class == data_class.rsplit(".", 1)[-1] and _normalised(data) == wanted:
            return path
    return None


def check_resume(checkpoint_path: str, seed: Any, batch_size: Any) -> None:
    """Refuse, before any work, to resume a fit under another ``seed_everything`` or global
    ``batch_size``: its training order would not continue the interrupted one."""
    ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)
    written = (ckpt.get("clusterlight") or {}).get("seed")
    if not isinstance(seed, bool) and written is not None and seed is not None and int(written) != int(seed):
        raise ClusterlightError(f"ckpt_path {checkpoint_path} was trained with seed_everything {written}, this run has "
                                f"{seed}: resume with --seed_everything {written}")
    written = (ckpt.get("datamodule_hyper_parameters") or {}).get("batch_size")
    if written is not None and batch_size is not None and int(written) != int(batch_size):
        raise ClusterlightError(f"ckpt_path {checkpoint_path} was trained with data.batch_size {written}, this run has "
                                f"{batch_size}: resume with --data.batch_size {written}")
