"""Online hard-regularised clustering: the assignment functions and a short real run."""

from __future__ import annotations

import datetime
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clusterlight.cluster.assignment import (
    distributed_assign,
    greedy_hard_assign,
    greedy_hard_assign_with_rounds,
    hard_objective,
    mean_assignment_kl,
    naive_greedy_hard_assign,
    sinkhorn,
    sinkhorn_assign,
)


def _random_costs(kind: str, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 201, (1,), generator=gen))
    k = int(torch.randint(1, 21, (1,), generator=gen))
    if kind == "float":
        cost = torch.rand(n, k, generator=gen) * 3
    elif kind == "integer":  # many exact ties
        cost = torch.randint(0, 4, (n, k), generator=gen).float()
    elif kind == "duplicated":  # every row twice: ties between points
        half = torch.randint(0, 3, (n // 2 + 1, k), generator=gen).float()
        cost = torch.cat([half, half])[torch.randperm(2 * (n // 2 + 1), generator=gen)][:n]
    elif kind == "collapsed":  # every point nearest to one cluster, small spread (the init regime)
        cost = 1 + 0.05 * torch.rand(n, k, generator=gen)
        cost[:, int(torch.randint(0, k, (1,), generator=gen))] -= 0.2
    else:
        raise ValueError(kind)
    prior = None
    if seed % 3 == 1:
        prior = torch.log(torch.rand(k, generator=gen) + 0.05)
    elif seed % 3 == 2:  # integer-valued log counts: ties survive the prior
        prior = torch.log(torch.randint(1, 4, (k,), generator=gen).float())
    return cost, prior


@pytest.mark.parametrize("kind", ["float", "integer", "duplicated", "collapsed"])
def test_vectorised_greedy_equals_the_loop(kind: str) -> None:
    for seed in range(30):
        cost, prior = _random_costs(kind, seed)
        for log_prior in (None, prior):
            fast, rounds = greedy_hard_assign_with_rounds(cost, log_prior)
            slow = naive_greedy_hard_assign(cost, log_prior)
            assert torch.equal(fast, slow), (kind, seed, tuple(cost.shape), log_prior is not None)
            assert rounds <= cost.shape[0]


def test_greedy_ties_go_to_the_lowest_point_then_cluster() -> None:
    # All costs equal: point 0 ties everywhere (cluster 0), then cluster 1 is cheaper (log 1 < log 2)...
    assert greedy_hard_assign(torch.zeros(5, 2)).tolist() == [0, 1, 0, 1, 0]
    # A prior shifts the balance: log 2.5 > log 2 gives cluster 1 the first two points, log 3 > log 2.5
    # gives point 2 to cluster 0, and log 2 > log 4 - log 2.5 gives point 3 back to cluster 1.
    prior = torch.tensor([0.0, math.log(2.5)])
    assert greedy_hard_assign(torch.zeros(4, 2), prior).tolist() == [1, 1, 0, 1]
    assert naive_greedy_hard_assign(torch.zeros(4, 2), prior).tolist() == [1, 1, 0, 1]
    # Without the size penalty everything would go to cluster 0; with it, the third point moves.
    cost = torch.tensor([[0.0, 1.0], [0.1, 1.0], [0.2, 1.0]])
    assert greedy_hard_assign(cost).tolist() == [0, 0, 1]  # 0.2 + log 3 > 1 + log 1


def test_rounding_that_merges_costs_falls_back_to_the_loop() -> None:
    # 3e-300 and 5e-300 become equal once log(2) is added: the loop's tie rule (lowest index)
    # then differs from the (cost, index) order; the vectorised version must notice and agree.
    cost = torch.tensor([[5e-300], [3e-300], [0.0]], dtype=torch.float64)
    fast, rounds = greedy_hard_assign_with_rounds(cost)
    assert rounds == 0 and torch.equal(fast, naive_greedy_hard_assign(cost))


def test_greedy_rejects_non_finite_costs() -> None:
    with pytest.raises(ValueError, match="finite"):
        greedy_hard_assign(torch.tensor([[0.0, math.inf]]))


def test_hard_objective_is_the_sum_of_the_greedy_steps() -> None:
    gen = torch.Generator().manual_seed(0)
    cost = torch.rand(40, 6, generator=gen, dtype=torch.float64)
    prior = torch.log(torch.rand(6, generator=gen, dtype=torch.float64) + 0.1)
    assign = greedy_hard_assign(cost, prior)
    counts = [0] * 6
    total = 0.0
    for b in range(40):  # any order of a cluster's points gives the same sum of log(n + 1)
        c = int(assign[b])
        total += float(cost[b, c] - prior[c]) + math.log(counts[c] + 1)
        counts[c] += 1
    assert float(hard_objective(cost, assign, prior)) == pytest.approx(total / 40, rel=1e-12)
    # the greedy does better than the nearest centroid on its own objective here
    assert hard_objective(cost, assign, prior) <= hard_objective(cost, (cost - prior).argmin(1), prior)


def _sinkhorn_reference(scores: torch.Tensor, epsilon: float, n_iters: int) -> torch.Tensor:
    """Textbook Sinkhorn-Knopp: scale u (rows) and v (columns) of exp(S / eps) alternately."""
    kernel = (scores.double() / epsilon).exp()
    n, k = kernel.shape
    r, c = torch.full((n,), 1.0 / n, dtype=torch.float64), torch.full((k,), 1.0 / k, dtype=torch.float64)
    u, v = torch.ones(n, dtype=torch.float64), torch.ones(k, dtype=torch.float64)
    for _ in range(n_iters):
        v = c / (kernel.T @ u)
        u = r / (kernel @ v)
    return u[:, None] * kernel * v[None, :]


def test_sinkhorn_plan_marginals_and_form() -> None:
    gen = torch.Generator().manual_seed(1)
    scores = -torch.rand(50, 7, generator=gen, dtype=torch.float64) * 4
    scores[:, 0] += 2.0  # every point prefers cluster 0
    plan = sinkhorn(scores, n_iters=300, epsilon=0.5)
    assert torch.allclose(plan.sum(1), torch.full((50,), 1 / 50, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(plan.sum(0), torch.full((7,), 1 / 7, dtype=torch.float64), atol=1e-8)
    # diag(u) exp(S / eps) diag(v): log(plan) - S / eps is a sum of a row and a column term
    resid = plan.log() - scores / 0.5
    resid = resid - resid.mean(1, keepdim=True) - resid.mean(0, keepdim=True) + resid.mean()
    assert resid.abs().max() < 1e-9
    assert torch.allclose(plan, _sinkhorn_reference(scores, 0.5, 300), rtol=1e-8, atol=1e-14)
    # with the reference's 15 iterations: rows exact, columns close to uniform
    short = sinkhorn(scores.float(), n_iters=15, epsilon=0.5)
    assert short.dtype == torch.float32
    assert torch.allclose(short.sum(1), torch.full((50,), 1 / 50), atol=1e-6)
    assert (short.sum(0) - 1 / 7).abs().max() < 0.02
    assert torch.allclose(short.double(), _sinkhorn_reference(scores, 0.5, 15), rtol=1e-4, atol=1e-7)
    # balanced: argmax of the plan spreads the points that all prefer cluster 0
    assert torch.bincount(sinkhorn_assign(-scores), minlength=7).max() <= 15


def test_entropy_regulariser_by_hand() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]])
    p_bar = [0.6, 0.35, 0.05]
    by_hand = sum(p * math.log(3 * p) for p in p_bar)
    assert float(mean_assignment_kl(probs)) == pytest.approx(by_hand, rel=1e-6)
    assert float(mean_assignment_kl(torch.full((4, 5), 0.2))) == pytest.approx(0.0, abs=1e-7)
    collapsed = torch.zeros(4, 5)
    collapsed[:, 2] = 1
    assert float(mean_assignment_kl(collapsed)) == pytest.approx(math.log(5), rel=1e-6)


# ----------------------------------------------------------------------------- DDP: global assignment
WORLD = 2


def _ddp_worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        cost = torch.load(f"{tmp}/cost.pt")
        mine = cost[:30] if rank == 0 else cost[30:]  # unequal shards: padding must be trimmed
        torch.save(distributed_assign(mine, greedy_hard_assign), f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_global_assignment_over_two_ranks_equals_one_batch(tmp_path: Path) -> None:
    cost = torch.rand(75, 6, generator=torch.Generator().manual_seed(3))
    torch.save(cost, tmp_path / "cost.pt")
    mp.spawn(_ddp_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    got = torch.cat([torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)])
    assert torch.equal(got, greedy_hard_assign(cost))
    assert torch.equal(distributed_assign(cost, greedy_hard_assign), greedy_hard_assign(cost))  # no group


# ----------------------------------------------------------------------------- the method
def test_bad_options_are_one_line_errors() -> None:
    from clusterlight.errors import ClusterlightError
    from clusterlight.methods import OnlineHardClustering

    for kwargs, needle in [({"assignment": "sinkhorn", "imbalanced": True}, "imbalanced"),
                           ({"sigma": 0.0}, "sigma"), ({"prior_momentum": 0.0}, "prior_momentum"),
                           ({"embedding_norm": "layer"}, "embedding_norm")]:
        with pytest.raises(ClusterlightError, match=needle):
            OnlineHardClustering(**kwargs)


def test_outputs_of_a_fresh_module() -> None:
    from clusterlight.methods import OnlineHardClustering

    model = OnlineHardClustering(num_clusters=4, input_shape=(1, 8, 8), latent_dim=6, widths=[8]).eval()
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        out = model.cluster_outputs(x)
        d = ((model.embed(x)[:, None] - model.centroids[None]) ** 2).sum(2) / 100
    assert torch.equal(out.cluster, d.argmin(1))
    assert torch.allclose(out.ood_score, d.min(1).values, rtol=1e-5)
    assert ((out.confidence >= 0.25) & (out.confidence <= 1)).all()
    assert "cluster_prior" in model.state_dict() and model.log_prior() is None


def test_standardised_embeddings() -> None:
    """``embedding_norm: batch``: each embedding dimension has zero mean and unit variance over a training
    batch (checked with numpy), the running statistics serve evaluation, and the k-means initialisation's
    pass over the data leaves them untouched."""
    from clusterlight.methods import OnlineHardClustering

    torch.manual_seed(0)
    model = OnlineHardClustering(num_clusters=3, input_shape=(1, 8, 8), latent_dim=5, widths=[8], embedding_norm="batch")
    x = torch.rand(40, 1, 8, 8) * 3 + 1
    model.train()
    z = model.embed(x).detach().numpy()
    raw = model.encoder(x).detach().numpy()
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z.var(0), 1, rtol=1e-3)  # population variance, eps 1e-5
    np.testing.assert_allclose(z, (raw - raw.mean(0)) / np.sqrt(raw.var(0) + 1e-5), rtol=1e-4, atol=1e-5)
    before = {k: v.clone() for k, v in model.out_norm.state_dict().items()}
    model.eval()
    with model._batch_statistics():
        model._embed_train_mode(x)
    assert all(torch.equal(v, model.out_norm.state_dict()[k]) for k, v in before.items())
    assert not model.out_norm.training
    with torch.no_grad():  # evaluation: the running statistics, not the batch's
        mean, var = model.out_norm.running_mean, model.out_norm.running_var
        expect = (model.encoder(x[:3]) - mean) / torch.sqrt(var + 1e-5)
        assert torch.allclose(model.embed(x[:3]), expect, atol=1e-5)


def _fit(tmp_path: Path, *extra: str):
    from clusterlight.cli import main
    from tests.conftest import base_args, data_args

    args = ["fit", "--model=OnlineHardClustering", "--model.widths=[16, 32]", *extra, *data_args("digits"),
            *base_args(tmp_path, epochs=5, logger="csv")]
    return main(args)


def test_short_digits_run_does_not_collapse_and_argmin_does(tmp_path: Path) -> None:
    hard = _fit(tmp_path / "hard")
    m = hard.trainer.callback_metrics
    assert float(m["val/num_nonempty_clusters"]) >= 8
    assert float(m["val/largest_cluster_frac"]) < 0.3
    assert float(m["train/nonempty_clusters_epoch"]) >= 9
    assert float(m["val/acc"]) > 0.3  # chance is 0.1
    assert math.isfinite(float(m["val/loss"]))

    plain = _fit(tmp_path / "argmin", "--model.assignment=argmin")
    p = plain.trainer.callback_metrics
    assert float(p["val/num_nonempty_clusters"]) < float(m["val/num_nonempty_clusters"])
    assert float(p["val/largest_cluster_frac"]) > float(m["val/largest_cluster_frac"])
    assert float(p["val/loss"]) > float(m["val/loss"])  # the label-free criterion sees the collapse


def test_imbalanced_variant_learns_its_prior_without_labels(tmp_path: Path) -> None:
    cli = _fit(tmp_path, "--model.imbalanced=true", "--model.prior_momentum=0.05")
    m = cli.trainer.callback_metrics
    assert float(m["val/num_nonempty_clusters"]) >= 8 and float(m["val/largest_cluster_frac"]) < 0.3
    # the running cluster sizes are a buffer, saved in the checkpoint and used as the prior
    state = torch.load(cli.trainer.checkpoint_callback.last_model_path, weights_only=True)["state_dict"]
    prior = state["cluster_prior"]
    assert prior.sum().item() == pytest.approx(1.0, abs=1e-5) and not torch.allclose(prior, torch.full_like(prior, 0.1))
    assert torch.equal(prior, cli.model.cluster_prior)
    log_prior = cli.model.log_prior()  # epoch >= prior_warmup_epochs: in use, 0.5 * log(K pi)
    assert log_prior is not None and torch.allclose(log_prior, 0.5 * (10 * prior).log(), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# neighbour pairs


def test_neighbour_pairs_use_the_pixel_space_neighbours(tmp_path: Path) -> None:
    """The kNN table against scikit-learn's exact search on the training pixels; every paired image
    is one of its sample's k neighbours; a sample's draw does not depend on the other samples of its
    batch (so it is the same under any number of processes); checkpoints do not carry the table."""
    from sklearn.neighbors import NearestNeighbors

    from clusterlight.methods import OnlineHardClustering

    k = 4
    cli = _fit(tmp_path, f"--model.neighbours={k}")
    model, dm = cli.model, cli.datamodule
    pixels = dm.train_dataset.images.flatten(1).double().div(255.0).numpy()
    table = model.neighbour_index
    assert table.shape == (len(pixels), k)
    # the same neighbour distances as an exact search (indices may differ only between equal distances)
    ref_d, _ = NearestNeighbors(n_neighbors=k + 1).fit(pixels).kneighbors(pixels)
    ours_d = np.linalg.norm(pixels[table.numpy()] - pixels[:, None, :], axis=2)
    np.testing.assert_allclose(ours_d, ref_d[:, 1:], atol=1e-5)
    assert not (table == torch.arange(len(pixels))[:, None]).any()

    index = torch.tensor([5, 17, 3, 250, 5])
    paired = model._neighbour_images(index, batch_idx=7)
    images = dm.train_dataset.images.float().div(255.0)
    for row, i in enumerate(index.tolist()):
        assert any(torch.equal(paired[row], images[j]) for j in table[i].tolist()), i
    # a sample's neighbour is drawn by its dataset index: the same inside any batch of that step
    alone = model._neighbour_images(index[1:2], batch_idx=7)
    assert torch.equal(alone[0], paired[1])
    # a different step draws afresh: across many samples some neighbour changes
    everyone = torch.arange(len(pixels))
    assert not torch.equal(model._neighbour_images(everyone, 7), model._neighbour_images(everyone, 8))

    # checkpoints stay small: the table is recomputed when a fit (or a resumed fit) starts
    state = torch.load(cli.trainer.checkpoint_callback.last_model_path, weights_only=True)["state_dict"]
    assert not any(key.startswith("neighbour") for key in state)
    fresh = OnlineHardClustering(num_clusters=10, input_shape=model.input_shape, widths=[16, 32], neighbours=k)
    fresh.load_state_dict(state)


def test_neighbours_bad_values_are_one_line_errors(tmp_path: Path) -> None:
    from clusterlight.cli import main
    from clusterlight.errors import ClusterlightError
    from clusterlight.methods import OnlineHardClustering
    from tests.conftest import base_args, data_args

    for bad in (-1, 2.5, True):
        with pytest.raises(ClusterlightError, match="neighbours must be a non-negative integer"):
            OnlineHardClustering(neighbours=bad)
    # more neighbours than training images: refused after the splits are built, before the Trainer starts
    args = ["fit", "--model=OnlineHardClustering", "--model.widths=[16, 32]", "--model.neighbours=100",
            *data_args("digits", max_samples=100), *base_args(tmp_path, epochs=1)]
    with pytest.raises(ClusterlightError, match=r"neighbours must be below the number of training images \(\d+\), got 100"):
        main(args)
    assert not (tmp_path / "runs").exists()


def test_embedding_neighbours_are_refreshed_from_the_current_embedding(tmp_path: Path, monkeypatch) -> None:
    """``neighbour_space: embedding``: the first epoch pairs pixel neighbours; every later epoch
    starts with a new table, the exact k nearest neighbours (scikit-learn) of the embeddings of the
    training split under the weights of that moment, computed here image by image."""
    from sklearn.neighbors import NearestNeighbors

    from clusterlight.methods import OnlineHardClustering, neighbours

    k, seen = 4, []
    original = neighbours.PixelNeighbours._fit_embedding_neighbours

    def spy(self):
        images = self._datamodule().train_dataset.images.float().div(255.0)
        was = self.training
        self.eval()
        with torch.no_grad():  # an independent pass: one image at a time, in dataset order
            z = torch.cat([self.embed(images[i:i + 1]) for i in range(len(images))]).double().numpy()
        self.train(was)
        original(self)
        seen.append((self.current_epoch, z, self.neighbour_index.clone()))

    monkeypatch.setattr(neighbours.PixelNeighbours, "_fit_embedding_neighbours", spy)
    cli = _fit(tmp_path, f"--model.neighbours={k}", "--model.neighbour_space=embedding")
    assert [epoch for epoch, _, _ in seen] == [1, 2, 3, 4]
    pixels = cli.datamodule.train_dataset.images.flatten(1).double().div(255.0).numpy()
    for _, z, table in seen:
        ref_d, _ = NearestNeighbors(n_neighbors=k + 1).fit(z).kneighbors(z)
        ours_d = np.linalg.norm(z[table.numpy()] - z[:, None, :], axis=2)
        np.testing.assert_allclose(ours_d, ref_d[:, 1:], atol=1e-4)
        pix_d = np.linalg.norm(pixels[table.numpy()] - pixels[:, None, :], axis=2)
        pix_ref = NearestNeighbors(n_neighbors=k + 1).fit(pixels).kneighbors(pixels)[0][:, 1:]
        assert not np.allclose(pix_d, pix_ref, atol=1e-5)  # no longer the pixel-space table
    assert not torch.equal(seen[0][2], seen[-1][2])  # the table follows the training embedding
    with pytest.raises(ValueError, match="neighbour_space must be"):
        OnlineHardClustering(neighbours=k, neighbour_space="latent")


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_several_neighbour_draws_are_assigned_as_one_group(monkeypatch) -> None:
    """``neighbour_draws: 3``: each image and three independently drawn table neighbours are
    assigned together on the mean of their four cost rows (checked against a per-view loop)."""
    from types import SimpleNamespace

    from clusterlight.cluster.assignment import greedy_hard_assign
    from clusterlight.methods import OnlineHardClustering

    gen = torch.Generator().manual_seed(0)
    n, k = 40, 5
    pixels = torch.randint(0, 256, (n, 1, 8, 8), generator=gen, dtype=torch.uint8)
    model = OnlineHardClustering(num_clusters=4, input_shape=(1, 8, 8), latent_dim=6, widths=[4, 8], norm="none",
                                 neighbours=k, neighbour_draws=3, sigma=1.0).eval()
    model.neighbour_index = torch.randint(0, n, (n, k), generator=gen)
    monkeypatch.setattr(model, "_datamodule", lambda: SimpleNamespace(train_dataset=SimpleNamespace(images=pixels)))
    index = torch.tensor([3, 11, 0, 27, 39, 8])
    images = pixels[index].float() / 255.0
    with torch.no_grad():
        loss = model.fit_step(images, index, batch_idx=4)
        draws = [model._neighbour_images(index, 4, j) for j in range(3)]
        for view in draws:  # every draw is a neighbour from the sample's table row
            for row, i in enumerate(index.tolist()):
                assert any(torch.equal(view[row], pixels[j].float() / 255.0) for j in model.neighbour_index[i].tolist())
        # independent draws: over all samples, the three draws do not all pick the same neighbours
        everyone = torch.arange(n)
        assert not torch.equal(model._neighbour_images(everyone, 4, 0), model._neighbour_images(everyone, 4, 1))
        # reference: per view, per point, per cluster squared distances / sigma, then the mean of the 4 views
        mu = model.centroids
        rows = []
        for view in [images, *draws]:
            z = model.embed(view)
            rows.append(torch.stack([torch.stack([((z[b] - mu[c]) ** 2).sum() for c in range(4)])
                                     for b in range(len(index))]))
        cost = sum(rows) / 4
        assign = greedy_hard_assign(cost)
        expected = torch.stack([cost[b, assign[b]] for b in range(len(index))]).mean()
    torch.testing.assert_close(loss, expected)


def test_neighbour_draws_bad_values_are_one_line_errors() -> None:
    from clusterlight.errors import ClusterlightError
    from clusterlight.methods import OnlineHardClustering

    with pytest.raises(ClusterlightError, match="neighbour_draws must be a positive integer"):
        OnlineHardClustering(neighbours=5, neighbour_draws=0)
    with pytest.raises(ClusterlightError, match="needs neighbours > 0"):
        OnlineHardClustering(neighbour_draws=2)


def test_neighbour_bank_costs_match_a_per_row_loop() -> None:
    """``neighbour_bank: m``: each row's assignment cost is the mean of its fresh group cost
    (weighted by the group's ``1 + neighbour_draws`` images) and the costs of the banked embeddings
    of its ``m`` nearest table neighbours, leaving out those not banked yet and, with mutual
    neighbours, the filler entries past each row's count (checked by a loop over rows)."""
    from clusterlight.methods import OnlineHardClustering

    gen = torch.Generator().manual_seed(3)
    n, k, m, dim, clusters = 30, 6, 4, 5, 3
    for mutual in (False, True):
        model = OnlineHardClustering(num_clusters=clusters, input_shape=(1, 8, 8), latent_dim=dim, widths=[4, 8],
                                     neighbours=k, neighbour_draws=2, neighbour_bank=m, mutual_neighbours=mutual,
                                     sigma=2.0)
        model.neighbour_index = torch.randint(0, n, (n, k), generator=gen)
        model.neighbour_count = torch.randint(1, k + 1, (n,), generator=gen)
        model.bank = torch.randn(n, dim, generator=gen)
        model.bank_filled = torch.rand(n, generator=gen) < 0.6
        index = torch.tensor([0, 5, 17, 29, 8])
        cost = torch.rand(len(index), clusters, generator=gen)
        got = model._with_bank_costs(cost, index)
        mu = model.centroids.detach()
        for row, i in enumerate(index.tolist()):
            total, count = 3 * cost[row], 3
            for col in range(m):
                j = int(model.neighbour_index[i, col])
                if not model.bank_filled[j] or (mutual and col >= int(model.neighbour_count[i])):
                    continue
                total = total + torch.stack([((model.bank[j] - mu[c]) ** 2).sum() / 2.0 for c in range(clusters)])
                count += 1
            torch.testing.assert_close(got[row], total / count)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_neighbour_bank_stores_the_batch_embeddings(monkeypatch) -> None:
    """After a step the bank holds each batch image's embedding at its dataset index, and nothing
    else is marked as banked."""
    from types import SimpleNamespace

    from clusterlight.methods import OnlineHardClustering

    gen = torch.Generator().manual_seed(1)
    n, k = 20, 4
    pixels = torch.randint(0, 256, (n, 1, 8, 8), generator=gen, dtype=torch.uint8)
    model = OnlineHardClustering(num_clusters=3, input_shape=(1, 8, 8), latent_dim=6, widths=[4, 8], norm="none",
                                 neighbours=k, neighbour_bank=2).eval()
    model.neighbour_index = torch.randint(0, n, (n, k), generator=gen)
    model.bank, model.bank_filled = torch.zeros(n, 6), torch.zeros(n, dtype=torch.bool)
    monkeypatch.setattr(model, "_datamodule", lambda: SimpleNamespace(train_dataset=SimpleNamespace(images=pixels)))
    index = torch.tensor([2, 7, 13])
    images = pixels[index].float() / 255.0
    with torch.no_grad():
        model.fit_step(images, index, batch_idx=0)
        expected = model.embed(images)
    torch.testing.assert_close(model.bank[index], expected)
    assert model.bank_filled.nonzero().flatten().tolist() == [2, 7, 13]


def test_neighbour_bank_bad_values_are_one_line_errors() -> None:
    from clusterlight.errors import ClusterlightError
    from clusterlight.methods import OnlineHardClustering

    with pytest.raises(ClusterlightError, match="neighbour_bank must be a non-negative integer"):
        OnlineHardClustering(neighbours=5, neighbour_bank=-1)
    with pytest.raises(ClusterlightError, match="must not exceed neighbours"):
        OnlineHardClustering(neighbours=5, neighbour_bank=6)
    with pytest.raises(ClusterlightError, match="must not exceed neighbours"):
        OnlineHardClustering(neighbour_bank=2)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_prior_source_picks_which_counts_the_prior_follows() -> None:
    """``prior_momentum: 1`` makes the prior the last batch's cluster fractions: with
    ``prior_source: nearest`` those of each point's nearest centroid (a loop over points and
    centroids), with ``assigned`` those of the naive greedy; on a batch where every point is
    nearest to one centroid (the others about one unit of cost further) the two differ."""
    from clusterlight.methods import OnlineHardClustering

    gen = torch.Generator().manual_seed(5)
    images = torch.rand(24, 1, 8, 8, generator=gen)
    index = torch.arange(24)
    fractions = {}
    for source in ("nearest", "assigned"):
        torch.manual_seed(0)
        model = OnlineHardClustering(num_clusters=4, input_shape=(1, 8, 8), latent_dim=5, widths=[4, 8], norm="none",
                                     imbalanced=True, prior_momentum=1.0, prior_source=source, sigma=100.0).eval()
        with torch.no_grad():
            z = model.embed(images)
            model.centroids.copy_(z[:1] + 0.01 * torch.randn(4, 5, generator=gen))  # all near one point
            model.centroids[1:] += 5.0
            dist = torch.tensor([[float(((z[b] - model.centroids[c]) ** 2).sum()) / 100.0 for c in range(4)]
                                 for b in range(24)])
            if source == "nearest":
                expected = torch.bincount(dist.argmin(1), minlength=4).float() / 24
            else:
                expected = torch.bincount(naive_greedy_hard_assign(dist), minlength=4).float() / 24
            model.fit_step(images, index, batch_idx=0)
        torch.testing.assert_close(model.cluster_prior, expected)
        fractions[source] = expected
    assert fractions["nearest"][0] == 1.0 and fractions["assigned"].max() < 1.0
    from clusterlight.errors import ClusterlightError

    with pytest.raises(ClusterlightError, match="prior_source must be"):
        OnlineHardClustering(prior_source="labels")


def test_pooled_encoder_option_and_its_one_line_errors() -> None:
    from clusterlight.errors import ClusterlightError
    from clusterlight.methods import OnlineHardClustering
    from clusterlight.nn import ConvEncoder, PoolEncoder

    assert isinstance(OnlineHardClustering(widths=[6, 16]).encoder, ConvEncoder)
    model = OnlineHardClustering(input_shape=(1, 28, 28), latent_dim=128, widths=[6, 16], encoder="pooled")
    assert isinstance(model.encoder, PoolEncoder) and model.embed(torch.rand(2, 1, 28, 28)).shape == (2, 128)
    with pytest.raises(ClusterlightError, match="encoder must be 'strided' or 'pooled'"):
        OnlineHardClustering(encoder="lenet")
    with pytest.raises(ClusterlightError, match="encoder 'pooled': a 1x1 feature map is too small"):
        OnlineHardClustering(input_shape=(1, 16, 16), widths=[6, 16, 32], encoder="pooled")
