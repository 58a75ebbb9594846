from __future__ import annotations

import math
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import get_args

import pytest
import yaml
from pydantic import BaseModel

from noisy_student.config import Config, ConfigError, IterationConfig, load_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_shipped_params_are_the_schema_defaults() -> None:
    assert load_config(REPO / "params.yaml") == Config()


def test_bad_value_names_key_and_allowed_values(tmp_path: Path) -> None:
    path = write(tmp_path, {"pseudo_label": {"mode": "medium"}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "pseudo_label.mode" in str(err.value)
    assert "'hard' or 'soft'" in str(err.value)
    assert "medium" in str(err.value)


def test_unknown_key_lists_allowed_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.epoks: unknown key.*epochs, batch_size"):
        load_config(write(tmp_path, {"train": {"epoks": 3}}))


def test_out_of_range_number_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"pseudo_label\.threshold: .*less than or equal to 1"):
        load_config(None, {"pseudo_label.threshold": 1.5})


def test_student_smaller_than_teacher_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"iterations\.2: .*equal to or larger than its teacher"):
        load_config(None, {"iterations.2.width": 0.5})


def test_iteration_keys_must_be_quoted_for_dvc(tmp_path: Path) -> None:
    tree = {"iterations": {1: {"teacher": 0}}}
    with pytest.raises(ConfigError, match="quote the keys"):
        load_config(write(tmp_path, tree))


def test_two_spellings_of_one_iteration_are_refused_naming_both(tmp_path: Path) -> None:
    for keys in (("1", "01"), ("01", "1"), ("1", " 1")):
        path = tmp_path / "params.yaml"
        path.write_text("iterations:\n" + "".join(f"  {k!r}: {{teacher: 0}}\n" for k in keys))
        first, second = (repr(k) for k in keys)
        message = rf"iterations: keys {first} and {second} are both iteration 1; keep one$"
        with pytest.raises(ConfigError, match=message):
            load_config(path)
        with pytest.raises(ConfigError, match=message):
            load_config(path, max_iterations=1)


@pytest.mark.parametrize("key", ["01", " 1", "+1", "1.0", "one", "1" * 40])
def test_iteration_keys_dvc_cannot_use_are_refused(tmp_path: Path, key: str) -> None:
    """DVC's foreach writes the key's text into each stage's paths (iter_01) while the step
    writes iter_1: such a key would pass validate and fail in `dvc repro` after training."""
    path = write(tmp_path, {"iterations": {key: {"teacher": 0}}})
    with pytest.raises(ConfigError, match=rf"iterations: key {re.escape(repr(key))}: DVC's"):
        load_config(path)
    with pytest.raises(ConfigError, match=rf"iterations: key {re.escape(repr(key))}: DVC's"):
        load_config(path, max_iterations=1)


def test_iterations_that_are_no_mapping_are_refused(tmp_path: Path) -> None:
    for value in (5, ["1"]):
        with pytest.raises(ConfigError, match=r"iterations: Input should be a valid dictionary"):
            load_config(write(tmp_path, {"iterations": value}), max_iterations=1)


def test_a_list_as_a_yaml_key_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("? [a]\n: 1\n")
    with pytest.raises(ConfigError, match=r"params\.yaml:1:3: YAML error: .*unhashable key"):
        load_config(path)


def test_iteration_teacher_must_be_previous() -> None:
    with pytest.raises(ConfigError, match=r"iterations\.2\.teacher: must be 1"):
        load_config(None, {"iterations.2.teacher": 0})


def test_overrides_and_max_iterations() -> None:
    cfg = load_config(REPO / "params.yaml", {"train.epochs": 3, "noise.dropout": 0.1}, 1)
    assert cfg.train.epochs == 3 and cfg.noise.dropout == 0.1
    assert list(cfg.iterations) == [1]
    assert cfg.epochs_for(1) == 3
    assert cfg.fingerprint() != Config().fingerprint()


def test_cli_refuses_bad_params_before_any_work(tmp_path: Path) -> None:
    params = write(tmp_path, {"noise": {"dropout": 2.0}})
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "noisy_student.cli",
            "--params",
            str(params),
            "--run-dir",
            str(run_dir),
            "prepare",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "noise.dropout" in result.stderr and "less than 1" in result.stderr
    assert not run_dir.exists()


def test_smaller_student_across_families_needs_allow_smaller() -> None:
    shrink = {
        "teacher.arch": "resnet18",
        "iterations.1.arch": "efficientnet_b0",
        "iterations.2.arch": "efficientnet_b0",
        "iterations.2.width": 1.0,
    }
    with pytest.raises(ConfigError, match=r"iterations\.1: .*resnet18.*efficientnet_b0"):
        load_config(None, shrink)
    cfg = load_config(None, {**shrink, "student.allow_smaller": True})
    assert cfg.iterations[1].arch == "efficientnet_b0"


def test_student_init_from_teacher_needs_students_of_the_teachers_size() -> None:
    with pytest.raises(ConfigError, match=r"student\.init: 'teacher' .*iterations\.2 must be"):
        load_config(None, {"student.init": "teacher"})  # student 2 is wider by default
    with pytest.raises(ConfigError, match=r"student\.init: .*'scratch' or 'teacher'"):
        load_config(None, {"student.init": "cold"})
    cfg = load_config(None, {"student.init": "teacher", "iterations.2.width": 1.0})
    assert cfg.student.init == "teacher"


def test_online_distillation_refuses_mixing() -> None:
    with pytest.raises(ConfigError, match="online.*cutmix_alpha"):
        load_config(None, {"student.distillation": "online", "noise.cutmix_alpha": 1.0})


def test_torchvision_arch_refuses_width() -> None:
    with pytest.raises(ConfigError, match=r"teacher: width/depth: only small_resnet scales"):
        load_config(None, {"teacher.arch": "resnet18", "teacher.width": 2.0})


def test_params_survive_a_yaml_rewrite(tmp_path: Path) -> None:
    """`dvc exp run -S` rewrites params.yaml: no value may turn into a YAML boolean."""
    tree = yaml.safe_load((REPO / "params.yaml").read_text())
    # Values as unquoted as a rewrite may leave them (keys stay quoted, as DVC keeps them).
    text = re.sub(r": '([^']*)'", r": \1", yaml.dump(tree, sort_keys=False))
    (tmp_path / "params.yaml").write_text(text)
    assert load_config(tmp_path / "params.yaml") == load_config(REPO / "params.yaml")


@pytest.mark.parametrize("preset", sorted((REPO / "presets").glob("*.yaml")), ids=lambda p: p.name)
def test_presets_are_valid(preset: Path) -> None:
    cfg = load_config(preset)
    assert cfg.data.source == "fashion_mnist" and cfg.iterations


def test_hflip_tta_needs_flip_invariant_labels() -> None:
    with pytest.raises(ConfigError, match=r"pseudo_label\.tta: 'hflip' .*data\.hflip: false"):
        load_config(None, {"pseudo_label.tta": "hflip"})  # digits: data.hflip is false
    with pytest.raises(ConfigError, match=r"pseudo_label\.tta: .*'none' or 'hflip'"):
        load_config(None, {"pseudo_label.tta": "rotate"})
    cfg = load_config(None, {"pseudo_label.tta": "hflip", "data.hflip": True})
    assert cfg.pseudo_label.tta == "hflip"


def test_teacher_cutmix_needs_strong_augmentation() -> None:
    needs_strong = r"teacher: cutmix_alpha: .*augment: 'strong', got 'weak'"
    with pytest.raises(ConfigError, match=needs_strong):
        load_config(None, {"teacher.cutmix_alpha": 1.0})
    cfg = load_config(None, {"teacher.cutmix_alpha": 1.0, "teacher.augment": "strong"})
    assert cfg.teacher.cutmix_alpha == 1.0


def numeric_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, type]]:
    """Every int and float parameter of ``model``, dotted as overrides name it (the
    iterations' through iteration 1)."""
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        kinds = set(get_args(field.annotation)) or {field.annotation}
        if name == "iterations":
            yield from numeric_fields(IterationConfig, f"{dotted}.1.")
        elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from numeric_fields(field.annotation, f"{dotted}.")
        elif float in kinds or int in kinds:
            yield dotted, float if float in kinds else int


NUMERIC_FIELDS = list(numeric_fields(Config))


def test_the_schema_walk_finds_every_section() -> None:
    sections = {dotted.split(".")[0] for dotted, _ in NUMERIC_FIELDS}
    assert {"seed", "data", "train", "teacher", "noise", "student", "pseudo_label"} <= sections
    assert "iterations.1.width" in dict(NUMERIC_FIELDS)


@pytest.mark.parametrize(("dotted", "kind"), NUMERIC_FIELDS, ids=[d for d, _ in NUMERIC_FIELDS])
def test_every_number_is_bounded_and_finite(dotted: str, kind: type) -> None:
    """A parameter added without an upper and a lower bound, or a float taking inf or nan,
    fails here: each such value is refused by the field itself, naming it."""
    refusals = {10**30: "less than", -(10**30): "greater than"}
    if kind is float:
        refusals = {1e300: "less than", -1e300: "greater than"}
        refusals |= {math.inf: "finite number", -math.inf: "finite number", math.nan: "finite"}
    for value, bound in refusals.items():
        with pytest.raises(ConfigError) as err:
            load_config(None, {dotted: value})
        assert str(err.value).startswith(f"invalid parameters in defaults: {dotted}: ")
        assert bound in str(err.value)


@pytest.mark.parametrize(
    "name",
    ["it's", "team/model", "a:b", "m@champion", "..", "-m", "a b", "50%", "n\nm", "m" * 201],
)
def test_registered_model_names_mlflow_or_its_uris_cannot_carry_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match=r"tracking\.registered_model: .*allowed: letters"):
        load_config(None, {"tracking.registered_model": name})


def test_registered_model_names_of_letters_digits_dots_dashes_pass() -> None:
    for name in ("my.model_v2-1", "M" * 200):
        assert load_config(None, {"tracking.registered_model": name}).tracking.registered_model


PATH_KEYS = ["data.root", "data.directory", "data.cache", "teacher.pretrained"]


@pytest.mark.parametrize("dotted", [*PATH_KEYS, "iterations.1.pretrained"])
def test_paths_no_file_operation_could_take_are_refused(dotted: str) -> None:
    with pytest.raises(ConfigError, match=rf"{re.escape(dotted)}: contains a NUL character"):
        load_config(None, {dotted: "model\x00.pt"})
    with pytest.raises(ConfigError, match=rf"{re.escape(dotted)}: .*at most 4096") as err:
        load_config(None, {dotted: "x" * 5000})
    assert len(str(err.value)) < 200  # the value is shown cut, the line stays readable
