from __future__ import annotations

from pathlib import Path

import pytest

from noisy_student.config import Config, load_config
from noisy_student.data import fetch

REPO = Path(__file__).resolve().parents[1]

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
