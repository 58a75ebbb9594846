"""The `noisy-student` command on a user's own ImageFolder tree, corrupt file included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from noisy_student import pipeline
from noisy_student.config import load_config
from noisy_student.io import read_json, write_json
from noisy_student.runs import LOCK, RunLayout
from tests.test_preflight import params, refused


def make_tree(root: Path) -> None:
    rng = np.random.default_rng(0)
    counts = {"labeled": 8, "val": 2, "test": 2}
    for split, n in counts.items():
        for cls in ("cat", "dog"):
            for i in range(n):
                path = root / split / cls / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path)
    for i in range(10):
        path = root / "unlabeled" / f"batch{i % 2}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    (root / "unlabeled" / "broken.jpg").write_bytes(b"not an image")


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "noisy_student.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
    )


def write_params(where: Path, **overrides: object) -> None:
    cfg = load_config(
        None,
        {
            "data.source": "imagefolder",
            "data.directory": str(where / "photos"),
            "data.image_size": 16,
            "data.labeled_per_class": 5,
            **{f"data.{key}": value for key, value in overrides.items()},
        },
    )
    (where / "params.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))


def test_imagefolder_fetch_and_prepare_skip_and_report_corrupt_files(tmp_path: Path) -> None:
    make_tree(tmp_path / "photos")
    write_params(tmp_path)
    fetched = cli("data", "fetch", cwd=tmp_path)
    assert fetched.returncode == 0, fetched.stderr
    listed = tmp_path / "data" / "imagefolder" / "skipped.json"
    assert f"1 unreadable files skipped; listed in {listed.relative_to(tmp_path)}" in fetched.stdout
    prepared = cli("prepare", cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    stats = read_json(tmp_path / "artifacts" / "splits" / "metrics.json")
    assert stats["classes"] == ["cat", "dog"]
    assert stats["skipped_files"] == 1
    # Every labeled image is used, whatever labeled_per_class says: no cap was asked for.
    assert (stats["labeled"], stats["val"], stats["test"]) == (16, 4, 4)
    assert stats["unlabeled"] == 10 and stats["labeled_moved_to_pool"] == 0
    skipped = read_json(tmp_path / "data" / "imagefolder" / "skipped.json")
    assert "broken.jpg" in str(skipped)

    # A cap, asked for, keeps 5 of each class's 8 and says how many went to the pool.
    write_params(tmp_path, cap_labeled=True)
    prepared = cli("prepare", cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    stats = read_json(tmp_path / "artifacts" / "splits" / "metrics.json")
    assert (stats["labeled"], stats["unlabeled"], stats["labeled_moved_to_pool"]) == (10, 16, 6)
    assert "cat 3, dog 3" in prepared.stderr

    # A cap larger than a class is refused, naming the class, in one line.
    write_params(tmp_path, cap_labeled=True, labeled_per_class=9)
    prepared = cli("prepare", cwd=tmp_path)
    assert prepared.returncode == 2
    assert "class 'cat' has 8 images" in prepared.stderr, prepared.stderr
    assert "Traceback" not in prepared.stderr


def test_fetch_of_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    cfg = load_config(
        None, {"data.source": "imagefolder", "data.directory": str(tmp_path / "nowhere")}
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    result = cli("data", "fetch", cwd=tmp_path)
    assert result.returncode == 2
    assert "nowhere" in result.stderr and "Traceback" not in result.stderr


def test_fixmatch_teacher_trains_on_an_imagefolder_pool_through_the_cli(tmp_path: Path) -> None:
    """The consistency teacher on a user's tree: uneven classes, grey and colour images of
    several sizes, a pool in nested folders beside a corrupt file, then a student."""
    make_tree(tmp_path / "photos")
    rng = np.random.default_rng(1)
    for i in range(3):  # dog: 11 labeled images to cat's 8, three of them grey
        grey = rng.integers(0, 256, (30 + i, 18), dtype=np.uint8)
        Image.fromarray(grey, mode="L").save(tmp_path / "photos" / "labeled" / "dog" / f"g{i}.png")
    write_params(tmp_path)  # the tree's own splits, every labeled image
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["teacher"].update(
        method="fixmatch",
        augment="weak",
        epochs=3,
        unlabeled_ratio=2.0,
        threshold=0.0,
        ema_decay=0.9,
    )
    params["train"].update(epochs=1, batch_size=4)
    params["pseudo_label"].update(threshold=0.0)
    params["iterations"] = {"1": {**params["iterations"]["1"], "teacher": 0}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for step in (("data", "fetch"), ("run", "--no-mlflow")):
        done = cli(*step, cwd=tmp_path)
        assert done.returncode == 0, done.stderr

    models = tmp_path / "artifacts" / "models"
    history = pd.read_csv(models / "iter_0" / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3]
    # Threshold 0: every pool image of every step is a target.
    assert (history["unlabeled_mask_rate"] == 1.0).all()
    assert read_json(models / "iter_0" / "metrics.json")["num_labeled"] == 19
    student = read_json(models / "iter_1" / "metrics.json")
    assert student["teacher_iteration"] == 0 and student["num_pseudo_labeled"] == 10


@pytest.fixture
def prepared(tmp_path: Path, digits_root: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A params file and a run directory holding the splits only (prepare ran, no model),
    with MLflow off: the arguments every command of a test takes."""
    monkeypatch.setenv("NOISY_STUDENT_MLFLOW", "off")
    path = params(tmp_path, digits_root)
    args = ["--params", str(path), "--run-dir", str(tmp_path / "run")]
    pipeline.prepare(load_config(path), RunLayout(tmp_path / "run"))
    return args


def test_misuse_of_the_command_line_is_one_line(
    prepared: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each refused in one line naming the flag or file and what to do, exit 2, before any
    work: nothing is written (the run directory's lock is no step's file)."""

    def written() -> list[Path]:
        return sorted(path for path in (tmp_path / "run").rglob("*") if path.name != LOCK)

    before = written()
    for argv, expected in (
        (["train", "--iteration", "5"], "train: --iteration 5: allowed: 0..2 (0: the teacher"),
        (["pseudo-label", "--iteration", "0"], "pseudo-label: --iteration 0: allowed: 1..2"),
        (
            ["train", "--iteration", "1"],
            "train: student 1 has no pseudo-labels ("
            f"{tmp_path / 'run' / 'pseudo' / 'iter_1' / 'pseudo_labels.parquet'}): "
            "run `noisy-student pseudo-label --iteration 1`",
        ),
        (
            ["pseudo-label", "--iteration", "1"],
            "pseudo-label: the teacher (iteration 0) has no model (",
        ),
        (["pseudo-label", "--iteration", "1", "--merge", "2"], "run `noisy-student train"),
        (["data", "fetch", "--source", "bogus"], "data fetch --source bogus: unknown data source"),
    ):
        refused(capsys, [*prepared, *argv], expected)
    assert written() == before
    (tmp_path / "afile").write_text("")
    for run_dir in ("afile", "afile/below"):
        refused(
            capsys,
            [*prepared, "--run-dir", str(tmp_path / run_dir), "prepare"],
            f"prepare: --run-dir {tmp_path / run_dir}: {tmp_path / 'afile'} is a file; "
            "allowed: a folder",
        )
    refused(
        capsys,
        [*prepared, "--run-dir", str(tmp_path / "empty"), "train", "--iteration", "0"],
        "train: the run has no splits (",
        "run `noisy-student prepare`",
    )


def test_report_or_show_of_an_unfinished_run_names_the_step_to_run(
    prepared: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    refused(capsys, [*prepared, "show"], "show: the run has no report (", "`noisy-student report`")
    refused(
        capsys,
        [*prepared, "report"],
        "report: the teacher (iteration 0) has no model (",
        "run `noisy-student train --iteration 0`",
    )
    # Finished steps faked by their metrics: the report names the first step not run.
    write_json(run / "models" / "iter_0" / "metrics.json", {"promoted": True})
    refused(capsys, [*prepared, "report"], "run `noisy-student pseudo-label --iteration 1`")
    write_json(run / "pseudo" / "iter_1" / "metrics.json", {})
    refused(
        capsys,
        [*prepared, "report"],
        f"report: iteration 1 has no model ({run / 'models' / 'iter_1' / 'metrics.json'}): "
        "run `noisy-student train --iteration 1`",
    )
    assert not (run / "report").exists()


def test_a_step_run_too_early_is_one_line_through_the_command_line(
    prepared: list[str], tmp_path: Path
) -> None:
    """What a DVC stage runs: the real process."""
    result = cli(*prepared, "train", "--iteration", "1", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"noisy-student: train: student 1 has no pseudo-labels "
        f"({tmp_path / 'run' / 'pseudo' / 'iter_1' / 'pseudo_labels.parquet'}): "
        "run `noisy-student pseudo-label --iteration 1`"
    ]


def test_a_prefect_task_run_too_early_fails_with_the_same_line(
    prepared: list[str], tmp_path: Path
) -> None:
    from tasks.steps import train

    cfg = load_config(prepared[1])
    with pytest.raises(FileNotFoundError) as err:
        train.fn(cfg.model_dump(mode="json"), str(tmp_path / "run"), 1)
    assert str(err.value) == (
        f"student 1 has no pseudo-labels "
        f"({tmp_path / 'run' / 'pseudo' / 'iter_1' / 'pseudo_labels.parquet'}): "
        "run `noisy-student pseudo-label --iteration 1`"
    )


def test_class_names_that_read_as_mathtext_are_drawn_as_they_are(tmp_path: Path) -> None:
    """Folder names with `$`, `_`, `^`, a backslash: every figure naming classes is written
    (matplotlib's mathtext failed the figure on `$\\notacommand$` and garbled `$x^2$`)."""
    from noisy_student.report import (
        write_class_counts_png,
        write_confusion_matrix_png,
        write_per_class_accuracy_png,
        write_sample_grid_png,
    )

    classes = ["$\\notacommand$", "$x^2$", "a_b^c", "50$ bill", "$"]
    n = len(classes)
    write_per_class_accuracy_png(tmp_path / "a.png", [0.5] * n, classes)
    write_confusion_matrix_png(tmp_path / "b.png", np.eye(n, dtype=np.int64), classes)
    write_class_counts_png(tmp_path / "c.png", [1] * n, [1] * n, classes)
    images = np.zeros((n, 1, 8, 8), dtype=np.uint8)
    write_sample_grid_png(tmp_path / "d.png", images, list(range(n)), [0.9] * n, classes)
    for name in "abcd":
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_a_deleted_mlflow_experiment_is_one_line_saying_how_to_restore_it(
    prepared: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Deleted in the UI, then a step run again: refused before training, naming the
    experiment and the command that restores it; restored, the step finds it again."""
    from noisy_student.tracking import use_experiment
    from tests.test_tracking import mlflow_store

    monkeypatch.setenv("NOISY_STUDENT_MLFLOW", "on")
    name = load_config(prepared[1]).tracking.experiment
    with mlflow_store(tmp_path) as client:
        experiment_id = use_experiment(name)
        client.delete_experiment(experiment_id)
        capsys.readouterr()  # MLflow's own lines on creating the store
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        refused(
            capsys,
            [*prepared, "train", "--iteration", "0"],
            f"train: tracking.experiment: the MLflow experiment {name!r} (id {experiment_id}) "
            f"is deleted in {uri}; restore it with `MLFLOW_TRACKING_URI={uri} mlflow "
            f"experiments restore --experiment-id {experiment_id}`, or set tracking.experiment "
            "to another name",
        )
        assert not (tmp_path / "run" / "models").exists()
        client.restore_experiment(experiment_id)
        assert use_experiment(name) == experiment_id
