"""Prefect task results are checked JSON: a result file swapped for a pickle (or for Prefect's
JSON with its importing decoder, or any other shape) is refused before any serializer
reads it, so planting one in the results folder or bucket runs nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from prefect.serializers import JSONSerializer, PickleSerializer

from tasks.cache import output_record
from tasks.results import SERIALIZER, CheckedResults, RecordSerializer, RefusedRecord, check_record

DIGEST = "ab" * 32
REPORT = {
    "mlflow_run_id": "0123abcd",
    "run_dir": "/runs/x",
    "iterations": [{"iteration": 0, "val_accuracy": 0.5, "teacher_iteration": None}],
}


class WritesMarker:
    """A pickle payload: unpickling it writes ``marker`` (what an attacker's code would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return Path.write_text, (self.marker, "code ran")


def result_file(serializer: dict[str, Any], result: str) -> bytes:
    """A result file as Prefect writes one, with the metadata naming ``serializer``."""
    metadata = {"storage_key": "key-0", "expiration": None, "serializer": serializer}
    return json.dumps({"metadata": metadata, "result": result}).encode()


def pickle_result(marker: Path) -> bytes:
    """A result file whose metadata names pickle and whose payload writes ``marker``."""
    pickled = PickleSerializer().dumps(WritesMarker(marker)).decode()
    return result_file(PickleSerializer().model_dump(), pickled)


@pytest.mark.parametrize(
    "value",
    [
        [],
        "text",
        {"path": "/runs/x"},
        {"path": "/runs/x", "files": {"model.pt": "not-a-digest"}},
        {"path": "/runs/x", "files": {"model.pt": DIGEST.upper()}},
        {"path": 3, "files": {}},
        {"path": "/runs/x", "files": [], "extra": 1},
        {"path": "/runs/x", "files": {"model.pt": DIGEST}, "extra": 1},
        {**REPORT, "iterations": [{"model": {"nested": 1}}]},
        {**REPORT, "mlflow_run_id": None},
        {"error": 1},
        {"__class__": "os.system", "data": "echo"},
    ],
)
def test_record_check_refuses_every_shape_no_task_writes(value: Any) -> None:
    with pytest.raises(RefusedRecord):
        check_record(value)


def test_record_check_accepts_the_records_the_tasks_write(tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(b"weights")
    step = output_record(tmp_path)
    assert check_record(step) is step
    assert check_record(REPORT) is REPORT
    serializer = RecordSerializer()
    assert serializer.loads(serializer.dumps(step)) == step
    assert serializer.loads(serializer.dumps(ValueError("bad"))) == {"error": "ValueError: bad"}
    with pytest.raises(RefusedRecord):
        serializer.dumps({"any": "dict"})


def test_planted_result_files_are_refused_unread(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    payload = pickle_result(marker)
    # The payload is live: Prefect's pickle serializer would run it.
    PickleSerializer().loads(json.loads(payload)["result"].encode())
    assert marker.read_text() == "code ran"
    marker.unlink()

    store = CheckedResults(basepath=str(tmp_path / "results"))
    importing = JSONSerializer().model_dump()
    planted = {
        "pickle-0": payload,
        "json-0": result_file(importing, json.dumps({"__class__": "os.system"})),
        "shape-0": result_file({"type": SERIALIZER}, json.dumps({"path": "/x"})),
        "garbage-0": b"\x80\x04not json",
    }
    for key, content in planted.items():
        store.write_path(key, content)
    for key in planted:
        with pytest.raises(RefusedRecord, match=f"task result {tmp_path}/results/{key} refused"):
            store.read_path(key)
    assert not marker.exists()


def test_results_are_written_and_read_back_as_checked_json(tmp_path: Path) -> None:
    store = CheckedResults(basepath=str(tmp_path))
    record = {"path": "/runs/x", "files": {"model.pt": DIGEST}}
    content = result_file({"type": SERIALIZER}, RecordSerializer().dumps(record).decode())
    store.write_path("key-0", content)
    assert store.read_path("key-0") == content
    assert store.read_checked("key-0") == (content, record)
    assert [p.name for p in tmp_path.iterdir()] == ["key-0"]  # no temporary file left
    with pytest.raises(RefusedRecord, match="result key '../x'"):
        store.read_path("../x")
