"""What a run would fail on later is caught before any work, by `noisy-student validate`
and at the start of every step: one line naming the key, exit status 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from PIL import Image

from noisy_student import cli
from noisy_student.config import Config, ConfigError
from noisy_student.data import fetch
from noisy_student.io import save_torch
from noisy_student.models import build_model, save_checkpoint


def params(tmp_path: Path, digits_root: Path, **changes: object) -> Path:
    """params.yaml with the defaults, the digits at ``digits_root`` and dotted ``changes``."""
    tree = Config().model_dump(mode="json")
    tree["data"]["root"] = str(digits_root)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = tree
        for part in parents:
            node = node[part]
        node[last] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def refused(capsys: pytest.CaptureFixture[str], argv: list[str], *expected: str) -> str:
    """Run the CLI; assert exit 2 and one line of stderr holding ``expected``."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def test_validate_passes_good_params(
    tmp_path: Path, digits_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--params", str(params(tmp_path, digits_root)), "validate"]) == 0
    assert "labeled_per_class: 5" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(
    tmp_path: Path, digits_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = params(tmp_path, digits_root, device="cuda")
    for step in (["validate"], ["train", "--iteration", "0"], ["run"]):
        refused(capsys, ["--params", str(path), *step], "device: 'cuda'", "'cpu'")


def test_pretrained_sources_that_do_not_exist_or_fit(
    tmp_path: Path, digits_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_torch(tmp_path / "r18.pt", save_checkpoint(build_model("resnet18", num_classes=3)))
    cases = {
        str(tmp_path / "absent.pt"): "is not a file",
        str(tmp_path / "r18.pt"): "matches the model (small_resnet)",
        "torchvision:IMAGENET1K_V1": "arch 'small_resnet' has no torchvision weights",
        "models:/absent@champion": "models:/absent@champion",
    }
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(store).search_experiments()  # an empty store, created beforehand
    capsys.readouterr()
    for source, message in cases.items():
        path = params(tmp_path, digits_root, **{"teacher.pretrained": source})
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", store)
            refused(capsys, ["--params", str(path), "validate"], "teacher.pretrained: ", message)
    path = params(tmp_path, digits_root, **{"teacher.arch": "resnet18", "teacher.width": 1.0})
    text = yaml.safe_load(path.read_text())
    text["teacher"]["pretrained"] = "torchvision:NOPE"
    text["iterations"] = {}
    path.write_text(yaml.safe_dump(text))
    refused(capsys, ["--params", str(path), "validate"], "resnet18 has no torchvision weights")


def test_a_good_pretrained_checkpoint_passes(
    tmp_path: Path, digits_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_torch(tmp_path / "own.pt", save_checkpoint(build_model(num_classes=4)))
    path = params(tmp_path, digits_root, **{"teacher.pretrained": str(tmp_path / "own.pt")})
    assert cli.main(["--params", str(path), "validate"]) == 0


def test_labeled_per_class_larger_than_a_class_names_it(
    tmp_path: Path, digits_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = params(tmp_path, digits_root, **{"data.labeled_per_class": 200})
    for step in ("validate", "prepare"):
        refused(
            capsys,
            ["--params", str(path), "--run-dir", str(tmp_path / "run"), step],
            "data.labeled_per_class: class '",
            "has ",
        )
    assert not (tmp_path / "run").exists()


def test_imagefolder_class_too_small_is_named_by_its_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = tmp_path / "photos"
    for folder, count in (("labeled/cat", 8), ("labeled/dog", 3), ("unlabeled", 2)):
        (tree / folder).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(tree / folder / f"{i}.png")
    fetch("imagefolder", tmp_path / "data", directory=tree)
    path = params(
        tmp_path,
        tmp_path / "data",
        **{
            "data.source": "imagefolder",
            "data.cap_labeled": True,
            "data.labeled_per_class": 2,
            "data.val_per_class": 1,
            "data.test_per_class": 1,
        },
    )
    refused(capsys, ["--params", str(path), "validate"], "class 'dog' has 3 images")


def test_missing_data_root(
    tmp_path: Path, digits_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = params(tmp_path, tmp_path / "nowhere")
    refused(capsys, ["--params", str(path), "validate"], "data.root: ", "data fetch")


def test_a_data_root_too_long_for_the_file_system(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = params(tmp_path, tmp_path / ("x" * 300))
    refused(capsys, ["--params", str(path), "validate"], "data.root: File name too long: ")


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"tracking.registered_model": ""}, "tracking.registered_model: String should have"),
        ({"tracking.registered_model": "it's"}, 'tracking.registered_model: "it\'s": it'),
        ({"tracking.registered_model": "team/m"}, "tracking.registered_model: 'team/m': it"),
        ({"tracking.experiment": "e" * 501}, "tracking.experiment: String should have at most"),
        ({"train.epochs": True}, "train.epochs: Input should be a valid integer (got True)"),
        ({"train.lr": "fast"}, "train.lr: Input should be a valid number"),
        ({"data.hflip": "yes"}, "data.hflip: Input should be a valid boolean"),
        ({"teacher.epochs": 10**9}, "teacher.epochs: Input should be less than or equal to"),
        ({"pseudo_label.balance": 10**12}, "pseudo_label.balance: Input should be less than"),
        ({"noise.cutmix_alpha": float("inf")}, "noise.cutmix_alpha: Input should be a finite"),
        ({"teacher.unlabeled_ratio": float("inf")}, "teacher.unlabeled_ratio: Input should be"),
        ({"train.lr": float("nan")}, "train.lr: Input should be a finite number"),
        ({"seed": 2**32}, "seed: Input should be less than or equal to 4294967195"),
        (
            {"teacher.method": "fixmatch", "train.batch_size": 8192},
            "teacher.unlabeled_ratio: a FixMatch step holds",
        ),
    ],
)
def test_schema_values(
    tmp_path: Path,
    digits_root: Path,
    capsys: pytest.CaptureFixture[str],
    changes: dict[str, object],
    expected: str,
) -> None:
    path = params(tmp_path, digits_root, **changes)
    refused(capsys, ["--params", str(path), "validate"], expected)


def test_exponent_floats_read_as_floats_as_dvc_reads_them(
    tmp_path: Path, digits_root: Path
) -> None:
    path = params(tmp_path, digits_root)
    path.write_text(path.read_text().replace("weight_decay: 0.0005", "weight_decay: 5e-4"))
    from noisy_student.config import load_config

    assert load_config(path).train.weight_decay == 5e-4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train:\n  epochs: [1\n", "params.yaml:3:1: YAML error"),
        ("train:\n\tepochs: 2\n", "params.yaml:2:1: YAML error"),
        ("train:\n  epochs: 2\n  epochs: 3\n", "params.yaml:3:3: duplicate key 'epochs'"),
        ("train: {epochs: 2}\ntrain: {epochs: 3}\n", "params.yaml:2:1: duplicate key 'train'"),
    ],
    ids=["syntax", "tab", "duplicate", "duplicate-section"],
)
def test_yaml_problems_name_file_line_and_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    line = refused(capsys, ["--params", str(path), "validate"], expected)
    if "\t" in text:
        assert "indent YAML with spaces" in line


BOMB = "".join(
    ['l0: &l0 ["lol", "lol", "lol"]\n']
    + [f"l{i}: &l{i} [*l{i - 1}, *l{i - 1}, *l{i - 1}]\n" for i in range(1, 4)]
    + ["data: {root: *l3}\n"]
)


def test_an_alias_bomb_in_params_is_refused_at_its_first_alias(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(BOMB)
    refused(
        capsys, ["--params", str(path), "validate"], f"{path}:2:10: YAML error: alias *l0: aliases"
    )


def test_params_that_never_end_or_are_huge_are_refused_unread(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    huge = tmp_path / "huge.yaml"
    with huge.open("wb") as stream:
        stream.truncate((1 << 20) + 1)  # sparse: nothing is written
    refused(capsys, ["--params", str(huge), "validate"], f"{huge}: larger than 1048576 bytes")
    refused(capsys, ["--params", "/dev/zero", "validate"], "/dev/zero: not a regular file")
    fifo = tmp_path / "params.fifo"
    os.mkfifo(fifo)
    # A writer, so that reading the pipe (the fault) would end instead of hanging the test.
    writer = threading.Thread(target=fifo.write_text, args=("seed: 1\n",), daemon=True)
    writer.start()
    try:
        refused(capsys, ["--params", str(fifo), "validate"], f"{fifo}: not a regular file")
    finally:
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # lets the writer finish
        writer.join(timeout=10)


def test_a_folder_as_params(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refused(capsys, ["--params", str(tmp_path), "prepare"], f"{tmp_path}: is a folder")


def test_the_command_line_prints_no_traceback(tmp_path: Path, digits_root: Path) -> None:
    path = params(tmp_path, digits_root, **{"train.epochs": True})
    result = subprocess.run(
        [sys.executable, "-m", "noisy_student.cli", "--params", str(path), "train"]
        + ["--iteration", "0"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"noisy-student: invalid parameters in {path}: train.epochs: Input should be a valid "
        "integer (got True)"
    ]


def test_the_prefect_flow_checks_before_any_task(tmp_path: Path, digits_root: Path) -> None:
    from flows.noisy_student import noisy_student

    path = params(tmp_path, tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="data.root: "):
        noisy_student.fn(params_file=str(path), runs_root=str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()
