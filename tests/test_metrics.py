"""Tests of clusterlight.metrics against brute-force, numpy, scipy and scikit-learn references."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import entropy
from sklearn import metrics as skm

from clusterlight.metrics import (
    OODAUROC,
    ClusteringMetrics,
    ClusterKL,
    MatchedAccuracy,
    TailAccuracy,
    adjusted_rand_index,
    cluster_kl,
    confusion_after_matching,
    contingency,
    group_accuracy,
    match_clusters,
    matched_accuracy,
    normalized_mutual_info,
    ood_auroc,
    per_class_recall,
)

SHAPES = [(3, 3), (5, 3), (2, 4), (4, 4), (1, 3), (3, 1), (6, 2), (2, 5)]


# --------------------------------------------------------------------------- references
def naive_counts(pred, target, k=None, c=None):
    """Count matrix with python loops."""
    k = max(pred) + 1 if k is None else k
    c = max(target) + 1 if c is None else c
    m = np.zeros((k, c), dtype=np.int64)
    for p, t in zip(pred, target):
        m[p, t] += 1
    return m


def brute_mappings(k, c):
    """Every one-to-one partial mapping of k clusters onto c classes using min(k, c) pairs."""
    if k <= c:
        for classes in itertools.permutations(range(c), k):
            yield dict(enumerate(classes))
    else:
        for clusters in itertools.permutations(range(k), c):
            yield {cl: cls for cls, cl in enumerate(clusters)}


def brute_best(pred, target, k=None, c=None):
    """(best number of hits, list of all optimal mappings) by exhaustive search."""
    m = naive_counts(pred, target, k, c)
    best, arg = -1, []
    for mapping in brute_mappings(*m.shape):
        hits = sum(m[a, b] for a, b in mapping.items())
        if hits > best:
            best, arg = hits, [mapping]
        elif hits == best:
            arg.append(mapping)
    return best, arg


def random_labels(seed, k, c, n=40):
    rng = np.random.default_rng(seed)
    return rng.integers(0, k, n), rng.integers(0, c, n)


def noisy_labels(seed, k, c, n=60, keep=0.75):
    """Clusters that follow the classes through a random map, with label noise."""
    rng = np.random.default_rng(seed)
    target = rng.integers(0, c, n)
    cmap = rng.permutation(max(k, c))[:c] % k
    pred = np.where(rng.random(n) < keep, cmap[target], rng.integers(0, k, n))
    return pred, target


# --------------------------------------------------------------------------- contingency / matching
@pytest.mark.parametrize("k,c", SHAPES)
def test_contingency_matches_loop(k, c):
    pred, target = random_labels(k * 10 + c, k, c)
    got = contingency(pred, target, num_clusters=k + 1, num_classes=c + 2)
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), naive_counts(pred, target, k + 1, c + 2))


def test_contingency_rejects_bad_labels():
    with pytest.raises(ValueError):
        contingency([0, -1], [0, 1])
    with pytest.raises(ValueError):
        contingency([0, 3], [0, 1], num_clusters=3)
    with pytest.raises(ValueError):
        contingency([0, 1], [0, 1, 1])
    with pytest.raises(ValueError):
        contingency([0.5, 1.0], [0, 1])


@pytest.mark.parametrize("k,c", SHAPES)
@pytest.mark.parametrize("seed", range(4))
def test_matched_accuracy_vs_brute_force(k, c, seed):
    pred, target = random_labels(seed, k, c)
    best, _ = brute_best(pred.tolist(), target.tolist())
    assert matched_accuracy(pred, target) == pytest.approx(best / len(pred))
    # torch and list inputs give the same
    assert matched_accuracy(torch.as_tensor(pred), target.tolist()) == pytest.approx(best / len(pred))


@pytest.mark.parametrize("k,c", SHAPES)
def test_match_clusters_is_optimal_and_one_to_one(k, c):
    pred, target = random_labels(100 + k * c, k, c, n=50)
    mapping = match_clusters(pred, target, num_clusters=k, num_classes=c)
    assert mapping.shape == (k,) and mapping.dtype == torch.int64
    matched = mapping[mapping >= 0].tolist()
    assert len(matched) == min(k, c) and len(set(matched)) == len(matched)
    assert int((mapping == -1).sum()) == max(0, k - c)
    m = naive_counts(pred.tolist(), target.tolist(), k, c)
    hits = sum(m[a, b] for a, b in enumerate(mapping.tolist()) if b >= 0)
    assert hits == brute_best(pred.tolist(), target.tolist(), k, c)[0]


@pytest.mark.parametrize(
    "pred,target,expected",
    [
        ([2, 2, 0, 0, 1, 1], [0, 0, 1, 1, 2, 2], 1.0),  # perfect up to renaming
        ([0, 0, 0, 0, 0], [0, 0, 1, 1, 2], 2 / 5),  # collapse: majority class only
        ([0, 1, 2, 2], [0, 0, 1, 1], 3 / 4),  # K > C: one of clusters 0/1 is unmatched
        ([0, 0, 0, 1], [0, 1, 2, 2], 2 / 4),  # K < C
        ([0, 1, 2, 3], [0, 0, 0, 0], 1 / 4),  # every sample its own cluster
        ([1, 1, 0, 0, 0, 1], [0, 0, 0, 1, 1, 1], 4 / 6),
    ],
)
def test_matched_accuracy_hand_cases(pred, target, expected):
    assert matched_accuracy(pred, target) == pytest.approx(expected)


def test_empty_inputs_are_nan():
    assert math.isnan(matched_accuracy([], []))
    assert math.isnan(normalized_mutual_info([], []))
    assert math.isnan(adjusted_rand_index([], []))
    assert math.isnan(cluster_kl([], [], 3))


@pytest.mark.parametrize("seed", range(5))
def test_invariance_to_permuting_cluster_ids(seed):
    k, c = 6, 4
    pred, target = noisy_labels(seed, k, c, n=80)
    perm = np.random.default_rng(seed + 50).permutation(k)
    renamed = perm[pred]
    assert matched_accuracy(renamed, target) == pytest.approx(matched_accuracy(pred, target))
    assert normalized_mutual_info(renamed, target) == pytest.approx(normalized_mutual_info(pred, target))
    assert adjusted_rand_index(renamed, target) == pytest.approx(adjusted_rand_index(pred, target))
    assert cluster_kl(renamed, target, k) == pytest.approx(cluster_kl(pred, target, k))
    torch.testing.assert_close(
        per_class_recall(renamed, target, c, k), per_class_recall(pred, target, c, k), equal_nan=True
    )


# --------------------------------------------------------------------------- NMI / ARI
@pytest.mark.parametrize("k,c", SHAPES + [(10, 7)])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("method", ["arithmetic", "geometric"])
def test_nmi_matches_sklearn(k, c, seed, method):
    for pred, target in (random_labels(seed, k, c, 120), noisy_labels(seed, k, c, 120)):
        want = skm.normalized_mutual_info_score(target, pred, average_method=method)
        assert normalized_mutual_info(pred, target, method) == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("k,c", SHAPES + [(10, 7)])
@pytest.mark.parametrize("seed", range(3))
def test_ari_matches_sklearn(k, c, seed):
    for pred, target in (random_labels(seed, k, c, 120), noisy_labels(seed, k, c, 120)):
        want = skm.adjusted_rand_score(target, pred)
        assert adjusted_rand_index(pred, target) == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize(
    "pred,target",
    [
        ([0, 0, 0], [1, 1, 1]),  # one cluster, one class (torchmetrics alone says 0)
        ([0, 0, 0, 0], [0, 1, 0, 1]),
        ([0, 1, 0, 1], [2, 2, 2, 2]),
        ([3], [0]),
        ([0, 1, 2, 3], [0, 0, 1, 1]),
    ],
)
def test_nmi_ari_edge_cases_match_sklearn(pred, target):
    for method in ("arithmetic", "geometric"):
        want = skm.normalized_mutual_info_score(target, pred, average_method=method)
        assert normalized_mutual_info(pred, target, method) == pytest.approx(want, abs=1e-6)
    assert adjusted_rand_index(pred, target) == pytest.approx(skm.adjusted_rand_score(target, pred))


# --------------------------------------------------------------------------- recall / groups
def naive_recall(pred, target, mapping, c):
    """Recall per class given a cluster->class dict, with numpy only."""
    pred, target = np.asarray(pred), np.asarray(target)
    mapped = np.array([mapping.get(int(p), -1) for p in pred])
    out = np.full(c, np.nan)
    for cls in range(c):
        sel = target == cls
        if sel.any():
            out[cls] = np.mean(mapped[sel] == cls)
    return out


@pytest.mark.parametrize("k,c", [(3, 3), (5, 3), (3, 5), (4, 4), (6, 2), (2, 6)])
def test_per_class_recall_vs_numpy(k, c):
    compared = 0
    for seed in range(8):
        pred, target = noisy_labels(seed, k, c, n=60)
        _, optimal = brute_best(pred.tolist(), target.tolist(), k, c)
        if len(optimal) != 1:  # recall is only defined uniquely for a unique optimum
            continue
        num_classes = c + 1  # an extra class absent from target -> nan
        got = per_class_recall(pred, target, num_classes, k)
        want = naive_recall(pred, target, optimal[0], num_classes)
        np.testing.assert_allclose(got.numpy(), want, equal_nan=True)
        assert math.isnan(got[-1])
        compared += 1
    assert compared >= 3


@pytest.mark.parametrize("seed", range(6))
def test_recall_weighted_by_support_is_accuracy(seed):
    pred, target = random_labels(seed, 4, 5, n=70)
    recall = per_class_recall(pred, target, 5).numpy()
    support = np.bincount(target, minlength=5)
    ok = support > 0
    assert (recall[ok] * support[ok]).sum() / support.sum() == pytest.approx(
        matched_accuracy(pred, target)
    )


def naive_groups(recall, counts):
    """head/medium/tail means written independently of the implementation."""
    c = len(counts)
    order = sorted(range(c), key=lambda i: (counts[i], i))
    g = max(1, round(c / 3))
    tail, medium, head = order[:g], order[g : c - g], order[c - g :]

    def mean(ids):
        vals = [recall[i] for i in ids if not np.isnan(recall[i])]
        return float(np.mean(vals)) if vals else math.nan

    return {"head_acc": mean(head), "medium_acc": mean(medium), "tail_acc": mean(tail)}


def assert_same_dict(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], nan_ok=True), key


def test_group_accuracy_hand_case():
    counts = [100, 50, 10, 5, 80, 1]  # ascending: 5, 3, 2, 1, 4, 0
    recall = [0.9, 0.6, 0.5, 0.2, 0.8, 0.0]
    got = group_accuracy(recall, counts)
    assert_same_dict(got, {"head_acc": 0.85, "medium_acc": 0.55, "tail_acc": 0.1})


def test_group_accuracy_ties_and_small_c():
    # ties: class ids break them -> tail = {0}, medium = {1}, head = {2}
    assert_same_dict(
        group_accuracy([0.1, 0.2, 0.3], [5, 5, 5]), {"head_acc": 0.3, "medium_acc": 0.2, "tail_acc": 0.1}
    )
    two = group_accuracy([0.4, 0.7], [1, 9])
    assert two["tail_acc"] == pytest.approx(0.4) and two["head_acc"] == pytest.approx(0.7)
    assert math.isnan(two["medium_acc"])
    one = group_accuracy([0.5], [3])
    assert one["head_acc"] == one["tail_acc"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        group_accuracy([0.5, 0.5], [3])


@pytest.mark.parametrize("c", [1, 2, 3, 4, 5, 7, 10, 11])
def test_group_accuracy_vs_naive(c):
    rng = np.random.default_rng(c)
    counts = rng.integers(1, 6, c).tolist()  # small range -> many ties
    recall = rng.random(c)
    recall[rng.random(c) < 0.2] = np.nan
    assert_same_dict(group_accuracy(torch.as_tensor(recall), counts), naive_groups(recall, counts))


@pytest.mark.parametrize("seed", range(4))
def test_tail_acc_end_to_end_vs_naive(seed):
    k, c = 5, 5
    pred, target = noisy_labels(seed, k, c, n=70, keep=0.85)
    _, optimal = brute_best(pred.tolist(), target.tolist(), k, c)
    assert len(optimal) == 1
    counts = [300, 120, 60, 20, 5]
    recall = naive_recall(pred, target, optimal[0], c)
    m = ClusteringMetrics(k, c, train_class_counts=counts)
    m.update(torch.as_tensor(pred), torch.as_tensor(target), torch.arange(len(pred)))
    out = m.compute()
    want = naive_groups(recall, counts)
    for key, value in want.items():
        assert float(out[key]) == pytest.approx(value, abs=1e-6, nan_ok=True)


# --------------------------------------------------------------------------- cluster KL
def test_cluster_kl_hand_case():
    pred = [0] * 6 + [1] * 3 + [3] * 1  # sizes 6, 3, 0, 1 over K=4
    target = [1] * 5 + [0] * 5  # classes 5, 5
    p = np.array([0.6, 0.3, 0.1, 0.0]) + 1e-8
    q = np.array([0.5, 0.5, 0.0, 0.0]) + 1e-8
    assert cluster_kl(pred, target, 4) == pytest.approx(entropy(p, q), rel=1e-9)


def test_cluster_kl_more_classes_than_clusters():
    pred = [0] * 9 + [1]
    target = [0, 0, 0, 0, 1, 1, 1, 2, 2, 3]
    p = np.array([0.9, 0.1, 0.0, 0.0]) + 1e-8
    q = np.array([0.4, 0.3, 0.2, 0.1]) + 1e-8
    assert cluster_kl(pred, target, 2) == pytest.approx(entropy(p, q), rel=1e-9)


def test_cluster_kl_profile_properties():
    target = np.repeat(np.arange(4), [40, 30, 20, 10])
    # same size profile, different labels -> ~0
    pred = np.repeat(np.array([2, 0, 3, 1]), [40, 30, 20, 10])
    assert cluster_kl(pred, target, 4) == pytest.approx(0.0, abs=1e-6)
    collapsed = np.zeros(100, dtype=int)
    balanced = np.repeat(np.arange(4), 25)
    assert cluster_kl(collapsed, target, 4) > cluster_kl(balanced, target, 4) > 0.01


# --------------------------------------------------------------------------- OOD AUROC
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("scale", [1.0, 100.0, -1000.0])
def test_ood_auroc_vs_sklearn(seed, scale):
    rng = np.random.default_rng(seed)
    is_ood = rng.random(80) < 0.3
    score = (rng.normal(size=80) + is_ood) * scale
    score[:10] = np.round(score[:10])  # some ties
    want = skm.roc_auc_score(is_ood, score)
    assert ood_auroc(torch.as_tensor(score, dtype=torch.float32), is_ood) == pytest.approx(
        skm.roc_auc_score(is_ood, score.astype(np.float32)), abs=1e-6
    )
    assert ood_auroc(score, torch.as_tensor(is_ood)) == pytest.approx(want, abs=1e-6)


def test_ood_auroc_large_scores_and_ties():
    # raw torchmetrics would squash these through a sigmoid into ties (-> 0.5)
    score = [50.0, 60.0, 70.0, 80.0]
    is_ood = [0, 1, 0, 1]
    assert ood_auroc(score, is_ood) == pytest.approx(skm.roc_auc_score(is_ood, score))
    assert ood_auroc([1, 2, 2, 3], [0, 0, 1, 1]) == pytest.approx(
        skm.roc_auc_score([0, 0, 1, 1], [1, 2, 2, 3])
    )
    assert math.isnan(ood_auroc([0.1, 0.2], [0, 0]))
    assert math.isnan(ood_auroc([0.1, 0.2], [1, 1]))


# --------------------------------------------------------------------------- confusion
def test_confusion_after_matching_perfect_is_diagonal():
    target = np.repeat(np.arange(4), [5, 4, 3, 2])
    perm = np.array([2, 0, 3, 1])
    conf, cols = confusion_after_matching(perm[target], target, 4, return_columns=True)
    np.testing.assert_array_equal(conf.numpy(), np.diag([5, 4, 3, 2]))
    np.testing.assert_array_equal(cols.numpy(), perm)


@pytest.mark.parametrize("k,c", [(6, 3), (3, 6), (4, 4)])
def test_confusion_after_matching_shapes_and_trace(k, c):
    pred, target = noisy_labels(7, k, c, n=90)
    conf, cols = confusion_after_matching(pred, target, c, k, return_columns=True)
    assert conf.shape == (c, max(k, c))
    assert int(conf.sum()) == 90
    assert int(conf.trace()) == round(matched_accuracy(pred, target) * 90)
    counts = naive_counts(pred.tolist(), target.tolist(), k, c)
    for j, cl in enumerate(cols.tolist()):
        want = counts[cl] if cl >= 0 else np.zeros(c)
        np.testing.assert_array_equal(conf[:, j].numpy(), want)
    assert sorted(x for x in cols.tolist() if x >= 0) == list(range(k))


# --------------------------------------------------------------------------- the Metric
def make_data(n=120, k=7, c=5, seed=0, ood_frac=0.2):
    rng = np.random.default_rng(seed)
    pred, target = noisy_labels(seed, k, c, n=n)
    is_ood = rng.random(n) < ood_frac
    target = np.where(is_ood, -1, target)
    score = rng.normal(size=n) + 1.5 * is_ood
    return (
        torch.as_tensor(pred),
        torch.as_tensor(target),
        torch.arange(n),
        torch.as_tensor(is_ood),
        torch.as_tensor(score, dtype=torch.float32),
    )


COUNTS = [200, 90, 40, 15, 5]


def full_metric(*batch, k=7, c=5, counts=COUNTS):
    m = ClusteringMetrics(k, c, train_class_counts=counts)
    m.update(*batch)
    return m.compute()


def assert_same_metrics(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], equal_nan=True, msg=key)


def test_metric_matches_functional():
    pred, target, index, is_ood, score = make_data()
    out = full_metric(pred, target, index, is_ood, score)
    assert set(out) == {
        "acc", "nmi", "nmi_geometric", "ari", "head_acc", "medium_acc", "tail_acc",
        "cluster_kl", "num_nonempty_clusters", "largest_cluster_frac", "ood_auroc",
    }  # fmt: skip
    assert all(v.dtype == torch.float32 and v.ndim == 0 for v in out.values())
    ind = ~is_ood
    p, t = pred[ind].numpy(), target[ind].numpy()
    assert float(out["acc"]) == pytest.approx(brute_best(p.tolist(), t.tolist())[0] / len(p))
    assert float(out["nmi"]) == pytest.approx(skm.normalized_mutual_info_score(t, p), abs=1e-5)
    assert float(out["nmi_geometric"]) == pytest.approx(
        skm.normalized_mutual_info_score(t, p, average_method="geometric"), abs=1e-5
    )
    assert float(out["ari"]) == pytest.approx(skm.adjusted_rand_score(t, p), abs=1e-5)
    assert float(out["cluster_kl"]) == pytest.approx(cluster_kl(p, t, 7, 5), rel=1e-5)
    sizes = np.bincount(p, minlength=7)
    assert float(out["num_nonempty_clusters"]) == (sizes > 0).sum()
    assert float(out["largest_cluster_frac"]) == pytest.approx(sizes.max() / len(p))
    assert float(out["ood_auroc"]) == pytest.approx(skm.roc_auc_score(is_ood, score), abs=1e-6)
    groups = group_accuracy(per_class_recall(p, t, 5, 7), COUNTS)
    for key, value in groups.items():
        assert float(out[key]) == pytest.approx(value, nan_ok=True)


def test_metric_optional_keys():
    pred, target, index, is_ood, score = make_data()
    m = ClusteringMetrics(7, 5)
    m.update(pred, target, index, is_ood)  # no score
    out = m.compute()
    assert "ood_auroc" not in out and "tail_acc" not in out and "acc" in out
    m = ClusteringMetrics(7, 5)
    m.update(pred[~is_ood], target[~is_ood], index[~is_ood], ood_score=score[~is_ood])
    assert "ood_auroc" not in m.compute()  # no OOD sample
    with pytest.raises(ValueError):
        ClusteringMetrics(7, 5, train_class_counts=[1, 2])


def test_metric_deduplicates_by_index():
    batch = make_data(seed=3)
    want = full_metric(*batch)
    n = len(batch[0])
    rng = np.random.default_rng(0)
    dup = torch.as_tensor(rng.choice(n, 25, replace=False))
    m = ClusteringMetrics(7, 5, train_class_counts=COUNTS)
    first_half = torch.arange(n // 2)
    m.update(*(t[first_half] for t in batch))
    m.update(*(t[dup] for t in batch))  # repeats, partly of already-seen samples
    m.update(*(t[n // 2 :] for t in batch))
    m.update(*(t[dup[:5]] for t in batch))
    assert_same_metrics(m.compute(), want)
    # duplicates really are stored and would change the result without de-duplication
    assert sum(len(x) for x in m.pred) == n + 30


def test_metric_keeps_first_occurrence():
    m = MatchedAccuracy(2, 2)
    m.update(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([0, 1]))
    m.update(torch.tensor([0, 0]), torch.tensor([0, 1]), torch.tensor([0, 1]))  # conflicting dups
    assert float(m.compute()) == 1.0


def test_metric_batches_equal_one_batch():
    batch = make_data(n=157, seed=5)
    want = full_metric(*batch)
    m = ClusteringMetrics(7, 5, train_class_counts=COUNTS)
    for sl in (slice(0, 13), slice(13, 14), slice(14, 100), slice(100, 157)):
        m.update(*(t[sl] for t in batch))
    assert_same_metrics(m.compute(), want)
    m.reset()
    m.update(*batch)
    assert_same_metrics(m.compute(), want)


def test_metric_no_in_distribution_samples():
    m = ClusteringMetrics(3, 2)
    m.update(torch.tensor([0, 1]), torch.tensor([-1, -1]), torch.tensor([0, 1]), torch.tensor([1, 1]))
    out = m.compute()
    assert math.isnan(out["acc"]) and math.isnan(out["cluster_kl"])
    assert float(out["num_nonempty_clusters"]) == 0


def test_metric_rejects_out_of_range_labels():
    m = ClusteringMetrics(3, 2)
    m.update(torch.tensor([0, 3]), torch.tensor([0, 1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        m.compute()
    m = ClusteringMetrics(3, 2)
    m.update(torch.tensor([0, 1]), torch.tensor([0, -1]), torch.tensor([0, 1]))  # -1 but not OOD
    with pytest.raises(ValueError):
        m.compute()


def test_single_value_metrics_match_parent():
    batch = make_data(seed=9)
    want = full_metric(*batch)
    for cls, key in ((MatchedAccuracy, "acc"), (ClusterKL, "cluster_kl"), (OODAUROC, "ood_auroc")):
        m = cls(7, 5)
        m.update(*batch)
        torch.testing.assert_close(m.compute(), want[key])
    m = TailAccuracy(7, 5, COUNTS)
    m.update(*batch)
    torch.testing.assert_close(m.compute(), want["tail_acc"], equal_nan=True)
    m = OODAUROC(7, 5)
    m.update(*batch[:4])  # no score -> nan
    assert math.isnan(m.compute())


def test_unassigned_samples_count_as_errors() -> None:
    """Cluster -1 (a method's OOD rejection): wrong for ACC and recall, its own group for NMI/ARI."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    rng = np.random.default_rng(5)
    target = torch.as_tensor(rng.integers(0, 4, 300))
    pred = target.clone()
    pred[rng.random(300) < 0.2] = -1
    m = ClusteringMetrics(num_clusters=4, num_classes=4, train_class_counts=[50, 60, 70, 80])
    m.update(pred, target, torch.arange(300))
    out = m.compute()
    frac = float((pred >= 0).float().mean())
    assert float(out["acc"]) == pytest.approx(frac, abs=1e-6)
    assert float(out["unassigned_frac"]) == pytest.approx(1 - frac, abs=1e-6)
    grouped = np.where(pred.numpy() < 0, 4, pred.numpy())
    assert float(out["nmi"]) == pytest.approx(normalized_mutual_info_score(target, grouped), abs=1e-5)
    assert float(out["ari"]) == pytest.approx(adjusted_rand_score(target, grouped), abs=1e-5)
    recall = [np.mean(pred.numpy()[target.numpy() == c] == c) for c in range(4)]
    assert float(out["tail_acc"]) == pytest.approx(recall[0], abs=1e-6)
    assert float(out["head_acc"]) == pytest.approx(recall[3], abs=1e-6)
