"""One Prefect task per pipeline step. Tasks exchange file paths, never tensors: each
returns a record of the files it wrote (folder and digests). A task is cached on what
decides its outputs (code, data, config, run directory, the records of the steps before
it), and a cached record is trusted only while its files are unchanged (tasks/cache.py),
so re-running a flow skips exactly the steps whose outputs are still good. Results are
written as checked JSON, never pickled (tasks/results.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from noisy_student import launch, pipeline, records
from noisy_student.config import Config
from noisy_student.report import markdown_table
from noisy_student.runs import RunLayout
from noisy_student.storage import run_step, staged, step_needs
from tasks.cache import StepCache, output_record
from tasks.results import RecordSerializer

Records = list[dict[str, Any]]  # what output_record returns, one per step
CACHED = dict(
    cache_policy=StepCache(),
    persist_result=True,
    result_serializer=RecordSerializer(),
    retries=1,
    retry_delay_seconds=5,
)


def _tags() -> dict[str, str]:
    """The flow run that opened a record (tags are set once, when the run is created)."""
    return {"prefect_flow_run_id": str(flow_run.id)}


@task(name="prepare", task_run_name="prepare", **CACHED)
def prepare(config: dict[str, Any], run_dir: str) -> dict[str, Any]:
    cfg = Config.model_validate(config)
    return output_record(
        run_step(run_dir, "prepare", None, lambda layout: pipeline.prepare(cfg, layout))
    )


@task(name="train", task_run_name="train-{iteration}", **CACHED)
def train(
    config: dict[str, Any],
    run_dir: str,
    iteration: int,
    upstream: Records | None = None,
    nproc: str = "1",
) -> dict[str, Any]:
    """``upstream``: the records of the steps it reads from, part of its cache key.
    ``nproc``: processes training the step on this worker (``auto``: one per GPU)."""
    cfg = Config.model_validate(config)
    processes = launch.resolve_nproc(nproc, cfg.device)

    def step(layout: RunLayout) -> Path:
        if processes == 1:
            return records.train_step(cfg, layout, iteration, "prefect", _tags())
        return launch.train_in_processes(cfg, layout, iteration, processes, "prefect", _tags())

    return output_record(run_step(run_dir, "train", iteration, step))


@task(name="pseudo-label", task_run_name="pseudo-label-{iteration}", **CACHED)
def pseudo_label(
    config: dict[str, Any], run_dir: str, iteration: int, upstream: Records | None = None
) -> dict[str, Any]:
    cfg = Config.model_validate(config)
    return output_record(
        run_step(
            run_dir,
            "label",
            iteration,
            lambda layout: records.label_step(cfg, layout, iteration, "prefect", _tags()),
        )
    )


@task(
    name="report",
    task_run_name="report",
    cache_policy=NO_CACHE,
    result_serializer=RecordSerializer(),
    retries=2,
    retry_delay_seconds=5,
)
def report(config: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """Summarize, close the run's MLflow records and publish the iteration table in
    Prefect. Never cached (it closes the records of this run); its result is plain data,
    missing values as None, so it is written as JSON."""
    cfg = Config.model_validate(config)
    with staged(run_dir, step_needs("report"), "report") as layout:
        table = pipeline.summarize(cfg, layout)
        run_id = records.record_run(cfg, layout, "prefect", _tags())
    create_markdown_artifact(
        markdown=f"## Noisy Student iterations\n\n{pipeline.describe(cfg, table)}\n\n"
        f"{markdown_table(table)}\nMLflow parent run: `{run_id}`",
        key="noisy-student-iterations",
        description="val/test accuracy by iteration",
    )
    rows = table.astype(object).where(table.notna(), None).to_dict("records")
    return {"mlflow_run_id": run_id, "run_dir": run_dir, "iterations": rows}
