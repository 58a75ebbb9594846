"""Losses on probability targets: one-hot labels and soft pseudo-labels alike."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum(p * log_softmax(logits))``; equals cross-entropy
    when ``target_probs`` is one-hot."""
    return -(target_probs * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()
