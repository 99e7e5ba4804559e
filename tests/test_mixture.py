"""The torch diagonal-Gaussian EM against scikit-learn's GaussianMixture(covariance_type="diag")."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture

from clusterlight.cluster.mixture import diag_gmm_em, merge_by_entropy, one_hot


@pytest.mark.parametrize("seed", [0, 1])
def test_diag_em_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sizes, k, d = [400, 60, 15], 3, 4  # imbalanced components of different spreads
    x = np.concatenate([rng.normal(3 * c, 0.5 + c, (n, d)) for c, n in enumerate(sizes)]).astype(np.float64)
    labels = rng.integers(0, k, len(x))  # a poor start: EM has work to do
    labels[:k] = np.arange(k)
    resp0 = np.eye(k)[labels]
    n = resp0.sum(0)
    means = resp0.T @ x / n[:, None]
    var = resp0.T @ (x * x) / n[:, None] - means**2 + 1e-6
    iters = 15
    ref = GaussianMixture(k, covariance_type="diag", weights_init=n / n.sum(), means_init=means,
                          precisions_init=1.0 / var, max_iter=iters, tol=0.0, reg_covar=1e-6).fit(x)
    # one more M-step here: ours starts from the responsibilities, sklearn from their parameters
    resp, weights, mu, variances = diag_gmm_em(torch.as_tensor(x, dtype=torch.float32), one_hot(torch.as_tensor(labels), k),
                                               iters=iters + 1, reg=1e-6, tol=-float("inf"))
    np.testing.assert_allclose(weights.numpy(), ref.weights_, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(mu.numpy(), ref.means_, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(variances.numpy(), ref.covariances_, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(resp.sum(1).numpy(), 1.0, atol=1e-5)
    assert (resp.argmax(1).numpy() == ref.predict(x)).mean() > 0.99


def test_em_stops_when_converged() -> None:
    x = torch.cat([torch.zeros(50, 2), torch.full((50, 2), 10.0)]) + torch.randn(100, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.cat([torch.zeros(50), torch.ones(50)]).long()
    resp, weights, _, _ = diag_gmm_em(x, one_hot(labels, 2), iters=1000)
    assert torch.equal(resp.argmax(1), labels)
    torch.testing.assert_close(weights, torch.tensor([0.5, 0.5]), atol=1e-4, rtol=0)


def _naive_entropy_merge(resp: np.ndarray, k: int) -> list[list[int]]:
    """Baudry et al.'s merging, written out pair by pair from the entropy itself."""
    groups = [[j] for j in range(resp.shape[1])]
    t = [resp[:, j].copy() for j in range(resp.shape[1])]

    def entropy(cols: list[np.ndarray]) -> float:
        m = np.stack(cols, 1)
        return float(-(m[m > 0] * np.log(m[m > 0])).sum())

    while len(t) > k:
        best = None
        for i in range(len(t)):
            for j in range(i + 1, len(t)):
                rest = [c for c_i, c in enumerate(t) if c_i not in (i, j)]
                e = entropy(rest + [t[i] + t[j]])
                if best is None or e < best[0]:
                    best = (e, i, j)
        _, i, j = best
        t[i] = t[i] + t[j]
        groups[i] = sorted(groups[i] + groups[j])
        del t[j], groups[j]
    return groups


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merge_by_entropy_matches_naive(seed: int) -> None:
    rng = np.random.default_rng(seed)
    resp = rng.dirichlet(np.full(7, 0.3), size=200)  # sharp but overlapping responsibilities
    merged, groups = merge_by_entropy(torch.as_tensor(resp, dtype=torch.float32), 3)
    assert groups == _naive_entropy_merge(resp, 3)
    expect = np.stack([resp[:, g].sum(1) for g in groups], 1)
    np.testing.assert_allclose(merged.numpy(), expect, rtol=1e-5, atol=1e-6)
    assert merged.dtype == torch.float32


def test_merge_by_entropy_joins_a_class_drawn_by_two_components() -> None:
    # a banana-shaped class beside a small round one and a big round one: six components fitted to
    # it, merged to three, give back the three groups however the components cut the banana
    rng = np.random.default_rng(0)
    angle = rng.uniform(0, np.pi, 600)
    banana = np.stack([4 * np.cos(angle), 4 * np.sin(angle)], 1) + rng.normal(0, 0.3, (600, 2))
    small = rng.normal([0.0, -4.0], 0.3, (40, 2))
    big = rng.normal([12.0, 0.0], 1.0, (400, 2))
    x = np.concatenate([banana, small, big])
    truth = np.repeat([0, 1, 2], [600, 40, 400])
    gmm = GaussianMixture(6, covariance_type="full", random_state=0, n_init=3).fit(x)
    merged, groups = merge_by_entropy(torch.as_tensor(gmm.predict_proba(x)), 3)
    pred = merged.argmax(1).numpy()
    from sklearn.metrics import adjusted_rand_score
    assert adjusted_rand_score(truth, pred) > 0.95
    assert sum(len(g) for g in groups) == 6 and sorted(j for g in groups for j in g) == list(range(6))
    with pytest.raises(ValueError, match="k must be in"):
        merge_by_entropy(torch.as_tensor(gmm.predict_proba(x)), 7)


def _naive_consensus_responsibilities(resps: np.ndarray, iters: int) -> np.ndarray:
    """Brute force over all K! relabellings: align argmaxes to member 0, vote, re-align to the vote, average."""
    import itertools

    m, n, k = resps.shape
    labels = resps.argmax(2)
    perms = [np.array(p) for p in itertools.permutations(range(k))]

    def best_perm(lab: np.ndarray, ref: np.ndarray) -> np.ndarray:  # perm[label] = reference label
        return max(perms, key=lambda p: int((p[lab] == ref).sum()))

    def majority(aligned: list[np.ndarray]) -> np.ndarray:
        counts = np.zeros((n, k), dtype=int)
        for a in aligned:
            counts[np.arange(n), a] += 1
        return counts.argmax(1)  # ties to the smallest label

    ref = labels[0]
    vote = majority([best_perm(lab, ref)[lab] for lab in labels])
    for _ in range(iters):
        vote = majority([best_perm(lab, vote)[lab] for lab in labels])
    out, agree = np.zeros((n, k)), np.zeros(n)
    for r, lab in zip(resps, labels):
        p = best_perm(lab, vote)
        for j in range(k):
            out[:, p[j]] += r[:, j]
        agree += p[lab] == vote
    return out / m, agree / m


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_consensus_responsibilities_against_a_brute_force_reference(seed: int) -> None:
    from clusterlight.cluster.consensus import consensus_responsibilities

    rng = np.random.default_rng(seed)
    n, k, m = 60, 4, 5
    truth = rng.integers(0, k, n)
    resps = []
    for _ in range(m):  # each member: the same partition with 15 % of points moved, soft, labels renamed
        lab = np.where(rng.random(n) < 0.15, rng.integers(0, k, n), truth)
        soft = rng.dirichlet(np.ones(k), n) * 0.4 + np.eye(k)[lab] * 0.6
        resps.append(soft[:, rng.permutation(k)])
    resps = np.stack(resps)
    got, agreement = consensus_responsibilities(resps, iters=2)
    want, want_agreement = _naive_consensus_responsibilities(resps, iters=2)
    np.testing.assert_allclose(got, want, atol=1e-12)
    np.testing.assert_allclose(agreement, want_agreement, atol=1e-12)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-12)


def test_consensus_responsibilities_ignore_member_label_names() -> None:
    from clusterlight.cluster.consensus import consensus_responsibilities

    rng = np.random.default_rng(3)
    base = [rng.dirichlet(np.ones(3) * 0.3, 50) for _ in range(3)]
    renamed = [base[0]] + [b[:, rng.permutation(3)] for b in base[1:]]
    a, _ = consensus_responsibilities(np.stack(base))
    b, _ = consensus_responsibilities(np.stack(renamed))
    np.testing.assert_allclose(a, b, atol=1e-12)
    with pytest.raises(ValueError, match="members, points, clusters"):
        consensus_responsibilities(np.ones((3, 4)))


def _long_long_small(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(size=(600, 2)) * [8.0, 0.3], rng.normal(size=(600, 2)) * [8.0, 0.3] + [0.0, 6.0],
                        rng.normal(size=(60, 2)) * 0.2 + [0.0, 12.0]])
    return x, np.repeat([0, 1, 2], [600, 600, 60])


def test_full_gmm_init_resp_is_one_more_start_in_the_likelihood_contest() -> None:
    """``init_resp`` (``recluster_warm``) adds the mixture those responsibilities define as a start:
    the start's weights, means and covariances come from numpy's weighted moments (the reference
    fit), the best lower bound of the three wins, and the generating partition as the start
    outscores the k-means and k-means++ starts after one EM step, which cut a long cluster."""
    from sklearn.metrics import adjusted_rand_score

    from clusterlight.cluster.mixture import full_gmm

    x, truth = _long_long_small()
    reg = 1e-5

    def reference(r: np.ndarray) -> GaussianMixture:  # the start r defines, by numpy's weighted moments
        means = np.stack([np.average(x, axis=0, weights=r[:, c]) for c in range(3)])
        covs = np.stack([np.cov(x.T, aweights=r[:, c], bias=True) + reg * np.eye(2) for c in range(3)])
        return GaussianMixture(3, covariance_type="full", weights_init=r.mean(0), means_init=means,
                               precisions_init=np.linalg.inv(covs), random_state=0, reg_covar=reg, max_iter=1).fit(x)

    others = {init: GaussianMixture(3, covariance_type="full", n_init=1, init_params=init, random_state=0, reg_covar=reg,
                                    max_iter=1).fit(x) for init in ("kmeans", "k-means++")}
    data = torch.as_tensor(x, dtype=torch.float32)
    onehot = np.eye(3)[truth]
    noise = np.random.default_rng(0).dirichlet(np.ones(3), size=len(x))
    for start, must_win in ((onehot, True), (noise, None)):
        fits = dict(others, init_resp=reference(start))
        want = max(fits, key=lambda name: fits[name].lower_bound_)
        resp, won = full_gmm(data, 3, n_init=1, seed=0, max_iter=1, init_resp=torch.as_tensor(start), return_start=True)
        assert won == want
        np.testing.assert_allclose(resp.numpy(), fits[want].predict_proba(x), atol=1e-5)
        if must_win:  # the generating partition beats the starts that cut a long cluster
            assert won == "init_resp"
            assert adjusted_rand_score(truth, resp.numpy().argmax(1)) == pytest.approx(1.0)
    # without the start, the best of the others is kept, as before the option
    plain = full_gmm(data, 3, n_init=1, seed=0, max_iter=1)
    best = max(others.values(), key=lambda g: g.lower_bound_)
    np.testing.assert_allclose(plain.numpy(), best.predict_proba(x), atol=1e-5)
    assert adjusted_rand_score(truth, plain.numpy().argmax(1)) < 0.9
    with pytest.raises(ValueError, match="init_resp must have shape"):
        full_gmm(data, 3, n_init=1, seed=0, init_resp=torch.ones(len(x), 2))


def _naive_graph_merge(resp: np.ndarray, k: int, nb: np.ndarray, min_size: float) -> list[list[int]]:
    """Reference for ``merge_by_graph``: edge by edge, groups as sets of components."""
    groups = [[c] for c in range(resp.shape[1])]
    while len(groups) > k:
        t = np.stack([resp[:, g].sum(1) for g in groups], 1)
        m = len(groups)
        w = np.zeros((m, m))
        for i in range(len(resp)):
            for j in nb[i]:
                for a in range(m):
                    for b in range(m):
                        if a != b:
                            w[a, b] += t[i, a] * t[j, b] + t[i, b] * t[j, a]
        size = t.sum(0)
        if size.min() < min_size:
            a = int(np.argmin(size))
            links = w[a].copy()
            links[a] = -np.inf
            i, j = sorted((a, int(np.argmax(links))))
        else:
            score = np.array([[w[a, b] / max(size[a], size[b]) if a != b else -np.inf for b in range(m)] for a in range(m)])
            i, j = sorted(divmod(int(np.argmax(score)), m))
        groups[i] = sorted(groups[i] + groups[j])
        del groups[j]
    return groups


def test_merge_by_graph_matches_a_naive_edge_loop_and_keeps_a_small_island() -> None:
    """On random soft responsibilities and a random graph the merges equal an edge-by-edge loop.
    On a designed case -- a small island beside a big class, and a second big class drawn as two
    touching halves -- the halves merge and the island keeps its own cluster (the generating
    labels are the reference). Entropy merging cannot tell these hard components apart: every
    pair's gain is zero."""
    from sklearn.metrics import adjusted_rand_score
    from sklearn.neighbors import NearestNeighbors

    from clusterlight.cluster.mixture import merge_by_entropy, merge_by_graph

    rng = np.random.default_rng(0)
    resp = rng.dirichlet(np.ones(6) * 0.3, size=40)
    before = resp.copy()
    merge_by_entropy(torch.as_tensor(resp), 2)  # float64 CPU input: the merge must not write into it
    np.testing.assert_array_equal(resp, before)
    nb = np.stack([rng.choice(np.delete(np.arange(40), i), 4, replace=False) for i in range(40)])
    for k, min_size in ((3, 0.0), (2, 4.0), (5, 8.0)):
        merged, groups = merge_by_graph(torch.as_tensor(resp), k, torch.as_tensor(nb), min_size=min_size)
        want = _naive_graph_merge(resp, k, nb, min_size)
        assert sorted(groups) == sorted(want)
        np.testing.assert_allclose(merged.numpy(), np.stack([resp[:, g].sum(1) for g in groups], 1), atol=1e-12)

    island = rng.normal(size=(25, 2)) * 0.3 + [2.6, 8.0]
    other = rng.normal(size=(300, 2)) + [0.0, 8.0]
    half_a = rng.normal(size=(300, 2)) + [-1.2, 0.0]
    half_b = rng.normal(size=(300, 2)) + [1.2, 0.0]
    x = np.concatenate([island, other, half_a, half_b])  # the halves last: merging the first pair is wrong
    components = np.repeat([0, 1, 2, 3], [25, 300, 300, 300])
    truth = np.repeat([0, 1, 2, 2], [25, 300, 300, 300])
    nb = NearestNeighbors(n_neighbors=11).fit(x).kneighbors(x, return_distance=False)[:, 1:]
    merged, groups = merge_by_graph(torch.as_tensor(np.eye(4)[components]), 3, torch.as_tensor(nb))
    assert sorted(groups) == [[0], [1], [2, 3]]
    assert adjusted_rand_score(truth, merged.argmax(1).numpy()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="neighbours must have shape"):
        merge_by_graph(torch.as_tensor(np.eye(4)[components]), 3, torch.as_tensor(nb[:5]))


def _naive_ncut(labels: np.ndarray, nb: np.ndarray, k: int) -> float:
    """Reference for ``normalized_cut``: a dense symmetric 0/1 adjacency, cut and volume per cluster."""
    n = len(labels)
    adj = np.zeros((n, n))
    for i in range(n):
        for j in nb[i]:
            if i != j:
                adj[i, j] = adj[j, i] = 1.0
    total = 0.0
    for c in range(k):
        inside = labels == c
        volume = adj[inside].sum()
        if volume > 0:
            total += adj[np.ix_(inside, ~inside)].sum() / volume
    return total


def test_normalized_cut_matches_a_dense_adjacency() -> None:
    """Random graphs (with repeated and mutual edges) and random labels, one cluster left empty."""
    from clusterlight.cluster.mixture import normalized_cut

    rng = np.random.default_rng(3)
    for n, m, k in ((30, 3, 4), (50, 6, 5)):
        nb = np.stack([rng.choice(np.delete(np.arange(n), i), m, replace=False) for i in range(n)])
        labels = rng.integers(0, k - 1, n)  # cluster k - 1 empty
        got = normalized_cut(torch.as_tensor(labels), torch.as_tensor(nb), k)
        assert got == pytest.approx(_naive_ncut(labels, nb, k), rel=1e-12)
    with pytest.raises(ValueError, match="must agree"):
        normalized_cut(torch.zeros(5, dtype=torch.long), torch.zeros(4, 2, dtype=torch.long), 2)


def test_refine_by_cut_joins_a_split_class_and_cuts_a_shared_cluster() -> None:
    """A mixture's typical mistake on imbalanced data, built by hand: a big class of two touching
    halves drawn as two clusters, two small separate classes sharing one. The moves end at the
    generating labels (scikit-learn's ARI), each lowers the naive normalised cut, and the
    responsibilities follow the moves column by column. From the generating labels no move is
    made and the input comes back as is."""
    from sklearn.metrics import adjusted_rand_score
    from sklearn.neighbors import NearestNeighbors

    from clusterlight.cluster.mixture import refine_by_cut

    rng = np.random.default_rng(0)
    half_a = rng.normal(size=(300, 2)) + [-1.2, 0.0]
    half_b = rng.normal(size=(300, 2)) + [1.2, 0.0]
    other = rng.normal(size=(250, 2)) + [0.0, 9.0]
    small_1 = rng.normal(size=(40, 2)) * 0.4 + [9.0, 0.0]
    small_2 = rng.normal(size=(40, 2)) * 0.4 + [9.0, 4.0]
    x = np.concatenate([half_a, half_b, other, small_1, small_2])
    truth = np.repeat([0, 0, 1, 2, 3], [300, 300, 250, 40, 40])
    wrong = np.repeat([0, 1, 2, 3, 3], [300, 300, 250, 40, 40])
    nb = NearestNeighbors(n_neighbors=11).fit(x).kneighbors(x, return_distance=False)[:, 1:]
    soft = 0.9 * np.eye(4)[wrong] + 0.1 * rng.dirichlet(np.ones(4), len(x))  # argmax is `wrong`
    resp, moves = refine_by_cut(torch.as_tensor(soft), torch.as_tensor(nb), torch.as_tensor(x, dtype=torch.float32))
    assert adjusted_rand_score(truth, resp.argmax(1).numpy()) == pytest.approx(1.0)
    assert len(moves) == 1
    a, b, c, before, after = moves[0]
    assert sorted((a, b)) == [0, 1] and c == 3
    assert before == pytest.approx(_naive_ncut(wrong, nb, 4)) and after < before
    assert after == pytest.approx(_naive_ncut(resp.argmax(1).numpy(), nb, 4))
    moved = resp.argmax(1).numpy() == b
    want = soft.copy()
    want[:, a] += want[:, b]
    want[:, b] = 0.0
    want[moved, b] = want[moved, c]
    want[moved, c] = 0.0
    np.testing.assert_allclose(resp.numpy(), want, atol=1e-12)
    np.testing.assert_allclose(resp.numpy().sum(1), 1.0, atol=1e-12)
    start = torch.as_tensor(np.eye(4)[truth])
    same, none = refine_by_cut(start, torch.as_tensor(nb), torch.as_tensor(x, dtype=torch.float32))
    assert none == [] and same is start
    with pytest.raises(ValueError, match="neighbours must have shape"):
        refine_by_cut(start, torch.as_tensor(nb[:5]), torch.as_tensor(x))
