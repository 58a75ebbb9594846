"""A `data fetch` killed with SIGKILL half-way leaves nothing inside `data/`: `make run`'s
check (`dvc commit` then `git diff data.dvc`) still passes, and the next fetch removes the
killed one's temporary folder."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.e2e.conftest import base_env, make_repo_copy, run

pytestmark = pytest.mark.e2e


def image_tree(root: Path, per_class: int = 150) -> Path:
    """An ImageFolder tree of large noise PNGs: slow enough to decode that the fetch is
    still writing when it is killed."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(buffer, "PNG")
    for folder in ("labeled/cat", "labeled/dog", "unlabeled"):
        (root / folder).mkdir(parents=True)
        for i in range(per_class):
            (root / folder / f"{i:04d}.png").write_bytes(buffer.getvalue())
    return root


def test_killed_fetch_leaves_data_matching_data_dvc(tmp_path: Path) -> None:
    repo = make_repo_copy(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(source="imagefolder", directory=str(image_tree(tmp_path / "images")))
    (tmp_path / "imagefolder.yaml").write_text(yaml.safe_dump(params))

    fetch = subprocess.Popen(
        ["noisy-student", "--params", str(tmp_path / "imagefolder.yaml"), "data", "fetch"],
        cwd=repo,
        env=base_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not list(repo.glob(".data.tmp-*")) and fetch.poll() is None:
        assert time.monotonic() < deadline, "the fetch never started writing"
        time.sleep(0.01)
    os.kill(fetch.pid, signal.SIGKILL)
    assert fetch.wait() == -signal.SIGKILL, "the fetch ended before it could be killed"
    assert list(repo.glob(".data.tmp-*")), "the killed fetch was writing outside data/"
    assert sorted(p.name for p in (repo / "data").iterdir()) == ["digits"]

    # make run's check: data/ still matches the committed data.dvc.
    run(["dvc", "commit", "--force", "--quiet", "data.dvc"], repo)
    run(["git", "diff", "--quiet", "data.dvc"], repo)
    assert run(["git", "status", "--porcelain"], repo).stdout == ""

    run(["noisy-student", "data", "fetch"], repo)
    assert not list(repo.glob(".data.tmp-*"))
