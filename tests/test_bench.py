"""The benchmark runner: records, resume, report (checked against numpy), bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sklearn
import torch

from clusterlight import bench


def _records() -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for method in ("dec", "jule"):
        for split in ("balanced", "lt10", "lt100"):
            for seed in (0, 1, 2):
                out.append({"method": method, "dataset": "usps", "split": split, "seed": seed, "budget": "fast",
                            "acc": float(rng.uniform()), "nmi": float(rng.uniform()), "ari": float(rng.uniform()),
                            "tail_acc": float(rng.uniform()), "train_s": float(rng.uniform(1, 9)),
                            "peak_rss_mb": 900.0, "device": "cpu"})
    return out


def test_report_mean_and_sample_std_match_numpy(tmp_path) -> None:
    records = _records()
    text = bench.markdown(records)
    for method in ("dec", "jule"):
        for split in ("balanced", "lt10", "lt100"):
            accs = np.array([r["acc"] for r in records if r["method"] == method and r["split"] == split])
            tails = np.array([r["tail_acc"] for r in records if r["method"] == method and r["split"] == split])
            row = next(line for line in text.splitlines() if line.startswith(f"| usps | {split} | {method} |"))
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert cells[3] == f"{accs.mean():.3f} ± {accs.std(ddof=1):.3f}"
            assert cells[7] == f"{tails.mean():.3f} ± {tails.std(ddof=1):.3f}"
            assert cells[-1] == "3"
    # rows in imbalance order within the dataset
    splits = [line.split("|")[2].strip() for line in text.splitlines() if line.startswith("| usps |")]
    assert splits == ["balanced"] * 2 + ["lt10"] * 2 + ["lt100"] * 2
    bench.imbalance_figure(records, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 1000


def test_unknown_config_is_refused_before_any_run(tmp_path, capsys) -> None:
    out = tmp_path / "r.jsonl"
    with pytest.raises(SystemExit, match="no config configs/jule/mnist.yaml"):
        bench.main(["run", "--budget", "paper", "--methods", "jule", "--datasets", "mnist", "--out", str(out)])
    with pytest.raises(SystemExit, match="fast budget has no schedule"):
        bench.main(["run", "--methods", "jule", "--datasets", "digits", "--out", str(out)])
    assert not out.exists()


def test_corrupt_results_file_is_a_clear_error(tmp_path) -> None:
    out = tmp_path / "r.jsonl"
    out.write_text('{"method": "dec"}\nnot json\n')
    with pytest.raises(SystemExit, match="r.jsonl:2 is not a JSON record"):
        bench.read_records(out)


def test_grid_appends_one_record_per_run_and_resumes(tmp_path, monkeypatch) -> None:
    # A tiny budget for the shipped digits config; the runs are real `fit` processes.
    monkeypatch.setitem(bench.FAST["ae_kmeans"], "digits",
                        ["--trainer.max_epochs=1", "--data.init_args.max_samples=300", "--data.init_args.batch_size=32",
                         "--model.init_args.kmeans_n_init=1"])
    out = tmp_path / "records.jsonl"
    argv = ["run", "--methods", "ae_kmeans", "--datasets", "digits", "--splits", "lt10_ood", "balanced",
            "--seeds", "0", "--out", str(out), "--runs", str(tmp_path / "runs")]
    # An interrupted grid: the first call ran only the lt10_ood cell.
    assert bench.main([*argv[:7], *argv[8:]]) == 0
    first = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["split"], r["seed"]) for r in first] == [("lt10_ood", 0)]
    # The whole grid then runs only the missing cell and keeps the first record as it was.
    assert bench.main(argv) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["split"], r["seed"]) for r in records] == [("lt10_ood", 0), ("balanced", 0)]
    assert records[0] == first[0]
    for r in records:
        assert 0 <= r["acc"] <= 1 and 0 <= r["nmi"] <= 1 and r["nmi_geometric"] is not None
        assert r["train_s"] > 0 and r["peak_rss_mb"] > 100 and r["version"] and len(r["config_hash"]) == 12
        # the releases the figures came from, as the imported modules report them
        assert r["packages"]["torch"] == torch.__version__.split("+")[0]
        assert r["packages"]["numpy"] == np.__version__ and r["packages"]["scikit-learn"] == sklearn.__version__
        assert r["device"].startswith("cpu")
        # the machine, from the training process: torch's kernel set and, where /proc/cpuinfo has one, its model name
        assert f"torch {torch.backends.cpu.get_cpu_capability()}," in r["cpu"]
        info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
        model = next((ln for ln in info.splitlines() if ln.startswith("model name")), None)
        if model is not None:
            assert r["cpu"].startswith(model.split(":", 1)[1].strip())
    ood, balanced = records
    assert balanced["ood_auroc"] is None and ood["ood_auroc"] is not None  # only the OOD split has it
    assert ood["n_train"] < balanced["n_train"]  # long tail + held-out class
    assert ood["config_hash"] != balanced["config_hash"]
    # the run folder loads back: the split the run trained on and the weights of its last checkpoint
    folder = tmp_path / "runs" / "fast" / "ae_kmeans-digits-lt10_ood-seed0"
    data, model = bench.load_run(folder)
    assert type(model).__name__ == "AEKMeans" and not model.training
    assert len(data.train_dataset) == ood["n_train"] and len(data.test_dataset) == ood["n_test"]
    saved = torch.load(next(folder.glob("runs/*/checkpoints/last.ckpt")), map_location="cpu", weights_only=False)
    assert saved["state_dict"].keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in saved["state_dict"].items())
    with pytest.raises(SystemExit, match="holds no runs/"):
        bench.load_run(tmp_path)


def test_readme_report_replaces_only_between_markers(tmp_path) -> None:
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    readme = tmp_path / "README.md"
    readme.write_text(f"# top\nkeep me\n{bench.README_BEGIN}\nold table\n{bench.README_END}\n## after\nkeep too\n")
    assert bench.main(["report", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# top\nkeep me\n") and text.endswith(f"{bench.README_END}\n## after\nkeep too\n")
    assert "old table" not in text and "| usps | lt100 | jule |" in text and "from 18 records" in text
    # no markers: a clear error, README untouched
    plain = tmp_path / "PLAIN.md"
    plain.write_text("# nothing here\n")
    with pytest.raises(SystemExit, match="needs exactly one pair"):
        bench.main(["report", str(results), "--readme", str(plain)])
    assert plain.read_text() == "# nothing here\n"
    with pytest.raises(SystemExit, match="does not exist"):
        bench.main(["report", str(tmp_path / "missing.jsonl")])


def test_report_links_the_figure_relative_to_the_page(tmp_path, monkeypatch) -> None:
    """A page in docs/ links ../results/fig.png; a Markdown file beside the figure links fig.png."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    (tmp_path / "docs").mkdir()
    Path("results/r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()))
    Path("docs/page.md").write_text(f"{bench.README_BEGIN}\n{bench.README_END}\n")
    argv = ["report", "results/r.jsonl", "--figure", "results/fig.png"]
    assert bench.main([*argv, "--readme", "docs/page.md", "--markdown", "results/table.md"]) == 0
    assert "](../results/fig.png)" in Path("docs/page.md").read_text()
    assert "--figure results/fig.png --readme docs/page.md`" in Path("docs/page.md").read_text()
    assert Path("results/table.md").read_text().rstrip().endswith("](fig.png)")


def test_report_flags_fast_far_below_paper() -> None:
    records = _records()
    paper = [dict(r, budget="paper", acc=r["acc"] + 0.2) for r in records if r["method"] == "dec"]
    paper += [dict(r, budget="paper", acc=r["acc"] + 0.01) for r in records if r["method"] == "jule"]
    text = bench.markdown(records + paper)
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:3]): line for line in text.splitlines()
            if line.startswith("| usps |") and "+0." in line}
    assert len(rows) == 6
    assert all("far below" in rows[("usps", s, "dec")] for s in ("balanced", "lt10", "lt100"))
    assert not any("far below" in rows[("usps", s, "jule")] for s in ("balanced", "lt10", "lt100"))
    # cells of other class orders at one budget are not compared: no row for DEC's paper runs on split seed 1
    other = [dict(r, data_seed=1) for r in paper if r["method"] == "dec"]
    text = bench.markdown(records + other)
    assert not any(line.startswith("| usps |") and "| dec | " in line and "+0." in line for line in text.splitlines())


def test_override_and_variant_reach_the_run_and_the_report(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(bench.FAST["ae_kmeans"], "digits",
                        ["--trainer.max_epochs=1", "--data.init_args.max_samples=300", "--data.init_args.batch_size=32",
                         "--model.init_args.kmeans_n_init=1"])
    # ``--out`` and ``--runs`` relative to the caller's directory, not the repository's: the child fit
    # runs in the repository, and its result is still found (it used to be written under the
    # repository and the run counted as failed)
    monkeypatch.chdir(tmp_path)
    out, runs = tmp_path / "records.jsonl", tmp_path / "my_runs"
    argv = ["run", "--methods", "ae_kmeans", "--datasets", "digits", "--splits", "balanced", "--seeds", "0",
            "--out", "records.jsonl", "--runs", "my_runs", "--override", "model.init_args.latent_dim=3", "--variant", "z3"]
    assert bench.main(argv) == 0
    assert (runs / "fast" / "ae_kmeans-z3-digits-balanced-seed0" / "result.json").is_file()
    (variant,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert variant["variant"] == "z3" and variant["method"] == "ae_kmeans"
    assert "--model.init_args.latent_dim=3" in variant["args"]
    plain_args = [a for a in variant["args"] if a != "--model.init_args.latent_dim=3"]
    assert variant["config_hash"] != bench.config_hash(["fit", *plain_args])
    # the run's own saved config has the overridden value, and the budget's options still apply
    (saved_path,) = (runs / "fast" / "ae_kmeans-z3-digits-balanced-seed0").rglob("config.yaml")
    saved = saved_path.read_text()
    assert "latent_dim: 3" in saved and "max_epochs: 1" in saved
    assert bench.main(argv) == 0  # resumes: the variant's run is recorded, nothing reruns
    assert len(out.read_text().splitlines()) == 1
    # a plain record of the same cell is not the variant's: resume would run it, the report shows both
    plain = {k: v for k, v in variant.items() if k != "variant"}
    assert bench.key(plain) != bench.key(variant)
    text = bench.markdown([plain, variant])
    assert "| digits | balanced | ae_kmeans |" in text and "| digits | balanced | ae_kmeans[z3] |" in text


def test_bad_override_is_one_line_before_any_run(tmp_path) -> None:
    out = tmp_path / "r.jsonl"
    argv = ["run", "--budget", "paper", "--methods", "ae_kmeans", "--datasets", "digits", "--seeds", "0", "--out", str(out),
            "--runs", str(tmp_path / "runs")]
    with pytest.raises(SystemExit, match="name the variant with --variant"):
        bench.main([*argv, "--override", "model.init_args.latent_dim=3"])
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        bench.main([*argv, "--override", "latent_dim", "--variant", "v"])
    with pytest.raises(SystemExit, match="Option 'nosuch' is not accepted"):
        bench.main([*argv, "--override", "model.init_args.nosuch=1", "--variant", "v"])
    assert not out.exists()


def _processes_naming(text: str) -> list[int]:
    """PIDs of the live processes whose command line contains ``text`` (Linux ``/proc``)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmdline, stat = (d / "cmdline").read_bytes(), (d / "stat").read_text()
            except OSError:
                continue
            if text.encode() in cmdline and stat.rsplit(")", 1)[1].split()[0] != "Z":  # zombies are dead
                pids.append(int(d.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/cmdline").is_file(), reason="finds the run in flight through /proc")
def test_sigterm_stops_the_run_in_flight(tmp_path) -> None:
    """``kill``/``pkill`` of the bench used to end the bench process alone: its ``fit`` ran on, orphaned,
    next to the next grid's runs. Now SIGTERM stops the run in flight too, and it leaves no record."""
    out, runs = tmp_path / "records.jsonl", tmp_path / "runs"
    result = runs / "paper" / "ae_kmeans-endless-digits-balanced-seed0" / "result.json"  # in the fit's command line
    argv = [sys.executable, "-m", "clusterlight.bench", "run", "--budget", "paper", "--methods", "ae_kmeans",
            "--datasets", "digits", "--splits", "balanced", "--seeds", "0", "--out", str(out), "--runs", str(runs),
            "--override", "trainer.max_epochs=1000000", "--variant", "endless"]
    grid = subprocess.Popen(argv, cwd=bench.REPO, env={**os.environ, "WANDB_MODE": "disabled"})
    try:
        deadline = time.time() + 180
        while not _processes_naming(str(result)) and grid.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert _processes_naming(str(result)), "the run never started"
        grid.send_signal(signal.SIGTERM)
        assert grid.wait(timeout=60) == 128 + signal.SIGTERM
        assert _processes_naming(str(result)) == []  # the fit went with it
        assert not out.exists() or out.read_text() == ""
    finally:
        grid.kill()
        for pid in _processes_naming(str(result)):  # a failed check must not leave an endless fit behind
            os.kill(pid, signal.SIGKILL)


def test_cpu_name_parses_the_first_processor():
    """x86 (model name, family, model) and ARM (implementer, part) blocks of /proc/cpuinfo, written by hand."""
    import torch

    x86 = ("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 167\n"
           "model name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu sse\n\n"
           "processor\t: 1\ncpu family\t: 7\nmodel\t\t: 1\nmodel name\t: Other\n")
    arm = ("processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
           "CPU part\t: 0xd0c\n\nprocessor\t: 1\nCPU implementer\t: 0x42\nCPU part\t: 0xd40\n")
    tail = f", torch {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"
    assert bench.cpu_name(x86) == "Intel(R) Xeon(R) Processor (family 6 model 167)" + tail
    assert bench.cpu_name(arm).endswith(" (implementer 0x41 part 0xd0c)" + tail)
    assert not bench.cpu_name(arm).startswith("unknown") and not bench.cpu_name("").startswith(("unknown", " "))


@pytest.mark.parametrize("wins,losses", [(0, 0), (5, 0), (0, 7), (3, 7), (6, 4), (10, 10), (1, 12)])
def test_sign_test_matches_scipy_binomtest(wins: int, losses: int) -> None:
    from scipy.stats import binomtest

    expected = 1.0 if wins + losses == 0 else binomtest(wins, wins + losses, 0.5).pvalue
    assert bench.sign_test_p(wins, losses) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_paired_interval_matches_scipy_ttest_rel() -> None:
    from scipy.stats import ttest_rel

    rng = np.random.default_rng(4)
    for n in (2, 5, 10):
        a, b = rng.uniform(size=n), rng.uniform(size=n)
        ref = ttest_rel(a, b).confidence_interval(0.95)
        lo, hi = bench.paired_t_interval(list(a - b))
        assert (lo, hi) == pytest.approx((ref.low, ref.high), rel=1e-10)
    assert bench.paired_t_interval([0.1]) is None


def _compare_records() -> list[dict]:
    """Two methods on two splits, seeds 0 to 5 on machine X (``debiased[v1]`` and unlabelled ``dec``);
    ``dec`` also has seeds 10 to 12 on machine Y, and ``debiased[other]`` the same seeds on no named machine."""
    rng = np.random.default_rng(7)
    out = []
    for split in ("lt10", "lt100"):
        for seed in range(6):
            for method, variant, cpu in (("debiased", "v1", "X"), ("dec", "", "X")):
                out.append({"method": method, "variant": variant, "dataset": "usps", "split": split, "seed": seed,
                            "budget": "fast", "cpu": cpu, "acc": float(rng.uniform()), "tail_acc": float(rng.uniform()),
                            "ood_auroc": None})
        for seed in range(3):
            out.append({"method": "dec", "dataset": "usps", "split": split, "seed": seed + 10, "budget": "fast",
                        "cpu": "Y", "acc": 0.5, "tail_acc": 0.5})
            out.append({"method": "debiased", "variant": "other", "dataset": "usps", "split": split, "seed": seed + 10,
                        "budget": "fast", "acc": 0.9, "tail_acc": 0.9})  # no machine named: pairs with no one by default
    return out


def _rows(text: str) -> dict[tuple, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| fast |"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[(cells[2], cells[3])] = cells
    return rows


def test_compare_pairs_seeds_on_one_machine_and_matches_numpy(tmp_path) -> None:
    from scipy.stats import binomtest, ttest_rel

    records = _compare_records()
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "c.md"
    assert bench.main(["compare", str(path), "--a", "debiased:v1", "--b", "dec", "--metrics", "acc", "tail_acc",
                       "ood_auroc", "--markdown", str(out)]) == 0
    rows = _rows(out.read_text())
    assert set(rows) == {(s, m) for s in ("lt10", "lt100") for m in ("acc", "tail_acc")}  # no AUROC in either
    for split in ("lt10", "lt100"):
        for metric in ("acc", "tail_acc"):
            a = np.array([r[metric] for r in records if r["method"] == "debiased" and r.get("variant") == "v1" and r["split"] == split])
            b = np.array([r[metric] for r in records if r["method"] == "dec" and r["cpu"] == "X" and r["split"] == split])
            cells = rows[(split, metric)]
            ci = ttest_rel(a, b).confidence_interval(0.95)
            wins = int((a > b).sum())
            assert cells[4] == "6" and cells[5] == f"{a.mean():.3f}" and cells[6] == f"{b.mean():.3f}"
            assert cells[7] == f"{a.mean() - b.mean():+.3f}" and cells[8] == f"[{ci.low:+.3f}, {ci.high:+.3f}]"
            assert cells[9] == f"{wins} of 6" and cells[10] == f"{binomtest(wins, 6, 0.5).pvalue:.3f}"
    # across machines: seeds 10 to 12 of the unnamed machine pair with machine Y's
    text = bench.compare_markdown(bench.pair_records(records, ("debiased", {"other"}), ("dec", {""}), any_machine=True),
                                  "a", "b", ["acc"], True)
    assert _rows(text)[("lt10", "acc")][4:10] == ["3", "0.900", "0.500", "+0.400", "[+0.400, +0.400]", "3 of 3"]
    assert not bench.pair_records(records, ("debiased", {"other"}), ("dec", {""}))


def test_compare_refuses_bad_input_in_one_line(tmp_path) -> None:
    records = _compare_records()
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(SystemExit, match="METHOD one of"):
        bench.main(["compare", str(path), "--a", "flagship", "--b", "dec"])
    with pytest.raises(SystemExit, match="no seed has records of both"):
        bench.main(["compare", str(path), "--a", "debiased:nothing", "--b", "dec"])
    with pytest.raises(SystemExit, match="two records of debiased.v1. .*usps lt10 fast seed 0 on X"):  # one run recorded twice
        bench.pair_records(records + [dict(records[0])], ("debiased", {"v1"}), ("dec", {""}))
    with pytest.raises(SystemExit, match="--metrics takes names of"):
        bench.main(["compare", str(path), "--a", "debiased:v1", "--b", "dec", "--metrics", "accuracy"])
    other = tmp_path / "scaling.jsonl"
    other.write_text('{"n": 100, "seconds": 1.0}\n')
    with pytest.raises(SystemExit, match="record 1 is not a bench record"):
        bench.main(["compare", str(path), str(other), "--a", "debiased:v1", "--b", "dec"])


def test_data_seeds_draw_other_class_orders_and_key_the_records(tmp_path, monkeypatch) -> None:
    """``--data-seeds`` reaches the runs' data module (another class order of the long tail) and the
    records (resume keys on it); the old way, a ``data.init_args.seed`` override, is refused in one line."""
    monkeypatch.setitem(bench.FAST["ae_kmeans"], "digits",
                        ["--trainer.max_epochs=1", "--data.init_args.max_samples=300", "--data.init_args.batch_size=32",
                         "--model.init_args.kmeans_n_init=1"])
    out, runs = tmp_path / "records.jsonl", tmp_path / "runs"
    argv = ["run", "--methods", "ae_kmeans", "--datasets", "digits", "--splits", "lt10", "--seeds", "0",
            "--data-seeds", "0", "3", "--out", str(out), "--runs", str(runs)]
    assert bench.main(argv) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["seed"], r["data_seed"]) for r in records] == [(0, 0), (0, 3)]
    assert "--data.init_args.seed=3" in records[1]["args"] and not any("init_args.seed" in a for a in records[0]["args"])
    counts = {}
    for ds, folder in ((0, "ae_kmeans-digits-lt10-seed0"), (3, "ae_kmeans-digits-lt10-seed0-dseed3")):
        data, _ = bench.load_run(runs / "fast" / folder)
        assert data.seed == ds
        counts[ds] = [int(c) for c in data.train_class_counts]
    # the same long-tail profile over another class order: the counts are a permutation of each other
    assert sorted(counts[0]) == sorted(counts[3]) and counts[0] != counts[3]
    assert bench.main(argv) == 0  # resumes: both runs are recorded
    assert len(out.read_text().splitlines()) == 2
    text = bench.markdown(records)
    assert "| digits | lt10 | ae_kmeans |" in text and text.count("| 2 (data seeds 0, 3) |") == 1
    with pytest.raises(SystemExit, match="set the split seed with --data-seeds 5, not --override"):
        bench.main([*argv, "--override", "data.init_args.seed=5", "--variant", "v"])
    with pytest.raises(SystemExit, match="--data-seeds takes integers >= 0"):
        bench.main([*argv, "--data-seeds", "-1"])


def test_data_seed_of_records_from_before_the_field() -> None:
    base = {"method": "dec", "dataset": "usps", "split": "lt10", "seed": 0, "budget": "fast"}
    assert bench.data_seed(base) == 0
    assert bench.data_seed({**base, "args": ["--config", "c.yaml", "--data.init_args.seed=4", "--seed_everything=0"]}) == 4
    assert bench.data_seed({**base, "data_seed": 2, "args": ["--data.init_args.seed=4"]}) == 2
    assert bench.key(base) != bench.key({**base, "data_seed": 1}) and bench.key(base) == bench.key({**base, "data_seed": 0})


def test_compare_pairs_within_a_data_seed(tmp_path) -> None:
    from scipy.stats import ttest_rel

    rng = np.random.default_rng(3)
    records = [{"method": m, "dataset": "usps", "split": "lt10", "seed": 0, "data_seed": ds, "budget": "fast", "cpu": "X",
                "acc": float(rng.uniform())} for ds in range(4) for m in ("debiased", "dec")]
    records.append({**records[0], "seed": 1})  # a training seed dec lacks: unpaired
    pairs = bench.pair_records(records, ("debiased", {""}), ("dec", {""}))
    got = [(a["data_seed"], b["data_seed"]) for a, b in pairs[("fast", "usps", "lt10")]]
    assert got == [(ds, ds) for ds in range(4)]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    md = tmp_path / "c.md"
    assert bench.main(["compare", str(path), "--a", "debiased", "--b", "dec", "--metrics", "acc", "--data-seeds", "1", "2", "3",
                       "--markdown", str(md)]) == 0
    cells = _rows(md.read_text())[("lt10", "acc")]
    a = np.array([r["acc"] for r in records[2:8:2]])
    b = np.array([r["acc"] for r in records[3:8:2]])
    ci = ttest_rel(a, b).confidence_interval(0.95)
    assert cells[4] == "3" and cells[8] == f"[{ci.low:+.3f}, {ci.high:+.3f}]"
    # --seeds filters the training seed: seed 1 has debiased's extra record but no dec record to pair with
    with pytest.raises(SystemExit, match="no seed has records of both"):
        bench.main(["compare", str(path), "--a", "debiased", "--b", "dec", "--seeds", "1"])
    assert bench.main(["compare", str(path), "--a", "debiased", "--b", "dec", "--seeds", "0", "--markdown", str(md)]) == 0
    assert _rows(md.read_text())[("lt10", "acc")][4] == "4"
    with pytest.raises(SystemExit, match="seed 0 data seed 2 on X: name fewer variants"):
        bench.pair_records(records + [dict(records[4])], ("debiased", {""}), ("dec", {""}))


def test_a_record_made_with_the_old_override_counts_as_done(tmp_path, capsys) -> None:
    """A record from before ``data_seed`` (its split seed only in ``args``) is found by a ``--data-seeds`` grid."""
    out = tmp_path / "r.jsonl"
    old = {"method": "ae_kmeans", "variant": "v", "dataset": "digits", "split": "lt10", "seed": 0, "budget": "paper",
           "acc": 0.5, "args": ["--config", "configs/ae_kmeans/digits.yaml", "--data.init_args.seed=3", "--seed_everything=0"]}
    out.write_text(json.dumps(old) + "\n")
    argv = ["run", "--budget", "paper", "--methods", "ae_kmeans", "--datasets", "digits", "--splits", "lt10", "--seeds", "0", "0",
            "--data-seeds", "3", "3", "--variant", "v", "--out", str(out), "--runs", str(tmp_path / "runs")]
    assert bench.main(argv) == 0  # repeated seeds are one run each: nothing to run
    assert "1 runs in the grid, 1 already in" in capsys.readouterr().out
    assert out.read_text() == json.dumps(old) + "\n"
    assert bench.data_seed({**old, "args": ["--data.seed=5"]}) == 5  # jsonargparse's shorthand
    with pytest.raises(SystemExit, match="set the split seed with --data-seeds 4, not --override data.seed=4"):
        bench.main([*argv, "--override", "data.seed=4"])
    # the split seed is not part of the config hash, as the training seed is not
    args = bench.run_args("ae_kmeans", "digits", "lt10", 0, "paper", tmp_path, [])
    assert bench.config_hash(args) == bench.config_hash([*args, "--data.init_args.seed=3", "--seed_everything=5"])
    assert bench.config_hash(args) != bench.config_hash([*args, "--data.init_args.imbalance_ratio=100"])
