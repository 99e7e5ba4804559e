"""The flagship's statistics pooling block, mixture and target against independent references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis
from scipy.stats import multivariate_normal
from sklearn.metrics import roc_auc_score

from clusterlight.cli import main
from clusterlight.methods.debiased import debiased_target, mixture_log_posterior
from clusterlight.methods.dec import target_distribution
from clusterlight.nn.stats_pool import StatisticsPooling
from tests.conftest import METHOD_ARGS, base_args, data_args


def _numpy_stats(x: np.ndarray, w: np.ndarray):
    n = w.sum(0)
    mean = (w.T @ x) / n[:, None]
    var = np.stack([(w[:, k:k + 1] * (x - mean[k]) ** 2).sum(0) / n[k] for k in range(w.shape[1])])
    return mean, var, n


@pytest.mark.parametrize("soft", [False, True])
def test_spb_batch_statistics_match_numpy(soft: bool) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6)) * rng.uniform(0.5, 3, 6) + 2
    w = rng.dirichlet(np.ones(4), 50) if soft else np.eye(4)[rng.integers(0, 4, 50)]
    spb = StatisticsPooling(4, 6)
    out = spb(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(w, dtype=torch.float32))
    mean, var, n = _numpy_stats(x, w)
    np.testing.assert_allclose(out["mean"].numpy(), mean, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["var"].numpy(), var, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(out["count"].numpy(), n, rtol=1e-5)
    np.testing.assert_allclose(out["batch_mean"].numpy(), x.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["batch_var"].numpy(), x.var(0), rtol=1e-3, atol=1e-5)
    assert out["pooled"].shape == (4, 2 * 6 + 1)


def test_spb_running_statistics_are_those_of_the_weighted_pooled_data() -> None:
    """With momentum m the running sums are m * old + (1 - m) * new; stats derive from the sums."""
    rng = np.random.default_rng(1)
    m = 0.7
    spb = StatisticsPooling(3, 5, momentum=m, min_var=0.0)
    batches = [(rng.normal(size=(40, 5)), rng.dirichlet(np.ones(3), 40)) for _ in range(3)]
    sums = None
    for i, (x, w) in enumerate(batches):
        spb.update(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(w, dtype=torch.float32))
        new = (w.sum(0), w.T @ x, w.T @ x ** 2)
        sums = new if i == 0 else tuple(m * a + (1 - m) * b for a, b in zip(sums, new))
    mean, var, n = spb.stats()
    ref_mean = sums[1] / sums[0][:, None]
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(var.numpy(), sums[2] / sums[0][:, None] - ref_mean ** 2, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(n.numpy(), sums[0], rtol=1e-5)
    np.testing.assert_allclose(spb.prior().numpy(), sums[0] / sums[0].sum(), rtol=1e-5)


def test_spb_full_covariance_matches_numpy_weighted_cov() -> None:
    """Running full covariances (momentum, soft weights) against numpy's weighted covariance."""
    rng = np.random.default_rng(5)
    m, k, d = 0.6, 3, 4
    spb = StatisticsPooling(k, d, momentum=m, min_var=0.0, full_covariance=True)
    mix = rng.normal(size=(d, d))
    batches = [(rng.normal(size=(60, d)) @ mix + 1.5, rng.dirichlet(np.ones(k), 60)) for _ in range(3)]
    for x, w in batches:
        spb.update(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(w, dtype=torch.float32))
    # the running sums weigh batch i by (1 - m) m^(last - i) (the first batch by m^(last)): that is
    # np.cov of the concatenated data with each sample's weight multiplied by its batch's factor
    factors = [m ** 2, (1 - m) * m, 1 - m]
    x_all = np.concatenate([x for x, _ in batches])
    for c in range(k):
        weights = np.concatenate([f * w[:, c] for f, (_, w) in zip(factors, batches)])
        ref = np.cov(x_all, rowvar=False, aweights=weights, bias=True)
        np.testing.assert_allclose(spb.covariance().numpy()[c], ref, rtol=1e-3, atol=1e-4)
        shrunk = spb.covariance(shrinkage=0.25).numpy()[c]
        np.testing.assert_allclose(shrunk, 0.75 * ref + 0.25 * np.trace(ref) / d * np.eye(d), rtol=1e-3, atol=1e-4)
    with pytest.raises(RuntimeError, match="full_covariance"):
        StatisticsPooling(k, d).covariance()


def test_feature_mahalanobis_ood_score_matches_scipy() -> None:
    """The default OOD score: smallest full-covariance Mahalanobis distance in R's space, per dimension."""
    from clusterlight.methods import DebiasedClustering

    rng = np.random.default_rng(6)
    model = DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), latent_dim=5, widths=[8, 8],
                               ood_shrinkage=0.1)
    x = rng.normal(size=(120, 5)) * rng.uniform(0.5, 2.0, 5)
    w = np.eye(3)[rng.integers(0, 3, 120)]
    model.spb_ood.reset_from(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(w, dtype=torch.float32))
    z = rng.normal(size=(9, 5)) * 2
    got = model._feature_mahalanobis(torch.as_tensor(z, dtype=torch.float32)).numpy()
    dists = []
    for c in range(3):
        pts = x[w[:, c] == 1]
        cov = np.cov(pts, rowvar=False, bias=True)
        cov = 0.9 * cov + 0.1 * np.trace(cov) / 5 * np.eye(5) + model.spb_ood.min_var * np.eye(5)
        inv = np.linalg.inv(cov)
        dists.append([mahalanobis(v, pts.mean(0), inv) ** 2 for v in z])
    np.testing.assert_allclose(got, np.min(dists, 0) / 5, rtol=1e-3)


@pytest.mark.parametrize(("scaling", "metric", "local", "given"),
                         [("cluster", "euclidean", 0.0, [1, 3, 8]), ("global", "euclidean", 0.0, [1, 3, 8]),
                          ("cluster", "cosine", 0.0, [1, 3, 8]), ("global", "cosine", 0.0, [1, 3, 8]),
                          ("global", "euclidean", 0.5, [1, 3, 8]), ("cluster", "cosine", 1.0, [1, 3, 8]),
                          ("neighbours", "euclidean", 0.0, [1, 3, 8]), ("neighbours", "cosine", 0.5, [1, 3, 8]),
                          ("neighbours", "euclidean", 0.0, [0.09, 3, 0.011]), ("cluster", "euclidean", 0.5, [0.09, 0.03, 1])])
def test_knn_ood_score_matches_sklearn_neighbours(scaling: str, metric: str, local: float, given: list) -> None:
    """``ood_score: knn``: mean over k of log(k-th neighbour distance / its cluster's median) -- or,
    with ``ood_scaling: global``, the median over all training samples -- against scikit-learn's
    NearestNeighbors and numpy medians. ``ood_metric: cosine``: scikit-learn's cosine distances
    ``d``, as the chord length ``sqrt(2 d)`` between unit vectors. ``ood_local_weight``: minus that
    weight times the mean training score (itself excluded) of the 5 nearest training samples.
    ``ood_scaling: neighbours``: the scale is the geometric mean of the cluster medians of the 6
    nearest training samples (a training sample's own match excluded), not of its own cluster.
    Fractions of the 90 training samples: 0.09 is 8 neighbours, 0.03 is 3 and 0.011 is 1."""
    from sklearn.neighbors import NearestNeighbors

    from clusterlight.methods import DebiasedClustering

    rng = np.random.default_rng(7)
    ks = [1, 3, 8]
    model = DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), latent_dim=4, widths=[8, 8],
                               ood_score="knn", ood_neighbours=given, ood_scaling=scaling, ood_metric=metric,
                               reject_quantile=0.8, ood_local_weight=local, ood_local_neighbours=5,
                               ood_scale_neighbours=6)
    x = rng.normal(size=(90, 4)) * rng.uniform(0.5, 2.0, 4)
    cluster = rng.integers(0, 3, 90)
    cluster[cluster == 2] = 1  # cluster 2 is empty: its scale is the median over all samples
    model._fit_knn_bank(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(cluster))
    if metric == "cosine":
        nn_ = NearestNeighbors(n_neighbors=max(ks) + 1, metric="cosine", algorithm="brute").fit(x)
        chord = lambda d: np.sqrt(2 * np.clip(d, 0, None))  # noqa: E731
    else:
        nn_ = NearestNeighbors(n_neighbors=max(ks) + 1).fit(x)
        chord = lambda d: d  # noqa: E731
    train_d = chord(nn_.kneighbors(x)[0][:, 1:])  # themselves excluded
    scale = np.array([[np.median(train_d[cluster == c, k - 1]) if (cluster == c).any() and scaling != "global"
                       else np.median(train_d[:, k - 1]) for c in range(3)] for k in ks])
    np.testing.assert_allclose(model.ood_scale.numpy(), scale, rtol=1e-4)
    z = rng.normal(size=(7, 4)) * 2
    zc = np.array([0, 1, 2, 0, 1, 2, 0])
    got = model._knn_scores(torch.as_tensor(z, dtype=torch.float32), torch.as_tensor(zc)).numpy()
    test_d, test_i = nn_.kneighbors(z, n_neighbors=max(ks))
    test_d = chord(test_d)
    train_nbrs = nn_.kneighbors(x, n_neighbors=7)[1][:, 1:]  # the 6 nearest, themselves excluded
    if scaling == "neighbours":  # each sample's scale: over its 6 nearest training samples' clusters
        train_scale = np.exp(np.log(scale)[:, cluster[train_nbrs]].mean(2))  # (len(ks), N)
        test_scale = np.exp(np.log(scale)[:, cluster[test_i[:, :6]]].mean(2))
    else:
        train_scale, test_scale = scale[:, cluster], scale[:, zc]
    own = np.mean([np.log(train_d[:, k - 1] / train_scale[i]) for i, k in enumerate(ks)], 0)
    train_ref = own - local * own[train_nbrs[:, :5]].mean(1)
    ref = np.mean([np.log(test_d[:, k - 1] / test_scale[i]) for i, k in enumerate(ks)], 0)
    ref = ref - local * own[test_i[:, :5]].mean(1)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.ood_train_scores.numpy(), train_ref, rtol=1e-4, atol=1e-5)
    # reject_quantile: the threshold is refitted with the bank, from its training scores
    assert float(model.reject_threshold) == pytest.approx(np.quantile(train_ref, 0.8), rel=1e-4, abs=1e-5)
    # a training sample scored again (eval_on: all) does not count itself: its training score
    again = model._knn_scores(torch.as_tensor(x[:10], dtype=torch.float32), torch.as_tensor(cluster[:10])).numpy()
    np.testing.assert_allclose(again, train_ref[:10], rtol=1e-4, atol=1e-5)


def test_assign_neighbours_votes_like_a_naive_loop() -> None:
    """``assign_neighbours: 4``: the cluster most of the 4 nearest bank rows have (scikit-learn's
    neighbours), a tie going to the cluster with the higher posterior ``q``; a training sample
    voted again skips its own bank row, as its OOD score does."""
    from sklearn.neighbors import NearestNeighbors

    from clusterlight.methods import DebiasedClustering

    rng = np.random.default_rng(11)
    model = DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), latent_dim=4, widths=[8, 8],
                               ood_neighbours=[1, 2], assign_neighbours=4)
    x = rng.normal(size=(60, 4))
    cluster = rng.integers(0, 3, 60)
    model._fit_knn_bank(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(cluster))
    queries = np.concatenate([rng.normal(size=(40, 4)), x[:20]])
    q = rng.dirichlet(np.ones(3), size=len(queries))
    zq = torch.as_tensor(queries, dtype=torch.float32)
    got, share = model._vote(model._bank_search(zq), torch.as_tensor(q))
    nn_ = NearestNeighbors(n_neighbors=5).fit(x)
    nbrs = np.concatenate([nn_.kneighbors(queries[:40], n_neighbors=4)[1], nn_.kneighbors(x[:20])[1][:, 1:]])
    ties = 0
    for row in range(len(queries)):
        counts = np.bincount(cluster[nbrs[row]], minlength=3)
        tied = np.flatnonzero(counts == counts.max())
        ties += len(tied) > 1
        assert int(got[row]) == tied[np.argmax(q[row, tied])], row
        assert float(share[row]) == pytest.approx(counts.max() / 4)
    assert ties > 0  # 4 votes over 3 clusters: the tie rule was exercised


def test_knn_ood_score_is_precise_far_from_the_origin() -> None:
    """Features with a large common offset: the scores match float64 scikit-learn distances."""
    from sklearn.neighbors import NearestNeighbors

    from clusterlight.methods import DebiasedClustering

    rng = np.random.default_rng(8)
    model = DebiasedClustering(num_clusters=2, input_shape=(1, 16, 16), latent_dim=6, widths=[8, 8],
                               ood_score="knn", ood_neighbours=[1, 2])
    x = rng.normal(size=(200, 6)) * 0.3 + 100.0
    cluster = (x[:, 0] > 100.0).astype(np.int64)
    model._fit_knn_bank(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(cluster))
    z = rng.normal(size=(50, 6)) * 0.3 + 100.0
    zc = (z[:, 0] > 100.0).astype(np.int64)
    got = model._knn_scores(torch.as_tensor(z, dtype=torch.float32), torch.as_tensor(zc)).numpy()
    x32 = torch.as_tensor(x, dtype=torch.float32).double().numpy()  # the bank as stored
    nn_ = NearestNeighbors(n_neighbors=3).fit(x32)
    train_d = nn_.kneighbors(x32)[0][:, 1:]
    scale = np.array([[np.median(train_d[cluster == c, k - 1]) for c in range(2)] for k in (1, 2)])
    test_d = nn_.kneighbors(torch.as_tensor(z, dtype=torch.float32).double().numpy(), n_neighbors=2)[0]
    ref = np.mean([np.log(test_d[:, k - 1] / scale[i, zc]) for i, k in enumerate((1, 2))], 0)
    np.testing.assert_allclose(got, ref, atol=2e-3)


def test_mixture_posterior_matches_scipy() -> None:
    rng = np.random.default_rng(2)
    z, mean = rng.normal(size=(8, 3)), rng.normal(size=(4, 3))
    var, prior = rng.uniform(0.3, 2.0, size=(4, 3)), rng.dirichlet(np.ones(4))
    log_q, maha = mixture_log_posterior(*(torch.as_tensor(a, dtype=torch.float64) for a in (z, mean, var)),
                                        torch.as_tensor(np.log(prior)))
    joint = np.stack([np.log(prior[k]) + multivariate_normal(mean[k], np.diag(var[k])).logpdf(z)
                      for k in range(4)], 1)
    ref = joint - np.logaddexp.reduce(joint, axis=1, keepdims=True)
    np.testing.assert_allclose(log_q.numpy(), ref, atol=1e-4)
    ref_maha = np.stack([(((z - mean[k]) ** 2) / var[k]).sum(1) for k in range(4)], 1)
    np.testing.assert_allclose(maha.numpy(), ref_maha, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("power", [1.0, 1.5, 2.0, 3.0])
def test_debiased_target(power: float) -> None:
    q = torch.softmax(torch.randn(30, 5, generator=torch.Generator().manual_seed(3)), 1)
    prior = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    p = debiased_target(q, prior, power).numpy()
    qn = q.numpy()
    ref = qn ** power / qn.sum(0) * prior.numpy()
    ref /= ref.sum(1, keepdims=True)
    np.testing.assert_allclose(p, ref, rtol=1e-5)
    if power == 2.0:
        np.testing.assert_allclose(debiased_target(q, None).numpy(), target_distribution(q).numpy(), rtol=1e-5)


def test_debiased_target_power_one_is_q_at_the_prior() -> None:
    q = torch.softmax(torch.randn(40, 4, generator=torch.Generator().manual_seed(5)), 1)
    prior = torch.tensor([0.4, 0.3, 0.2, 0.1])
    # power 1 with the batch used as often as the prior says (f = N pi): the target is q itself,
    # no cluster is grown or shrunk and nothing is sharpened
    freq = prior * len(q)
    np.testing.assert_allclose(debiased_target(q, prior, 1.0, freq=freq).numpy(), q.numpy(), rtol=1e-5, atol=1e-7)
    assert not np.allclose(debiased_target(q, prior, 2.0, freq=freq).numpy(), q.numpy(), atol=1e-3)


@pytest.mark.parametrize("power", [1.5, 2.0, 3.0])
def test_debiased_target_sharpens_the_likelihood(power: float) -> None:
    rng = np.random.default_rng(7)
    mixing = np.array([0.6, 0.25, 0.1, 0.05])  # the weights q was computed with
    lik = rng.gamma(1.0, size=(25, 4))
    lik[0] = 1.0  # a sample as likely under every cluster
    q = mixing * lik
    q /= q.sum(1, keepdims=True)
    prior = np.array([0.5, 0.3, 0.15, 0.05])
    p = debiased_target(torch.tensor(q), torch.tensor(prior), power, q_prior=torch.tensor(mixing)).numpy()
    # written from the likelihoods, not from q: p ~ mixing * L^power * prior / f
    ref = mixing * lik ** power * prior / q.sum(0)
    ref /= ref.sum(1, keepdims=True)
    np.testing.assert_allclose(p, ref, rtol=1e-5)
    # with the batch used as often as the mixing weights say (f = N * mixing, prior = mixing), the
    # sample as likely under every cluster keeps its posterior: odds 0.6 / 0.05 = 12 between the
    # biggest and the smallest cluster; sharpening the posterior gives 12^power
    freq = torch.tensor(mixing) * len(q)
    keep = debiased_target(torch.tensor(q), torch.tensor(mixing), power, freq=freq, q_prior=torch.tensor(mixing))
    np.testing.assert_allclose(keep[0].numpy(), mixing, rtol=1e-5)
    post = debiased_target(torch.tensor(q), torch.tensor(mixing), power, freq=freq)[0].numpy()
    np.testing.assert_allclose(post[0] / post[3], 12.0 ** power, rtol=1e-4)


# the k-NN case (the configs' OOD score) in the default suite; the full-covariance score with the k-means +
# diagonal EM partition of the UMAP space, slow (no config sets either; other default tests fit through UMAP)
@pytest.mark.parametrize("knn", [pytest.param(False, marks=pytest.mark.slow), True], ids=["full_mahalanobis", "knn"])
def test_checkpoint_round_trip_keeps_running_statistics(tmp_path: Path, knn: bool) -> None:
    common = METHOD_ARGS["DebiasedClustering"] + data_args("digits", max_samples=400) + base_args(tmp_path, epochs=2)
    # the two initial partitions end to end: the mixture on R's own features (manifold none) and
    # the earlier k-means + diagonal EM on the UMAP space
    common += ["--model.ood_score=knn", "--model.ood_neighbours=[1, 4, 16]", "--model.manifold=none"] if knn \
        else ["--model.ood_score=full_mahalanobis", "--model.init_partition=kmeans"]
    fit = main(["fit", *common])
    ckpt = fit.trainer.checkpoint_callback.last_model_path
    assert bool(fit.model.spb_c.initialised) and float(fit.model.spb_c.count.sum()) > 0
    fresh = main(["test", *common, f"--ckpt_path={ckpt}"])
    if knn:
        # a --model option on the command line applies over the checkpoint's arguments (LightningCLI
        # alone would test with the checkpoint's ood_scaling); the scales are refitted: global, each
        # k's median k-th neighbour distance over the bank (scikit-learn), the same for every cluster
        from sklearn.neighbors import NearestNeighbors

        other = main(["test", *common, f"--ckpt_path={ckpt}", "--model.ood_scaling=global"])
        assert fit.model.ood_scaling == "cluster" and other.model.ood_scaling == "global"
        bank = other.model.ood_bank.double().numpy()
        dist = NearestNeighbors(n_neighbors=17).fit(bank).kneighbors(bank)[0]  # column 0: the sample itself
        want_scale = np.median(dist[:, [1, 4, 16]], axis=0)
        got_scale = other.model.ood_scale.double().numpy()
        np.testing.assert_allclose(got_scale, np.repeat(want_scale[:, None], got_scale.shape[1], 1), rtol=1e-4)
        assert not np.allclose(fit.model.ood_scale.numpy(), fit.model.ood_scale.numpy()[:, :1])  # per cluster before
        # ood_space conv: the bank is the last convolutional stage of R's encoder, flattened (computed
        # here from the encoder's layers), and a test image's score the mean log k-th neighbour
        # distance in it over the global median (scikit-learn)
        conv = main(["test", *common, f"--ckpt_path={ckpt}", "--model.ood_scaling=global", "--model.ood_space=conv"])
        model = conv.model.eval()
        train = torch.stack([conv.datamodule.train_dataset[i]["image"] for i in range(len(conv.datamodule.train_dataset))])
        test_x = torch.stack([conv.datamodule.test_dataset[i]["image"] for i in range(64)])
        with torch.no_grad():
            flat = lambda x: model.representation.encoder.features(x).flatten(1).double().numpy()
            bank, queries = flat(train), flat(test_x)
            got = model._outputs(test_x).ood_score.double().numpy()
        assert bank.shape[1] == 32 * 2 * 2 and model.ood_bank.shape == bank.shape
        np.testing.assert_allclose(model.ood_bank.double().numpy(), bank, rtol=1e-4, atol=1e-5)
        nn_ = NearestNeighbors(n_neighbors=17).fit(bank)
        scale = np.median(nn_.kneighbors(bank)[0][:, [1, 4, 16]], axis=0)
        test_d = nn_.kneighbors(queries, n_neighbors=16)[0][:, [0, 3, 15]]
        np.testing.assert_allclose(got, np.log(test_d / scale).mean(1), rtol=1e-4, atol=1e-4)
        # one that changes the architecture is refused in one line before the Trainer starts
        with pytest.raises(ValueError, match=r"does not fit the model: representation\..* is \(8, .* \(6, "):
            main(["test", *common, f"--ckpt_path={ckpt}", "--model.latent_dim=6"])
    assert bool(fit.model.spb_ood.initialised) and float(fit.model.spb_ood.sum_outer.abs().sum()) > 0
    for name in ("count", "sum", "sum_sq", "total_count", "total_sum", "total_sum_sq"):
        for spb in ("spb_r", "spb_c"):
            a = getattr(getattr(fit.model, spb), name)
            b = getattr(getattr(fresh.model, spb), name)
            assert torch.equal(a, b), f"{spb}.{name}"
    for name in ("count", "sum", "sum_outer"):
        assert torch.equal(getattr(fit.model.spb_ood, name), getattr(fresh.model.spb_ood, name)), f"spb_ood.{name}"
    if knn:
        assert fit.model.ood_bank.shape == (len(fit.datamodule.train_dataset), 8)
        for name in ("ood_bank", "ood_scale", "ood_train_scores"):
            assert torch.equal(getattr(fit.model, name), getattr(fresh.model, name)), name
    # the untrained model would have empty statistics; the restored one predicts as the fitted one
    x = torch.stack([fit.datamodule.test_dataset[i]["image"] for i in range(64)])
    fit.model.eval()
    fresh.model.eval()
    with torch.no_grad():
        want = fit.model.cluster_outputs(x)
        got = fresh.model.cluster_outputs(x)
        assert torch.equal(want.cluster, got.cluster)
        assert torch.equal(want.ood_score, got.ood_score)
    if knn:
        # assign_neighbours from the command line over the checkpoint: each test image takes the cluster
        # most of its 5 nearest training features (scikit-learn) have, ties to C's posterior; the OOD
        # score is unchanged
        from sklearn.neighbors import NearestNeighbors

        voted = main(["test", *common, f"--ckpt_path={ckpt}", "--model.assign_neighbours=5"])
        assert voted.model.assign_neighbours == 5
        voted.model.eval()
        with torch.no_grad():
            out = voted.model.cluster_outputs(x)
            q = fit.model._posterior(fit.model.embed(x))[0].exp().numpy()
            feats = fit.model.representation.encode(x).double().numpy()
        bank = voted.model.ood_bank.double().numpy()
        bank_cluster = voted.model.ood_bank_cluster.numpy()
        nearest = NearestNeighbors(n_neighbors=5).fit(bank).kneighbors(feats)[1]
        want_cluster, want_share = [], []
        for row, nbrs in enumerate(nearest):
            counts = np.bincount(bank_cluster[nbrs], minlength=fit.model.num_clusters)
            tied = np.flatnonzero(counts == counts.max())
            best = tied[np.argmax(q[row, tied])]
            want_cluster.append(best)
            want_share.append(counts[best] / 5)
        np.testing.assert_array_equal(out.cluster.numpy(), want_cluster)
        np.testing.assert_allclose(out.confidence.numpy(), want_share)
        torch.testing.assert_close(out.ood_score, want.ood_score)
        assert not torch.equal(out.cluster, want.cluster)  # the vote differs from C's assignment somewhere

    # a checkpoint written before the OOD statistics existed still loads; they are recomputed
    # from the training split (same weights, same split: the same scores)
    old = torch.load(ckpt, map_location="cpu", weights_only=False)
    old["state_dict"] = {k: v for k, v in old["state_dict"].items()
                         if ".spb_ood." not in k and not k.startswith(("spb_ood.", "ood_"))}
    assert len(old["state_dict"]) < len(torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"])
    torch.save(old, tmp_path / "old.ckpt")
    again = main(["test", *common, f"--ckpt_path={tmp_path / 'old.ckpt'}"])
    again.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(again.model.cluster_outputs(x).ood_score, want.ood_score, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_ood_score_ranks_held_out_classes_above_seen_ones(tmp_path: Path) -> None:
    """(Slow: about a minute.) A short real run on digits with two classes held out of training: the OOD score of the
    test split, ranked against the OOD flags by scikit-learn, gives an AUROC well above chance,
    and the logged ``test/ood_auroc`` is that AUROC."""
    args = ["--model=DebiasedClustering", "--model.latent_dim=16", "--model.pretrain_epochs=6",
            *data_args("digits", ood_classes="[8, 9]", ood_fraction=0.3, batch_size=64),
            *base_args(tmp_path, epochs=8, logger="none"), "--test_after_fit=true"]
    cli = main(["fit", *args])
    test = cli.datamodule.test_dataset
    x = torch.stack([test[i]["image"] for i in range(len(test))])
    cli.model.eval()
    with torch.no_grad():
        score = cli.model.cluster_outputs(x).ood_score.numpy()
    auroc = roc_auc_score(test.ood.numpy(), score)
    print(f"ood auroc {auroc:.3f}")
    assert auroc > 0.7, auroc
    assert cli.model.last_metrics["test"]["ood_auroc"] == pytest.approx(auroc, abs=1e-4)


def test_checkpoint_loads_with_other_neighbour_views_and_ood_neighbours(tmp_path: Path) -> None:
    """The CLI builds the model from the checkpoint's hyperparameters; a checkpoint from before
    neighbour views and the k-NN score has none, so the config's values apply. Its state then
    loads strictly into a model with neighbour views (no projection head in it) and another
    ``ood_neighbours`` (the bank and scales are emptied, to be recomputed), and one trained with
    neighbour views loads into a model without them."""
    from clusterlight.methods import DebiasedClustering

    common = METHOD_ARGS["DebiasedClustering"] + data_args("digits", max_samples=300) + base_args(tmp_path, epochs=2)
    plain = main(["fit", *common, "--model.ood_neighbours=[1, 2, 4]"])
    state = torch.load(plain.trainer.checkpoint_callback.last_model_path, map_location="cpu",
                       weights_only=False)["state_dict"]
    assert state["ood_scale"].shape == (3, 10) and "projector.net.0.weight" not in state
    small = {"num_clusters": 10, "input_shape": (1, 8, 8), "widths": [16, 32], "latent_dim": 8, "cluster_dim": 4,
             "head_hidden": [16]}
    with_views = DebiasedClustering(**small, neighbours=5, ood_neighbours=[1, 2])
    init_head = {k: v.clone() for k, v in with_views.projector.state_dict().items()}
    with_views.load_state_dict(state)  # strict
    assert with_views.ood_bank.shape[0] == 0 and with_views.ood_scale.shape == (2, 10)  # to be recomputed
    assert all(torch.equal(v, with_views.projector.state_dict()[k]) for k, v in init_head.items())
    assert torch.equal(with_views.spb_c.count, state["spb_c.count"])
    same_ks = DebiasedClustering(**small, ood_neighbours=[1, 2, 4])
    same_ks.load_state_dict(state)
    assert torch.equal(same_ks.ood_bank, state["ood_bank"])  # same list: the saved bank is kept
    # as many entries but other ones (a fraction of the split for the count 4): emptied likewise
    other_ks = DebiasedClustering(**small, ood_neighbours=[1, 2, 0.1])
    other_ks.load_state_dict(state)
    assert other_ks.ood_bank.shape[0] == 0 and other_ks.ood_scale.shape == (3, 10)
    # scales made per cluster, loaded with ood_scaling global: emptied, to be recomputed
    other_scaling = DebiasedClustering(**small, ood_neighbours=[1, 2, 4], ood_scaling="global")
    other_scaling.load_state_dict(state)
    assert other_scaling.ood_bank.shape[0] == 0 and bool(other_scaling.ood_scaling_global)
    # a bank of Euclidean features, loaded with ood_metric cosine: emptied likewise
    other_metric = DebiasedClustering(**small, ood_neighbours=[1, 2, 4], ood_metric="cosine")
    other_metric.load_state_dict(state)
    assert other_metric.ood_bank.shape[0] == 0 and bool(other_metric.ood_metric_cosine)
    cos = DebiasedClustering(**small, ood_neighbours=[1, 2, 4], ood_metric="cosine")
    cos._fit_knn_bank(state["ood_bank"], torch.zeros(len(state["ood_bank"]), dtype=torch.long))
    cos_state = cos.state_dict()
    back = DebiasedClustering(**small, ood_neighbours=[1, 2, 4])  # a cosine bank, loaded as Euclidean: emptied
    back.load_state_dict(cos_state)
    assert back.ood_bank.shape[0] == 0 and not bool(back.ood_metric_cosine)
    again = DebiasedClustering(**small, ood_neighbours=[1, 2, 4], ood_metric="cosine")  # same metric: kept
    again.load_state_dict(cos_state)
    assert torch.equal(again.ood_bank, cos_state["ood_bank"])
    assert torch.allclose(again.ood_bank.norm(dim=1), torch.ones(len(again.ood_bank)))
    # a bank of R's features, loaded with ood_space conv: emptied likewise (its rows are wider), and back
    conv_space = DebiasedClustering(**small, ood_neighbours=[1, 2, 4], ood_space="conv")
    assert conv_space.ood_bank.shape[1] == 32 * 2 * 2
    conv_space.load_state_dict(state)
    assert conv_space.ood_bank.shape[0] == 0 and bool(conv_space.ood_space_conv)
    conv_space._fit_knn_bank(torch.randn(50, 128), torch.zeros(50, dtype=torch.long))
    features = DebiasedClustering(**small, ood_neighbours=[1, 2, 4])
    features.load_state_dict(conv_space.state_dict())
    assert features.ood_bank.shape[0] == 0 and not bool(features.ood_space_conv)
    # training scores made without the local correction, loaded with it: emptied likewise
    local = DebiasedClustering(**small, ood_neighbours=[1, 2, 4], ood_local_weight=0.5)
    local.load_state_dict(state)
    assert local.ood_bank.shape[0] == 0 and local.ood_bank_scores.shape[0] == 0
    zero = torch.zeros(len(state["ood_bank"]), dtype=torch.long)
    local._fit_knn_bank(state["ood_bank"], zero)
    local_state = local.state_dict()
    uncorrected = DebiasedClustering(**small, ood_neighbours=[1, 2, 4])
    uncorrected._fit_knn_bank(state["ood_bank"], zero)
    assert torch.allclose(local_state["ood_bank_scores"], uncorrected.ood_train_scores)
    assert not torch.allclose(local_state["ood_train_scores"], uncorrected.ood_train_scores)
    same_local = DebiasedClustering(**small, ood_neighbours=[1, 2, 4], ood_local_weight=0.5)
    same_local.load_state_dict(local_state)
    assert torch.equal(same_local.ood_train_scores, local_state["ood_train_scores"])
    other_m = DebiasedClustering(**small, ood_neighbours=[1, 2, 4], ood_local_weight=0.5, ood_local_neighbours=8)
    other_m.load_state_dict(local_state)
    assert other_m.ood_bank.shape[0] == 0
    # scores scaled by the neighbours' clusters: not from a per-cluster bank, nor from another count
    nbr = DebiasedClustering(**small, ood_neighbours=[1, 2, 4], ood_scaling="neighbours", ood_scale_neighbours=7)
    nbr.load_state_dict(state)
    assert nbr.ood_bank.shape[0] == 0 and nbr.ood_bank_cluster.shape[0] == 0
    split = torch.arange(len(state["ood_bank"])) % 3
    nbr._fit_knn_bank(state["ood_bank"], split)
    nbr_state = nbr.state_dict()
    same_nbr = DebiasedClustering(**small, ood_neighbours=[1, 2, 4], ood_scaling="neighbours", ood_scale_neighbours=7)
    same_nbr.load_state_dict(nbr_state)
    assert torch.equal(same_nbr.ood_bank_cluster, split) and torch.equal(same_nbr.ood_train_scores, nbr.ood_train_scores)
    other_count = DebiasedClustering(**small, ood_neighbours=[1, 2, 4], ood_scaling="neighbours", ood_scale_neighbours=9)
    other_count.load_state_dict(nbr_state)
    assert other_count.ood_bank.shape[0] == 0
    per_cluster = DebiasedClustering(**small, ood_neighbours=[1, 2, 4])  # and back to per-cluster scales
    per_cluster.load_state_dict(nbr_state)
    assert per_cluster.ood_bank.shape[0] == 0
    # a checkpoint from before ood_scaling, ood_metric and the local correction (no flags, no bank
    # scores): per cluster, Euclidean, uncorrected, kept by the defaults
    old = {k: v for k, v in state.items()
           if k not in ("ood_scaling_global", "ood_metric_cosine", "ood_local_setting", "ood_bank_scores",
                        "ood_scale_setting", "ood_bank_cluster", "ood_neighbours_setting")}
    before = DebiasedClustering(**small, ood_neighbours=[1, 2, 4])
    before.load_state_dict(old)
    assert torch.equal(before.ood_scale, state["ood_scale"])
    assert torch.equal(before.ood_bank_scores, state["ood_train_scores"])
    state_b = with_views.state_dict()
    assert "projector.net.0.weight" in state_b
    DebiasedClustering(**small, ood_neighbours=[1, 2]).load_state_dict(state_b)  # strict, head dropped


def test_reject_quantile_leaves_that_share_of_training_images_unassigned(tmp_path: Path) -> None:
    """``reject_quantile: 0.8`` with the k-NN score: the threshold is the 0.8 quantile of the training
    scores, so scoring the training images again (each skips its own match in the bank) leaves
    about a fifth of them unassigned (cluster -1) -- not none, as a self-match would."""
    args = [*METHOD_ARGS["DebiasedClustering"], "--model.ood_score=knn", "--model.ood_neighbours=[1, 4, 16]",
            "--model.reject_quantile=0.8", *data_args("digits", max_samples=300), *base_args(tmp_path, epochs=3)]
    cli = main(["fit", *args])
    train = cli.datamodule.train_dataset
    x = torch.stack([train[i]["image"] for i in range(len(train))])
    cli.model.eval()
    with torch.no_grad():
        out = cli.model.cluster_outputs(x)
    rejected = float((out.cluster == -1).float().mean())
    assert float(cli.model.reject_threshold) == pytest.approx(
        float(np.quantile(out.ood_score.numpy(), 0.8)), rel=1e-4, abs=1e-5)
    assert 0.15 <= rejected <= 0.21, rejected


def test_gmm_partition_keeps_a_small_tight_cluster_next_to_long_ones() -> None:
    """``init_partition: gmm`` finds two long clusters and a small tight one (the generating labels
    are the reference), where k-means (scikit-learn) cuts a long one in two instead."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score
    from sklearn.mixture import GaussianMixture

    from clusterlight.methods import DebiasedClustering

    rng = np.random.default_rng(3)
    long_a = rng.normal(size=(600, 2)) * [8.0, 0.3]
    long_b = rng.normal(size=(600, 2)) * [8.0, 0.3] + [0.0, 6.0]
    small = rng.normal(size=(60, 2)) * 0.2 + [0.0, 12.0]
    x = np.concatenate([long_a, long_b, small])
    truth = np.repeat([0, 1, 2], [600, 600, 60])
    model = DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), latent_dim=4, widths=[8, 8])
    assert model.init_partition == "gmm"
    resp = model._full_gmm_partition(torch.as_tensor(x, dtype=torch.float32)).numpy()
    assert resp.shape == (1260, 3)
    np.testing.assert_allclose(resp.sum(1), 1.0, rtol=1e-5)
    assert adjusted_rand_score(truth, resp.argmax(1)) == pytest.approx(1.0)
    kmeans_labels = KMeans(3, n_init=10, random_state=0).fit_predict(x)
    assert adjusted_rand_score(truth, kmeans_labels) < 0.8
    # the kept fit is the better-likelihood one of the two kinds of starts (naive reference)
    fits = [GaussianMixture(3, covariance_type="full", n_init=model.kmeans_n_init, init_params=init,
                            random_state=model.kmeans_seed, reg_covar=1e-5).fit(x) for init in ("kmeans", "k-means++")]
    assert fits[0].lower_bound_ < fits[1].lower_bound_  # here the k-means starts are the worse ones
    np.testing.assert_allclose(resp, fits[1].predict_proba(x), atol=1e-5)
    with pytest.raises(ValueError, match="init_partition"):
        DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), init_partition="hdbscan")
    with pytest.raises(ValueError, match="gmm_iters"):
        DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), gmm_iters=0)
    with pytest.raises(ValueError, match="kmeans_n_init"):
        DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), kmeans_n_init=0)
    DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), init_partition="kmeans", gmm_iters=0)  # k-means only


@pytest.mark.slow  # an option off in every config
def test_overcluster_graph_merges_the_mixture_components_along_the_spaces_knn_graph(monkeypatch) -> None:
    """``overcluster: 2`` with ``overcluster_merge: graph``: the ``2K`` components of the mixture go to
    :func:`merge_by_graph` (itself checked against a naive loop) with the ``umap_neighbors`` nearest
    neighbours of each point of the clustering space (scikit-learn's as the reference), and its
    merged responsibilities are the partition; on three generating classes, one of them two
    touching blobs, the partition is those classes."""
    from sklearn.metrics import adjusted_rand_score
    from sklearn.neighbors import NearestNeighbors

    from clusterlight.methods import DebiasedClustering, debiased

    calls = []
    real = debiased.merge_by_graph

    def spy(resp, k, neighbours):
        calls.append((resp.shape, k, neighbours.clone()))
        out = real(resp, k, neighbours)
        calls.append(out[0].clone())
        return out

    monkeypatch.setattr(debiased, "merge_by_graph", spy)
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(size=(400, 2)) + [-1.3, 0.0], rng.normal(size=(400, 2)) + [1.3, 0.0],
                        rng.normal(size=(400, 2)) + [0.0, 9.0], rng.normal(size=(30, 2)) * 0.3 + [3.0, 9.0]])
    truth = np.repeat([0, 0, 1, 2], [400, 400, 400, 30])
    model = DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), latent_dim=4, widths=[8, 8], overcluster=2,
                               overcluster_merge="graph", umap_neighbors=10)
    resp = model._full_gmm_partition(torch.as_tensor(x, dtype=torch.float32))
    assert len(calls) == 2
    shape, k, neighbours = calls[0]
    assert shape == (1230, 6) and k == 3
    want = NearestNeighbors(n_neighbors=11).fit(x).kneighbors(x, return_distance=False)[:, 1:]
    assert (np.sort(neighbours.numpy(), 1) == np.sort(want, 1)).mean() > 0.999  # ties aside
    torch.testing.assert_close(resp, calls[1])
    assert adjusted_rand_score(truth, resp.argmax(1).numpy()) > 0.95


def test_augmented_views_without_neighbours_train_the_projection_head(tmp_path: Path, monkeypatch) -> None:
    """``augment`` alone pairs each image with its own random affine copy: every training step
    warps the batch's own images (a spy on ``random_affine``), the projection head exists, the
    contrast loss is positive and changes the head; bad strengths are one-line errors."""
    from clusterlight.methods import DebiasedClustering, debiased

    calls = []
    original = debiased.random_affine

    def spy(images, u, strength, parts, mode):
        assert mode == "bilinear"  # the default resampling
        out = original(images, u, strength, parts, mode)
        calls.append((images.detach().clone(), u.detach().clone(), strength, out.detach().clone(), parts))
        return out

    monkeypatch.setattr(debiased, "random_affine", spy)
    args = [*METHOD_ARGS["DebiasedClustering"], "--model.augment=1.0", *data_args("digits", max_samples=300),
            *base_args(tmp_path, epochs=2)]
    cli = main(args, run=False)
    assert cli.model.neighbours == 0 and cli.model.projector is not None
    head = {k: v.clone() for k, v in cli.model.projector.state_dict().items()}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    steps = cli.trainer.global_step // 2  # two optimizers after pretraining, one before: at least this many
    assert len(calls) >= steps > 0
    train_images = torch.stack([cli.datamodule.train_dataset[i]["image"] for i in range(len(cli.datamodule.train_dataset))])
    for images, u, strength, out, parts in calls:
        assert parts == ("rotation", "scale", "shift")  # all three unless augment_parts says otherwise
        assert strength == 1.0 and u.shape == (len(images), 4) and float(u.min()) >= 0 and float(u.max()) < 1
        # the view is the batch's own images (rows of the training split), and the warp changed them
        assert all(bool((train_images == img).flatten(1).all(1).any()) for img in images)
        assert float((out - images).abs().max()) > 0.05
    assert float(cli.trainer.callback_metrics["train/contrast"]) > 0
    assert any(not torch.equal(v, cli.model.projector.state_dict()[k]) for k, v in head.items())
    for bad in (-0.5, 5.0, True, "strong"):
        with pytest.raises(ValueError, match="augment must be"):
            DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), augment=bad)
    assert DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), augment=1.0,
                              augment_parts=["shift", "rotation"]).augment_parts == ("shift", "rotation")
    with pytest.raises(ValueError, match="augment_parts needs augment > 0"):
        DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), augment_parts=["shift"])
    for bad in ([], ["shift", "shift"], ["shear"]):
        with pytest.raises(ValueError, match="augment_parts must be distinct names"):
            DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), augment=1.0, augment_parts=bad)
    # per-component strengths: the others drawn keep augment; equal ones are the one number
    assert DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), augment=3.0, augment_parts=["rotation", "scale"],
                              augment_strengths={"rotation": 1.0}).augment_strength == (1.0, 3.0, 3.0)
    assert DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), augment=2.0,
                              augment_strengths={"scale": 2}).augment_strength == 2.0
    assert DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), augment=2.0, augment_strengths={
        "rotation": 0.0, "scale": 0.0, "shift": 0.0}).augment_strength == 0.0
    with pytest.raises(ValueError, match="augment_strengths needs augment > 0"):
        DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), augment_strengths={"scale": 1.0})
    for parts, bad in ((None, {"zoom": 1.0}), (None, {"scale": 4.5}), (None, {"scale": True}), (["scale"], {"shift": 1.0})):
        with pytest.raises(ValueError, match="augment_strengths must map components drawn"):
            DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), augment=1.0, augment_parts=parts, augment_strengths=bad)
    with pytest.raises(ValueError, match="ood_scaling must be"):
        DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), ood_scaling="local")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="ood_scale_neighbours must be"):
            DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), ood_scale_neighbours=bad)
    for bad in (-0.1, 1.5, True, "half"):
        with pytest.raises(ValueError, match="ood_local_weight must be"):
            DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), ood_local_weight=bad)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="ood_local_neighbours must be"):
            DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), ood_local_neighbours=bad)
    with pytest.raises(ValueError, match="ood_metric must be"):
        DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), ood_metric="manhattan")
    with pytest.raises(ValueError, match="ood_space must be"):
        DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), ood_space="pixels")
    with pytest.raises(ValueError, match="ood_space conv is the space of ood_score knn's bank, got ood_score 'nll'"):
        DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), ood_space="conv", ood_score="nll")
    for bad in ([], [0], [4, 1.0], [0.0], [-0.2], [True], [2.5], ["8"]):
        with pytest.raises(ValueError, match=r"ood_neighbours must be a non-empty list of positive integers \(counts\)"):
            DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), ood_neighbours=bad)
    assert DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), ood_neighbours=[0.1, 64, 0.02, 8]).ood_neighbours \
        == [8, 64, 0.02, 0.1]
    assert DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16)).projector is None  # off by default


def test_rotation_negatives_add_rotated_pairs_to_the_contrast_loss(tmp_path: Path, monkeypatch) -> None:
    """``rotation_negatives``: every contrast step encodes the batch and its view pairs at 0, 90, 180
    and 270 degrees (checked against ``torch.rot90`` of the upright rows), pairs row ``i`` of one
    side with row ``i`` of the other (same rotation, same image: NT-Xent over ``4B`` pairs), keeps
    the reconstruction on the upright images only, and needs views and square images."""
    from clusterlight.methods import DebiasedClustering, debiased

    encoded, losses = [], []
    original_loss = debiased.nt_xent

    def spy_loss(a, b, temperature):
        losses.append((a.shape, b.shape))
        return original_loss(a, b, temperature)

    monkeypatch.setattr(debiased, "nt_xent", spy_loss)
    args = [*METHOD_ARGS["DebiasedClustering"], "--model.augment=1.0", "--model.rotation_negatives=true",
            *data_args("digits", max_samples=300), *base_args(tmp_path, epochs=2)]
    cli = main(args, run=False)
    model = cli.model
    original_encode = model.representation.encode

    def spy_encode(x):
        encoded.append(x.detach().clone())
        return original_encode(x)

    monkeypatch.setattr(model.representation, "encode", spy_encode)
    cli.trainer.fit(model, datamodule=cli.datamodule)
    train_images = torch.stack([cli.datamodule.train_dataset[i]["image"] for i in range(len(cli.datamodule.train_dataset))])
    assert train_images.shape[0] > 0 and losses

    def rotated_stack(x: torch.Tensor) -> bool:
        b = len(x) // 8
        return len(x) == 8 * b and b > 0 and all(
            torch.equal(x[r * b:(r + 1) * b], torch.rot90(x[:b], r, (2, 3)))
            and torch.equal(x[(4 + r) * b:(5 + r) * b], torch.rot90(x[4 * b:5 * b], r, (2, 3))) for r in (1, 2, 3))

    calls = iter(encoded)
    for sa, sb in losses:  # each contrast loss follows one encoding of the rotated stack, in order
        assert sa == sb
        x = next((x for x in calls if len(x) == 2 * sa[0] and rotated_stack(x)), None)
        assert x is not None, f"no encoding of a rotated stack of {2 * sa[0]} images before the loss"
        b = sa[0] // 4
        assert bool((train_images == x[0]).flatten(1).all(1).any())  # upright rows are training images
        assert not torch.equal(x[b:2 * b], x[:b])  # a rotation changes digits
    assert float(cli.trainer.callback_metrics["train/contrast"]) > 0
    with pytest.raises(ValueError, match="rotation_negatives needs view pairs"):
        DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), rotation_negatives=True)
    with pytest.raises(ValueError, match="rotation_negatives needs square images"):
        DebiasedClustering(num_clusters=3, input_shape=(1, 16, 12), augment=1.0, rotation_negatives=True)


def test_contrast_dims_feed_only_the_first_features_to_the_projection_head(tmp_path: Path, monkeypatch) -> None:
    """``contrast_dims: m``: every projection of a view pair reads columns ``0..m-1`` of the
    encoder's output for those images (the rest follow the reconstruction alone), the decoder
    reads all of them, and bad values or a head without view pairs are refused."""
    from clusterlight.methods import DebiasedClustering

    m = 3
    args = [*METHOD_ARGS["DebiasedClustering"], "--model.augment=1.0", f"--model.contrast_dims={m}",
            *data_args("digits", max_samples=200), *base_args(tmp_path, epochs=2)]
    cli = main(args, run=False)
    model = cli.model
    latent = model.representation.encode(torch.zeros(1, *model.input_shape)).shape[1]
    assert latent > m
    encoded, projected, decoded = [], [], []
    original_encode, original_decode = model.representation.encode, model.representation.decode

    def spy_encode(x):
        out = original_encode(x)
        encoded.append(out.detach().clone())
        return out

    def spy_decode(z):
        decoded.append(z.shape[1])
        return original_decode(z)

    monkeypatch.setattr(model.representation, "encode", spy_encode)
    monkeypatch.setattr(model.representation, "decode", spy_decode)
    model.projector.register_forward_pre_hook(lambda _, inputs: projected.append(inputs[0].detach().clone()))
    cli.trainer.fit(model, datamodule=cli.datamodule)
    assert projected and decoded and set(decoded) == {latent}
    for z in projected:
        assert z.shape[1] == m
        # the rows of some encoding, first m columns only
        assert any(z.shape[0] <= e.shape[0] and any(torch.equal(z, e[s:s + len(z), :m]) for s in (0, len(e) - len(z)))
                   for e in encoded)
    for bad in (0, latent + 1, True):
        with pytest.raises(ValueError, match="contrast_dims must be a positive integer"):
            DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), latent_dim=latent, augment=1.0, contrast_dims=bad)
    with pytest.raises(ValueError, match="contrast_dims needs view pairs"):
        DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), contrast_dims=2)
    with pytest.raises(ValueError, match="augment_interpolation must be one of"):
        DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), augment=1.0, augment_interpolation="bicubic")
    with pytest.raises(ValueError, match="augment_interpolation needs augment > 0"):
        DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), augment_interpolation="nearest")


@pytest.mark.slow
def test_debias_views_weigh_the_contrast_loss_by_cardinality(tmp_path: Path, monkeypatch) -> None:
    """(Slow: about 15 s, for an option no config sets.) ``debias_views``: in co-training each NT-Xent call gets one weight per pair, of mean 1 over the
    batch, each ``C * (K * pi_k)^-s`` for the cardinality prior ``pi`` of some cluster ``k`` with one
    common ``C`` (checked against the SPB's prior at the call); pretraining's calls are unweighted.
    The option needs view pairs."""
    from clusterlight.methods import DebiasedClustering, debiased

    calls = []
    original_loss = debiased.nt_xent
    holder = {}

    def spy_loss(a, b, temperature, weight=None):
        model = holder["model"]
        calls.append((bool(model.pretraining), None if weight is None else weight.clone(), model.spb_c.prior().clone()))
        return original_loss(a, b, temperature, weight)

    monkeypatch.setattr(debiased, "nt_xent", spy_loss)
    args = [*METHOD_ARGS["DebiasedClustering"], "--model.augment=1.0", "--model.debias_views=true",
            "--model.debias_strength=0.5", *data_args("digits", max_samples=300), *base_args(tmp_path, epochs=2)]
    cli = main(args, run=False)
    holder["model"] = cli.model
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    k = cli.model.num_clusters
    pre = [w for p, w, _ in calls if p]
    co = [(w, prior) for p, w, prior in calls if not p]
    assert pre and co and all(w is None for w in pre)
    distinct = 0
    for w, prior in co:
        assert w is not None and float(w.mean()) == pytest.approx(1.0, rel=1e-5)
        cand = (w.double()[:, None] * (k * prior.double()[None, :]) ** 0.5).numpy()  # C for each (pair, cluster)
        common = [c for c in cand[0] if all(np.isclose(row, c, rtol=1e-4).any() for row in cand[1:])]
        assert common, "the weights are not C * (K * pi_k)^-0.5 with one common C"
        distinct += len(np.unique(w.numpy().round(6))) > 1
    assert distinct > 0  # clusters of different sizes weigh differently in some step
    with pytest.raises(ValueError, match="debias_views needs view pairs"):
        DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), debias_views=True)


def test_overcluster_umap_and_recluster_options_refuse_bad_values() -> None:
    from clusterlight.methods import DebiasedClustering

    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="overcluster must be"):
            DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), overcluster=bad)
    with pytest.raises(ValueError, match="needs init_partition gmm"):
        DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), overcluster=2, init_partition="kmeans")
    for bad in (-0.1, 1.5, True, "mutual"):
        with pytest.raises(ValueError, match="umap_set_op_mix_ratio must be"):
            DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), umap_set_op_mix_ratio=bad)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="umap_runs must be"):
            DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), umap_runs=bad)
    with pytest.raises(ValueError, match="needs manifold umap"):
        DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), umap_runs=3, manifold="none")
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="recluster_every must be"):
            DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), recluster_every=bad)
    with pytest.raises(ValueError, match="overcluster_merge must be"):
        DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), overcluster=2, overcluster_merge="ward")
    with pytest.raises(ValueError, match="needs overcluster > 1"):  # not silently ignored
        DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), overcluster_merge="graph")
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="assign_neighbours must be"):
            DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), assign_neighbours=bad)
    with pytest.raises(ValueError, match="target_sharpen must be posterior or likelihood, got 'prior'"):
        DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), target_sharpen="prior")
    with pytest.raises(ValueError, match="assign_neighbours 5 needs ood_score knn"):
        DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), assign_neighbours=5, ood_score="nll")
    for bad in ({"recluster_warm": True}, {"recluster_warm": True, "recluster_every": 2, "init_partition": "kmeans"},
                {"recluster_warm": True, "recluster_every": 2, "overcluster": 2}, {"recluster_warm": 1, "recluster_every": 2}):
        with pytest.raises(ValueError, match="recluster_warm"):
            DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), **bad)


def test_umap_runs_start_from_the_consensus_of_each_embeddings_partition(tmp_path: Path, monkeypatch) -> None:
    """With ``umap_runs: 3`` UMAP embeds the training features with three seeds (the first one is
    C's target), each embedding is partitioned, and the SPBs start from the consensus of the three
    partitions (checked against :func:`consensus_responsibilities`, itself checked against brute force)."""
    from clusterlight.cluster import umap_hdbscan
    from clusterlight.cluster.consensus import consensus_responsibilities
    from clusterlight.methods import debiased
    from clusterlight.nn.stats_pool import StatisticsPooling

    seeds, parts, resets = [], [], []
    real_umap, real_partition, real_reset = umap_hdbscan.reduce_umap, debiased.DebiasedClustering._partition, \
        StatisticsPooling.reset_from

    def umap_spy(x, n, seed, **kw):
        seeds.append(seed)
        return real_umap(x, n, seed, **kw)

    def partition_spy(self, space, manifold, monitor_only, *warm):
        out = real_partition(self, space, manifold, monitor_only, *warm)
        if manifold:
            parts.append((space.clone(), out.clone()))
            resets.append("partition")
        return out

    def reset_spy(self, x, w):
        resets.append(w.clone())
        return real_reset(self, x, w)

    monkeypatch.setattr(debiased, "reduce_umap", umap_spy)
    monkeypatch.setattr(debiased.DebiasedClustering, "_partition", partition_spy)
    monkeypatch.setattr(StatisticsPooling, "reset_from", reset_spy)
    args = METHOD_ARGS["DebiasedClustering"] + ["--model.umap_runs=3", "--model.kmeans_seed=4"] \
        + data_args("digits", max_samples=300) + base_args(tmp_path, epochs=2, logger="none")
    cli = main(["fit", *args])
    assert seeds == [4, 5, 6]
    assert len(parts) == 3
    spaces = [p[0] for p in parts]
    assert torch.equal(spaces[0], cli.model.manifold_target)
    assert not torch.allclose(spaces[0], spaces[1]) and not torch.allclose(spaces[1], spaces[2])
    want, _ = consensus_responsibilities(torch.stack([p[1] for p in parts]))
    # the two resets right after the last partition are spb_r's and spb_c's, from the combined responsibilities
    last = max(i for i, r in enumerate(resets) if isinstance(r, str))
    assert resets[last - 2:last + 1] == ["partition"] * 3
    for got in resets[last + 1:last + 3]:
        torch.testing.assert_close(got, torch.from_numpy(want).float())


def test_refine_cut_moves_the_initial_partition_along_rs_feature_graph(tmp_path: Path, monkeypatch) -> None:
    """With ``refine_cut: 10`` the initial partition of the clustering space goes once through
    :func:`refine_by_cut` (itself checked against a naive cut), with the 10 nearest neighbours of
    R's standardised training features (scikit-learn's as the reference), the UMAP embedding as
    the split space and the ``kmeans_seed``; both SPBs start from what it returns. Bad values
    are one-line errors."""
    from sklearn.neighbors import NearestNeighbors

    from clusterlight.errors import ClusterlightError
    from clusterlight.methods import DebiasedClustering, debiased
    from clusterlight.nn.stats_pool import StatisticsPooling

    calls, resets = [], []
    real_refine, real_wrapper, real_reset = debiased.refine_by_cut, DebiasedClustering._refine_by_cut, \
        StatisticsPooling.reset_from

    def refine_spy(resp, neighbours, space, **kw):
        out = real_refine(resp, neighbours, space, **kw)
        calls.append({"neighbours": neighbours.clone(), "space": space.clone(), "kw": kw, "out": out[0].clone()})
        resets.append("refined")
        return out

    def wrapper_spy(self, z_r, space, resp):
        calls.append({"z_r": z_r.clone()})
        return real_wrapper(self, z_r, space, resp)

    def reset_spy(self, x, w):
        resets.append(w.clone())
        return real_reset(self, x, w)

    monkeypatch.setattr(debiased, "refine_by_cut", refine_spy)
    monkeypatch.setattr(DebiasedClustering, "_refine_by_cut", wrapper_spy)
    monkeypatch.setattr(StatisticsPooling, "reset_from", reset_spy)
    args = METHOD_ARGS["DebiasedClustering"] + ["--model.refine_cut=10", "--model.kmeans_seed=3"] \
        + data_args("digits", max_samples=300) + base_args(tmp_path, epochs=2, logger="none")
    cli = main(["fit", *args])
    assert len(calls) == 2  # once, at the start of clustering
    z = calls[0]["z_r"].double().numpy()
    z = (z - z.mean(0)) / z.std(0, ddof=1)
    want = NearestNeighbors(n_neighbors=11).fit(z).kneighbors(z, return_distance=False)[:, 1:]
    assert (np.sort(calls[1]["neighbours"].numpy(), 1) == np.sort(want, 1)).mean() > 0.999  # ties aside
    torch.testing.assert_close(calls[1]["space"], cli.model.manifold_target)
    assert calls[1]["kw"] == {"seed": 3}
    last = resets.index("refined")
    for got in resets[last + 1:last + 3]:  # spb_r's and spb_c's resets
        torch.testing.assert_close(got, calls[1]["out"])
    for bad in (-1, True, 2.5):
        with pytest.raises(ClusterlightError, match="refine_cut must be an integer >= 0"):
            DebiasedClustering(num_clusters=3, input_shape=(1, 16, 16), refine_cut=bad)


@pytest.mark.slow  # an option off in every config
def test_recluster_every_rebuilds_the_clustering_space_from_the_current_representation(tmp_path: Path, monkeypatch) -> None:
    """With ``recluster_every: 2`` and one epoch of pretraining, clustering starts at epoch 1 and the
    clustering space, the partition and both SPBs are rebuilt at the start of epoch 3 (not 2), from
    R's features of that moment: the UMAP input is R's encoding of the training split
    (standardised) with that epoch start's weights, and the SPBs are reset from that partition's
    responsibilities."""
    from clusterlight.methods import debiased
    from clusterlight.nn.stats_pool import StatisticsPooling

    calls, resets, state = [], [], {}
    real_umap, real_init, real_partition, real_reset = debiased.reduce_umap, debiased.DebiasedClustering.init_clusters, \
        debiased.DebiasedClustering._partition, StatisticsPooling.reset_from

    def init_spy(self, monitor_only=False):
        state["model"] = self
        return real_init(self, monitor_only)

    def umap_spy(x, n, seed, **kw):
        model = state["model"]
        data = model.trainer.datamodule.train_dataset
        images = torch.stack([data[i]["image"] for i in range(len(data))])
        was = model.training
        model.eval()
        with torch.no_grad():  # R's encoding of the training split now, independently of compute_on_split
            z = model.representation.encode(images).double()
        model.train(was)
        want = ((z - z.mean(0)) / z.std(0).clamp_min(1e-6)).numpy()
        calls.append((model.current_epoch, float(np.abs(x - want).max())))
        return real_umap(x, n, seed, **kw)

    def partition_spy(self, space, manifold, monitor_only, *warm):
        out = real_partition(self, space, manifold, monitor_only, *warm)
        if manifold:
            resets.append(("partition", out.clone()))
        return out

    def reset_spy(self, x, w):
        resets.append(("reset", w.clone()))
        return real_reset(self, x, w)

    monkeypatch.setattr(debiased.DebiasedClustering, "init_clusters", init_spy)
    monkeypatch.setattr(debiased, "reduce_umap", umap_spy)
    monkeypatch.setattr(debiased.DebiasedClustering, "_partition", partition_spy)
    monkeypatch.setattr(StatisticsPooling, "reset_from", reset_spy)
    args = METHOD_ARGS["DebiasedClustering"] + ["--model.recluster_every=2"] \
        + data_args("digits", max_samples=200) + base_args(tmp_path, epochs=4, logger="none")
    cli = main(["fit", *args])
    assert [epoch for epoch, _ in calls] == [1, 3]
    assert max(err for _, err in calls) < 1e-4  # each embedding is of R's features at that epoch start
    assert sum(kind == "partition" for kind, _ in resets) == 2
    for i, (kind, resp) in enumerate(resets):  # the two resets after a partition (spb_r, spb_c) use it
        if kind == "partition":
            assert [k for k, _ in resets[i + 1:i + 3]] == ["reset", "reset"]
            for _, got in resets[i + 1:i + 3]:
                torch.testing.assert_close(got, resp)
    assert [cli.model.recluster_due(e) for e in range(8)] == [False, False, False, True, False, True, False, True]


@pytest.mark.slow  # an option off in every config
def test_recluster_warm_starts_each_rebuild_from_the_current_clustering(tmp_path: Path, monkeypatch) -> None:
    """With ``recluster_warm`` the rebuild at epoch 3 starts UMAP from C's current embedding of the
    training split (standardised) and adds C's current posterior as a start of the mixture; both
    are recomputed here by hand (the balanced standardisation from spb_r's statistics, the diagonal
    mixture from spb_c's, scipy's normal density). The first partition (epoch 1) has neither."""
    from scipy.special import logsumexp
    from scipy.stats import norm

    from clusterlight.methods import debiased

    umap_inits, gmm_inits, expected = [], [], []
    real_init, real_umap, real_gmm = debiased.DebiasedClustering.init_clusters, debiased.reduce_umap, debiased.full_gmm

    def init_spy(self, monitor_only=False):
        if not monitor_only and bool(self.clustering_started):
            data = self.trainer.datamodule.train_dataset
            images = torch.stack([data[i]["image"] for i in range(len(data))])
            was = self.training
            self.eval()
            with torch.no_grad():
                z = self.representation.encode(images).double()
                mean, var, count = (t.double() for t in self.spb_r.stats())
                keep = count > 1e-6
                mu = mean[keep].mean(0)
                v = var[keep].mean(0) + ((mean[keep] - mu) ** 2).mean(0)
                zc = self.clustering(((z - mu) / v.sqrt()).float()).double().numpy()
            self.train(was)
            m, s2, n = (t.double().numpy() for t in self.spb_c.stats())
            log_p = np.stack([norm.logpdf(zc, m[k], np.sqrt(s2[k])).sum(1) for k in range(len(m))], 1) + np.log(n / n.sum())
            expected.append(((zc - zc.mean(0)) / zc.std(0, ddof=1), np.exp(log_p - logsumexp(log_p, 1, keepdims=True))))
        return real_init(self, monitor_only)

    def umap_spy(x, n, seed, **kw):
        umap_inits.append(kw.get("init"))
        return real_umap(x, n, seed, **kw)

    def gmm_spy(x, k, *args, **kw):
        gmm_inits.append(kw.get("init_resp"))
        return real_gmm(x, k, *args, **kw)

    monkeypatch.setattr(debiased.DebiasedClustering, "init_clusters", init_spy)
    monkeypatch.setattr(debiased, "reduce_umap", umap_spy)
    monkeypatch.setattr(debiased, "full_gmm", gmm_spy)
    args = METHOD_ARGS["DebiasedClustering"] + ["--model.recluster_every=2", "--model.recluster_warm=true"] \
        + data_args("digits", max_samples=200) + base_args(tmp_path, epochs=4, logger="none")
    main(["fit", *args])
    assert len(umap_inits) == len(gmm_inits) == 2 and len(expected) == 1
    assert umap_inits[0] is None and gmm_inits[0] is None
    want_layout, want_resp = expected[0]
    np.testing.assert_allclose(umap_inits[1], want_layout, atol=2e-3)
    np.testing.assert_allclose(gmm_inits[1].double().numpy(), want_resp, atol=2e-3)


@pytest.mark.slow  # an option off in every config
def test_reduce_umap_starts_from_a_given_layout() -> None:
    import umap

    from clusterlight.cluster.umap_hdbscan import reduce_umap

    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 6)).astype(np.float32)
    start = rng.normal(size=(150, 2))
    ours = reduce_umap(x, 10, seed=3, n_components=2, init=start)
    ref = umap.UMAP(n_neighbors=10, min_dist=0.0, n_components=2, random_state=3, n_jobs=1, transform_seed=3,
                    init=start).fit_transform(x)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    assert np.abs(ours - reduce_umap(x, 10, seed=3, n_components=2)).max() > 1e-3  # not the spectral start
    with pytest.raises(ValueError, match="init must be"):
        reduce_umap(x, 10, seed=3, n_components=2, init=start[:, :1])


def test_reduce_umap_passes_the_set_operation_to_umap() -> None:
    import umap

    from clusterlight.cluster.umap_hdbscan import reduce_umap

    x = np.random.default_rng(0).normal(size=(150, 6)).astype(np.float32)
    ours = reduce_umap(x, 10, seed=3, n_components=2, set_op_mix_ratio=0.3)
    ref = umap.UMAP(n_neighbors=10, min_dist=0.0, n_components=2, random_state=3, n_jobs=1, transform_seed=3,
                    set_op_mix_ratio=0.3).fit_transform(x)
    union = reduce_umap(x, 10, seed=3, n_components=2)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    assert np.abs(ours - union).max() > 1e-3  # the mix changes the embedding
    with pytest.raises(ValueError, match="set_op_mix_ratio must be"):
        reduce_umap(x, 10, seed=3, set_op_mix_ratio=2.0)
