"""Broken or hostile source files: a truncated or corrupt Fashion-MNIST ``.gz`` is named with
what is wrong; an ImageFolder symlink leading outside the tree is refused and listed in
``skipped.json`` unless ``data.follow_symlinks`` says to follow it; a dangling one is listed."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from noisy_student import cli
from noisy_student.config import Config
from noisy_student.data import fetch, load_images
from tests.test_sources import write_fashion


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda data: data[: len(data) // 2], "truncated gzip file"),
        (lambda data: data[:20] + bytes(b ^ 0xFF for b in data[20:]), "corrupt gzip file"),
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
    }
    assert "outside the image folder: refused" in reasons["labeled/cat/outside.png"]
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
    assert [path for path, _ in data.skipped] == ["unlabeled/dangling.png"]
    assert data.partition.tolist() == ["train"] * 5 + ["unlabeled"] * 3
    pixels = data.images[:, 0, 0, 0].tolist()
    assert 7 in pixels and 9 in pixels
    np.testing.assert_array_equal(np.sort(data.labels[:5]), [0, 0, 0, 1, 1])
