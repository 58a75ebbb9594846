"""Untrusted models never run code, and a checkpoint's stored config is held to the schema's
bounds before anything is built.

A payload (a pickled object whose ``__reduce__`` creates a marker file) is planted where a
model is read from: as the pickled ``model.pth`` of an MLflow model (which MLflow's own
loader unpickles: the first test shows it does), and as the project checkpoint itself.
Every way in (``predict`` with ``models:/``, ``runs:/``, a folder, a file;
``teacher.pretrained: models:/...``) refuses it with one line, and the marker never appears.
The store is a real sqlite MLflow store in ``tmp_path``."""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import mlflow.pytorch
import pytest
import torch

from noisy_student import cli
from noisy_student import models as models_module
from noisy_student.config import ConfigError, load_config
from noisy_student.inference import ModelSourceError
from noisy_student.io import save_torch
from noisy_student.models import (
    MAX_CHECKPOINT_BYTES,
    CheckpointError,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from noisy_student.tracking import use_experiment
from noisy_student.transfer import load_pretrained
from tests.test_tracking import mlflow_store


class Payload:
    """Unpickling this creates ``marker``: what an attacker's code would do, harmlessly."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


def plant(folder: Path, marker: Path) -> Path:
    """An MLflow PyTorch model folder (pickle format) whose ``data/model.pth`` is a payload."""
    model = build_model(num_classes=3, in_channels=1)
    mlflow.pytorch.save_model(
        model, str(folder), serialization_format="pickle", pip_requirements=["torch"]
    )
    torch.save(Payload(marker), folder / "data" / "model.pth")
    return folder


@dataclass
class Planted:
    root: Path
    marker: Path  # appears only if a payload runs
    folder: Path  # a local MLflow model folder holding the payload as data/model.pth
    payload_file: Path  # the payload as a lone .pt file
    uri: str  # MLFLOW_TRACKING_URI of the store


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Planted]:
    root = tmp_path_factory.mktemp("planted")
    marker = root / "PAYLOAD_RAN"
    folder = plant(root / "mlflow-model", marker)
    payload_file = root / "payload.pt"
    torch.save(Payload(marker), payload_file)
    swapped_checkpoint = root / "swapped" / "model.pt"
    swapped_checkpoint.parent.mkdir()
    torch.save(Payload(marker), swapped_checkpoint)
    with mlflow_store(root) as client:
        use_experiment("planted")
        with mlflow.start_run() as run:  # the MLflow model is the payload; no checkpoint
            mlflow.log_artifacts(str(folder), "model")
        with mlflow.start_run() as swapped:  # the project checkpoint swapped for the payload
            mlflow.log_artifacts(str(folder), "model")
            mlflow.log_artifact(str(swapped_checkpoint), "checkpoint")
        for name, source in (("planted", run), ("swapped", swapped)):
            client.create_registered_model(name)
            uri = f"{source.info.artifact_uri}/model"
            version = client.create_model_version(name, uri, run_id=source.info.run_id)
            client.set_registered_model_alias(name, "champion", version.version)
        yield Planted(root, marker, folder, payload_file, os.environ["MLFLOW_TRACKING_URI"])
    assert not marker.exists(), "a planted payload ran"


def run_ids(planted: Planted) -> dict[str, str]:
    client = mlflow.MlflowClient(planted.uri)
    return {
        name: client.get_model_version_by_alias(name, "champion").run_id
        for name in ("planted", "swapped")
    }


def test_mlflow_own_loader_would_run_the_planted_payload(tmp_path: Path) -> None:
    """The threat is real: MLflow's PyTorch loader unpickles a planted model.pth."""
    marker = tmp_path / "ran"
    folder = plant(tmp_path / "model", marker)
    with contextlib.suppress(Exception):  # what the payload returns is no model
        mlflow.pytorch.load_model(str(folder))
    assert marker.exists()


def sources(planted: Planted) -> dict[str, str]:
    ids = run_ids(planted)
    return {
        "runs:/ with a pickled model": f"runs:/{ids['planted']}/model",
        "models:/@alias with a pickled model": "models:/planted@champion",
        "models:/version with a pickled model": "models:/planted/1",
        "runs:/ with a swapped checkpoint": f"runs:/{ids['swapped']}/model",
        "models:/@alias with a swapped checkpoint": "models:/swapped@champion",
        "a local MLflow model folder": str(planted.folder),
        "a payload file": str(planted.payload_file),
    }


CASES = [
    "runs:/ with a pickled model",
    "models:/@alias with a pickled model",
    "models:/version with a pickled model",
    "runs:/ with a swapped checkpoint",
    "models:/@alias with a swapped checkpoint",
    "a local MLflow model folder",
    "a payload file",
]


@pytest.mark.parametrize("case", CASES)
def test_predict_refuses_every_planted_payload(
    planted: Planted, case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = sources(planted)[case]
    image = tmp_path / "x.png"
    image.write_bytes(b"")  # never reached
    with mlflow_store(planted.root):
        assert cli.main(["predict", "--model", source, str(image)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and source in err[0], err
    assert "refused" in err[0] or "never a pickled" in err[0] or "could run code" in err[0]
    assert not planted.marker.exists()


def test_predict_command_refuses_a_planted_model_without_a_traceback(
    planted: Planted, tmp_path: Path
) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": planted.uri}
    result = subprocess.run(
        [sys.executable, "-m", "noisy_student.cli", "predict", "--model"]
        + ["models:/planted@champion", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "models:/planted@champion" in line and "checkpoint/model.pt" in line
    assert "model/data/model.pth" in line  # what the run holds instead
    assert not planted.marker.exists()


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ("models:/planted@champion", ModelSourceError),
        ("models:/swapped@champion", CheckpointError),
        ("models:/planted/1", ModelSourceError),
    ],
)
def test_pretrained_from_mlflow_refuses_planted_payloads(
    planted: Planted, source: str, error: type[Exception]
) -> None:
    with mlflow_store(planted.root), pytest.raises(error, match=source):
        load_pretrained(build_model(num_classes=3, in_channels=1), source)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_pretrained(build_model(num_classes=3, in_channels=1), planted.payload_file)
    assert not planted.marker.exists()


def checkpoint_with(tmp_path: Path, **config: object) -> Path:
    model = build_model(num_classes=3, in_channels=1)
    ckpt = save_checkpoint(model)
    ckpt["config"].update(config)
    path = tmp_path / "model.pt"
    save_torch(path, ckpt)
    return path


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"evil": 1}, r"evil: unknown key; allowed keys here: arch, num_classes, in_channels"),
        ({"width": 400.0}, r"width: Input should be less than or equal to 8"),
        ({"depth": 20.0}, r"depth: Input should be less than or equal to 4"),
        ({"arch": "resnet9000"}, r"arch: Input should be 'small_resnet'"),
        ({"num_classes": 10**9}, r"num_classes: Input should be less than or equal to 100000"),
        ({"in_channels": 7}, r"in_channels: Input should be 1 or 3"),
        ({"num_classes": True}, r"num_classes: Input should be a valid integer"),
    ],
)
def test_a_checkpoint_config_outside_the_schema_is_refused_before_building(
    tmp_path: Path, config: dict[str, object], message: str
) -> None:
    path = checkpoint_with(tmp_path, **config)
    with pytest.raises(CheckpointError, match=message) as err:
        load_checkpoint(str(path))
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(build_model(num_classes=3, in_channels=1), path)


def test_predict_refuses_an_oversized_checkpoint_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = checkpoint_with(tmp_path, width=400.0, depth=20.0)
    assert cli.main(["predict", "--model", str(path), str(tmp_path)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "width" in line and "depth" in line and str(path) in line


def test_a_checkpoint_with_unknown_top_level_keys_is_refused(tmp_path: Path) -> None:
    ckpt = {**save_checkpoint(build_model(num_classes=3)), "hook": "x"}
    save_torch(tmp_path / "m.pt", ckpt)
    with pytest.raises(CheckpointError, match="unknown checkpoint key hook; allowed: config"):
        load_checkpoint(str(tmp_path / "m.pt"))


def test_params_bound_the_model_size() -> None:
    with pytest.raises(ConfigError, match=r"teacher\.width: .*less than or equal to 8"):
        load_config(None, {"teacher.width": 9.0})
    with pytest.raises(ConfigError, match=r"iterations\.2\.depth: .*less than or equal to 4"):
        load_config(None, {"iterations.2.depth": 5.0})


def _declare_entry_size(path: Path, name_part: bytes, size: int) -> None:
    """Rewrite the uncompressed size the zip's central directory declares for the first
    entry whose name holds ``name_part``: what a hand-made hostile archive says."""
    data = bytearray(path.read_bytes())
    end = data.rindex(b"PK\x05\x06")
    offset = struct.unpack_from("<I", data, end + 16)[0]
    while data[offset : offset + 4] == b"PK\x01\x02":
        name_len, extra_len, comment_len = struct.unpack_from("<3H", data, offset + 28)
        if name_part in data[offset + 46 : offset + 46 + name_len]:
            struct.pack_into("<I", data, offset + 24, size)
            path.write_bytes(bytes(data))
            return
        offset += 46 + name_len + extra_len + comment_len
    raise AssertionError(f"no entry {name_part!r} in {path}")


def test_a_checkpoint_archive_declaring_gigabytes_is_refused_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A small checkpoint whose zip directory declares a 3 GiB tensor storage is refused
    from the directory, before torch.load allocates it; `predict` says so in one line."""
    path = checkpoint_with(tmp_path)
    _declare_entry_size(path, b"/data/0", 3 * 1024**3)
    assert path.stat().st_size < 1024**2
    with pytest.raises(CheckpointError, match=r"its entries inflate to 32\d{8} bytes"):
        load_checkpoint(str(path))
    assert cli.main(["predict", "--model", str(path), str(tmp_path)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert str(path) in line and f"at most {MAX_CHECKPOINT_BYTES}" in line


def test_a_checkpoint_holding_a_compression_bomb_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry deflated from 64 MiB of zeros (64 KiB on disk) counts at its inflated size;
    the bound is lowered to 32 MiB so that the bomb stays small enough to build quickly."""
    monkeypatch.setattr(models_module, "MAX_CHECKPOINT_BYTES", 32 * 1024**2)
    path = checkpoint_with(tmp_path)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        archive.writestr("archive/data/99", bytes(64 * 1024**2))
    with pytest.raises(CheckpointError, match=f"{path}: its entries inflate to 6"):
        load_checkpoint(str(path))


def test_a_legacy_format_checkpoint_is_refused(tmp_path: Path) -> None:
    """torch's pre-1.6 format allocates whatever storage sizes its pickle declares."""
    path = tmp_path / "legacy.pt"
    ckpt = save_checkpoint(build_model(num_classes=3))
    torch.save(ckpt, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="not a torch checkpoint archive"):
        load_checkpoint(str(path))


INJECTING_NAME = "x' and tags.task_key != 'y"  # as a filter: name = 'x' and tags.task_key != 'y'


def test_a_registered_model_name_cannot_change_a_search_filter(planted: Planted) -> None:
    """Refused by the schema before any work, and by the registry before any search: a quote
    in the name would change what ``name = '<name>'`` selects."""
    from noisy_student.registry import check_task, name_filter, version_of_file

    with pytest.raises(ConfigError, match=r"tracking\.registered_model: .*allowed: letters"):
        load_config(None, {"tracking.registered_model": INJECTING_NAME})
    client = mlflow.MlflowClient(planted.uri)
    for search in (
        lambda: check_task(client, INJECTING_NAME, "task"),
        lambda: version_of_file(client, INJECTING_NAME, "0" * 64),
    ):
        with pytest.raises(ValueError, match="no MLflow search is built from it"):
            search()
    assert name_filter("planted") == "name = 'planted'"
    assert version_of_file(client, "planted", "0" * 64) is None  # a real search, nothing found


def test_a_checkpoint_whose_weights_do_not_fit_its_model_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Weights of another width under a width-1 config, or with a key missing: one line
    naming the file (torch's load_state_dict raised a RuntimeError of a line per key)."""
    ckpt = save_checkpoint(build_model(num_classes=3, in_channels=1))
    wider = {
        **ckpt,
        "state_dict": build_model(num_classes=3, in_channels=1, width=2.0).state_dict(),
    }
    save_torch(tmp_path / "wider.pt", wider)
    state = dict(ckpt["state_dict"])
    del state["head.3.weight"]
    save_torch(tmp_path / "missing.pt", {**ckpt, "state_dict": state})
    for name, message in (
        ("wider.pt", r"tensors of another shape \(first: stem.0.weight \(32, 1, 3, 3\) != \(16,"),
        ("missing.pt", r"1 missing keys \(first: head.3.weight\)"),
    ):
        path = tmp_path / name
        with pytest.raises(CheckpointError, match=message) as err:
            load_checkpoint(str(path))
        assert str(err.value).startswith(f"{path}: its weights do not fit the model (small_resnet")
        assert cli.main(["predict", "--model", str(path), str(tmp_path)]) == 2
        [line] = capsys.readouterr().err.strip().splitlines()
        assert "do not fit the model" in line and str(path) in line


def test_a_planted_or_mismatched_teacher_is_refused_in_one_line_by_every_step_loading_it(
    tmp_path: Path,
    digits_root: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The teacher's model.pt swapped for a payload, a model of another width or of other
    classes: labeling, a student starting from its teacher and online distillation each
    refuse it in one line naming the file, exit 2, before training; the payload never runs."""
    from noisy_student import pipeline
    from noisy_student.io import write_parquet
    from noisy_student.runs import RunLayout
    from noisy_student.shards import empty_manifest
    from tests.test_preflight import params, refused

    monkeypatch.setenv("NOISY_STUDENT_MLFLOW", "off")
    marker = tmp_path / "PAYLOAD_RAN"
    for change in ("init", "online"):
        (tmp_path / change).mkdir()
    layout = RunLayout(tmp_path / "run")
    plain = params(tmp_path, digits_root)
    pipeline.prepare(load_config(plain), layout)
    write_parquet(layout.pseudo_dir(1) / "pseudo_labels.parquet", empty_manifest("soft", 10))
    teacher = layout.model_dir(0) / "model.pt"
    teacher.parent.mkdir(parents=True)
    run = ["--run-dir", str(layout.root)]
    steps = {
        "labeling": ["--params", str(plain), *run, "pseudo-label", "--iteration", "1"],
        **{
            change: [
                "--params",
                str(
                    params(
                        tmp_path / change,
                        digits_root,
                        **{f"student.{key}": value, "iterations.2.width": 1.0},
                    )
                ),
                *run,
                "train",
                "--iteration",
                "1",
            ]
            for change, key, value in (
                ("init", "init", "teacher"),
                ("online", "distillation", "online"),
            )
        },
    }
    plants = {
        "payload": (Payload(marker), "refused, it holds more than tensors and numbers"),
        "3 classes": (
            save_checkpoint(build_model(num_classes=3, in_channels=1)),
            "a model of 3 classes and 1 channels; this run's data has 10 classes",
        ),
    }
    for what, (content, message) in plants.items():
        torch.save(content, teacher)
        for step, argv in steps.items():
            line = refused(capsys, argv, f"{teacher}: ", message)
            assert line.startswith("noisy-student: "), (what, step)
    wider = save_checkpoint(build_model(num_classes=10, in_channels=1, width=2.0))
    torch.save(wider, teacher)
    refused(
        capsys,
        steps["init"],
        f"{teacher} (student.init: teacher): its weights do not fit the model (small_resnet, "
        "width 1, depth 1)",
    )
    assert not marker.exists()
    assert (
        not (layout.model_dir(1)).exists() and not (layout.pseudo_dir(1) / "metrics.json").exists()
    )
