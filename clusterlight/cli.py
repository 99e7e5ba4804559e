"""The ``clusterlight`` command line: a LightningCLI over clusterlight's methods and data.

Examples::

    clusterlight fit --config configs/dec/usps.yaml
    clusterlight test --config configs/dec/usps.yaml --ckpt_path <run>/checkpoints/last.ckpt
    clusterlight predict --config configs/dec/usps.yaml --ckpt_path <run>/checkpoints/last.ckpt
    clusterlight fit --model AEKMeans --data ClusteringDataModule --data.dataset digits
    clusterlight fit --config configs/dec/usps.yaml --print_config

``main(args)`` runs the same CLI in-process and returns the :class:`ClusterlightCLI`, so tests,
scripts and notebooks can read ``cli.trainer.callback_metrics`` or ``cli.model``. ``<run>`` is a run
folder, ``runs/clusterlight/<id>`` by default; ``predict`` writes a CSV with ``--predictions.path``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

import clusterlight.data  # noqa: F401  (registers the DataModules for short names)
import clusterlight.methods  # noqa: F401  (registers the methods for short names)
from clusterlight.callbacks import (ClusteringCheckpoint, ClusteringFigures, CollapseMonitor, PredictionWriter,
                                   SaveRunConfig)
from clusterlight.data import ClusteringDataModule
from clusterlight.errors import ClusterlightError
from clusterlight.methods.base import ClusteringModule
from clusterlight.resume import check_resume, find_last_checkpoint, run_location

#: Trainer settings used unless a config or the command line says otherwise.
TRAINER_DEFAULTS: dict[str, Any] = {
    "max_epochs": 50,
    "logger": {
        "class_path": "lightning.pytorch.loggers.WandbLogger",
        "init_args": {"project": "clusterlight", "save_dir": "runs", "offline": True},
    },
}


class ClusterlightCLI(LightningCLI):
    """LightningCLI with clusterlight's links, callbacks and checks.

    - ``data.num_clusters`` and ``data.input_shape`` are read from the instantiated DataModule
      and passed to the model: nobody types them twice.
    - ``--checkpoint.*`` configures the ModelCheckpoint (label-free ``val/loss`` by default,
      plus ``last.ckpt``); ``--figures.*`` the evaluation figures; ``--predictions.path`` the
      prediction CSV; ``--collapse.*`` the collapse warning.
    - A ``--ckpt_path`` written by another method is refused before any work starts (LightningCLI
      would otherwise swap in the checkpoint's class and arguments).
    - With ``--ckpt_path`` the model's arguments are the checkpoint's (LightningCLI replaces the
      config's with them, so the weights fit the architecture), and then the ``--model.*`` options
      given on the command line are applied on top: ``clusterlight test ... --ckpt_path <ckpt>
      --model.init_args.ood_scaling=global`` tests with global scaling instead of silently using
      the checkpoint's value. Weights that do not fit the model those options build are refused
      before the Trainer starts.
    """

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # the raw command line, for the --model.* options re-applied over a checkpoint's arguments
        # (a dict or Namespace of arguments has no command line: nothing to re-apply)
        self._raw_args = list(sys.argv[1:]) if args is None else list(args) if isinstance(args, (list, tuple)) else []
        super().parse_arguments(parser, args)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_clusters", "model.init_args.num_clusters", apply_on="instantiate")
        parser.link_arguments("data.input_shape", "model.init_args.input_shape", apply_on="instantiate")
        parser.add_lightning_class_args(ClusteringCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/loss",
            "checkpoint.mode": "min",
            "checkpoint.save_last": True,
            "checkpoint.save_top_k": 1,
        })
        parser.add_lightning_class_args(ClusteringFigures, "figures")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(CollapseMonitor, "collapse")
        parser.add_argument(
            "--test_after_fit", type=bool, default=False,
            help="fit only: test the best checkpoint (label-free choice) when fitting ends, printing ACC/NMI/ARI",
        )

    def _ckpt_path(self) -> str | None:
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        return None if ckpt in (None, "last", "best", "hpc", "registry") else str(ckpt)

    def _resolve_last(self) -> None:
        """``fit --ckpt_path last``: the newest ``last`` checkpoint of an earlier run of this method on
        the same data (see :mod:`clusterlight.resume`); the fit continues in that run's folder."""
        self._resume_dir = None
        if self.config.get("subcommand") != "fit" or self.config.fit.get("ckpt_path") != "last":
            return
        cfg = self.config.fit
        if cfg.checkpoint.get("dirpath"):
            return  # a fixed checkpoint folder: Lightning finds last.ckpt there itself
        location = run_location(cfg.trainer)
        if location is None:
            return
        method = str(cfg.model.class_path).rsplit(".", 1)[-1]
        found = find_last_checkpoint(location, method, str(cfg.data.class_path), cfg.data.init_args)
        if found is None:
            rank_zero_info(f"clusterlight: --ckpt_path last: no earlier {method} run on these data settings has a last "
                           f"checkpoint under {location.root}; starting a new run")
            cfg.ckpt_path = None
            return
        run_folder = os.path.dirname(os.path.dirname(found))
        if location.key is not None and location.version is None:
            logger = cfg.trainer.logger[0] if isinstance(cfg.trainer.logger, list) else cfg.trainer.logger
            logger.init_args[location.key] = os.path.basename(run_folder)  # same run folder (and W&B id)
        self._resume_dir = run_folder
        cfg.ckpt_path = found
        rank_zero_info(f"clusterlight: resuming {found}")

    def _parse_ckpt_path(self) -> None:
        self._resolve_last()
        # LightningCLI replaces the model's arguments, and its class, with the checkpoint's
        # hyperparameters. A checkpoint of another method would silently swap the method:
        # refuse it instead, before anything is instantiated.
        ckpt = self._ckpt_path()
        if ckpt is not None:
            if not os.path.isfile(ckpt):
                raise ClusterlightError(f"ckpt_path {ckpt} does not exist")
            try:
                checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
                raise ClusterlightError(f"ckpt_path {ckpt} is not a readable checkpoint ({type(err).__name__})") from None
            # the weights' shapes, for _check_checkpoint_fits once the model is built (no second load)
            self._ckpt_shapes = {name: tuple(value.shape) for name, value in checkpoint.get("state_dict", {}).items()}
            wanted = self.config[self.config.subcommand]["model"]["class_path"]
            written = checkpoint.get("hyper_parameters", {}).get("_class_path")
            info = checkpoint.get("clusterlight") or {}
            if info.get("method") is None:
                raise ClusterlightError(f"ckpt_path {ckpt} was not written by clusterlight")
            if (written or "").rsplit(".", 1)[-1] != wanted.rsplit(".", 1)[-1] or info["method"] != wanted.rsplit(".", 1)[-1]:
                raise ClusterlightError(
                    f"ckpt_path {ckpt} was written by method {info['method']}, but the model is "
                    f"{wanted.rsplit('.', 1)[-1]}: use --model {info['method']}"
                )
            if self.config.subcommand == "fit":
                check_resume(ckpt, self.config.fit.get("seed_everything"),
                             (self.config.fit.data.get("init_args") or {}).get("batch_size"))
        super()._parse_ckpt_path()
        if ckpt is not None:
            self._reapply_model_options()

    def _reapply_model_options(self) -> None:
        """The command line's ``--model.*`` options over the checkpoint's model arguments."""
        raw = getattr(self, "_raw_args", [])
        given: list[str] = []
        for i, token in enumerate(raw):
            if not isinstance(token, str) or not token.startswith("--model."):
                continue  # the bare --model (the class) already matches the checkpoint's method
            given += [token] if "=" in token else [token, *raw[i + 1:i + 2]]
        if not given:
            return
        sub = self.config.subcommand
        before = self.config[sub].model.clone()
        self.config = self.parser.parse_args([sub, *given], namespace=self.config)
        after = self.config[sub].model
        changed = [f"{key.split('.')[-1]} ({before[key]!r} -> {after[key]!r})" for key in after.keys()
                   if key in before and before[key] != after[key]]
        if changed:
            rank_zero_info("clusterlight: model options from the command line applied over the checkpoint's: "
                           + ", ".join(changed))

    def _check_checkpoint_fits(self) -> None:
        """Refuse a ``--ckpt_path`` whose weights do not fit the model (one line, before the Trainer
        starts): a ``--model.*`` option on the command line changed the architecture."""
        ckpt, saved = self._ckpt_path(), getattr(self, "_ckpt_shapes", None)
        if ckpt is None or saved is None:
            return
        for name, param in self.model.named_parameters():
            if name in saved and saved[name] != tuple(param.shape):
                raise ClusterlightError(
                    f"ckpt_path {ckpt} does not fit the model: {name} is {saved[name]} in the checkpoint, "
                    f"{tuple(param.shape)} in the model (a --model option on the command line changes the architecture)")

    def _preflight(self) -> None:
        """Find bad input before the Trainer starts (loggers create run folders at its start)."""
        self._check_checkpoint_fits()
        if not getattr(self.datamodule, "download", False):
            # Loads the data and builds the splits now; the Trainer's own setup call reuses them.
            self.datamodule.setup(self.config.get("subcommand"))
            if self.config.get("subcommand") == "fit":
                self.model.check_data(self.datamodule)

    def before_fit(self) -> None:
        self._preflight()
        if getattr(self, "_resume_dir", None):
            self.trainer._clusterlight_resume_dir = self._resume_dir  # type: ignore[attr-defined]

    def after_fit(self) -> None:
        if self.config.fit.get("test_after_fit"):
            best = self.trainer.checkpoint_callback.best_model_path if self.trainer.checkpoint_callback else ""
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)

    def before_validate(self) -> None:
        self._preflight()

    def before_test(self) -> None:
        self._preflight()

    def before_predict(self) -> None:
        self._preflight()


def _user_error(err: BaseException) -> ClusterlightError | None:
    """The :class:`ClusterlightError` behind ``err``: jsonargparse wraps errors raised in ``__init__``."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ClusterlightError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def main(args: list[str] | None = None, run: bool = True) -> ClusterlightCLI:
    """Run the clusterlight CLI in-process (``args`` as on the command line) and return it.

    Bad input raises :class:`ClusterlightError` with a one-line message, also when jsonargparse
    caught it while instantiating the model or the DataModule.
    """
    try:
        return _build(args, run)
    except Exception as err:
        user = _user_error(err)
        if user is None or user is err:
            raise
        raise ClusterlightError(str(user)) from None


def _build(args: list[str] | None, run: bool) -> ClusterlightCLI:
    return ClusterlightCLI(
        ClusteringModule,
        ClusteringDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        seed_everything_default=0,
        save_config_callback=SaveRunConfig,
        save_config_kwargs={"overwrite": True},
        trainer_defaults=TRAINER_DEFAULTS,
        args=args,
        run=run,
        parser_kwargs={"default_env": False},
    )


def cli_entry() -> None:
    """Console script: bad input ends with one ``error:`` line and exit status 2.

    ``clusterlight bench ...`` is the benchmark runner (:mod:`clusterlight.bench`).
    """
    if sys.argv[1:2] == ["bench"]:
        from clusterlight.bench import main as bench_main

        raise SystemExit(bench_main(sys.argv[2:]))
    try:
        main()
    except ClusterlightError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except SIGTERMException:  # Lightning stopped the fit after a batch; ClusteringCheckpoint saved last.ckpt
        print("clusterlight: stopped by SIGTERM; continue with the same command and --ckpt_path last", file=sys.stderr)
        raise SystemExit(128 + 15) from None
    else:
        _close_process_group()


def _close_process_group() -> None:
    """Destroy the default process group of a finished multi-process run, while the interpreter is whole.

    Left to interpreter exit, a gloo process group's worker threads can end the process with
    "terminate called without an active exception" (SIGABRT) after the run has finished, which a
    job scheduler reports as a failure (seen once in ``tests/test_torchrun.py``; pytorch/pytorch#190489).
    Only after a run that ended normally: with an error, another rank may still wait in a collective.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    cli_entry()
