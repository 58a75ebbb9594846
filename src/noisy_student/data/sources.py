"""Image sources. Each one streams its images as :class:`Batch` runs and :func:`fetch` writes
them to the one layout of :mod:`noisy_student.data.layout` under ``<root>/<source>/``, so a
single fast reader serves all and the bytes are reproducible.

The torchvision-layout sources are read directly from their files (torchvision's classes
insist on the published checksums, which a local copy or a subset does not match), exactly
as torchvision decodes them."""

from __future__ import annotations

import inspect
import io
import math
import os
import pickle
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from noisy_student.data.idx import read_idx
from noisy_student.data.imagefolder import imagefolder
from noisy_student.data.layout import Batch, ImageSet, read_layout, write_layout

Stream = tuple[list[str], Iterator[Batch]]

CHUNK = 4096  # images per batch when streaming a large file (110 MB of STL-10 images)
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
REACH_TIMEOUT = 5.0  # seconds to decide that a download server cannot be reached
DOWNLOAD_TIMEOUT = 60.0  # seconds a download may stall before it fails


def _digits() -> Stream:
    """scikit-learn's 1,797 real 8x8 handwritten digits, shipped inside its wheel."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    classes = [str(c) for c in bunch.target_names]
    return classes, iter([Batch("train", images[:, None], bunch.target)])


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "noisy-student"


def _reachable(urls: list[str], timeout: float) -> bool:
    """Whether any of ``urls`` answers a HEAD request with success within ``timeout``
    seconds. A TCP connect alone is not enough (a filtering proxy accepts every one), and
    name resolution, which a socket timeout does not bound, runs in daemon threads."""
    found = threading.Event()

    def probe(url: str) -> None:
        request = urllib.request.Request(url, method="HEAD")
        try:
            with urllib.request.urlopen(request, timeout=timeout):
                found.set()
        except (OSError, ValueError):
            pass

    deadline = time.monotonic() + timeout
    threads = [threading.Thread(target=probe, args=(url,), daemon=True) for url in urls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return found.is_set()


def _fashion_files(folder: Path) -> dict[str, Path] | None:
    """The four IDX files in ``folder``, gzipped or not; None if any is missing."""
    found = {}
    for stem in ("train-images", "train-labels", "t10k-images", "t10k-labels"):
        kind = "idx3" if stem.endswith("images") else "idx1"
        candidates = [folder / f"{stem}-{kind}-ubyte{ext}" for ext in ("", ".gz")]
        present = [path for path in candidates if path.is_file()]
        if not present:
            return None
        found[stem] = present[0]
    return found


def _download_fashion_mnist(cache: Path, directory: Path) -> Path:
    """torchvision's download of Fashion-MNIST into ``cache``, tried only when a mirror
    answers, and with a socket timeout so a stalled transfer fails instead of hanging."""
    from torchvision.datasets import FashionMNIST

    first = FashionMNIST.resources[0][0]
    if not _reachable([mirror + first for mirror in FashionMNIST.mirrors], REACH_TIMEOUT):
        raise FileNotFoundError(
            f"Fashion-MNIST is not in {directory} and its download server "
            f"({', '.join(FashionMNIST.mirrors)}) cannot be reached: install the files "
            "(`apt-get install dataset-fashion-mnist` puts them in "
            f"{FASHION_MNIST_DIR}) or pass directory= a folder holding "
            "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
            "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz"
        )
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:
        return Path(FashionMNIST(str(cache), download=True).raw_folder)
    finally:
        socket.setdefaulttimeout(previous)


def _fashion_mnist(directory: str | Path | None = None, cache: str | Path | None = None) -> Stream:
    """Zalando's Fashion-MNIST from its original IDX files in ``directory``, else downloaded
    by torchvision into ``cache``: 60,000 "train" and 10,000 "test" 28x28 images."""
    folder = Path(directory or FASHION_MNIST_DIR)
    files = _fashion_files(folder)
    if files is None:
        downloaded = _download_fashion_mnist(Path(cache or _cache_dir()), folder)
        files = _fashion_files(downloaded)
        if files is None:
            raise FileNotFoundError(f"{downloaded}: torchvision's download left no IDX files")

    def batches() -> Iterator[Batch]:
        for prefix, partition in (("train", "train"), ("t10k", "test")):
            images = read_idx(files[f"{prefix}-images"])
            labels = read_idx(files[f"{prefix}-labels"])
            if images.ndim != 3 or len(images) != len(labels):
                raise ValueError(
                    f"{files[f'{prefix}-images']}: {images.shape} images for {len(labels)} labels"
                )
            yield Batch(partition, images[:, None], labels)

    return list(FASHION_MNIST_CLASSES), batches()


def _locate(
    directory: str | Path | None, source: str, needed: list[str], base: str | None = None
) -> Path:
    """The folder holding ``needed``: ``directory`` itself or its torchvision subfolder
    ``base``."""
    if directory is None:
        where = f"the folder holding {base}/" if base else f"the folder holding {needed[0]}"
        raise ValueError(f"source {source!r} needs directory= ({where})")
    folder = Path(directory)
    if base and (folder / base).is_dir():
        folder = folder / base
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{source}: {folder} lacks {', '.join(missing)}")
    return folder


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only what a dict of numpy arrays needs, so a file
    that is not one cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


# A published CIFAR batch is a 31 MB pickle; the file is read whole and unpickled from
# memory, so one larger than this (or a pickle declaring more bytes than the file holds)
# cannot make the reader allocate gigabytes.
MAX_CIFAR_BATCH_BYTES = 512 * 1024**2


def _unpickle(path: Path) -> dict[str, Any]:
    """A CIFAR pickle with str keys, whether written by Python 2 (the published files)
    or with bytes keys; a file that is not one is refused in one line naming it."""
    size = path.stat().st_size
    if size > MAX_CIFAR_BATCH_BYTES:
        raise ValueError(
            f"{path}: {size} bytes; a CIFAR batch may hold at most {MAX_CIFAR_BATCH_BYTES}"
        )
    try:
        entry = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError) as err:
        raise ValueError(f"{path}: not a CIFAR batch ({err})") from None
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: not a CIFAR batch (a {type(entry).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}


CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


def _cifar10(directory: str | Path | None = None) -> Stream:
    """CIFAR-10 as torchvision lays it out (``cifar-10-batches-py/``): 50,000 "train" and
    10,000 "test" 32x32 RGB images."""
    needed = [*CIFAR_TRAIN, "test_batch", "batches.meta"]
    folder = _locate(directory, "cifar10", needed, base="cifar-10-batches-py")
    names = _unpickle(folder / "batches.meta")["label_names"]
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]

    def batches() -> Iterator[Batch]:
        for name in [*CIFAR_TRAIN, "test_batch"]:
            entry = _unpickle(folder / name)
            data = np.asarray(entry["data"], dtype=np.uint8)
            labels = np.asarray(entry["labels"], dtype=np.int64)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
                raise ValueError(f"{folder / name}: data {data.shape}, {len(labels)} labels")
            partition = "test" if name == "test_batch" else "train"
            yield Batch(partition, data.reshape(-1, 3, 32, 32), labels)

    return classes, batches()


# SVHN's extra_32x32.mat holds 531,131 images (1.6 GB), loaded whole: a file declaring more
# images than this, or other than uint8 pixels, is refused from its header before loading.
MAX_SVHN_IMAGES = 1_000_000


def _svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A torchvision SVHN ``.mat``: images ``32 x 32 x 3 x N`` and labels 1..10, 10 being
    the digit 0 (torchvision maps it to 0, and so do we). The shapes the file declares are
    checked first (``whosmat`` reads headers only)."""
    from scipy.io import loadmat, whosmat

    declared = {name: (shape, kind) for name, shape, kind in whosmat(path)}
    x_shape, x_kind = declared.get("X", ((), "missing"))
    y_shape, _ = declared.get("y", ((), "missing"))
    if (
        len(x_shape) != 4
        or x_shape[:3] != (32, 32, 3)
        or x_kind != "uint8"
        or not 1 <= x_shape[3] <= MAX_SVHN_IMAGES
        or math.prod(y_shape) != x_shape[3]
    ):
        raise ValueError(
            f"{path}: declares X {x_shape} ({x_kind}) and y {y_shape}; an SVHN file holds "
            f"uint8 X of 32 x 32 x 3 x N and N labels y, N at most {MAX_SVHN_IMAGES}"
        )
    mat = loadmat(path, variable_names=["X", "y"])
    images, labels = mat["X"], mat["y"].astype(np.int64).reshape(-1)
    labels[labels == 10] = 0
    return images, labels


def _svhn(directory: str | Path | None = None, extra: bool = True) -> Stream:
    """SVHN as torchvision lays it out: ``train_32x32.mat`` ("train"), ``test_32x32.mat``
    ("test") and, with ``extra``, ``extra_32x32.mat`` as the "unlabeled" partition whose
    labels are kept only as hidden labels. A file is loaded whole (the extra one is 1.6 GB)
    but written in chunks, so no second copy is made."""
    parts = [("train_32x32.mat", "train"), ("test_32x32.mat", "test")]
    if extra:
        parts.append(("extra_32x32.mat", "unlabeled"))
    folder = _locate(directory, "svhn", [name for name, _ in parts])

    def batches() -> Iterator[Batch]:
        for name, partition in parts:
            images, labels = _svhn_mat(folder / name)
            for start in range(0, len(labels), CHUNK):
                chunk = np.ascontiguousarray(
                    images[..., start : start + CHUNK].transpose(3, 2, 0, 1)
                )
                part = labels[start : start + CHUNK]
                if partition == "unlabeled":
                    yield Batch(partition, chunk, np.full(len(part), -1), hidden_labels=part)
                else:
                    yield Batch(partition, chunk, part)
            del images

    return [str(d) for d in range(10)], batches()


STL_SIZE = 3 * 96 * 96


def _stl_count(path: Path) -> int:
    size = path.stat().st_size
    if size % STL_SIZE:
        raise ValueError(f"{path}: {size} bytes is not a whole number of 3x96x96 images")
    return size // STL_SIZE


def _stl_chunks(path: Path) -> Iterator[np.ndarray]:
    """The images of an STL-10 ``*_X.bin``, ``CHUNK`` at a time as ``C x H x W``: each is
    stored channel by channel, column-major, so it is transposed (as torchvision does)."""
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK * STL_SIZE):
            raw = np.frombuffer(chunk, dtype=np.uint8).reshape(-1, 3, 96, 96)
            yield np.ascontiguousarray(raw.transpose(0, 1, 3, 2))


def _stl10(directory: str | Path | None = None, unlabeled: bool = True) -> Stream:
    """STL-10 as torchvision lays it out (``stl10_binary/``): 5,000 "train" and 8,000 "test"
    96x96 RGB images and, with ``unlabeled``, the 100,000 "unlabeled" ones, read a chunk at
    a time so the 2.8 GB pool is never in memory at once."""
    needed = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "class_names.txt"]
    parts = ["train", "test"]
    if unlabeled:
        needed.append("unlabeled_X.bin")
        parts.append("unlabeled")
    folder = _locate(directory, "stl10", needed, base="stl10_binary")
    classes = (folder / "class_names.txt").read_text(encoding="utf-8").splitlines()

    def batches() -> Iterator[Batch]:
        for partition in parts:
            path = folder / f"{partition}_X.bin"
            count = _stl_count(path)
            if partition == "unlabeled":
                labels = np.full(count, -1, dtype=np.int64)
            else:
                label_file = folder / f"{partition}_y.bin"
                if label_file.stat().st_size != count:  # checked before it is read
                    raise ValueError(
                        f"{folder}: {count} {partition} images, {label_file.stat().st_size} labels"
                    )
                labels = np.fromfile(label_file, dtype=np.uint8).astype(np.int64)
                labels -= 1  # stored 1..10
            start = 0
            for chunk in _stl_chunks(path):
                yield Batch(partition, chunk, labels[start : start + len(chunk)])
                start += len(chunk)

    return classes, batches()


SOURCES: dict[str, Callable[..., Stream]] = {
    "digits": _digits,
    "fashion_mnist": _fashion_mnist,
    "cifar10": _cifar10,
    "svhn": _svhn,
    "stl10": _stl10,
    "imagefolder": imagefolder,
}


def source_options(source: str) -> tuple[str, ...]:
    """The options ``fetch`` takes for ``source``, so a caller can pass only those."""
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; allowed: {', '.join(SOURCES)}")
    return tuple(inspect.signature(SOURCES[source]).parameters)


def fetch(source: str, root: str | Path, **options: Any) -> Path:
    """Write ``source`` to ``root/<source>/`` byte for byte the same on every machine.

    Options by source: fashion_mnist ``directory`` (default /usr/share/datasets/fashion-mnist)
    and ``cache`` (download folder); cifar10 ``directory``; svhn ``directory``, ``extra``;
    stl10 ``directory``, ``unlabeled``; imagefolder ``directory``, ``image_size``,
    ``channels`` ("RGB" or "L")."""
    allowed = source_options(source)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"source {source!r} takes no option {', '.join(unknown)}; "
            f"it takes: {', '.join(allowed) or 'none'}"
        )
    classes, batches = SOURCES[source](**options)
    return write_layout(Path(root) / source, classes, batches)


def load_images(source: str, root: str | Path) -> ImageSet:
    """The materialized ``source`` under ``root``, images memory-mapped (see read_layout)."""
    folder = Path(root) / source
    if not (folder / "images-idx3-ubyte").exists():
        raise FileNotFoundError(
            f"{folder / 'images-idx3-ubyte'} not found: "
            "run `noisy-student data fetch` or `dvc pull` first"
        )
    return read_layout(folder)
