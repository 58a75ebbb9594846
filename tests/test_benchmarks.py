"""Each benchmark script runs end to end on a tiny setting (the figures themselves are
measured by hand and recorded in BENCHMARKS.md, not asserted here)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO

FASHION = Path("/usr/share/datasets/fashion-mnist")


def bench(*args: str, timeout: float = 600) -> str:
    result = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_throughput_prints_each_ratio_against_its_baseline() -> None:
    out = bench(
        "benchmarks/throughput.py",
        "--train-images", "64",
        "--pool-images", "256",
        "--batch", "32",
        "--label-batch", "128",
        "--repeats", "1",
    )  # fmt: skip
    for name in ("training", "pseudo-labeling", "RandAugment(2,9)"):
        [line] = [line for line in out.splitlines() if line.startswith(name)]
        assert float(re.search(r"([\d.]+)x", line).group(1)) > 0


def test_throughput_reports_the_labelers_fixed_cost_with_a_linear_model() -> None:
    out = bench(
        "benchmarks/throughput.py",
        "--skip", "train,augment",
        "--linear-labeler",
        "--pool-images", "512",
        "--label-batch", "128",
        "--repeats", "1",
    )  # fmt: skip
    assert re.search(r"cost over the bare loop: -?[\d.]+ us per image", out)
    assert not any(line.startswith("training") for line in out.splitlines())


def test_label_phases_prints_every_phase_against_the_bare_loop() -> None:
    out = bench(
        "benchmarks/label_phases.py",
        "--pool-images", "512",
        "--label-batch", "128",
        "--repeats", "1",
    )  # fmt: skip
    phases = ["bare", "bare, one copy", "stream", "stream + per-batch copies", "stream + chunks"]
    for name in [*phases, "pseudo_label", "pseudo_label + write"]:
        [line] = [line for line in out.splitlines() if re.match(rf"{re.escape(name)}\s+\d", line)]
        assert float(re.search(r"([\d.]+)x$", line).group(1)) > 0


def test_pool_scale_reports_memory_and_time_per_size() -> None:
    out = bench(
        "benchmarks/pool_scale.py", "--sizes", "500", "1500", "--batch", "256", "--repeats", "2"
    )  # fmt: skip
    assert "median of 2 fresh processes per size" in out
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s", line)]
    assert [int(r[0]) for r in rows] == [500, 1500]


@pytest.mark.skipif(not FASHION.exists(), reason="needs the dataset-fashion-mnist package")
def test_fashion_mnist_benchmark_tabulates_the_loop(tmp_path: Path) -> None:
    loop = (
        "benchmarks/fashion_mnist.py",
        "--data-root", str(tmp_path),
        "--limit", "1",
        "--set", "teacher.epochs=1",
        "--set", "train.epochs=1",
        "--set", "pseudo_label.balance=20",
        "--set", "data.labeled_per_class=5",
        "--set", "data.val_per_class=5",
        "--set", "device=cpu",
        "--work", str(tmp_path / "work"),
    )  # fmt: skip
    out = bench(*loop, "--out", str(tmp_path / "rows.csv"))
    assert "supervised, 50 labels (the teacher)" in out
    assert "recipe: final model" in out
    rows = (tmp_path / "rows.csv").read_text()
    assert rows.count("\n") == 3  # header, teacher, student
    assert "test_Shirt" in rows.splitlines()[0]

    # Resumed, the loop keeps both models (it trains nothing) and tabulates them alike.
    out = bench(*loop, "--resume", "--out", str(tmp_path / "resumed.csv"))
    assert "kept model 0" in out and "kept model 1" in out
    resumed = pd.read_csv(tmp_path / "resumed.csv")
    assert resumed["test_acc"].tolist() == pd.read_csv(tmp_path / "rows.csv")["test_acc"].tolist()


def test_orchestration_times_prefect_against_the_library() -> None:
    """A real Prefect server and worker on loopback, a fresh data root, one tiny loop each."""
    out = bench(
        "benchmarks/orchestration.py",
        "--limit", "1",
        "--repeats", "1",
        "--set", "teacher.epochs=1",
        "--set", "train.epochs=1",
        "--set", "device=cpu",
    )  # fmt: skip
    match = re.search(r"library ([\d.]+) s, prefect deployment run ([\d.]+) s", out)
    assert match and all(float(seconds) > 0 for seconds in match.groups()), out


def test_default_seeds_prints_each_seed_and_the_gains_mean_and_spread() -> None:
    out = bench(
        "benchmarks/default_seeds.py",
        "--set", "train.epochs=1",
        "--seeds", "3",
        "--limit", "1",
        "--jobs", "1",
    )  # fmt: skip
    assert re.search(r"^seed 3: teacher test [\d.]+ .* gain [+-][\d.]+", out, re.M)
    assert re.search(r"^gain +[+-][\d.]+ ± [\d.]+$", out, re.M)


@pytest.mark.parametrize("method", ["supervised", "fixmatch"])
def test_ddp_overhead_compares_a_group_of_one_with_the_plain_loop(method: str) -> None:
    out = bench(
        "benchmarks/ddp_overhead.py",
        *("--method", method, "--images", "64", "--batch-size", "32", "--repeats", "1"),
    )
    ratio = re.search(r"ratio ([\d.]+)x", out.splitlines()[-1])
    assert ratio is not None and float(ratio.group(1)) > 0


def test_precision_compares_bf16_with_fp32_training_and_labeling() -> None:
    out = bench(
        "benchmarks/precision.py", *("--images", "64", "--batch-size", "32", "--repeats", "1")
    ).splitlines()
    for step, line in zip(("training", "labeling"), out[-3:-1], strict=True):
        ratio = re.search(rf"{step}: .*ratio ([\d.]+)x", line)
        assert ratio is not None and float(ratio.group(1)) > 0
    alike = re.search(r"labels alike in both precisions: ([\d.]+)", out[-1])
    assert alike is not None and 0 <= float(alike.group(1)) <= 1
