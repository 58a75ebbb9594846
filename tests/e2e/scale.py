"""Fixtures for scale-out tests, all on loopback: a Ray cluster of worker nodes in this
process, a moto S3 server, PostgreSQL from its binaries, an MLflow server on both, and a
Prefect server. Import the fixtures a test needs from here."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3fs import S3FileSystem

from tests.e2e.conftest import BIN, REPO, base_env, free_port, wait_http

PG_BIN = Path("/usr/lib/postgresql/15/bin")
S3_ENV = {  # moto accepts any credentials; every S3 client reads these
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _server(cmd: list[str], log: Path, env: dict[str, str], **kwargs) -> subprocess.Popen:
    """A server in its own process group, so stopping it stops the workers it forks."""
    with open(log, "w") as out:
        return subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
        )


def _stop_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A moto S3 server; yields the environment that points S3 clients at it."""
    port = free_port()
    tmp = tmp_path_factory.mktemp("moto")
    server = _server(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], tmp / "moto.log", base_env()
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/moto-api/", timeout=60, process=server)
        yield {**S3_ENV, "AWS_ENDPOINT_URL": url, "MLFLOW_S3_ENDPOINT_URL": url}
    finally:
        _stop_group(server)
        # s3fs keeps one client per set of arguments, bound to this server's endpoint:
        # the next module's server has another port.
        S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def s3_env(s3: dict[str, str], monkeypatch_module: pytest.MonkeyPatch) -> dict[str, str]:
    """The S3 server's environment in this process too, and so in the Ray nodes started
    after it: each machine of a cluster brings its own credentials."""
    for name, value in s3.items():
        monkeypatch_module.setenv(name, value)
    return s3


@pytest.fixture(scope="module")
def ray_cluster_on_s3(s3_env: dict[str, str], request: pytest.FixtureRequest) -> object:
    """``ray_cluster`` whose nodes reach the S3 server."""
    return request.getfixturevalue("ray_cluster")


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A PostgreSQL cluster run as the ``postgres`` user; yields an SQLAlchemy URL of an
    empty database ``mlflow`` (psycopg2, which SQLAlchemy 2.1 no longer picks for
    ``postgresql://``)."""
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"PostgreSQL binaries not found in {PG_BIN} (apt-get install postgresql)")
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    data = Path(tempfile.mkdtemp(prefix="noisy-student-pg-"))
    if as_postgres:
        shutil.chown(data, "postgres")
    port = free_port()
    run = lambda *cmd: subprocess.run(  # noqa: E731
        [*as_postgres, *cmd], check=True, capture_output=True, text=True, timeout=120
    )
    run(str(PG_BIN / "initdb"), "-D", str(data / "db"), "-A", "trust", "-U", "postgres")
    options = f"-h 127.0.0.1 -p {port} -k {data}"
    log = data / "server.log"  # the server's output: not this process's pipes
    pg_ctl = [str(PG_BIN / "pg_ctl"), "-D", str(data / "db"), "-l", str(log)]
    try:
        run(*pg_ctl, "-o", options, "-w", "start")
        run(str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "mlflow")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*as_postgres, *pg_ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(
    postgres: str, s3: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """An MLflow server with its records in PostgreSQL and its artifacts in S3 (bucket
    ``mlflow``); yields its URL, the only thing a client needs."""
    import boto3

    boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"], **_credentials(s3)).create_bucket(
        Bucket="mlflow"
    )
    port = free_port()
    server = _server(
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            postgres,
            "--artifacts-destination",
            "s3://mlflow/artifacts",
        ],
        tmp_path_factory.mktemp("mlflow") / "server.log",
        base_env(**s3),
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", timeout=240, process=server)
        yield url
    finally:
        _stop_group(server)


def _credentials(s3: dict[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": s3["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": s3["AWS_SECRET_ACCESS_KEY"],
        "region_name": s3["AWS_DEFAULT_REGION"],
    }


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A Prefect server; yields the environment of its clients."""
    tmp = tmp_path_factory.mktemp("prefect")
    port = free_port()
    env = base_env(
        PREFECT_HOME=str(tmp / "home"),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
    )
    server = _server(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        tmp / "server.log",
        env,
        cwd=tmp,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", timeout=180, process=server)
        yield env
    finally:
        _stop_group(server)


@pytest.fixture(scope="module")
def ray_cluster(monkeypatch_module: pytest.MonkeyPatch) -> Iterator[object]:
    """A Ray cluster on loopback: a head with no CPUs (it schedules, runs nothing) and two
    one-CPU worker nodes, each its own raylet and processes, as on separate machines.
    ``ray.cluster_utils.Cluster`` keeps every address on 127.0.0.1 (``ray start`` would
    move it to the host's address). Workers import this repository's code."""
    from ray.cluster_utils import Cluster

    monkeypatch_module.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    path = os.environ.get("PYTHONPATH", "")
    paths = [str(REPO / "src"), str(REPO), path]
    monkeypatch_module.setenv("PYTHONPATH", os.pathsep.join(filter(None, paths)))
    cluster = Cluster()
    try:
        _add_node(cluster, num_cpus=0, include_dashboard=False)  # the head
        for _ in range(2):
            _add_node(cluster, num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


def _add_node(cluster, **options) -> None:
    """Ray waits a fixed 30 s for a node to register; on a loaded machine that can pass,
    so a node that timed out is started again (twice at most)."""
    for attempt in range(3):
        try:
            cluster.add_node(**options)
            return
        except Exception as err:
            if "timed out during startup" not in str(err) or attempt == 2:
                raise


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


__all__ = [
    "mlflow_server",
    "monkeypatch_module",
    "postgres",
    "prefect_server",
    "ray_cluster",
    "ray_cluster_on_s3",
    "s3",
    "s3_env",
]
