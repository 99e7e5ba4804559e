"""Exact resume of the console script after a real SIGTERM and a real SIGKILL from outside.

``clusterlight fit`` runs in its own process; once it is training its second epoch it is sent
SIGTERM (it must exit with status 143 after writing ``last.ckpt``) or SIGKILL (it dies at once;
``--checkpoint.last_every_n_batches 2`` left a recent ``last.ckpt``). The same command with
``--ckpt_path last`` then finishes the fit, which must end with the weights of an uninterrupted
fit, bit for bit. (The SIGTERM case is marked ``slow``: the in-process tests send a real SIGTERM
too.) The per-method in-process variants are in ``tests/test_resume.py``.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from tests.conftest import METHOD_ARGS, base_args, data_args

REPO = Path(__file__).resolve().parents[1]


def _command(root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "clusterlight", "fit", *METHOD_ARGS["AEKMeans"],
            *data_args("digits", max_samples=400, batch_size=16), *base_args(root, epochs=3, logger="none"),
            "--seed_everything=5", "--checkpoint.last_every_n_batches=2", *extra]


def _env() -> dict[str, str]:
    # one thread in every process: float reductions then run in the same order in all three fits
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline"}


def _last(root: Path) -> dict:
    (run,) = glob.glob(str(root / "runs" / "*"))  # one run folder: a resumed fit continues the interrupted one
    return torch.load(Path(run) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("reference")
    subprocess.run(_command(root), cwd=REPO, env=_env(), check=True, capture_output=True, timeout=300)
    ckpt = _last(root)
    assert ckpt["epoch"] == 2  # the last validation of the 3 epochs
    return ckpt


class Pace(Callback):
    """From training batch ``after`` on (counted over epochs), touch ``marker`` and sleep ``seconds``
    after every batch, so that a signal from outside lands in a known stretch of the fit (the
    sleeps change no result).

    Args:
        marker: file created once batch ``after`` is done.
        after: 1-based training batch over the whole fit.
        seconds: pause after each later batch.
    """

    def __init__(self, marker: str, after: int, seconds: float = 0.05) -> None:
        self.marker, self.after, self.seconds, self.seen = marker, after, seconds, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen += 1
        if self.seen >= self.after:
            Path(self.marker).touch()
            time.sleep(self.seconds)


def _stop_in_second_epoch(root: Path, sig: int) -> subprocess.CompletedProcess:
    marker = root / "second-epoch"
    # digits: 400 samples, 360 in training: 22 batches of 16 per epoch; batch 30 is in the second epoch
    pace = ["--trainer.callbacks+=tests.test_resume_process.Pace", f"--trainer.callbacks.marker={marker}",
            "--trainer.callbacks.after=30"]
    proc = subprocess.Popen(_command(root, *pace), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.12)  # a couple of batches later, at no fixed point
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("sig", [pytest.param(signal.SIGTERM, marks=pytest.mark.slow), signal.SIGKILL],
                         ids=["sigterm", "sigkill"])
def test_killed_process_resumes_exactly(tmp_path: Path, reference: dict, sig: int) -> None:
    stopped = _stop_in_second_epoch(tmp_path, sig)
    if sig == signal.SIGTERM:
        assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
        assert "stopped by SIGTERM" in stopped.stderr
    else:
        assert stopped.returncode == -signal.SIGKILL
    interrupted = _last(tmp_path)
    assert 0 < interrupted["global_step"] < reference["global_step"]  # it really stopped early
    resumed = subprocess.run(_command(tmp_path, "--ckpt_path=last"), cwd=REPO, env=_env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "clusterlight: resuming" in resumed.stderr + resumed.stdout
    final = _last(tmp_path)
    assert final["global_step"] == reference["global_step"]
    weights, expected = final["state_dict"], reference["state_dict"]
    assert weights.keys() == expected.keys()
    for key in expected:
        assert torch.equal(weights[key], expected[key]), f"{key} differs after resume"
