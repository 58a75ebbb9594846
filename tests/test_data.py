from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from noisy_student.data import fetch, load_images, make_splits
from noisy_student.data.idx import idx_bytes, read_idx


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_fetch_is_byte_identical(tmp_path: Path, digits_root: Path) -> None:
    assert digest(fetch("digits", tmp_path)) == digest(digits_root / "digits")


def test_digits_load_as_uint8_nchw(digits_root: Path) -> None:
    data = load_images("digits", digits_root)
    assert data.images.shape == (1797, 1, 8, 8) and data.images.dtype == np.uint8
    assert data.images.max() == 255 and data.classes == [str(i) for i in range(10)]
    assert np.bincount(data.labels).min() >= 170


def test_idx_round_trip(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "x").write_bytes(idx_bytes(array))
    np.testing.assert_array_equal(read_idx(tmp_path / "x"), array)


def test_truncated_idx_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(idx_bytes(np.zeros((4, 4), np.uint8))[:-3])
    with pytest.raises(ValueError, match="expected 16 bytes"):
        read_idx(tmp_path / "x")


def test_missing_data_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="noisy-student data fetch"):
        load_images("digits", tmp_path)


def test_splits_sizes_disjoint_and_seeded() -> None:
    labels = np.repeat(np.arange(3), 20)
    splits = make_splits(labels, 2, 3, 4, seed=7)
    assert {k: len(v) for k, v in splits.items()} == {
        "labeled": 6,
        "unlabeled": 33,
        "val": 9,
        "test": 12,
    }
    ids = [set(frame["image_id"]) for frame in splits.values()]
    assert sum(map(len, ids)) == 60 and set().union(*ids) == set(range(60))
    for name in ("labeled", "val", "test"):
        assert np.bincount(splits[name]["label"]).tolist() == [len(splits[name]) // 3] * 3
        np.testing.assert_array_equal(labels[splits[name]["image_id"]], splits[name]["label"])
    assert "label" not in splits["unlabeled"] and "hidden_label" in splits["unlabeled"]
    again = make_splits(labels, 2, 3, 4, seed=7)
    other = make_splits(labels, 2, 3, 4, seed=8)
    assert splits["labeled"].equals(again["labeled"])
    assert not splits["labeled"].equals(other["labeled"])


def test_splits_refuse_a_class_too_small() -> None:
    with pytest.raises(ValueError, match="class 1 has 5 images"):
        make_splits(np.array([0] * 20 + [1] * 5), 2, 2, 1, seed=0)
