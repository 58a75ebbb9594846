from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from noisy_student.augment import build_augment
from noisy_student.engine import (
    TrainData,
    TrainSettings,
    cpu_has_native_bf16,
    epoch_batches,
    gather,
    in_chunks,
    precision,
    predict_proba,
    train_model,
    uses_bf16,
)
from noisy_student.losses import kd_loss, soft_cross_entropy, student_loss

pytestmark = pytest.mark.float_path  # `make test` runs it on both CPU float paths


def data(n_labeled: int, n_pseudo: int) -> TrainData:
    n = n_labeled + n_pseudo
    return TrainData(
        torch.zeros(n, 1, 2, 2, dtype=torch.uint8),
        np.arange(n),
        torch.full((n, 3), 1 / 3),
        torch.arange(n) >= n_labeled,
    )


def test_gather_returns_the_rows_asked_for_in_order() -> None:
    images = torch.arange(6 * 4, dtype=torch.uint8).reshape(6, 1, 2, 2)
    ids = np.array([4, 0, 4, 2])
    assert torch.equal(gather(images, ids), images[[4, 0, 4, 2]])
    assert torch.equal(gather(images.numpy(), ids), images[[4, 0, 4, 2]])


def test_chunks_join_consecutive_batches_in_order_on_a_gpu_only() -> None:
    batches = [torch.arange(k * 3, k * 3 + 3).reshape(3, 1) for k in range(5)]  # 3 values each
    # The device decides; the joining itself runs on any tensors.
    chunks = list(in_chunks(iter(batches), torch.device("cuda"), values=7))
    assert [len(c) for c in chunks] == [9, 6]  # 3 batches reach 7 values; 2 are left over
    assert torch.equal(torch.cat(chunks).flatten(), torch.arange(15))
    assert list(in_chunks(iter([]), torch.device("cuda"))) == []
    passed = list(in_chunks(iter(batches), torch.device("cpu"), values=7))
    assert len(passed) == 5 and all(a is b for a, b in zip(passed, batches, strict=True))


def test_batches_without_ratio_are_a_permutation() -> None:
    rows = data(5, 12)
    plan = epoch_batches(rows, TrainSettings(1, 4, 0.1, 0.0), torch.Generator().manual_seed(0))
    assert [len(b) for b in plan] == [4, 4, 4, 4, 1]
    assert sorted(torch.cat(plan).tolist()) == list(range(17))


def test_ratio_batches_mix_labeled_and_pseudo_rows() -> None:
    rows = data(5, 30)
    settings = TrainSettings(1, 8, 0.1, 0.0, unlabeled_ratio=3.0)
    plan = epoch_batches(rows, settings, torch.Generator().manual_seed(0))
    pseudo_seen = torch.cat([b[rows.pseudo[b]] for b in plan])
    assert sorted(pseudo_seen.tolist()) == list(range(5, 35))  # each pseudo row once
    for batch in plan[:-1]:
        assert int((~rows.pseudo[batch]).sum()) == 2 and int(rows.pseudo[batch].sum()) == 6
    labeled_seen = torch.cat([b[~rows.pseudo[b]] for b in plan]).tolist()
    assert len(labeled_seen) == 2 * len(plan) and set(labeled_seen) == set(range(5))


LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [1.5, -0.5, 0.0], [0.0, 3.0, 1.0]])
TARGETS = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
PSEUDO = torch.tensor([False, False, True, True])
TEACHER = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0], [2.0, 1.0, 0.0], [0.0, 1.0, 0.5]])


def test_off_is_cross_entropy_on_every_target() -> None:
    loss = student_loss("none")(LOGITS, TARGETS, PSEUDO, None)
    torch.testing.assert_close(loss, soft_cross_entropy(LOGITS, TARGETS))


def test_offline_weights_hard_loss_and_kd_on_stored_distributions() -> None:
    t, alpha = 2.0, 0.3
    loss = student_loss("offline", alpha, t)(LOGITS, TARGETS, PSEUDO, None)
    hard = F.cross_entropy(LOGITS[:2], torch.tensor([0, 2]))
    p = TARGETS[2:]
    q = F.log_softmax(LOGITS[2:] / t, dim=-1)
    kd = (p * (p.log() - q)).sum(-1).mean() * t**2
    torch.testing.assert_close(loss, alpha * hard + (1 - alpha) * kd)


def test_online_distills_the_teacher_on_every_row() -> None:
    loss = student_loss("online", 0.5, 3.0)(LOGITS, TARGETS, PSEUDO, TEACHER)
    hard = F.cross_entropy(LOGITS[:2], torch.tensor([0, 2]))
    torch.testing.assert_close(loss, 0.5 * hard + 0.5 * kd_loss(LOGITS, TEACHER, 3.0))


def test_only_pseudo_rows_give_kd_alone() -> None:
    everything = torch.ones(4, dtype=torch.bool)
    loss = student_loss("online", 0.9, 1.0)(LOGITS, TARGETS, everything, TEACHER)
    torch.testing.assert_close(loss, kd_loss(LOGITS, TEACHER, 1.0))


def test_validation_is_scored_every_val_every_epochs_and_after_the_last(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rows = data(8, 0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    val = (rows.images, np.arange(4), torch.zeros(4, dtype=torch.long))
    settings = TrainSettings(5, 4, 0.1, 0.0, val_every=2)
    with caplog.at_level(logging.INFO, logger="noisy_student.engine"):
        history = train_model(
            model, rows, settings, build_augment("none"), torch.device("cpu"), val
        )
    scored = [h["epoch"] for h in history if "val_accuracy" in h]
    assert scored == [2, 4, 5]
    epoch_lines = [r.getMessage() for r in caplog.records if "loss" in r.getMessage()]
    assert [("not scored" in line) for line in epoch_lines] == [True, False, True, False, False]
    assert not any("nan" in line for line in epoch_lines)


def _forward_dtypes(name: str | None) -> set[torch.dtype]:
    """The dtypes a model's layer computed in while it trained and scored, under
    ``precision(name)`` (None: no block, the default)."""
    rows = data(8, 0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    seen: set[torch.dtype] = set()
    model[1].register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
    settings = TrainSettings(1, 4, 0.1, 0.0)
    cpu = torch.device("cpu")
    if name is None:
        train_model(model, rows, settings, build_augment("none"), cpu)
        predict_proba(model, rows.images, cpu)
    else:
        with precision(name):
            train_model(model, rows, settings, build_augment("none"), cpu)
            predict_proba(model, rows.images, cpu)
    return seen


def test_precision_sets_what_the_models_compute_in() -> None:
    assert _forward_dtypes("bf16") == {torch.bfloat16}
    assert _forward_dtypes("fp32") == {torch.float32}
    native = {torch.bfloat16 if cpu_has_native_bf16() else torch.float32}
    assert _forward_dtypes("auto") == native
    assert _forward_dtypes(None) == native  # the block restores the default


def test_auto_precision_is_bf16_on_cuda_and_fp32_forces_it_off() -> None:
    cuda = torch.device("cuda")
    assert uses_bf16(cuda)
    with precision("fp32"):
        assert not uses_bf16(cuda)
        with precision("bf16"):
            assert uses_bf16(torch.device("cpu"))
        assert not uses_bf16(torch.device("cpu"))


def test_the_environment_can_give_auto_the_other_kind_of_cpus_float_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``NOISY_STUDENT_CPU_BF16`` is how the suite runs Intel's fp32 path on an AMD CPU and
    AMD's bf16 path on an Intel one (``pytest --cpu-bf16 off|on``)."""
    cpu = torch.device("cpu")
    monkeypatch.setenv("NOISY_STUDENT_CPU_BF16", "1")
    assert uses_bf16(cpu) and _forward_dtypes("auto") == {torch.bfloat16}
    monkeypatch.setenv("NOISY_STUDENT_CPU_BF16", "0")
    assert not uses_bf16(cpu) and _forward_dtypes("auto") == {torch.float32}
    monkeypatch.setenv("NOISY_STUDENT_CPU_BF16", "yes")
    with pytest.raises(ValueError, match="NOISY_STUDENT_CPU_BF16 must be 0 or 1, not 'yes'"):
        uses_bf16(cpu)
