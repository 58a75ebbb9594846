"""Task results as checked JSON, never pickles. Prefect's default serializer is pickle, and
on reading a result it uses whichever serializer the result file's own metadata names: a
result file swapped for a pickle (anyone who can write to ``.prefect-results/`` in the
bucket) would run code on the flow's machine. So every task result is written as JSON by
``RecordSerializer``, and ``CheckedResults``, the storage every task reads its results
from, hands Prefect the bytes of a result file only when they are one of the records the
tasks write, before any serializer sees them; anything else is refused."""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import anyio.to_thread
import fsspec
from prefect.filesystems import WritableFileSystem
from prefect.serializers import Serializer
from pydantic import Field

from noisy_student.io import write_bytes

SERIALIZER = "noisy-student-record"
SHA256 = re.compile(r"[0-9a-f]{64}")
KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
STEP_KEYS = {"path", "files"}
REPORT_KEYS = {"mlflow_run_id", "run_dir", "iterations"}
ERROR_KEYS = {"error"}
SCALARS = (str, int, float, bool, type(None))


class RefusedRecord(ValueError):
    """A task result that is not one of the records the tasks write: never trusted."""


def check_record(value: Any) -> dict[str, Any]:
    """``value`` when it has exactly one of the shapes a task result has: a step's record
    (``{"path": str, "files": {name: sha256 hex}}``, ``tasks.cache.output_record``), the
    report's (``{"mlflow_run_id": str, "run_dir": str, "iterations": [{column: scalar}]}``)
    or a failed task's error (``{"error": str}``); ``RefusedRecord`` for anything else."""
    if not isinstance(value, dict):
        raise RefusedRecord(f"a {type(value).__name__}, not a record")
    keys = set(value)
    if keys == STEP_KEYS:
        files = value["files"]
        if not isinstance(value["path"], str) or not isinstance(files, dict):
            raise RefusedRecord("a step record needs a path (text) and files (a mapping)")
        for name, digest in files.items():
            if not isinstance(digest, str) or not SHA256.fullmatch(digest):
                raise RefusedRecord(f"file {name!r}: its digest is not a sha256 hex string")
        return value
    if keys == REPORT_KEYS:
        rows = value["iterations"]
        texts = isinstance(value["mlflow_run_id"], str) and isinstance(value["run_dir"], str)
        if not texts or not isinstance(rows, list):
            raise RefusedRecord("a report needs mlflow_run_id, run_dir (text), iterations (list)")
        for row in rows:
            if not isinstance(row, dict) or not all(isinstance(v, SCALARS) for v in row.values()):
                raise RefusedRecord("a report's iterations are rows of plain values")
        return value
    if keys == ERROR_KEYS and isinstance(value["error"], str):
        return value
    raise RefusedRecord(
        f"keys {sorted(keys)}: allowed {sorted(STEP_KEYS)}, {sorted(REPORT_KEYS)} "
        f"or {sorted(ERROR_KEYS)}"
    )


class RecordSerializer(Serializer):
    """JSON of the records alone, read back with ``json.loads`` (no object hook: plain data,
    nothing imported by name); a failed task's exception is written as its one-line text."""

    type: Literal["noisy-student-record"] = SERIALIZER

    def dumps(self, obj: Any) -> bytes:
        if isinstance(obj, BaseException):
            obj = {"error": f"{type(obj).__name__}: {obj}"}
        return json.dumps(check_record(obj)).encode()

    def loads(self, blob: bytes) -> dict[str, Any]:
        try:
            value = json.loads(blob)
        except ValueError as err:  # UnicodeDecodeError included
            raise RefusedRecord(f"not JSON ({err})") from None
        return check_record(value)


def parse_result(content: bytes) -> dict[str, Any]:
    """The record in a result file as Prefect writes one (``{"metadata": {"serializer":
    {"type": ...}, ...}, "result": "<serialized>"}``), checked here, on the raw bytes: a
    file whose metadata names any other serializer (pickle, Prefect's JSON with its
    importing decoder) is refused before a serializer could read it."""
    try:
        document = json.loads(content)
    except ValueError:
        raise RefusedRecord("not a JSON result record") from None
    if not isinstance(document, dict) or not {"metadata", "result"} <= set(document):
        raise RefusedRecord("not a result record (metadata and result)")
    metadata = document["metadata"]
    serializer = metadata.get("serializer") if isinstance(metadata, dict) else None
    if serializer != {"type": SERIALIZER}:
        named = serializer.get("type") if isinstance(serializer, dict) else serializer
        raise RefusedRecord(f"serializer {named!r}: only {SERIALIZER!r} is read")
    if not isinstance(document["result"], str):
        raise RefusedRecord("its result is not JSON text")
    return RecordSerializer().loads(document["result"].encode())


class CheckedResults(WritableFileSystem):
    """Task result storage in a folder or under a URL (``s3://bucket/runs/.prefect-results``)
    whose reads return only result files ``parse_result`` accepts (``RefusedRecord``
    otherwise: Prefect then counts the result as missing, and the task runs again and
    writes over it). Local writes are atomic (temporary file, then rename); an object
    store's put is."""

    _block_type_name = "Noisy Student Results"

    basepath: str = Field(
        description="The folder (absolute path) or URL the task results are written under."
    )

    def location(self, key: str) -> str:
        """Where the result of ``key`` lives: a file directly under ``basepath``."""
        if not KEY.fullmatch(key):
            raise RefusedRecord(f"result key {key!r}: allowed letters, digits, '_', '-', '.'")
        return f"{self.basepath.rstrip('/')}/{key}"

    def read_checked(self, key: str) -> tuple[bytes, dict[str, Any]]:
        """The bytes of the result file of ``key`` and the record in them, checked;
        ``OSError`` when there is none, ``RefusedRecord`` (naming the file) when it is not
        a record."""
        where = self.location(key)
        fs, target = fsspec.core.url_to_fs(where)
        content = fs.cat_file(target)
        try:
            return content, parse_result(content)
        except RefusedRecord as err:
            raise RefusedRecord(f"task result {where} refused: {err}") from None

    def read_path(self, path: str, **dispatch: Any) -> bytes:
        """What Prefect reads: the checked bytes of the result ``path`` (a key).
        ``dispatch``: Prefect's sync/async switch (``_sync``); this read is synchronous."""
        return self.read_checked(path)[0]

    async def aread_path(self, path: str) -> bytes:
        return await anyio.to_thread.run_sync(self.read_path, path)

    def write_path(self, path: str, content: bytes, **dispatch: Any) -> str:
        """Write the result ``path`` (a key); ``dispatch`` as for ``read_path``."""
        where = self.location(path)
        if "://" not in where:
            write_bytes(where, content)
            return where
        fs, target = fsspec.core.url_to_fs(where)
        fs.pipe_file(target, content)
        return where

    async def awrite_path(self, path: str, content: bytes) -> str:
        return await anyio.to_thread.run_sync(self.write_path, path, content)
