"""Three `noisy-student run` processes recording to one fresh sqlite store at once: the
store is created once, every run's records are complete, the registry stays consistent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from noisy_student.config import load_config
from tests.conftest import TINY
from tests.e2e.conftest import REPO

pytestmark = pytest.mark.e2e

TEACHER_EPOCHS = (15, 14, 13)  # three different pipelines of the same task


def test_three_concurrent_pipelines_on_a_fresh_store(tmp_path: Path, digits_root: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    processes = []
    for epochs in TEACHER_EPOCHS:
        overrides = {**TINY, "data.root": str(digits_root), "device": "cpu"}
        cfg = load_config(None, {**overrides, "teacher.epochs": epochs}, max_iterations=1)
        params = tmp_path / f"params-{epochs}.yaml"
        params.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        command = [sys.executable, "-m", "noisy_student.cli", "--params", str(params), "-q"]
        processes.append(
            subprocess.Popen(
                [*command, "--run-dir", str(tmp_path / f"run-{epochs}"), "run"],
                cwd=REPO,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for process in processes:
        _, stderr = process.communicate(timeout=900)
        assert process.returncode == 0, stderr[-4000:]

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("noisy-student").experiment_id
    runs = client.search_runs([experiment])
    parents = [r for r in runs if r.data.tags["record"] == "pipeline"]
    assert len(parents) == 3 and len(runs) == 3 * 4  # each: teacher, labels, student
    assert len({p.info.run_name for p in parents}) == 3
    assert {r.info.status for r in runs} == {"FINISHED"}
    [name] = {r.data.tags["registered_model"] for r in runs}  # one task
    versions = {str(v.version): v for v in client.search_model_versions(f"name='{name}'")}
    assert len(versions) == 6
    assert len({v.tags["checkpoint_sha256"] for v in versions.values()}) == 6
    finals = set()
    for parent in parents:
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        trained = sorted(
            (r for r in children if r.data.tags["record"] == "train"),
            key=lambda r: int(r.data.tags["iteration"]),
        )
        assert [r.data.tags["iteration"] for r in trained] == ["0", "1"]
        for run in trained:
            assert versions[run.data.tags["model_version"]].run_id == run.info.run_id
        promoted = [r for r in trained if r.data.tags["promoted"] == "True"]
        finals.add(promoted[-1].data.tags["model_version"])
        assert len(client.get_metric_history(parent.info.run_id, "val_accuracy")) == 2
    aliases = client.get_registered_model(name).aliases
    assert str(aliases["teacher"]) in finals  # the model one of the runs ended with
    best = max(float(v.tags["val_accuracy"]) for v in versions.values())
    assert float(versions[str(aliases["champion"])].tags["val_accuracy"]) == best
