"""The Prefect flow's cache decides re-runs correctly: the real flow on Prefect's test
harness (a temporary Prefect server), in two checkouts of tiny digits data. A finished run
is reused; a change to the library, another checkout, a deleted output or a result file
swapped for a pickle makes the steps concerned run again instead of trusting results that
no longer hold (and the pickle is never unpickled)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
from prefect.testing.utilities import prefect_test_harness

from flows.noisy_student import noisy_student
from noisy_student import versions
from noisy_student.config import load_config
from noisy_student.data import fetch
from tests.e2e.conftest import REPO
from tests.test_results import pickle_result

pytestmark = pytest.mark.e2e

TINY = {
    "device": "cpu",
    "train.epochs": 1,
    "teacher.epochs": 2,
    "train.batch_size": 16,
    "pseudo_label.threshold": 0.2,
    "data.labeled_per_class": 5,
    "data.val_per_class": 10,
    "data.test_per_class": 10,
}
STEPS = {"prepare", "train-0", "pseudo-label-1", "train-1"}


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("prefect-cache")
    with (
        prefect_test_harness(server_startup_timeout=300),
        temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp / "results"}),
    ):
        yield tmp


def checkout(where: Path) -> Path:
    """A working copy as a user has it: params.yaml, data.dvc and the fetched data."""
    where.mkdir(parents=True)
    cfg = load_config(REPO / "params.yaml", TINY)
    (where / "params.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    shutil.copy(REPO / "data.dvc", where / "data.dvc")
    fetch("digits", where / "data")
    return where


def run_flow(
    where: Path, monkeypatch: pytest.MonkeyPatch, overrides: dict | None = None
) -> dict[str, str]:
    """Run the flow from ``where``; the state of each of its tasks."""
    monkeypatch.chdir(where)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{where / 'mlflow.db'}")
    state = noisy_student(iterations=1, overrides=overrides, return_state=True)
    assert state.is_completed(), state
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
            )
        )
    return {run.name: run.state.name for run in runs}


def result_of(results: Path, folder: Path) -> Path:
    """The result file of the step whose record names ``folder``."""
    [found] = [
        path
        for path in results.iterdir()
        if json.loads(json.loads(path.read_text())["result"]).get("path") == str(folder)
    ]
    return found


def test_cache_reuses_only_results_that_still_hold(
    harness: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    first = checkout(harness / "first")
    states = run_flow(first, monkeypatch)
    assert states == dict.fromkeys([*STEPS, "report"], "Completed")

    # A deleted output and a changed one: their steps run again (and whatever reads a
    # changed result); the steps whose files still hold are reused, and the report works.
    [model] = (first / "runs").glob("*/models/iter_1/model.pt")
    model.unlink()
    [labels] = (first / "runs").glob("*/pseudo/iter_1/pseudo_labels.parquet")
    labels.write_bytes(b"not a manifest")
    # prepare's result file swapped for a pickle whose metadata names the pickle
    # serializer: refused unread, prepare runs again (the same splits: the rest holds).
    [splits] = (first / "runs").glob("*/splits")
    planted = result_of(harness / "results", splits)
    marker = harness / "pickle-ran"
    planted.write_bytes(pickle_result(marker))
    caplog.clear()
    states = run_flow(first, monkeypatch)
    assert not marker.exists()
    assert f"task result {planted} refused: serializer 'pickle'" in caplog.text
    assert json.loads(planted.read_text())["metadata"]["serializer"]["type"] != "pickle"
    assert states == {
        "prepare": "Completed",
        "train-0": "Cached",
        "pseudo-label-1": "Completed",
        "train-1": "Completed",
        "report": "Completed",
    }
    assert model.is_file()

    # A second checkout on the same machine computes its own results in its own run dir.
    second = checkout(harness / "second")
    states = run_flow(second, monkeypatch)
    assert {name: states[name] for name in STEPS} == dict.fromkeys(STEPS, "Completed")
    assert len(list((second / "runs").glob("*/models/iter_1/model.pt"))) == 1

    # A change to the library (its code version) runs every step again.
    monkeypatch.setattr(versions, "code_version", lambda: "edited-library")
    states = run_flow(first, monkeypatch)
    assert {name: states[name] for name in STEPS} == dict.fromkeys(STEPS, "Completed")


def test_flow_trains_the_teacher_method_its_overrides_name(
    harness: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``teacher.method: fixmatch`` through the flow: the teacher learns from the pool too
    (its curves say how much of it passed the threshold) and MLflow records the method."""
    where = checkout(harness / "fixmatch")
    fixmatch = {"teacher.method": "fixmatch", "teacher.augment": "weak"}
    states = run_flow(where, monkeypatch, {**fixmatch, "teacher.unlabeled_ratio": 1.0})
    assert states == dict.fromkeys([*STEPS, "report"], "Completed")
    [history] = (where / "runs").glob("*/models/iter_0/history.csv")
    assert pd.read_csv(history)["unlabeled_mask_rate"].notna().all()
    client = mlflow.MlflowClient(f"sqlite:///{where / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    [teacher] = client.search_runs(experiments, "params.method = 'fixmatch'")
    assert teacher.data.params["unlabeled_ratio"] == "1.0"
    assert "epoch/unlabeled_mask_rate" in teacher.data.metrics
