"""Sharded pseudo-labeling as Prefect tasks, and the task runner that spreads them: the
flow's own threads, or a Ray cluster through prefect-ray (one task per shard, one GPU each
on CUDA). Which runner, how many shards and where Ray lives are run options, not
experiment parameters: they never change the config's fingerprint or a result."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from prefect import task
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from noisy_student import pipeline, records
from noisy_student.config import Config
from noisy_student.shards import Shard, stats_path
from noisy_student.storage import run_step
from tasks.cache import output_record
from tasks.steps import CACHED, Records, _tags

RUNNERS = ("local", "ray")
# What a Ray worker needs from the driver's environment to report to the same Prefect
# server, log to the same MLflow server and reach the same object store. Credentials are
# not passed: each machine brings its own (instance role, ~/.aws, environment).
FORWARDED_ENV = (
    "PREFECT_API_URL",
    "PREFECT_LOGGING_EXTRA_LOGGERS",
    "MLFLOW_TRACKING_URI",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)


def _ray_worker() -> dict[str, Any]:
    """Where this shard runs, recorded in its statistics; torch sized to the CPUs Ray
    gave the task (two torch processes of 2 threads each on 2 cores ran batched
    RandAugment 25x slower than one)."""
    import ray

    if not ray.is_initialized():
        return {}
    context = ray.get_runtime_context()
    cpus = context.get_assigned_resources().get("CPU")
    if cpus:
        torch.set_num_threads(max(1, int(cpus)))
    return {"ray_node_id": context.get_node_id(), "torch_threads": torch.get_num_threads()}


@task(name="label-shard", task_run_name="label-{iteration}-shard-{index}-of-{count}", **CACHED)
def label_shard(
    config: dict[str, Any],
    run_dir: str,
    iteration: int,
    index: int,
    count: int,
    upstream: Records | None = None,
) -> dict[str, Any]:
    """One shard of the pool; its part and statistics land under the run directory, and
    its record names those two files alone (the other shards write beside them)."""
    cfg, shard, worker = Config.model_validate(config), Shard(index, count), _ray_worker()
    part = run_step(
        run_dir,
        "shard",
        iteration,
        lambda layout: pipeline.label_shard(cfg, layout, iteration, shard, worker),
    )
    folder, name = part.rsplit("/", 1)
    return output_record(folder, only=(name, stats_path(Path(), shard).name))


@task(name="merge-shards", task_run_name="merge-{iteration}-of-{count}", **CACHED)
def merge_shards(
    config: dict[str, Any],
    run_dir: str,
    iteration: int,
    count: int,
    upstream: Records | None = None,
) -> dict[str, Any]:
    """The reduce: the manifest and metrics students read."""
    cfg = Config.model_validate(config)
    return output_record(
        run_step(run_dir, "merge", iteration, lambda layout: _merge(cfg, layout, iteration, count))
    )


def _merge(cfg: Config, layout, iteration: int, count: int):
    """The reduce, then its MLflow record (the shards' parts have none of their own)."""
    out = pipeline.merge_shards(cfg, layout, iteration, count)
    records.record_pseudo_labels(cfg, layout, iteration, "prefect", _tags())
    return out


def check_ray_address(address: str | None) -> None:
    """Fail at once, in one line, when nothing answers at an explicit ``host:port`` or
    ``ray://host:port`` (``auto`` and None are checked by connecting)."""
    if address in (None, "auto"):
        return
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    if parts.scheme not in ("ray", "ray+tls") or not parts.hostname or not parts.port:
        raise ValueError(f"ray_address {address!r}: expected auto, host:port or ray://host:port")
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=5).close()
    except OSError as err:
        raise ValueError(
            f"ray_address {address!r}: no Ray cluster answers there ({err.strerror or err})"
        ) from None


def connect_ray(address: str | None) -> None:
    """Join the Ray cluster at ``address`` (None: start one on this machine) for the whole
    flow run, with the environment its workers need; the runners of the labeling subflows
    reuse this connection."""
    import ray

    check_ray_address(address)
    env = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    try:
        ray.init(
            address=address,
            namespace="prefect",
            runtime_env={"env_vars": env},
            logging_level="WARNING",
            ignore_reinit_error=True,
        )
    except (ConnectionError, RuntimeError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"ray_address {address!r}: {message}") from None


def task_runner(kind: str, address: str | None) -> TaskRunner:
    """The runner of a labeling subflow: threads of this process, or the Ray cluster."""
    if kind not in RUNNERS:
        raise ValueError(f"task_runner {kind!r}: allowed: {', '.join(RUNNERS)}")
    if kind == "local":
        return ThreadPoolTaskRunner(max_workers=1)
    from prefect_ray import RayTaskRunner

    return RayTaskRunner(address=address)


def shard_options(cfg: Config, kind: str) -> dict[str, Any]:
    """Ray resources of one shard task: a GPU when the labeling runs on CUDA."""
    if kind != "ray":
        return {}
    import ray

    cuda = cfg.device == "cuda" or (
        cfg.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0
    )
    return {"num_cpus": 1, "num_gpus": 1} if cuda else {"num_cpus": 1}
