from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from noisy_student.losses import distillation_loss, kd_loss, soft_cross_entropy

STUDENT = torch.tensor([[1.0, -0.5, 0.3, 0.0], [0.2, 0.8, -1.0, 0.5]])
TEACHER = torch.tensor([[0.1, 0.9, -0.4, 0.6], [1.2, -0.3, 0.0, -0.7]])


def test_kd_loss_matches_the_kl_written_out() -> None:
    temperature = 2.0
    p_teacher = torch.softmax(TEACHER / temperature, dim=-1)
    p_student = torch.softmax(STUDENT / temperature, dim=-1)
    per_sample = (p_teacher * (torch.log(p_teacher) - torch.log(p_student))).sum(dim=-1)
    expected = per_sample.mean() * temperature**2
    torch.testing.assert_close(kd_loss(STUDENT, TEACHER, temperature), expected)


def test_kd_loss_is_zero_when_student_matches_teacher() -> None:
    assert kd_loss(TEACHER.clone(), TEACHER, 3.0).abs().item() < 1e-6
    assert kd_loss(STUDENT, TEACHER, 3.0).item() > 0


def test_kd_loss_is_stable_for_large_logits() -> None:
    big = torch.tensor([[1000.0, -1000.0, 0.0]])
    assert torch.isfinite(kd_loss(big, big.flip(-1), 1.0))


def _grad_norm(temperature: float, scale: float) -> float:
    student = STUDENT.clone().requires_grad_(True)
    (kd_loss(student, TEACHER, temperature) * scale).backward()
    return student.grad.norm().item()


def test_t_squared_keeps_the_gradient_scale_independent_of_t() -> None:
    # With T**2 the gradient stays of the same order as T grows ...
    scaled = _grad_norm(8.0, 1.0) / _grad_norm(2.0, 1.0)
    assert 0.5 < scaled < 2.0
    # ... while the plain KL's gradient shrinks as 1 / T**2: 16 times from T=2 to T=8.
    plain = _grad_norm(8.0, 1 / 8.0**2) / _grad_norm(2.0, 1 / 2.0**2)
    assert 1 / 32 < plain < 1 / 8


def test_kd_loss_sends_no_gradient_to_the_teacher() -> None:
    teacher = TEACHER.clone().requires_grad_(True)
    student = STUDENT.clone().requires_grad_(True)
    kd_loss(student, teacher, 2.0).backward()
    assert teacher.grad is None
    assert student.grad is not None


def test_distillation_loss_is_the_weighted_sum() -> None:
    labels = torch.tensor([2, 1])
    kd = kd_loss(STUDENT, TEACHER, 4.0)
    expected = 0.3 * F.cross_entropy(STUDENT, labels) + 0.7 * kd
    torch.testing.assert_close(distillation_loss(STUDENT, TEACHER, labels, 4.0, 0.3), expected)
    # Probability targets go through the soft cross-entropy instead.
    probs = torch.tensor([[0.1, 0.2, 0.6, 0.1], [0.0, 1.0, 0.0, 0.0]])
    expected = 0.3 * soft_cross_entropy(STUDENT, probs) + 0.7 * kd
    torch.testing.assert_close(distillation_loss(STUDENT, TEACHER, probs, 4.0, 0.3), expected)


def test_distillation_on_unlabeled_data_is_kd_alone() -> None:
    torch.testing.assert_close(
        distillation_loss(STUDENT, TEACHER, None, 4.0, 0.3), kd_loss(STUDENT, TEACHER, 4.0)
    )


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(STUDENT, TEACHER, 0.0)
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(STUDENT, TEACHER, torch.tensor([0, 1]), 1.0, 1.5)
