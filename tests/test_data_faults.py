"""Data faults through the real entry point: one ``error:`` line naming the culprit, nothing written.

Each case damages a user's data the way it happens in practice (a corrupt or truncated image in
an image folder, an empty class folder, images of another size, a truncated or incomplete
``.npz``, an array of the wrong shape) and runs ``fit`` on it: the error must name the file or
folder, fit on one line, and come before the run folder, a checkpoint or a log exists. With
``skip_corrupt: true`` the unreadable files are skipped, counted and the fit runs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clusterlight.cli import main
from clusterlight.errors import ClusterlightError
from tests.conftest import METHOD_ARGS, base_args
from tests.test_data import make_folder, write_png

REPO = Path(__file__).resolve().parents[1]


def _corrupt_image(root: Path) -> tuple[str, str]:
    make_folder(root)
    (root / "dog" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return "folder", "3.png"


def _truncated_image(root: Path) -> tuple[str, str]:
    make_folder(root)
    (root / "cat" / "cut.png").write_bytes((root / "cat" / "0.png").read_bytes()[:50])
    return "folder", "cut.png"


def _empty_class(root: Path) -> tuple[str, str]:
    make_folder(root)
    (root / "bird").mkdir()
    return "folder", "bird"


def _other_size(root: Path) -> tuple[str, str]:
    make_folder(root)
    write_png(root / "dog" / "huge.png", np.zeros((40, 40), dtype=np.uint8))
    return "folder", "image_size"


def _truncated_npz(root: Path) -> tuple[str, str]:
    root.mkdir(parents=True)
    path = root / "data.npz"
    np.savez_compressed(path, images=np.zeros((60, 8, 8), dtype=np.uint8), labels=np.arange(60) % 3)
    path.write_bytes(path.read_bytes()[:300])
    return str(path), "data.npz"


def _npz_without_images(root: Path) -> tuple[str, str]:
    root.mkdir(parents=True)
    np.savez(root / "data.npz", pixels=np.zeros((60, 8, 8), dtype=np.uint8))
    return str(root / "data.npz"), "images"


def _npz_wrong_shape(root: Path) -> tuple[str, str]:
    root.mkdir(parents=True)
    np.savez(root / "data.npz", images=np.zeros((60, 8), dtype=np.uint8))
    return str(root / "data.npz"), "data.npz"


FAULTS = [_corrupt_image, _truncated_image, _empty_class, _other_size, _truncated_npz, _npz_without_images,
          _npz_wrong_shape]


def _fit_args(tmp_path: Path, source: str, data: Path) -> list[str]:
    dataset, root = ("folder", str(data)) if source == "folder" else ("npz", source)
    return ["fit", *METHOD_ARGS["AEKMeans"], "--data=ClusteringDataModule", f"--data.dataset={dataset}",
            f"--data.root={root}", "--data.batch_size=4", "--data.num_clusters=2",
            *base_args(tmp_path / "out", epochs=1, logger="csv")]


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.__name__.strip("_"))
def test_data_fault_is_one_line_and_writes_nothing(tmp_path: Path, fault) -> None:
    data = tmp_path / "data"
    source, needle = fault(data)
    before = sorted(str(p) for p in data.rglob("*"))
    with pytest.raises(ClusterlightError) as err:
        main(_fit_args(tmp_path, source, data))
    message = str(err.value)
    assert needle in message and "\n" not in message
    assert not (tmp_path / "out").exists()
    assert sorted(str(p) for p in data.rglob("*")) == before  # the user's files are untouched


def test_console_script_names_the_corrupt_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _corrupt_image(data)
    proc = subprocess.run([sys.executable, "-m", "clusterlight", *_fit_args(tmp_path, "folder", data)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "3.png" in last and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_skip_corrupt_counts_and_trains(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _corrupt_image(data)
    (data / "cat" / "cut.png").write_bytes((data / "cat" / "0.png").read_bytes()[:50])
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        cli = main([*_fit_args(tmp_path, "folder", data), "--data.skip_corrupt=true", "--data.test_fraction=0.25",
                    "--data.val_fraction=0.0", "--trainer.limit_val_batches=0"])
    assert cli.datamodule.split_summary["skipped_corrupt"] == 2
    dm = cli.datamodule
    assert len(dm.train_dataset) + len(dm.test_dataset) == 2 * 6 - 1  # 12 images, one overwritten with junk
    assert cli.trainer.global_step > 0
