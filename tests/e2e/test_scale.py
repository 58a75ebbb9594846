"""The flow on shared state and a Ray cluster, every engine real and on loopback: the run
directory and task results on S3 (moto), MLflow on PostgreSQL + S3, a Prefect server, and
a Ray cluster whose worker nodes label the shards; one worker node is killed while they
label, and the run still ends with the manifest one process makes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import fsspec
import httpx
import mlflow
import pytest
import sqlalchemy
import yaml

from noisy_student.config import load_config
from noisy_student.data import fetch
from noisy_student.pipeline import label_pool
from noisy_student.runs import PSEUDO_LABELS, RunLayout
from noisy_student.storage import download
from tests.e2e.conftest import E2E_OVERRIDES, REPO, base_env

pytestmark = pytest.mark.e2e

FLOW = """
import json, sys
from flows.noisy_student import noisy_student
result = noisy_student(params_file="params.yaml", iterations=1, runs_root="s3://runs/runs",
                       shard_count=4, task_runner="ray", ray_address=sys.argv[1])
print("RESULT", json.dumps(result["run_dir"]))
"""


def _stats(fs: fsspec.AbstractFileSystem) -> list[dict]:
    fs.invalidate_cache()
    return [json.loads(fs.cat(p)) for p in fs.glob("runs/runs/*/pseudo/iter_1/shards/stats-*")]


def test_flow_on_ray_and_s3_survives_a_lost_node(
    tmp_path: Path,
    s3_env: dict[str, str],
    mlflow_server: str,
    postgres: str,
    prefect_server: dict[str, str],
    ray_cluster_on_s3,
) -> None:
    s3, ray_cluster = s3_env, ray_cluster_on_s3
    boto3.client("s3").create_bucket(Bucket="runs")
    fetch("digits", tmp_path / "data")
    cfg = load_config(REPO / "params.yaml", {**E2E_OVERRIDES, "data.root": str(tmp_path / "data")})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {
        **prefect_server,
        **s3,
        "MLFLOW_TRACKING_URI": mlflow_server,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),
    }
    log = tmp_path / "flow.log"  # a file, not a pipe: a full pipe would stall the flow
    with open(log, "w") as out:
        flow = subprocess.Popen(
            [sys.executable, "-c", FLOW, ray_cluster.address],
            cwd=tmp_path,
            env=base_env(**env),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        fs = fsspec.filesystem("s3")
        workers = {node.node_id: node for node in ray_cluster.worker_nodes}
        # Kill the worker node that finished the first shard, while the others label.
        deadline = time.monotonic() + 600
        while not (done := _stats(fs)) and flow.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert done, log.read_text()[-6000:]
        killed = done[0]["ray_node_id"]
        # A lost machine: its processes killed at once (a graceful stop lets the node's
        # worker finish its shard), and what it wrote counted once they are gone.
        ray_cluster.remove_node(workers[killed], allow_graceful=False)
        finished_before = {s["shard"] for s in _stats(fs) if s["ray_node_id"] == killed}
        assert len(finished_before) < 4, "every shard ended before the node was killed"
        flow.wait(timeout=900)
        output = log.read_text()
        assert flow.returncode == 0, output[-6000:]
    finally:
        if flow.poll() is None:
            flow.kill()
    run_dir = json.loads(output.split("RESULT ", 1)[1].splitlines()[0])

    stats = _stats(fs)
    assert sorted(s["shard"] for s in stats) == [0, 1, 2, 3]
    assert {s["ray_node_id"] for s in stats} == set(workers)  # both nodes labeled
    # The shards still to label when the node died were labeled by the one left.
    survivor = next(node for node in workers if node != killed)
    assert {s["ray_node_id"] for s in stats if s["shard"] not in finished_before} == {survivor}
    assert {s["torch_threads"] for s in stats} == {1}

    # The merged manifest is the one a single process makes from the same teacher.
    local = tmp_path / "local"
    download(run_dir, local, ["splits/", "models/"], "label")
    label_pool(cfg, RunLayout(local), 1)
    sharded = fs.cat(f"{run_dir.removeprefix('s3://')}/pseudo/iter_1/{PSEUDO_LABELS}")
    assert sharded == (local / "pseudo" / "iter_1" / PSEUDO_LABELS).read_bytes()

    # Prefect shows the fan-out and the fan-in.
    api = prefect_server["PREFECT_API_URL"]
    names = {t["name"] for t in httpx.post(f"{api}/task_runs/filter", json={}).json()}
    assert {f"label-1-shard-{i}-of-4" for i in range(4)} | {"merge-1-of-4"} <= names
    flows = {f["name"] for f in httpx.post(f"{api}/flow_runs/filter", json={}).json()}
    assert "pseudo-label-1-4-shards" in flows

    # MLflow: records in PostgreSQL (the parent and one child per step), the models and
    # their evaluation in S3, one registered version per model file.
    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("noisy-student")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 4  # the parent, the teacher, the labels, the student
    assert len(client.search_model_versions()) == 2
    with sqlalchemy.create_engine(postgres).connect() as db:
        assert db.execute(sqlalchemy.text("select count(*) from runs")).scalar() == 4
    artifacts = fs.find("mlflow/artifacts")
    assert any(p.endswith("checkpoint/model.pt") for p in artifacts)
    assert any(p.endswith("config.json") for p in artifacts)
