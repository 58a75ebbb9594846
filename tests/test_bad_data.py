"""Broken or hostile source files: a truncated or corrupt Fashion-MNIST ``.gz`` is named with
what is wrong; an ImageFolder symlink leading outside the tree is refused and listed in
``skipped.json`` unless ``data.follow_symlinks`` says to follow it; a dangling one is listed."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import yaml
from PIL import Image

from noisy_student import cli
from noisy_student.config import Config
from noisy_student.data import fetch, load_images
from noisy_student.data.idx import MAX_INFLATED_BYTES, idx_bytes, read_idx
from noisy_student.data.layout import PARTITION
from noisy_student.data.sources import MAX_CIFAR_BATCH_BYTES
from tests.test_preflight import params, refused
from tests.test_sources import write_cifar, write_fashion, write_stl10, write_svhn


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda data: data[: len(data) // 2], "truncated gzip file"),
        # The flipped bytes inflate to a header of absurd dimensions: refused as corrupt.
        (lambda data: data[:20] + bytes(b ^ 0xFF for b in data[20:]), "corrupt"),
        (lambda data: b"plain text, not gzip", "corrupt gzip file"),
    ],
    ids=["truncated", "corrupt", "not-gzip"],
)
def test_a_broken_fashion_mnist_gz_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage, problem: str
) -> None:
    write_fashion(tmp_path / "src")
    broken = tmp_path / "src" / "train-images-idx3-ubyte.gz"
    broken.write_bytes(damage(broken.read_bytes()))
    tree = Config().model_dump(mode="json")
    tree["data"].update(source="fashion_mnist", directory=str(tmp_path / "src"))
    tree["data"]["root"] = str(tmp_path / "data")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tree))
    assert cli.main(["--params", str(tmp_path / "params.yaml"), "data", "fetch"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert str(broken) in line and problem in line
    assert not (tmp_path / "data" / "fashion_mnist").exists()


def fetch_fashion_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """`data fetch` of the Fashion-MNIST files in ``tmp_path/src``: exit 2, one line."""
    tree = Config().model_dump(mode="json")
    tree["data"].update(source="fashion_mnist", directory=str(tmp_path / "src"))
    tree["data"]["root"] = str(tmp_path / "data")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tree))
    assert cli.main(["--params", str(tmp_path / "params.yaml"), "data", "fetch"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert not (tmp_path / "data" / "fashion_mnist").exists()
    return line


def test_a_gz_declaring_gigabytes_is_refused_from_its_header(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_fashion(tmp_path / "src")
    header = struct.pack(">HBB3I", 0, 0x08, 3, 10**6, 1024, 1024)  # 10^12 bytes
    bomb = tmp_path / "src" / "train-images-idx3-ubyte.gz"
    bomb.write_bytes(gzip.compress(header + bytes(4096)))
    line = fetch_fashion_fails(tmp_path, capsys)
    assert str(bomb) in line and "declares a 1000000x1024x1024 array" in line
    assert f"more than the {MAX_INFLATED_BYTES}" in line


def test_a_gz_inflating_past_its_header_is_refused_in_bounded_memory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A header of 20 images followed by 64 MiB of zeros (64 KiB compressed): reading stops
    one byte past what the header declares, so memory stays far below the 64 MiB."""
    write_fashion(tmp_path / "src")
    bomb = tmp_path / "src" / "train-images-idx3-ubyte.gz"
    declared = idx_bytes(np.zeros((20, 28, 28), np.uint8))
    bomb.write_bytes(gzip.compress(declared + bytes(64 * 1024**2), compresslevel=1))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="inflates to more than the 15680 bytes"):
            read_idx(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024**2
    assert str(bomb) in fetch_fashion_fails(tmp_path, capsys)


def test_binary_sources_are_size_checked_before_reading(tmp_path: Path) -> None:
    """A CIFAR batch larger than any published one, an SVHN file declaring float pixels or
    more labels than images, STL-10 labels that do not match the images: each refused from
    its size or header, naming the file, before its data is read (the files are sparse)."""
    write_cifar(tmp_path / "cifar")
    batch = tmp_path / "cifar" / "cifar-10-batches-py" / "data_batch_2"
    with open(batch, "r+b") as fh:
        fh.truncate(MAX_CIFAR_BATCH_BYTES + 1)
    with pytest.raises(ValueError, match=f"{batch}: .* at most {MAX_CIFAR_BATCH_BYTES}"):
        fetch("cifar10", tmp_path / "data", directory=tmp_path / "cifar")

    write_svhn(tmp_path / "svhn")
    train = tmp_path / "svhn" / "train_32x32.mat"
    for planted in (
        {"X": np.zeros((32, 32, 3, 2)), "y": np.ones((2, 1))},  # float64 pixels: 8x the memory
        {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((9, 1))},
    ):
        scipy.io.savemat(train, planted)
        with pytest.raises(ValueError, match=f"{train}: declares X"):
            fetch("svhn", tmp_path / "data", directory=tmp_path / "svhn")

    write_stl10(tmp_path / "stl")
    labels = tmp_path / "stl" / "stl10_binary" / "train_y.bin"
    with open(labels, "r+b") as fh:
        fh.truncate(64 * 1024**2)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=f"5 train images, {64 * 1024**2} labels"):
            fetch("stl10", tmp_path / "data", directory=tmp_path / "stl")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024**2
    assert not (tmp_path / "data" / "stl10").exists()


def image(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, value, value)).save(path)
    return path


@pytest.fixture
def linked_tree(tmp_path: Path) -> Path:
    """A tree whose files are real images, plus: a link to an image outside the tree, a
    link to a folder outside it, a dangling link, a link inside the tree, a link loop."""
    outside = tmp_path / "elsewhere"
    image(outside / "secret.png", 7)
    image(outside / "folder" / "more.png", 9)
    root = tmp_path / "photos"
    for cls in ("cat", "dog"):
        for i in range(2):
            image(root / "labeled" / cls / f"{i}.png", 40 * i + (cls == "dog") * 100)
    image(root / "unlabeled" / "u.png", 200)
    os.symlink(outside / "secret.png", root / "labeled" / "cat" / "outside.png")
    os.symlink(outside / "folder", root / "unlabeled" / "outside_dir")
    os.symlink(Path("gone.png"), root / "unlabeled" / "dangling.png")
    os.symlink(Path("..") / "labeled" / "cat" / "0.png", root / "unlabeled" / "inside.png")
    os.symlink(Path("."), root / "unlabeled" / "loop")
    return root


def test_links_leading_outside_the_tree_are_refused_and_listed(
    tmp_path: Path, linked_tree: Path
) -> None:
    fetch("imagefolder", tmp_path / "data", directory=linked_tree, image_size=8)
    data = load_images("imagefolder", tmp_path / "data")
    reasons = dict(data.skipped)
    assert set(reasons) == {
        "labeled/cat/outside.png",
        "unlabeled/outside_dir",
        "unlabeled/dangling.png",
        "unlabeled/loop",
    }
    assert "outside the image folder: refused" in reasons["labeled/cat/outside.png"]
    assert reasons["unlabeled/loop"] == "symlink to ., a folder already read: skipped"
    assert "data.follow_symlinks: true" in reasons["unlabeled/outside_dir"]
    assert reasons["unlabeled/dangling.png"] == "dangling symlink (to gone.png)"
    # 4 labeled; the pool: u.png and the link inside the tree (the loop walked once).
    assert data.partition.tolist() == ["train"] * 4 + ["unlabeled"] * 2
    assert 7 not in data.images[:, 0, 0, 0] and 9 not in data.images[:, 0, 0, 0]
    skipped = (tmp_path / "data" / "imagefolder" / "skipped.json").read_text()
    assert "outside.png" in skipped and "dangling.png" in skipped


def test_follow_symlinks_follows_them(tmp_path: Path, linked_tree: Path) -> None:
    fetch(
        "imagefolder",
        tmp_path / "data",
        directory=linked_tree,
        image_size=8,
        follow_symlinks=True,
    )
    data = load_images("imagefolder", tmp_path / "data")
    assert [path for path, _ in data.skipped] == ["unlabeled/dangling.png", "unlabeled/loop"]
    assert data.partition.tolist() == ["train"] * 5 + ["unlabeled"] * 3
    pixels = data.images[:, 0, 0, 0].tolist()
    assert 7 in pixels and 9 in pixels
    np.testing.assert_array_equal(np.sort(data.labels[:5]), [0, 0, 0, 1, 1])


def test_a_class_folder_linked_to_its_sibling_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """labeled/dog -> cat would label cat's images twice (or, walked once, leave dog
    empty): refused naming both; a folder inside a class linking to one already read is
    listed as skipped."""
    root = tmp_path / "photos"
    image(root / "labeled" / "cat" / "0.png", 10)
    image(root / "labeled" / "dog" / "0.png", 20)
    image(root / "unlabeled" / "u.png", 30)
    os.symlink(Path("..") / "cat", root / "labeled" / "dog" / "again")
    fetch("imagefolder", tmp_path / "data", directory=root, image_size=8)
    reasons = dict(load_images("imagefolder", tmp_path / "data").skipped)
    assert reasons == {"labeled/dog/again": "symlink to ../cat, a folder already read: skipped"}

    (root / "labeled" / "bird").symlink_to("cat")
    tree = Config().model_dump(mode="json")
    tree["data"].update(source="imagefolder", directory=str(root), image_size=8)
    tree["data"]["root"] = str(tmp_path / "data")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tree))
    assert cli.main(["--params", str(tmp_path / "params.yaml"), "data", "fetch"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert f"class folder {root / 'labeled' / 'bird'} is a symlink to cat" in line
    assert "the folder of class 'cat'" in line


def test_a_materialized_layout_that_is_not_one_is_named(
    tmp_path: Path, digits_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """classes.json a mapping or not JSON, a partition code outside PARTITIONS: each one
    line naming the file and what it must hold, not a traceback or a label error."""
    folder = tmp_path / "data" / "digits"
    shutil.copytree(digits_root / "digits", folder)
    path = params(tmp_path, tmp_path / "data")
    classes = folder / "classes.json"
    classes.write_text(json.dumps({str(i): f"digit {i}" for i in range(10)}))
    refused(capsys, ["--params", str(path), "validate"], str(classes), "a JSON list of class names")
    classes.write_text("[0, 1,")
    refused(capsys, ["--params", str(path), "validate"], str(classes), "not JSON")
    classes.write_text(json.dumps([str(i) for i in range(10)]))
    codes = np.zeros(len(load_images("digits", tmp_path / "data")), np.uint8)
    codes[5] = 7
    (folder / PARTITION).write_bytes(idx_bytes(codes))
    refused(
        capsys,
        ["--params", str(path), "validate"],
        str(folder / PARTITION),
        "unknown partition code 7; allowed: 0 (train), 1 (val), 2 (test), 3 (unlabeled)",
    )


def test_data_fetch_names_a_cifar_batch_it_refuses_to_unpickle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_cifar(tmp_path / "src")
    batch = tmp_path / "src" / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({b"data": print}))
    tree = Config().model_dump(mode="json")
    tree["data"].update(source="cifar10", directory=str(tmp_path / "src"))
    tree["data"]["root"] = str(tmp_path / "data")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tree))
    assert cli.main(["--params", str(tmp_path / "params.yaml"), "data", "fetch"]) == 2
    err = capsys.readouterr().err
    [line] = err.strip().splitlines()
    assert f"{batch}: not a CIFAR batch" in line and "builtins.print is not allowed" in line
