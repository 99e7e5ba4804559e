"""The notebooks in notebooks/: stored without outputs, and they run from top to bottom."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
NAMES = ["quickstart.ipynb", "imbalance_study.ipynb"]
#: The notebook's default records: the committed grid and the flagship's runs with today's defaults.
REAL_RECORDS = [REPO / "results" / "bench_fast.jsonl", REPO / "results" / "bench_fast_flagship.jsonl"]


def synthetic_records(path: Path) -> Path:
    """A small records file in the benchmark runner's format: 3 methods x balanced/lt10/lt100 x 2 seeds."""
    rng = np.random.default_rng(0)
    lines = []
    for method, base in (("ae_kmeans", 0.55), ("dec", 0.58), ("debiased", 0.60)):
        for split, drop in (("balanced", 0.0), ("lt10", 0.06), ("lt100", 0.15)):
            for seed in (0, 1):
                acc = base - drop + rng.normal(0, 0.01)
                lines.append(json.dumps({
                    "method": method, "dataset": "usps", "split": split, "seed": seed, "budget": "fast",
                    "acc": acc, "nmi": acc + 0.03, "nmi_geometric": acc + 0.03, "ari": acc - 0.15,
                    "tail_acc": acc - 2 * drop, "cluster_kl": drop, "ood_auroc": None, "train_s": 60.0,
                    "wall_s": 70.0, "peak_rss_mb": 900, "device": "synthetic",
                }))
    path.write_text("\n".join(lines) + "\n")
    return path


def execute(name: str) -> nbformat.NotebookNode:
    """Runs a notebook in a fresh python3 kernel with the notebooks folder as working directory."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


def outputs(nb: nbformat.NotebookNode) -> list[dict]:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]


@pytest.fixture
def kernel_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The kernel inherits os.environ: tiny budget, one thread, W&B offline."""
    monkeypatch.setenv("CLUSTERLIGHT_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    return monkeypatch


@pytest.mark.parametrize("name", NAMES)
def test_notebooks_are_stored_without_outputs(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"{name}: a code cell has outputs, clear them"


def test_quickstart_runs_and_shows_its_figures(kernel_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    kernel_env.setenv("CLUSTERLIGHT_NOTEBOOK_RUNS", str(tmp_path))
    nb = execute("quickstart.ipynb")
    assert not [out for out in outputs(nb) if out.output_type == "error"]
    figures = {p.name for p in tmp_path.rglob("figures/test_*.png")}
    assert figures >= {"test_confusion.png", "test_cluster_sizes.png", "test_embedding_map.png", "test_samples.png"}
    pngs = [out for out in outputs(nb) if "image/png" in out.get("data", {})]
    assert len(pngs) >= len(figures) + 1  # every test figure, and the predictions' images
    assert list(tmp_path.rglob("checkpoints/*.ckpt"))


def test_imbalance_study_runs(kernel_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if not all(path.is_file() for path in REAL_RECORDS):
        kernel_env.setenv("CLUSTERLIGHT_BENCH_RECORDS", str(synthetic_records(tmp_path / "bench.jsonl")))
        paths = [tmp_path / "bench.jsonl"]
    else:
        kernel_env.delenv("CLUSTERLIGHT_BENCH_RECORDS", raising=False)  # the notebook's default files
        paths = REAL_RECORDS
    nb = execute("imbalance_study.ipynb")
    markdown = [out["data"]["text/markdown"] for out in outputs(nb) if "text/markdown" in out.get("data", {})]
    assert any(text.startswith("### Budget `") for text in markdown)  # the results table
    assert any("image/png" in out.get("data", {}) for out in outputs(nb))

    # the rankings: one table per (budget, dataset) with lt10 runs, methods by mean tail ACC, best first
    tail: dict[tuple[str, str], dict[str, list[float]]] = {}
    for line in (line for path in paths for line in path.read_text().splitlines()):
        r = json.loads(line)
        name = f"{r['method']}[{r['variant']}]" if r.get("variant") else r["method"]  # as the report names it
        if r["split"] == "lt10" and r.get("tail_acc") is not None:
            tail.setdefault((r["budget"], r["dataset"]), {}).setdefault(name, []).append(r["tail_acc"])
    rankings = [text for text in markdown if "| rank | method | tail ACC |" in text]
    assert len(rankings) == len(tail)
    for (budget, dataset), table in zip(sorted(tail), rankings):
        assert table.startswith(f"**{dataset}**, budget `{budget}`")
        expected = sorted(tail[(budget, dataset)], key=lambda m: -np.mean(tail[(budget, dataset)][m]))
        shown = [row.split("|")[2].strip() for row in table.splitlines() if row.startswith("| ") and row[2].isdigit()]
        assert shown == expected


def test_imbalance_study_says_how_to_make_missing_records(kernel_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    kernel_env.setenv("CLUSTERLIGHT_BENCH_RECORDS", str(tmp_path / "missing.jsonl"))
    with pytest.raises(CellExecutionError, match="clusterlight bench run --budget fast"):
        execute("imbalance_study.ipynb")
