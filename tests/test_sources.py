"""Every source read from small files written in its real on-disk format, then materialized
by ``fetch`` and read back by ``load_images``."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import pickle
import socket
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from noisy_student.data import fetch, load_images, make_splits, source_options
from noisy_student.data import sources as sources_module
from noisy_student.data.idx import idx_bytes
from noisy_student.data.imagefolder import decode_image

FASHION_REAL = Path("/usr/share/datasets/fashion-mnist")


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def pixels(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture
def no_integrity_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's dataset classes insist on the published checksums; let them read the
    tiny files so our reader can be compared with theirs."""
    from torchvision.datasets import cifar, stl10, svhn

    for module in (cifar, stl10, svhn):
        monkeypatch.setattr(module, "check_integrity", lambda *args, **kwargs: True)


# --- Fashion-MNIST ---------------------------------------------------------------------


def write_fashion(folder: Path, n_train: int = 20, n_test: int = 6) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": pixels((n_train, 28, 28), 1),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": pixels((n_test, 28, 28), 2),
        "t10k-labels-idx1-ubyte": (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }
    for name, array in arrays.items():
        (folder / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array), mtime=0))
    return arrays


def test_fashion_mnist_from_idx_gz(tmp_path: Path) -> None:
    arrays = write_fashion(tmp_path / "src")
    out = fetch("fashion_mnist", tmp_path / "data", directory=tmp_path / "src")
    data = load_images("fashion_mnist", tmp_path / "data")
    assert data.images.shape == (26, 1, 28, 28) and data.images.dtype == np.uint8
    assert data.partition.tolist() == ["train"] * 20 + ["test"] * 6
    np.testing.assert_array_equal(data.images[3, 0], arrays["train-images-idx3-ubyte"][3])
    np.testing.assert_array_equal(data.images[21, 0], arrays["t10k-images-idx3-ubyte"][1])
    np.testing.assert_array_equal(data.labels[20:], arrays["t10k-labels-idx1-ubyte"])
    assert data.classes[0] == "T-shirt/top" and data.classes[9] == "Ankle boot"
    assert (data.hidden_labels == -1).all() and data.skipped == []
    assert sorted(p.name for p in out.iterdir()) == [
        "classes.json",
        "images-idx3-ubyte",
        "labels-idx1-ubyte",
        "partition-idx1-ubyte",
    ]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_fashion_mnist_offline_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import FashionMNIST

    monkeypatch.setattr(FashionMNIST, "mirrors", [f"http://127.0.0.1:{closed_port()}/"])
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="cannot be reached.*dataset-fashion-mnist"):
        fetch("fashion_mnist", tmp_path, directory=tmp_path / "none", cache=tmp_path / "cache")
    assert time.monotonic() - start < 5
    assert not (tmp_path / "fashion_mnist").exists()


def test_reachability_check_is_bounded() -> None:
    """A server that accepts the connection but never answers costs the timeout, no more."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        start = time.monotonic()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/file.gz"
        assert not sources_module._reachable([url], timeout=0.5)
    assert time.monotonic() - start < 2


@pytest.fixture
def fashion_server(tmp_path: Path) -> Iterator[str]:
    """A local HTTP mirror serving tiny Fashion-MNIST files, for torchvision's downloader."""
    write_fashion(tmp_path / "mirror")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = partial(Quiet, directory=str(tmp_path / "mirror"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_fashion_mnist_downloads_when_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fashion_server: str
) -> None:
    from torchvision.datasets import FashionMNIST

    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    mirror = tmp_path / "mirror"
    resources = [
        (p.name, hashlib.md5(p.read_bytes()).hexdigest()) for p in sorted(mirror.iterdir())
    ]
    monkeypatch.setattr(FashionMNIST, "mirrors", [fashion_server])
    monkeypatch.setattr(FashionMNIST, "resources", resources)
    cache = tmp_path / "cache"
    fetch("fashion_mnist", tmp_path / "data", directory=tmp_path / "none", cache=cache)
    assert (cache / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    data = load_images("fashion_mnist", tmp_path / "data")
    assert len(data) == 26 and (data.partition == "test").sum() == 6


@pytest.mark.skipif(not FASHION_REAL.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist(tmp_path: Path) -> None:
    start = time.monotonic()
    fetch("fashion_mnist", tmp_path)
    seconds = time.monotonic() - start
    data = load_images("fashion_mnist", tmp_path)
    assert data.images.shape == (70000, 1, 28, 28) and isinstance(data.images, np.memmap)
    train, test = data.partition == "train", data.partition == "test"
    assert train.sum() == 60000 and test.sum() == 10000 and train[:60000].all()
    assert len(data.classes) == 10 and data.classes[9] == "Ankle boot"
    assert np.bincount(data.labels[train]).tolist() == [6000] * 10
    assert np.bincount(data.labels[test]).tolist() == [1000] * 10
    assert data.labels[:5].tolist() == [9, 0, 0, 3, 0]  # the published first labels
    assert data.labels[60000:60005].tolist() == [9, 2, 1, 1, 6]
    splits = make_splits(
        data.labels, 10, 20, 40, seed=0, partition=data.partition, hidden_labels=data.hidden_labels
    )
    assert len(splits["test"]) == 10000 and len(splits["unlabeled"]) == 60000 - 300
    print(f"fetched real Fashion-MNIST in {seconds:.2f}s")
    assert seconds < 60


# --- CIFAR-10 ----------------------------------------------------------------------------

CIFAR_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def write_cifar(directory: Path) -> dict[str, tuple[np.ndarray, list[int]]]:
    """``cifar-10-batches-py`` as the published pickles load with ``encoding="bytes"``."""
    folder = directory / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        n = 3 if name == "test_batch" else 2
        data, labels = pixels((n, 3072), 10 + i), [(i + j) % 10 for j in range(n)]
        entry = {
            b"batch_label": f"batch {i}".encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img_{i}_{j}.png".encode() for j in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        batches[name] = (data, labels)
    meta = {
        b"num_cases_per_batch": 2,
        b"label_names": [c.encode() for c in CIFAR_CLASSES],
        b"num_vis": 3072,
    }
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return batches


def test_cifar10(tmp_path: Path) -> None:
    batches = write_cifar(tmp_path / "src")
    fetch("cifar10", tmp_path / "data", directory=tmp_path / "src")
    data = load_images("cifar10", tmp_path / "data")
    assert data.images.shape == (13, 3, 32, 32) and data.classes == CIFAR_CLASSES
    assert data.partition.tolist() == ["train"] * 10 + ["test"] * 3
    test_data, test_labels = batches["test_batch"]
    assert data.labels[10:].tolist() == test_labels
    # A row is 1024 red, 1024 green, then 1024 blue values, each 32 x 32 row-major.
    c, y, x = 2, 5, 7
    assert data.images[11, c, y, x] == test_data[1, c * 1024 + y * 32 + x]
    np.testing.assert_array_equal(data.images[2].reshape(-1), batches["data_batch_2"][0][0])


def test_cifar_refuses_code_in_a_pickle(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": print}))
    with pytest.raises(ValueError, match="data_batch_3: not a CIFAR batch .*builtins.print is not"):
        fetch("cifar10", tmp_path / "data", directory=folder)


def test_cifar_names_missing_files(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="lacks data_batch_4"):
        fetch("cifar10", tmp_path / "data", directory=tmp_path)


# --- SVHN --------------------------------------------------------------------------------


def write_svhn(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``.mat`` files as published: X is 32 x 32 x 3 x N, y is N x 1 with 10 for digit 0."""
    folder.mkdir(parents=True)
    files = {}
    for i, (name, n) in enumerate([("train", 7), ("test", 4), ("extra", 5)]):
        x = pixels((32, 32, 3, n), 20 + i)
        y = ((np.arange(n) + 7) % 10 + 1).astype(np.uint8).reshape(n, 1)  # 8, 9, 10, 1, ...
        scipy.io.savemat(folder / f"{name}_32x32.mat", {"X": x, "y": y})
        files[name] = (x, y)
    return files


def test_svhn_matches_torchvision(tmp_path: Path, no_integrity_check: None) -> None:
    from torchvision.datasets import SVHN

    files = write_svhn(tmp_path / "src")
    fetch("svhn", tmp_path / "data", directory=tmp_path / "src")
    data = load_images("svhn", tmp_path / "data")
    assert data.images.shape == (16, 3, 32, 32) and data.classes == [str(d) for d in range(10)]
    assert data.partition.tolist() == ["train"] * 7 + ["test"] * 4 + ["unlabeled"] * 5
    for split, rows in (("train", slice(0, 7)), ("test", slice(7, 11))):
        theirs = SVHN(str(tmp_path / "src"), split=split)
        np.testing.assert_array_equal(data.images[rows], theirs.data)
        np.testing.assert_array_equal(data.labels[rows], theirs.labels)
    extra = SVHN(str(tmp_path / "src"), split="extra")
    np.testing.assert_array_equal(data.images[11:], extra.data)
    assert (data.labels[11:] == -1).all() and (data.hidden_labels[:11] == -1).all()
    np.testing.assert_array_equal(data.hidden_labels[11:], extra.labels)
    assert data.labels[2] == 0 and files["train"][1][2, 0] == 10  # label 10 is the digit 0
    x = files["train"][0]
    assert data.images[2, 1, 3, 4] == x[3, 4, 1, 2]  # X[row, column, channel, image]


def test_svhn_without_extra(tmp_path: Path) -> None:
    write_svhn(tmp_path / "src")
    (tmp_path / "src" / "extra_32x32.mat").unlink()
    with pytest.raises(FileNotFoundError, match="extra_32x32.mat"):
        fetch("svhn", tmp_path / "data", directory=tmp_path / "src")
    fetch("svhn", tmp_path / "data", directory=tmp_path / "src", extra=False)
    data = load_images("svhn", tmp_path / "data")
    assert len(data) == 11 and "unlabeled" not in data.partition


# --- STL-10 ------------------------------------------------------------------------------

STL_CLASSES = [
    "airplane",
    "bird",
    "car",
    "cat",
    "deer",
    "dog",
    "horse",
    "monkey",
    "ship",
    "truck",
]


def write_stl10(directory: Path) -> dict[str, np.ndarray]:
    """``stl10_binary/``: each image stored channel by channel, each channel column-major."""
    folder = directory / "stl10_binary"
    folder.mkdir(parents=True)
    images = {}
    for i, (name, n) in enumerate([("train", 5), ("test", 3), ("unlabeled", 4)]):
        nchw = pixels((n, 3, 96, 96), 30 + i)
        (folder / f"{name}_X.bin").write_bytes(nchw.transpose(0, 1, 3, 2).tobytes())
        if name != "unlabeled":
            (folder / f"{name}_y.bin").write_bytes((np.arange(n) % 10 + 1).astype(np.uint8))
        images[name] = nchw
    (folder / "class_names.txt").write_text("\n".join(STL_CLASSES) + "\n")
    return images


def test_stl10_matches_torchvision(tmp_path: Path, no_integrity_check: None) -> None:
    from torchvision.datasets import STL10

    images = write_stl10(tmp_path / "src")
    fetch("stl10", tmp_path / "data", directory=tmp_path / "src")
    data = load_images("stl10", tmp_path / "data")
    assert data.images.shape == (12, 3, 96, 96) and data.classes == STL_CLASSES
    assert data.partition.tolist() == ["train"] * 5 + ["test"] * 3 + ["unlabeled"] * 4
    np.testing.assert_array_equal(data.images[:5], images["train"])
    np.testing.assert_array_equal(data.images[8:], images["unlabeled"])
    assert data.labels[:5].tolist() == [0, 1, 2, 3, 4] and (data.labels[8:] == -1).all()
    for split, rows in (("train", slice(0, 5)), ("test", slice(5, 8)), ("unlabeled", slice(8, 12))):
        theirs = STL10(str(tmp_path / "src"), split=split)
        np.testing.assert_array_equal(data.images[rows], theirs.data)
        if split != "unlabeled":
            np.testing.assert_array_equal(data.labels[rows], theirs.labels)
    assert (data.hidden_labels == -1).all()


def test_streaming_in_chunks_gives_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_stl10(tmp_path / "src")
    whole = digest(fetch("stl10", tmp_path / "a", directory=tmp_path / "src"))
    monkeypatch.setattr(sources_module, "CHUNK", 2)
    assert digest(fetch("stl10", tmp_path / "b", directory=tmp_path / "src")) == whole


def test_load_images_maps_the_pool_copy_on_write(tmp_path: Path) -> None:
    write_stl10(tmp_path / "src")
    out = fetch("stl10", tmp_path, directory=tmp_path / "src")
    before = digest(out)
    data = load_images("stl10", tmp_path)
    assert isinstance(data.images, np.memmap) and data.images.flags.writeable
    data.images[0] = 0  # torch.from_numpy needs a writable array; the file must not change
    data.images.flush()
    assert digest(out) == before


# --- ImageFolder -------------------------------------------------------------------------


def save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def folder_tree(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A user's tree: two classes, a nested unlabeled pool, val and test, and bad files."""
    root = tmp_path / "mine"
    known = {
        "labeled/cat/a.png": pixels((32, 32, 3), 40),
        "labeled/cat/b.png": pixels((32, 32, 3), 41),
        "labeled/dog/c.png": pixels((32, 32, 3), 42),
        "labeled/dog/sub/d.png": pixels((32, 32), 43),  # grayscale: becomes 3 equal channels
        "unlabeled/x/y/e.png": pixels((32, 32, 3), 44),
        "unlabeled/f.png": pixels((64, 48, 3), 45),  # resized to 32 x 32
        "val/dog/g.png": pixels((32, 32, 3), 46),
        "test/cat/h.png": pixels((32, 32, 3), 47),
    }
    for name, array in known.items():
        save_png(root / name, array)
    Image.fromarray(pixels((32, 32, 3), 48)).save(root / "labeled/cat/j.jpg", quality=95)
    whole = (root / "labeled/cat/a.png").read_bytes()
    (root / "labeled/dog/broken.png").write_bytes(whole[: len(whole) // 2])
    (root / "labeled/dog/notes.jpg").write_text("not an image")
    (root / "unlabeled/readme.txt").write_text("a note")
    (root / "unlabeled/.DS_Store").write_bytes(b"\0\1")
    (root / "test/stray.png").write_bytes(whole)
    return root, known


def test_imagefolder(tmp_path: Path, folder_tree: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, known = folder_tree
    fetch("imagefolder", tmp_path / "data", directory=root)
    data = load_images("imagefolder", tmp_path / "data")
    assert data.classes == ["cat", "dog"]
    assert data.images.shape == (9, 3, 32, 32) and data.images.dtype == np.uint8
    # Sorted walk: labeled (cat a, b, j; dog c, sub/d), val, test, then the unlabeled pool.
    assert data.partition.tolist() == ["train"] * 5 + ["val", "test"] + ["unlabeled"] * 2
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1, 0, -1, -1]
    np.testing.assert_array_equal(data.images[0], known["labeled/cat/a.png"].transpose(2, 0, 1))
    np.testing.assert_array_equal(data.images[4], np.stack([known["labeled/dog/sub/d.png"]] * 3))
    resized = Image.fromarray(known["unlabeled/f.png"]).resize((32, 32), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(data.images[7], np.asarray(resized).transpose(2, 0, 1))
    np.testing.assert_array_equal(data.images[8], known["unlabeled/x/y/e.png"].transpose(2, 0, 1))
    reasons = dict(data.skipped)
    assert set(reasons) == {
        "labeled/dog/broken.png",
        "labeled/dog/notes.jpg",
        "unlabeled/readme.txt",
        "test/stray.png",
    }
    assert reasons["labeled/dog/broken.png"].startswith("OSError")
    assert reasons["labeled/dog/notes.jpg"].startswith("UnidentifiedImageError")
    assert str(root) not in reasons["labeled/dog/notes.jpg"]  # no machine-specific path
    assert reasons["unlabeled/readme.txt"].startswith("not an image file")
    assert reasons["test/stray.png"] == "not inside a class folder"


def test_imagefolder_grayscale_and_size(
    tmp_path: Path, folder_tree: tuple[Path, dict[str, np.ndarray]]
) -> None:
    root, known = folder_tree
    fetch("imagefolder", tmp_path, directory=root, channels="L", image_size=16)
    data = load_images("imagefolder", tmp_path)
    assert data.images.shape == (9, 1, 16, 16)
    gray = Image.fromarray(known["labeled/cat/a.png"]).convert("L")
    expected = gray.resize((16, 16), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(data.images[0, 0], np.asarray(expected))


def save_shape_in_alpha(path: Path, mode: str, side: int = 8) -> None:
    """An icon drawn only in its transparency: black everywhere, opaque in the middle half,
    transparent around it (a viewer shows a black square on white)."""
    alpha = np.zeros((side, side), np.uint8)
    alpha[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":  # palette index 0 transparent, 1 black
        image = Image.fromarray((alpha > 0).astype(np.uint8), "P")
        image.putpalette([255, 0, 0, 0, 0, 0])
        image.save(path, transparency=0)
    else:
        black = np.zeros((side, side, len(mode) - 1), np.uint8)
        Image.fromarray(np.dstack([black, alpha]).squeeze(), mode).save(path)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
@pytest.mark.parametrize("channels", ["L", "RGB"])
def test_a_shape_drawn_in_transparency_is_composited_on_white(
    tmp_path: Path, mode: str, channels: str
) -> None:
    save_shape_in_alpha(tmp_path / "icon.png", mode)
    expected = np.full((8, 8), 255, np.uint8)
    expected[2:6, 2:6] = 0
    decoded = decode_image(tmp_path / "icon.png", channels, 8)
    np.testing.assert_array_equal(decoded, np.broadcast_to(expected, (len(channels), 8, 8)))


def test_16_bit_grey_is_scaled_to_8_bits_not_clipped(tmp_path: Path) -> None:
    """A 16-bit grey PNG (PIL mode I;16): level k * 257 is the 8-bit level k, where
    ``convert("L")`` would clip every level above 255 to white."""
    levels = np.arange(256, dtype=np.uint16).reshape(16, 16)
    deep = tmp_path / "mine" / "labeled" / "ramp" / "deep.png"
    save_png(deep, levels * 257)
    save_shape_in_alpha(tmp_path / "mine" / "unlabeled" / "icon.png", "RGBA", 16)
    assert Image.open(deep).mode == "I;16"
    fetch(
        "imagefolder", tmp_path / "data", directory=tmp_path / "mine", channels="L", image_size=16
    )
    data = load_images("imagefolder", tmp_path / "data")
    np.testing.assert_array_equal(data.images[0, 0], levels)
    assert data.images[1, 0, 0, 0] == 255 and data.images[1, 0, 8, 8] == 0  # white around
    np.testing.assert_array_equal(
        decode_image(deep, "RGB", 16), np.broadcast_to(levels, (3, 16, 16))
    )


def test_imagefolder_fetch_is_byte_stable(
    tmp_path: Path, folder_tree: tuple[Path, dict[str, np.ndarray]]
) -> None:
    root, _ = folder_tree
    first = digest(fetch("imagefolder", tmp_path / "a", directory=root))
    assert digest(fetch("imagefolder", tmp_path / "b", directory=root)) == first
    assert digest(fetch("imagefolder", tmp_path / "a", directory=root)) == first
    assert set(first) == {
        "classes.json",
        "images-idx3-ubyte",
        "labels-idx1-ubyte",
        "partition-idx1-ubyte",
        "skipped.json",
    }


def test_imagefolder_empty_class_stops_before_training(
    tmp_path: Path, folder_tree: tuple[Path, dict[str, np.ndarray]]
) -> None:
    root, _ = folder_tree
    before = digest(fetch("imagefolder", tmp_path, directory=root))
    for name in ("c.png", "sub/d.png"):
        (root / "labeled/dog" / name).unlink()
    with pytest.raises(ValueError, match="labeled class.*dog have no readable image"):
        fetch("imagefolder", tmp_path, directory=root)
    assert digest(tmp_path / "imagefolder") == before  # the previous data is left whole
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder


def test_imagefolder_empty_pool_stops_before_training(
    tmp_path: Path, folder_tree: tuple[Path, dict[str, np.ndarray]]
) -> None:
    root, _ = folder_tree
    for name in ("x/y/e.png", "f.png"):
        (root / "unlabeled" / name).unlink()
    with pytest.raises(ValueError, match="unlabeled has no readable image"):
        fetch("imagefolder", tmp_path, directory=root)
    (root / "unlabeled/readme.txt").unlink()
    (root / "unlabeled/.DS_Store").unlink()
    with pytest.raises(ValueError, match="unlabeled has no readable image"):
        fetch("imagefolder", tmp_path, directory=root)


def test_imagefolder_layout_errors(tmp_path: Path) -> None:
    save_png(tmp_path / "labeled/cat/a.png", pixels((8, 8, 3), 0))
    with pytest.raises(FileNotFoundError, match="unlabeled is not a folder"):
        fetch("imagefolder", tmp_path / "data", directory=tmp_path)
    save_png(tmp_path / "unlabeled/b.png", pixels((8, 8, 3), 1))
    save_png(tmp_path / "val/bird/c.png", pixels((8, 8, 3), 2))
    with pytest.raises(ValueError, match="classes not under labeled/: bird"):
        fetch("imagefolder", tmp_path / "data", directory=tmp_path)
    with pytest.raises(ValueError, match="channels must be one of"):
        fetch("imagefolder", tmp_path / "data", directory=tmp_path, channels="CMYK")


# --- fetch -------------------------------------------------------------------------------


def test_fetch_checks_source_and_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown data source 'mnist'"):
        fetch("mnist", tmp_path)
    with pytest.raises(ValueError, match="takes no option image_size; it takes: directory"):
        fetch("cifar10", tmp_path, directory=tmp_path, image_size=32)
    with pytest.raises(ValueError, match="needs directory="):
        fetch("stl10", tmp_path)
    assert source_options("digits") == ()
    assert source_options("imagefolder") == (
        "directory",
        "image_size",
        "channels",
        "follow_symlinks",
    )


def test_splits_use_the_folder_partitions(
    tmp_path: Path, folder_tree: tuple[Path, dict[str, np.ndarray]]
) -> None:
    root, _ = folder_tree
    fetch("imagefolder", tmp_path, directory=root)
    data = load_images("imagefolder", tmp_path)
    splits = make_splits(
        data.labels, 1, 5, 5, seed=0, partition=data.partition, hidden_labels=data.hidden_labels
    )
    assert splits["val"].to_dict("list") == {"image_id": [5], "label": [1]}
    assert splits["test"].to_dict("list") == {"image_id": [6], "label": [0]}
    assert sorted(splits["labeled"]["label"]) == [0, 1]
    pool = splits["unlabeled"]
    assert len(pool) == 5 and pool["image_id"].tolist()[-2:] == [7, 8]
    assert pool["hidden_label"].tolist()[-2:] == [-1, -1]
    assert (pool["hidden_label"][:3] >= 0).all()
