"""MLflow records of a tiny pipeline run: parent metrics by iteration and the summary
table, per-iteration evaluation and pseudo-label artifacts, registry tags and aliases."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import mlflow.artifacts
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from noisy_student import pipeline
from noisy_student.config import Config, load_config
from noisy_student.io import read_json, write_json
from noisy_student.report import confusion_matrix, markdown_table, per_class_accuracy
from noisy_student.runs import RunLayout
from noisy_student.tracking import log_pipeline_run
from tests.conftest import TINY

MODEL_NAME = "noisy-student"
STEP_METRICS = ("val_accuracy", "test_accuracy", "num_pseudo_labeled")
STUDENT_STEP_METRICS = ("pseudo_label_accuracy", "pseudo_label_mean_confidence")


def test_confusion_matrix_counts_true_classes_by_row() -> None:
    matrix = confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), 4)
    expected = [[1, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    np.testing.assert_array_equal(matrix, expected)
    assert per_class_accuracy(matrix) == [0.5, 1.0, 0.0, None]  # class 3 has no images
    with pytest.raises(ValueError, match="< num_classes"):
        confusion_matrix(np.array([0]), np.array([4]), 4)


def test_markdown_table_marks_missing_values() -> None:
    text = markdown_table(pd.DataFrame({"model": ["a", "b"], "acc": [np.nan, 0.91234]}))
    assert text.splitlines()[2:] == ["| a       | -      |", "| b       | 0.9123 |"]


@contextmanager
def mlflow_store(root: Path) -> Iterator[mlflow.MlflowClient]:
    """A sqlite store under ``root`` (artifacts beside it) while the block runs; MLflow's
    process-wide tracking URI and active experiment are restored afterwards. One torch
    thread: on shared cores, tiny models train many times slower with more."""
    threads = torch.get_num_threads()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        mp.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
        mp.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
        torch.set_num_threads(1)
        try:
            yield mlflow.MlflowClient(uri)
        finally:
            torch.set_num_threads(threads)


def tiny_run(root: Path, digits_root: Path) -> tuple[Config, RunLayout]:
    """Teacher + one student on the real digits, trained in seconds."""
    cfg = load_config(
        None, {**TINY, "data.root": str(digits_root), "device": "cpu"}, max_iterations=1
    )
    layout = RunLayout(root / "run")
    pipeline.run_all(cfg, layout)
    return cfg, layout


@dataclass
class Logged:
    cfg: Config
    layout: RunLayout
    client: mlflow.MlflowClient
    parent: mlflow.entities.Run
    children: list[mlflow.entities.Run]
    aliases: dict[str, str]  # the registered model's aliases right after this run


def children_of(
    client: mlflow.MlflowClient, parent: mlflow.entities.Run
) -> list[mlflow.entities.Run]:
    runs = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    return sorted(runs, key=lambda r: int(r.data.params["iteration"]))


def log(client: mlflow.MlflowClient, cfg: Config, layout: RunLayout) -> Logged:
    parent = client.get_run(log_pipeline_run(cfg, layout, "library"))
    aliases = {k: str(v) for k, v in client.get_registered_model(MODEL_NAME).aliases.items()}
    return Logged(cfg, layout, client, parent, children_of(client, parent), aliases)


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory, digits_root: Path) -> Iterator[Logged]:
    root = tmp_path_factory.mktemp("tracking")
    with mlflow_store(root) as client:
        cfg, layout = tiny_run(root, digits_root)
        yield log(client, cfg, layout)


def artifact_paths(client: mlflow.MlflowClient, run_id: str, path: str = "") -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path or None):
        out |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def download(run: mlflow.entities.Run, path: str, tmp_path: Path) -> Path:
    return Path(
        mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path=path, dst_path=str(tmp_path)
        )
    )


def version_of(logged: Logged, iteration: int) -> str:
    run_id = logged.children[iteration].info.run_id
    [version] = logged.client.search_model_versions(f"name='{MODEL_NAME}' and run_id='{run_id}'")
    return str(version.version)


def test_parent_charts_every_iteration_and_logs_the_summary(logged: Logged, tmp_path: Path) -> None:
    client, parent = logged.client, logged.parent
    table = pd.read_csv(logged.layout.report / "iterations.csv")
    for name in STEP_METRICS:
        history = sorted(client.get_metric_history(parent.info.run_id, name), key=lambda m: m.step)
        assert [m.step for m in history] == [0, 1], name
        assert [m.value for m in history] == pytest.approx(table[name].tolist())
    pseudo = read_json(logged.layout.pseudo_dir(1) / "metrics.json")
    for name, key in zip(
        STUDENT_STEP_METRICS, ("pseudo_label_accuracy", "mean_confidence"), strict=True
    ):
        [point] = client.get_metric_history(parent.info.run_id, name)  # the teacher has none
        assert (point.step, point.value) == (1, pytest.approx(pseudo[key]))

    summary = pd.read_csv(download(parent, "iterations.csv", tmp_path))
    assert summary["model"].tolist() == table["model"].tolist()
    assert summary["val_accuracy"].tolist() == pytest.approx(table["val_accuracy"].tolist())
    assert summary["model_version"].astype(str).tolist() == [
        version_of(logged, 0),
        version_of(logged, 1),
    ]
    markdown = download(parent, "iterations.md", tmp_path).read_text()
    lines = markdown.splitlines()
    assert lines[0].startswith("|") and len(lines) == 2 + len(table)
    assert "student-1 (width x1, depth x1)" in markdown
    assert "nan" not in markdown  # the teacher's missing pseudo-label values show as "-"
    assert parent.data.tags["mlflow.note.content"].startswith("Noisy Student on digits")
    config = read_json(download(parent, "config.json", tmp_path))
    assert config == logged.cfg.model_dump(mode="json")
    html = download(parent, "report/report.html", tmp_path).read_text()
    assert html.count("data:image/png;base64,") == 2 and "student-1" in html
    assert "![Accuracy by iteration](accuracy_by_iteration.png)" in (
        download(parent, "report/report.md", tmp_path).read_text()
    )


def test_children_log_test_evaluation_config_and_classes(logged: Logged, tmp_path: Path) -> None:
    test_size = len(pd.read_parquet(logged.layout.splits / "test.parquet"))
    assert [c.info.run_name for c in logged.children] == [
        "teacher (width x1, depth x1)",
        "student-1 (width x1, depth x1)",
    ]
    for child in logged.children:
        out = tmp_path / child.info.run_id
        matrix = np.array(
            read_json(download(child, "evaluation/confusion_matrix.json", out))["matrix"]
        )
        assert matrix.shape == (10, 10)
        assert matrix.sum() == test_size
        assert np.trace(matrix) / matrix.sum() == pytest.approx(child.data.metrics["test_accuracy"])
        per_class = read_json(download(child, "evaluation/per_class_accuracy.json", out))
        assert list(per_class.values()) == pytest.approx(np.diag(matrix) / matrix.sum(axis=1))
        for png in ("evaluation/confusion_matrix.png", "evaluation/per_class_accuracy.png"):
            with Image.open(download(child, png, out)) as image:
                assert image.format == "PNG"
        assert read_json(download(child, "config.json", out)) == logged.cfg.model_dump(mode="json")
        assert read_json(download(child, "classes.json", out)) == [str(d) for d in range(10)]
    teacher, student = (c.data.params for c in logged.children)
    assert (teacher["augment"], teacher["cutmix_alpha"]) == (logged.cfg.teacher.augment, "0.0")
    assert (student["augment"], student["cutmix_alpha"]) == ("strong", "0.0")


def test_students_log_their_pseudo_labels(logged: Logged, tmp_path: Path) -> None:
    teacher, student = logged.children
    assert not any(
        p.startswith("pseudo_labels/") for p in artifact_paths(logged.client, teacher.info.run_id)
    )
    assert {
        "pseudo_labels/confidence_histogram.png",
        "pseudo_labels/class_counts.png",
        "pseudo_labels/samples.png",
        "pseudo_labels/pseudo_labels.parquet",
    } <= artifact_paths(logged.client, student.info.run_id)
    manifest = pd.read_parquet(download(student, "pseudo_labels/pseudo_labels.parquet", tmp_path))
    expected = pd.read_parquet(logged.layout.pseudo_dir(1) / "pseudo_labels.parquet")
    assert len(expected) < 20_000  # all of it is logged
    pd.testing.assert_frame_equal(
        manifest[["image_id", "label", "confidence"]],
        expected[["image_id", "label", "confidence"]],
    )
    with Image.open(download(student, "pseudo_labels/samples.png", tmp_path)) as grid:
        assert grid.width > grid.height  # 4 rows of 8 images


def test_versions_carry_lineage_tags_and_teacher_follows_the_promoted_model(
    logged: Logged,
) -> None:
    for i, child in enumerate(logged.children):
        tags = logged.client.get_model_version(MODEL_NAME, version_of(logged, i)).tags
        metrics = read_json(logged.layout.model_dir(i) / "metrics.json")
        assert tags["iteration"] == str(i)
        assert float(tags["val_accuracy"]) == metrics["val_accuracy"]
        assert float(tags["test_accuracy"]) == metrics["test_accuracy"]
        assert tags["params_hash"] == logged.cfg.fingerprint()
        assert tags["data_dvc_md5"] == child.data.tags["data_dvc_md5"]
        assert tags["promoted"] == child.data.tags["promoted"] == str(metrics["promoted"])
    vals = [read_json(logged.layout.model_dir(i) / "metrics.json")["val_accuracy"] for i in (0, 1)]
    assert logged.aliases == {
        "teacher": version_of(logged, promoted_iteration(logged.layout)),
        "champion": version_of(logged, int(np.argmax(vals))),  # the first of equals
    }


def promoted_iteration(layout: RunLayout) -> int:
    return read_json(layout.report / "metrics.json")["final_iteration"]


def with_val_accuracy(logged: Logged, root: Path, values: list[float]) -> RunLayout:
    """A copy of the run whose models score ``values`` on validation; the student is
    promoted when it beats the teacher."""
    shutil.copytree(logged.layout.root, root)
    layout = RunLayout(root)
    for i, value in enumerate(values):
        path = layout.model_dir(i) / "metrics.json"
        promoted = i == 0 or value > values[0]
        write_json(path, {**read_json(path), "val_accuracy": value, "promoted": promoted})
    pipeline.summarize(logged.cfg, layout)
    return layout


def test_champion_moves_only_to_a_strictly_better_model(logged: Logged, tmp_path: Path) -> None:
    champion = logged.aliases["champion"]
    best = float(logged.client.get_model_version(MODEL_NAME, champion).tags["val_accuracy"])

    tied = log(logged.client, logged.cfg, with_val_accuracy(logged, tmp_path / "a", [best, 0.1]))
    # The student lost to its teacher: the teacher stays the promoted model.
    assert tied.aliases == {"teacher": version_of(tied, 0), "champion": champion}
    assert tied.children[1].data.tags["promoted"] == "False"

    better = best + 0.01
    moved = log(
        logged.client, logged.cfg, with_val_accuracy(logged, tmp_path / "b", [better, better])
    )
    # A tie is not a win: the teacher stays promoted and, as the first of equals, champion.
    assert moved.aliases == {"teacher": version_of(moved, 0), "champion": version_of(moved, 0)}
    tags = logged.client.get_model_version_by_alias(MODEL_NAME, "champion").tags
    assert tags["val_accuracy"] == str(better)
