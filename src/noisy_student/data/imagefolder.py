"""The user's own images, in folders:

    <directory>/labeled/<class>/**.png|jpg|jpeg|bmp|webp   -> "train"
    <directory>/unlabeled/**                                -> "unlabeled" (no label)
    <directory>/val/<class>/**   (optional)                 -> "val"
    <directory>/test/<class>/**  (optional)                 -> "test"

Each image is decoded with PIL, turned upright by its EXIF orientation, converted to "L"
(one channel) or "RGB" and resized to ``image_size`` square so all of them stack. A file
that cannot be decoded is skipped and reported with its reason instead of stopping a long
fetch; a class left with no image or an empty unlabeled pool stops it, before training."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from noisy_student.data.layout import Batch

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
CHANNELS = ("RGB", "L")
DECODE_CHUNK = 512  # images decoded (in parallel) per batch written
# What PIL raises for a file it cannot decode: unknown format, truncated or corrupt data,
# a bad chunk (SyntaxError), or a "decompression bomb".
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _visible_files(folder: Path) -> list[Path]:
    """Files under ``folder`` in a fixed order, leaving out hidden ones (``.DS_Store``,
    ``.ipynb_checkpoints/``) that no one means as data."""
    files = (
        path
        for path in folder.rglob("*")
        if path.is_file() and not any(p.startswith(".") for p in path.relative_to(folder).parts)
    )
    return sorted(files, key=lambda path: path.as_posix())


def _decode(path: Path, mode: str, size: int) -> np.ndarray | str:
    """The image as uint8 ``C x size x size``, or why it cannot be read."""
    try:
        with Image.open(path) as image:
            image.draft(mode, (size, size))  # JPEG: let the decoder downscale large photos
            upright = ImageOps.exif_transpose(image)
            pixels = upright.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
    except DECODE_ERRORS as err:
        # PIL's messages may carry the absolute path; keep the report machine-independent.
        return f"{type(err).__name__}: {str(err).replace(str(path), path.name)}"
    array = np.asarray(pixels, dtype=np.uint8)
    return array[None] if mode == "L" else array.transpose(2, 0, 1)


class _Reader:
    """Decodes one split's files in chunks, in order; PIL releases the GIL while decoding
    and resizing, so threads use every core."""

    def __init__(self, directory: Path, mode: str, size: int, pool: ThreadPoolExecutor) -> None:
        self.directory, self.mode, self.size, self.pool = directory, mode, size, pool

    def batches(
        self, partition: str, files: list[tuple[Path, int]], skipped: list[tuple[Path, str]]
    ) -> Iterator[Batch]:
        """``files`` as ``(path, label)``, decoded; ``skipped`` are reported as they are."""
        report = [(self._name(path), reason) for path, reason in skipped]
        readable = []
        for path, label in files:
            if path.suffix.lower() in EXTENSIONS:
                readable.append((path, label))
            else:
                report.append((self._name(path), f"not an image file ({', '.join(EXTENSIONS)})"))
        if report:
            yield Batch(partition, self._empty(), np.empty(0, np.int64), skipped=tuple(report))
        for start in range(0, len(readable), DECODE_CHUNK):
            chunk = readable[start : start + DECODE_CHUNK]
            decoded = self.pool.map(lambda item: _decode(item[0], self.mode, self.size), chunk)
            kept, labels, bad = [], [], []
            for (path, label), result in zip(chunk, decoded, strict=True):
                if isinstance(result, str):
                    bad.append((self._name(path), result))
                else:
                    kept.append(result)
                    labels.append(label)
            pixels = np.stack(kept) if kept else self._empty()
            yield Batch(partition, pixels, np.array(labels, np.int64), None, tuple(bad))

    def _name(self, path: Path) -> str:
        return path.relative_to(self.directory).as_posix()

    def _empty(self) -> np.ndarray:
        return np.empty((0, len(self.mode), self.size, self.size), np.uint8)


def _classified(
    folder: Path, classes: list[str]
) -> tuple[list[tuple[Path, int]], list[tuple[Path, str]]]:
    """``(file, label)`` for the files under ``folder/<class>/``, and the files lying
    outside any class folder."""
    label = {name: i for i, name in enumerate(classes)}
    files: list[tuple[Path, int]] = []
    stray: list[tuple[Path, str]] = []
    for path in _visible_files(folder):
        if path.parent == folder:
            stray.append((path, "not inside a class folder"))
        else:
            files.append((path, label[path.relative_to(folder).parts[0]]))
    return files, stray


def imagefolder(
    directory: str | Path | None = None, image_size: int = 32, channels: str = "RGB"
) -> tuple[list[str], Iterator[Batch]]:
    """The classes (the folder names under ``labeled/``, sorted as torchvision's
    ImageFolder sorts them) and the images of every split, labeled first."""
    if directory is None:
        raise ValueError("source 'imagefolder' needs directory= (holding labeled/, unlabeled/)")
    if channels not in CHANNELS:
        raise ValueError(f"channels must be one of {CHANNELS}, got {channels!r}")
    if image_size < 1:
        raise ValueError(f"image_size must be at least 1, got {image_size}")
    root = Path(directory)
    for needed in ("labeled", "unlabeled"):
        if not (root / needed).is_dir():
            raise FileNotFoundError(f"imagefolder: {root / needed} is not a folder")
    classes = sorted(
        entry.name
        for entry in (root / "labeled").iterdir()
        if entry.is_dir() and not entry.name.startswith(".")
    )
    if not classes:
        raise ValueError(f"imagefolder: {root / 'labeled'} has no class folder")
    for split in ("val", "test"):
        if (root / split).is_dir():
            extra = {
                e.name
                for e in (root / split).iterdir()
                if e.is_dir() and not e.name.startswith(".")
            } - set(classes)
            if extra:
                raise ValueError(
                    f"imagefolder: {root / split} has classes not under labeled/: "
                    f"{', '.join(sorted(extra))}"
                )
    return classes, _batches(root, classes, channels, image_size)


def _batches(root: Path, classes: list[str], mode: str, size: int) -> Iterator[Batch]:
    """Every split's batches, checking after "labeled" that each class kept an image and
    after "unlabeled" that the pool is not empty."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        reader = _Reader(root, mode, size, pool)
        splits = [("labeled", "train"), ("val", "val"), ("test", "test")]
        for split, partition in splits:
            if split != "labeled" and not (root / split).is_dir():
                continue
            files, stray = _classified(root / split, classes)
            counts = np.zeros(len(classes), dtype=np.int64)
            for batch in reader.batches(partition, files, stray):
                counts += np.bincount(batch.labels, minlength=len(classes))
                yield batch
            if split == "labeled" and not counts.all():
                empty = [name for name, count in zip(classes, counts, strict=True) if not count]
                raise ValueError(
                    f"imagefolder: labeled class(es) {', '.join(empty)} have no readable image"
                )
        pool_files = [(path, -1) for path in _visible_files(root / "unlabeled")]
        kept = 0
        for batch in reader.batches("unlabeled", pool_files, []):
            kept += len(batch.labels)
            yield batch
        if not kept:
            raise ValueError(f"imagefolder: {root / 'unlabeled'} has no readable image")
