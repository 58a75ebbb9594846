from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import torch

from noisy_student.config import Config, load_config
from noisy_student.io import read_json
from noisy_student.models import load_checkpoint, num_parameters
from noisy_student.pipeline import (
    MODEL,
    PSEUDO_LABELS,
    RunLayout,
    label_pool,
    prepare,
    run_all,
    train,
)
from tests.conftest import TINY


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_loop_runs_and_reproduces_bit_for_bit(tiny_config: Config, tmp_path: Path) -> None:
    first, second = RunLayout(tmp_path / "a"), RunLayout(tmp_path / "b")
    table = run_all(tiny_config, first)
    run_all(tiny_config, second)

    assert table["iteration"].tolist() == [0, 1, 2]
    assert table["num_labeled"].tolist() == [50, 50, 50]
    assert table.loc[0, "num_pseudo_labeled"] == 0
    assert (table.loc[1:, "num_pseudo_labeled"] > 0).all()
    assert table[["val_accuracy", "test_accuracy"]].stack().between(0, 1).all()
    # Student 2 is wider than its teacher, student 1.
    sizes = [num_parameters(load_checkpoint(str(first.model_dir(i) / MODEL))) for i in range(3)]
    assert sizes[0] == sizes[1] < sizes[2]

    pseudo = pd.read_parquet(first.pseudo_dir(1) / PSEUDO_LABELS)
    pool = pd.read_parquet(first.splits / "unlabeled.parquet")
    assert set(pseudo["image_id"]) <= set(pool["image_id"])
    assert (pseudo["confidence"] >= tiny_config.pseudo_label.threshold).all()
    stats = read_json(first.pseudo_dir(1) / "metrics.json")
    assert stats["num_pseudo_labeled"] == len(pseudo) and stats["pool_size"] == len(pool)

    for i in range(3):
        assert md5(first.model_dir(i) / MODEL) == md5(second.model_dir(i) / MODEL)
        assert (
            read_json(first.model_dir(i) / "metrics.json")["test_accuracy"]
            == read_json(second.model_dir(i) / "metrics.json")["test_accuracy"]
        )
    assert read_json(first.report / "metrics.json") == read_json(second.report / "metrics.json")


def test_label_pool_balances_classes(tiny_config: Config, tmp_path: Path) -> None:
    cfg = tiny_config.model_copy(
        update={"pseudo_label": tiny_config.pseudo_label.model_copy(update={"balance": 30})}
    )
    layout = RunLayout(tmp_path)
    prepare(cfg, layout)
    train(cfg, layout, 0)
    label_pool(cfg, layout, 1)
    stats = read_json(layout.pseudo_dir(1) / "metrics.json")
    before, after = stats["class_counts_before_balancing"], stats["class_counts"]
    assert sum(before) == stats["num_above_threshold"]
    assert after == [30 if n else 0 for n in before]
    manifest = pd.read_parquet(layout.pseudo_dir(1) / PSEUDO_LABELS)
    assert len(manifest) == stats["num_pseudo_labeled"] == sum(after)


def test_student_with_online_distillation_ratio_and_finetune(
    tiny_config: Config, tmp_path: Path
) -> None:
    cfg = load_config(
        None,
        {
            **TINY,
            "data.root": tiny_config.data.root,
            "device": "cpu",
            "student.distillation": "online",
            "student.unlabeled_ratio": 2.0,
            "student.finetune_epochs": 1,
            "noise.randaugment_magnitude": 9,
        },
        max_iterations=1,
    )
    layout = RunLayout(tmp_path)
    prepare(cfg, layout)
    train(cfg, layout, 0)
    label_pool(cfg, layout, 1)
    train(cfg, layout, 1)
    history = pd.read_csv(layout.model_dir(1) / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3]  # 2 epochs + 1 fine-tune epoch
    assert history["lr"].iloc[-1] == 0.0
    metrics = read_json(layout.model_dir(1) / "metrics.json")
    assert 0 <= metrics["test_accuracy"] <= 1


def test_frozen_transfer_keeps_the_backbone_bit_identical(
    tiny_config: Config, tmp_path: Path
) -> None:
    source = RunLayout(tmp_path / "source")
    prepare(tiny_config, source)
    train(tiny_config, source, 0)
    pretrained = str(source.model_dir(0) / MODEL)
    cfg = load_config(
        None,
        {
            **TINY,
            "data.root": tiny_config.data.root,
            "device": "cpu",
            "teacher.pretrained": pretrained,
            "teacher.transfer": "freeze",
            "teacher.epochs": 2,
        },
    )
    layout = RunLayout(tmp_path / "frozen")
    prepare(cfg, layout)
    train(cfg, layout, 0)
    before = torch.load(pretrained, weights_only=True)["state_dict"]
    after = torch.load(layout.model_dir(0) / MODEL, weights_only=True)["state_dict"]
    head = [k for k in before if k.startswith("head.")]
    assert head and any(not torch.equal(before[k], after[k]) for k in head)
    for key in before:
        if key not in head:
            assert torch.equal(before[key], after[key]), key
