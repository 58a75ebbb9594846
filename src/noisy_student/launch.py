"""Launch one training step as a data-parallel job: torchrun on this machine (``--nproc``),
torchrun across machines with a c10d rendezvous (``--nnodes`` + ``--rdzv-endpoint``), or
Ray Train's ``TorchTrainer`` on a Ray cluster (``--ray``). The number of processes is a run
option, not a parameter: it never changes the config's fingerprint. Every launcher runs the
same ``pipeline.train``; bad launches are refused here, before any process starts."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from noisy_student.config import Config
from noisy_student.distributed import DistributedError, check_launch, cpu_share
from noisy_student.runs import RunLayout
from noisy_student.signals import Stopped

log = logging.getLogger(__name__)

# torchrun gives its ranks 30 s to stop after it passes a signal on, then kills them.
RANKS_STOP_SECONDS = 60


class JobFailed(RuntimeError):
    """A launched training job that did not finish (its message is one line)."""


@dataclass(frozen=True)
class Launch:
    """How many processes train one step, and where they meet."""

    nproc: int
    nnodes: int = 1
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    rdzv_timeout: int = 300
    ray: str | None = None

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes


def resolve_nproc(value: str, device: str) -> int:
    """``auto``: one process per GPU on CUDA (one process without a GPU); else a count."""
    if value == "auto":
        cuda = device in ("auto", "cuda") and torch.cuda.is_available()
        return max(1, torch.cuda.device_count()) if cuda else 1
    if not value.isdigit() or int(value) < 1:
        raise DistributedError(f"--nproc: expected a positive number or 'auto', got {value!r}")
    return int(value)


def _device_type(cfg: Config) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def check(cfg: Config, launch: Launch) -> None:
    """Every check that can be made before starting processes."""
    if launch.nnodes > 1 and not launch.rdzv_endpoint:
        raise DistributedError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the c10d store)")
    if launch.ray is not None:  # Ray places the workers: its cluster counts the GPUs
        check_launch(launch.world_size, cfg.train.batch_size, "cpu", 1, 0)
        return
    device = _device_type(cfg)
    cores = len(os.sched_getaffinity(0))
    if device == "cpu" and launch.nproc > cores:
        raise DistributedError(
            f"--nproc {launch.nproc}: more processes than this machine's {cores} CPU core(s) "
            f"(each process trains on its own share); allowed on CPU: 1 to {cores}"
        )
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    check_launch(
        launch.world_size,
        cfg.train.batch_size,
        device,
        launch.nproc,
        gpus,
        cfg.train.sync_batchnorm,
    )
    if launch.rdzv_endpoint:
        wait_for_endpoint(launch.rdzv_endpoint, launch.rdzv_timeout)


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"--rdzv-endpoint: expected HOST:PORT, got {endpoint!r}")
    return host.strip("[]"), int(port)


def _is_this_machine(host: str) -> bool:
    """The endpoint names this machine, whose agent then hosts the c10d store."""
    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        pass
    names = {socket.gethostname(), socket.getfqdn(), "localhost"}
    if host in names:
        return True
    try:
        return host in {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        return False


def wait_for_endpoint(endpoint: str, timeout: float) -> None:
    """Wait up to ``timeout`` seconds for the rendezvous's c10d store to answer: the first
    machine may start a little later, but an address that never answers, or that accepts
    connections and never answers as a store (torch's store client would wait on it
    forever, whatever the rendezvous timeout), is an error now, not a hang. On the machine
    that hosts the store (nothing listens at the endpoint yet) there is nothing to wait for."""
    host, port = _split_endpoint(endpoint)
    here = _is_this_machine(host)
    deadline, reason = time.monotonic() + timeout, "no answer"
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, timeout)):
                break
        except OSError as err:
            if here:
                return  # this machine's agent will host the store
            reason = err.strerror or type(err).__name__
        if time.monotonic() >= deadline:
            raise DistributedError(
                f"--rdzv-endpoint: {endpoint} did not answer within {timeout:g} s ({reason}); "
                "start the first machine's job, or give the address its c10d store listens on"
            )
        time.sleep(0.5)
    if not _answers_as_store(host, port, max(1.0, deadline - time.monotonic())):
        raise DistributedError(
            f"--rdzv-endpoint: {endpoint} accepts connections but did not answer as a c10d "
            f"store within {timeout:g} s; give the address the first machine's c10d store "
            "listens on"
        )


def _answers_as_store(host: str, port: int, timeout: float) -> bool:
    """Whether a c10d store client gets an answer from ``host:port`` within ``timeout``
    seconds. The client runs on a daemon thread (it releases the GIL): its handshake
    ignores its own timeout, so one left waiting on a silent server is abandoned."""
    answered = threading.Event()

    def probe() -> None:
        try:
            store = dist.TCPStore(
                host,
                port,
                is_master=False,
                timeout=timedelta(seconds=timeout),
                wait_for_workers=False,
            )
            store.check(["noisy-student-probe"])
            answered.set()
        except (RuntimeError, ValueError):  # DistStoreError and the like: no store there
            pass

    thread = threading.Thread(target=probe, name="rdzv-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return answered.is_set()


def torchrun_command(launch: Launch, cli_args: list[str]) -> list[str]:
    """The torchrun command that runs ``noisy-student <cli_args>`` in every process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={launch.nproc}"]
    if launch.rdzv_endpoint is None:
        cmd.append("--standalone")
    else:
        cmd += [
            f"--nnodes={launch.nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={launch.rdzv_endpoint}",
            f"--rdzv-id={launch.rdzv_id or 'noisy-student'}",
            f"--rdzv-conf=join_timeout={launch.rdzv_timeout},read_timeout={launch.rdzv_timeout}",
        ]
    return [*cmd, "-m", "noisy_student.cli", *cli_args]


def run_torchrun(launch: Launch, cli_args: list[str]) -> int:
    """Run the step under torchrun; its exit status (non-zero when any rank failed).

    Stopped by a signal (``Stopped``), the launcher passes it on to torchrun, which passes
    it on to every rank (each closes its records), and waits for them before it exits:
    killing torchrun instead would leave its ranks training with no one to wait for them.
    """
    cmd = torchrun_command(launch, cli_args)
    log.info("launching %d process(es) per machine: %s", launch.nproc, " ".join(cmd))
    # torchrun would set 1 thread per process; each rank sizes its own (cpu_share).
    env = {"OMP_NUM_THREADS": str(cpu_share(launch.nproc)), **os.environ}
    with subprocess.Popen(cmd, env=env) as job:
        try:
            return job.wait()
        except Stopped as stopped:
            job.send_signal(stopped.signum)
            try:
                job.wait(timeout=RANKS_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                job.kill()
            raise


def train_in_processes(
    cfg: Config,
    layout: RunLayout,
    iteration: int,
    nproc: int,
    entry_point: str,
    extra_tags: dict[str, str] | None = None,
) -> Path:
    """The training step as a torchrun job of ``nproc`` processes on this machine, for a
    caller that holds a config rather than a params file (a Prefect task on a worker with
    several GPUs); rank 0 records it in MLflow as the CLI does, with ``extra_tags`` as
    ``records.train_step`` takes them. Returns the model folder."""
    plan = Launch(nproc)
    check(cfg, plan)
    with tempfile.TemporaryDirectory(prefix="noisy-student-launch-") as tmp:
        params = Path(tmp) / "params.yaml"
        params.write_text(yaml.safe_dump(cfg.model_dump(mode="json")), encoding="utf-8")
        cli_args = ["--params", str(params), "--run-dir", str(layout.root), "-q"]
        cli_args += ["--run-origin", layout.origin] if layout.origin else []
        cli_args += ["train", "--iteration", str(iteration), "--entry-point", entry_point]
        cli_args += [f"--tag={key}={value}" for key, value in (extra_tags or {}).items()]
        status = run_torchrun(plan, cli_args)
    if status:
        raise JobFailed(
            f"the {nproc}-process training job failed (exit {status}; the failed rank is "
            "named in its log); nothing was written"
        )
    return layout.model_dir(iteration)


def _ray_worker(config: dict) -> None:
    """One Ray Train worker: Ray has formed the process group; train as a rank of it."""
    from noisy_student import pipeline

    pipeline.train(Config.model_validate(config["cfg"]), RunLayout(config["run_dir"]), config["i"])


def run_ray(cfg: Config, launch: Launch, run_dir: Path, iteration: int) -> None:
    """Run the step as Ray Train's TorchTrainer with ``launch.nproc`` workers on the Ray
    cluster at ``launch.ray`` (``auto``: the running one). The run directory and data root
    must be on storage every node sees (a shared file system)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(address=launch.ray, log_to_driver=True)
    device = cfg.device
    if device == "auto":
        device = "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    absolute = cfg.model_copy(deep=True)
    absolute.data.root = str(Path(cfg.data.root).resolve())
    absolute.device = device
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={
            "cfg": absolute.model_dump(mode="json"),
            "run_dir": str(run_dir.resolve()),
            "i": iteration,
        },
        scaling_config=ScalingConfig(num_workers=launch.nproc, use_gpu=device == "cuda"),
        run_config=RunConfig(name=f"noisy-student-train-{iteration}-{uuid.uuid4().hex[:8]}"),
    )
    try:
        trainer.fit()
    except ray.exceptions.RayError as err:  # TrainingFailedError and the like
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise JobFailed(f"the Ray Train job failed: {first}; nothing was written") from err
