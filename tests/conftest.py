from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from noisy_student.config import Config, load_config
from noisy_student.data import fetch
from noisy_student.engine import CPU_BF16_ENV, cpu_has_native_bf16

REPO = Path(__file__).resolve().parents[1]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--cpu-bf16",
        choices=("native", "other", "on", "off"),
        default="native",
        help="what `precision: auto` computes in on CPU, in the tests and every process they "
        "start: this CPU's own path (native), the other kind of CPU's (other), bf16 as on an "
        "AMD EPYC (on; emulated where the CPU lacks bf16 instructions) or fp32 as on an "
        "Intel Xeon (off)",
    )


def pytest_configure(config: pytest.Config) -> None:
    choice = config.getoption("--cpu-bf16")
    if choice == "other":
        choice = "off" if cpu_has_native_bf16() else "on"
    if choice != "native":
        os.environ[CPU_BF16_ENV] = "1" if choice == "on" else "0"
    # Prefect's ephemeral API keeps its database under PREFECT_HOME: one for each test
    # process, so that xdist's workers never share a SQLite file (nor the user's ~/.prefect).
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="noisy-student-prefect-")


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(os.environ["PREFECT_HOME"], ignore_errors=True)


# Under pytest-xdist (`make test` runs `pytest -n 2 --dist loadgroup`) each test file runs
# whole on one worker, so its module fixtures are built once; the files that start Ray share
# one worker, since a Ray cluster writes its address where another cluster's driver would
# find it.
RAY_FILES = {"test_shards.py", "test_ddp.py", "test_scale.py"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        group = "ray" if item.path.name in RAY_FILES else item.path.name
        item.add_marker(pytest.mark.xdist_group(group))


TINY = {
    "train.epochs": 2,
    "teacher.epochs": 15,
    "pseudo_label.threshold": 0.2,
    "train.batch_size": 16,
    "data.labeled_per_class": 5,
    "data.val_per_class": 10,
    "data.test_per_class": 10,
}


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    fetch("digits", root)
    return root


@pytest.fixture
def tiny_config(digits_root: Path) -> Config:
    """Two iterations, two epochs each, on the real digits: seconds on CPU."""
    return load_config(None, {**TINY, "data.root": str(digits_root), "device": "cpu"})
