"""The data-parallel pieces in one process: batch sharding, launch checks, and the DDP
path of the training loop in a process group of one, which must train bit for bit as the
plain loop does. Several processes: tests/e2e/test_ddp.py."""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from noisy_student import distributed, launch
from noisy_student.augment import build_augment
from noisy_student.config import Config
from noisy_student.distributed import DistributedError, check_launch, shard
from noisy_student.engine import TrainData, TrainingDiverged, TrainSettings, train_model
from noisy_student.launch import (
    Launch,
    check,
    resolve_nproc,
    torchrun_command,
    wait_for_endpoint,
)
from noisy_student.models import build_model
from noisy_student.pseudo_label import one_hot


def test_shards_cover_a_batch_and_keep_its_labeled_pseudo_mix() -> None:
    batch = torch.arange(12)  # rows 0-2 labeled, 3-11 pseudo-labeled (ratio 3)
    parts = [shard(batch, rank, 3) for rank in range(3)]
    assert sorted(torch.cat(parts).tolist()) == list(range(12))
    assert all(int((p < 3).sum()) == 1 for p in parts)
    assert torch.equal(shard(batch, 0, 1), batch)


def test_an_uneven_last_batch_is_padded_with_its_own_rows() -> None:
    parts = [shard(torch.tensor([7, 8, 9]), rank, 2) for rank in range(2)]
    assert [len(p) for p in parts] == [2, 2]
    assert sorted(torch.cat(parts).tolist()) == [7, 7, 8, 9]
    assert [len(shard(torch.tensor([5]), rank, 4)) for rank in range(4)] == [1, 1, 1, 1]


def test_every_rank_but_the_first_draws_from_a_seed_of_its_own() -> None:
    seeds = [distributed.rank_seed(7, rank) for rank in range(4)]
    assert len(set(seeds)) == 4 and seeds == [distributed.rank_seed(7, r) for r in range(4)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((2, 15, "cpu", 2, 0), "train.batch_size: 15 does not split evenly across 2"),
        ((4, 64, "cuda", 4, 2), "4 processes on this machine but 2 GPU(s)"),
        ((2, 64, "cpu", 2, 0, True), "train.sync_batchnorm: true needs CUDA"),
    ],
)
def test_launches_that_cannot_work_are_refused_in_one_line(args: tuple, message: str) -> None:
    with pytest.raises(
        DistributedError, match=message.replace("(", r"\(").replace(")", r"\)")
    ) as err:
        check_launch(*args)
    assert "\n" not in str(err.value)


def test_launches_that_can_work_pass() -> None:
    check_launch(2, 64, "cuda", 2, 2, True)
    check_launch(1, 15, "cpu", 1, 0, True)  # one process: nothing to split or synchronise


def test_nproc_is_a_count_or_auto() -> None:
    assert resolve_nproc("3", "cpu") == 3
    assert resolve_nproc("auto", "cpu") == 1
    for bad in ("0", "two", "-1"):
        with pytest.raises(DistributedError, match="--nproc: expected a positive number"):
            resolve_nproc(bad, "cpu")


def test_torchrun_runs_the_same_command_in_every_process() -> None:
    standalone = torchrun_command(Launch(2), ["train", "--iteration", "1"])
    assert standalone[1:5] == ["-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone"]
    assert standalone[-5:] == ["-m", "noisy_student.cli", "train", "--iteration", "1"]
    machines = torchrun_command(Launch(1, 2, "10.0.0.1:29400", "job"), ["train"])
    assert "--rdzv-endpoint=10.0.0.1:29400" in machines and "--nnodes=2" in machines


def test_an_endpoint_that_never_answers_is_an_error_not_a_hang(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wait_for_endpoint("127.0.0.1:1", 1)  # this machine hosts the store: nothing to wait for
    # another machine's endpoint where nothing listens, played on loopback (the tests send
    # nothing off this machine)
    monkeypatch.setattr(launch, "_is_this_machine", lambda host: False)
    start = time.monotonic()
    with pytest.raises(DistributedError, match=r"127\.0\.0\.1:1 did not answer within 1 s"):
        wait_for_endpoint("127.0.0.1:1", 1)
    assert time.monotonic() - start < 1 + 3


def test_more_processes_than_cpu_cores_are_refused_before_any_process_starts(
    tiny_config: Config,
) -> None:
    cores = len(os.sched_getaffinity(0))
    with pytest.raises(DistributedError) as err:
        check(tiny_config, Launch(99999))
    assert str(err.value) == (
        f"--nproc 99999: more processes than this machine's {cores} CPU core(s) (each "
        f"process trains on its own share); allowed on CPU: 1 to {cores}"
    )


def test_an_endpoint_that_accepts_and_never_answers_fails_within_the_timeout() -> None:
    """A listening socket that never accepts (the kernel completes the handshake): torch's
    store client would wait on it past any rendezvous timeout."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        endpoint = f"127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(DistributedError) as err:
            wait_for_endpoint(endpoint, 2)
        assert time.monotonic() - start < 2 + 3
    assert str(err.value) == (
        f"--rdzv-endpoint: {endpoint} accepts connections but did not answer as a c10d "
        "store within 2 s; give the address the first machine's c10d store listens on"
    )
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=5))
    wait_for_endpoint(f"127.0.0.1:{store.port}", 2)  # a c10d store answers at once


def test_launcher_variables_not_set_by_torchrun_are_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in {"WORLD_SIZE": "4", "RANK": "1", "MASTER_ADDR": "10.0.0.9"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert distributed.launched_world_size() == 1
    assert distributed.drop_stray_launch_variables() == ["RANK", "WORLD_SIZE", "MASTER_ADDR"]
    assert not {"RANK", "WORLD_SIZE", "MASTER_ADDR"} & set(os.environ)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")  # torchrun's own: kept
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.drop_stray_launch_variables() == []
    assert distributed.launched_world_size() == 2


def test_sync_batchnorm_layers_turn_back_into_the_model_they_were_built_as() -> None:
    model = build_model("small_resnet", num_classes=3, in_channels=1, small_input=True)
    model.train()(torch.rand(4, 1, 8, 8))  # running statistics away from their defaults
    before = {k: v.clone() for k, v in model.state_dict().items()}
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    distributed.unwrap_batchnorm(synced)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    after = synced.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _digits(n: int = 64) -> tuple[TrainData, tuple]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy((digits.images[:, None] * 16).clip(0, 255).astype(np.uint8))
    labels = torch.from_numpy(digits.target)
    data = TrainData(
        images,
        np.arange(n),
        one_hot(digits.target[:n], 10),
        torch.arange(n) >= n // 2,  # half "pseudo-labeled": the ratio plan runs
    )
    val = (images, np.arange(n, n + 40), labels[n : n + 40])
    return data, val


def _train(lr: float = 0.05) -> tuple[dict, list]:
    torch.manual_seed(3)
    data, val = _digits()
    model = build_model(
        "small_resnet",
        num_classes=10,
        in_channels=1,
        small_input=True,
        dropout=0.3,
        stochastic_depth=0.2,
    )
    settings = TrainSettings(2, 16, lr, 5e-4, unlabeled_ratio=1.0)
    augment = build_augment("strong", randaugment_ops=2, randaugment_magnitude=5)
    history = train_model(model, data, settings, augment, torch.device("cpu"), val)
    return model.state_dict(), history


def test_a_process_group_of_one_trains_bit_for_bit_as_the_plain_loop(tmp_path: Path) -> None:
    plain, plain_history = _train()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        assert distributed.active() == (0, 1)
        ddp, ddp_history = _train()
    finally:
        dist.destroy_process_group()
    assert plain.keys() == ddp.keys()
    assert all(torch.equal(plain[k], ddp[k]) for k in plain)
    drop = "epoch_seconds"
    assert [{k: v for k, v in h.items() if k != drop} for h in plain_history] == [
        {k: v for k, v in h.items() if k != drop} for h in ddp_history
    ]


def test_a_diverging_loss_stops_training_with_a_clear_error() -> None:
    with pytest.raises(TrainingDiverged, match=r"the train loss of epoch 1 is (nan|inf)"):
        _train(lr=1e30)
