"""Atomic writes: a crash never leaves a half-written file that a later step trusts."""

from __future__ import annotations

import errno
import io
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import torch

FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left; the user's quota exceeded


class DiskFull(OSError):
    """A file that could not be written for want of space: one line naming it."""

    def __init__(self, path: Path, cause: OSError) -> None:
        super().__init__(
            cause.errno,
            f"{path}: the disk is full ({os.strerror(cause.errno or errno.ENOSPC)}); the file "
            "was not written (nothing half-written is left): free space and run the step again",
        )

    def __str__(self) -> str:
        return self.strerror


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.
    Raises ``DiskFull`` naming ``path`` (not the temporary file) when the disk fills."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        if err.errno in FULL:
            raise DiskFull(path, err) from err
        raise
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in FULL:
            raise DiskFull(path, err) from err
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_parquet(path: str | Path, frame: pd.DataFrame) -> None:
    """Without dictionary encoding: manifests are mostly distinct ids and probabilities,
    where trying a dictionary first made writing 3.7x slower."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False, use_dictionary=False)


def write_csv(path: str | Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def save_torch(path: str | Path, obj: Any) -> None:
    """``torch.save`` through memory: saving to the temporary file directly would name the
    archive's records after that random file name, and the same model would hash differently."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())
