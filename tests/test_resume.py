"""Exact resume: a fit stopped mid-epoch and resumed with ``fit --ckpt_path last`` ends as the
uninterrupted fit at the same seed, for every method (the crash variant of most methods is marked ``slow``).

Each method (``METHOD_ARGS``) is fitted three times on the same small split, through the real
entry point (:func:`clusterlight.cli.main`):

1. uninterrupted, 3 epochs (the reference);
2. stopped by a real SIGTERM to its own process in the middle of the second epoch (Lightning's
   handler finishes the batch, :class:`~clusterlight.callbacks.ClusteringCheckpoint` writes
   ``last.ckpt``), then resumed with the same command plus ``--ckpt_path last``;
3. crashed (an exception, as if the process died) a few batches after the last periodic
   checkpoint (``--checkpoint.last_every_n_batches``), then resumed the same way: the batches after
   that checkpoint are trained again.

The resumed runs must end with bit-identical weights and buffers (ensemble members, centroids,
cluster state, running statistics), and the same clusters on the training split. The real
out-of-process SIGTERM and SIGKILL of the console script are in ``tests/test_resume_process.py``.
"""

from __future__ import annotations

import glob
import os
import signal
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from clusterlight.cli import main
from clusterlight.errors import ClusterlightError
from tests.conftest import METHOD_ARGS, base_args, data_args, slow_cases

EPOCHS = 3

#: every method, plus schedulers: the two per-epoch schedulers of the manually optimised flagship
#: and Lightning's automatic scheduler stepping
CASES: dict[str, list[str]] = {
    **METHOD_ARGS,
    "DebiasedClustering-steplr": [*METHOD_ARGS["DebiasedClustering"], "--model.lr_scheduler=StepLR",
                                  "--model.lr_scheduler.step_size=1", "--model.lr_scheduler.gamma=0.5"],
    "DEC-steplr": [*METHOD_ARGS["DEC"], "--model.lr_scheduler=StepLR", "--model.lr_scheduler.step_size=1",
                   "--model.lr_scheduler.gamma=0.5"],
}


class StopAt(Callback):
    """Stops a fit after its ``step``-th training batch (counted over epochs).

    Args:
        step: the training batch after which to stop (1-based, over the whole fit).
        how: ``sigterm`` sends SIGTERM to this process (Lightning stops after the batch);
            ``crash`` raises, before the checkpoint callbacks of that batch run (a process death).
    """

    def __init__(self, step: int, how: str = "sigterm") -> None:
        self.step, self.how, self.seen = step, how, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen += 1
        if self.seen != self.step:
            return
        if self.how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            raise SimulatedCrash(f"simulated crash after training batch {self.step}")


class SimulatedCrash(RuntimeError):
    pass


def _args(tmp_path: Path, method: str, *extra: str) -> list[str]:
    return ["fit", *CASES[method], *data_args("digits", max_samples=400, batch_size=32),
            *base_args(tmp_path, epochs=EPOCHS, logger="none"), "--seed_everything=3", *extra]


def _batches_per_epoch(cli) -> int:
    return len(cli.datamodule.train_dataloader())


def _assert_same_end(reference, resumed, method: str) -> None:
    sa, sb = reference.model.state_dict(), resumed.model.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"{method}: {key} differs after resume"
    assert reference.trainer.global_step == resumed.trainer.global_step
    ds = reference.datamodule.train_dataset
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    reference.model.eval()
    resumed.model.eval()
    with torch.no_grad():
        assert torch.equal(reference.model.cluster_outputs(x).cluster, resumed.model.cluster_outputs(x).cluster)


def _only_run_folder(root: Path) -> Path:
    runs = sorted(glob.glob(str(root / "runs" / "*")))
    assert len(runs) == 1, runs  # the resumed fit continued in the interrupted run's folder
    return Path(runs[0])


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict:
    return {}


def _reference(references: dict, tmp_path_factory, method: str):
    if method not in references:
        references[method] = main(_args(tmp_path_factory.mktemp(f"ref-{method}"), method))
    return references[method]


#: Run only with ``-m slow``: covered in the default suite by a case with more of the same state
#: (``DebiasedClustering-augment`` has the neighbour pairs too, ``DebiasedClustering-steplr`` a
#: manually stepped scheduler, ``DEC`` and ``OnlineHardClustering`` the methods), or options no
#: shipped config sets (the online method's neighbour pairs and Sinkhorn assignments).
SLOW_SIGTERM = ("DebiasedClustering-neighbours", "DEC-steplr", "OnlineHardClustering-neighbours",
                "OnlineHardClustering-sinkhorn")


@pytest.mark.parametrize("method", slow_cases(sorted(CASES), SLOW_SIGTERM))
def test_sigterm_mid_epoch_then_resume(tmp_path: Path, tmp_path_factory, references: dict, method: str) -> None:
    reference = _reference(references, tmp_path_factory, method)
    per_epoch = _batches_per_epoch(reference)
    assert per_epoch >= 4
    stop = per_epoch + per_epoch // 2  # the middle of the second epoch
    with pytest.raises(SIGTERMException):
        main(_args(tmp_path, method, "--trainer.callbacks+=tests.test_resume.StopAt",
                   f"--trainer.callbacks.step={stop}"))
    run = _only_run_folder(tmp_path)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    loader_state = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert (loader_state["epoch"], loader_state["batches_done"]) == (1, per_epoch // 2)  # mid-epoch
    resumed = main(_args(tmp_path, method, "--ckpt_path=last"))
    assert _only_run_folder(tmp_path) == run
    assert resumed.trainer.ckpt_path == str(run / "checkpoints" / "last.ckpt")
    _assert_same_end(reference, resumed, method)


#: the crash variant of every case runs with ``-m slow``; these two (two optimizers and schedulers,
#: agglomeration state) in the default suite
CRASH_DEFAULT = ("DebiasedClustering-steplr", "JULE")


@pytest.mark.parametrize("method", slow_cases(sorted(CASES), set(CASES) - set(CRASH_DEFAULT)))
def test_crash_after_periodic_checkpoint_then_resume(tmp_path: Path, tmp_path_factory, references: dict,
                                                     method: str) -> None:
    reference = _reference(references, tmp_path_factory, method)
    per_epoch = _batches_per_epoch(reference)
    periodic = ["--checkpoint.last_every_n_batches=3"]
    stop = per_epoch + per_epoch // 2 + 2
    with pytest.raises(SimulatedCrash):
        main(_args(tmp_path, method, *periodic, "--trainer.callbacks+=tests.test_resume.StopAt",
                   f"--trainer.callbacks.step={stop}", "--trainer.callbacks.how=crash"))
    run = _only_run_folder(tmp_path)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    loader_state = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    saved_at = (stop - 1) // 3 * 3  # the last multiple of 3 before the crash
    assert (loader_state["epoch"], loader_state["batches_done"]) == divmod(saved_at, per_epoch)
    resumed = main(_args(tmp_path, method, *periodic, "--ckpt_path=last"))
    assert resumed.trainer.ckpt_path == str(run / "checkpoints" / "last.ckpt")
    _assert_same_end(reference, resumed, method)


def test_resume_without_earlier_run_starts_afresh(tmp_path: Path) -> None:
    cli = main(["fit", *CASES["AEKMeans"], *data_args("digits", max_samples=200, batch_size=32),
                *base_args(tmp_path, epochs=1, logger="none"), "--ckpt_path=last"])
    assert cli.trainer.ckpt_path is None and cli.trainer.current_epoch == 1


def test_resume_refuses_another_seed_or_batch_size(tmp_path: Path) -> None:
    common = [*CASES["AEKMeans"], *base_args(tmp_path, epochs=2, logger="none")]
    first = main(["fit", *common, *data_args("digits", max_samples=200, batch_size=32), "--seed_everything=3"])
    ckpt = first.trainer.checkpoint_callback.last_model_path
    before = sorted(p.name for p in Path(ckpt).parent.iterdir())
    with pytest.raises(ClusterlightError, match="seed_everything 3") as err:
        main(["fit", *common, *data_args("digits", max_samples=200, batch_size=32), "--seed_everything=4",
              "--ckpt_path=last"])
    assert "\n" not in str(err.value)
    with pytest.raises(ClusterlightError, match="batch_size 32"):
        main(["fit", *common, *data_args("digits", max_samples=200, batch_size=16), "--seed_everything=3",
              f"--ckpt_path={ckpt}"])
    assert len(list((tmp_path / "runs").iterdir())) == 1  # nothing new written
    assert sorted(p.name for p in Path(ckpt).parent.iterdir()) == before


def test_resume_continues_the_csv_logger_version(tmp_path: Path) -> None:
    args = ["fit", *CASES["AEKMeans"], *data_args("digits", max_samples=200, batch_size=32),
            *base_args(tmp_path, epochs=2, logger="csv")]
    with pytest.raises(SIGTERMException):
        main([*args, "--trainer.callbacks+=tests.test_resume.StopAt", "--trainer.callbacks.step=5"])
    other = main([*args[:3], *data_args("digits", max_samples=200, batch_size=32, seed=1), *args[3 + 3:],
                  "--trainer.max_epochs=1"])  # another data split in the same logger folder: not resumed
    assert other.trainer.ckpt_path is None
    resumed = main([*args, "--ckpt_path=last"])
    assert Path(resumed.trainer.logger.log_dir).name == "version_0"
    logs = Path(resumed.trainer.logger.log_dir).parent
    assert resumed.trainer.ckpt_path == str(logs / "version_0" / "checkpoints" / "last.ckpt")
    assert sorted(p.name for p in logs.iterdir() if p.name.startswith("version_")) == ["version_0", "version_1"]
    assert (logs / "version_0" / "config.yaml").exists()
    assert glob.glob(str(logs / "version_0" / "config.resumed-*.yaml"))


def test_resume_continues_the_wandb_run(tmp_path: Path) -> None:
    args = ["fit", *CASES["AEKMeans"], *data_args("digits", max_samples=200, batch_size=32),
            *base_args(tmp_path, epochs=2, logger="wandb")]
    with pytest.raises(SIGTERMException):
        main([*args, "--trainer.callbacks+=tests.test_resume.StopAt", "--trainer.callbacks.step=5"])
    (run,) = (tmp_path / "runs" / "clusterlight").iterdir()
    resumed = main([*args, "--ckpt_path=last"])
    assert resumed.trainer.logger.version == run.name  # the same W&B run id, hence the same run folder
    assert resumed.trainer.ckpt_path == str(run / "checkpoints" / "last.ckpt")
    assert [p.name for p in (tmp_path / "runs" / "clusterlight").iterdir()] == [run.name]


def test_resume_from_an_end_of_epoch_checkpoint(tmp_path: Path, tmp_path_factory, references: dict) -> None:
    """The common case: the per-validation checkpoint of the first epoch (not ``last``)."""
    reference = _reference(references, tmp_path_factory, "AEKMeans")
    with pytest.raises(SIGTERMException):
        main(_args(tmp_path, "AEKMeans", "--checkpoint.save_top_k=-1", "--trainer.callbacks+=tests.test_resume.StopAt",
                   f"--trainer.callbacks.step={_batches_per_epoch(reference) + 2}"))
    (first,) = glob.glob(str(_only_run_folder(tmp_path) / "checkpoints" / "epoch=0-*.ckpt"))
    loader_state = torch.load(first, map_location="cpu", weights_only=True)["loops"]["fit_loop"]["state_dict"]
    assert loader_state["combined_loader"][0]["batches_done"] == _batches_per_epoch(reference)  # a whole epoch
    resumed = main(_args(tmp_path, "AEKMeans", f"--ckpt_path={first}"))
    _assert_same_end(reference, resumed, "AEKMeans")
