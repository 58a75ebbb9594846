"""The user's own images, in folders:

    <directory>/labeled/<class>/**.png|jpg|jpeg|bmp|webp   -> "train"
    <directory>/unlabeled/**                                -> "unlabeled" (no label)
    <directory>/val/<class>/**   (optional)                 -> "val"
    <directory>/test/<class>/**  (optional)                 -> "test"

Each image is decoded with PIL, turned upright by its EXIF orientation, 16-bit grey scaled
to 8 bits, transparent pixels composited on white, converted to "L" (one channel) or "RGB"
and resized to ``image_size`` square so all of them stack. A file that cannot be decoded is
skipped and reported with its reason instead of stopping a long fetch; a class left with no
image or an empty unlabeled pool stops it, before training."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from noisy_student.data.layout import Batch
from noisy_student.progress import bar

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
CHANNELS = ("RGB", "L")
DECODE_CHUNK = 512  # images decoded (in parallel) per batch written
BACKGROUND = (255, 255, 255)  # what transparent pixels show: white, as image viewers show them
# What PIL raises for a file it cannot decode: unknown format, truncated or corrupt data,
# a bad chunk (SyntaxError), or a "decompression bomb".
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _link_problem(path: Path, tree: Path, follow: bool) -> str | None:
    """Why the symlink ``path`` is not followed, or None: a dangling link, or one leading
    outside ``tree`` (a tree that reaches elsewhere on the machine is not data anyone
    chose) unless ``follow``."""
    target = os.readlink(path)  # as written, so the report is the same on every machine
    resolved = path.resolve()
    if not resolved.exists():
        return f"dangling symlink (to {target})"
    if not follow and not resolved.is_relative_to(tree):
        return (
            f"symlink to {target}, outside the image folder: refused "
            "(data.follow_symlinks: true follows it)"
        )
    return None


def _visible_files(
    folder: Path, tree: Path | None = None, follow: bool = False
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files under ``folder`` in a fixed order, leaving out hidden ones (``.DS_Store``,
    ``.ipynb_checkpoints/``) that no one means as data; and the symlinks not followed,
    with why (see :func:`_link_problem`; ``tree`` defaults to ``folder``). A folder
    reached twice through links is walked once."""
    tree = (tree or folder).resolve()
    files: list[Path] = []
    refused: list[tuple[Path, str]] = []
    walked: set[Path] = set()
    for top, dirs, names in os.walk(folder, followlinks=True):
        here = Path(top)
        if here.resolve() in walked:
            dirs[:] = []
            if here.is_symlink():
                target = os.readlink(here)
                refused.append((here, f"symlink to {target}, a folder already read: skipped"))
            continue
        walked.add(here.resolve())
        kept = []
        for name in sorted(dirs):
            path = here / name
            if name.startswith("."):
                continue
            problem = path.is_symlink() and _link_problem(path, tree, follow)
            if problem:
                refused.append((path, problem))
            else:
                kept.append(name)
        dirs[:] = kept
        for name in names:
            path = here / name
            if name.startswith("."):
                continue
            problem = path.is_symlink() and _link_problem(path, tree, follow)
            if problem:
                refused.append((path, problem))
            elif path.is_file():
                files.append(path)
    files.sort(key=Path.as_posix)
    refused.sort(key=lambda item: item[0].as_posix())
    return files, refused


def _flatten(image: Image.Image) -> Image.Image:
    """``image`` as a viewer shows it, ready for ``convert("L"|"RGB")``: 16-bit grey (PIL
    modes ``I;16*`` and ``I``, what a 16-bit PNG opens as) scaled to 8 bits by 1/257, where
    ``convert`` would clip every value above 255 to white; and transparent pixels (RGBA,
    LA, PA, a palette or grey image with a transparent colour) composited on BACKGROUND,
    where dropping the alpha would turn a shape drawn in it uniformly black."""
    if image.mode.startswith("I"):
        levels = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(levels), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        layer = image.convert("RGBA")
        background = Image.new("RGBA", layer.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, layer).convert("RGB")
    return image


def decode_image(path: Path, mode: str, size: int) -> np.ndarray | str:
    """The image as uint8 ``C x size x size``, or why it cannot be read: the one decoding
    of the imagefolder source and of ``predict``, so a model sees the same pixels in both."""
    try:
        with Image.open(path) as image:
            image.draft(mode, (size, size))  # JPEG: let the decoder downscale large photos
            upright = _flatten(ImageOps.exif_transpose(image))
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
        with bar(f"decoding {partition}", total=len(readable), unit="file") as progress:
            for start in range(0, len(readable), DECODE_CHUNK):
                chunk = readable[start : start + DECODE_CHUNK]
                decoded = self.pool.map(
                    lambda item: decode_image(item[0], self.mode, self.size), chunk
                )
                kept, labels, bad = [], [], []
                for (path, label), result in zip(chunk, decoded, strict=True):
                    if isinstance(result, str):
                        bad.append((self._name(path), result))
                    else:
                        kept.append(result)
                        labels.append(label)
                progress.advance(len(chunk))
                pixels = np.stack(kept) if kept else self._empty()
                yield Batch(partition, pixels, np.array(labels, np.int64), None, tuple(bad))

    def _name(self, path: Path) -> str:
        return path.relative_to(self.directory).as_posix()

    def _empty(self) -> np.ndarray:
        return np.empty((0, len(self.mode), self.size, self.size), np.uint8)


def _classified(
    folder: Path, classes: list[str], tree: Path, follow: bool
) -> tuple[list[tuple[Path, int]], list[tuple[Path, str]]]:
    """``(file, label)`` for the files under ``folder/<class>/``, and the files lying
    outside any class folder or behind a symlink not followed."""
    label = {name: i for i, name in enumerate(classes)}
    files: list[tuple[Path, int]] = []
    visible, stray = _visible_files(folder, tree, follow)
    for path in visible:
        if path.parent == folder:
            stray.append((path, "not inside a class folder"))
        else:
            files.append((path, label[path.relative_to(folder).parts[0]]))
    return files, stray


def _refuse_linked_classes(labeled: Path, classes: list[str]) -> None:
    """A class folder that is a symlink to another class folder (or into or around one)
    would give that class's images a second label, or, walked once, leave it empty: refuse
    it, naming both."""
    resolved = {name: (labeled / name).resolve() for name in classes}
    for name in classes:
        if not (labeled / name).is_symlink():
            continue
        for other in classes:
            here, there = resolved[name], resolved[other]
            if other != name and (here.is_relative_to(there) or there.is_relative_to(here)):
                raise ValueError(
                    f"imagefolder: class folder {labeled / name} is a symlink to "
                    f"{os.readlink(labeled / name)}, the folder of class {other!r}: an image "
                    "has one class; copy the images or remove the link"
                )


def imagefolder(
    directory: str | Path | None = None,
    image_size: int = 32,
    channels: str = "RGB",
    follow_symlinks: bool = False,
) -> tuple[list[str], Iterator[Batch]]:
    """The classes (the folder names under ``labeled/``, sorted as torchvision's
    ImageFolder sorts them) and the images of every split, labeled first. A symlink
    leading outside ``directory`` is refused (listed in ``skipped.json``) unless
    ``follow_symlinks``; a dangling one is listed there too."""
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
    tree = root.resolve()
    classes = sorted(
        entry.name
        for entry in (root / "labeled").iterdir()
        if entry.is_dir()
        and not entry.name.startswith(".")
        and not (entry.is_symlink() and _link_problem(entry, tree, follow_symlinks))
    )
    if not classes:
        raise ValueError(f"imagefolder: {root / 'labeled'} has no class folder")
    _refuse_linked_classes(root / "labeled", classes)
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
    return classes, _batches(root, classes, channels, image_size, follow_symlinks)


def _batches(root: Path, classes: list[str], mode: str, size: int, follow: bool) -> Iterator[Batch]:
    """Every split's batches, checking after "labeled" that each class kept an image and
    after "unlabeled" that the pool is not empty."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        reader = _Reader(root, mode, size, pool)
        splits = [("labeled", "train"), ("val", "val"), ("test", "test")]
        for split, partition in splits:
            if split != "labeled" and not (root / split).is_dir():
                continue
            files, stray = _classified(root / split, classes, root, follow)
            counts = np.zeros(len(classes), dtype=np.int64)
            for batch in reader.batches(partition, files, stray):
                counts += np.bincount(batch.labels, minlength=len(classes))
                yield batch
            if split == "labeled" and not counts.all():
                empty = [name for name, count in zip(classes, counts, strict=True) if not count]
                raise ValueError(
                    f"imagefolder: labeled class(es) {', '.join(empty)} have no readable image"
                )
        pool, refused = _visible_files(root / "unlabeled", root, follow)
        kept = 0
        for batch in reader.batches("unlabeled", [(path, -1) for path in pool], refused):
            kept += len(batch.labels)
            yield batch
        if not kept:
            raise ValueError(f"imagefolder: {root / 'unlabeled'} has no readable image")
