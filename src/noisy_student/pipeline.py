"""The steps of Noisy Student self-training, each reading and writing files under a run
directory, so any step can run in its own process (a DVC stage, a Prefect task, another
machine). Every step seeds itself: the same params and data give the same files."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from noisy_student.augment import build_augment
from noisy_student.config import Config
from noisy_student.data import load_images, make_splits
from noisy_student.engine import (
    TrainSettings,
    accuracy,
    predict_proba,
    seed_everything,
    select_device,
    train_model,
)
from noisy_student.io import read_json, save_torch, write_csv, write_json, write_parquet
from noisy_student.models import build_model, load_checkpoint, num_parameters, save_checkpoint
from noisy_student.pseudo_label import (
    balance_classes,
    class_counts,
    one_hot,
    pseudo_label,
    targets_from_manifest,
)

log = logging.getLogger(__name__)

MODEL = "model.pt"
HISTORY = "history.csv"
METRICS = "metrics.json"
PSEUDO_LABELS = "pseudo_labels.parquet"


@dataclass(frozen=True)
class RunLayout:
    """Where each step's files live inside a run directory."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def splits(self) -> Path:
        return self.root / "splits"

    def model_dir(self, iteration: int) -> Path:
        """Iteration 0 is the teacher; iteration i >= 1 is student i."""
        return self.root / "models" / f"iter_{iteration}"

    def pseudo_dir(self, iteration: int) -> Path:
        """Pseudo-labels made by the model of ``iteration - 1`` for student ``iteration``."""
        return self.root / "pseudo" / f"iter_{iteration}"

    @property
    def report(self) -> Path:
        return self.root / "report"


def model_name(iteration: int, width: float, depth: float) -> str:
    role = "teacher" if iteration == 0 else f"student-{iteration}"
    return f"{role} (width x{width:g}, depth x{depth:g})"


def prepare(cfg: Config, layout: RunLayout) -> Path:
    """Split the dataset into labeled / unlabeled / val / test manifests."""
    data = load_images(cfg.data.source, cfg.data.root)
    frames = make_splits(
        data.labels,
        cfg.data.labeled_per_class,
        cfg.data.val_per_class,
        cfg.data.test_per_class,
        cfg.seed,
    )
    for name, frame in frames.items():
        write_parquet(layout.splits / f"{name}.parquet", frame)
    counts = {name: len(frame) for name, frame in frames.items()}
    write_json(layout.splits / METRICS, {"classes": data.classes, **counts})
    log.info("prepared splits %s", counts)
    return layout.splits


def _split(layout: RunLayout, name: str) -> pd.DataFrame:
    return pd.read_parquet(layout.splits / f"{name}.parquet")


def _column(frame: pd.DataFrame, name: str) -> torch.Tensor:
    """A manifest column as a tensor (a copy: parquet-backed arrays are read-only)."""
    return torch.tensor(frame[name].to_numpy())


def train(cfg: Config, layout: RunLayout, iteration: int) -> Path:
    """Train the teacher (iteration 0: labeled data, no noise) or student ``iteration``
    (labeled + pseudo-labeled data, RandAugment + dropout + stochastic depth)."""
    seed_everything(cfg.seed + iteration)
    device = select_device(cfg.device)
    data = load_images(cfg.data.source, cfg.data.root)
    images = torch.from_numpy(data.images)
    num_classes = len(data.classes)
    labeled = _split(layout, "labeled")
    ids = _column(labeled, "image_id")
    targets = one_hot(labeled["label"].to_numpy(), num_classes)
    width, depth = cfg.size_of(iteration)
    n_pseudo = 0
    if iteration == 0:
        noise = {"dropout": 0.0, "stochastic_depth": 0.0}
        augment = build_augment(cfg.teacher.augment)
    else:
        pseudo = pd.read_parquet(layout.pseudo_dir(iteration) / PSEUDO_LABELS)
        n_pseudo = len(pseudo)
        ids = torch.cat([ids, _column(pseudo, "image_id")])
        targets = torch.cat([targets, targets_from_manifest(pseudo, num_classes)])
        noise = {"dropout": cfg.noise.dropout, "stochastic_depth": cfg.noise.stochastic_depth}
        augment = build_augment(
            "strong", cfg.noise.randaugment_ops, cfg.noise.randaugment_magnitude
        )
    model = build_model(
        num_classes=num_classes, in_channels=data.images.shape[1], width=width, depth=depth, **noise
    )
    val = _split(layout, "val")
    val_set = (images[_column(val, "image_id")], _column(val, "label"))
    settings = TrainSettings(
        cfg.epochs_for(iteration), cfg.train.batch_size, cfg.train.lr, cfg.train.weight_decay
    )
    log.info(
        "training %s on %d images (%d pseudo-labeled)",
        model_name(iteration, width, depth),
        len(ids),
        n_pseudo,
    )
    start = time.perf_counter()
    history = train_model(model, images[ids], targets, settings, augment, device, val=val_set)
    seconds = time.perf_counter() - start
    test = _split(layout, "test")
    metrics = {
        "iteration": iteration,
        "model": model_name(iteration, width, depth),
        "width": width,
        "depth": depth,
        "num_parameters": num_parameters(model),
        "num_labeled": len(labeled),
        "num_pseudo_labeled": n_pseudo,
        "val_accuracy": accuracy(predict_proba(model, val_set[0], device), val_set[1]),
        "test_accuracy": accuracy(
            predict_proba(model, images[_column(test, "image_id")], device),
            _column(test, "label"),
        ),
        "train_seconds": round(seconds, 3),
    }
    out = layout.model_dir(iteration)
    save_torch(out / MODEL, save_checkpoint(model.cpu()))
    write_csv(out / HISTORY, pd.DataFrame(history))
    write_json(out / METRICS, metrics)
    log.info(
        "%s: val %.4f test %.4f",
        metrics["model"],
        metrics["val_accuracy"],
        metrics["test_accuracy"],
    )
    return out


def label_pool(cfg: Config, layout: RunLayout, iteration: int) -> Path:
    """The model of ``iteration - 1``, un-noised, labels the unlabeled pool for student
    ``iteration``; the pool's hidden labels only score the result."""
    seed_everything(cfg.seed + iteration)
    device = select_device(cfg.device)
    data = load_images(cfg.data.source, cfg.data.root)
    pool = _split(layout, "unlabeled")
    teacher = load_checkpoint(
        str(layout.model_dir(iteration - 1) / MODEL), dropout=0.0, stochastic_depth=0.0
    )
    ids = pool["image_id"].to_numpy()
    pc = cfg.pseudo_label
    manifest = pseudo_label(
        teacher,
        torch.from_numpy(data.images[ids]),
        ids,
        device,
        mode=pc.mode,
        temperature=pc.temperature,
        threshold=pc.threshold,
        batch_size=pc.batch_size,
    )
    hidden = pool.set_index("image_id")["hidden_label"]
    correct = manifest["label"].to_numpy() == hidden.loc[manifest["image_id"]].to_numpy()
    num_classes = len(data.classes)
    metrics = {
        "iteration": iteration,
        "pool_size": len(pool),
        "num_above_threshold": len(manifest),
        "kept_fraction": len(manifest) / max(1, len(pool)),
        "pseudo_label_accuracy": float(correct.mean()) if len(manifest) else 0.0,
        "mean_confidence": float(manifest["confidence"].mean()) if len(manifest) else 0.0,
        "class_counts_before_balancing": class_counts(manifest, num_classes),
    }
    if pc.balance is not None:
        manifest = balance_classes(manifest, num_classes, pc.balance)
    metrics["class_counts"] = class_counts(manifest, num_classes)
    metrics["num_pseudo_labeled"] = len(manifest)
    out = layout.pseudo_dir(iteration)
    write_parquet(out / PSEUDO_LABELS, manifest)
    write_json(out / METRICS, metrics)
    log.info(
        "pseudo-labels for student %d: kept %d/%d, accuracy %.4f",
        iteration,
        len(manifest),
        len(pool),
        metrics["pseudo_label_accuracy"],
    )
    return out


def summarize(cfg: Config, layout: RunLayout) -> pd.DataFrame:
    """One row per iteration (teacher first); written as the report's CSV and metrics."""
    rows = []
    for iteration in range(len(cfg.iterations) + 1):
        m = read_json(layout.model_dir(iteration) / METRICS)
        row = {
            k: m[k]
            for k in (
                "iteration",
                "model",
                "num_parameters",
                "num_labeled",
                "num_pseudo_labeled",
                "val_accuracy",
                "test_accuracy",
            )
        }
        row["pseudo_label_accuracy"] = None
        if iteration > 0:
            row["pseudo_label_accuracy"] = read_json(layout.pseudo_dir(iteration) / METRICS)[
                "pseudo_label_accuracy"
            ]
        rows.append(row)
    table = pd.DataFrame(rows)
    write_csv(layout.report / "iterations.csv", table)
    first, last = rows[0], rows[-1]
    write_json(
        layout.report / METRICS,
        {
            "teacher_val_accuracy": first["val_accuracy"],
            "teacher_test_accuracy": first["test_accuracy"],
            "final_val_accuracy": last["val_accuracy"],
            "final_test_accuracy": last["test_accuracy"],
            "test_gain": last["test_accuracy"] - first["test_accuracy"],
            "iterations": len(rows) - 1,
        },
    )
    return table


def run_all(cfg: Config, layout: RunLayout) -> pd.DataFrame:
    """The whole loop in one process: prepare, teacher, then label -> student per iteration."""
    prepare(cfg, layout)
    train(cfg, layout, 0)
    for iteration in sorted(cfg.iterations):
        label_pool(cfg, layout, iteration)
        train(cfg, layout, iteration)
    return summarize(cfg, layout)
