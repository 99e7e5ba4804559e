"""Tests of clusterlight.data: sources, long-tail / OOD splits and the data module."""

from __future__ import annotations

import gzip
import inspect
import math
import os
import random
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DistributedSampler, SequentialSampler

import clusterlight.data as cdata
from clusterlight.data import (
    DATASETS,
    ClusteringDataModule,
    ClusteringDataset,
    ImageArrays,
    long_tail_counts,
)
from clusterlight.data.datamodule import GlobalBatchSampler
from clusterlight.data.datasets import DEFAULT_ROOT, convert_images, read_idx
from clusterlight.errors import ClusterlightError

ASSETS = Path(cdata.__file__).resolve().parent / "assets"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def raw_usps() -> tuple[np.ndarray, np.ndarray]:
    """The shipped USPS archive, read directly (independent of the code under test)."""
    with np.load(ASSETS / "usps.npz") as data:
        return data["images"], data["labels"]


def all_items(dm: ClusteringDataModule, split: str) -> dict[str, torch.Tensor]:
    """Every batch of a split's data loader, concatenated."""
    loader = getattr(dm, f"{split}_dataloader")()
    batches = list(loader)
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


# --------------------------------------------------------------------------- long-tail counts
def by_formula(available, ratio, profile, order):
    """The long-tail rule written out with Python scalars, rank by rank."""
    c, n_max = len(available), max(available)
    out = [0] * c
    for r, cls in enumerate(order):
        if profile == "exp":
            target = math.floor(n_max * ratio ** (-r / (c - 1)))
        else:
            target = n_max if r < math.ceil(c / 2) else math.floor(n_max / ratio)
        out[cls] = min(max(target, 1), available[cls])
    return out


def test_long_tail_exp_by_hand():
    # ranks: class 2 (head) 500, class 0 500 * 100^-1/2 = 50, class 1 (tail) 500 / 100 = 5
    assert long_tail_counts([500, 500, 500], 100, "exp", np.array([2, 0, 1])).tolist() == [50, 5, 500]
    # 1100 * 10^(-r/9) = 1100, 851.7, 659.4, 510.6, 395.3, 306.1, 237.0 (236.99), 183.5, 142.1, 110
    got = long_tail_counts([1100] * 10, 10, "exp", np.arange(10))
    assert got.tolist() == [1100, 851, 659, 510, 395, 306, 236, 183, 142, 110]


def test_long_tail_step_by_hand():
    assert long_tail_counts([100] * 5, 4, "step", np.arange(5)).tolist() == [100, 100, 100, 25, 25]
    assert long_tail_counts([90] * 4, 3, "step", np.array([3, 2, 1, 0])).tolist() == [30, 30, 90, 90]
    assert long_tail_counts([101] * 3, 2.5, "step", np.array([1, 2, 0])).tolist() == [40, 101, 101]


def test_long_tail_clipping_and_minimum_one():
    # class 0 would get floor(1000 / sqrt(1000)) = 31 but has only 10; the tail gets 1
    assert long_tail_counts([10, 1000, 3], 1000, "exp", np.array([1, 0, 2])).tolist() == [10, 1000, 1]
    assert long_tail_counts([100, 100], 1e6, "exp", np.array([0, 1])).tolist() == [100, 1]
    assert long_tail_counts([100, 100], 1e6, "step", np.array([1, 0])).tolist() == [1, 100]
    assert long_tail_counts([7, 5, 9], 1, "exp", np.array([0, 1, 2])).tolist() == [7, 5, 9]


@pytest.mark.parametrize("profile", ["exp", "step"])
@pytest.mark.parametrize("c, ratio", [(2, 10), (5, 3.5), (10, 10), (10, 100), (20, 50), (7, 2)])
def test_long_tail_matches_formula(profile, c, ratio):
    rng = np.random.default_rng(c)
    available = rng.integers(50, 1000, size=c).tolist()
    order = rng.permutation(c)
    got = long_tail_counts(available, ratio, profile, order)
    assert got.dtype == np.int64
    assert got.tolist() == by_formula(available, ratio, profile, order.tolist())


# --------------------------------------------------------------------------- long tail in the data module
@pytest.fixture(scope="module")
def usps_lt() -> ClusteringDataModule:
    dm = ClusteringDataModule(dataset="usps", imbalance_ratio=10, seed=0, batch_size=1024)
    dm.setup("fit")
    return dm


def train_val_counts(dm: ClusteringDataModule) -> np.ndarray:
    labels = torch.cat([dm.train_dataset.labels, dm.val_dataset.labels[~dm.val_dataset.ood]])
    return np.bincount(labels.numpy(), minlength=dm.num_classes)


def test_usps_long_tail_counts(usps_lt):
    order = usps_lt.split_summary["class_order"]
    assert sorted(order) == list(range(10))
    # 20% of every class (1,100 each) is held out for test: 880 per class remain
    realized = train_val_counts(usps_lt)
    assert realized.tolist() == long_tail_counts([880] * 10, 10, "exp", np.array(order)).tolist()
    assert [realized[c] for c in order] == [math.floor(880 * 10 ** (-r / 9)) for r in range(10)]
    assert usps_lt.train_class_counts.tolist() == np.bincount(usps_lt.train_dataset.labels.numpy()).tolist()
    # the test split keeps its natural balance
    assert np.bincount(usps_lt.test_dataset.labels.numpy()).tolist() == [220] * 10
    # val is a stratified 10%
    val = np.bincount(usps_lt.val_dataset.labels.numpy(), minlength=10)
    assert abs(int(val.sum()) - round(0.1 * realized.sum())) <= 1
    assert np.all(np.abs(val - 0.1 * realized) <= 1.5)


def test_class_order_depends_on_seed_only(usps_lt):
    same = ClusteringDataModule(dataset="usps", imbalance_ratio=10, seed=0, val_fraction=0.3, batch_size=64)
    same.setup()
    assert same.split_summary["class_order"] == usps_lt.split_summary["class_order"]
    assert train_val_counts(same).tolist() == train_val_counts(usps_lt).tolist()
    again = ClusteringDataModule(dataset="usps", imbalance_ratio=10, seed=0)
    again.setup()
    assert np.array_equal(again.train_dataset.source_index, usps_lt.train_dataset.source_index)
    assert torch.equal(again.train_dataset.images, usps_lt.train_dataset.images)
    other = ClusteringDataModule(dataset="usps", imbalance_ratio=10, seed=1)
    other.setup()
    assert other.split_summary["class_order"] != usps_lt.split_summary["class_order"]
    assert train_val_counts(other).tolist() != train_val_counts(usps_lt).tolist()


def test_setup_leaves_global_rng_alone():
    np_state, torch_state, py_state = np.random.get_state(), torch.get_rng_state(), random.getstate()
    dm = ClusteringDataModule(dataset="usps", imbalance_ratio=10, ood_classes=[1], seed=3, max_samples=5000,
                              imbalance_test=True)
    dm.setup()
    dm.setup()  # idempotent
    dm.train_dataloader()
    after = np.random.get_state()
    assert np_state[0] == after[0] and np.array_equal(np_state[1], after[1]) and np_state[2:] == after[2:]
    assert torch.equal(torch_state, torch.get_rng_state())
    assert py_state == random.getstate()


def test_imbalance_test_and_step_profile():
    dm = ClusteringDataModule(dataset="usps", imbalance_ratio=4, imbalance_profile="step", imbalance_test=True)
    dm.setup()
    order = dm.split_summary["class_order"]
    assert train_val_counts(dm).tolist() == by_formula([880] * 10, 4, "step", order)
    test_counts = np.bincount(dm.test_dataset.labels.numpy(), minlength=10)
    assert test_counts.tolist() == by_formula([220] * 10, 4, "step", order)
    assert sorted(test_counts.tolist()) == [55] * 5 + [220] * 5


# --------------------------------------------------------------------------- held-out OOD classes
@pytest.fixture(scope="module")
def usps_ood() -> ClusteringDataModule:
    dm = ClusteringDataModule(dataset="usps", ood_classes=[3, 7], ood_fraction=0.2, batch_size=1000, drop_last=False)
    dm.setup()
    return dm


def test_ood_classes_never_in_training(usps_ood, raw_usps):
    images, labels = raw_usps
    remap = {c: i for i, c in enumerate([0, 1, 2, 4, 5, 6, 8, 9])}
    seen = 0
    for batch in usps_ood.train_dataloader():
        src = usps_ood.train_dataset.source_index[batch["index"].numpy()]
        original = labels[src]
        assert not np.isin(original, [3, 7]).any()
        assert batch["label"].tolist() == [remap[c] for c in original.tolist()]
        assert not batch["ood"].any()
        assert torch.equal((batch["image"] * 255).round().to(torch.uint8)[:, 0], torch.from_numpy(images[src]))
        seen += len(src)
    assert seen == len(usps_ood.train_dataset)
    assert set(usps_ood.train_dataset.labels.tolist()) == set(range(8))
    assert usps_ood.num_classes == usps_ood.num_clusters == 8
    assert usps_ood.class_names == ["0", "1", "2", "4", "5", "6", "8", "9"]


@pytest.mark.parametrize("split", ["val", "test"])
def test_ood_fraction_in_val_and_test(usps_ood, raw_usps, split):
    _, labels = raw_usps
    items = all_items(usps_ood, split)
    ds = getattr(usps_ood, f"{split}_dataset")
    ood = items["ood"]
    n_ood, n_id = int(ood.sum()), int((~ood).sum())
    assert n_ood == round(0.2 / 0.8 * n_id)
    assert abs(n_ood / len(ood) - 0.2) < 1 / len(ood) + 1e-9
    assert (items["label"][ood] == -1).all()
    assert set(items["label"][~ood].tolist()) == set(range(8))
    src = ds.source_index[items["index"].numpy()]
    assert np.isin(labels[src[ood.numpy()]], [3, 7]).all()
    assert not np.isin(labels[src[~ood.numpy()]], [3, 7]).any()
    assert usps_ood.split_summary["n_ood"][split] == n_ood


def test_ood_val_and_test_are_disjoint(usps_ood):
    val, test = usps_ood.val_dataset, usps_ood.test_dataset
    assert not set(val.source_index[val.ood.numpy()]) & set(test.source_index[test.ood.numpy()])


def test_ood_dataset_resized_and_flagged(raw_usps):
    images, _ = raw_usps
    dm = ClusteringDataModule(dataset="digits", ood_dataset="usps", ood_fraction=0.2)
    dm.setup()
    for split in ("val", "test"):
        ds = getattr(dm, f"{split}_dataset")
        ood = ds.ood.numpy()
        assert ds.images.shape[1:] == (1, 8, 8)
        assert ood.sum() == round(0.25 * (~ood).sum()) > 0
        assert (ds.labels[ds.ood] == -1).all() and (ds.labels[~ds.ood] >= 0).all()
        k = int(np.flatnonzero(ood)[0])
        raw = torch.from_numpy(images[ds.source_index[k]]).float()[None, None]
        ref = F.interpolate(raw, size=(8, 8), mode="bilinear", antialias=True, align_corners=False)
        assert torch.allclose(ds[k]["image"], ref[0].round().clamp(0, 255) / 255, atol=1 / 255 + 1e-6)
        assert ds[k]["ood"] is True
    assert not len(dm.train_dataset.ood.nonzero())
    # gray OOD images are repeated to three channels for an RGB main dataset
    rgb = ClusteringDataModule(dataset="digits", ood_dataset="usps", channels=3)
    rgb.setup()
    assert rgb.input_shape == (3, 8, 8)
    ood_images = rgb.test_dataset.images[rgb.test_dataset.ood]
    assert ood_images.shape[1] == 3 and torch.equal(ood_images[:, 0], ood_images[:, 2])


def test_convert_images_rgb_to_gray_and_resize():
    rgb = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    rgb[..., 1] = 100
    gray = convert_images(rgb, channels=1)
    assert gray.shape == (2, 1, 4, 4)
    assert int(gray[0, 0, 0, 0]) == round(0.299 * 200 + 0.587 * 100)
    flat = np.full((1, 6, 6, 1), 77, dtype=np.uint8)
    assert torch.equal(convert_images(flat, size=(3, 3)), torch.full((1, 1, 3, 3), 77, dtype=torch.uint8))


# --------------------------------------------------------------------------- split disjointness, eval_on
def test_splits_disjoint_with_eval_on_test(usps_lt):
    train, val, test = (set(getattr(usps_lt, f"{s}_dataset").source_index.tolist()) for s in ("train", "val", "test"))
    assert len(train) == len(usps_lt.train_dataset)
    assert not train & val and not train & test and not val & test
    assert len(test) == 2200


def test_eval_on_all_is_train_plus_val(raw_usps):
    dm = ClusteringDataModule(dataset="usps", eval_on="all", ood_classes=[0], ood_fraction=0.1)
    dm.setup()
    train, val, test = dm.train_dataset, dm.val_dataset, dm.test_dataset
    id_val, id_test = ~val.ood.numpy(), ~test.ood.numpy()
    expected = np.concatenate([train.source_index, val.source_index[id_val]])
    assert np.array_equal(np.sort(test.source_index[id_test]), np.sort(expected))
    # the whole data set is used: no held-out test part
    assert len(expected) + int((raw_usps[1] == 0).sum()) == 11000
    assert torch.equal(test.images[torch.from_numpy(id_test)],
                       torch.cat([train.images, val.images[torch.from_numpy(id_val)]]))
    # OOD in test: the fraction of the (larger) test split, a superset of val's OOD samples
    assert int(test.ood.sum()) == round(0.1 / 0.9 * id_test.sum())
    assert set(val.source_index[~id_val]) <= set(test.source_index[~id_test])


# --------------------------------------------------------------------------- idx files
def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_mnist(folder: Path, gz: bool, n_train: int = 60, n_test: int = 20) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    for name, array in arrays.items():
        write_idx(folder / (name + (".gz" if gz else "")), array)
    return arrays


@pytest.mark.parametrize("layout, gz", [("", False), ("raw", True), ("MNIST/raw", False)])
def test_mnist_idx_layouts(tmp_path, layout, gz):
    arrays = make_mnist(tmp_path / layout if layout else tmp_path, gz)
    data = DATASETS["mnist"].load(str(tmp_path), split="all")
    assert data.images.shape == (80, 28, 28, 1)
    assert np.array_equal(data.images[:60, ..., 0], arrays["train-images-idx3-ubyte"])
    assert np.array_equal(data.labels[60:], arrays["t10k-labels-idx1-ubyte"])
    dm = ClusteringDataModule(dataset="mnist", root=str(tmp_path), val_fraction=0.2)
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (48, 12, 20)
    assert set(dm.test_dataset.source_index.tolist()) == set(range(60, 80))


def test_idx_truncated_names_file(tmp_path):
    make_mnist(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ClusterlightError, match="train-images-idx3-ubyte") as err:
        DATASETS["mnist"].load(str(tmp_path), split="train")
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def fashion_all() -> ImageArrays:
    if not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST idx files not in {FASHION_DIR} (apt-get install dataset-fashion-mnist)")
    return DATASETS["fashion_mnist"].load(str(FASHION_DIR), split="all")


def test_fashion_mnist_matches_torchvision_parser(fashion_all, tmp_path):
    from torchvision.datasets.mnist import read_image_file, read_label_file

    assert fashion_all.images.shape == (70000, 28, 28, 1)
    assert np.bincount(fashion_all.labels).tolist() == [7000] * 10
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-labels-idx1-ubyte"):
        with gzip.open(FASHION_DIR / f"{name}.gz", "rb") as src, open(tmp_path / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    test_images = read_image_file(str(tmp_path / "t10k-images-idx3-ubyte")).numpy()
    assert np.array_equal(fashion_all.images[60000:, ..., 0], test_images)
    assert np.array_equal(fashion_all.labels[60000:], read_label_file(str(tmp_path / "t10k-labels-idx1-ubyte")))
    assert np.array_equal(fashion_all.labels[:60000], read_label_file(str(tmp_path / "train-labels-idx1-ubyte")))
    # our parser reads the decompressed file the same way as the .gz one
    assert np.array_equal(read_idx(tmp_path / "t10k-images-idx3-ubyte"), test_images)


def test_missing_idx_files_explain_what_to_do(tmp_path):
    with pytest.raises(ClusterlightError) as err:
        ClusteringDataModule(dataset="fashion_mnist", root=str(tmp_path))
    msg = str(err.value)
    assert str(tmp_path) in msg and "download: true" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and str(FASHION_DIR) in msg
    with pytest.raises(ClusterlightError, match="download: true") as err:
        DATASETS["mnist"].load(str(tmp_path), split="train")
    assert "apt-get" not in str(err.value)


# --------------------------------------------------------------------------- image folders
def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_folder(root: Path, classes=("cat", "dog"), per_class=6, shape=(5, 7), rgb_file: bool = False):
    rng = np.random.default_rng(1)
    written = {}
    for c in classes:
        for i in range(per_class):
            array = rng.integers(0, 256, shape, dtype=np.uint8)
            path = root / c / f"{i}.png" if c else root / f"{i}.png"
            write_png(path, array)
            written[str(path)] = array
    if rgb_file:
        array = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        path = root / classes[0] / "color.png"
        write_png(path, array)
        written[str(path)] = array
    return written


def test_folder_labelled(tmp_path):
    written = make_folder(tmp_path)
    dm = ClusteringDataModule(dataset="folder", root=str(tmp_path), test_fraction=0.25, val_fraction=0.25)
    assert dm.input_shape == (1, 5, 7) and dm.num_classes == dm.num_clusters == 2
    assert dm.class_names == ["cat", "dog"]
    dm.setup()
    seen = set()
    for split in ("train", "val", "test"):
        ds = getattr(dm, f"{split}_dataset")
        for i in range(len(ds)):
            item, path = ds[i], ds.paths[i]
            assert torch.equal((item["image"][0] * 255).round().to(torch.uint8), torch.from_numpy(written[path]))
            assert item["label"] == ["cat", "dog"].index(Path(path).parent.name)
            seen.add(path)
    assert seen == set(written)
    # test: round(0.25 * 12) = 3 (stratified 2 + 1); val: round(0.25 * 9) = 2
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (7, 2, 3)


def test_folder_rgb_and_unlabelled(tmp_path):
    make_folder(tmp_path / "mixed", rgb_file=True)
    assert ClusteringDataModule(dataset="folder", root=str(tmp_path / "mixed")).input_shape == (3, 5, 7)
    make_folder(tmp_path / "flat", classes=("",), per_class=10)
    dm = ClusteringDataModule(dataset="folder", root=str(tmp_path / "flat"), num_clusters=2, test_fraction=0.2)
    assert dm.num_classes is None and dm.class_names is None
    dm.setup()
    assert len(dm.train_dataset) + len(dm.val_dataset) + len(dm.test_dataset) == 10
    assert (dm.train_dataset.labels == -1).all() and not dm.train_dataset.ood.any()


def test_folder_corrupt_file(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "dog" / "bad.png").write_bytes(b"this is not an image")
    good = tmp_path / "cat" / "0.png"
    (tmp_path / "cat" / "truncated.png").write_bytes(good.read_bytes()[:60])
    dm = ClusteringDataModule(dataset="folder", root=str(tmp_path))
    with pytest.raises(ClusterlightError, match=r"(bad|truncated)\.png.*skip_corrupt") as err:
        dm.setup()
    assert "\n" not in str(err.value)
    dm = ClusteringDataModule(dataset="folder", root=str(tmp_path), skip_corrupt=True, test_fraction=0.25,
                              val_fraction=0.0)
    with pytest.warns(UserWarning, match="skipped 2 unreadable image files"):
        dm.setup()
    assert dm.split_summary["skipped_corrupt"] == 2
    assert len(dm.train_dataset) + len(dm.test_dataset) == 12


def test_folder_empty_class_and_mixed_sizes(tmp_path):
    make_folder(tmp_path / "a")
    (tmp_path / "a" / "empty").mkdir()
    with pytest.raises(ClusterlightError, match="empty") as err:
        ClusteringDataModule(dataset="folder", root=str(tmp_path / "a"))
    assert "\n" not in str(err.value)
    make_folder(tmp_path / "b")
    write_png(tmp_path / "b" / "dog" / "big.png", np.zeros((9, 9), dtype=np.uint8))
    with pytest.raises(ClusterlightError, match="mixed sizes.*image_size"):
        ClusteringDataModule(dataset="folder", root=str(tmp_path / "b")).setup()
    dm = ClusteringDataModule(dataset="folder", root=str(tmp_path / "b"), image_size=4, test_fraction=0.3)
    assert dm.input_shape == (1, 4, 4)
    dm.setup()
    assert dm.train_dataset.images.shape[1:] == (1, 4, 4)


# --------------------------------------------------------------------------- npz files
def test_npz_source(tmp_path):
    path = tmp_path / "data.npz"
    rng = np.random.default_rng(0)
    images = rng.random((40, 6, 5, 3)).astype(np.float32)
    np.savez(path, images=images, labels=np.repeat([10, 20, 30, 40], 10))
    dm = ClusteringDataModule(dataset="npz", root=str(path), ood_classes=[3], channels=1)
    assert dm.input_shape == (1, 6, 5) and dm.num_classes == 3 and dm.class_names == ["10", "20", "30"]
    dm.setup()
    k = int(dm.train_dataset.source_index[0])
    expected = np.rint(images[k] * 255) @ np.array([0.299, 0.587, 0.114])
    assert np.allclose(dm.train_dataset[0]["image"][0].numpy() * 255, np.rint(expected), atol=1.01)


def test_npz_errors(tmp_path):
    no_images = tmp_path / "labels_only.npz"
    np.savez(no_images, labels=np.arange(4))
    with pytest.raises(ClusterlightError, match="labels_only.npz.*'images'") as err:
        ClusteringDataModule(dataset="npz", root=str(no_images))
    assert "\n" not in str(err.value)
    bad_shape = tmp_path / "two_channels.npz"
    np.savez(bad_shape, images=np.zeros((4, 3, 3, 2), dtype=np.uint8))
    with pytest.raises(ClusterlightError, match="two_channels.npz"):
        ClusteringDataModule(dataset="npz", root=str(bad_shape), num_clusters=2)
    truncated = tmp_path / "truncated.npz"
    np.savez_compressed(truncated, images=np.zeros((50, 8, 8), dtype=np.uint8), labels=np.arange(50) % 5)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ClusterlightError, match="truncated.npz") as err:
        ClusteringDataModule(dataset="npz", root=str(truncated))
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- datasets and loaders
def test_dataset_items_and_batched_path():
    images = torch.arange(5 * 2 * 3 * 3, dtype=torch.int64).remainder(256).to(torch.uint8).view(5, 2, 3, 3)
    ds = ClusteringDataset(images, labels=np.array([0, 1, 0, -1, 1]), ood=np.array([0, 0, 0, 1, 0], dtype=bool))
    item = ds[3]
    assert set(item) == {"image", "index", "label", "ood"}
    assert item["image"].dtype == torch.float32 and item["image"].shape == (2, 3, 3)
    assert torch.equal(item["image"], images[3].float() / 255)
    assert (item["index"], item["label"], item["ood"]) == (3, -1, True)
    assert ds[-1]["index"] == 4
    with pytest.raises(IndexError):
        ds[5]
    batched = ds.__getitems__([4, 0, 3])
    for got, i in zip(batched, [4, 0, 3]):
        ref = ds[i]
        assert torch.equal(got["image"], ref["image"]) and got["index"] == i
        assert (got["label"], got["ood"]) == (ref["label"], ref["ood"])


def test_dataloaders(usps_ood):
    dm = usps_ood
    assert isinstance(dm.train_dataloader().sampler, GlobalBatchSampler)  # see tests/test_global_batches.py
    for name in ("val", "test", "predict"):
        assert isinstance(getattr(dm, f"{name}_dataloader")().sampler, SequentialSampler)
    assert dm.predict_dataset is dm.test_dataset
    batch = next(iter(dm.val_dataloader()))
    assert batch["index"].tolist() == list(range(len(batch["index"])))
    assert batch["image"].dtype == torch.float32 and batch["ood"].dtype == torch.bool
    sampler = DistributedSampler(dm.train_dataset, num_replicas=2, rank=1, shuffle=False)
    loader = dm.embedding_dataloader("train", batch_size=4096, sampler=sampler)
    indices = torch.cat([b["index"] for b in loader])
    assert indices.tolist() == list(range(1, len(dm.train_dataset), 2))
    with pytest.raises(ClusterlightError, match="split 'bogus'"):
        dm.embedding_dataloader("bogus")
    first = dm.train_dataset
    dm.setup("test")
    assert dm.train_dataset is first
    assert dm.state_dict() == {}


def test_hparams_record_resolved_num_clusters(usps_ood):
    # the model gets num_clusters through the CLI link; Lightning rejects differing shared hparams
    assert usps_ood.hparams.num_clusters == usps_ood.num_clusters == 8
    assert usps_ood.hparams.ood_classes == [3, 7]


def test_num_clusters_larger_than_training_set():
    dm = ClusteringDataModule(dataset="digits", max_samples=5, val_fraction=0.0)
    with pytest.raises(ClusterlightError, match="num_clusters 10 exceeds the 5 training samples"):
        dm.setup()


def test_every_argument_typed_and_documented():
    doc = ClusteringDataModule.__doc__
    params = list(inspect.signature(ClusteringDataModule.__init__).parameters.values())[1:]
    assert len(params) == 23
    for p in params:
        assert p.kind is p.POSITIONAL_OR_KEYWORD and p.annotation is not inspect.Parameter.empty, p.name
        assert f"\n        {p.name}: " in doc, p.name
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ClusteringDataModule, "data")
    cfg = parser.parse_args(["--data.dataset=usps", "--data.imbalance_ratio=10", "--data.ood_classes=[1,2]"])
    assert cfg.data.imbalance_ratio == 10 and cfg.data.ood_classes == [1, 2]
    with pytest.raises(Exception):  # noqa: B017 - jsonargparse's own error type
        parser.parse_args(["--data.imbalance_profile=linear"])


# --------------------------------------------------------------------------- argument validation
@pytest.fixture
def unlabelled_root(tmp_path) -> str:
    make_folder(tmp_path / "flat", classes=("",), per_class=3)
    return str(tmp_path / "flat")


BAD_ARGUMENTS = [
    ({"dataset": "imagenet"}, "dataset 'imagenet'.*usps"),
    ({"ood_dataset": "imagenet"}, "ood_dataset 'imagenet'.*known"),
    ({"dataset": "folder"}, "needs root"),
    ({"dataset": "npz"}, "needs root"),
    ({"dataset": "folder", "root": "missing/folder"}, "root 'missing/folder'"),
    ({"dataset": "usps", "root": "missing/folder"}, "root 'missing/folder'"),
    ({"dataset": "mnist", "root": "missing/folder"}, "missing/folder.*download: true"),
    ({"imbalance_ratio": 0.5}, "imbalance_ratio"),
    ({"imbalance_ratio": float("nan")}, "imbalance_ratio"),
    ({"imbalance_ratio": float("inf")}, "imbalance_ratio"),
    ({"imbalance_profile": "linear"}, "imbalance_profile.*'exp' or 'step'"),
    ({"val_fraction": 1.0}, r"val_fraction.*\[0, 1\)"),
    ({"val_fraction": -0.1}, "val_fraction"),
    ({"test_fraction": 1.5}, "test_fraction"),
    ({"ood_fraction": 1.0}, "ood_fraction"),
    ({"test_fraction": 0.0}, "test_fraction is 0"),
    ({"num_clusters": 1}, "num_clusters.*>= 2"),
    ({"ood_classes": [10]}, r"ood_classes \[10\] not in 0..9"),
    ({"ood_classes": [-1]}, "ood_classes"),
    ({"ood_classes": list(range(10))}, "all 10 classes"),
    ({"ood_classes": [9, 9]}, "twice"),
    ({"ood_classes": [0], "ood_dataset": "usps"}, "both set"),
    ({"ood_root": "."}, "ood_root is set but ood_dataset"),
    ({"ood_dataset": "digits"}, "main dataset itself"),
    ({"channels": 2}, "channels must be 1"),
    ({"image_size": 0}, "image_size"),
    ({"batch_size": 0}, "batch_size"),
    ({"num_workers": -1}, "num_workers"),
    ({"max_samples": 0}, "max_samples"),
    ({"eval_on": "train"}, "eval_on must be 'test' or 'all'"),
    ({"seed": 1.5}, "seed"),
    ({"download": "yes"}, "download"),
    ({"dataset": "folder", "root": "<unlabelled>", "ood_classes": [0], "num_clusters": 2}, "needs labels"),
    ({"dataset": "folder", "root": "<unlabelled>", "imbalance_ratio": 2.0, "num_clusters": 2}, "needs labels"),
    ({"dataset": "folder", "root": "<unlabelled>"}, "num_clusters is required"),
]


@pytest.mark.parametrize("kwargs, pattern", BAD_ARGUMENTS, ids=[str(k) for k, _ in BAD_ARGUMENTS])
def test_bad_arguments(kwargs, pattern, tmp_path, unlabelled_root, monkeypatch):
    kwargs = {k: unlabelled_root if v == "<unlabelled>" else v for k, v in kwargs.items()}
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = sorted(p.name for p in tmp_path.iterdir())
    cache_existed = os.path.exists(os.path.expanduser(DEFAULT_ROOT))
    with pytest.raises(ClusterlightError, match=pattern) as err:
        ClusteringDataModule(**kwargs)
    assert isinstance(err.value, ValueError)
    assert "\n" not in str(err.value) and str(err.value).strip() == str(err.value)
    assert os.listdir(cwd) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert os.path.exists(os.path.expanduser(DEFAULT_ROOT)) == cache_existed
