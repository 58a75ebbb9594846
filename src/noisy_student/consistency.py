"""A teacher that learns from the unlabeled pool while it trains: FixMatch (Sohn et al.,
2020), optionally with FlexMatch's class-adaptive thresholds (Zhang et al., 2021) and an
exponential moving average of the weights as the model kept.

Each step takes a labeled batch and ``unlabeled_ratio`` times as many pool images. The
model's prediction on a weak view of a pool image (crop/flip) becomes the hard target of a
strong view of the same image (RandAugment, then crop/flip) when it is confident enough;
the loss is cross-entropy on the labeled batch plus ``unlabeled_weight`` times the masked
cross-entropy on the strong views, averaged over every pool image of the batch.

Batches, autocast, the optimizer and its per-step cosine schedule, and the data-parallel
path are the engine's, so the consistency teacher trains the same way on CPU and CUDA, in
one process or many, as a supervised one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel

from noisy_student import distributed
from noisy_student.augment import Augment
from noisy_student.engine import (
    Images,
    TrainData,
    TrainSettings,
    _autocast,
    check_finite,
    gather,
    mean_loss,
    place,
    setup_training,
    val_accuracy,
)
from noisy_student.losses import soft_cross_entropy
from noisy_student.progress import track

log = logging.getLogger(__name__)

METHODS = ("supervised", "fixmatch")


@dataclass
class ConsistencySettings:
    """FixMatch's knobs: ``unlabeled_ratio`` pool images per labeled image in a step (mu),
    the confidence ``threshold`` (tau), the weight of the pool's loss (lambda_u),
    FlexMatch's class-adaptive thresholds, and the decay of the weights' moving average
    (0: the trained weights are the model)."""

    unlabeled_ratio: float = 7.0
    threshold: float = 0.95
    unlabeled_weight: float = 1.0
    adaptive_threshold: bool = False
    ema_decay: float = 0.0


class ClassThresholds:
    """FlexMatch's curriculum: each class's threshold follows how much of the pool the
    model already predicts confidently as that class. Every pool image remembers the class
    it was last predicted above the fixed threshold (or none); a class's learning status
    is its count of such images over the largest class count, or over the count of images
    not yet predicted while they are the majority (the warm-up: no class looks learned
    before the pool has been seen). The threshold of class c is
    ``threshold * status_c / (2 - status_c)``: low for classes the model is still learning,
    the fixed threshold for the best learned."""

    def __init__(self, pool_size: int, num_classes: int, threshold: float) -> None:
        self.threshold = threshold
        self.num_classes = num_classes
        self.last_class = torch.full((pool_size,), -1, dtype=torch.long)

    def status(self) -> torch.Tensor:
        """Learning status of each class, in [0, 1]."""
        predicted = self.last_class[self.last_class >= 0]
        counts = torch.bincount(predicted, minlength=self.num_classes).float()
        unused = float(len(self.last_class) - len(predicted))
        return counts / max(float(counts.max()), unused, 1.0)

    def thresholds(self) -> torch.Tensor:
        status = self.status()
        return self.threshold * status / (2.0 - status)

    def update(self, rows: torch.Tensor, confidence: torch.Tensor, predicted: torch.Tensor) -> None:
        """Remember the classes of the pool rows (positions in the pool) predicted above
        the fixed threshold in this step."""
        sure = (confidence >= self.threshold).cpu()
        self.last_class[rows[sure]] = predicted.cpu()[sure]


def ema_with_warmup(decay: float) -> Callable[[list, list, torch.Tensor], None]:
    """A moving average whose decay ramps up with the updates so far, ``min(decay,
    (1 + n) / (10 + n))`` (TensorFlow's ``num_updates``, timm's warm-up): with a fixed
    0.999 the 1,600 steps of a 200-epoch teacher would keep 0.999^1600 = 20% of its first,
    near-random weights (measured: Fashion-MNIST test accuracy 0.43 against 0.86)."""

    @torch.no_grad()
    def update(averaged: list, current: list, updates: torch.Tensor) -> None:
        n = int(updates)
        rate = min(decay, (1 + n) / (10 + n))
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1 - rate)
        else:  # counters (batch norm's num_batches_tracked): follow the model
            for kept, now in zip(averaged, current, strict=True):
                kept.copy_(now)

    return update


def pseudo_targets(
    weak_logits: torch.Tensor, thresholds: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hard targets from the weak view's logits: (class, confidence, mask). ``thresholds``
    is one number or one per class (the threshold of each row's predicted class applies)."""
    probs = weak_logits.float().softmax(dim=-1)
    confidence, predicted = probs.max(dim=-1)
    if isinstance(thresholds, torch.Tensor):
        thresholds = thresholds.to(confidence.device)[predicted]
    return predicted, confidence, confidence >= thresholds


def fixmatch_loss(
    labeled_logits: torch.Tensor,
    labeled_targets: torch.Tensor,
    strong_logits: torch.Tensor,
    pseudo: torch.Tensor,
    mask: torch.Tensor,
    unlabeled_weight: float,
) -> torch.Tensor:
    """Cross-entropy on the labeled rows plus ``unlabeled_weight`` x the masked
    cross-entropy of the strong views against their pseudo-labels, averaged over every
    pool row (masked rows count as zero, as in FixMatch)."""
    supervised = soft_cross_entropy(labeled_logits, labeled_targets)
    per_row = F.cross_entropy(strong_logits.float(), pseudo, reduction="none")
    return supervised + unlabeled_weight * (per_row * mask.float()).mean()


def _pool_order(pool_size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(pool_size, generator=generator)


def _gathered(
    rows: torch.Tensor, confidence: torch.Tensor, predicted: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank's (pool rows, confidence, predicted class) of this step, on every rank, so
    that each keeps the same class thresholds as one process that saw the global batch."""
    columns = (rows, confidence, predicted)
    mine = torch.stack([t.to(confidence.device, torch.float64) for t in columns])
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    rows, confidence, predicted = torch.cat(parts, dim=1)
    return rows.long().cpu(), confidence.float(), predicted.long()


def train_fixmatch(
    model: nn.Module,
    labeled: TrainData,
    pool: Images,
    pool_ids: np.ndarray,
    settings: TrainSettings,
    consistency: ConsistencySettings,
    weak: Augment,
    strong: Augment,
    device: torch.device,
    val: tuple[Images, np.ndarray, torch.Tensor] | None = None,
    pool_labels: torch.Tensor | None = None,
    param_groups: list[dict[str, Any]] | None = None,
    on_train_mode: Callable[[nn.Module], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train ``model`` on the labeled rows and the pool rows ``pool_ids`` of ``pool``;
    return the model to keep (the moving average when ``ema_decay`` > 0, else ``model``)
    and the per-epoch history. ``weak`` augments the labeled batch and the pool's weak
    views, ``strong`` the pool's strong views.

    An epoch is one pass over the labeled rows in batches of ``settings.batch_size``, as
    for a supervised teacher; the pool is drawn without replacement, reshuffled when used
    up. ``pool_labels`` (hidden labels, -1 where unknown) only score the pseudo-labels
    that passed the threshold. The history adds, per epoch, the share of pool rows above
    their threshold (``unlabeled_mask_rate``) and, with hidden labels, the accuracy of
    those rows' targets (``unlabeled_target_accuracy``). ``on_epoch`` gets each record as
    soon as it is complete, as in ``engine.train_model``.

    In a ``torch.distributed`` process group it trains as ``engine.train_model`` does:
    every rank draws the same global labeled and pool batches and steps on its rows of
    each, DDP averages the gradients, the adaptive thresholds see every rank's
    predictions, and the moving average (of weights that are equal on every rank) is the
    same everywhere; a group of one trains exactly as a lone process."""
    c = consistency
    place(model, device)
    ema = None
    if c.ema_decay > 0:  # a copy of the plain model, made before DDP wraps it
        ema = AveragedModel(model, multi_avg_fn=ema_with_warmup(c.ema_decay), use_buffers=True)
    kept = ema.module if ema is not None else model
    ranks, net, optimizer, schedule, plan, generator = setup_training(
        model, labeled, settings, device, param_groups
    )
    num_classes = labeled.targets.shape[1]
    adaptive = ClassThresholds(len(pool_ids), num_classes, c.threshold)
    n_unlabeled = max(1, round(settings.batch_size * c.unlabeled_ratio))
    order, cursor = _pool_order(len(pool_ids), generator), 0
    history = []
    for epoch, epoch_plan in enumerate(track(plan, "epochs", unit="epoch"), start=1):
        net.train()
        if on_train_mode is not None:
            on_train_mode(model)
        start = time.perf_counter()
        total_loss, masked, correct, scored = (torch.zeros((), device=device) for _ in range(4))
        seen, drawn = 0, 0
        for index in track(epoch_plan, f"epoch {epoch} batches", unit="batch"):
            if cursor + n_unlabeled > len(order):
                order, cursor = _pool_order(len(pool_ids), generator), 0
            rows = order[cursor : cursor + n_unlabeled]
            cursor += n_unlabeled
            if ranks is not None:  # this rank's rows of the global pool batch
                rows = distributed.shard(rows, *ranks)
            unlabeled = gather(pool, pool_ids[rows.numpy()]).to(device, non_blocking=True)
            images = labeled.batch(index).to(device, non_blocking=True)
            targets = labeled.targets[index].to(device, non_blocking=True)
            x_labeled, targets = weak(images, targets)
            no_targets = torch.empty(len(rows), 0, device=device)
            x_weak, _ = weak(unlabeled, no_targets)
            x_strong, _ = strong(unlabeled, no_targets)
            with torch.no_grad(), _autocast(device):
                weak_logits = model(x_weak)
            thresholds = adaptive.thresholds() if c.adaptive_threshold else c.threshold
            predicted, confidence, mask = pseudo_targets(weak_logits, thresholds)
            if c.adaptive_threshold:
                if ranks is None:
                    adaptive.update(rows, confidence, predicted)
                else:
                    adaptive.update(*_gathered(rows, confidence, predicted))
            with _autocast(device):
                logits = net(torch.cat([x_labeled, x_strong]))
            n = len(index)
            loss = fixmatch_loss(
                logits[:n], targets, logits[n:], predicted, mask, c.unlabeled_weight
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if ema is not None:
                ema.update_parameters(model)
            total_loss += loss.detach() * len(index)
            masked += mask.sum()
            if pool_labels is not None:
                hidden = pool_labels[rows].to(device, non_blocking=True)
                known = mask & (hidden >= 0)
                correct += (predicted[known] == hidden[known]).sum()
                scored += known.sum()
            seen += len(index)
            drawn += len(rows)
        train_loss = mean_loss(total_loss, seen, ranks is not None)
        check_finite(train_loss, epoch, settings.lr)
        if ranks is not None:
            masked, correct, scored, drawn = distributed.sum_over_ranks(
                masked, correct, scored, torch.tensor(drawn, device=device)
            )
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "lr": optimizer.param_groups[-1]["lr"],
            "unlabeled_mask_rate": masked.item() / max(1, int(drawn)),
            "epoch_seconds": time.perf_counter() - start,
        }
        if pool_labels is not None and scored.item() > 0:
            record["unlabeled_target_accuracy"] = correct.item() / scored.item()
        if val is not None and (epoch % settings.val_every == 0 or epoch == settings.epochs):
            record["val_accuracy"] = val_accuracy(kept, val, device, ranks)
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        log.info(
            "epoch %d/%d  loss %.4f  mask %.3f  val_acc %s",
            epoch,
            settings.epochs,
            record["train_loss"],
            record["unlabeled_mask_rate"],
            f"{record.get('val_accuracy', float('nan')):.4f}",
        )
    if ranks is not None:
        distributed.sync_buffers(model)
        distributed.unwrap_batchnorm(model)
        if ema is not None:
            distributed.sync_buffers(kept)
    return kept, history
