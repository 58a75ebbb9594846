"""The IDX format of MNIST and Fashion-MNIST (optionally gzipped): plain and byte-stable.

An uncompressed IDX file is a short header followed by the raw array, so large ones are
memory-mapped instead of read, and written a block at a time instead of held whole."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from types import TracebackType

import numpy as np

# IDX type codes this project writes: images and small labels as unsigned bytes, labels
# that need -1 ("no label") or more than 256 classes as big-endian signed 32-bit ints.
_TYPES = {0x08: np.dtype(np.uint8), 0x0C: np.dtype(">i4")}
_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(">i4"): 0x0C}


def _header(path: Path, data: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    """Element type, shape and header length of the IDX bytes at the start of ``data``."""
    if len(data) < 4:
        raise ValueError(f"{path}: too short for an IDX header")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in _TYPES:
        raise ValueError(f"{path}: not an unsigned-byte or int32 IDX file")
    size = 4 + 4 * ndim
    if len(data) < size:
        raise ValueError(f"{path}: IDX header cut short")
    return _TYPES[code], struct.unpack(f">{ndim}I", data[4:size]), size


def read_idx(path: str | Path) -> np.ndarray:
    """The whole array of an IDX file, gzipped (``.gz``) or not."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        # EOFError: cut short; BadGzipFile: not gzip; zlib.error: corrupt compressed data.
        what = "truncated" if isinstance(err, EOFError) else "corrupt"
        raise ValueError(
            f"{path}: {what} gzip file ({err}); download or install it again"
        ) from None
    dtype, shape, offset = _header(path, data)
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - offset != expected:
        raise ValueError(f"{path}: expected {expected} bytes of data, got {len(data) - offset}")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)


def map_idx(path: str | Path) -> np.memmap:
    """An uncompressed IDX file mapped copy-on-write: pages are read when touched, and
    writes to the array (torch wants a writable one) never reach the file."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(4 + 4 * 255)
    dtype, shape, offset = _header(path, head)
    expected = int(np.prod(shape)) * dtype.itemsize
    actual = path.stat().st_size - offset
    if actual != expected:
        raise ValueError(f"{path}: expected {expected} bytes of data, got {actual}")
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
