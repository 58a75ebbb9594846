"""The one on-disk layout every source materializes to, under ``<root>/<source>/``:

- ``images-idx3-ubyte``: uncompressed IDX, ``N x H x W`` (one channel) or ``N x C x H x W``;
  memory-mapped on read, so a pool larger than memory still loads;
- ``labels-idx1-ubyte``: IDX, one label per image; the header says unsigned byte, or signed
  int32 when some image has no label (-1) or there are more than 256 classes;
- ``classes.json``: the class names, index = label;
- ``partition-idx1-ubyte``: IDX, one code per image, index into :data:`PARTITIONS`;
  only when some image is not in "train";
- ``hidden-labels-idx1``: IDX like the labels; the known label of each "unlabeled" image,
  kept apart so pseudo-labels can be scored; only when some is known;
- ``skipped.json``: ``[[path, reason], ...]`` of source files that could not be read;
  only when some were.

Files are written in a fixed order from a fixed walk of the source, so the same source gives
the same bytes (and the same ``dvc add`` hash) on every machine. A source whose images are all
labeled "train" (digits) has exactly the three files it always had."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from noisy_student.data.idx import IdxWriter, idx_bytes, map_idx, read_idx

IMAGES = "images-idx3-ubyte"
LABELS = "labels-idx1-ubyte"
CLASSES = "classes.json"
PARTITION = "partition-idx1-ubyte"
HIDDEN_LABELS = "hidden-labels-idx1"
SKIPPED = "skipped.json"

PARTITIONS = ("train", "val", "test", "unlabeled")


@dataclass(frozen=True)
class ImageSet:
    """Images as uint8 ``N x C x H x W``; ``image_id`` is the row index.

    ``partition`` tells which part of the source each image came from (None: all "train").
    "unlabeled" images have label -1; ``hidden_labels`` holds their true label where the
    source knows it (-1 elsewhere; None: none known), only to score pseudo-labels.
    ``skipped`` lists ``(path, reason)`` for source files that could not be read."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    partition: np.ndarray | None = None
    hidden_labels: np.ndarray | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.partition is None:
            object.__setattr__(self, "partition", np.full(n, "train", dtype="<U9"))
        if self.hidden_labels is None:
            object.__setattr__(self, "hidden_labels", np.full(n, -1, dtype=np.int64))
        if not len(self.images) == len(self.partition) == len(self.hidden_labels) == n:
            raise ValueError(
                f"{len(self.images)} images, {n} labels, {len(self.partition)} partition "
                f"entries and {len(self.hidden_labels)} hidden labels: they must match"
            )
        _check_labels(self.labels, self.partition, self.hidden_labels, len(self.classes))

    def __len__(self) -> int:
        return len(self.labels)


def _check_labels(
    labels: np.ndarray, partition: np.ndarray, hidden: np.ndarray, num_classes: int
) -> None:
    """Refuse labels a split would trust wrongly: every labeled image needs a class, an
    unlabeled one must not show its label, and a hidden label only exists for those."""
    unknown = set(np.unique(partition).tolist()) - set(PARTITIONS)
    if unknown:
        raise ValueError(f"unknown partitions {sorted(unknown)}; allowed: {PARTITIONS}")
    labels, hidden = labels.astype(np.int64), hidden.astype(np.int64)
    unlabeled = partition == "unlabeled"
    if labels.max(initial=-1) >= num_classes or labels.min(initial=0) < -1:
        raise ValueError(f"labels must be -1 or 0..{num_classes - 1}")
    if (labels[~unlabeled] < 0).any():
        raise ValueError("every image outside the 'unlabeled' partition needs a label")
    if (labels[unlabeled] != -1).any():
        raise ValueError("'unlabeled' images must have label -1 (use hidden_labels)")
    if (hidden[~unlabeled] != -1).any() or hidden.max(initial=-1) >= num_classes:
        raise ValueError("hidden labels are for 'unlabeled' images only, -1 or a class")


@dataclass(frozen=True)
class Batch:
    """A run of images from one partition, as a source streams them: ``images`` is uint8
    ``n x C x H x W``; ``labels`` -1 where there is none; ``hidden_labels`` (or None: all
    unknown) the labels of "unlabeled" images kept for scoring; ``skipped`` the
    ``(path, reason)`` of files dropped on the way."""

    partition: str
    images: np.ndarray
    labels: np.ndarray
    hidden_labels: np.ndarray | None = None
    skipped: tuple[tuple[str, str], ...] = ()


def _label_array(labels: np.ndarray) -> np.ndarray:
    """The smallest IDX type that holds the labels, so digits keep their unsigned bytes."""
    if labels.size and labels.min() >= 0 and labels.max() <= 255:
        return labels.astype(np.uint8)
    return labels.astype(">i4")


def _write(folder: Path, classes: list[str], batches: Iterable[Batch]) -> None:
    labels: list[np.ndarray] = []
    codes: list[np.ndarray] = []
    hidden: list[np.ndarray] = []
    skipped: list[tuple[str, str]] = []
    with IdxWriter(folder / IMAGES) as images:
        for batch in batches:
            skipped.extend(batch.skipped)
            if not len(batch.images):
                continue
            n, channels = batch.images.shape[:2]
            if len(batch.labels) != n:
                raise ValueError(f"a batch of {n} images came with {len(batch.labels)} labels")
            given = np.asarray(batch.labels, dtype=np.int64)
            known = np.full(n, -1) if batch.hidden_labels is None else batch.hidden_labels
            known = np.asarray(known, dtype=np.int64)
            _check_labels(given, np.full(n, batch.partition), known, len(classes))
            images.append(batch.images[:, 0] if channels == 1 else batch.images)
            labels.append(given)
            codes.append(np.full(n, PARTITIONS.index(batch.partition), dtype=np.uint8))
            hidden.append(known)
    if not labels:
        raise ValueError("the source has no readable image")
    (folder / LABELS).write_bytes(idx_bytes(_label_array(np.concatenate(labels))))
    (folder / CLASSES).write_bytes((json.dumps(classes) + "\n").encode())
    code = np.concatenate(codes)
    if code.any():
        (folder / PARTITION).write_bytes(idx_bytes(code))
    known = np.concatenate(hidden)
    if (known >= 0).any():
        (folder / HIDDEN_LABELS).write_bytes(idx_bytes(known.astype(">i4")))
    if skipped:
        text = json.dumps([list(item) for item in skipped], indent=1) + "\n"
        (folder / SKIPPED).write_bytes(text.encode())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _scratch(folder: Path) -> Path:
    """A new temporary folder for building ``folder`` (``data/<source>``): beside the data
    root (``.data.tmp-<pid>-*``), so on the same filesystem for the final rename, yet
    outside the DVC-tracked root, whose hash a killed fetch must not change. Leftovers of
    fetches whose process is gone (killed) are removed first."""
    root = folder.absolute().parent
    prefix = f".{root.name}.tmp-"
    for stale in root.parent.glob(f"{prefix}*"):
        pid = stale.name[len(prefix) :].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=root.parent))


def write_layout(folder: str | Path, classes: list[str], batches: Iterable[Batch]) -> Path:
    """Stream ``batches`` into ``folder``, holding one batch of images at a time. The files
    are built in a temporary folder outside the data root and swapped in whole, so a failed
    fetch leaves the previous data as it was and never a mix, and a killed one leaves
    nothing inside the root."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    building = _scratch(folder)
    try:
        _write(building, classes, batches)
        building.chmod(0o755)
        if folder.exists():
            old = _scratch(folder)
            os.replace(folder, old / folder.name)
            os.replace(building, folder)
            shutil.rmtree(old)
        else:
            os.replace(building, folder)
    finally:
        if building.exists():
            shutil.rmtree(building)
    return folder


def _class_names(path: Path) -> list[str]:
    """The class names in ``path``, a JSON list of strings; anything else is refused in
    one line naming the file (a mapping would pass for a list of its keys)."""
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path}: not JSON ({err}); it must be a list of class names") from None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        found = type(names).__name__ if not isinstance(names, list) else "a list of non-strings"
        raise ValueError(f"{path}: must be a JSON list of class names, found {found}")
    return names


def read_layout(folder: str | Path) -> ImageSet:
    """The dataset in ``folder`` with its images memory-mapped: nothing is decoded, and only
    the images that are used are read from disk."""
    folder = Path(folder)
    images = map_idx(folder / IMAGES)
    if images.ndim == 3:
        images = images[:, None]
    labels = read_idx(folder / LABELS).astype(np.int64)
    partition = hidden = None
    if (folder / PARTITION).exists():
        codes = read_idx(folder / PARTITION)
        if codes.max(initial=0) >= len(PARTITIONS):
            allowed = ", ".join(f"{code} ({name})" for code, name in enumerate(PARTITIONS))
            raise ValueError(
                f"{folder / PARTITION}: unknown partition code {int(codes.max())}; "
                f"allowed: {allowed}"
            )
        partition = np.asarray(PARTITIONS)[codes]
    if (folder / HIDDEN_LABELS).exists():
        hidden = read_idx(folder / HIDDEN_LABELS).astype(np.int64)
    skipped = []
    if (folder / SKIPPED).exists():
        skipped = [
            (path, reason) for path, reason in json.loads((folder / SKIPPED).read_text("utf-8"))
        ]
    classes = _class_names(folder / CLASSES)
    return ImageSet(images, labels, classes, partition, hidden, skipped)
