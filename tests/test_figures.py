"""The sample-image grid: its rows and images, and the callback that renders it during a run."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import matplotlib.image
import numpy as np
import pytest
import torch

from clusterlight import plots
from clusterlight.callbacks import ClusteringFigures
from clusterlight.cli import main
from tests.conftest import METHOD_ARGS, base_args, data_args


def _rows(fig, per_cluster: int) -> list[list]:
    axes = fig.axes
    assert len(axes) % per_cluster == 0
    return [axes[i:i + per_cluster] for i in range(0, len(axes), per_cluster)]


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def _scaled(images: np.ndarray) -> np.ndarray:
    """Each image min-max scaled to [0, 1], computed here independently of the plotting code."""
    x = images.astype(np.float64)
    lo = x.min(axis=(1, 2, 3), keepdims=True)
    hi = x.max(axis=(1, 2, 3), keepdims=True)
    return (x - lo) / (hi - lo)


def _shown_indices(row, scaled: np.ndarray) -> list[int]:
    """The index of the input image behind every picture drawn in a row."""
    found = []
    for ax in row:
        for im in ax.get_images():
            shown = np.asarray(im.get_array(), dtype=np.float64)
            shown = shown[None] if shown.ndim == 2 else np.transpose(shown, (2, 0, 1))
            matches = [i for i in range(len(scaled)) if np.allclose(scaled[i], shown, atol=1e-6)]
            assert len(matches) == 1, "a drawn picture must be exactly one of the input images"
            found.append(matches[0])
    return found


@pytest.fixture
def clustered() -> tuple[np.ndarray, np.ndarray]:
    """60 random 1-channel images in 5 clusters of sizes 20, 3, 0 (empty), 1 and 36."""
    rng = np.random.default_rng(7)
    cluster = np.repeat([0, 1, 3, 4], [20, 3, 1, 36])
    rng.shuffle(cluster)
    images = rng.normal(size=(len(cluster), 1, 6, 5)) * 3.0 + 10.0
    return images, cluster


@pytest.mark.parametrize("per_cluster", [4, 8])
def test_one_row_per_cluster_with_its_own_images(clustered, per_cluster: int) -> None:
    images, cluster = clustered
    fig = plots.sample_grid_figure(images, cluster, num_clusters=5, per_cluster=per_cluster, seed=3)
    rows = _rows(fig, per_cluster)
    assert len(rows) == 5  # no unassigned row without -1
    scaled = _scaled(images)
    for k, row in enumerate(rows):
        count = int(np.sum(cluster == k))
        assert sum(len(ax.get_images()) for ax in row) == min(per_cluster, count)
        label = row[0].get_ylabel()
        assert f"cluster {k}" in label and f"n={count}" in label
        shown = _shown_indices(row, scaled)
        assert len(set(shown)) == len(shown)  # drawn without replacement
        assert all(cluster[i] == k for i in shown)
        assert ("empty" in _texts(row[0])) == (count == 0)
    assert not any("unassigned" in ax.get_ylabel() for ax in fig.axes)
    plots.close(fig)


def test_unassigned_row_only_when_minus_one_present(clustered) -> None:
    images, cluster = clustered
    cluster = cluster.copy()
    cluster[np.flatnonzero(cluster == 4)[:11]] = -1  # 11 unassigned samples, 25 left in cluster 4
    fig = plots.sample_grid_figure(images, cluster, num_clusters=5, per_cluster=8)
    rows = _rows(fig, 8)
    assert len(rows) == 6
    last = rows[-1]
    assert "unassigned" in last[0].get_ylabel() and f"n={np.sum(cluster == -1)}" in last[0].get_ylabel()
    shown = _shown_indices(last, _scaled(images))
    assert len(shown) == min(8, int(np.sum(cluster == -1)))
    assert all(cluster[i] == -1 for i in shown)
    assert sum(len(ax.get_images()) for ax in rows[4]) == min(8, int(np.sum(cluster == 4)))
    plots.close(fig)


def test_choice_is_seeded_locally(clustered) -> None:
    images, cluster = clustered
    scaled = _scaled(images)
    state = np.random.get_state()

    def picks(seed: int) -> list[int]:
        fig = plots.sample_grid_figure(images, cluster, num_clusters=5, per_cluster=4, seed=seed)
        out = _shown_indices(_rows(fig, 4)[4], scaled)  # cluster 4: 36 members, 4 shown
        plots.close(fig)
        return out

    first = picks(0)
    assert picks(0) == first
    assert any(picks(s) != first for s in (1, 2, 3))
    after = np.random.get_state()  # the global RNG was not used
    assert np.array_equal(after[1], state[1]) and after[2:] == state[2:]


def test_rgb_and_grey_display() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(6, 3, 4, 5), dtype=np.uint8)
    fig = plots.sample_grid_figure(rgb, np.array([0, 0, 1, 1, 1, 0]), num_clusters=2, per_cluster=3)
    pictures = [im for ax in fig.axes for im in ax.get_images()]
    assert len(pictures) == 6
    for im in pictures:
        array = np.asarray(im.get_array())
        assert array.shape == (4, 5, 3)
        assert array.min() == pytest.approx(0.0) and array.max() == pytest.approx(1.0)
    plots.close(fig)
    grey = rng.normal(size=(4, 1, 4, 5))
    fig = plots.sample_grid_figure(grey, np.array([1, 1, 1, 1]), num_clusters=2, per_cluster=3)
    pictures = [im for ax in fig.axes for im in ax.get_images()]
    assert len(pictures) == 3
    assert all(np.asarray(im.get_array()).shape == (4, 5) and im.get_cmap().name == "gray" for im in pictures)
    plots.close(fig)


def test_bad_cluster_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="clusters must be in"):
        plots.sample_grid_figure(np.zeros((2, 1, 3, 3)), np.array([0, 2]), num_clusters=2)


def _stream(callback: ClusteringFigures, batches: int, batch_size: int, num_clusters: int = 7) -> None:
    """Feeds test batches whose image ``i`` (in stream order) is constant ``i`` and sits in cluster ``i % 7``."""
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True)
    for b in range(batches):
        value = torch.arange(b * batch_size, (b + 1) * batch_size, dtype=torch.float32)
        batch = {"image": value[:, None, None, None].expand(-1, 1, 4, 4).clone(),
                 "label": torch.zeros(batch_size, dtype=torch.long), "ood": torch.zeros(batch_size, dtype=torch.bool)}
        outputs = {"cluster": value.long() % num_clusters}
        callback.on_test_batch_end(trainer, None, outputs, batch, b)


def test_callback_keeps_a_bounded_uniform_sample_with_its_clusters() -> None:
    callback = ClusteringFigures(sample_images=30, max_points=1000)
    _stream(callback, batches=10, batch_size=25)
    n = callback._sample_n
    assert n == 30 and callback._sample_x.shape[0] == 30  # memory: sample_images images, not 250
    values = callback._sample_x[:n, 0, 0, 0].astype(np.int64)
    assert np.array_equal(callback._sample_x[:n].astype(np.int64), np.broadcast_to(values[:, None, None, None],
                                                                                   (n, 1, 4, 4)))
    assert len(set(values.tolist())) == n and values.min() >= 0 and values.max() < 250
    assert np.array_equal(callback._sample_cluster[:n], values % 7)  # each image kept with its own cluster
    assert (values >= 30).sum() > 15  # drawn from the whole stream, not its first 30 images (expected: 26.4)
    assert sum(len(a) for a in callback._buffer["cluster"]) == 250  # the other figures' buffer is unchanged


def test_callback_sample_images_zero_keeps_no_images() -> None:
    callback = ClusteringFigures(sample_images=0)
    _stream(callback, batches=3, batch_size=10)
    assert callback._sample_n == 0 and callback._sample_x is None
    assert sum(len(a) for a in callback._buffer["cluster"]) == 30


def test_fit_with_test_after_fit_writes_the_sample_grid(tmp_path: Path) -> None:
    args = ["fit", *METHOD_ARGS["AEKMeans"], *data_args("digits", max_samples=300), *base_args(tmp_path, epochs=1),
            "--figures.enabled=true", "--figures.every_n_epochs=1000", "--figures.sample_images=50",
            "--test_after_fit=true"]
    cli = main(args)
    assert "test/acc" in cli.trainer.callback_metrics
    run_dir = Path(cli.trainer.checkpoint_callback.dirpath).parent
    path = run_dir / "figures" / "test_samples.png"
    assert path.is_file()
    picture = matplotlib.image.imread(path)
    assert picture.ndim == 3 and picture.shape[0] > 300 and picture.shape[1] > 300
    callback = next(cb for cb in cli.trainer.callbacks if isinstance(cb, ClusteringFigures))
    assert str(path) in callback.last_files
    assert callback._sample_x is None  # the reservoir is emptied after rendering
