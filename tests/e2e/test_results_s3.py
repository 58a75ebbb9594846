"""Task results in the bucket (``<runs_root>/.prefect-results`` on a moto S3 server on
loopback), where on a scale-out run anyone who can write to the bucket could plant one:
a planted pickle is refused unread, and a record is written and read back as JSON."""

from __future__ import annotations

from pathlib import Path

import boto3
import fsspec
import pytest

from tasks.results import SERIALIZER, CheckedResults, RecordSerializer, RefusedRecord
from tests.test_results import DIGEST, pickle_result, result_file

pytestmark = pytest.mark.e2e


def test_a_pickle_planted_in_the_bucket_is_refused_unread(
    s3_env: dict[str, str], tmp_path: Path
) -> None:
    boto3.client("s3").create_bucket(Bucket="results")
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    basepath = "s3://results/runs/.prefect-results"
    store = CheckedResults(basepath=basepath)
    marker = tmp_path / "marker"
    fs.pipe(f"{basepath.removeprefix('s3://')}/key-0", pickle_result(marker))
    with pytest.raises(RefusedRecord, match=f"task result {basepath}/key-0 refused: serializer"):
        store.read_path("key-0")
    assert not marker.exists()

    record = {"path": "s3://results/runs/abc/splits", "files": {"train.parquet": DIGEST}}
    content = result_file({"type": SERIALIZER}, RecordSerializer().dumps(record).decode())
    store.write_path("key-1", content)
    assert store.read_checked("key-1") == (content, record)
