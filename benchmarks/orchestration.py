"""What Prefect costs: the same loop through ``prefect deployment run noisy-student/local``
(a real server and process worker on loopback) against ``noisy-student run`` (the
library, in one process), both logging to MLflow, alternating runs.

The Prefect figure is the wall time of ``prefect deployment run ... --watch``, from
submission to the flow run's end: the worker's polling, the flow's subprocess, task
orchestration, caching and result persistence included. Starting the server and the
worker is not counted (they are long-lived in production). Each run gets its own
``runs_root``, so no task result is served from Prefect's cache.

    python benchmarks/orchestration.py --params presets/fashion_mnist.yaml --repeats 2
    python benchmarks/orchestration.py --params presets/fashion_mnist.yaml --limit 1 \
        --set teacher.epochs=30 --set train.epochs=1 --set pseudo_label.balance=500
    python benchmarks/orchestration.py --set train.epochs=1 --set teacher.epochs=5  # digits
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml
from fashion_mnist import parse_sets

from noisy_student.config import load_config

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not answer within {timeout} s")


def _run(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0 or "Failed" in result.stdout:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return seconds


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--set", action="append", default=[], help="override key=value")
    parser.add_argument("--limit", type=int, default=None, help="keep the first N students")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Validated before anything starts; the data goes to this run's own root.
        overrides = {"data.root": str(tmp / "data")} | parse_sets(args.set)
        cfg = load_config(args.params, overrides, args.limit)
        params = tmp / "params.yaml"
        params.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
        env.update(
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            PREFECT_HOME=str(tmp / "prefect"),
            PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_UI_ENABLED="false",
            MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow' / 'mlflow.db'}",
        )
        (tmp / "mlflow").mkdir()
        # Both runs read one copy of the data, fetched before any clock starts.
        _run(["noisy-student", "--params", str(params), "-q", "data", "fetch"], env)
        logs = open(tmp / "server.log", "w")  # noqa: SIM115 - closed below
        server = subprocess.Popen(
            ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=logs,
            stderr=subprocess.STDOUT,
        )
        worker = None
        try:
            _wait(f"http://127.0.0.1:{port}/api/health")
            _run(["prefect", "work-pool", "create", "local", "--type", "process"], env)
            _run(["prefect", "--no-prompt", "deploy", "--name", "local"], env)
            worker = subprocess.Popen(
                ["prefect", "worker", "start", "--pool", "local", "--type", "process"],
                cwd=REPO,
                env=env,
                stdout=logs,
                stderr=subprocess.STDOUT,
            )
            library, prefect = [], []
            for i in range(args.repeats):
                library.append(
                    _run(
                        [
                            "noisy-student",
                            "--params",
                            str(params),
                            "--run-dir",
                            str(tmp / f"lib-{i}"),
                            "-q",
                            "run",
                        ],
                        env,
                    )
                )
                prefect.append(
                    _run(
                        [
                            "prefect",
                            "deployment",
                            "run",
                            "noisy-student/local",
                            "--watch",
                            "--watch-timeout",
                            "7200",
                            "--param",
                            f"params_file={params}",
                            "--param",
                            f"runs_root={tmp / f'prefect-{i}'}",
                        ],
                        env,
                    )
                )
                print(f"run {i}: library {library[-1]:.1f} s, prefect {prefect[-1]:.1f} s")
        finally:
            for process in (worker, server):
                if process is not None:
                    _stop(process)
            logs.close()
    lib, pre = statistics.median(library), statistics.median(prefect)
    print(
        f"median: library {lib:.1f} s, prefect deployment run {pre:.1f} s, "
        f"overhead {pre - lib:+.1f} s ({pre / lib - 1:+.1%})"
    )


if __name__ == "__main__":
    main()
