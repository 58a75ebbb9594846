from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from noisy_student.cli import main
from noisy_student.config import Config
from noisy_student.io import read_json, write_json
from noisy_student.pipeline import label_pool, label_shard, merge_shards, prepare, train
from noisy_student.pseudo_label import balance_classes
from noisy_student.runs import METRICS, PSEUDO_LABELS, RunLayout
from noisy_student.shards import (
    Shard,
    ShardError,
    parse_shard,
    part_path,
    read_rows,
    reduce_shards,
    shard_stats,
    stats_path,
    top_per_class,
)


@pytest.mark.parametrize("pool_size", [0, 1, 7, 100, 1001])
@pytest.mark.parametrize("count", [1, 3, 8, 150])
def test_shards_cover_the_pool_once_in_order(pool_size: int, count: int) -> None:
    ranges = [Shard(i, count).rows(pool_size) for i in range(count)]
    rows = [r for start, stop in ranges for r in range(start, stop)]
    assert rows == list(range(pool_size))
    sizes = {stop - start for start, stop in ranges}
    assert max(sizes) - min(sizes) <= 1


def test_parse_shard_accepts_index_of_count() -> None:
    assert parse_shard("3/16") == Shard(3, 16)
    assert parse_shard(" 0 / 1 ") == Shard(0, 1)
    assert str(Shard(3, 16)) == "3/16"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("5/4", "shard index must be in 0..3 for 4 shards"),
        ("4/4", "shard index must be in 0..3"),
        ("0/0", "shard count must be >= 1, got 0"),
        ("3", "expected INDEX/COUNT"),
        ("a/b", "expected INDEX/COUNT"),
        ("-1/3", "expected INDEX/COUNT"),
    ],
)
def test_parse_shard_refuses_malformed_specs(text: str, message: str) -> None:
    with pytest.raises(ShardError, match=message) as err:
        parse_shard(text)
    assert "\n" not in str(err.value)


def test_read_rows_reads_a_slice_across_row_groups(tmp_path: Path) -> None:
    frame = pd.DataFrame({"image_id": np.arange(1000) * 3, "hidden_label": np.arange(1000) % 7})
    frame.to_parquet(tmp_path / "pool.parquet", index=False, row_group_size=64)
    for start, stop in [(0, 1000), (0, 0), (63, 65), (100, 777), (999, 1000), (1000, 1000)]:
        got = read_rows(tmp_path / "pool.parquet", start, stop, ["image_id", "hidden_label"])
        pd.testing.assert_frame_equal(got, frame.iloc[start:stop].reset_index(drop=True))


def _synthetic(rows: int, num_classes: int, seed: int, classes: list[int] | None = None):
    rng = np.random.default_rng(seed)
    labels = rng.choice(classes or range(num_classes), size=rows)
    confidence = rng.choice(np.linspace(0.3, 1.0, 8, dtype=np.float32), size=rows)  # ties
    return pd.DataFrame(
        {
            "image_id": rng.permutation(rows * 5)[:rows].astype(np.int64),
            "label": labels.astype(np.int64),
            "confidence": confidence,
        }
    )


def _map(frame: pd.DataFrame, count: int, num_classes: int, balance: int | None):
    parts, stats = [], []
    for index in range(count):
        start, stop = Shard(index, count).rows(len(frame))
        part = frame.iloc[start:stop].reset_index(drop=True)
        ids = part["image_id"].to_numpy()  # some wrong, some unknown (-1) hidden labels
        hidden = np.where(ids % 5 == 0, -1, np.where(ids % 3 == 0, 0, part["label"]))
        stats.append(shard_stats(part, hidden, num_classes, len(part)))
        parts.append(top_per_class(part, balance) if balance else part)
    return reduce_shards(parts, stats, num_classes, balance)


@pytest.mark.parametrize("balance", [None, 1, 9, 40, 500])
@pytest.mark.parametrize("classes", [None, [2]])  # all classes present, or one class only
def test_reduce_balances_exactly_whatever_the_shard_count(
    balance: int | None, classes: list[int] | None
) -> None:
    frame = _synthetic(400, 4, seed=1, classes=classes)
    whole, metrics = _map(frame, 1, 4, balance)
    expected = frame if balance is None else balance_classes(frame, 4, balance)
    pd.testing.assert_frame_equal(whole, expected.reset_index(drop=True))
    for count in (3, 8, 399, 400, 1000):  # up to more shards than rows: empty shards
        manifest, sharded = _map(frame, count, 4, balance)
        pd.testing.assert_frame_equal(manifest, whole)
        assert sharded == metrics
    counts = np.bincount(frame["label"], minlength=4)
    assert metrics["class_counts_before_balancing"] == counts.tolist()
    if balance is not None:  # a frequent class keeps its top K, a rare one is duplicated
        assert metrics["class_counts"] == [balance if n else 0 for n in counts]
    assert metrics["mean_confidence"] == pytest.approx(float(frame["confidence"].mean()))


def test_reduce_of_a_pool_with_nothing_above_threshold() -> None:
    empty = _synthetic(0, 3, seed=0)
    manifest, metrics = reduce_shards(
        [empty, empty], [shard_stats(empty, np.zeros(0, int), 3, 5)] * 2, 3, 10
    )
    assert len(manifest) == 0
    assert metrics["pool_size"] == 10 and metrics["kept_fraction"] == 0
    assert metrics["mean_confidence"] == 0.0 and metrics["pseudo_label_accuracy"] is None


@pytest.fixture(scope="module")
def taught(tiny_config: Config, tmp_path_factory: pytest.TempPathFactory):
    """A prepared run with a trained teacher."""
    cfg = tiny_config.model_copy(update={"iterations": {1: tiny_config.iterations[1]}})
    layout = RunLayout(tmp_path_factory.mktemp("run"))
    prepare(cfg, layout)
    train(cfg, layout, 0)
    return cfg, layout


@pytest.fixture(scope="module")
def tiny_config(digits_root: Path) -> Config:  # module-scoped: one teacher for these tests
    from noisy_student.config import load_config
    from tests.conftest import TINY

    overrides = {**TINY, "teacher.epochs": 3, "data.root": str(digits_root), "device": "cpu"}
    return load_config(None, overrides)


def _with(cfg: Config, **pseudo_label: object) -> Config:
    return cfg.model_copy(update={"pseudo_label": cfg.pseudo_label.model_copy(update=pseudo_label)})


@pytest.mark.parametrize("options", [{}, {"balance": 60, "mode": "hard"}])
def test_merged_manifest_is_byte_identical_for_1_3_8_shards(
    taught: tuple[Config, RunLayout], tmp_path: Path, options: dict
) -> None:
    cfg, layout = taught
    cfg = _with(cfg, **options)
    out = layout.pseudo_dir(1)
    shutil.rmtree(out / "shards", ignore_errors=True)
    label_pool(cfg, layout, 1)
    manifest, metrics = (out / PSEUDO_LABELS).read_bytes(), (out / METRICS).read_bytes()
    assert not (out / "shards").exists()  # one process writes no parts
    for count in (1, 3, 8):
        for index in reversed(range(count)):  # the order shards finish in does not matter
            label_shard(cfg, layout, 1, Shard(index, count), worker={"node": "n"})
        (out / PSEUDO_LABELS).unlink()
        merge_shards(cfg, layout, 1, count)
        assert (out / PSEUDO_LABELS).read_bytes() == manifest, count
        assert (out / METRICS).read_bytes() == metrics, count
    stats = read_json(stats_path(out, Shard(2, 8)))
    assert stats["node"] == "n" and stats["host"]
    assert (
        sum(read_json(stats_path(out, Shard(i, 8)))["pool_size"] for i in range(8))
        == (read_json(out / METRICS)["pool_size"])
    )


def test_merge_names_the_missing_corrupt_or_stale_shard(
    taught: tuple[Config, RunLayout],
) -> None:
    cfg, layout = taught
    cfg = _with(cfg, threshold=0.3)
    out = layout.pseudo_dir(1)
    shutil.rmtree(out / "shards", ignore_errors=True)
    for index in range(4):
        label_shard(cfg, layout, 1, Shard(index, 4))
    stats_path(out, Shard(1, 4)).unlink()
    with pytest.raises(ShardError, match=r"shard 1/4: missing"):
        merge_shards(cfg, layout, 1, 4)
    label_shard(cfg, layout, 1, Shard(1, 4))
    part_path(out, Shard(2, 4)).write_bytes(b"PAR1 not a parquet file")
    with pytest.raises(ShardError, match=r"shard 2/4: unreadable part"):
        merge_shards(cfg, layout, 1, 4)
    label_shard(cfg, layout, 1, Shard(2, 4))
    with pytest.raises(ShardError, match=r"shard 0/4: made by another teacher or other"):
        merge_shards(_with(cfg, threshold=0.4), layout, 1, 4)
    record = read_json(stats_path(out, Shard(3, 4)))
    write_json(stats_path(out, Shard(3, 4)), {**record, "rows": record["rows"] + 1})
    with pytest.raises(ShardError, match=r"shard 3/4: its part does not match its stats"):
        merge_shards(cfg, layout, 1, 4)
    label_shard(cfg, layout, 1, Shard(3, 4))
    label_shard(cfg, layout, 1, Shard(0, 2))
    with pytest.raises(ShardError, match=r"found counts: 2, 4; pass the count"):
        merge_shards(cfg, layout, 1)
    merge_shards(cfg, layout, 1, 4)


def test_merge_refuses_statistics_of_another_shape(
    taught: tuple[Config, RunLayout],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Valid JSON that is no shard's statistics: one line naming the file and what is
    wrong, exit 2 (before: a KeyError or TypeError inside the reduce, or a wrong sum)."""
    monkeypatch.setenv("NOISY_STUDENT_MLFLOW", "off")
    cfg, layout = taught
    out = layout.pseudo_dir(1)
    shutil.rmtree(out / "shards", ignore_errors=True)
    for index in range(2):
        label_shard(cfg, layout, 1, Shard(index, 2))
    stats = stats_path(out, Shard(1, 2))
    good = read_json(stats)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    argv = ["--params", str(params), "--run-dir", str(layout.root), "pseudo-label"]
    for bad, problem in (
        ([good], "a JSON list, expected an object"),
        ({k: v for k, v in good.items() if k != "start"}, "'start' is None, expected a count"),
        ({**good, "key": 7}, "no string 'key'"),
        ({**good, "rows": "12"}, "'rows' is '12', expected a count"),
        ({**good, "scored": {"0": 1}}, "'scored' is not a list of per-class counts"),
        ({**good, "confidence_sum": [0.5] * 10}, "'confidence_sum' is not a list of"),
        ({**good, "correct": good["correct"][:3]}, "'correct' has 3 classes, expected 10"),
    ):
        write_json(stats, bad)
        with pytest.raises(ShardError, match="shard 1/2: shards/stats-00001-of-00002.json is not"):
            merge_shards(cfg, layout, 1, 2)
        capsys.readouterr()
        assert main([*argv, "--iteration", "1", "--merge"]) == 2
        [line] = capsys.readouterr().err.splitlines()
        assert line.startswith("noisy-student: pseudo-label: shard 1/2: ") and problem in line
    shutil.rmtree(out / "shards")


def test_cli_labels_shards_and_merges_them(
    taught: tuple[Config, RunLayout],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOISY_STUDENT_MLFLOW", "off")  # the files, not the records
    cfg, layout = taught
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    out = layout.pseudo_dir(1)
    shutil.rmtree(out / "shards", ignore_errors=True)
    base = ["--params", str(params), "--run-dir", str(layout.root), "pseudo-label"]
    assert main([*base, "--iteration", "1"]) == 0
    whole = (out / PSEUDO_LABELS).read_bytes()
    for spec in ("5/4", "0/0", "x"):
        capsys.readouterr()
        assert main([*base, "--iteration", "1", "--shard", spec]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"noisy-student: pseudo-label: shard {spec!r}: ")
        assert err.count("\n") == 1
    assert main([*base, "--iteration", "1", "--shard", "1/2"]) == 0
    assert main([*base, "--iteration", "1", "--merge"]) == 2
    assert "shard 0/2: missing" in capsys.readouterr().err
    assert main([*base, "--iteration", "1", "--shard", "0/2"]) == 0
    (out / PSEUDO_LABELS).unlink()
    assert main([*base, "--iteration", "1", "--merge"]) == 0
    assert (out / PSEUDO_LABELS).read_bytes() == whole


def test_run_options_that_cannot_work_are_one_line() -> None:
    from tasks.shards import check_ray_address, task_runner

    with pytest.raises(ValueError, match=r"ray_address '127.0.0.1:9': no Ray cluster answers"):
        check_ray_address("127.0.0.1:9")
    with pytest.raises(ValueError, match=r"ray_address 'ray://:1': expected auto, host:port"):
        check_ray_address("ray://:1")
    with pytest.raises(ValueError, match=r"task_runner 'dask': allowed: local, ray"):
        task_runner("dask", None)
    check_ray_address("auto")


def test_a_teacher_keeping_no_pseudo_label_says_the_student_learns_from_labels_alone(
    taught: tuple[Config, RunLayout],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture,
) -> None:
    """In the labeling step's log, in `show`'s table and under the report's table."""
    from noisy_student.cli import print_table
    from noisy_student.report import write_report

    cfg, layout = taught
    cfg = _with(cfg, threshold=1.0)
    out = tmp_path / "run"
    shutil.copytree(layout.root, out)
    with caplog.at_level("WARNING", logger="noisy_student.pipeline"):
        label_pool(cfg, RunLayout(out), 1)
    assert "0 pseudo-labels above 1: student-1 learns from the 50 labels alone" in caplog.text
    assert read_json(RunLayout(out).pseudo_dir(1) / METRICS)["num_pseudo_labeled"] == 0
    table = pd.DataFrame(
        {
            "iteration": [0, 1],
            "model": ["teacher", "student-1"],
            "num_labeled": [50, 50],
            "num_pseudo_labeled": [0, 0],
            "pseudo_label_accuracy": [None, None],
            "val_accuracy": [0.5, 0.5],
            "test_accuracy": [0.5, 0.5],
            "teacher_iteration": pd.array([None, 0], dtype="Int64"),
            "promoted": [True, False],
        }
    )
    note = "student-1: 0 pseudo-labels above pseudo_label.threshold; it learned from the 50"
    print_table(table)
    shown = capsys.readouterr().out
    assert "0: labels alone" in shown and note in " ".join(shown.split())
    write_report(tmp_path / "report", "run", "a run", table, {})
    assert note in (tmp_path / "report" / "report.md").read_text()
    assert note in (tmp_path / "report" / "report.html").read_text()
