"""When a Prefect task may reuse a result: only one produced by the same code (the package's
source and the task's), the same data (``data.dvc``), the same config and inputs, into the
same run directory (absolute path or URL), and only while the files the result names are
still there, byte for byte. A result that fails the check is never trusted: the step runs
again and its new result is stored beside the stale one. A result file that is not a
record at all (a planted pickle, another shape) is refused unread (tasks/results.py): the
step runs again and its record replaces the file."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from prefect.utilities.hashing import hash_objects

from noisy_student import versions
from tasks.results import CheckedResults, RefusedRecord


def location(path: str | Path) -> str:
    """``path`` as an absolute local path, or the URL it is (s3://...)."""
    text = str(path)
    return text if "://" in text else str(Path(text).resolve())


def _digest(fs: fsspec.AbstractFileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def output_record(folder: str | Path, only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """What a step wrote: its folder and the sha256 of every file in it (hidden files, the
    temporary files of unfinished writes, are left out), or of the files named ``only``."""
    where = location(folder)
    fs, root = fsspec.core.url_to_fs(where)
    files = {}
    for path in sorted(fs.find(root)):
        name = path[len(root) :].lstrip("/")
        hidden = any(part.startswith(".") for part in name.split("/"))
        if not hidden and (only is None or name in only):
            files[name] = _digest(fs, path)
    return {"path": where, "files": files}


def record_holds(record: Any) -> bool:
    """Whether every file a cached result names is still there with the same contents."""
    if not isinstance(record, dict) or not record.get("files"):
        return False
    fs, root = fsspec.core.url_to_fs(record["path"])
    for name, digest in record["files"].items():
        path = f"{root.rstrip('/')}/{name}"
        if not fs.isfile(path) or _digest(fs, path) != digest:
            return False
    return True


def _data_dvc(config: dict[str, Any]) -> str:
    """The DVC file that versions ``data.root`` (``data`` -> ``data.dvc``)."""
    root = str((config.get("data") or {}).get("root", "data"))
    return root.rstrip("/") + ".dvc"


@dataclass
class StepCache(CachePolicy):
    """Keys a step by everything that decides its outputs, and refuses a cached result
    whose files are missing or changed: it then hands Prefect the next free key of the same
    inputs (``<key>-1``, ``<key>-2``, ...), so the step runs and its result replaces the
    stale one for every later run. Results are read only through ``CheckedResults``
    (never unpickled): a task whose results live elsewhere is not cached."""

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        storage = task_ctx.result_store.result_storage if task_ctx else None
        if not isinstance(storage, CheckedResults):
            return None
        keyed = dict(inputs or {})
        if "run_dir" in keyed:
            keyed["run_dir"] = location(keyed["run_dir"])
        base = hash_objects(
            {
                "task": task_ctx.task.name,
                "inputs": keyed,
                "task_source": TASK_SOURCE.compute_key(task_ctx, inputs, flow_parameters),
                "code_version": versions.code_version(),
                "data_version": versions.data_version(_data_dvc(keyed.get("config") or {})),
            },
            raise_on_failure=True,
        )
        generation = 0
        while True:
            key = f"{base}-{generation}"
            try:
                _, record = storage.read_checked(key)
            except RefusedRecord as refusal:
                get_run_logger().warning("%s; the step runs again", refusal)
                return key
            except OSError:  # no result under this key yet
                return key
            if record_holds(record):
                return key
            generation += 1
