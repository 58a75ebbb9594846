"""The model registry: one registered model per task, one version per model file, and
aliases decided only among comparable models.

A *task* is what makes two validation accuracies comparable: the data source, the class
names, the image shape and the validation split itself (its images and labels). Its key
is recorded on every version. With the default ``tracking.registered_model``
(``noisy-student``) each task gets its own registered model,
``noisy-student-<source>-<task key>``, so ``@champion`` of one dataset is never compared
with, or replaced by, a model of another; a name set explicitly holds one task only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities.model_registry import ModelVersion

from noisy_student.config import MODEL_NAME_PATTERN, Config, TrackingConfig
from noisy_student.data import ImageSet
from noisy_student.runs import RunLayout
from noisy_student.tracking import store_lock

TEACHER_ALIAS = "teacher"
CHAMPION_ALIAS = "champion"
SHA_TAG = "checkpoint_sha256"
TASK_TAG = "task_key"
DEFAULT_NAME = TrackingConfig().registered_model


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def task_key(cfg: Config, layout: RunLayout, data: ImageSet) -> str:
    """Short hash of what a model is scored on: source, classes, image shape, and the
    validation images and labels (``splits/val.parquet``)."""
    val = pd.read_parquet(layout.splits / "val.parquet", columns=["image_id", "label"])
    ids = val["image_id"].to_numpy(dtype=np.int64)
    digest = hashlib.sha256()
    digest.update(
        json.dumps(
            {
                "source": cfg.data.source,
                "classes": list(data.classes),
                "shape": list(data.images.shape[1:]),
            }
        ).encode()
    )
    digest.update(ids.tobytes())
    digest.update(val["label"].to_numpy(dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(data.images[ids]).tobytes())
    return digest.hexdigest()[:12]


def registered_model_name(cfg: Config, task: str) -> str:
    """The default name gets the task appended; a name the user chose is kept as is."""
    name = cfg.tracking.registered_model
    return f"{name}-{cfg.data.source}-{task[:6]}" if name == DEFAULT_NAME else name


def name_filter(name: str) -> str:
    """The search filter ``name = '<name>'``, for a name the schema allows only: any other
    (a quote in it) could change what the filter selects."""
    if not MODEL_NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"registered model {name!r}: not a name tracking.registered_model allows "
            "(letters, digits, '.', '_', '-'); no MLflow search is built from it"
        )
    return f"name = '{name}'"


def check_task(client: mlflow.MlflowClient, name: str, task: str) -> None:
    """Refuse a registered model whose versions belong to another task: its champion could
    not be compared with this run's models (checked before any training)."""
    others = {v.tags.get(TASK_TAG) for v in client.search_model_versions(name_filter(name))}
    others.discard(task)
    if others:
        shown = ", ".join(sorted(str(t) for t in others))
        raise ValueError(
            f"tracking.registered_model: {name!r} holds models of another task (task key "
            f"{shown}, this run's is {task}); their validation accuracy is not comparable. "
            f"Choose another name, or keep the default {DEFAULT_NAME!r} for one registered "
            "model per task."
        )


def version_of_file(client: mlflow.MlflowClient, name: str, sha: str) -> ModelVersion | None:
    """The version registered for the model file whose sha256 is ``sha``, if any."""
    found = client.search_model_versions(f"{name_filter(name)} and tags.{SHA_TAG} = '{sha}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def register(
    client: mlflow.MlflowClient, name: str, model_uri: str, sha: str, tags: dict[str, str]
) -> str:
    """Register ``model_uri`` as a version of ``name`` unless the file ``sha`` has one
    already; return the version. Looked up and created under the registry lock (a sqlite
    store) or checked again after creating (a server), so two processes registering the
    same file, or creating ``name`` at once, leave one."""
    with store_lock("registry"):
        found = version_of_file(client, name, sha)
        if found is not None:
            return str(found.version)
        # Creates ``name`` first where it is missing (another process creating it at the
        # same time included: MLflow then adds the version to theirs).
        version = mlflow.register_model(model_uri, name, tags={**tags, SHA_TAG: sha})
        # A server store is not locked: another process may have registered the same file
        # between the lookup and here. The first version stays; a later duplicate goes.
        first = version_of_file(client, name, sha)
        if first is not None and int(first.version) < int(version.version):
            client.delete_model_version(name, version.version)
            return str(first.version)
        return str(version.version)


def _champion_val_accuracy(client: mlflow.MlflowClient, name: str) -> float | None:
    """Validation accuracy of the current champion; None when there is none to beat (or it
    was registered without the tag, so it cannot be compared)."""
    if CHAMPION_ALIAS not in client.get_registered_model(name).aliases:
        return None
    tag = client.get_model_version_by_alias(name, CHAMPION_ALIAS).tags.get("val_accuracy")
    return None if tag is None else float(tag)


def update_aliases(
    client: mlflow.MlflowClient, name: str, promoted: str, versions: list[tuple[str, float]]
) -> None:
    """``teacher`` -> this run's final promoted model; ``champion`` -> a new version only
    when strictly better on validation than the champion of all earlier runs of the task.
    Under the registry lock: two runs ending at once cannot both read the old champion."""
    with store_lock("registry"):
        client.set_registered_model_alias(name, TEACHER_ALIAS, promoted)
        best = _champion_val_accuracy(client, name)
        for version, val_accuracy in versions:
            if best is None or val_accuracy > best:
                client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
                best = val_accuracy
