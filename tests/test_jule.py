"""JULE: the scalable agglomeration against naive dense definitions, the triplet loss, the module."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.sparse.csgraph import connected_components

from clusterlight.cli import main
from clusterlight.cluster.agglomerative import (
    Agglomeration,
    affinity_weights,
    agglomerate,
    build_graph,
    dense_affinity,
    dense_merge_choice,
    dense_weights,
    forward_step_merges,
    initial_clusters,
    knn_graph,
)
from clusterlight.errors import ClusterlightError
from clusterlight.methods.jule import JULE, JULENet, weighted_triplet_loss
from tests.conftest import METHOD_ARGS, base_args, data_args


def _points(seed: int, n: int = 80, dim: int = 5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    x[: n // 2] += 2.5  # two overlapping groups, so merges have structure to follow
    return x


# ---------------------------------------------------------------------------------- kNN graph
@pytest.mark.parametrize(("n", "dim", "k", "chunks"), [(300, 4, 7, (32, 50)), (257, 16, 20, (None, None)),
                                                       (40, 3, 5, (7, 3)), (12, 2, 11, (5, 5)),
                                                       # k over a quarter of the default column block: whole rows
                                                       (1500, 8, 600, (None, None)), (1500, 8, 600, (100, None))])
def test_knn_graph_matches_brute_force(n: int, dim: int, k: int, chunks: tuple) -> None:
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    idx, dist = knn_graph(x, k, chunk_size=chunks[0], col_chunk_size=chunks[1])
    full = torch.cdist(x, x) ** 2
    full.fill_diagonal_(math.inf)
    ref_d, ref_i = torch.topk(full, k, dim=1, largest=False)
    assert torch.equal(idx, ref_i)
    assert torch.allclose(dist, ref_d, rtol=1e-9, atol=1e-10)
    assert not (idx == torch.arange(n)[:, None]).any()  # never itself


@pytest.mark.parametrize(("n", "k", "chunks"), [(300, 40, (32, 50)), (1500, 600, (None, None))])
def test_knn_graph_keeps_only_the_ranks_asked_for(n: int, k: int, chunks: tuple) -> None:
    """``ranks``: the brute-force neighbours' columns at those ranks, by the blocked merge and by
    whole rows (k over a quarter of the default column block); bad ranks are refused."""
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    ranks = [0, 1, 2, 9, k // 2, k - 1]
    idx, dist = knn_graph(x, k, chunk_size=chunks[0], col_chunk_size=chunks[1], ranks=ranks)
    full = torch.cdist(x, x) ** 2
    full.fill_diagonal_(math.inf)
    ref_d, ref_i = torch.topk(full, k, dim=1, largest=False)
    assert idx.shape == dist.shape == (n, len(ranks))
    assert torch.equal(idx, ref_i[:, ranks])
    assert torch.allclose(dist, ref_d[:, ranks], rtol=1e-9, atol=1e-10)
    for bad in ([], [3, 1], [0, 0], [k], [-1, 2], [0.5]):
        with pytest.raises(ClusterlightError, match="ranks must be increasing integers"):
            knn_graph(x, k, ranks=bad)


def test_affinity_weights_and_initial_clusters() -> None:
    x = _points(0)
    graph = build_graph(x, 6)
    sigma2 = graph.distances.mean().item()  # squared distances, averaged over all N·K_s edges
    assert graph.sigma2 == pytest.approx(sigma2)
    assert torch.allclose(graph.weights, torch.exp(-graph.distances / sigma2))
    w, s2 = affinity_weights(torch.zeros(3, 2))  # duplicates only: weights 1, no division by 0
    assert s2 == 1.0 and torch.equal(w, torch.ones(3, 2, dtype=torch.float64))
    labels = initial_clusters(graph.indices).numpy()
    # same partition as the weak components of the graph "each sample -> its nearest neighbour"
    nn1 = graph.indices[:, 0].numpy()
    adj = np.zeros((len(x), len(x)))
    adj[np.arange(len(x)), nn1] = 1
    _, ref = connected_components(adj, directed=True, connection="weak")
    assert np.array_equal(labels, ref)
    assert all(labels[i] == labels[j] for i, j in enumerate(nn1))


# ---------------------------------------------------------------------------- sparse vs dense
@pytest.mark.parametrize("seed", range(5))
def test_sparse_affinity_and_choice_equal_dense_every_step(seed: int) -> None:
    graph = build_graph(_points(seed), 6)
    w = dense_weights(graph)
    state = Agglomeration(graph, k_c=5, round_fraction=0.0)  # one merge per round: the paper's greedy
    steps = 0
    while state.n_clusters > 2:
        a = dense_affinity(w, torch.from_numpy(state.labels))
        np.testing.assert_allclose(state.affinity_matrix(), a.numpy(), rtol=1e-10, atol=1e-15)
        if state.pair_a.size:
            score, partner, choice = dense_merge_choice(a, k_c=5)
            np.testing.assert_array_equal(state.partner, partner.numpy())
            np.testing.assert_allclose(state.score, score.numpy(), rtol=1e-10)
            assert state.round_pairs(1) == [choice]
        assert state.merge(1) == 1
        steps += 1
    assert steps > 10


@pytest.mark.parametrize(("seed", "k_c", "lam"), [(10, 3, 1.0), (11, 1, 1.0), (12, 5, 0.5)])
def test_batched_rounds_keep_exact_affinities(seed: int, k_c: int, lam: float) -> None:
    graph = build_graph(_points(seed, n=120), 8)
    w = dense_weights(graph)
    state = Agglomeration(graph, k_c=k_c, lam=lam, round_fraction=0.3)
    while state.n_clusters > 3:
        a = dense_affinity(w, torch.from_numpy(state.labels))
        np.testing.assert_allclose(state.affinity_matrix(), a.numpy(), rtol=1e-10, atol=1e-15)
        score, partner, choice = dense_merge_choice(a, k_c=k_c, lam=lam)
        np.testing.assert_allclose(state.score, score.numpy(), rtol=1e-10)
        pairs = state.round_pairs(state.n_clusters)
        # the greedy disjoint selection, written out on the dense scores
        order = sorted(range(len(score)), key=lambda i: (-float(score[i]), i))
        used, ref = set(), []
        for i in order:
            j = int(partner[i])
            if j >= 0 and i not in used and j not in used:
                used |= {i, j}
                ref.append((i, j))
        assert pairs == ref and pairs[0] == choice
        state.merge_round(state.n_clusters)


# ------------------------------------------------------------------------- how many merges
@pytest.mark.parametrize(("k_s", "keep_features"), [(1, True), (2, True), (2, False), (6, True)])
def test_merges_are_exactly_as_many_as_asked(k_s: int, keep_features: bool) -> None:
    x = _points(3, n=120, dim=3)
    graph = build_graph(x, k_s, keep_features=keep_features)
    state = Agglomeration(graph, round_fraction=1.0)  # the largest rounds allowed
    if k_s == 1:
        assert state.pair_a.size == 0  # 1-NN components have no 2-paths between them
    if k_s == 2:
        assert state.pair_a.size and (state.partner < 0).any()  # isolated and linked clusters
    for ask in (1, 3, 7, 2, 11):
        before = state.n_clusters
        assert state.merge(ask, absorb_isolated=ask == 3) == ask
        assert state.n_clusters == before - ask
        assert set(np.unique(state.labels)) == set(range(state.n_clusters))
    before = state.n_clusters
    assert state.merge(10**6) == before - 1  # capped: one cluster left
    assert state.n_clusters == 1


@pytest.mark.parametrize("eta", [0.2, 0.9, 1.0])
def test_agglomerate_steps_and_exact_target(eta: float) -> None:
    x = _points(4, n=150, dim=4)
    graph = build_graph(x, 5)
    n0 = int(initial_clusters(graph.indices).max()) + 1
    one = agglomerate(graph, 3, unfolding_rate=eta, max_steps=1)
    assert int(one.max()) + 1 == n0 - forward_step_merges(n0, 3, eta)
    for k in (1, 2, 3, 7):
        labels = agglomerate(graph, k, unfolding_rate=eta)
        assert sorted(labels.unique().tolist()) == list(range(k))
    # starting from K clusters or fewer merges nothing
    assert torch.equal(agglomerate(graph, 3, labels=one, max_steps=0), one)
    assert forward_step_merges(100, 10, 0.9) == 90 and forward_step_merges(12, 10, 0.9) == 2
    assert forward_step_merges(8, 10, 0.9) == 0 and forward_step_merges(1000, 10, 0.2) == 200


def test_agglomerate_finds_separated_groups() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=gen) * 6
    truth = torch.arange(400) % 4
    x = centres[truth] + torch.randn(400, 8, generator=gen)
    labels = agglomerate(x, 4, k_s=10)
    pairs = torch.stack([truth, labels], 1).unique(dim=0)
    assert len(pairs) == 4  # a one-to-one match


# ------------------------------------------------------------------------------ triplet loss
def test_weighted_triplet_loss_hand_computed() -> None:
    z = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [2.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    # pairs (0,1) and (2,3); negatives {2,3} and {0,1}; squared distances d01=1, d02=1, d03=4,
    # d23=5, d20=1, d21=2; terms max(0, γ d_ap - d_an + m):
    # γ=2, m=0.2: (2-1+.2, 2-4+.2, 10-1+.2, 10-2+.2) -> (1.2, 0, 9.2, 8.2), mean 4.65
    loss = weighted_triplet_loss(z, labels, margin=0.2, gamma=2.0)
    assert loss.item() == pytest.approx(4.65, rel=1e-6)
    loss.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    # γ=1, m=0.5: (0.5, 0, 4.5, 3.5), mean 2.125
    assert weighted_triplet_loss(z, labels, margin=0.5, gamma=1.0).item() == pytest.approx(2.125, rel=1e-6)
    # one sampled negative per pair: one term of each pair
    gen = torch.Generator().manual_seed(0)
    sampled = weighted_triplet_loss(z, labels, 0.2, 2.0, num_negatives=1, generator=gen).item()
    assert any(sampled == pytest.approx((a + b) / 2) for a in (1.2, 0.0) for b in (9.2, 8.2))
    # no positive pair, or no negative: zero with a gradient graph
    for lab in (torch.tensor([0, 1, 2, 3]), torch.tensor([5, 5, 5, 5])):
        zero = weighted_triplet_loss(z, lab)
        assert zero.item() == 0.0 and zero.requires_grad


# -------------------------------------------------------------------------------- the module
@pytest.mark.parametrize(("shape", "blocks", "fc_in"), [((1, 16, 16), 1, 1800), ((1, 128, 128), 4, 1250),
                                                        ((1, 28, 28), 2, 800), ((3, 8, 8), 1, 200)])
def test_jule_net_follows_the_paper_sizes(shape: tuple, blocks: int, fc_in: int) -> None:
    net = JULENet(shape)
    assert net.num_blocks == blocks and net.fc.in_features == fc_in
    z = net(torch.rand(2, *shape))
    assert z.shape == (2, 160) and torch.allclose(z.norm(dim=1), torch.ones(2), atol=1e-5)


def test_jule_fit_checkpoint_and_test(tmp_path: Path) -> None:
    common = [*METHOD_ARGS["JULE"], *data_args("digits", max_samples=400), *base_args(tmp_path, epochs=6)]
    cli = main(["fit", *common])
    model = cli.model
    assert model._finished and model.num_current_clusters == model.num_clusters == 10
    assert cli.trainer.current_epoch < 6  # stopped once the recurrent process reached K
    metrics = cli.trainer.callback_metrics
    assert metrics["val/nmi"] > 0.5 and "val/nmi_geometric" in metrics
    assert math.isfinite(float(cli.trainer.callback_metrics["val/loss"]))
    ckpt = cli.trainer.checkpoint_callback.best_model_path
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["jule_state"]
    assert state["finished"] and torch.equal(state["labels"], model._labels.cpu())
    fresh = JULE(num_clusters=10, input_shape=(1, 8, 8), conv_channels=16, feature_dim=32)
    fresh.on_load_checkpoint(torch.load(ckpt, map_location="cpu", weights_only=True))
    assert fresh._finished and fresh._period == model._period and torch.equal(fresh._labels, state["labels"])
    tested = main(["test", *common, f"--ckpt_path={ckpt}"])
    got = tested.trainer.callback_metrics
    assert float(got["test/acc"]) > 0.4 and float(got["test/nmi"]) > 0.4
