"""Data-parallel training in real processes on CPU (gloo): torchrun on one machine, two
torchrun agents meeting at a c10d rendezvous on loopback (two machines in one), Ray Train
on a loopback Ray cluster, a rank killed mid-training, and launches refused before any
work. Each trains the digits teacher and compares it with the first torchrun run."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml

from noisy_student import pipeline
from noisy_student.config import load_config
from noisy_student.data import fetch
from noisy_student.runs import METRICS, MODEL, RunLayout
from tests.e2e.conftest import base_env, free_port

pytestmark = pytest.mark.e2e

OVERRIDES = {
    "device": "cpu",
    "train.batch_size": 16,
    "train.epochs": 1,
    "teacher.epochs": 4,
    "data.labeled_per_class": 10,
    "data.val_per_class": 10,
    "data.test_per_class": 20,
    "pseudo_label.threshold": 0.2,
    "student.distillation": "online",  # the teacher runs in every rank's step
    "student.unlabeled_ratio": 3.0,
}
CLI = [sys.executable, "-m", "noisy_student.cli"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
TIMEOUT = 600


def _write_params(path: Path, data_root: Path, **extra: object) -> Path:
    cfg = load_config(None, {**OVERRIDES, "data.root": str(data_root), **extra})
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits, params and prepared splits, shared by every test here."""
    root = tmp_path_factory.mktemp("ddp")
    fetch("digits", root / "data")
    params = _write_params(root / "params.yaml", root / "data")
    pipeline.prepare(load_config(params), RunLayout(root / "prepared"))
    return root


def _run_dir(work: Path, name: str) -> Path:
    run_dir = work / name
    shutil.copytree(work / "prepared", run_dir)
    return run_dir


def _cli(work: Path, run_dir: Path, *args: str, params: str = "params.yaml") -> list[str]:
    return [*CLI, "--params", str(work / params), "--run-dir", str(run_dir), *args]


def _env(**extra: str) -> dict[str, str]:
    """MLflow records off unless a test asks for them (and names its store)."""
    return base_env(**{"NOISY_STUDENT_MLFLOW": "off", **extra})


def _run(cmd: list[str], timeout: float = TIMEOUT, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, env=_env(**env), capture_output=True, text=True, timeout=timeout, check=False
    )


def _weights(run_dir: Path, iteration: int = 0) -> dict[str, torch.Tensor]:
    path = RunLayout(run_dir).model_dir(iteration) / MODEL
    return torch.load(path, weights_only=True)["state_dict"]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _written(run_dir: Path) -> list[str]:
    return sorted(
        str(p.relative_to(run_dir)) for p in (run_dir / "models").rglob("*") if p.is_file()
    )


@pytest.fixture(scope="module")
def torchrun_teacher(work: Path) -> Path:
    """The teacher trained by the documented command: torchrun, two processes, gloo."""
    run_dir = _run_dir(work, "torchrun")
    store = f"sqlite:///{work / 'torchrun-mlflow.db'}"
    train = _cli(work, run_dir, "train", "--iteration", "0")[1:]
    result = _run([*TORCHRUN, *train], NOISY_STUDENT_MLFLOW="on", MLFLOW_TRACKING_URI=store)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_rank_0_alone_records_the_step(work: Path, torchrun_teacher: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'torchrun-mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    steps = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(steps) == 1 and steps[0].info.status == "FINISHED"
    assert len(client.search_model_versions()) == 1


def test_the_prefect_train_task_launches_torchrun(
    work: Path, torchrun_teacher: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flow's ``nproc`` run option: the task's body trains as the documented torchrun
    command does, and rank 0 records the step with the task's entry point and flow run."""
    from mlflow import MlflowClient

    from tasks.steps import train

    run_dir, store = _run_dir(work, "task"), f"sqlite:///{work / 'task-mlflow.db'}"
    monkeypatch.setenv("NOISY_STUDENT_MLFLOW", "on")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    flow_run_id = "5f0c9a52-2f42-4d5e-9b1a-7d8c1e4b0a11"
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", flow_run_id)  # prefect.runtime's fallback
    config = load_config(work / "params.yaml").model_dump(mode="json")
    record = train.fn(config, str(run_dir), 0, None, nproc="2")
    assert Path(record["path"]) == RunLayout(run_dir).model_dir(0).resolve()
    assert _same(_weights(torchrun_teacher), _weights(run_dir))
    client = MlflowClient(store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    [step] = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert step.data.tags["entry_point"] == "prefect"
    assert step.data.tags["prefect_flow_run_id"] == flow_run_id


# Run under torchrun in place of the CLI: trains as the CLI does, then each rank saves the
# model it ended with (and a FixMatch teacher's class thresholds and history), which rank 0
# alone would otherwise write.
EACH_RANK = """\
import os, sys, torch
from noisy_student import cli, consistency, pipeline
thresholds = []
class Recorded(consistency.ClassThresholds):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        thresholds.append(self)
consistency.ClassThresholds = Recorded
def save(model, history):
    state = {"model": model.state_dict(), "history": history,
             "last_class": [t.last_class for t in thresholds]}
    torch.save(state, f"{sys.argv[1]}/rank{os.environ['RANK']}.pt")
train_model, train_fixmatch = pipeline.train_model, pipeline.train_fixmatch
def keep(model, *args, **kwargs):
    history = train_model(model, *args, **kwargs)
    save(model, history)
    return history
def keep_fixmatch(model, *args, **kwargs):
    kept, history = train_fixmatch(model, *args, **kwargs)
    save(kept, history)
    return kept, history
pipeline.train_model, pipeline.train_fixmatch = keep, keep_fixmatch
sys.exit(cli.main(sys.argv[2:]))
"""


def _each_rank(work: Path, run_dir: Path, name: str, params: str = "params.yaml") -> list[dict]:
    """Train the teacher under torchrun, two processes; what each rank ended with."""
    script, out = work / "each_rank.py", work / name
    script.write_text(EACH_RANK)
    out.mkdir()
    args = _cli(work, run_dir, "train", "--iteration", "0", params=params)[3:]
    result = _run([*TORCHRUN, str(script), str(out), *args])
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]


def test_ranks_end_equal_and_a_second_run_repeats_the_first(work: Path, torchrun_teacher: Path):
    # rank 0 alone writes: one checkpoint, one history, one set of metrics
    assert _written(torchrun_teacher) == [
        "models/iter_0/history.csv",
        "models/iter_0/metrics.json",
        "models/iter_0/model.pt",
        "models/iter_0/per_class_accuracy.csv",
    ]
    run_dir = _run_dir(work, "each-rank")
    rank0, rank1 = _each_rank(work, run_dir, "each-rank-models")
    assert _same(rank0["model"], rank1["model"])
    assert _same(_weights(torchrun_teacher), _weights(run_dir))


def test_a_fixmatch_teacher_trains_data_parallel_with_one_state_on_every_rank(work: Path):
    """Both ranks end with the same moving average, the same class thresholds (every rank's
    weak-view predictions reach all of them) and the same history; rank 0 saves it."""
    fixmatch = {
        "teacher.method": "fixmatch",
        "teacher.augment": "weak",
        "teacher.unlabeled_ratio": 1.0,
        "teacher.threshold": 0.5,
        "teacher.adaptive_threshold": True,
        "teacher.ema_decay": 0.9,
    }
    _write_params(work / "fixmatch.yaml", work / "data", **fixmatch)
    run_dir = _run_dir(work, "fixmatch")
    rank0, rank1 = _each_rank(work, run_dir, "fixmatch-models", params="fixmatch.yaml")
    assert _same(rank0["model"], rank1["model"])
    assert _same(rank0["model"], _weights(run_dir))
    [last_class0], [last_class1] = rank0["last_class"], rank1["last_class"]
    assert torch.equal(last_class0, last_class1) and (last_class0 >= 0).any()
    timeless = [
        [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in rank["history"]]
        for rank in (rank0, rank1)
    ]
    assert timeless[0] == timeless[1]
    assert all(0 < h["unlabeled_mask_rate"] <= 1 for h in timeless[0])


def test_accuracy_is_within_the_seed_spread_of_one_process(work: Path, torchrun_teacher: Path):
    accuracies = []
    for seed in (0, 1, 2):
        run_dir = _run_dir(work, f"one-process-{seed}")
        cfg = load_config(work / "params.yaml", {"seed": seed})
        pipeline.train(cfg, RunLayout(run_dir), 0)
        accuracies.append(_metric(run_dir, "test_accuracy"))
    ddp = _metric(torchrun_teacher, "test_accuracy")
    spread = max(3 * float(np.std(accuracies)), 0.05)
    assert abs(ddp - float(np.mean(accuracies))) <= spread, (ddp, accuracies)


def _metric(run_dir: Path, key: str) -> float:
    import json

    return json.loads((RunLayout(run_dir).model_dir(0) / METRICS).read_text())[key]


def test_a_student_with_online_distillation_trains_under_ddp(work: Path, torchrun_teacher):
    run_dir = work / "student"
    shutil.copytree(torchrun_teacher, run_dir)
    labeled = _run(_cli(work, run_dir, "pseudo-label", "--iteration", "1"))
    assert labeled.returncode == 0, labeled.stderr[-3000:]
    result = _run(_cli(work, run_dir, "train", "--iteration", "1", "--nproc", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert 0 < _metric_of(run_dir, 1, "val_accuracy") <= 1


def _metric_of(run_dir: Path, iteration: int, key: str) -> float:
    import json

    return json.loads((RunLayout(run_dir).model_dir(iteration) / METRICS).read_text())[key]


def test_two_machines_meet_at_a_c10d_rendezvous(work: Path, torchrun_teacher: Path) -> None:
    run_dir = _run_dir(work, "c10d")
    endpoint = f"127.0.0.1:{free_port()}"
    launch = ["--nproc", "1", "--nnodes", "2", "--rdzv-endpoint", endpoint, "--rdzv-id", "t"]
    cmd = _cli(work, run_dir, "train", "--iteration", "0", *launch)
    logs = [work / f"c10d-agent-{i}.log" for i in range(2)]
    agents = [
        subprocess.Popen(  # one core each: two one-core machines in one
            cmd,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=log.open("w"),
            preexec_fn=lambda core=i: os.sched_setaffinity(0, {core % os.cpu_count()}),
        )
        for i, log in enumerate(logs)
    ]
    for agent, log in zip(agents, logs, strict=True):
        agent.wait(timeout=TIMEOUT)
        assert agent.returncode == 0, log.read_text()[-3000:]
    assert _same(_weights(torchrun_teacher), _weights(run_dir))


def test_ray_train_runs_the_same_loop(work: Path, torchrun_teacher: Path, ray_cluster) -> None:
    """A head with no CPUs and two one-CPU worker nodes on loopback (tests/e2e/scale.py)."""
    from mlflow import MlflowClient

    run_dir, store = _run_dir(work, "ray"), f"sqlite:///{work / 'ray-mlflow.db'}"
    address = ray_cluster.address
    cmd = _cli(work, run_dir, "train", "--iteration", "0", "--ray", address, "--nproc", "2")
    # Ray Train keeps its run state under ~/ray_results
    result = _run(cmd, HOME=str(work), NOISY_STUDENT_MLFLOW="on", MLFLOW_TRACKING_URI=store)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _written(run_dir) == _written(torchrun_teacher)
    assert _same(_weights(torchrun_teacher), _weights(run_dir))
    # The driver records the job from its files: one step run, its epochs, one version.
    client = MlflowClient(store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    [step] = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert step.info.status == "FINISHED"
    assert "epoch/train_loss" in step.data.metrics
    assert len(client.search_model_versions()) == 1


def test_a_killed_rank_fails_the_step_and_the_rerun_completes(work: Path) -> None:
    run_dir = _run_dir(work, "killed")
    _write_params(work / "long.yaml", work / "data", **{"teacher.epochs": 20})
    cmd = _cli(work, run_dir, "train", "--iteration", "0", "--nproc", "2", params="long.yaml")
    job = subprocess.Popen(cmd, env=_env(), stderr=subprocess.PIPE, text=True)
    for line in job.stderr:  # rank 0 logs each epoch; rank 1 is then mid-training
        if "epoch 1/20" in line:
            break
    victim = _rank_process(job.pid, rank=1)
    victim.kill()
    rest = job.stderr.read()
    job.wait(timeout=TIMEOUT)
    assert job.returncode != 0
    assert "the 2-process job failed" in rest and "nothing was written" in rest
    assert "Signal 9 (SIGKILL)" in rest  # torchrun names the rank and how it died
    assert not (RunLayout(run_dir).model_dir(0) / MODEL).exists()
    result = _run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (RunLayout(run_dir).model_dir(0) / MODEL).exists()


def _rank_process(launcher: int, rank: int, timeout: float = 60) -> psutil.Process:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(launcher).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and "noisy_student.cli" in " ".join(
                    child.cmdline()
                ):
                    return child
            except psutil.Error:
                continue
        time.sleep(0.2)
    raise AssertionError(f"no process of rank {rank} under {launcher}")


@pytest.mark.parametrize(
    ("batch_size", "launch", "message"),
    [
        (15, ["--nproc", "2"], "train.batch_size: 15 does not split evenly across 2 processes"),
        (16, ["--nproc", "none"], "--nproc: expected a positive number or 'auto', got 'none'"),
    ],
)
def test_bad_launches_fail_in_one_line_before_training(
    work: Path, batch_size: int, launch: list[str], message: str
) -> None:
    name = f"bad-{launch[0].strip('-')}-{launch[1]}"
    run_dir = _run_dir(work, name)
    params = _write_params(work / f"{name}.yaml", work / "data", **{"train.batch_size": batch_size})
    start = time.monotonic()
    result = _run(_cli(work, run_dir, "train", "--iteration", "0", *launch, params=params.name))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"noisy-student: train: {message}"), lines
    assert time.monotonic() - start < 60
    assert not (run_dir / "models").exists()


def test_an_endpoint_that_accepts_and_never_answers_fails_the_command_in_its_timeout(
    work: Path,
) -> None:
    """A listening socket that never answers (the kernel accepts for it): without the
    launch check, torchrun's store client would wait on it for ever."""
    run_dir = _run_dir(work, "silent-endpoint")
    with socket.create_server(("127.0.0.1", 0)) as silent:
        endpoint = f"127.0.0.1:{silent.getsockname()[1]}"
        launch = ["--nnodes", "2", "--rdzv-endpoint", endpoint, "--rdzv-timeout", "2"]
        start = time.monotonic()
        result = _run(_cli(work, run_dir, "train", "--iteration", "0", *launch), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"noisy-student: train: --rdzv-endpoint: {endpoint} accepts connections but did not "
        "answer as a c10d store within 2 s; give the address the first machine's c10d store "
        "listens on"
    ]
    assert time.monotonic() - start < 60  # the interpreter's start, then 2 s
    assert not (run_dir / "models").exists()


def test_a_plain_train_ignores_launcher_variables_left_in_the_environment(work: Path) -> None:
    """WORLD_SIZE=2 from a shell made the one process wait for a rank that never came."""
    run_dir = _run_dir(work, "stray-env")
    params = _write_params(work / "stray-env.yaml", work / "data", **{"teacher.epochs": 1})
    stray = {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1"}
    stray["MASTER_PORT"] = str(free_port())
    train = _cli(work, run_dir, "train", "--iteration", "0", params=params.name)
    result = _run(train, timeout=180, **stray)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ignoring RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT: not set by torchrun" in (
        result.stderr
    )
    assert (RunLayout(run_dir).model_dir(0) / MODEL).is_file()


def test_a_diverged_run_exits_non_zero_and_registers_nothing(work: Path) -> None:
    run_dir = work / "diverged"
    _write_params(work / "diverge.yaml", work / "data", **{"train.lr": 1e30})
    store = work / "diverged-mlflow" / "mlflow.db"
    store.parent.mkdir()
    cmd = [*CLI, "--params", str(work / "diverge.yaml"), "--run-dir", str(run_dir), "run"]
    result = _run(cmd, NOISY_STUDENT_MLFLOW="on", MLFLOW_TRACKING_URI=f"sqlite:///{store}")
    assert result.returncode == 1
    assert "noisy-student: run: training diverged: the train loss of epoch 1 is" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (RunLayout(run_dir).model_dir(0) / MODEL).exists()
    if store.exists():  # whatever was recorded, no model was registered or promoted
        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{store}")
        assert client.search_model_versions() == []
