"""The registered champion classifies like its checkpoint, from Python and through
`noisy-student predict` on image files, a corrupt one skipped and reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from noisy_student import cli
from noisy_student.data import load_images
from noisy_student.engine import precision, predict_proba
from noisy_student.inference import (
    PREDICT_BATCH_BYTES,
    InferenceModel,
    bytes_per_image,
    classify,
    fitting_batch,
)
from noisy_student.io import save_torch
from noisy_student.models import build_model, load_checkpoint, save_checkpoint
from noisy_student.tracking import log_pipeline_run
from tests.test_tracking import MODEL_NAME, mlflow_store, tiny_run

CHAMPION = f"models:/{MODEL_NAME}@champion"
NUM_IMAGES = 12


@dataclass
class Champion:
    checkpoint: Path
    images: Path  # a folder of test digits in <true label>/<image id>.png, and broken.png
    expected: dict[str, int]  # file path -> the checkpoint's class for that image
    test_ids: np.ndarray
    tracking_uri: str


def checkpoint_classes(checkpoint: Path, images: np.ndarray) -> np.ndarray:
    probs = predict_proba(load_checkpoint(str(checkpoint)), images, torch.device("cpu"))
    return probs.argmax(dim=-1).numpy()


@pytest.fixture(scope="module")
def champion(tmp_path_factory: pytest.TempPathFactory, digits_root: Path) -> Iterator[Champion]:
    root = tmp_path_factory.mktemp("predict")
    with mlflow_store(root) as client:
        cfg, layout = tiny_run(root, digits_root)
        log_pipeline_run(cfg, layout, "library")
        iteration = int(client.get_model_version_by_alias(MODEL_NAME, "champion").tags["iteration"])
        checkpoint = layout.model_dir(iteration) / "model.pt"
        data = load_images(cfg.data.source, cfg.data.root)
        test = pd.read_parquet(layout.splits / "test.parquet")
        ids = test["image_id"].to_numpy()[:NUM_IMAGES]
        classes = checkpoint_classes(checkpoint, data.images[ids])
        folder = root / "images"
        expected = {}
        for image_id, label, predicted in zip(ids, data.labels[ids], classes, strict=True):
            path = folder / str(label) / f"{image_id}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(data.images[image_id, 0]).save(path)  # native 8x8 grey
            expected[str(path)] = int(predicted)
        (folder / "broken.png").write_bytes(b"not a png")
        (folder / "notes.txt").write_text("not an image, not counted")
        uri = os.environ["MLFLOW_TRACKING_URI"]
        yield Champion(checkpoint, folder, expected, test["image_id"].to_numpy(), uri)


def test_champion_predicts_like_its_checkpoint_on_any_batch_size(
    champion: Champion, digits_root: Path
) -> None:
    model = mlflow.pytorch.load_model(CHAMPION)
    images = load_images("digits", digits_root).images[champion.test_ids]
    with precision("fp32"):  # MLflow's model runs as loaded, in float32
        expected = checkpoint_classes(champion.checkpoint, images)
    batch = torch.from_numpy(images).float() / 255.0
    with torch.inference_mode():
        for size in (1, 3, len(batch)):
            preds = torch.cat([model(part) for part in batch.split(size)]).argmax(dim=-1)
            np.testing.assert_array_equal(preds.numpy(), expected, err_msg=f"batch {size}")


def test_predict_command_with_the_champion_writes_a_csv(champion: Champion, tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    env = {**os.environ, "MLFLOW_TRACKING_URI": champion.tracking_uri, "OMP_NUM_THREADS": "1"}
    command = ["predict", "--model", CHAMPION, str(champion.images), "--output", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "noisy_student.cli", *command, "--batch-size", "5"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "broken.png" in result.stderr
    assert f"{NUM_IMAGES} images classified, 1 skipped" in result.stderr
    assert f"{CHAMPION}: 1-channel 8x8 images -> 10 classes: 0, 1, 2," in result.stderr
    table = pd.read_csv(out, dtype={"class": str})
    assert table.columns.tolist() == ["path", "class", "class_index", "confidence"]
    assert sorted(table["path"]) == sorted(champion.expected)
    assert dict(zip(table["path"], table["class_index"], strict=True)) == champion.expected
    assert (table["class"] == table["class_index"].astype(str)).all()  # digits' names: "0".."9"
    assert table["confidence"].between(0.1, 1.0).all()  # at least uniform over 10 classes


def test_predict_with_a_checkpoint_and_class_names(
    champion: Champion, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    (tmp_path / "names.json").write_text(json.dumps(names))
    path, index = next(iter(champion.expected.items()))
    args = ["predict", "--model", str(champion.checkpoint), "--size", "8", "--classes"]
    assert cli.main([*args, str(tmp_path / "names.json"), path]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[:2] == [path, names[index]]


def test_predict_fails_when_nothing_is_readable(
    champion: Champion, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = str(champion.images / "broken.png")
    assert cli.main(["predict", "--model", str(champion.checkpoint), broken]) == 1
    assert "0 images classified, 1 skipped" in capsys.readouterr().err


def test_predict_refuses_a_size_the_logged_model_does_not_take(
    champion: Champion, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["predict", "--model", CHAMPION, "--size", "32", str(champion.images)]) == 2
    assert "takes 8x8 images" in capsys.readouterr().err


def test_predict_refuses_images_unlike_the_models_unless_told_to_convert(
    champion: Champion, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A colour photo for a grey model, or another size, is refused before any image is
    classified; --convert / --resize convert them with a warning."""
    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "colour.png")
    Image.new("L", (16, 16), 128).save(tmp_path / "big.png")
    model = ["predict", "--model", str(champion.checkpoint)]
    for name, flag, problem in (
        ("colour.png", "--convert", "1 colour (3-channel) images for a 1-channel model"),
        ("big.png", "--resize", "1 images not 8x8"),
    ):
        assert cli.main([*model, str(tmp_path / name)]) == 2
        captured = capsys.readouterr()
        assert problem in captured.err and flag in captured.err and "classified" not in captured.err
        assert captured.out == ""
        assert cli.main([*model, flag, str(tmp_path / name)]) == 0
        captured = capsys.readouterr()
        assert f"WARNING: {problem}" in captured.err and "converted" in captured.err
        assert name in captured.out


def test_predict_refuses_an_output_it_cannot_write_before_classifying(
    champion: Champion, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("")
    model = ["predict", "--model", str(champion.checkpoint), str(champion.images)]
    for output, problem in ((tmp_path, "is a folder"), (tmp_path / "file" / "p.csv", "is a file")):
        assert cli.main([*model, "--output", str(output)]) == 2
        [line] = capsys.readouterr().err.strip().splitlines()
        assert problem in line and "--output" in line


def test_predict_refuses_an_image_size_whose_one_image_needs_gigabytes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint within the schema's bounds recording 4096 px: one image would take
    3 GiB of activations, so predict refuses in one line before decoding any image."""
    model = build_model(num_classes=3, in_channels=1)
    save_torch(tmp_path / "model.pt", save_checkpoint(model, image_size=4096))
    Image.new("L", (8, 8), 10).save(tmp_path / "small.png")
    args = ["predict", "--model", str(tmp_path / "model.pt"), "--resize", str(tmp_path)]
    assert cli.main(args) == 2
    described, line = capsys.readouterr().err.strip().splitlines()  # what the model takes
    assert "1-channel 4096x4096 images" in described
    assert "one 4096x4096 image needs 3136 MiB" in line
    assert f"{PREDICT_BATCH_BYTES // 2**20} MiB predict allows" in line


def test_predict_shrinks_a_batch_that_would_take_gigabytes(tmp_path: Path) -> None:
    """256 images of 256 px through an 8-channel model would take 1.6 GiB: classified in
    batches under PREDICT_BATCH_BYTES instead, with a warning, and the same classes."""
    torch.manual_seed(0)
    module = build_model(num_classes=3, in_channels=1, width=0.5).eval()
    model = InferenceModel(module, 1, 256, None, "model.pt")
    fitting = fitting_batch(model, 256)
    assert fitting < 256 and fitting * bytes_per_image(model) <= PREDICT_BATCH_BYTES
    files = []
    for value in (0, 255):
        files.append(tmp_path / f"{value}.png")
        Image.new("L", (256, 256), value).save(files[-1])
    warnings: list[str] = []
    table, skipped = classify(model, files, batch_size=256, warn=warnings.append)
    assert warnings == [
        f"WARNING: a batch of 256 256x256 images would exceed 1024 MiB: {fitting} at a time"
    ]
    assert len(table) == 2 and not skipped
    expected, _ = classify(model, files, batch_size=1, warn=warnings.append)
    assert table["class_index"].tolist() == expected["class_index"].tolist()


@pytest.mark.parametrize(
    ("text", "problem"),
    [("zero, one, two", "not JSON (Expecting value"), ('{"0": "zero"}', "expected a JSON list")],
)
def test_predict_names_a_classes_file_that_is_not_a_json_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, problem: str
) -> None:
    save_torch(tmp_path / "model.pt", save_checkpoint(build_model(num_classes=3), image_size=8))
    Image.new("L", (8, 8), 10).save(tmp_path / "digit.png")
    (tmp_path / "names.txt").write_text(text)
    args = ["predict", "--model", str(tmp_path / "model.pt"), "--classes"]
    assert cli.main([*args, str(tmp_path / "names.txt"), str(tmp_path / "digit.png")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert f"--classes {tmp_path / 'names.txt'}: {problem}" in line
