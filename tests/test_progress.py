"""Progress bars: a live bar with rate and ETA on a terminal, plain periodic lines without
carriage returns elsewhere, nothing when quiet or off rank 0."""

from __future__ import annotations

import logging
import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from noisy_student import progress
from noisy_student.progress import track
from tests.conftest import REPO


class _Stderr:
    """Whatever ``sys.stderr`` is when written to (pytest swaps it between phases)."""

    def write(self, text: str) -> None:
        sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


@pytest.fixture
def stderr_log() -> Iterator[None]:
    """The progress logger printing to stderr at INFO, as the CLI sets logging up."""
    logger = logging.getLogger("noisy_student.progress")
    handler = logging.StreamHandler(_Stderr())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield
    logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)
    progress.configure(quiet=False, interval=30.0)


def test_not_a_terminal_gives_plain_lines_with_rate_and_eta(
    capsys: pytest.CaptureFixture[str], stderr_log: None
) -> None:
    progress.configure(interval=0.0)
    assert list(track(range(4), "decoding", unit="file")) == [0, 1, 2, 3]
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    lines = err.splitlines()
    assert len(lines) == 5  # one per item (interval 0), then the end
    line = r"decoding: 2/4 file, [\d.]+ file/s, elapsed 0:00:00, eta 0:00:\d\d"
    assert re.fullmatch(line, lines[1])
    assert lines[-1].startswith("decoding: 4/4 file")


def test_a_short_loop_off_a_terminal_writes_nothing(
    capsys: pytest.CaptureFixture[str], stderr_log: None
) -> None:
    list(track(range(100), "batches"))  # within the 30 s interval
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("switch", ["quiet", "rank"])
def test_quiet_and_other_ranks_show_nothing(
    switch: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    stderr_log: None,
) -> None:
    progress.configure(interval=0.0)
    if switch == "quiet":
        progress.configure(quiet=True)
    else:
        monkeypatch.setenv("RANK", "1")
    with caplog.at_level(logging.INFO):
        assert list(track(range(3), "epochs")) == [0, 1, 2]
        with progress.bar("labeling", total=10) as labeling:
            labeling.advance(10)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == "" and caplog.records == []


def run_in_terminal(args: list[str], cwd: Path, timeout: float = 300) -> str:
    """``args`` with stdin, stdout and stderr on a pseudo-terminal; all it wrote."""
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "160", "LINES": "40"}
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    return b"".join(chunks).decode(errors="replace")


def test_the_command_in_a_terminal_shows_bars_with_rate_and_eta(
    tmp_path: Path, digits_root: Path
) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "root": str(digits_root),
                    "labeled_per_class": 10,
                    "val_per_class": 5,
                    "test_per_class": 5,
                },
                "device": "cpu",
                "train": {"epochs": 8, "batch_size": 16},
                "iterations": {},
            }
        )
    )
    command = [sys.executable, "-m", "noisy_student.cli", "--params", str(params)]
    shown = run_in_terminal(
        [*command, "--run-dir", str(tmp_path / "a"), "run", "--no-mlflow"], REPO
    )
    frames = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown).replace("\r", "\n")
    bar = r"epochs\s+\S+\s+\d/8 [\d.]+ epoch/(s|min) \d+:\d\d:\d\d eta \d+:\d\d:\d\d"
    assert re.search(bar, frames), frames[-3000:]
    assert re.search(r"epoch \d batches\s+\S+\s+\d+/7 ", frames)  # 100 images, 16 a batch
    quiet = run_in_terminal(
        [*command, "-q", "--run-dir", str(tmp_path / "b"), "run", "--no-mlflow"], REPO
    )
    assert "epochs" not in quiet and "eta" not in quiet
    assert "teacher (width x1, depth x1)" in quiet  # the table still prints
