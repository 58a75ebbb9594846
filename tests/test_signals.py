"""The services around a step failing under it: SIGTERM (Kubernetes, Slurm, a Prefect
cancellation) in the middle of training, a tracking server that is down, a corrupt
store, a disk that fills while a file is written."""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import psutil
import pytest

from noisy_student import cli, pipeline, records
from noisy_student.io import DiskFull, save_torch, write_parquet
from noisy_student.runs import MODEL, RunLayout
from noisy_student.tracking import (
    SERVER_ANSWER_SECONDS,
    StoreUnavailable,
    check_store,
    use_experiment,
)
from tests.test_tracking import mlflow_store, params_file, start_cli, tiny_config, wait_for


def _runs_of(client: mlflow.MlflowClient, key: str) -> dict[str, str]:
    """The record kind (pipeline, train, ...) of each run of one pipeline run: its status."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.run_key = '{key}'")
    return {run.data.tags["record"]: run.info.status for run in runs}


def _epoch_logged(client: mlflow.MlflowClient, key: str) -> bool:
    """Whether the training step of pipeline run ``key`` has logged an epoch: it trains."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.run_key = '{key}' and tags.record = 'train'")
    return bool(runs) and bool(client.get_metric_history(runs[0].info.run_id, "epoch/lr"))


def test_sigterm_during_training_closes_the_records_as_killed(
    tmp_path: Path, digits_root: Path
) -> None:
    cfg = tiny_config(digits_root, **{"teacher.epochs": 200})
    layout = RunLayout(tmp_path / "run")
    pipeline.prepare(cfg, layout)
    with mlflow_store(tmp_path) as client:
        key = records.run_key(cfg, layout)
        params = params_file(cfg, tmp_path / "p.yaml")
        train = start_cli(params, layout, "train", "--iteration", "0")
        try:
            wait_for(lambda: _epoch_logged(client, key), train)
            train.send_signal(signal.SIGTERM)
            train.wait(timeout=30)
        finally:
            train.kill()
        stderr = train.stderr.read().decode()
        assert train.returncode == 143, stderr[-3000:]
        assert "Traceback" not in stderr
        assert stderr.strip().splitlines()[-1] == "noisy-student: train: stopped by SIGTERM"
        assert _runs_of(client, key) == {"pipeline": "KILLED", "train": "KILLED"}
        assert not (layout.model_dir(0) / MODEL).exists()


@pytest.mark.e2e
def test_sigterm_to_a_torchrun_launcher_stops_every_rank(tmp_path: Path, digits_root: Path) -> None:
    cfg = tiny_config(digits_root, **{"teacher.epochs": 200})
    layout = RunLayout(tmp_path / "run")
    pipeline.prepare(cfg, layout)
    with mlflow_store(tmp_path) as client:
        key = records.run_key(cfg, layout)
        params = params_file(cfg, tmp_path / "p.yaml")
        launcher = start_cli(params, layout, "train", "--iteration", "0", "--nproc", "2")
        try:
            wait_for(lambda: _epoch_logged(client, key), launcher)
            job = psutil.Process(launcher.pid).children(recursive=True)  # torchrun, ranks
            assert sum("RANK" in process.environ() for process in job) == 2
            launcher.send_signal(signal.SIGTERM)  # as Kubernetes does: to the launcher alone
            launcher.wait(timeout=90)
        finally:
            launcher.kill()
        stderr = launcher.stderr.read().decode()
        assert launcher.returncode == 143, stderr[-3000:]
        assert stderr.strip().splitlines()[-1] == "noisy-student: train: stopped by SIGTERM"
        assert not [p for p in job if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert _runs_of(client, key) == {"pipeline": "KILLED", "train": "KILLED"}


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A loopback port that takes connections and never answers: a hung server."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def _closed_port() -> str:
    """A loopback port nothing listens on: a server that is down."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def _train(tmp_path: Path, digits_root: Path) -> list[str]:
    params = params_file(tiny_config(digits_root), tmp_path / "p.yaml")
    return [
        "--params",
        str(params),
        "--run-dir",
        str(tmp_path / "run"),
        "train",
        "--iteration",
        "0",
    ]


@pytest.mark.parametrize("server", ["down", "silent"])
def test_a_tracking_server_that_does_not_answer_is_refused_in_seconds(
    server: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    digits_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    uri = _closed_port() if server == "down" else request.getfixturevalue("silent_server")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    assert cli.main(_train(tmp_path, digits_root)) == 2
    assert time.monotonic() - start < SERVER_ANSWER_SECONDS + 5  # MLflow's retries: minutes
    [line] = capsys.readouterr().err.strip().splitlines()
    reason = "Connection refused" if server == "down" else "no answer within"
    assert line.startswith(f"noisy-student: train: MLFLOW_TRACKING_URI: the tracking server {uri}")
    assert reason in line and "NOISY_STUDENT_MLFLOW=off" in line
    assert not (tmp_path / "run" / "models").exists()  # refused before training


def test_the_refusal_of_a_server_never_shows_its_password() -> None:
    uri = _closed_port().replace("//", "//bob:secret@")
    with pytest.raises(StoreUnavailable, match="server http://127.0.0.1:") as refused:
        check_store(uri)
    assert "secret" not in str(refused.value) and "bob" not in str(refused.value)


def test_a_corrupt_sqlite_store_is_named_not_a_traceback(
    tmp_path: Path,
    digits_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store = tmp_path / "mlflow" / "mlflow.db"
    store.parent.mkdir()
    garbage = b"not a database, but the tester's garbage\n" * 200
    store.write_bytes(garbage)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    assert cli.main(_train(tmp_path, digits_root)) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"noisy-student: train: {store}: the MLflow store is not a usable")
    assert "move it aside" in line
    with pytest.raises(StoreUnavailable, match="file is not a database"):
        use_experiment("noisy-student")  # the library's callers (Prefect tasks) too
    assert store.read_bytes() == garbage  # left as it was, for whoever restores it


def _fill_the_disk_writing(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes of the temporary file of ``name`` stop half-way with ENOSPC, as on a full disk
    (a real one needs a mount of its own); other writes go through."""
    write_bytes, to_parquet = Path.write_bytes, pd.DataFrame.to_parquet

    def half_then_full(path: Path, data: bytes) -> int:
        if not path.name.startswith(f".{name}."):
            return write_bytes(path, data)
        write_bytes(path, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def parquet_half_then_full(frame: pd.DataFrame, path: Path, **options: object) -> None:
        if not Path(path).name.startswith(f".{name}."):
            return to_parquet(frame, path, **options)
        Path(path).write_bytes(b"PAR1 half a file")
        raise OSError(errno.ENOSPC, "Error writing bytes to file")  # pyarrow's, errno set

    monkeypatch.setattr(Path, "write_bytes", half_then_full)
    monkeypatch.setattr(pd.DataFrame, "to_parquet", parquet_half_then_full)


def test_a_disk_that_fills_leaves_no_half_written_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, manifest = tmp_path / "model.pt", tmp_path / "pseudo_labels.parquet"
    save_torch(model, {"weights": [1.0]})
    before = model.read_bytes()
    _fill_the_disk_writing("model.pt", monkeypatch)
    _fill_the_disk_writing("pseudo_labels.parquet", monkeypatch)
    with pytest.raises(DiskFull, match=f"^{re.escape(str(model))}: the disk is full \\(No space"):
        save_torch(model, {"weights": [2.0] * 1000})
    with pytest.raises(DiskFull, match=f"^{re.escape(str(manifest))}: the disk is full"):
        write_parquet(manifest, pd.DataFrame({"image_id": [1, 2]}))
    assert model.read_bytes() == before  # the earlier model, whole
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.pt"]  # no temp left


def test_train_on_a_full_disk_says_so_in_one_line(
    tmp_path: Path,
    digits_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = tiny_config(digits_root, **{"teacher.epochs": 1})
    layout = RunLayout(tmp_path / "run")
    pipeline.prepare(cfg, layout)
    params = params_file(cfg, tmp_path / "p.yaml")
    _fill_the_disk_writing(MODEL, monkeypatch)
    argv = ["--params", str(params), "--run-dir", str(layout.root), "-q"]
    assert cli.main([*argv, "train", "--iteration", "0", "--no-mlflow"]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"noisy-student: train: {layout.model_dir(0) / MODEL}: the disk is full")
    assert not [p.name for p in layout.model_dir(0).iterdir() if MODEL in p.name]


def test_a_step_stopped_by_an_orchestrators_cancellation_ends_killed(
    tmp_path: Path, digits_root: Path
) -> None:
    """A Prefect flow run's steps run in its main thread, where a cancellation (SIGTERM from
    the worker) raises Prefect's ``TerminationSignal``: the step's record and the parent
    end KILLED, as under the CLI's own handler, never left RUNNING."""
    from prefect.exceptions import TerminationSignal

    cfg, layout = tiny_config(digits_root), RunLayout(tmp_path / "run")
    pipeline.prepare(cfg, layout)
    with mlflow_store(tmp_path) as client:
        opened = records.open_records(cfg, layout, "prefect")
        with pytest.raises(TerminationSignal), records.step_run(opened, "train", 0, "teacher"):
            raise TerminationSignal(signal.SIGTERM)
        assert set(_runs_of(client, opened.key).values()) == {"KILLED"}
