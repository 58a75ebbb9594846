"""Losses on probability targets (one-hot labels and soft pseudo-labels alike) and
knowledge distillation from a teacher's logits."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# (student logits, targets, pseudo-label mask, teacher logits or None) -> scalar loss
Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum(p * log_softmax(logits))``; equals cross-entropy
    when ``target_probs`` is one-hot."""
    return -(target_probs * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``KL(softmax(teacher / T) || softmax(student / T)) * T**2``, averaged over the batch.

    The gradient of the KL term w.r.t. the student's logits shrinks as ``1 / T**2``;
    multiplying by ``T**2`` keeps its scale independent of ``T``, so changing the temperature
    does not silently change the effective learning rate or the weight against the hard-label
    loss. Both distributions go through ``log_softmax`` so large logits do not overflow. The
    teacher is a fixed target: no gradient flows into its logits.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor | None,
    temperature: float = 1.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """``alpha * CE(student, targets) + (1 - alpha) * kd_loss``: the labels anchor the
    student while the teacher's softened outputs carry how classes resemble each other.

    ``targets`` are class indices (long) or probabilities (float, one-hot or soft); for
    unlabeled data pass ``None`` and the loss is :func:`kd_loss` alone.
    """
    distill = kd_loss(student_logits, teacher_logits, temperature)
    if targets is None:
        return distill
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if targets.dtype == torch.long:
        hard = F.cross_entropy(student_logits.float(), targets)
    else:
        hard = soft_cross_entropy(student_logits, targets)
    return alpha * hard + (1 - alpha) * distill


def student_loss(mode: str, alpha: float = 0.5, temperature: float = 1.0) -> Loss:
    """The training loss of a student, as ``engine.train_model`` calls it with (logits,
    targets, pseudo-label mask, teacher logits or None).

    ``none``: cross-entropy with every row's target (one-hot or stored soft pseudo-label).
    ``offline``: ``alpha`` x cross-entropy on labeled rows + ``(1 - alpha)`` x KD on the
    pseudo-labeled rows, their stored distributions (made at ``temperature``) as targets.
    ``online``: ``alpha`` x cross-entropy on labeled rows + ``(1 - alpha)`` x KD against the
    teacher's logits for every row (the teacher scored the clean batch).
    """
    if mode == "none":
        return lambda logits, targets, pseudo, teacher_logits: soft_cross_entropy(logits, targets)
    if mode not in ("offline", "online"):
        raise ValueError(f"distillation mode {mode!r}; allowed: none, offline, online")

    def loss(
        logits: torch.Tensor,
        targets: torch.Tensor,
        pseudo: torch.Tensor,
        teacher_logits: torch.Tensor | None,
    ) -> torch.Tensor:
        if mode == "online":
            if teacher_logits is None:
                raise ValueError("online distillation needs the teacher's logits")
            distill = kd_loss(logits, teacher_logits, temperature)
        else:
            # log(p) * T reproduces the stored distribution p at temperature T.
            stored = targets[pseudo].clamp_min(1e-12).log() * temperature
            distill = kd_loss(logits[pseudo], stored, temperature) if pseudo.any() else None
        labeled = ~pseudo
        hard = soft_cross_entropy(logits[labeled], targets[labeled]) if labeled.any() else None
        if hard is None:
            return distill
        if distill is None:
            return hard
        return alpha * hard + (1 - alpha) * distill

    return loss
