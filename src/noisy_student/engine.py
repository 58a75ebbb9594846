"""Training and inference loops: one code path for CPU and CUDA, with the models'
forwards in bf16 autocast where the hardware computes bf16 natively."""

from __future__ import annotations

import logging
import math
import mmap
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from noisy_student import distributed
from noisy_student.augment import Augment
from noisy_student.losses import Loss, student_loss
from noisy_student.progress import track

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


_PRECISION: ContextVar[str] = ContextVar("precision", default="auto")


@contextmanager
def precision(name: str) -> Iterator[None]:
    """Run the models' forwards in this block in ``name``: ``bf16`` (autocast: convolutions
    and matrix products in bfloat16, weights, losses and the optimizer in float32),
    ``fp32``, or ``auto``: bf16 where the hardware computes it natively (CUDA; x86 CPUs
    with AVX512-BF16 or AMX, where it trains 1.5x faster: BENCHMARKS.md section 9) and
    fp32 elsewhere, where emulated bf16 would be slower."""
    token = _PRECISION.set(name)
    try:
        yield
    finally:
        _PRECISION.reset(token)


CPU_BF16_ENV = "NOISY_STUDENT_CPU_BF16"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions oneDNN uses (Linux's flags for AVX512-BF16
    or AMX-BF16). ``NOISY_STUDENT_CPU_BF16=1`` or ``0`` overrides what the flags say, so a
    test run takes the other kind of CPU's float path under ``precision: auto``."""
    forced = os.environ.get(CPU_BF16_ENV, "")
    if forced not in ("", "0", "1"):
        raise ValueError(f"{CPU_BF16_ENV} must be 0 or 1, not {forced!r}")
    return forced == "1" if forced else _cpu_flags_have_bf16()


@cache
def _cpu_flags_have_bf16() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")),
        [],
    )
    return torch.backends.mkldnn.is_available() and bool({"avx512_bf16", "amx_bf16"} & set(flags))


def uses_bf16(device: torch.device) -> bool:
    """Whether forwards on ``device`` run in bf16 under the current :func:`precision`."""
    name = _PRECISION.get()
    if name == "auto":
        return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
    return name == "bf16"


def _autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device))


def place(model: nn.Module, device: torch.device) -> nn.Module:
    """Move ``model`` to ``device`` with its conv weights channels-last: convolutions then
    run in the layout oneDNN and cuDNN are fastest in (1.3x the training images/s of the
    default layout on 2 CPU cores, measured with ``benchmarks/throughput.py``)."""
    return model.to(device=device, memory_format=torch.channels_last)


def to_float(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images to float in [0, 1] on ``device``."""
    return batch.to(device, non_blocking=True).float().div_(255.0)


# uint8 N x C x H x W images: a tensor, or a (memory-mapped) numpy array.
Images = np.ndarray | torch.Tensor


def release_pages(images: Images) -> None:
    """Drop the pages of a memory-mapped image array from this process's resident memory
    (the kernel keeps them in its page cache and maps them back on the next touch), so
    streaming through a pool larger than memory keeps resident memory flat. A no-op for
    arrays in memory."""
    base = images
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "_mmap", None) or getattr(base, "base", None)
    if base is not None and hasattr(mmap, "MADV_DONTNEED"):
        base.madvise(mmap.MADV_DONTNEED)


def gather(images: Images, ids: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of ``images`` as a uint8 tensor (only those rows of a memory map).
    ``index_select``, not ``images[ids]``: on CPU, torch's advanced indexing copies rows
    15x slower (1 us per 28x28 image: longer than a linear model's inference). For images
    on a GPU, pass ``ids`` already there: copying them from pageable host memory makes
    the host wait for the GPU to finish its queue."""
    if isinstance(images, torch.Tensor):
        return images.index_select(0, torch.as_tensor(ids, device=images.device))
    return torch.from_numpy(np.ascontiguousarray(images[ids]))


@dataclass
class TrainData:
    """Training rows: ``ids`` index ``images``; probability ``targets`` (one-hot or soft)
    and the ``pseudo`` mask (pseudo-labeled rows) follow the same order."""

    images: Images
    ids: np.ndarray
    targets: torch.Tensor
    pseudo: torch.Tensor

    def __post_init__(self) -> None:
        if not len(self.ids) == len(self.targets) == len(self.pseudo):
            raise ValueError("ids, targets and pseudo must have the same length")

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, index: torch.Tensor) -> torch.Tensor:
        return gather(self.images, self.ids[index.numpy()])


@dataclass
class TrainSettings:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    unlabeled_ratio: float | None = None
    val_every: int = 1
    sync_batchnorm: bool = False


class TrainingDiverged(RuntimeError):
    """The training loss stopped being a finite number: nothing trained is worth keeping."""


def epoch_batches(
    data: TrainData, settings: TrainSettings, generator: torch.Generator
) -> list[torch.Tensor]:
    """Index batches for one epoch. Without ``unlabeled_ratio``: a shuffle of all rows.
    With it: every batch holds labeled and pseudo-labeled rows in that ratio (pseudo per
    labeled), an epoch is one pass over the pseudo-labeled rows, labeled rows cycle."""
    labeled = torch.nonzero(~data.pseudo).flatten()
    pseudo = torch.nonzero(data.pseudo).flatten()
    ratio = settings.unlabeled_ratio
    if ratio is None or len(labeled) == 0 or len(pseudo) == 0:
        return list(torch.randperm(len(data), generator=generator).split(settings.batch_size))
    n_labeled = max(1, round(settings.batch_size / (1 + ratio)))
    n_pseudo = max(1, settings.batch_size - n_labeled)
    steps = math.ceil(len(pseudo) / n_pseudo)
    pseudo_order = pseudo[torch.randperm(len(pseudo), generator=generator)]
    cycles = math.ceil(steps * n_labeled / len(labeled))
    labeled_order = torch.cat(
        [labeled[torch.randperm(len(labeled), generator=generator)] for _ in range(cycles)]
    )
    return [
        torch.cat(
            [
                labeled_order[i * n_labeled : (i + 1) * n_labeled],
                pseudo_order[i * n_pseudo : (i + 1) * n_pseudo],
            ]
        )
        for i in range(steps)
    ]


def setup_training(
    model: nn.Module,
    data: TrainData,
    settings: TrainSettings,
    device: torch.device,
    param_groups: list[dict[str, Any]] | None = None,
) -> tuple[
    tuple[int, int] | None,
    nn.Module,
    torch.optim.Optimizer,
    torch.optim.lr_scheduler.LRScheduler,
    list[list[torch.Tensor]],
    torch.Generator,
]:
    """What every training loop starts from: (ranks, the model to step, SGD with Nesterov
    momentum, its per-step cosine schedule, this rank's batch plan, the generator that drew
    it). In a process group the model is wrapped in DDP, every rank draws rank 0's plan and
    keeps its rows of each batch, and every rank but 0 reseeds its own augmentation and
    dropout stream; the generator goes on the same on every rank."""
    ranks = distributed.active()
    net = model if ranks is None else distributed.wrap(model, device, settings.sync_batchnorm)
    groups = param_groups or [{"params": list(model.parameters()), "lr": settings.lr}]
    optimizer = torch.optim.SGD(
        groups, lr=settings.lr, momentum=0.9, nesterov=True, weight_decay=settings.weight_decay
    )
    seed = torch.initial_seed() if ranks is None else distributed.agree(torch.initial_seed())
    generator = torch.Generator().manual_seed(seed)
    plan = [epoch_batches(data, settings, generator) for _ in range(settings.epochs)]
    if ranks is not None:
        plan = [[distributed.shard(b, *ranks) for b in epoch_plan] for epoch_plan in plan]
        if ranks[0] > 0:
            torch.manual_seed(distributed.rank_seed(seed, ranks[0]))
    steps = sum(map(len, plan))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps))
    )
    return ranks, net, optimizer, schedule, plan, generator


def train_model(
    model: nn.Module,
    data: TrainData,
    settings: TrainSettings,
    augment: Augment,
    device: torch.device,
    val: tuple[Images, np.ndarray, torch.Tensor] | None = None,
    loss_fn: Loss | None = None,
    param_groups: list[dict[str, Any]] | None = None,
    teacher: nn.Module | None = None,
    on_train_mode: Callable[[nn.Module], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> list[dict[str, float]]:
    """Train on ``data`` with SGD (Nesterov momentum) and a per-step cosine schedule;
    return the per-epoch history.

    Each batch goes to ``device`` as uint8 and is augmented there. ``loss_fn`` defaults
    to cross-entropy with every row's target. ``val`` is scored every
    ``settings.val_every`` epochs and after the last. ``teacher`` (online
    distillation) sees the clean batch in eval mode; its logits reach ``loss_fn``.
    ``param_groups`` sets per-group learning rates (transfer learning); ``on_train_mode``
    runs after ``model.train()`` (to keep a frozen backbone's batch norm in eval mode).
    ``on_epoch`` gets each epoch's history record as soon as it is complete (live tracking).

    In a ``torch.distributed`` process group every rank steps through the same plan, each
    on its rows of every global batch, and DDP averages the gradients; rank 0 draws
    augmentation and dropout from the process's own stream, every other rank from a seed
    of its own, so a group of one trains exactly as a lone process. A non-finite epoch
    loss raises :class:`TrainingDiverged` on every rank.
    """
    loss_fn = loss_fn or student_loss("none")
    place(model, device)
    if teacher is not None:
        place(teacher, device).eval()
    ranks, net, optimizer, schedule, plan, _ = setup_training(
        model, data, settings, device, param_groups
    )
    history = []
    for epoch, epoch_plan in enumerate(track(plan, "epochs", unit="epoch"), start=1):
        net.train()
        if on_train_mode is not None:
            on_train_mode(model)
        # Summed on the device: a .item() per step would wait for the GPU at every step.
        start, total_loss, seen = time.perf_counter(), torch.zeros((), device=device), 0
        for index in track(epoch_plan, f"epoch {epoch} batches", unit="batch"):
            images = data.batch(index).to(device, non_blocking=True)
            targets = data.targets[index].to(device, non_blocking=True)
            pseudo = data.pseudo[index].to(device, non_blocking=True)
            teacher_logits = None
            if teacher is not None:
                with torch.no_grad(), _autocast(device):
                    teacher_logits = teacher(to_float(images, device)).float()
            inputs, targets = augment(images, targets)
            with _autocast(device):
                logits = net(inputs)
            loss = loss_fn(logits.float(), targets, pseudo, teacher_logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.detach() * len(index)
            seen += len(index)
        train_loss = mean_loss(total_loss, seen, ranks is not None)
        check_finite(train_loss, epoch, settings.lr)
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "lr": optimizer.param_groups[-1]["lr"],
            "epoch_seconds": time.perf_counter() - start,
        }
        if val is not None and (epoch % settings.val_every == 0 or epoch == settings.epochs):
            record["val_accuracy"] = val_accuracy(model, val, device, ranks)
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        log.info(
            "epoch %d/%d  loss %.4f  val_acc %s",
            epoch,
            settings.epochs,
            record["train_loss"],
            f"{record['val_accuracy']:.4f}" if "val_accuracy" in record else "not scored",
        )
    if ranks is not None:
        distributed.sync_buffers(model)
        distributed.unwrap_batchnorm(model)
    return history


def check_finite(train_loss: float, epoch: int, lr: float) -> None:
    """Raise :class:`TrainingDiverged` for a loss that is no longer a finite number."""
    if not math.isfinite(train_loss):
        raise TrainingDiverged(
            f"training diverged: the train loss of epoch {epoch} is {train_loss} "
            f"(train.lr {lr}); stopped, nothing written"
        )


def mean_loss(total: torch.Tensor, seen: int, across_ranks: bool) -> float:
    """The epoch's mean training loss (over every rank's rows under DDP)."""
    if not across_ranks:
        return total.item() / max(1, seen)
    total, count = distributed.sum_over_ranks(total, torch.tensor(seen, device=total.device))
    return total.item() / max(1.0, count.item())


def val_accuracy(
    model: nn.Module,
    val: tuple[Images, np.ndarray, torch.Tensor],
    device: torch.device,
    ranks: tuple[int, int] | None,
) -> float:
    """Validation accuracy; under DDP each rank scores its share of the rows with rank 0's
    batch-norm statistics and the counts are summed, so every rank gets the same figure."""
    images, ids, labels = val
    if ranks is None:
        return accuracy(predict_proba(model, images, device, ids=ids), labels)
    distributed.sync_buffers(model)
    rank, world_size = ranks
    mine = slice(rank, None, world_size)
    probs = predict_proba(model, images, device, ids=ids[mine])
    correct = (probs.argmax(dim=-1) == labels[mine]).sum().to(device)
    scored = torch.tensor(len(probs), device=device)
    correct, count = distributed.sum_over_ranks(correct, scored)
    # In float32, as accuracy() computes it, so a group of one reports the very same figure.
    return float(correct.to(torch.float32).cpu() / count.to(torch.float32).cpu().clamp_min(1))


@torch.inference_mode()
def predict_logits_batches(
    model: nn.Module,
    images: Images,
    device: torch.device,
    batch_size: int = 512,
    ids: np.ndarray | None = None,
    hflip: bool = False,
) -> Iterator[torch.Tensor]:
    """Stream float32 logits for rows ``ids`` of ``images`` (all rows by default), batch by
    batch, on ``device``: the model in eval mode (no dropout, no drop-path); a
    memory-mapped pool is read one batch at a time and its pages released after each.
    With the images on the device nothing here waits for it, so a GPU runs ahead of the
    caller. ``hflip`` (test-time augmentation) averages the probabilities of each image
    and its mirror and yields their logarithm: logits of the averaged distribution."""
    place(model, device).eval()
    ids = np.arange(len(images)) if ids is None else np.asarray(ids)
    rows = torch.as_tensor(ids, device=images.device) if isinstance(images, torch.Tensor) else ids
    for start in range(0, len(ids), batch_size):
        batch = gather(images, rows[start : start + batch_size])
        release_pages(images)
        inputs = to_float(batch, device)
        with _autocast(device):
            logits = model(inputs).float()
            if hflip:
                views = torch.stack([logits, model(inputs.flip(-1)).float()])
                logits = views.log_softmax(dim=-1).logsumexp(dim=0) - math.log(2)
        yield logits


def in_chunks(
    batches: Iterable[torch.Tensor], device: torch.device, values: int = 1 << 24
) -> Iterator[torch.Tensor]:
    """On a GPU, consecutive batches joined into chunks of at least ``values`` elements
    (64 MiB of float32 by default; the last may be smaller), so that the work done on each
    (a softmax, a copy to the host) runs once per chunk, not once per batch: a GPU labeling
    half a million small images per second waits on the host's per-batch work
    (BENCHMARKS.md, section 2). On other devices batches pass one by one: there is no copy
    to save, and holding them there made peak memory vary by up to 280 MiB from run to
    run."""
    if device.type != "cuda":
        yield from batches
        return
    parts, held = [], 0
    for batch in batches:
        parts.append(batch)
        held += batch.numel()
        if held >= values:
            yield torch.cat(parts)
            parts, held = [], 0
    if parts:
        yield torch.cat(parts)


def predict_proba(
    model: nn.Module,
    images: Images,
    device: torch.device,
    batch_size: int = 512,
    ids: np.ndarray | None = None,
) -> torch.Tensor:
    """Class probabilities on the host, one row per image."""
    rows = len(images) if ids is None else len(ids)
    batches = track(
        predict_logits_batches(model, images, device, batch_size, ids),
        "scoring",
        total=math.ceil(rows / batch_size),
        unit="batch",
    )
    return torch.cat([chunk.cpu() for chunk in in_chunks(batches, device)]).softmax(dim=-1)


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probs.argmax(dim=-1) == labels).float().mean())
