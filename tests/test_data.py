from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from noisy_student.data import Batch, ImageSet, fetch, load_images, make_splits
from noisy_student.data.idx import IdxWriter, idx_bytes, map_idx, read_idx
from noisy_student.data.layout import LABELS, read_layout, write_layout


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


def test_digits_keep_the_bytes_data_dvc_records(tmp_path: Path) -> None:
    """data.dvc hashes these three files; a layout change must not touch them."""
    assert digest(fetch("digits", tmp_path)) == {
        "classes.json": "7a2c5729952da00241995b785f2155c5",
        "images-idx3-ubyte": "b9d1d1ec825aa698a1c345b429230d39",
        "labels-idx1-ubyte": "497796a0698e25d3920a9422b635bf34",
    }


def test_idx_int32_and_streamed_writes(tmp_path: Path) -> None:
    labels = np.array([3, -1, 300], dtype=np.int32)
    (tmp_path / "l").write_bytes(idx_bytes(labels))
    assert read_idx(tmp_path / "l").tolist() == [3, -1, 300]
    rows = np.arange(5 * 2 * 3, dtype=np.uint8).reshape(5, 2, 3)
    with IdxWriter(tmp_path / "x") as writer:
        writer.append(rows[:2])
        writer.append(rows[2:])
        with pytest.raises(ValueError, match="rows of shape"):
            writer.append(np.zeros((1, 3, 2), np.uint8))
    assert (tmp_path / "x").read_bytes() == idx_bytes(rows)
    mapped = map_idx(tmp_path / "x")
    assert isinstance(mapped, np.memmap) and mapped.tolist() == rows.tolist()


def test_layout_round_trip_with_partitions(tmp_path: Path) -> None:
    rgb = np.arange(4 * 3 * 2 * 2, dtype=np.uint8).reshape(4, 3, 2, 2)
    batches = [
        Batch("train", rgb[:2], np.array([0, 1])),
        Batch("unlabeled", rgb[2:], np.array([-1, -1]), np.array([1, -1]), (("z.png", "bad"),)),
    ]
    folder = write_layout(tmp_path / "s", ["a", "b"], batches)
    assert read_idx(folder / LABELS).dtype == np.dtype(">i4")  # -1 needs a signed type
    data = read_layout(folder)
    np.testing.assert_array_equal(data.images, rgb)
    assert data.labels.tolist() == [0, 1, -1, -1] and data.labels.dtype == np.int64
    assert data.partition.tolist() == ["train", "train", "unlabeled", "unlabeled"]
    assert data.hidden_labels.tolist() == [-1, -1, 1, -1]
    assert data.skipped == [("z.png", "bad")]


def test_layout_refuses_inconsistent_batches(tmp_path: Path) -> None:
    gray = np.zeros((2, 1, 4, 4), np.uint8)
    with pytest.raises(ValueError, match="rows of shape"):
        write_layout(
            tmp_path / "s",
            ["a"],
            [Batch("train", gray, [0, 0]), Batch("test", gray[:, :, :2], [0, 0])],
        )
    with pytest.raises(ValueError, match="needs a label"):
        write_layout(tmp_path / "s", ["a"], [Batch("test", gray, np.array([0, -1]))])
    with pytest.raises(ValueError, match="must have label -1"):
        write_layout(tmp_path / "s", ["a"], [Batch("unlabeled", gray, np.array([0, -1]))])
    with pytest.raises(ValueError, match="no readable image"):
        write_layout(tmp_path / "s", ["a"], [Batch("train", gray[:0], np.array([], int))])
    assert list(tmp_path.iterdir()) == []


def test_imageset_defaults_to_all_train() -> None:
    data = ImageSet(np.zeros((3, 1, 2, 2), np.uint8), np.array([0, 1, 0]), ["a", "b"])
    assert data.partition.tolist() == ["train"] * 3 and data.hidden_labels.tolist() == [-1] * 3
    with pytest.raises(ValueError, match="unknown partitions"):
        ImageSet(data.images, data.labels, data.classes, np.array(["train", "dev", "test"]))
    with pytest.raises(ValueError, match="labels must be -1 or 0..1"):
        ImageSet(data.images, np.array([0, 2, 0]), data.classes)


PARTITIONED = np.array(["train"] * 30 + ["test"] * 6 + ["unlabeled"] * 4)


def partitioned_labels() -> tuple[np.ndarray, np.ndarray]:
    labels = np.concatenate([np.repeat(np.arange(3), 10), np.arange(6) % 3, [-1] * 4])
    hidden = np.array([-1] * 36 + [2, -1, 0, 1])
    return labels, hidden


def test_splits_take_test_from_the_test_partition() -> None:
    labels, hidden = partitioned_labels()
    splits = make_splits(labels, 2, 3, 99, seed=1, partition=PARTITIONED, hidden_labels=hidden)
    assert {k: len(v) for k, v in splits.items()} == {
        "labeled": 6,
        "unlabeled": 15 + 4,
        "val": 9,
        "test": 6,
    }
    assert splits["test"]["image_id"].tolist() == list(range(30, 36))
    ids = [set(frame["image_id"]) for frame in splits.values()]
    assert sum(map(len, ids)) == 40 and set().union(*ids) == set(range(40))
    assert set(splits["labeled"]["image_id"]) | set(splits["val"]["image_id"]) < set(range(30))
    pool = splits["unlabeled"].set_index("image_id")["hidden_label"]
    assert pool.loc[[36, 37, 38, 39]].tolist() == [2, -1, 0, 1]
    train_pool = pool[pool.index < 30]
    assert (train_pool.to_numpy() == labels[train_pool.index]).all()
    again = make_splits(labels, 2, 3, 99, seed=1, partition=PARTITIONED, hidden_labels=hidden)
    assert all(splits[k].equals(again[k]) for k in splits)


def test_splits_take_val_from_the_val_partition_and_may_use_all_train() -> None:
    partition = np.array(["train"] * 6 + ["val"] * 3 + ["unlabeled"] * 2)
    labels = np.array([0, 0, 1, 1, 2, 2, 0, 1, 2, -1, -1])
    splits = make_splits(labels, 1, 5, 1, seed=0, partition=partition)
    assert splits["val"]["image_id"].tolist() == [6, 7, 8]
    assert len(splits["labeled"]) == 3 and len(splits["test"]) == 3
    assert splits["unlabeled"]["image_id"].tolist() == [9, 10]  # the train images all used
    with pytest.raises(ValueError, match="class 0 has 2 images in the train partition"):
        make_splits(labels, 2, 5, 1, seed=0, partition=partition)
    with pytest.raises(ValueError, match="class 'ant' has 2 images in the train partition"):
        make_splits(labels, 2, 5, 1, seed=0, partition=partition, class_names=["ant", "b", "c"])


def test_splits_without_a_budget_label_every_train_image() -> None:
    """``labeled_per_class=None``: a user's labels are all used; val and test are drawn
    first where the source has no such partition, and none joins the pool."""
    partition = np.array(["train"] * 12 + ["unlabeled"] * 2)
    labels = np.array([0] * 6 + [1] * 6 + [-1, -1])
    splits = make_splits(labels, None, 1, 2, seed=0, partition=partition)
    assert (len(splits["labeled"]), len(splits["val"]), len(splits["test"])) == (6, 2, 4)
    assert splits["unlabeled"]["image_id"].tolist() == [12, 13]


def test_splits_refuse_a_test_class_with_no_train_image() -> None:
    partition = np.array(["train"] * 4 + ["test"] * 2)
    with pytest.raises(ValueError, match=r"test partition has classes \[2\]"):
        make_splits(np.array([0, 0, 1, 1, 1, 2]), 1, 1, 1, seed=0, partition=partition)
