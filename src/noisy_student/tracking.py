"""MLflow plumbing shared by the records (``records.py``) and the registry
(``registry.py``): the tracking store and its locks, lineage tags, the artifacts logged
beside each model, and loading a model back for inference."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pytorch
import numpy as np
import pandas as pd
import requests
import torch
import torchvision
from mlflow.models import infer_signature
from mlflow.models.model import ModelInfo

from noisy_student.config import Config, ConfigError
from noisy_student.data import ImageSet
from noisy_student.engine import precision, predict_proba, select_device
from noisy_student.io import write_json, write_parquet
from noisy_student.models import load_checkpoint
from noisy_student.report import (
    confusion_matrix,
    per_class_accuracy,
    sample_rows,
    write_class_counts_png,
    write_confidence_histogram_png,
    write_confusion_matrix_png,
    write_per_class_accuracy_png,
    write_sample_grid_png,
)
from noisy_student.runs import MODEL, PSEUDO_LABELS, RunLayout
from noisy_student.versions import code_version, data_version

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow/mlflow.db"
MANIFEST_ROWS = 20_000  # pseudo-label rows logged per student; a seeded sample beyond
GRID_IMAGES = 32  # pseudo-labeled images shown per student
SERVER_ANSWER_SECONDS = 5  # a tracking server that takes longer to answer is down
SWITCH_OFF = "NOISY_STUDENT_MLFLOW=off"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


class StoreUnavailable(RuntimeError):
    """The tracking store cannot record: a server that does not answer, a database file
    that is not one. Its message is one line naming the store and what to do."""


def _reason(err: requests.RequestException) -> str:
    """``Connection refused`` out of requests' nested message, or the error's kind."""
    if isinstance(err, requests.Timeout):
        return f"no answer within {SERVER_ANSWER_SECONDS:g} s"
    found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(err))
    return found.group(1).strip() if found else type(err).__name__


def check_store(uri: str | None = None) -> None:
    """Refuse, within seconds and before any work, a store that cannot record: MLflow's
    client retries a server that is down for minutes before it says anything, and a
    corrupt database file ends in a traceback of SQL. Raises ``StoreUnavailable``."""
    uri = uri or tracking_uri()
    if uri.startswith(("http://", "https://")):
        try:  # any HTTP answer, even a refusal of a proxy, means the server is up
            requests.get(f"{uri.rstrip('/')}/health", timeout=SERVER_ANSWER_SECONDS)
        except requests.RequestException as err:
            shown = re.sub(r"//[^/@]*@", "//", uri)  # never a password into the logs
            raise StoreUnavailable(
                f"MLFLOW_TRACKING_URI: the tracking server {shown} does not answer "
                f"({_reason(err)}); start it, point MLFLOW_TRACKING_URI at one that runs, "
                f"or record nothing with {SWITCH_OFF}"
            ) from None
    elif uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///").split("?")[0])
        if not path.exists():
            return  # a new store: MLflow creates it
        try:
            with closing(
                sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
            ) as db:
                db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as err:
            raise StoreUnavailable(
                f"{path}: the MLflow store is not a usable SQLite database ({err}); move it "
                "aside to start a new store, restore it from a backup, or record nothing "
                f"with {SWITCH_OFF}"
            ) from None


def artifact_root(uri: str) -> Path | None:
    """``artifacts/`` beside a sqlite store's database file, so that the records and their
    files move together (the default store: ``mlflow/artifacts``); None for other stores,
    which choose their own."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?")[0]).parent / "artifacts"


@contextmanager
def store_lock(name: str) -> Iterator[None]:
    """Hold an exclusive lock named ``name`` beside a sqlite store's database file while the
    block runs; other processes wait for it. SQLite lets one writer in at a time but does
    not make MLflow's read-then-write sequences (creating or migrating the schema, "is
    there a version of this file yet?") atomic; a server store runs its own transactions,
    so nothing is locked there."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        yield
        return
    path = Path(uri.removeprefix("sqlite:///").split("?")[0] + f".{name}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def use_experiment(name: str) -> str:
    """Point MLflow at the tracking store and experiment; return the experiment id.

    A store that cannot record is refused first (``check_store``). The store's schema is
    created or migrated, and the experiment created, by one process
    at a time (``store_lock``); on a sqlite store a new experiment keeps its artifacts
    beside the database.
    """
    uri = tracking_uri()
    check_store(uri)
    root = artifact_root(uri)
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    with store_lock("schema"):
        client = mlflow.MlflowClient(uri)
        client.search_registered_models(max_results=1)  # the registry's tables, migrated
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            location = root.resolve().as_uri() if root is not None else None
            experiment_id = client.create_experiment(name, artifact_location=location)
        elif experiment.lifecycle_stage == "deleted":
            # Refused, not restored: the deletion was someone's choice, and MLflow keeps
            # the name taken until the experiment is restored or purged (`mlflow gc`).
            raise ConfigError(
                f"tracking.experiment: the MLflow experiment {name!r} (id "
                f"{experiment.experiment_id}) is deleted in {uri}; restore it with "
                f"`MLFLOW_TRACKING_URI={uri} mlflow experiments restore --experiment-id "
                f"{experiment.experiment_id}`, or set tracking.experiment to another name"
            )
        else:
            experiment_id = experiment.experiment_id
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
    return {
        "entry_point": entry_point,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower(),
        "code_version": code_version(),
        "data_dvc_md5": data_version(),
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


def _log_model(path: Path, image_shape: tuple[int, ...]) -> ModelInfo:
    """Log the checkpoint's model to the active run as the MLflow model ``model``, with the
    checkpoint itself as ``checkpoint/model.pt``; registering it is the registry's part."""
    model = load_checkpoint(str(path)).eval()
    # A batch of 2: torch.export (MLflow's pt2 format) keeps a batch of 1 static.
    example = np.zeros((2, *image_shape), dtype=np.float32)
    with torch.inference_mode():
        output = model(torch.from_numpy(example)).numpy()
    info = mlflow.pytorch.log_model(
        model,
        name="model",
        signature=infer_signature(example, output),
        input_example=example,
        pip_requirements=[
            f"torch=={torch.__version__.split('+')[0]}",
            f"torchvision=={torchvision.__version__.split('+')[0]}",
        ],
    )
    # What `predict` and `pretrained` load: never the MLflow model, which may be unpickled.
    mlflow.log_artifact(str(path), "checkpoint")
    return info


def _write_evaluation(
    out: Path, cfg: Config, layout: RunLayout, iteration: int, data: ImageSet, test: pd.DataFrame
) -> None:
    """Confusion matrix and per-class accuracy of the iteration's checkpoint on the test
    split: which classes the model confuses, beyond the one accuracy number."""
    model = load_checkpoint(str(layout.model_dir(iteration) / MODEL))
    ids = test["image_id"].to_numpy()
    with precision(cfg.precision):
        probs = predict_proba(model, data.images, select_device(cfg.device), ids=ids)
    preds = probs.argmax(dim=-1)
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


def log_pipeline_run(
    cfg: Config, layout: RunLayout, entry_point: str, extra_tags: dict[str, str] | None = None
) -> str:
    """Record the finished run in ``layout`` (whatever its steps recorded already) and close
    its parent run; return the parent run id. See ``records.record_run``."""
    from noisy_student.records import record_run

    return record_run(cfg, layout, entry_point, extra_tags)
