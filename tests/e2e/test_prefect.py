"""The flow through a real Prefect server on loopback, a process work pool, `prefect
deploy` from prefect.yaml, a worker, and `prefect deployment run ... --watch`."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import mlflow
import pytest

from tests.e2e.conftest import (
    REPO,
    base_env,
    free_port,
    make_repo_copy,
    run,
    stop,
    wait_http,
)

pytestmark = pytest.mark.e2e


def readme_setup() -> list[str]:
    """The README's commands that create the work pools and the deployments."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Run on Prefect", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [
        line.strip()
        for line in section.splitlines()
        if line.startswith(("prefect work-pool create", "prefect deploy "))
    ]
    assert commands[-1].startswith("prefect deploy --all"), commands
    return commands


@pytest.fixture(scope="module")
def prefect(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """A Prefect server, the `local` pool, the deployments, and one worker."""
    tmp = tmp_path_factory.mktemp("prefect")
    repo = make_repo_copy(tmp / "repo")
    port = free_port()
    env = base_env(
        PREFECT_HOME=str(tmp / "home"),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
    )
    log = open(tmp / "server.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    worker = None
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", timeout=180, process=server)
        # The README's setup, as a user types it in a terminal (a pseudo-terminal here):
        # it must ask nothing and leave both deployments created.
        for command in readme_setup():
            run(["script", "-qec", command, "/dev/null"], repo, {**env, "SHELL": "/bin/bash"})
        worker_log = open(tmp / "worker.log", "w")  # noqa: SIM115
        worker = subprocess.Popen(
            ["prefect", "worker", "start", "--pool", "local", "--type", "process"],
            cwd=repo,
            env=env,
            stdout=worker_log,
            stderr=subprocess.STDOUT,
        )
        yield repo, env
    finally:
        if worker is not None:
            stop(worker)
        stop(server)
        log.close()


def test_readme_setup_creates_both_deployments(prefect: tuple[Path, dict]) -> None:
    repo, env = prefect
    for name in ("local", "gpu"):
        response = httpx.get(f"{env['PREFECT_API_URL']}/deployments/name/noisy-student/{name}")
        response.raise_for_status()
        deployment = response.json()
        assert deployment["work_pool_name"] == name
        assert deployment["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(repo.resolve())}}
        ]


def deployment_run(repo: Path, env: dict[str, str]) -> str:
    result = run(
        [
            "prefect",
            "deployment",
            "run",
            "noisy-student/local",
            "--watch",
            "--watch-timeout",
            "900",
            "--param",
            "iterations=1",
        ],
        repo,
        env,
        timeout=960,
    )
    assert "Completed" in result.stdout, result.stdout
    return re.search(r"UUID: ([0-9a-f-]{36})", result.stdout).group(1)


def task_states(env: dict[str, str], flow_run_id: str) -> dict[str, str]:
    response = httpx.post(
        f"{env['PREFECT_API_URL']}/task_runs/filter",
        json={"flow_runs": {"id": {"any_": [flow_run_id]}}},
    )
    response.raise_for_status()
    return {t["name"]: t["state"]["name"] for t in response.json()}


def test_deployment_run_completes_and_records_mlflow(prefect: tuple[Path, dict]) -> None:
    repo, env = prefect
    flow_run_id = deployment_run(repo, env)

    states = task_states(env, flow_run_id)
    assert set(states) == {"prepare", "train-0", "pseudo-label-1", "train-1", "report"}
    assert set(states.values()) == {"Completed"}

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("noisy-student").experiment_id])
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted((r.data.tags["record"], r.data.tags["iteration"]) for r in children) == [
        ("pseudo_label", "1"),
        ("train", "0"),
        ("train", "1"),
    ]
    for run_ in (parent, *children):
        assert run_.data.tags["entry_point"] == "prefect"
        assert run_.data.tags["prefect_flow_run_id"] == flow_run_id
    name = parent.data.tags["registered_model"]
    versions = {str(v.version) for v in client.search_model_versions(f"name='{name}'")}
    assert len(versions) == 2

    # A second run with the same parameters reuses every finished step.
    again = deployment_run(repo, env)
    states = task_states(env, again)
    assert {name: s for name, s in states.items() if name != "report"} == {
        "prepare": "Cached",
        "train-0": "Cached",
        "pseudo-label-1": "Cached",
        "train-1": "Cached",
    }
    assert states["report"] == "Completed"
    # ... and records nothing new: the same runs, still finished, and the same versions.
    again_runs = client.search_runs([parent.info.experiment_id])
    assert {r.info.run_id: r.info.status for r in again_runs} == {
        r.info.run_id: "FINISHED" for r in runs
    }
    assert {str(v.version) for v in client.search_model_versions(f"name='{name}'")} == versions
