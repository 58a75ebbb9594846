"""A run directory is named once, strictly: a local path, ``file:///...`` or ``s3://...``;
anything else that starts like a URL is one line before any work (never a local folder
named ``s3:``). One command at a time writes into a run directory: a second is refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from noisy_student import cli, runs, storage
from tests.test_preflight import params


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("artifacts", "artifacts"),
        ("runs/x", "runs/x"),
        ("./s3:/bucket/x", "./s3:/bucket/x"),
        ("/abs/run", "/abs/run"),
        ("file:///abs/my%20run", "/abs/my run"),
        ("file://localhost/abs/run", "/abs/run"),
        ("s3://store/runs/abc/", "s3://store/runs/abc"),
        ("S3://store", "s3://store"),
    ],
)
def test_accepted_run_directories_read_as_one_form(text: str, expected: str) -> None:
    assert storage.run_location(text, "--run-dir") == expected


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("s3:/bucket/x", "expected s3://BUCKET/PREFIX"),
        ("s3:bucket/x", "expected s3://BUCKET/PREFIX"),
        ("s3://", "expected s3://BUCKET/PREFIX"),
        ("s3://Bucket_1/x", "expected s3://BUCKET/PREFIX"),
        ("s3://store/a//b", "an empty, '.' or '..' part"),
        ("s3://store/../b", "an empty, '.' or '..' part"),
        ("foo://x", "unknown scheme 'foo'"),
        ("http://", "unknown scheme 'http'"),
        ("gs://bucket/x", "unknown scheme 'gs'"),
        ("file:relative", "a file URL names an absolute path"),
        ("file://host/abs", "a file URL names an absolute path"),
        ("s3:", "expected s3://BUCKET/PREFIX"),
        ("", "empty"),
    ],
)
def test_malformed_or_unknown_urls_are_refused_in_one_line(text: str, why: str) -> None:
    with pytest.raises(storage.StorageError) as err:
        storage.run_location(text, "--run-dir")
    message = str(err.value)
    assert "\n" not in message
    assert why in message and f"accepted: {storage.ACCEPTED}" in message


def test_the_cli_refuses_a_one_slash_url_before_any_work(
    tmp_path: Path, digits_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = params(tmp_path, digits_root)
    result = subprocess.run(
        [sys.executable, "-m", "noisy_student.cli", "--params", str(path)]
        + ["--run-dir", "s3:/bucket/x", "prepare"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"noisy-student: --run-dir 's3:/bucket/x': expected s3://BUCKET/PREFIX with a bucket "
        f"name of 3-63 lower-case letters, digits, dots and hyphens; accepted: {storage.ACCEPTED}"
    ]
    monkeypatch.chdir(tmp_path)
    for text in ("file:run", "foo://x/y", "s3:x"):
        assert cli.main(["--params", str(path), "--run-dir", text, "run"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_a_file_url_runs_in_its_local_folder(
    tmp_path: Path, digits_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = params(tmp_path, digits_root, **{"data.labeled_per_class": 5})
    monkeypatch.chdir(tmp_path)
    argv = ["--params", str(path), "--run-dir", (tmp_path / "run").as_uri(), "prepare"]
    assert cli.main(argv) == 0
    assert (tmp_path / "run/splits/labeled.parquet").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "run"]


def test_a_second_command_on_a_run_directory_in_use_is_refused_naming_the_first(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"

    def refused(command: str, shared: bool = False) -> str:
        with pytest.raises(runs.RunDirectoryBusy) as err, runs.hold(run_dir, command, shared):
            pass
        return str(err.value)

    with runs.hold(run_dir, "run"):
        assert refused("train") == (
            f"run directory {run_dir} is in use by `noisy-student run` (pid {os.getpid()}); "
            "wait for it to end, or give another --run-dir"
        )
        refused("pseudo-label", shared=True)
    with runs.hold(run_dir, "pseudo-label", shared=True), runs.hold(run_dir, "x", shared=True):
        refused("run")  # shards side by side, but no whole run beside them
    with runs.hold(run_dir, "run"):  # every holder gone: free again
        pass


@pytest.mark.e2e
def test_three_runs_on_one_run_directory_at_once_the_later_two_refused(
    tmp_path: Path, digits_root: Path
) -> None:
    """Three `run`s start at once; the one holding the run directory is frozen (SIGSTOP)
    as soon as it does, so the other two meet it however slowly they start; once it is
    killed (-9), the directory is free."""
    path = params(tmp_path, digits_root, **{"data.labeled_per_class": 5, "device": "cpu"})
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "noisy_student.cli", "--params", str(path)]
    command += ["--run-dir", str(run_dir), "run", "--no-mlflow"]
    started = [
        subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True) for _ in range(3)
    ]
    try:
        lock, deadline = run_dir / runs.LOCK, time.monotonic() + 120
        while not any(
            f"(pid {p.pid})" in (lock.read_text() if lock.exists() else "") for p in started
        ):
            assert time.monotonic() < deadline, "no run began"
            time.sleep(0.02)
        [first] = [p for p in started if f"(pid {p.pid})" in lock.read_text()]
        first.send_signal(signal.SIGSTOP)
        for process in started:
            if process is not first:
                _, err = process.communicate(timeout=120)
                assert process.returncode == 2
                assert err.splitlines() == [
                    f"noisy-student: run: run directory {run_dir} is in use by `noisy-student "
                    f"run` (pid {first.pid}); wait for it to end, or give another --run-dir"
                ]
    finally:
        for process in started:
            process.kill()
            process.communicate()
    with runs.hold(run_dir, "run"):
        pass
