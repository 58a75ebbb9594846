"""MLflow records of a finished pipeline run: one parent run, one nested run per
iteration (teacher = 0), each model registered as a version of the registered model.

The records are written from the run directory's files, so a run made by any entry
point (DVC stages, a Prefect flow, the library) gets the same MLflow structure.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
import torchvision
import yaml
from mlflow.models import infer_signature

from noisy_student.config import Config
from noisy_student.data import load_images
from noisy_student.io import read_json
from noisy_student.models import load_checkpoint
from noisy_student.pipeline import HISTORY, METRICS, MODEL, RunLayout

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow/mlflow.db"
DEFAULT_ARTIFACT_ROOT = "mlflow/artifacts"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


def use_experiment(name: str) -> str:
    """Point MLflow at the tracking store and experiment; return the experiment id.

    On the default local store the experiment keeps its artifacts in ``mlflow/artifacts``.
    """
    uri = tracking_uri()
    if uri == DEFAULT_TRACKING_URI:
        Path(DEFAULT_ARTIFACT_ROOT).mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return mlflow.set_experiment(name).experiment_id
    location = (
        Path(DEFAULT_ARTIFACT_ROOT).resolve().as_uri() if uri == DEFAULT_TRACKING_URI else None
    )
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


def _log_model(path: Path, registered_model: str, image_shape: tuple[int, ...]) -> None:
    model = load_checkpoint(str(path)).eval()
    # A batch of 2: torch.export (MLflow's pt2 format) keeps a batch of 1 static.
    example = np.zeros((2, *image_shape), dtype=np.float32)
    with torch.inference_mode():
        output = model(torch.from_numpy(example)).numpy()
    mlflow.pytorch.log_model(
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


def log_pipeline_run(
    cfg: Config, layout: RunLayout, entry_point: str, extra_tags: dict[str, str] | None = None
) -> str:
    """Record the finished run in ``layout`` to MLflow; return the parent run id."""
    use_experiment(cfg.tracking.experiment)
    tags = {**lineage_tags(cfg, entry_point), **(extra_tags or {})}
    table = pd.read_csv(layout.report / "iterations.csv")
    image_shape = load_images(cfg.data.source, cfg.data.root).images.shape[1:]
    first, last = table.iloc[0], table.iloc[-1]
    description = (
        f"Noisy Student on {cfg.data.source}, {cfg.data.labeled_per_class} labels per class, "
        f"{len(table) - 1} student iteration(s), pseudo-labels {cfg.pseudo_label.mode} "
        f"(threshold {cfg.pseudo_label.threshold}), RandAugment N={cfg.noise.randaugment_ops} "
        f"M={cfg.noise.randaugment_magnitude}. Test accuracy: teacher {first.test_accuracy:.4f}"
        f" -> {last.model} {last.test_accuracy:.4f}."
    )
    config = cfg.model_dump(mode="json")
    config.pop("iterations")  # logged per iteration, on the child runs
    with mlflow.start_run(
        run_name=f"{cfg.data.source} x{len(table) - 1} [{cfg.fingerprint()}]",
        tags=tags,
        description=description,
    ) as parent:
        mlflow.log_params(_flat("", config))
        mlflow.log_dict(cfg.model_dump(mode="json"), "config.json")
        mlflow.log_artifact(str(layout.report / "iterations.csv"))
        for row in table.to_dict("records"):
            i = int(row["iteration"])
            step_metrics = {
                "val_accuracy": row["val_accuracy"],
                "test_accuracy": row["test_accuracy"],
            }
            mlflow.log_metrics(step_metrics, step=i)
            metrics = read_json(layout.model_dir(i) / METRICS)
            with mlflow.start_run(
                run_name=row["model"], nested=True, tags={**tags, "iteration": str(i)}
            ):
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
                if i == 0:
                    params.update(augment=cfg.teacher.augment, dropout=0.0, stochastic_depth=0.0)
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
                        teacher_iteration=cfg.iterations[i].teacher,
                    )
                    pseudo = read_json(layout.pseudo_dir(i) / METRICS)
                    final["pseudo_label_mean_confidence"] = pseudo["mean_confidence"]
                    if pseudo["pseudo_label_accuracy"] is not None:  # None: no hidden labels
                        final["pseudo_label_accuracy"] = pseudo["pseudo_label_accuracy"]
                mlflow.log_params(params)
                history = pd.read_csv(layout.model_dir(i) / HISTORY)
                _log_history(history)
                mlflow.log_metrics(final, step=int(history["epoch"].iloc[-1]))
                _log_model(layout.model_dir(i) / MODEL, cfg.tracking.registered_model, image_shape)
        log.info("MLflow: parent run %s in %s", parent.info.run_id, tracking_uri())
        return parent.info.run_id
