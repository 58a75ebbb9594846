"""Image sources. Every source materializes to the same layout under ``data/<source>/``:
``images-idx3-ubyte`` (N x H x W or N x H x W x C), ``labels-idx1-ubyte`` and
``classes.json``, so one reader serves all and the bytes are reproducible."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from noisy_student.data.idx import idx_bytes, read_idx
from noisy_student.io import write_bytes

IMAGES = "images-idx3-ubyte"
LABELS = "labels-idx1-ubyte"
CLASSES = "classes.json"


@dataclass(frozen=True)
class ImageSet:
    """Images as uint8 ``N x C x H x W``; ``image_id`` is the row index."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def _digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's 1,797 real 8x8 handwritten digits, shipped inside its wheel."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    return images, bunch.target.astype(np.uint8), [str(c) for c in bunch.target_names]


_FETCHERS = {"digits": _digits}


def fetch(source: str, root: str | Path) -> Path:
    """Write ``source`` to ``root/<source>/`` byte for byte the same on every machine."""
    if source not in _FETCHERS:
        raise ValueError(f"unknown data source {source!r}; allowed: {', '.join(_FETCHERS)}")
    images, labels, classes = _FETCHERS[source]()
    out = Path(root) / source
    write_bytes(out / IMAGES, idx_bytes(images))
    write_bytes(out / LABELS, idx_bytes(labels))
    write_bytes(out / CLASSES, (json.dumps(classes) + "\n").encode())
    return out


def load_images(source: str, root: str | Path) -> ImageSet:
    folder = Path(root) / source
    if not (folder / IMAGES).exists():
        raise FileNotFoundError(
            f"{folder / IMAGES} not found: run `noisy-student data fetch` or `dvc pull` first"
        )
    images = read_idx(folder / IMAGES)
    images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    labels = read_idx(folder / LABELS).astype(np.int64)
    classes = json.loads((folder / CLASSES).read_text(encoding="utf-8"))
    if len(images) != len(labels):
        raise ValueError(f"{folder}: {len(images)} images but {len(labels)} labels")
    return ImageSet(np.array(images, order="C"), labels, classes)  # writable copy
