"""The IDX format of MNIST and Fashion-MNIST (optionally gzipped): plain and byte-stable.

An uncompressed IDX file is a short header followed by the raw array, so large ones are
memory-mapped instead of read, and written a block at a time instead of held whole."""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import numpy as np

# IDX type codes this project writes: images and small labels as unsigned bytes, labels
# that need -1 ("no label") or more than 256 classes as big-endian signed 32-bit ints.
_TYPES = {0x08: np.dtype(np.uint8), 0x0C: np.dtype(">i4")}
_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(">i4"): 0x0C}


# Bounds of what an IDX header may declare, checked before any data is read: up to four
# dimensions (N x C x H x W), and at most MAX_INFLATED_BYTES of data in a gzipped file, which
# is inflated whole into memory (Fashion-MNIST's largest file holds 47 MB), so a small ``.gz``
# that inflates to gigabytes, or a header that claims them, is refused instead of read.
MAX_DIMS = 4
MAX_INFLATED_BYTES = 2 * 1024**3
READ_CHUNK = 1 << 20  # bytes inflated per read


def _header(path: Path, fh: BinaryIO) -> tuple[np.dtype, tuple[int, ...], int]:
    """Element type, shape and data size in bytes of the IDX header at the start of
    ``fh``, which is left at the first data byte."""
    head = fh.read(4)
    if len(head) < 4:
        raise ValueError(f"{path}: too short for an IDX header")
    zero, code, ndim = struct.unpack(">HBB", head)
    if zero != 0 or code not in _TYPES:
        raise ValueError(f"{path}: not an unsigned-byte or int32 IDX file")
    if not 1 <= ndim <= MAX_DIMS:
        raise ValueError(f"{path}: IDX header declares {ndim} dimensions; allowed: 1..{MAX_DIMS}")
    dims = fh.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise ValueError(f"{path}: IDX header cut short")
    shape = struct.unpack(f">{ndim}I", dims)
    return _TYPES[code], shape, math.prod(shape) * _TYPES[code].itemsize


def _check_size(path: Path, actual: int, expected: int) -> None:
    if actual != expected:
        raise ValueError(f"{path}: expected {expected} bytes of data, got {actual}")


def _read_gzip(path: Path) -> np.ndarray:
    """The array of a gzipped IDX file, inflated a chunk at a time up to the size its header
    declares (at most MAX_INFLATED_BYTES): a stream holding more or less is refused."""
    with gzip.open(path, "rb") as fh:
        dtype, shape, expected = _header(path, fh)
        if expected > MAX_INFLATED_BYTES:
            raise ValueError(
                f"{path}: IDX header declares a {'x'.join(map(str, shape))} array "
                f"({expected} bytes), more than the {MAX_INFLATED_BYTES} a gzipped IDX file "
                "may hold: a corrupt or hostile file; download or install it again"
            )
        data = bytearray()
        while len(data) < expected and (chunk := fh.read(min(READ_CHUNK, expected - len(data)))):
            data += chunk
        _check_size(path, len(data), expected)
        if fh.read(1):
            raise ValueError(
                f"{path}: inflates to more than the {expected} bytes of data its header declares"
            )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def read_idx(path: str | Path) -> np.ndarray:
    """The whole array of an IDX file, gzipped (``.gz``) or not; the size its header
    declares is checked before the data is read."""
    path = Path(path)
    if path.suffix != ".gz":
        with open(path, "rb") as fh:
            dtype, shape, expected = _header(path, fh)
            _check_size(path, path.stat().st_size - fh.tell(), expected)
            return np.frombuffer(fh.read(expected), dtype=dtype).reshape(shape)
    try:
        return _read_gzip(path)
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        # EOFError: cut short; BadGzipFile: not gzip; zlib.error: corrupt compressed data.
        what = "truncated" if isinstance(err, EOFError) else "corrupt"
        raise ValueError(
            f"{path}: {what} gzip file ({err}); download or install it again"
        ) from None


def map_idx(path: str | Path) -> np.memmap:
    """An uncompressed IDX file mapped copy-on-write: pages are read when touched, and
    writes to the array (torch wants a writable one) never reach the file."""
    path = Path(path)
    with open(path, "rb") as fh:
        dtype, shape, expected = _header(path, fh)
        offset = fh.tell()
    _check_size(path, path.stat().st_size - offset, expected)
    return np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=shape)


def _header_bytes(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    if dtype not in _CODES:
        raise ValueError(f"IDX holds uint8 or int32 arrays, not {dtype}")
    return struct.pack(">HBB", 0, _CODES[dtype], len(shape)) + struct.pack(
        f">{len(shape)}I", *shape
    )


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` (uint8 or int32) as IDX bytes."""
    array = np.asarray(array)
    header = _header_bytes(array.dtype, array.shape)
    return header + np.ascontiguousarray(array, dtype=_TYPES[_CODES[array.dtype]]).tobytes()


class IdxWriter:
    """Appends uint8 rows of one shape to an IDX file without holding them: the row count
    in the header is filled in on close."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fh = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        self._row_shape: tuple[int, ...] | None = None
        self.count = 0

    def append(self, rows: np.ndarray) -> None:
        if rows.dtype != np.uint8:
            raise ValueError(f"{self.path}: rows must be uint8, got {rows.dtype}")
        if self._row_shape is None:
            self._row_shape = rows.shape[1:]
            self._fh.write(_header_bytes(rows.dtype, (0, *self._row_shape)))
        elif rows.shape[1:] != self._row_shape:
            raise ValueError(
                f"{self.path}: rows of shape {rows.shape[1:]} after rows of {self._row_shape}"
            )
        self._fh.write(np.ascontiguousarray(rows).data)
        self.count += len(rows)

    def close(self) -> None:
        if self._row_shape is not None and not self._fh.closed:
            self._fh.seek(4)
            self._fh.write(struct.pack(">I", self.count))
        self._fh.close()

    def __enter__(self) -> IdxWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()
