"""MLflow records of a tiny pipeline run, recorded step by step as it runs: parent metrics
by iteration and the summary table, per-iteration evaluation and pseudo-label artifacts,
registry tags and aliases; re-runs, failures and a second task."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import mlflow.artifacts
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from noisy_student import pipeline, records
from noisy_student.config import Config, load_config
from noisy_student.data import load_images
from noisy_student.engine import uses_bf16
from noisy_student.io import read_json, save_torch, write_json
from noisy_student.models import load_checkpoint, save_checkpoint
from noisy_student.registry import registered_model_name, task_key
from noisy_student.report import confusion_matrix, markdown_table, per_class_accuracy
from noisy_student.runs import RunLayout
from noisy_student.tracking import log_pipeline_run
from tests.conftest import TINY

MODEL_NAME = "tiny-digits"  # set explicitly: the registered model's name as given
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


def tiny_config(digits_root: Path, **overrides: object) -> Config:
    """Teacher + one student on the real digits, trained in seconds."""
    values = {**TINY, "data.root": str(digits_root), "device": "cpu"}
    values["tracking.registered_model"] = MODEL_NAME
    return load_config(None, {**values, **overrides}, max_iterations=1)


def tiny_run(root: Path, digits_root: Path, recorded: bool = False) -> tuple[Config, RunLayout]:
    """The tiny run, its steps recorded in MLflow as they run when ``recorded``."""
    cfg, layout = tiny_config(digits_root), RunLayout(root / "run")
    if recorded:
        pipeline.run_all(cfg, layout, records.train_step, records.label_step)
    else:
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
    client: mlflow.MlflowClient, parent: mlflow.entities.Run, record: str = "train"
) -> list[mlflow.entities.Run]:
    """The parent's active child runs of one kind (``train`` or ``pseudo_label``)."""
    runs = client.search_runs(
        [parent.info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.record = '{record}'",
    )
    return sorted(runs, key=lambda r: int(r.data.tags["iteration"]))


def log(client: mlflow.MlflowClient, cfg: Config, layout: RunLayout) -> Logged:
    parent = client.get_run(log_pipeline_run(cfg, layout, "library"))
    aliases = {k: str(v) for k, v in client.get_registered_model(MODEL_NAME).aliases.items()}
    return Logged(cfg, layout, client, parent, children_of(client, parent), aliases)


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory, digits_root: Path) -> Iterator[Logged]:
    root = tmp_path_factory.mktemp("tracking")
    with mlflow_store(root) as client:
        cfg, layout = tiny_run(root, digits_root, recorded=True)
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
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == f"digits · 1 student · {logged.cfg.fingerprint()[:6]}"
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
    assert [c.info.run_name for c in logged.children] == ["teacher w1 d1", "student-1 w1 d1"]
    for i, child in enumerate(logged.children):
        assert child.info.status == "FINISHED"
        # Logged as it trained: its duration is the training's, not the report's.
        seconds = read_json(logged.layout.model_dir(i) / "metrics.json")["train_seconds"]
        assert (child.info.end_time - child.info.start_time) / 1000 >= seconds
        # Per-epoch metrics under their own keys, step = epoch; results at step = iteration.
        history = pd.read_csv(logged.layout.model_dir(i) / "history.csv")
        losses = logged.client.get_metric_history(child.info.run_id, "epoch/train_loss")
        assert [m.step for m in losses] == history["epoch"].tolist()
        assert [m.value for m in losses] == pytest.approx(history["train_loss"].tolist())
        [val] = logged.client.get_metric_history(child.info.run_id, "val_accuracy")
        assert val.step == i
        assert child.data.tags["model_version"] == version_of(logged, i)
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
    assert teacher["method"] == "supervised" and "unlabeled_weight" not in teacher
    assert (student["augment"], student["cutmix_alpha"]) == ("strong", "0.0")
    assert (teacher["distillation"], student["distillation"]) == ("none", "none")
    computed_in = "bf16" if uses_bf16(torch.device("cpu")) else "fp32"  # precision: auto
    assert teacher["precision"] == student["precision"] == computed_in


def test_labeling_logs_the_pseudo_labels_in_its_own_child(logged: Logged, tmp_path: Path) -> None:
    [student] = children_of(logged.client, logged.parent, "pseudo_label")
    assert (student.info.run_name, student.info.status) == ("pseudo-labels 1", "FINISHED")
    pseudo = read_json(logged.layout.pseudo_dir(1) / "metrics.json")
    assert student.data.metrics["pseudo_label_accuracy"] == pytest.approx(
        pseudo["pseudo_label_accuracy"]
    )
    assert student.data.params["teacher_iteration"] == "0"
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
    """A copy of the run whose models (other files: their weights nudged by an amount of
    this copy's own) score ``values`` on validation; the student is promoted when it beats
    the teacher."""
    shutil.copytree(logged.layout.root, root)
    layout = RunLayout(root)
    for i, value in enumerate(values):
        model = load_checkpoint(str(layout.model_dir(i) / "model.pt"))
        with torch.no_grad():
            next(model.parameters()).add_(1e-4 * (1 + sum(values)))
        save_torch(layout.model_dir(i) / "model.pt", save_checkpoint(model))
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


def active_runs(client: mlflow.MlflowClient, experiment_id: str) -> dict[str, str]:
    """Run id -> status of every run not deleted."""
    return {r.info.run_id: r.info.status for r in client.search_runs([experiment_id])}


def state(logged: Logged) -> tuple[dict[str, str], list[str], list[int]]:
    """What a re-run must not add to: runs, registered versions, the parent's metric points."""
    client, parent = logged.client, logged.parent.info.run_id
    versions = sorted(v.version for v in client.search_model_versions(f"name='{MODEL_NAME}'"))
    points = [len(client.get_metric_history(parent, k)) for k in STEP_METRICS]
    return active_runs(client, logged.parent.info.experiment_id), versions, points


def test_a_file_registered_by_two_processes_at_once_keeps_one_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tracking server holds no lock: two processes may both find no version of a file
    and both register it. The later one removes its duplicate and links the first."""
    from noisy_student import registry

    with mlflow_store(tmp_path) as client:
        artifacts = (tmp_path / "artifacts").as_uri()
        experiment = client.create_experiment("raced", artifact_location=artifacts)
        with mlflow.start_run(experiment_id=experiment) as run:
            mlflow.log_text("weights", "model/weights.txt")
        uri = f"{run.info.artifact_uri}/model"
        first = registry.register(client, "raced", uri, "abc", {})
        lookup, calls = registry.version_of_file, []

        def missed_once(*args: object):  # the second process looked before the first wrote
            calls.append(args)
            return None if len(calls) == 1 else lookup(*args)

        monkeypatch.setattr(registry, "version_of_file", missed_once)
        assert registry.register(client, "raced", uri, "abc", {}) == first
        assert [str(v.version) for v in client.search_model_versions("name = 'raced'")] == [first]
        assert registry.register(client, "raced", uri, "other file", {}) != first


def test_rerunning_the_report_or_a_step_records_nothing_new(logged: Logged) -> None:
    before = state(logged)
    assert log_pipeline_run(logged.cfg, logged.layout, "library") == logged.parent.info.run_id
    assert state(logged) == before
    # A forced re-run of the student reproduces its model file: its first record stays.
    student = logged.children[1]
    records.train_step(logged.cfg, logged.layout, 1)
    assert logged.client.get_run(logged.parent.info.run_id).info.status == "RUNNING"
    assert children_of(logged.client, logged.parent)[1].info.run_id == student.info.run_id
    assert log_pipeline_run(logged.cfg, logged.layout, "library") == logged.parent.info.run_id
    assert state(logged) == before
    assert set(before[0].values()) == {"FINISHED"}


def test_a_failing_step_marks_its_child_and_the_parent_failed(
    logged: Logged, tmp_path: Path
) -> None:
    shutil.copytree(logged.layout.root, tmp_path / "run")
    layout = RunLayout(tmp_path / "run")
    manifest = layout.pseudo_dir(1) / "pseudo_labels.parquet"
    saved = manifest.read_bytes()
    manifest.unlink()
    with pytest.raises(FileNotFoundError):
        records.train_step(logged.cfg, layout, 1)
    key = records.run_key(logged.cfg, layout)
    [parent] = logged.client.search_runs(
        [logged.parent.info.experiment_id], f"tags.run_key = '{key}' and tags.record = 'pipeline'"
    )
    [failed] = children_of(logged.client, parent)
    assert (parent.info.status, failed.info.status) == ("FAILED", "FAILED")
    # Re-run: the same parent, running again; the failed attempt replaced by a finished one.
    manifest.write_bytes(saved)
    records.train_step(logged.cfg, layout, 1)
    assert logged.client.get_run(parent.info.run_id).info.status == "RUNNING"
    [child] = children_of(logged.client, parent)
    assert child.info.status == "FINISHED" and child.info.run_id != failed.info.run_id
    # The same model file as the original run's student: linked, not registered again.
    assert child.data.tags["model_version"] == version_of(logged, 1)


def test_a_second_task_gets_its_own_registered_model_and_champion(
    logged: Logged, tmp_path: Path, digits_root: Path
) -> None:
    default = {"tracking.registered_model": "noisy-student"}
    first, second = tiny_config(digits_root, **default), tiny_config(digits_root, seed=1, **default)
    shutil.copytree(logged.layout.root, tmp_path / "a")
    shutil.copytree(logged.layout.root, tmp_path / "b")
    a, b = RunLayout(tmp_path / "a"), RunLayout(tmp_path / "b")
    pipeline.prepare(second, b)  # another validation split: another task
    pipeline.summarize(second, b)
    data = load_images("digits", digits_root)
    tasks = [task_key(first, a, data), task_key(second, b, data)]
    names = [registered_model_name(first, tasks[0]), registered_model_name(second, tasks[1])]
    assert names[0] != names[1] and all(n.startswith("noisy-student-digits-") for n in names)
    log_pipeline_run(first, a, "library")
    champion = logged.client.get_model_version_by_alias(names[0], "champion")
    log_pipeline_run(second, b, "library")
    client = logged.client
    assert client.get_model_version_by_alias(names[0], "champion").version == champion.version
    for name, cfg, layout in ((names[0], first, a), (names[1], second, b)):
        versions = client.search_model_versions(f"name='{name}'")
        assert {v.tags["task_key"] for v in versions} == {task_key(cfg, layout, data)}
        assert len(versions) == 2  # a model file in each task's registered model
    # A name given explicitly holds one task: another task's run is refused before it starts.
    clash = tiny_config(digits_root, seed=1, **{"tracking.registered_model": names[0]})
    with pytest.raises(ValueError, match="holds models of another task"):
        records.open_records(clash, b, "library")


def params_file(cfg: Config, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def start_cli(params: Path, layout: RunLayout, *args: str) -> subprocess.Popen:
    """The real ``noisy-student`` command in its own process (the store and the working
    directory are this process's, so the code and data versions are the same)."""
    command = [sys.executable, "-m", "noisy_student.cli", "--params", str(params)]
    return subprocess.Popen(
        [*command, "--run-dir", str(layout.root), *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"exited {process.returncode}: {process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.2)


def blocked_on_a_lock(pid: int) -> bool:
    """Whether ``pid`` waits for a file lock (a ``->`` line of /proc/locks)."""
    return any(
        "->" in line and str(pid) in line.split()
        for line in Path("/proc/locks").read_text().splitlines()
    )


def test_kill_9_during_the_report_then_a_rerun_finishes_the_same_parent(
    logged: Logged, tmp_path: Path
) -> None:
    shutil.copytree(logged.layout.root, tmp_path / "run")
    layout, params = RunLayout(tmp_path / "run"), params_file(logged.cfg, tmp_path / "p.yaml")
    lock = Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///") + ".registry.lock")
    # Hold the registry's lock: the report records every step, then waits to move aliases.
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        report = start_cli(params, layout, "report")
        try:
            wait_for(lambda: blocked_on_a_lock(report.pid), report)
        finally:
            report.kill()  # SIGKILL
            report.wait()
    key = records.run_key(logged.cfg, layout)
    query = f"tags.run_key = '{key}' and tags.record = 'pipeline'"
    experiment = logged.parent.info.experiment_id
    [parent] = logged.client.search_runs([experiment], query)
    assert parent.info.status == "RUNNING"  # killed before it could close it
    killed = active_runs(logged.client, experiment)
    assert len(children_of(logged.client, parent)) == 2

    assert log_pipeline_run(logged.cfg, layout, "cli") == parent.info.run_id
    assert logged.client.get_run(parent.info.run_id).info.status == "FINISHED"
    assert active_runs(logged.client, experiment) == {**killed, parent.info.run_id: "FINISHED"}
    for name in STEP_METRICS:
        assert len(logged.client.get_metric_history(parent.info.run_id, name)) == 2


def test_metrics_are_live_and_kill_9_during_training_leaves_one_record(
    logged: Logged, tmp_path: Path, digits_root: Path
) -> None:
    cfg = tiny_config(digits_root, **{"teacher.epochs": 25})
    layout = RunLayout(tmp_path / "run")
    pipeline.prepare(cfg, layout)
    train = start_cli(params_file(cfg, tmp_path / "p.yaml"), layout, "train", "--iteration", "0")
    client = logged.client
    experiment = logged.parent.info.experiment_id
    query = f"tags.run_key = '{records.run_key(cfg, layout)}' and tags.record = 'train'"

    def two_epochs_logged() -> bool:
        runs = client.search_runs([experiment], query)
        return bool(runs) and len(client.get_metric_history(runs[0].info.run_id, "epoch/lr")) >= 2

    try:
        wait_for(two_epochs_logged, train)
        [child] = client.search_runs([experiment], query)
        assert child.info.status == "RUNNING"
        assert not (layout.model_dir(0) / "model.pt").exists()  # still training
    finally:
        train.kill()
        train.wait()
    records.train_step(cfg, layout, 0)
    [finished] = client.search_runs([experiment], query)  # the killed attempt is gone
    assert finished.info.status == "FINISHED" and finished.info.run_id != child.info.run_id
    epochs = client.get_metric_history(finished.info.run_id, "epoch/lr")
    assert sorted(m.step for m in epochs) == list(range(1, 26))
