"""The Noisy Student loop as a Prefect flow: teacher, then label -> student per iteration."""

from __future__ import annotations

import hashlib
import os
from contextlib import nullcontext
from typing import Any

from prefect import flow
from prefect.futures import wait
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

from noisy_student import launch, storage
from noisy_student.config import Config, load_config
from noisy_student.preflight import preflight
from noisy_student.shards import Shard
from tasks import shards, steps
from tasks.results import CheckedResults


@flow(name="noisy-student", log_prints=True)
def noisy_student(
    params_file: str = "params.yaml",
    iterations: int | None = None,
    overrides: dict[str, Any] | None = None,
    runs_root: str = "runs",
    shard_count: int = 1,
    task_runner: str = "local",
    ray_address: str | None = None,
    nproc: str = "1",
) -> dict[str, Any]:
    """Run the loop with ``params_file``; ``iterations`` keeps the first N students and
    ``overrides`` sets dotted keys (``{"train.epochs": 2}``). Outputs go to
    ``runs_root/<config hash>``; a re-run reuses a finished step only while its files, code,
    data and inputs are unchanged (tasks/cache.py), and runs it again otherwise.
    Run options, which change no result: ``shard_count`` shards label the pool, on this
    process (``task_runner: local``) or on a Ray cluster (``ray``; ``ray_address``: auto,
    host:port, ray://host:10001, or None to start one here); ``nproc`` processes train each
    model on its worker (``auto``: one per GPU; torchrun, data-parallel)."""
    cfg = load_config(params_file, overrides, max_iterations=iterations)
    Shard(0, shard_count)  # a bad count fails here, before any work
    launch.check(cfg, launch.Launch(launch.resolve_nproc(nproc, cfg.device)))
    runner = shards.task_runner(task_runner, ray_address)
    runs_root = storage.check_root(runs_root)
    storage.check_tracking_server(os.environ.get("MLFLOW_TRACKING_URI"))
    preflight(cfg)  # what this machine or the data cannot give the run, before any task
    if task_runner == "ray":
        shards.connect_ray(ray_address)
    config = cfg.model_dump(mode="json")
    run_dir = storage.join(runs_root, cfg.fingerprint())
    results = task_results(runs_root)

    prepare, train, label = (
        step.with_options(**results) for step in (steps.prepare, steps.train, steps.pseudo_label)
    )
    splits = prepare(config, run_dir)
    models = [train(config, run_dir, 0, [splits], nproc)]  # the teacher, no noise
    for iteration in sorted(cfg.iterations):
        upstream = [splits, *models]
        if shard_count == 1 and task_runner == "local":
            pseudo = label(config, run_dir, iteration, upstream)
        else:
            pseudo = label_in_shards.with_options(task_runner=runner)(
                config, run_dir, iteration, shard_count, task_runner, runs_root, upstream
            )
        models.append(train(config, run_dir, iteration, [splits, pseudo, *models], nproc))
    return steps.report.with_options(**results)(config, run_dir)


def task_results(runs_root: str) -> dict[str, Any]:
    """Where the tasks keep their results, read back only as checked records (never
    unpickled): beside the runs on an object store, not on the disk of the machine that
    ran the task; Prefect's local storage folder otherwise. A block named after the place,
    so every machine's tasks find it."""
    if storage.is_remote(runs_root):
        basepath = storage.join(runs_root, ".prefect-results")
    else:
        basepath = str(PREFECT_LOCAL_STORAGE_PATH.value().expanduser().resolve())
    name = "results-" + hashlib.sha256(basepath.encode()).hexdigest()[:12]
    CheckedResults(basepath=basepath).save(name, overwrite=True)
    return {"result_storage": f"{CheckedResults.get_block_type_slug()}/{name}"}


@flow(name="pseudo-label-shards", flow_run_name="pseudo-label-{iteration}-{count}-shards")
def label_in_shards(
    config: dict[str, Any],
    run_dir: str,
    iteration: int,
    count: int,
    runner: str,
    runs_root: str,
    upstream: list[dict[str, Any]],
) -> dict[str, Any]:
    """Fan out one task per shard on this subflow's task runner, then reduce; ``upstream``
    (the records of the steps labeling reads) keys every shard's cache."""
    options = task_results(runs_root)
    ray_options = shards.shard_options(Config.model_validate(config), runner)
    if runner == "ray":
        from prefect_ray.context import remote_options

        resources = remote_options(**ray_options)
    else:
        resources = nullcontext()
    label = shards.label_shard.with_options(**options)
    with resources:
        futures = [
            label.submit(config, run_dir, iteration, i, count, upstream) for i in range(count)
        ]
    wait(futures)
    for future in futures:
        future.result()  # a shard that failed after its retries fails the subflow
    merge = shards.merge_shards.with_options(**options)
    return merge(config, run_dir, iteration, count, upstream)


if __name__ == "__main__":  # python -m flows.noisy_student
    noisy_student()
