"""MLflow records written while the pipeline runs, whichever entry point runs it.

One *parent* run per pipeline run, keyed by the config's fingerprint, the code version,
the data version and the run directory (tag ``run_key``): the first step that records
opens it, later steps (in other processes: DVC stages, Prefect tasks) find it by that
tag, and ``record_run`` (the report) closes it. Under it, each training step logs into its
own child run as it runs (params at the start, per-epoch metrics ``epoch/*`` live, the
model when saved) and each labeling step into another; a step that fails marks its child
and the parent FAILED (KILLED when SIGTERM or Ctrl-C stopped it), and a re-run of the same
pipeline run resumes the same parent.

Re-runs are idempotent: a step that runs again replaces its earlier, unfinished attempt,
and drops its own record when an earlier attempt recorded the same output file (same
sha256); a model file is registered once (``registry.py``); the report logs only what is
missing. ``NOISY_STUDENT_MLFLOW=off`` turns recording off (the steps still run).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.entities import Metric, Param, Run
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from noisy_student import pipeline
from noisy_student.config import Config
from noisy_student.data import ImageSet, load_images
from noisy_student.io import read_json
from noisy_student.registry import (
    TASK_TAG,
    check_task,
    file_sha256,
    register,
    registered_model_name,
    task_key,
    update_aliases,
    version_of_file,
)
from noisy_student.report import markdown_table
from noisy_student.runs import (
    HISTORY,
    METRICS,
    MODEL,
    PSEUDO_LABELS,
    RunLayout,
    check_iteration,
    final_iteration,
)
from noisy_student.tracking import (
    _flat,
    _log_model,
    _write_evaluation,
    _write_pseudo_labels,
    lineage_tags,
    store_lock,
    tracking_uri,
    use_experiment,
)
from noisy_student.versions import code_version, data_version

log = logging.getLogger(__name__)

SWITCH = "NOISY_STUDENT_MLFLOW"
RUN_KEY_TAG = "run_key"
RECORD_TAG = "record"  # pipeline | train | pseudo_label
CONTENT_TAG = "output_sha256"  # of the file a step wrote (model or pseudo-label manifest)
VERSION_TAG = "model_version"
EPOCH_PREFIX = "epoch/"  # per-epoch metrics; per-iteration ones have no prefix
REPORT_FILES = ("report.md", "report.html", "accuracy_by_iteration.png", "per_class_accuracy.png")
BATCH = 100  # params per log_batch call (MLflow's limit)


def enabled() -> bool:
    """Whether steps record to MLflow: off when ``NOISY_STUDENT_MLFLOW`` is 0/off/false/no."""
    return os.environ.get(SWITCH, "on").strip().lower() not in ("0", "off", "false", "no")


def run_key(cfg: Config, layout: RunLayout) -> str:
    """What identifies one pipeline run's records: params, code, data and outputs."""
    parts = [cfg.fingerprint(), code_version(), data_version(), layout.identity]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def child_name(cfg: Config, iteration: int) -> str:
    """Short enough for the run list's name column: ``student-2 w1.5 d1``."""
    spec = cfg.spec(iteration)
    role = "teacher" if iteration == 0 else f"student-{iteration}"
    if spec.arch != "small_resnet":
        return f"{role} {spec.arch}"
    return f"{role} w{spec.width:g} d{spec.depth:g}"


def label_name(iteration: int) -> str:
    return f"pseudo-labels {iteration}"


def end_status(err: BaseException) -> str:
    """How a record ends when ``err`` stopped its step: KILLED when the step was stopped
    from outside (a signal, Ctrl-C, an orchestrator's cancellation such as the signal a
    Prefect flow run raises on SIGTERM: exceptions outside ``Exception``); the step was
    sound and may simply run again. FAILED for an error."""
    return "FAILED" if isinstance(err, Exception) else "KILLED"


@dataclass
class Records:
    """A pipeline run's parent record and what its steps share."""

    client: mlflow.MlflowClient
    experiment_id: str
    parent_id: str
    key: str
    data: ImageSet
    registered_model: str
    tags: dict[str, str]  # lineage tags every child gets


def _search(records: Records, record: str, iteration: int | None = None) -> list[Run]:
    query = f"tags.{RUN_KEY_TAG} = '{records.key}' and tags.{RECORD_TAG} = '{record}'"
    if iteration is not None:
        query += f" and tags.iteration = '{iteration}'"
    return records.client.search_runs([records.experiment_id], query, max_results=1000)


def _parent_name(client: mlflow.MlflowClient, experiment_id: str, cfg: Config) -> str:
    """``digits · 2 students · 3fa9c1`` (the config's fingerprint), with the start time
    appended when another parent already has that name (another code or data version)."""
    n = len(cfg.iterations)
    name = f"{cfg.data.source} · {n} student{'s' * (n != 1)} · {cfg.fingerprint()[:6]}"
    taken = client.search_runs([experiment_id], f"attributes.run_name = '{name}'", max_results=1)
    return f"{name} · {time.strftime('%m-%d %H:%M:%S')}" if taken else name


def _log_params(client: mlflow.MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, str(v)) for k, v in params.items()]
    for start in range(0, len(items), BATCH):
        client.log_batch(run_id, params=items[start : start + BATCH])


def open_records(
    cfg: Config, layout: RunLayout, entry_point: str, extra_tags: dict[str, str] | None = None
) -> Records:
    """Find the parent run of this pipeline run, or open it; mark it RUNNING. Refuses a
    registered model that holds another task's versions before any step runs."""
    experiment_id = use_experiment(cfg.tracking.experiment)
    client = mlflow.MlflowClient(tracking_uri())
    data = load_images(cfg.data.source, cfg.data.root)
    task = task_key(cfg, layout, data)
    name = registered_model_name(cfg, task)
    check_task(client, name, task)
    key = run_key(cfg, layout)
    tags = {
        **lineage_tags(cfg, entry_point),
        **(extra_tags or {}),
        RUN_KEY_TAG: key,
        TASK_TAG: task,
        "registered_model": name,
    }
    records = Records(client, experiment_id, "", key, data, name, tags)
    with store_lock("runs"):
        found = _search(records, "pipeline")
        if found:
            parent = min(found, key=lambda r: r.info.start_time)
            if parent.info.status != "RUNNING":
                client.update_run(parent.info.run_id, "RUNNING")
        else:
            parent = client.create_run(
                experiment_id,
                run_name=_parent_name(client, experiment_id, cfg),
                tags={**tags, RECORD_TAG: "pipeline", "run_dir": str(layout.root.resolve())},
            )
            resolved = cfg.model_dump(mode="json")
            # Iterations are logged as params per iteration, on the child runs.
            config = {k: v for k, v in resolved.items() if k != "iterations"}
            _log_params(client, parent.info.run_id, _flat("", config))
            client.log_dict(parent.info.run_id, resolved, "config.json")
    records.parent_id = parent.info.run_id
    return records


@dataclass
class Attempt:
    """One run of one step, recorded in a new child run; earlier attempts of the same step
    (``stale``) are replaced by it, unless one of them recorded the same output."""

    records: Records
    run_id: str
    stale: list[Run]
    kept: str | None = field(default=None)

    def same_as_before(self, sha: str) -> bool:
        """Whether a finished earlier attempt recorded the output whose sha256 is ``sha``
        (a forced re-run that reproduced its file): that record is kept, this one dropped."""
        self.records.client.set_tag(self.run_id, CONTENT_TAG, sha)
        for run in self.stale:
            if run.info.status == "FINISHED" and run.data.tags.get(CONTENT_TAG) == sha:
                self.kept = run.info.run_id
                return True
        return False

    def settle(self) -> None:
        keep = self.kept or self.run_id
        for run_id in [r.info.run_id for r in self.stale] + [self.run_id]:
            if run_id != keep:
                self.records.client.delete_run(run_id)


@contextmanager
def step_run(
    records: Records, record: str, iteration: int, name: str, start_time: int | None = None
) -> Iterator[Attempt]:
    """A child run, active (``mlflow.*`` logs into it) while the block runs: FINISHED after;
    when the block raises, FAILED (and the parent with it), or KILLED when a signal or
    Ctrl-C stopped it."""
    stale = _search(records, record, iteration)
    run = records.client.create_run(
        records.experiment_id,
        start_time=start_time,
        run_name=name,
        tags={
            **records.tags,
            RECORD_TAG: record,
            "iteration": str(iteration),
            MLFLOW_PARENT_RUN_ID: records.parent_id,
        },
    )
    attempt = Attempt(records, run.info.run_id, stale)
    try:
        with mlflow.start_run(run_id=run.info.run_id):
            yield attempt
    except BaseException as err:
        status = end_status(err)
        if status != "FAILED":  # MLflow's own end of the run says FAILED
            records.client.set_terminated(attempt.run_id, status)
        records.client.set_terminated(records.parent_id, status)
        raise
    attempt.settle()


def _epoch_logger(client: mlflow.MlflowClient, run_id: str) -> Callable[[dict], None]:
    """Log one epoch's history record as ``epoch/<name>`` at step = epoch; a store that
    does not answer costs a warning, not the training."""

    def log_epoch(record: dict) -> None:
        now, step = int(time.time() * 1000), int(record["epoch"])
        metrics = [
            Metric(f"{EPOCH_PREFIX}{k}", float(v), now, step)
            for k, v in record.items()
            if k != "epoch" and v is not None and math.isfinite(float(v))
        ]
        try:
            client.log_batch(run_id, metrics=metrics)
        except MlflowException as err:
            log.warning("MLflow: epoch %d not logged: %s", step, err.message)

    return log_epoch


def _train_params(cfg: Config, layout: RunLayout, iteration: int) -> dict[str, Any]:
    """What the step trains with, known before it starts."""
    spec = cfg.spec(iteration)
    params: dict[str, Any] = {
        "iteration": iteration,
        "role": "teacher" if iteration == 0 else "student",
        "arch": spec.arch,
        "width": spec.width,
        "depth": spec.depth,
        "pretrained": spec.pretrained,
        "transfer": spec.transfer,
        "epochs": cfg.epochs_for(iteration),
    }
    if iteration == 0:
        tc = cfg.teacher
        consistency = {
            "unlabeled_ratio": tc.unlabeled_ratio,
            "threshold": tc.threshold,
            "unlabeled_weight": tc.unlabeled_weight,
            "adaptive_threshold": tc.adaptive_threshold,
            "ema_decay": tc.ema_decay,
        }
        return params | {
            "augment": tc.augment,
            "randaugment_ops": tc.randaugment_ops,
            "randaugment_magnitude": tc.randaugment_magnitude,
            "cutmix_alpha": tc.cutmix_alpha,
            "mix_prob": tc.mix_prob,
            "mixup_alpha": 0.0,
            "dropout": 0.0,
            "stochastic_depth": 0.0,
            "distillation": "none",  # a value, so that charts of the param show the teacher
            "finetune_epochs": 0,
            "method": tc.method,
            **(consistency if tc.method == "fixmatch" else {}),
        }
    layout.require(layout.pseudo_dir(iteration) / METRICS)
    pseudo = read_json(layout.pseudo_dir(iteration) / METRICS)
    return params | {
        "augment": "strong",
        "randaugment_ops": cfg.noise.randaugment_ops,
        "randaugment_magnitude": cfg.noise.randaugment_magnitude,
        "dropout": cfg.noise.dropout,
        "stochastic_depth": cfg.noise.stochastic_depth,
        "pseudo_label_mode": cfg.pseudo_label.mode,
        "pseudo_label_threshold": cfg.pseudo_label.threshold,
        "pseudo_label_temperature": cfg.pseudo_label.temperature,
        "pseudo_label_balance": cfg.pseudo_label.balance,
        "cutmix_alpha": cfg.noise.cutmix_alpha,
        "mixup_alpha": cfg.noise.mixup_alpha,
        "unlabeled_ratio": cfg.student.unlabeled_ratio,
        "distillation": cfg.student.distillation,
        "distillation_alpha": cfg.student.alpha,
        "finetune_epochs": cfg.student.finetune_epochs,
        "teacher_iteration": pseudo["teacher_iteration"],
    }


def _record_model(
    records: Records, cfg: Config, layout: RunLayout, iteration: int, attempt: Attempt
) -> None:
    """The trained model's results, evaluation and registered version, into the active
    child run (nothing when an earlier attempt recorded the same model file)."""
    path = layout.model_dir(iteration) / MODEL
    sha = file_sha256(path)
    if attempt.same_as_before(sha):
        return
    metrics = read_json(layout.model_dir(iteration) / METRICS)
    mlflow.log_params(
        {
            k: metrics[k]
            for k in ("num_parameters", "num_labeled", "num_pseudo_labeled", "precision")
            if k in metrics  # precision: absent from models trained before it was recorded
        }
    )
    keys = ("val_accuracy", "val_loss", "test_accuracy", "train_seconds", "num_pseudo_labeled")
    final = {k: metrics[k] for k in keys}
    if iteration > 0:
        pseudo = read_json(layout.pseudo_dir(iteration) / METRICS)
        final["pseudo_label_mean_confidence"] = pseudo["mean_confidence"]
        if pseudo["pseudo_label_accuracy"] is not None:  # None: no hidden labels
            final["pseudo_label_accuracy"] = pseudo["pseudo_label_accuracy"]
    # Step = iteration, as on the parent: charts of these metrics line up by iteration.
    mlflow.log_metrics({k: float(v) for k, v in final.items()}, step=iteration)
    mlflow.set_tag("promoted", str(bool(metrics["promoted"])))
    mlflow.log_dict(cfg.model_dump(mode="json"), "config.json")
    mlflow.log_dict(records.data.classes, "classes.json")
    test = pd.read_parquet(layout.splits / "test.parquet")
    with tempfile.TemporaryDirectory() as tmp:
        _write_evaluation(Path(tmp) / "evaluation", cfg, layout, iteration, records.data, test)
        mlflow.log_artifacts(tmp)
    name, client = records.registered_model, records.client
    found = version_of_file(client, name, sha)
    if found is None:
        info = _log_model(path, tuple(records.data.images.shape[1:]))
        version_tags = {
            "iteration": iteration,
            "val_accuracy": metrics["val_accuracy"],
            "test_accuracy": metrics["test_accuracy"],
            "promoted": metrics["promoted"],
            "data_dvc_md5": records.tags["data_dvc_md5"],
            "params_hash": records.tags["params_hash"],
            "code_version": records.tags["code_version"],
            TASK_TAG: records.tags[TASK_TAG],
        }
        tags = {k: str(v) for k, v in version_tags.items()}
        version = register(client, name, info.model_uri, sha, tags)
    else:  # the same file, trained by another pipeline run: link its version
        version = str(found.version)
    mlflow.set_tag(VERSION_TAG, version)


def train_step(
    cfg: Config,
    layout: RunLayout,
    iteration: int,
    entry_point: str = "library",
    extra_tags: dict[str, str] | None = None,
) -> Path:
    """``pipeline.train``, recorded live in its child run."""
    check_iteration(cfg, iteration)  # before a record is opened for a model of no params
    if not enabled():
        return pipeline.train(cfg, layout, iteration)
    records = open_records(cfg, layout, entry_point, extra_tags)
    with step_run(records, "train", iteration, child_name(cfg, iteration)) as attempt:
        mlflow.log_params(_train_params(cfg, layout, iteration))
        on_epoch = _epoch_logger(records.client, attempt.run_id)
        out = pipeline.train(cfg, layout, iteration, on_epoch=on_epoch)
        _record_model(records, cfg, layout, iteration, attempt)
    return out


def _record_labels(cfg: Config, layout: RunLayout, iteration: int, attempt: Attempt) -> None:
    """The pseudo-labels of student ``iteration``, into the active child run."""
    if attempt.same_as_before(file_sha256(layout.pseudo_dir(iteration) / PSEUDO_LABELS)):
        return
    pseudo = read_json(layout.pseudo_dir(iteration) / METRICS)
    pc = cfg.pseudo_label
    mlflow.log_params(
        {
            "iteration": iteration,
            "role": "pseudo-labels",
            "teacher_iteration": pseudo["teacher_iteration"],
            "pseudo_label_mode": pc.mode,
            "pseudo_label_threshold": pc.threshold,
            "pseudo_label_temperature": pc.temperature,
            "pseudo_label_balance": pc.balance,
            "tta": pc.tta,
        }
    )
    keys = ("pool_size", "num_above_threshold", "kept_fraction", "num_pseudo_labeled")
    values = {k: pseudo[k] for k in keys} | {
        "pseudo_label_mean_confidence": pseudo["mean_confidence"],
        "pseudo_label_accuracy": pseudo["pseudo_label_accuracy"],
    }
    mlflow.log_metrics({k: float(v) for k, v in values.items() if v is not None}, step=iteration)
    data = attempt.records.data
    with tempfile.TemporaryDirectory() as tmp:
        _write_pseudo_labels(Path(tmp) / "pseudo_labels", cfg, layout, iteration, data, pseudo)
        mlflow.log_artifacts(tmp)


def label_step(
    cfg: Config,
    layout: RunLayout,
    iteration: int,
    entry_point: str = "library",
    extra_tags: dict[str, str] | None = None,
) -> Path:
    """``pipeline.label_pool``, recorded in its child run."""
    check_iteration(cfg, iteration, first=1)
    if not enabled():
        return pipeline.label_pool(cfg, layout, iteration)
    records = open_records(cfg, layout, entry_point, extra_tags)
    with step_run(records, "pseudo_label", iteration, label_name(iteration)) as attempt:
        out = pipeline.label_pool(cfg, layout, iteration)
        _record_labels(cfg, layout, iteration, attempt)
    return out


def _current(records: Records, record: str, iteration: int, path: Path) -> Run | None:
    """The finished record of the step whose output is ``path`` as it is now."""
    sha = file_sha256(path)
    for run in _search(records, record, iteration):
        if run.info.status == "FINISHED" and run.data.tags.get(CONTENT_TAG) == sha:
            return run
    return None


def record_pseudo_labels(
    cfg: Config,
    layout: RunLayout,
    iteration: int,
    entry_point: str = "library",
    extra_tags: dict[str, str] | None = None,
    started: float | None = None,
) -> None:
    """Record pseudo-labels already written under ``layout`` (by ``label_pool`` or a merge
    of shards), once: call it after they are written. ``started`` (``time.time()`` when
    labeling began) becomes the child run's start, so its duration is the labeling's."""
    if enabled():
        records = open_records(cfg, layout, entry_point, extra_tags)
        _record_labels_after(records, cfg, layout, iteration, started)


def record_training(
    cfg: Config, layout: RunLayout, iteration: int, entry_point: str = "library"
) -> None:
    """Record a model trained elsewhere (on a Ray cluster, whose workers do not log) from
    its files, once: the same params, per-epoch metrics, model and registered version."""
    if enabled():
        records = open_records(cfg, layout, entry_point)
        if not _current(records, "train", iteration, layout.model_dir(iteration) / MODEL):
            _record_training_after(records, cfg, layout, iteration)


def _record_labels_after(
    records: Records, cfg: Config, layout: RunLayout, i: int, started: float | None = None
) -> None:
    if _current(records, "pseudo_label", i, layout.pseudo_dir(i) / PSEUDO_LABELS):
        return
    start = None if started is None else int(started * 1000)
    with step_run(records, "pseudo_label", i, label_name(i), start) as attempt:
        _record_labels(cfg, layout, i, attempt)


def _record_training_after(records: Records, cfg: Config, layout: RunLayout, i: int) -> Run:
    """The train step's record of a model trained without one (say with ``--no-mlflow``),
    from its files: the same params, per-epoch metrics and model."""
    with step_run(records, "train", i, child_name(cfg, i)) as attempt:
        mlflow.log_params(_train_params(cfg, layout, i))
        log_epoch = _epoch_logger(records.client, attempt.run_id)
        for row in pd.read_csv(layout.model_dir(i) / HISTORY).to_dict("records"):
            log_epoch({k: v for k, v in row.items() if pd.notna(v)})
        _record_model(records, cfg, layout, i, attempt)
    return _current(records, "train", i, layout.model_dir(i) / MODEL)


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


def _log_missing_metrics(records: Records, points: list[tuple[str, float, int]]) -> None:
    """Log the parent's (name, value, step) points it does not have yet (a report killed
    half-way logged some)."""
    client, run_id = records.client, records.parent_id
    have = {
        (name, m.step)
        for name in {p[0] for p in points}
        for m in client.get_metric_history(run_id, name)
    }
    now = int(time.time() * 1000)
    missing = [Metric(n, v, now, s) for n, v, s in points if (n, s) not in have]
    if missing:
        client.log_batch(run_id, metrics=missing)


def record_run(
    cfg: Config,
    layout: RunLayout,
    entry_point: str = "library",
    extra_tags: dict[str, str] | None = None,
) -> str:
    """Complete and close the records of the finished run in ``layout`` (the report step):
    record any step that ran without recording, log the parent's per-iteration metrics,
    summary and report, move the aliases, mark the parent FINISHED; return its id. Run
    again, it logs only what is missing."""
    records = open_records(cfg, layout, entry_point, extra_tags)
    client, parent = records.client, records.parent_id
    try:
        table = pd.read_csv(layout.report / "iterations.csv")
        versions: list[tuple[str, float]] = []
        points, mean_confidence = [], []
        for row in table.to_dict("records"):
            i = int(row["iteration"])
            pseudo = None
            if i > 0:
                _record_labels_after(records, cfg, layout, i)
                pseudo = read_json(layout.pseudo_dir(i) / METRICS)
            trained = _current(records, "train", i, layout.model_dir(i) / MODEL)
            if trained is None:
                trained = _record_training_after(records, cfg, layout, i)
            versions.append((trained.data.tags[VERSION_TAG], float(row["val_accuracy"])))
            mean_confidence.append(pseudo["mean_confidence"] if pseudo else None)
            points += [(k, v, i) for k, v in _step_metrics(row, pseudo).items()]
        _log_missing_metrics(records, points)
        client.set_tag(parent, "mlflow.note.content", pipeline.describe(cfg, table))
        summary = table.assign(
            pseudo_label_mean_confidence=mean_confidence,
            model_version=[v for v, _ in versions],
        )
        client.log_text(parent, summary.to_csv(index=False), "iterations.csv")
        client.log_text(parent, markdown_table(summary), "iterations.md")
        for name in REPORT_FILES:
            client.log_artifact(parent, str(layout.report / name), "report")
        promoted = versions[final_iteration(table)][0]
        update_aliases(client, records.registered_model, promoted, versions)
    except BaseException as err:
        client.set_terminated(parent, end_status(err))
        raise
    client.set_terminated(parent, "FINISHED")
    log.info(
        "MLflow: parent run %s in %s; models:/%s@champion",
        parent,
        tracking_uri(),
        records.registered_model,
    )
    return parent
