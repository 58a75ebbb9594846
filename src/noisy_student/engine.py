"""Training and inference loops: one code path for CPU and CUDA (bf16 autocast there)."""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from noisy_student.augment import Augment
from noisy_student.losses import soft_cross_entropy

log = logging.getLogger(__name__)


def select_device(name: str = "auto") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: 'cuda' requested but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Same seed, same params, same data: same metrics on CPU."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def _autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def to_float(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images to float in [0, 1] on ``device``."""
    return batch.to(device, non_blocking=True).float().div_(255.0)


def batches(
    n: int, batch_size: int, generator: torch.Generator | None = None
) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    yield from order.split(batch_size)


@dataclass
class TrainSettings:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float


def train_model(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    settings: TrainSettings,
    augment: Augment,
    device: torch.device,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[dict[str, float]]:
    """Train on uint8 ``images`` with probability ``targets`` (one-hot or soft) using SGD
    with Nesterov momentum and a per-step cosine schedule; return per-epoch history."""
    model.to(device)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=settings.lr,
        momentum=0.9,
        nesterov=True,
        weight_decay=settings.weight_decay,
    )
    steps = settings.epochs * math.ceil(len(images) / settings.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps))
    )
    generator = torch.Generator().manual_seed(torch.initial_seed())
    history = []
    for epoch in range(1, settings.epochs + 1):
        model.train()
        start, total_loss, seen = time.perf_counter(), 0.0, 0
        for index in batches(len(images), settings.batch_size, generator):
            x = to_float(augment(images[index]), device)
            y = targets[index].to(device, non_blocking=True)
            with _autocast(device):
                loss = soft_cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(index)
            seen += len(index)
        record = {
            "epoch": epoch,
            "train_loss": total_loss / seen,
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_seconds": time.perf_counter() - start,
        }
        if val is not None:
            record["val_accuracy"] = accuracy(predict_proba(model, val[0], device), val[1])
        history.append(record)
        log.info(
            "epoch %d/%d  loss %.4f  val_acc %s",
            epoch,
            settings.epochs,
            record["train_loss"],
            f"{record.get('val_accuracy', float('nan')):.4f}",
        )
    return history


@torch.inference_mode()
def predict_logits_batches(
    model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 512
) -> Iterator[torch.Tensor]:
    """Stream logits batch by batch, the model in eval mode (no dropout, no drop-path)."""
    model.to(device).eval()
    for index in batches(len(images), batch_size):
        with _autocast(device):
            yield model(to_float(images[index], device)).float().cpu()


def predict_proba(
    model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 512
) -> torch.Tensor:
    parts = list(predict_logits_batches(model, images, device, batch_size))
    return torch.cat(parts).softmax(dim=-1)


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probs.argmax(dim=-1) == labels).float().mean())
