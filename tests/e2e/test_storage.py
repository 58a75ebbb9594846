"""A run directory on S3 (a moto server on loopback): what a step reads is staged, what it
wrote is published only when it succeeds, and a store that cannot be used is one line."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import boto3
import fsspec
import pytest
from s3fs import S3FileSystem

from noisy_student import storage
from noisy_student.cli import main
from tests.e2e.conftest import free_port
from tests.e2e.scale import S3_ENV
from tests.test_preflight import params

pytestmark = pytest.mark.e2e


@pytest.fixture
def bucket(s3: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    for name, value in s3.items():
        monkeypatch.setenv(name, value)
    boto3.client("s3").create_bucket(Bucket="store")
    fsspec.filesystem("s3").invalidate_cache()
    return "s3://store/runs/abc"


def test_a_step_publishes_its_files_only_when_it_succeeds(bucket: str) -> None:
    fs = fsspec.filesystem("s3")
    fs.pipe(f"{bucket.removeprefix('s3://')}/models/iter_0/metrics.json", b"{}")
    fs.pipe(f"{bucket.removeprefix('s3://')}/pseudo/iter_1/shards/part-x.parquet", b"x")
    with storage.staged(bucket, storage.step_needs("label", 1), "label") as layout:
        root = layout.root
        assert layout.origin == bucket
        assert (root / "models/iter_0/metrics.json").read_bytes() == b"{}"
        assert not (root / "pseudo").exists()  # a shard's parts only when merging
        (root / "pseudo/iter_1").mkdir(parents=True)
        (root / "pseudo/iter_1/pseudo_labels.parquet").write_bytes(b"rows")
        (root / "pseudo/iter_1/metrics.json").write_bytes(b"{}")
    assert storage.exists(storage.join(bucket, "pseudo/iter_1/pseudo_labels.parquet"))
    with pytest.raises(RuntimeError), storage.staged(bucket, [], "report") as layout:
        (layout.root / "report").mkdir()
        (layout.root / "report/report.md").write_text("half")
        raise RuntimeError("the step failed")
    assert not storage.exists(storage.join(bucket, "report"))


def test_publish_sends_the_records_last(tmp_path: Path, bucket: str) -> None:
    for name in ("b/metrics.json", "b/model.pt", "a/stats-1.json", "a/part-1.parquet"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    order = storage.publish(bucket, tmp_path, {}, "train")
    assert order == ["a/part-1.parquet", "b/model.pt", "a/stats-1.json", "b/metrics.json"]


def test_a_store_that_cannot_be_used_is_one_line(
    bucket: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    storage.check_root(bucket)
    with pytest.raises(storage.StorageError, match="bucket 'nobucket' does not exist"):
        storage.check_root("s3://nobucket/runs")
    assert main(["--run-dir", "s3://nobucket/runs", "prepare"]) == 2
    assert capsys.readouterr().err == (
        "noisy-student: --run-dir s3://nobucket/runs: bucket 'nobucket' does not exist\n"
    )
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    fsspec.filesystem("s3").clear_instance_cache()
    with pytest.raises(storage.StorageError, match="no credentials for the object store"):
        storage.check_root(bucket)
    with pytest.raises(storage.StorageError, match="no MLflow server answers"):
        storage.check_tracking_server("http://127.0.0.1:9")


@pytest.fixture
def store_that_stops(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """A moto server of this test alone, in this process, so the test can stop it (one
    attempt per request: botocore's retries would only slow the failure down)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for name, value in {**S3_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    S3FileSystem.clear_instance_cache()
    boto3.client("s3").create_bucket(Bucket="down")
    try:
        yield server
    finally:
        server.stop()
        S3FileSystem.clear_instance_cache()


def test_a_store_that_goes_down_mid_step_is_one_line_naming_the_run_and_file(
    store_that_stops,
) -> None:
    url = "s3://down/runs/abc"
    fs = fsspec.filesystem("s3")
    fs.pipe("down/runs/abc/splits/labeled.parquet", b"rows")
    needs = storage.step_needs("train", 0)
    with pytest.raises(storage.StorageError) as err, storage.staged(url, needs, "train") as layout:
        layout.model_dir(0).mkdir(parents=True)
        (layout.model_dir(0) / "model.pt").write_bytes(b"weights")
        (layout.model_dir(0) / "metrics.json").write_text("{}")
        store_that_stops.stop()
    message = str(err.value)
    assert message.startswith(
        f"run directory {url}: train: withdrawing the old record "
        f"{url}/models/iter_0/metrics.json failed (EndpointConnectionError: "
    ), message
    assert "noisy-student-run-" not in message and "\n" not in message
    with pytest.raises(storage.StorageError) as err, storage.staged(url, needs, "train"):
        pass
    assert str(err.value).startswith(
        f"run directory {url}: train: listing splits/ failed (EndpointConnectionError: "
    )


def test_a_bucket_emptied_between_steps_names_the_missing_file_by_its_url(
    bucket: str, tmp_path: Path, digits_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = params(tmp_path, digits_root, **{"data.labeled_per_class": 5, "device": "cpu"})
    argv = ["--params", str(path), "--run-dir", bucket]
    assert main([*argv, "prepare"]) == 0
    fs = fsspec.filesystem("s3")
    fs.rm(bucket, recursive=True)
    capsys.readouterr()
    assert main([*argv, "train", "--iteration", "0", "--no-mlflow"]) == 2
    # named by its URL in the bucket (never the deleted staging copy), with the step to run
    assert capsys.readouterr().err.splitlines() == [
        f"noisy-student: train: the run has no splits ({bucket}/splits/labeled.parquet): "
        "run `noisy-student prepare`"
    ]
    assert not fs.exists(f"{bucket}/models")


def test_a_republished_model_never_pairs_with_the_old_record(
    store_that_stops, caplog: pytest.LogCaptureFixture
) -> None:
    """The server's own request log: the old record is deleted before the new model.pt is
    uploaded, so a publish that fails in between leaves a model without a record."""
    url = "s3://down/runs/abc"
    fs = fsspec.filesystem("s3")
    fs.pipe("down/runs/abc/models/iter_0/model.pt", b"old weights")
    fs.pipe("down/runs/abc/models/iter_0/metrics.json", b'{"old": true}')
    caplog.set_level("INFO", logger="werkzeug")
    with storage.staged(url, ["models/"], "train") as layout:
        (layout.model_dir(0) / "model.pt").write_bytes(b"new weights")
        (layout.model_dir(0) / "metrics.json").write_text('{"new": true}')
    request = re.compile(r"(PUT|DELETE) (\S+) HTTP")  # werkzeug colours some lines
    requests = [found.groups() for line in caplog.messages if (found := request.search(line))]
    prefix = "/down/runs/abc/models/iter_0"
    assert requests[-3:] == [
        ("DELETE", f"{prefix}/metrics.json"),
        ("PUT", f"{prefix}/model.pt"),
        ("PUT", f"{prefix}/metrics.json"),
    ]
    assert fs.cat("down/runs/abc/models/iter_0/metrics.json") == b'{"new": true}'
