"""MLflow records of a finished pipeline run: one parent run, one nested run per
iteration (teacher = 0), each model registered as a version of the registered model.

The records are written from the run directory's files, so a run made by any entry
point (DVC stages, a Prefect flow, the library) gets the same MLflow structure. The
registered model's aliases say which version to use: ``teacher`` is the model the last
run promoted, ``champion`` the best on validation of every run so far.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pytorch
import numpy as np
import pandas as pd
import torch
import torchvision
import yaml
from mlflow.models import infer_signature

from noisy_student.config import Config
from noisy_student.data import ImageSet, load_images
from noisy_student.engine import predict_proba, select_device
from noisy_student.io import read_json, write_json, write_parquet
from noisy_student.models import load_checkpoint
from noisy_student.pipeline import describe
from noisy_student.report import (
    confusion_matrix,
    markdown_table,
    per_class_accuracy,
    sample_rows,
    write_class_counts_png,
    write_confidence_histogram_png,
    write_confusion_matrix_png,
    write_per_class_accuracy_png,
    write_sample_grid_png,
)
from noisy_student.runs import HISTORY, METRICS, MODEL, PSEUDO_LABELS, RunLayout, final_iteration

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow/mlflow.db"
TEACHER_ALIAS = "teacher"
CHAMPION_ALIAS = "champion"
MANIFEST_ROWS = 20_000  # pseudo-label rows logged per student; a seeded sample beyond
GRID_IMAGES = 32  # pseudo-labeled images shown per student
REPORT_FILES = ("report.md", "report.html", "accuracy_by_iteration.png", "per_class_accuracy.png")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


def artifact_root(uri: str) -> Path | None:
    """``artifacts/`` beside a sqlite store's database file, so that the records and their
    files move together (the default store: ``mlflow/artifacts``); None for other stores,
    which choose their own."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?")[0]).parent / "artifacts"


def use_experiment(name: str) -> str:
    """Point MLflow at the tracking store and experiment; return the experiment id.

    On a sqlite store a new experiment keeps its artifacts beside the database.
    """
    uri = tracking_uri()
    root = artifact_root(uri)
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return mlflow.set_experiment(name).experiment_id
    location = root.resolve().as_uri() if root is not None else None
    experiment_id = mlflow.create_experiment(name, artifact_location=location)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _file_hash(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest() if path.exists() else ""


def lineage_tags(cfg: Config, entry_point: str) -> dict[str, str]:
    """Tags that lead a run back to its code, data and params."""
    data_md5 = ""
    if Path("data.dvc").exists():
        outs = (yaml.safe_load(Path("data.dvc").read_text()) or {}).get("outs", [{}])
        data_md5 = str(outs[0].get("md5", ""))
    return {
        "entry_point": entry_point,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower(),
        "data_dvc_md5": data_md5,
        "dvc_lock_md5": _file_hash(Path("dvc.lock")),
        "params_hash": cfg.fingerprint(),
        "dataset": cfg.data.source,
    }


def _flat(prefix: str, tree: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(f"{name}.", value))
        else:
            out[name] = value
    return out


def _log_history(history: pd.DataFrame) -> None:
    client, run_id = mlflow.tracking.MlflowClient(), mlflow.active_run().info.run_id
    metrics, now = [], int(time.time() * 1000)
    for row in history.to_dict("records"):
        for key in ("train_loss", "val_accuracy", "lr"):
            if key in row and pd.notna(row[key]):
                metrics.append(mlflow.entities.Metric(key, float(row[key]), now, int(row["epoch"])))
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])


def _log_model(path: Path, registered_model: str, image_shape: tuple[int, ...]) -> str:
    """Log and register the checkpoint's model; return the new registered version."""
    model = load_checkpoint(str(path)).eval()
    # A batch of 2: torch.export (MLflow's pt2 format) keeps a batch of 1 static.
    example = np.zeros((2, *image_shape), dtype=np.float32)
    with torch.inference_mode():
        output = model(torch.from_numpy(example)).numpy()
    info = mlflow.pytorch.log_model(
        model,
        name="model",
        registered_model_name=registered_model,
        signature=infer_signature(example, output),
        input_example=example,
        pip_requirements=[
            f"torch=={torch.__version__.split('+')[0]}",
            f"torchvision=={torchvision.__version__.split('+')[0]}",
        ],
    )
    # What `predict` and `pretrained` load: never the MLflow model, which may be unpickled.
    mlflow.log_artifact(str(path), "checkpoint")
    return str(info.registered_model_version)


def _write_evaluation(
    out: Path, cfg: Config, layout: RunLayout, iteration: int, data: ImageSet, test: pd.DataFrame
) -> None:
    """Confusion matrix and per-class accuracy of the iteration's checkpoint on the test
    split: which classes the model confuses, beyond the one accuracy number."""
    model = load_checkpoint(str(layout.model_dir(iteration) / MODEL))
    ids = test["image_id"].to_numpy()
    preds = predict_proba(model, data.images, select_device(cfg.device), ids=ids).argmax(dim=-1)
    matrix = confusion_matrix(test["label"].to_numpy(), preds.numpy(), len(data.classes))
    accuracy = per_class_accuracy(matrix)
    write_json(
        out / "confusion_matrix.json",
        {
            "classes": data.classes,
            "matrix": matrix.tolist(),
            "num_images": int(matrix.sum()),
            "accuracy": float(np.trace(matrix) / max(1, matrix.sum())),
        },
    )
    write_json(out / "per_class_accuracy.json", dict(zip(data.classes, accuracy, strict=True)))
    write_confusion_matrix_png(out / "confusion_matrix.png", matrix, data.classes)
    write_per_class_accuracy_png(out / "per_class_accuracy.png", accuracy, data.classes)


def _write_pseudo_labels(
    out: Path,
    cfg: Config,
    layout: RunLayout,
    iteration: int,
    data: ImageSet,
    pseudo: dict[str, Any],
) -> None:
    """What student ``iteration`` learned from: the teacher's confidence, the classes before
    and after balancing, the manifest itself and a look at the labeled images."""
    manifest = pd.read_parquet(layout.pseudo_dir(iteration) / PSEUDO_LABELS)
    seed = cfg.seed + iteration
    write_confidence_histogram_png(
        out / "confidence_histogram.png",
        manifest["confidence"].to_numpy(),
        cfg.pseudo_label.threshold,
    )
    write_class_counts_png(
        out / "class_counts.png",
        pseudo["class_counts_before_balancing"],
        pseudo["class_counts"],
        data.classes,
    )
    write_parquet(out / PSEUDO_LABELS, sample_rows(manifest, MANIFEST_ROWS, seed))
    # Balancing duplicates rows; show each image once.
    grid = sample_rows(manifest.drop_duplicates("image_id"), GRID_IMAGES, seed)
    write_sample_grid_png(
        out / "samples.png",
        np.asarray(data.images[grid["image_id"].to_numpy()]),
        grid["label"].tolist(),
        grid["confidence"].tolist(),
        data.classes,
    )


def _step_metrics(row: dict[str, Any], pseudo: dict[str, Any] | None) -> dict[str, float]:
    """The parent's metrics of one iteration, for MLflow's charts by step = iteration;
    values a teacher or a source without hidden labels lacks are left out."""
    values = {
        "val_accuracy": row["val_accuracy"],
        "test_accuracy": row["test_accuracy"],
        "num_pseudo_labeled": row["num_pseudo_labeled"],
        "pseudo_label_accuracy": row["pseudo_label_accuracy"],
        "pseudo_label_mean_confidence": pseudo["mean_confidence"] if pseudo else None,
    }
    return {k: float(v) for k, v in values.items() if v is not None and pd.notna(v)}


def _champion_val_accuracy(client: mlflow.MlflowClient, name: str) -> float | None:
    """Validation accuracy of the current champion; None when there is none to beat (or it
    was registered without the tag, so it cannot be compared)."""
    if CHAMPION_ALIAS not in client.get_registered_model(name).aliases:
        return None
    tag = client.get_model_version_by_alias(name, CHAMPION_ALIAS).tags.get("val_accuracy")
    return None if tag is None else float(tag)


def _update_aliases(
    client: mlflow.MlflowClient, name: str, promoted: str, versions: list[tuple[str, float]]
) -> None:
    """``teacher`` -> this run's final promoted model; ``champion`` -> a new version only
    when strictly better on validation than the champion of all earlier runs."""
    client.set_registered_model_alias(name, TEACHER_ALIAS, promoted)
    best = _champion_val_accuracy(client, name)
    for version, val_accuracy in versions:
        if best is None or val_accuracy > best:
            client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
            best = val_accuracy


def log_pipeline_run(
    cfg: Config, layout: RunLayout, entry_point: str, extra_tags: dict[str, str] | None = None
) -> str:
    """Record the finished run in ``layout`` to MLflow; return the parent run id."""
    use_experiment(cfg.tracking.experiment)
    client = mlflow.MlflowClient()
    tags = {**lineage_tags(cfg, entry_point), **(extra_tags or {})}
    table = pd.read_csv(layout.report / "iterations.csv")
    data = load_images(cfg.data.source, cfg.data.root)
    test = pd.read_parquet(layout.splits / "test.parquet")
    resolved = cfg.model_dump(mode="json")
    # Iterations are logged as params per iteration, on the child runs.
    config = {k: v for k, v in resolved.items() if k != "iterations"}
    registered = cfg.tracking.registered_model
    versions: list[tuple[str, float]] = []
    mean_confidence: list[float | None] = []
    with mlflow.start_run(
        run_name=f"{cfg.data.source} x{len(table) - 1} [{cfg.fingerprint()}]",
        tags=tags,
        description=describe(cfg, table),
    ) as parent:
        mlflow.log_params(_flat("", config))
        mlflow.log_dict(resolved, "config.json")
        for row in table.to_dict("records"):
            i = int(row["iteration"])
            metrics = read_json(layout.model_dir(i) / METRICS)
            pseudo = read_json(layout.pseudo_dir(i) / METRICS) if i > 0 else None
            mean_confidence.append(pseudo["mean_confidence"] if pseudo else None)
            mlflow.log_metrics(_step_metrics(row, pseudo), step=i)
            child_tags = {**tags, "iteration": str(i), "promoted": str(bool(row["promoted"]))}
            with mlflow.start_run(run_name=row["model"], nested=True, tags=child_tags):
                spec = cfg.spec(i)
                params: dict[str, Any] = {
                    "iteration": i,
                    "role": "teacher" if i == 0 else "student",
                    "arch": spec.arch,
                    "pretrained": spec.pretrained,
                    "transfer": spec.transfer,
                    "width": metrics["width"],
                    "depth": metrics["depth"],
                    "num_parameters": metrics["num_parameters"],
                    "num_labeled": metrics["num_labeled"],
                    "num_pseudo_labeled": metrics["num_pseudo_labeled"],
                    "epochs": cfg.epochs_for(i),
                }
                # val_accuracy is the last point of the per-epoch curve: the same model.
                final = {k: metrics[k] for k in ("test_accuracy", "train_seconds")}
                final["num_pseudo_labeled"] = metrics["num_pseudo_labeled"]
                if pseudo is None:
                    params.update(
                        augment=cfg.teacher.augment,
                        cutmix_alpha=cfg.teacher.cutmix_alpha,
                        dropout=0.0,
                        stochastic_depth=0.0,
                    )
                else:
                    params.update(
                        augment="strong",
                        randaugment_ops=cfg.noise.randaugment_ops,
                        randaugment_magnitude=cfg.noise.randaugment_magnitude,
                        dropout=cfg.noise.dropout,
                        stochastic_depth=cfg.noise.stochastic_depth,
                        pseudo_label_mode=cfg.pseudo_label.mode,
                        pseudo_label_threshold=cfg.pseudo_label.threshold,
                        pseudo_label_temperature=cfg.pseudo_label.temperature,
                        pseudo_label_balance=cfg.pseudo_label.balance,
                        cutmix_alpha=cfg.noise.cutmix_alpha,
                        mixup_alpha=cfg.noise.mixup_alpha,
                        unlabeled_ratio=cfg.student.unlabeled_ratio,
                        distillation=cfg.student.distillation,
                        distillation_alpha=cfg.student.alpha,
                        finetune_epochs=cfg.student.finetune_epochs,
                        teacher_iteration=metrics["teacher_iteration"],
                    )
                    final["pseudo_label_mean_confidence"] = pseudo["mean_confidence"]
                    if pseudo["pseudo_label_accuracy"] is not None:  # None: no hidden labels
                        final["pseudo_label_accuracy"] = pseudo["pseudo_label_accuracy"]
                mlflow.log_params(params)
                history = pd.read_csv(layout.model_dir(i) / HISTORY)
                _log_history(history)
                mlflow.log_metrics(final, step=int(history["epoch"].iloc[-1]))
                mlflow.log_dict(resolved, "config.json")
                mlflow.log_dict(data.classes, "classes.json")
                with tempfile.TemporaryDirectory() as tmp:
                    _write_evaluation(Path(tmp) / "evaluation", cfg, layout, i, data, test)
                    if pseudo is not None:
                        out = Path(tmp) / "pseudo_labels"
                        _write_pseudo_labels(out, cfg, layout, i, data, pseudo)
                    mlflow.log_artifacts(tmp)
                version = _log_model(
                    layout.model_dir(i) / MODEL, registered, tuple(data.images.shape[1:])
                )
            version_tags = {
                "iteration": i,
                "val_accuracy": metrics["val_accuracy"],
                "test_accuracy": metrics["test_accuracy"],
                "promoted": metrics["promoted"],
                "data_dvc_md5": tags["data_dvc_md5"],
                "params_hash": tags["params_hash"],
            }
            for key, value in version_tags.items():
                client.set_model_version_tag(registered, version, key, str(value))
            versions.append((version, float(metrics["val_accuracy"])))
        summary = table.assign(
            pseudo_label_mean_confidence=mean_confidence,
            model_version=[v for v, _ in versions],
        )
        mlflow.log_text(summary.to_csv(index=False), "iterations.csv")
        mlflow.log_text(markdown_table(summary), "iterations.md")
        for name in REPORT_FILES:
            mlflow.log_artifact(str(layout.report / name), "report")
        promoted = versions[final_iteration(table)][0]
        _update_aliases(client, registered, promoted, versions)
        log.info("MLflow: parent run %s in %s", parent.info.run_id, tracking_uri())
        return parent.info.run_id
