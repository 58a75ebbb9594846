"""Helpers for end-to-end tests: a temporary git + DVC copy of this repository, the
project's real commands run as subprocesses, and servers on loopback ports."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from noisy_student.config import load_config

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# Tiny but real: the digits, 5 labels per class, 1-2 epochs per student.
E2E_OVERRIDES = {
    "device": "cpu",
    "train.epochs": 1,
    "train.batch_size": 16,
    "teacher.epochs": 12,
    "pseudo_label.threshold": 0.2,
    "data.labeled_per_class": 5,
    "data.val_per_class": 10,
    "data.test_per_class": 10,
}


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        DO_NOT_TRACK="1",
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@localhost",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@localhost",
    )
    env.update(extra)
    return env


def run(
    cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        cmd, cwd=cwd, env=env or base_env(), capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}\n"
            f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
        )
    return result


def write_params(repo: Path, overrides: dict) -> None:
    cfg = load_config(REPO / "params.yaml", overrides)
    (repo / "params.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def make_repo_copy(dest: Path, overrides: dict | None = None) -> Path:
    """Copy the repository's files (as git sees them) into a fresh git repo, materialize
    the DVC-tracked data, write tiny params, and commit."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    run(["git", "init", "-q", "-b", "main"], dest)
    run(["noisy-student", "data", "fetch"], dest)
    write_params(dest, {**E2E_OVERRIDES, **(overrides or {})})
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-q", "-m", "copy"], dest)
    return dest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 120, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout}s")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    return make_repo_copy(tmp_path / "repo")


# Scale-out fixtures (S3, PostgreSQL, MLflow and Prefect servers, a Ray cluster), shared by
# every end-to-end test; defined in their own module.
from tests.e2e.scale import (  # noqa: E402, F401
    mlflow_server,
    monkeypatch_module,
    postgres,
    prefect_server,
    ray_cluster,
    ray_cluster_on_s3,
    s3,
    s3_env,
)
