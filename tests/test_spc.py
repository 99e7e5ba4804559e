"""Selective pseudo-label clustering: consensus functions, exact-K HDBSCAN, the vectorised ensemble, a real run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from clusterlight.cluster.consensus import (
    align_labelings,
    consensus,
    select_agreed,
    vote,
)
from clusterlight.cluster.kmeans import kmeans
from clusterlight.cluster.umap_hdbscan import gmm_k, hdbscan_exact_k, umap_neighbors_for
from clusterlight.data import ClusteringDataModule
from clusterlight.errors import ClusterlightError
from clusterlight.methods import SPC
from clusterlight.methods.spc import (
    PseudoLabelPrecision,
    latent_noise,
    pseudo_label_precision,
)
from clusterlight.metrics import matched_accuracy
from clusterlight.nn import MLP, ConvAutoencoder
from clusterlight.nn.ensemble import EnsembleConvAutoencoder, EnsembleMLP


# ---------------------------------------------------------------------------------------------- consensus
def test_vote_and_selection_on_hand_made_labelings() -> None:
    aligned = np.array([
        [0, 1, 2, -1, 1, -1],
        [0, 1, 1, -1, 2, 2],
        [0, 2, 1, 0, 0, -1],
    ])
    labels, agreement = vote(aligned, k=3)
    # point 0: unanimous; 1: 2 of 3; 2: 2 of 3 for label 1; 3: one vote, two abstain;
    # 4: a three-way tie goes to the smallest label; 5: one vote
    assert labels.tolist() == [0, 1, 1, 0, 0, 2]
    assert np.allclose(agreement, [1, 2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3])
    assert select_agreed(aligned, 1.0).tolist() == [True, False, False, False, False, False]
    assert select_agreed(aligned, 2 / 3).tolist() == [True, True, True, False, False, False]
    assert select_agreed(aligned, 0.3).tolist() == [True] * 6
    # nobody voted: no label, never selected
    none = np.full((2, 3), -1)
    assert vote(none, k=2)[0].tolist() == [-1, -1, -1]
    assert not select_agreed(none, 0.01).any()
    # 5 of 6 reaches the authors' relaxed threshold 1 / 1.2 exactly (no rounding trouble)
    six = np.array([[0]] * 5 + [[1]])
    assert select_agreed(six, 1 / 1.2).tolist() == [True]
    assert select_agreed(six, 0.84).tolist() == [False]
    with pytest.raises(ValueError):
        select_agreed(aligned, 0.0)


def test_vote_matches_a_naive_loop() -> None:
    rng = np.random.default_rng(0)
    for m, n, k in [(1, 50, 3), (4, 200, 5), (7, 300, 10)]:
        aligned = rng.integers(-1, k, size=(m, n))
        labels, agreement = vote(aligned, k)
        for i in range(n):
            counts = [int(np.sum(aligned[:, i] == c)) for c in range(k)]
            top = max(counts)
            assert agreement[i] == pytest.approx(top / m)
            assert labels[i] == (-1 if top == 0 else counts.index(top))
        for thr in (0.5, 0.8, 1.0):
            expected = np.array([np.sum(aligned[:, i] == labels[i]) >= thr * m - 1e-9 and labels[i] >= 0
                                 for i in range(n)])
            assert np.array_equal(select_agreed(aligned, thr), expected)


def _noisy_members(rng: np.random.Generator, truth: np.ndarray, m: int, k: int, flip: float, noise: float) -> np.ndarray:
    """Members that see ``truth`` with some wrong and some unassigned points, each under its own label names."""
    members = []
    for _ in range(m):
        lab = truth.copy()
        wrong = rng.random(len(lab)) < flip
        lab[wrong] = rng.integers(0, k, wrong.sum())
        lab = rng.permutation(k)[lab]
        lab[rng.random(len(lab)) < noise] = -1
        members.append(lab)
    return np.stack(members)


def test_alignment_is_invariant_to_each_members_label_names() -> None:
    rng = np.random.default_rng(1)
    k, n = 6, 600
    truth = rng.integers(0, k, n)
    members = _noisy_members(rng, truth, 5, k, flip=0.2, noise=0.1)
    aligned = align_labelings(members, k, pivot=0)
    assert np.array_equal(aligned[0], members[0])  # the pivot keeps its labels
    assert np.array_equal(aligned < 0, members < 0)  # noise stays noise
    # every member now speaks the pivot's language: the pivot's names of the true classes
    pivot_name = {int(t): int(np.bincount(members[0][(truth == t) & (members[0] >= 0)]).argmax()) for t in range(k)}
    named_truth = np.array([pivot_name[int(t)] for t in truth])
    for row in aligned:
        ok = row >= 0
        assert np.mean(row[ok] == named_truth[ok]) > 0.7

    # renaming each member's labels at random gives the same alignment up to one global renaming
    for trial in range(5):
        perms = [rng.permutation(k) for _ in members]
        renamed = np.stack([np.where(row >= 0, p[np.clip(row, 0, None)], -1) for row, p in zip(members, perms)])
        again = align_labelings(renamed, k, pivot=0)
        glob = perms[0]  # the pivot's renaming is the global one
        expected = np.where(aligned >= 0, glob[np.clip(aligned, 0, None)], -1)
        assert np.array_equal(again, expected), trial
        # the vote and the selection follow the same renaming
        assert np.array_equal(select_agreed(again, 0.8), select_agreed(aligned, 0.8))
        la, _ = vote(aligned, k)
        lb, _ = vote(again, k)
        top_unique = (np.sort(np.stack([np.sum(aligned == c, 0) for c in range(k)]), 0)[-1]
                      > np.sort(np.stack([np.sum(aligned == c, 0) for c in range(k)]), 0)[-2])
        assert np.array_equal(lb[top_unique], glob[la[top_unique]])


def test_consensus_realigns_to_the_vote() -> None:
    rng = np.random.default_rng(2)
    k, n = 4, 400
    truth = rng.integers(0, k, n)
    members = _noisy_members(rng, truth, 6, k, flip=0.3, noise=0.0)
    aligned0, labels0, _ = consensus(members, k, pivot=0, iters=0)
    _, labels1, agreement1 = consensus(members, k, pivot=0, iters=3)
    assert np.array_equal(aligned0, align_labelings(members, k))
    assert matched_accuracy(labels1, truth) >= matched_accuracy(labels0, truth) - 1e-9
    assert agreement1.min() > 0


# ---------------------------------------------------------------------------------------------- exact-K clustering
def _blobs(centers: list[tuple[float, float]], n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(c, 0.3, size=(n, 2)) for c in centers])
    return x, np.repeat(np.arange(len(centers)), n)


@pytest.mark.parametrize("num_blobs", [3, 4, 6])
def test_hdbscan_returns_exactly_k_clusters(num_blobs: int) -> None:
    centers = [(4.0 * i, 3.0 * (i % 2)) for i in range(num_blobs)]
    x, y = _blobs(centers, 150)
    labels = hdbscan_exact_k(x, 4)
    assert sorted(set(labels[labels >= 0].tolist())) == [0, 1, 2, 3]
    assert np.array_equal(labels, hdbscan_exact_k(x, 4))  # deterministic
    if num_blobs == 4:
        ok = labels >= 0
        assert ok.mean() > 0.8 and matched_accuracy(labels[ok], y[ok]) > 0.99
    g = gmm_k(x, 4, seed=3)
    assert np.array_equal(g, gmm_k(x, 4, seed=3)) and g.min() >= 0 and g.max() < 4


def test_umap_neighbours_follow_the_authors_scaling() -> None:
    assert umap_neighbors_for(70000, minimum=3) == 30
    assert umap_neighbors_for(9298, minimum=3) == 3  # the authors' USPS
    assert umap_neighbors_for(1000, minimum=10) == 10


# ---------------------------------------------------------------------------------------------- the ensemble network
@pytest.mark.parametrize(("shape", "norm"), [((1, 16, 16), "batch"), ((3, 12, 10), "group"), ((1, 8, 8), "none")])
def test_vectorised_ensemble_equals_separate_members(shape: tuple[int, int, int], norm: str) -> None:
    torch.manual_seed(0)
    aes = [ConvAutoencoder(shape, 6, [8, 16], norm) for _ in range(3)]
    heads = [MLP(6, [5], 4) for _ in range(3)]
    ens = EnsembleConvAutoencoder.from_members(aes, 6, [8, 16], norm)
    ens_heads = EnsembleMLP(3, 6, [5], 4)
    for m, h in enumerate(heads):
        ens_heads.load_member(m, h)
    x = torch.rand(7, *shape)
    for training in (True, False):
        ens.train(training)
        for ae in aes:
            ae.train(training)
        z, recon = ens(x)
        logits = ens_heads(z)
        assert z.shape == (7, 3, 6) and recon.shape == (7, 3, *shape) and logits.shape == (7, 3, 4)
        for m, (ae, head) in enumerate(zip(aes, heads)):
            zm, rm = ae(x)
            torch.testing.assert_close(z[:, m], zm, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(recon[:, m], rm, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(logits[:, m], head(zm), rtol=1e-5, atol=1e-6)
    # round trip, and members do not share gradients
    back = ens.member(1)
    for a, b in zip(back.state_dict().values(), aes[1].state_dict().values()):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(ens_heads.member(2).state_dict().values(),
                                                  heads[2].state_dict().values()))
    ens.train()
    ens.zero_grad()
    z, recon = ens(x)
    recon[:, 0].sum().backward()  # a loss of member 0 only
    w = ens.enc_fc.weight.grad
    assert w[0].abs().sum() > 0 and w[1].abs().sum() == 0 and w[2].abs().sum() == 0
    first = ens.enc_features[0].weight.grad  # the shared-input first convolution: member 0's rows only
    per = first.shape[0] // 3
    assert first[:per].abs().sum() > 0 and first[per:].abs().sum() == 0


def test_latent_noise_is_scaled_per_member() -> None:
    torch.manual_seed(0)
    z = torch.zeros(16, 3, 5)
    n = latent_noise(z, 1.5)
    assert torch.allclose(n.amax(dim=(0, 2)), torch.full((3,), 1.5))
    assert torch.equal(latent_noise(z, 0.0), torch.zeros_like(z))


def test_bad_arguments_are_one_line_errors() -> None:
    for kwargs in ({"num_members": 0}, {"agreement_threshold": 1.5}, {"clusterer": "kmeans"}, {"pivot": 3},
                   {"epochs_per_meta": 0}):
        with pytest.raises(ClusterlightError):
            SPC(num_members=kwargs.pop("num_members", 2), **kwargs)


def test_pseudo_label_precision_monitor() -> None:
    pseudo = torch.tensor([1, 1, 0, 0, 2, -1])
    mask = torch.tensor([True, True, True, False, False, False])
    labels = torch.tensor([0, 0, 1, 0, 2, 2])
    out = pseudo_label_precision(pseudo, mask, labels, 3)
    # matching on voted samples: 1->0, 0->1 (or 0), 2->2; agreed: 1->0 ok, 1->0 ok, 0->1 ok
    assert out["pseudo_label_precision"] == pytest.approx(1.0)
    assert out["vote_acc"] == pytest.approx(4 / 5)
    assert out["agreed_fraction"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------- real runs
class _Pretrained(Callback):
    """Grabs the members' embeddings of the training split right after pretraining (before the labelling)."""

    def __init__(self, epoch: int) -> None:
        self.epoch, self.z = epoch, None

    def on_train_epoch_start(self, trainer: Trainer, pl_module: SPC) -> None:  # runs before the module's hook
        if trainer.current_epoch == self.epoch:
            self.z = pl_module.compute_on_split(pl_module.embed)


def _trainer(tmp_path, epochs: int, callbacks: list[Callback]) -> Trainer:
    return Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks,
                   num_sanity_val_steps=0, enable_checkpointing=False)


def test_never_labelled_model_is_labelled_before_test(tmp_path) -> None:
    seed_everything(0)
    dm = ClusteringDataModule(dataset="digits", batch_size=128, max_samples=300)
    model = SPC(num_clusters=10, input_shape=(1, 8, 8), num_members=2, latent_dim=8, widths=[16, 32],
                pretrain_epochs=5, clusterer="gmm")
    trainer = _trainer(tmp_path, 1, [])
    trainer.fit(model, datamodule=dm)
    assert not bool(model.labelled) and model.pseudo_labels is None
    trainer.test(model, datamodule=dm)
    assert bool(model.labelled) and not bool(model.heads_trained)  # answers by agreed-cluster centroids
    assert model.pseudo_labels.shape == (len(dm.train_dataset),)
    assert 0.0 <= model.last_metrics["test"]["acc"] <= 1.0


def test_short_real_run_vote_beats_kmeans_on_pretrained_members(tmp_path) -> None:
    """digits: the ensemble's vote after one labelling is more accurate than k-means on any member's
    pretrained embedding; the selected pseudo-labels are more precise still; the state survives a checkpoint."""
    seed_everything(0)
    members, latent, pretrain = 3, 10, 6
    dm = ClusteringDataModule(dataset="digits", batch_size=64)
    model = SPC(num_clusters=10, input_shape=(1, 8, 8), num_members=members, latent_dim=latent, widths=[32, 64],
                pretrain_epochs=pretrain, epochs_per_meta=1, agreement_threshold=1.0)
    grab, monitor = _Pretrained(pretrain), PseudoLabelPrecision()
    trainer = _trainer(tmp_path, pretrain + 1, [grab, monitor])
    trainer.fit(model, datamodule=dm)
    y = dm.train_dataset.labels
    z = grab.z.view(len(y), members, latent)
    km = [matched_accuracy(kmeans(z[:, m], 10, n_init=5, seed=0).labels, y) for m in range(members)]
    pseudo = model.pseudo_labels.cpu()
    voted = pseudo >= 0
    vote_acc = matched_accuracy(pseudo[voted], y[voted])
    assert voted.float().mean() > 0.95
    print(f"vote acc {vote_acc:.3f}, k-means on pretrained members {np.round(km, 3)}")
    assert vote_acc > max(km), (vote_acc, km)
    precision = monitor.history[-1]["pseudo_label_precision"]
    print(f"pseudo-label precision {precision:.3f}, agreed {float(model.agreed_mask.float().mean()):.3f}")
    assert precision > vote_acc and 0.2 < float(model.agreed_mask.float().mean()) < 1.0
    assert "train/agreed_fraction" in trainer.callback_metrics
    assert "train/pseudo_label_precision" in trainer.callback_metrics

    path = tmp_path / "spc.ckpt"
    trainer.save_checkpoint(path)
    loaded = SPC.load_from_checkpoint(path)
    assert torch.equal(loaded.pseudo_labels, pseudo) and torch.equal(loaded.agreed_mask, model.agreed_mask.cpu())
    assert loaded.labelling_version == model.labelling_version == 1
    assert bool(loaded.heads_trained) and torch.equal(loaded.centroids, model.centroids.cpu())


class _SaveState(Callback):
    """Writes each rank's pseudo-labels, mask, some weights and its stop decision at the end of fit."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer: Trainer, pl_module: SPC) -> None:
        torch.save({"pseudo": pl_module.pseudo_labels.cpu(), "mask": pl_module.agreed_mask.cpu(),
                    "weight": pl_module.ensemble.enc_fc.weight.detach().cpu(), "stop": trainer.should_stop,
                    "epoch": trainer.current_epoch}, f"{self.out_dir}/rank{trainer.global_rank}.pt")


@pytest.mark.slow
@pytest.mark.ddp
def test_two_process_ddp_fit_agrees_on_every_rank(tmp_path) -> None:
    """Labelling on rank 0, broadcast: both ranks hold the same pseudo-labels and weights and stop together."""
    seed_everything(0)
    dm = ClusteringDataModule(dataset="digits", batch_size=64, max_samples=400)
    model = SPC(num_clusters=10, input_shape=(1, 8, 8), num_members=2, latent_dim=8, widths=[16, 32],
                pretrain_epochs=1, epochs_per_meta=1, patience=1, clusterer="gmm")
    trainer = Trainer(max_epochs=6, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[_SaveState(str(tmp_path))], num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for key in ("pseudo", "mask", "weight"):
        assert torch.equal(a[key], b[key]), key
    assert a["stop"] == b["stop"] and a["epoch"] == b["epoch"]


def test_umap_leaves_torch_thread_count_alone() -> None:
    """numba's runtime resets OpenMP threads; runs would stop being bit-reproducible without the guard."""
    import numpy as np
    import torch

    from clusterlight.cluster.umap_hdbscan import reduce_umap

    torch.set_num_threads(1)
    reduce_umap(np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32), 5, 0)
    assert torch.get_num_threads() == 1
