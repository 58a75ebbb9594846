"""The steps of Noisy Student self-training, each reading and writing files under a run
directory, so any step can run in its own process (a DVC stage, a Prefect task, another
machine). Every step seeds itself: the same params and data give the same files."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from torch import nn

from noisy_student import distributed
from noisy_student.augment import build_augment
from noisy_student.config import Config
from noisy_student.consistency import ConsistencySettings, train_fixmatch
from noisy_student.data import ImageSet, load_images, make_splits
from noisy_student.engine import (
    Images,
    TrainData,
    TrainSettings,
    accuracy,
    precision,
    predict_proba,
    seed_everything,
    select_device,
    train_model,
    uses_bf16,
)
from noisy_student.io import read_json, save_torch, write_csv, write_json, write_parquet
from noisy_student.losses import student_loss
from noisy_student.models import (
    CheckpointError,
    build_model,
    load_checkpoint,
    load_weights,
    num_parameters,
    save_checkpoint,
)
from noisy_student.pseudo_label import one_hot, pseudo_label, targets_from_manifest
from noisy_student.report import (
    write_accuracy_by_iteration_png,
    write_per_class_accuracy_png,
    write_report,
)
from noisy_student.runs import (
    HISTORY,
    METRICS,
    MODEL,
    PER_CLASS,
    PSEUDO_LABELS,
    SPLITS,
    RunLayout,
    check_iteration,
    final_iteration,
    model_name,
    promotion,
    teacher_of,
)
from noisy_student.shards import (
    SHARDS,
    Shard,
    ShardError,
    empty_manifest,
    file_md5,
    read_rows,
    read_shards,
    reduce_shards,
    shard_counts,
    shard_key,
    shard_stats,
    top_per_class,
    write_shard,
)
from noisy_student.transfer import apply_freeze, load_pretrained, optimizer_param_groups

log = logging.getLogger(__name__)


def split(cfg: Config, data: ImageSet) -> dict[str, pd.DataFrame]:
    """The labeled / unlabeled / val / test manifests ``cfg`` asks of ``data``."""
    return make_splits(
        data.labels,
        cfg.data.labeled_limit,
        cfg.data.val_per_class,
        cfg.data.test_per_class,
        cfg.seed,
        partition=data.partition,
        hidden_labels=data.hidden_labels,
        class_names=data.classes,
    )


def prepare(cfg: Config, layout: RunLayout) -> Path:
    """Split the dataset into labeled / unlabeled / val / test manifests."""
    data = load_images(cfg.data.source, cfg.data.root)
    frames = split(cfg, data)
    for name, frame in frames.items():
        write_parquet(layout.splits / f"{name}.parquet", frame)
    counts = {name: len(frame) for name, frame in frames.items()}
    moved = _labeled_moved_to_pool(data, frames["unlabeled"])
    write_json(
        layout.splits / METRICS,
        {
            "classes": data.classes,
            "skipped_files": len(data.skipped),
            "labeled_moved_to_pool": sum(moved.values()),
            **counts,
        },
    )
    if moved and cfg.data.source == "imagefolder":
        log.warning(
            "data.cap_labeled: kept %d labeled images per class; moved to the unlabeled pool "
            "(their labels only score pseudo-labels): %s",
            cfg.data.labeled_per_class,
            ", ".join(f"{name} {count}" for name, count in moved.items()),
        )
    if data.skipped:
        log.warning(
            "%d unreadable files were skipped; see the source's skipped.json", len(data.skipped)
        )
    log.info("prepared splits %s", counts)
    return layout.splits


def _labeled_moved_to_pool(data: ImageSet, pool: pd.DataFrame) -> dict[str, int]:
    """Per class name, the labeled ("train") images the split put in the unlabeled pool."""
    ids = pool["image_id"].to_numpy()
    moved = data.labels[ids][data.partition[ids] == "train"]
    counts = np.bincount(moved, minlength=len(data.classes))
    return {name: int(n) for name, n in zip(data.classes, counts, strict=True) if n}


def _split(layout: RunLayout, name: str) -> pd.DataFrame:
    return pd.read_parquet(layout.splits / f"{name}.parquet")


def _require_splits(layout: RunLayout) -> None:
    layout.require(*(layout.splits / f"{name}.parquet" for name in SPLITS), layout.splits / METRICS)


def _pool_size(layout: RunLayout) -> int:
    """Rows of the unlabeled manifest, read from its metadata (not its rows)."""
    _require_splits(layout)
    return pq.ParquetFile(layout.splits / "unlabeled.parquet").metadata.num_rows


def _load_teacher(path: Path, data: ImageSet) -> nn.Module:
    """The un-noised model in ``path`` that labels or distills for a student, refused in
    one line naming the file when it was made for other classes or image channels (a
    planted or stale file would otherwise fail deep inside a forward pass)."""
    model = load_checkpoint(str(path), dropout=0.0, stochastic_depth=0.0)
    classes, channels = model.config["num_classes"], model.config["in_channels"]
    if (classes, channels) != (len(data.classes), data.images.shape[1]):
        raise CheckpointError(
            f"{path}: a model of {classes} classes and {channels} channels; this run's data "
            f"has {len(data.classes)} classes and {data.images.shape[1]} channels: train it "
            "again"
        )
    return model


def _column(frame: pd.DataFrame, name: str) -> torch.Tensor:
    """A manifest column as a tensor (a copy: parquet-backed arrays are read-only)."""
    return torch.tensor(frame[name].to_numpy())


def _build(cfg: Config, iteration: int, data: ImageSet, noised: bool) -> nn.Module:
    """The model of ``iteration``, from its pretrained weights when it names some."""
    spec = cfg.spec(iteration)
    noise = cfg.noise if noised else None
    size = {"width": spec.width, "depth": spec.depth} if spec.arch == "small_resnet" else {}
    model = build_model(
        spec.arch,
        num_classes=len(data.classes),
        in_channels=data.images.shape[1],
        small_input=data.images.shape[-1] <= 64,
        dropout=noise.dropout if noise else 0.0,
        stochastic_depth=noise.stochastic_depth if noise else 0.0,
        **size,
    )
    if spec.pretrained is not None:
        log.info("initial weights: %s", load_pretrained(model, spec.pretrained))
    return model


def _predict(model: nn.Module, data: ImageSet, split: pd.DataFrame, device: torch.device):
    return predict_proba(model, data.images, device, ids=split["image_id"].to_numpy())


def _per_class_accuracy(probs: torch.Tensor, split: pd.DataFrame, classes: list[str]):
    """Test accuracy of each class, the table behind the per-class plot."""
    labels = split["label"].to_numpy()
    correct = probs.argmax(dim=-1).numpy() == labels
    rows = [
        {"class": name, "test_accuracy": float(correct[labels == c].mean())}
        for c, name in enumerate(classes)
        if (labels == c).any()
    ]
    return pd.DataFrame(rows)


def train(
    cfg: Config,
    layout: RunLayout,
    iteration: int,
    on_epoch: Callable[[dict], None] | None = None,
) -> Path:
    """Train the teacher (iteration 0: labeled data, no noise) or student ``iteration``
    (labeled + pseudo-labeled data, RandAugment + dropout + stochastic depth, optionally
    CutMix/MixUp, distillation and a final fine-tune on the labeled data), in this process
    or as one rank of a data-parallel job (torchrun, Ray Train): rank 0 alone writes.
    ``on_epoch`` gets each epoch's history record as it completes, fine-tune epochs
    numbered on (on rank 0 only)."""
    check_iteration(cfg, iteration)
    _require_splits(layout)
    if iteration > 0:
        layout.require(layout.pseudo_dir(iteration) / PSEUDO_LABELS)
    device = select_device(cfg.device)
    with (
        precision(cfg.precision),
        distributed.process_group(device, cfg.train.batch_size, cfg.train.sync_batchnorm) as group,
    ):
        return _train(cfg, layout, iteration, group, on_epoch if group.main else None)


def _train(
    cfg: Config,
    layout: RunLayout,
    iteration: int,
    group: distributed.Group,
    on_epoch: Callable[[dict], None] | None,
) -> Path:
    seed_everything(cfg.seed + iteration)
    device = group.device
    data = load_images(cfg.data.source, cfg.data.root)
    num_classes = len(data.classes)
    labeled = _split(layout, "labeled")
    labeled_data = TrainData(
        data.images,
        labeled["image_id"].to_numpy(),
        one_hot(labeled["label"].to_numpy(), num_classes),
        torch.zeros(len(labeled), dtype=torch.bool),
    )
    spec, student, n_pseudo = cfg.spec(iteration), iteration > 0, 0
    model = _build(cfg, iteration, data, noised=student)
    teacher, loss_fn, ratio = None, None, None
    teacher_iteration = teacher_of(cfg, layout, iteration) if student else None
    if student:
        pseudo = pd.read_parquet(layout.pseudo_dir(iteration) / PSEUDO_LABELS)
        n_pseudo = len(pseudo)
        train_data = TrainData(
            data.images,
            np.concatenate([labeled_data.ids, pseudo["image_id"].to_numpy()]),
            torch.cat([labeled_data.targets, targets_from_manifest(pseudo, num_classes)]),
            torch.cat([labeled_data.pseudo, torch.ones(n_pseudo, dtype=torch.bool)]),
        )
        noise = cfg.noise
        augment = build_augment(
            "strong",
            randaugment_ops=noise.randaugment_ops,
            randaugment_magnitude=noise.randaugment_magnitude,
            cutmix_alpha=noise.cutmix_alpha,
            mixup_alpha=noise.mixup_alpha,
            mix_prob=noise.mix_prob,
            hflip=cfg.data.hflip,
        )
        sc = cfg.student
        loss_fn = student_loss(sc.distillation, sc.alpha, cfg.pseudo_label.temperature)
        ratio = sc.unlabeled_ratio
        if sc.init == "teacher" or sc.distillation == "online":
            path = layout.model_dir(teacher_iteration) / MODEL
            layout.require(path)
            source = _load_teacher(path, data)
            if sc.init == "teacher":  # a copy: the student's own noise is kept
                load_weights(model, source.state_dict(), f"{path} (student.init: teacher)")
                log.info("%s starts from model %d", model_name(iteration, spec), teacher_iteration)
            if sc.distillation == "online":
                teacher = source
    else:
        train_data = labeled_data
        augment = build_augment(
            cfg.teacher.augment,
            randaugment_ops=cfg.teacher.randaugment_ops,
            randaugment_magnitude=cfg.teacher.randaugment_magnitude,
            cutmix_alpha=cfg.teacher.cutmix_alpha,
            mix_prob=cfg.teacher.mix_prob,
            hflip=cfg.data.hflip,
        )
    val = _split(layout, "val")
    val_set = (data.images, val["image_id"].to_numpy(), _column(val, "label"))
    tc = cfg.train
    settings = TrainSettings(
        cfg.epochs_for(iteration),
        tc.batch_size,
        tc.lr,
        tc.weight_decay,
        ratio,
        tc.val_every,
        tc.sync_batchnorm,
    )
    name = model_name(iteration, spec)
    log.info("training %s on %d images (%d pseudo-labeled)", name, len(train_data), n_pseudo)
    start = time.perf_counter()
    if not student and cfg.teacher.method == "fixmatch":
        model, history = _train_fixmatch(
            cfg, layout, model, data, train_data, settings, device, val_set, on_epoch
        )
    else:
        history = train_model(
            model,
            train_data,
            settings,
            augment,
            device,
            val=val_set,
            loss_fn=loss_fn,
            param_groups=optimizer_param_groups(
                model, spec.transfer, tc.lr, spec.backbone_lr_scale
            ),
            teacher=teacher,
            on_train_mode=apply_freeze if spec.transfer == "freeze" else None,
            on_epoch=on_epoch,
        )
    if student and cfg.student.finetune_epochs:
        log.info("fine-tuning %s on the labeled images", name)
        finetune = TrainSettings(
            cfg.student.finetune_epochs,
            tc.batch_size,
            tc.lr * cfg.student.finetune_lr_scale,
            tc.weight_decay,
            val_every=tc.val_every,
            sync_batchnorm=tc.sync_batchnorm,
        )
        weak = build_augment("weak", hflip=cfg.data.hflip)
        done = len(history)

        def renumbered(record: dict) -> dict:
            return {**record, "epoch": record["epoch"] + done}

        more = train_model(
            model,
            labeled_data,
            finetune,
            weak,
            device,
            val=val_set,
            on_epoch=None if on_epoch is None else lambda r: on_epoch(renumbered(r)),
        )
        history += [renumbered(h) for h in more]
    seconds = time.perf_counter() - start
    if not group.main:  # rank 0 evaluates and writes; the others wait for it
        return layout.model_dir(iteration)
    val_probs = _predict(model, data, val, device)
    val_accuracy = accuracy(val_probs, _column(val, "label"))
    val_loss = _nll(val_probs, _column(val, "label"))
    test = _split(layout, "test")
    test_probs = _predict(model, data, test, device)
    metrics = {
        "iteration": iteration,
        "model": name,
        "arch": spec.arch,
        "width": spec.width,
        "depth": spec.depth,
        "num_parameters": num_parameters(model),
        "num_labeled": len(labeled),
        "num_pseudo_labeled": n_pseudo,
        "val_accuracy": val_accuracy,
        "val_loss": val_loss,
        "test_accuracy": accuracy(test_probs, _column(test, "label")),
        "train_seconds": round(seconds, 3),
        "precision": "bf16" if uses_bf16(device) else "fp32",
        **promotion(cfg, layout, teacher_iteration, val_accuracy, val_loss),
    }
    out = layout.model_dir(iteration)
    save_torch(out / MODEL, save_checkpoint(model.cpu(), data.classes, data.images.shape[-1]))
    write_csv(out / HISTORY, pd.DataFrame(history))
    write_csv(out / PER_CLASS, _per_class_accuracy(test_probs, test, data.classes))
    write_json(out / METRICS, metrics)
    log.info("%s: val %.4f test %.4f", name, metrics["val_accuracy"], metrics["test_accuracy"])
    if not metrics["promoted"]:
        log.warning(
            "%s does not beat its teacher on validation (accuracy %.4f vs %.4f): not "
            "promoted, model %d goes on teaching",
            name,
            val_accuracy,
            metrics["teacher_val_accuracy"],
            teacher_iteration,
        )
    return out


def _train_fixmatch(
    cfg: Config,
    layout: RunLayout,
    model: nn.Module,
    data: ImageSet,
    labeled: TrainData,
    settings: TrainSettings,
    device: torch.device,
    val: tuple[Images, np.ndarray, torch.Tensor],
    on_epoch: Callable[[dict], None] | None,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """The teacher trained by FixMatch on the labeled split and the unlabeled pool; returns
    the model to keep (the weights' moving average when ``teacher.ema_decay`` > 0)."""
    pool = _split(layout, "unlabeled")
    if pool.empty:
        raise ValueError("teacher.method: 'fixmatch' needs an unlabeled pool; the pool is empty")
    tc = cfg.teacher
    return train_fixmatch(
        model,
        labeled,
        data.images,
        pool["image_id"].to_numpy(),
        settings,
        ConsistencySettings(
            tc.unlabeled_ratio,
            tc.threshold,
            tc.unlabeled_weight,
            tc.adaptive_threshold,
            tc.ema_decay,
        ),
        build_augment("weak", hflip=cfg.data.hflip),
        build_augment(
            "strong",
            randaugment_ops=tc.randaugment_ops,
            randaugment_magnitude=tc.randaugment_magnitude,
            hflip=cfg.data.hflip,
        ),
        device,
        val=val,
        pool_labels=_column(pool, "hidden_label"),
        param_groups=optimizer_param_groups(model, tc.transfer, cfg.train.lr, tc.backbone_lr_scale),
        on_train_mode=apply_freeze if tc.transfer == "freeze" else None,
        on_epoch=on_epoch,
    )


def _nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the true labels."""
    return float(-probs.gather(1, labels[:, None]).clamp_min(1e-12).log().mean())


def _teacher(cfg: Config, layout: RunLayout, iteration: int) -> tuple[int, Path]:
    """The iteration and checkpoint of the model that labels the pool for ``iteration``."""
    teacher_iteration = teacher_of(cfg, layout, iteration)
    checkpoint = layout.model_dir(teacher_iteration) / MODEL
    layout.require(checkpoint)
    return teacher_iteration, checkpoint


def _label_slice(
    cfg: Config, layout: RunLayout, iteration: int, shard: Shard
) -> tuple[pd.DataFrame, dict, str]:
    """The map: label ``shard``'s slice of the pool; return its part, its statistics and
    the key every part of this labeling shares."""
    check_iteration(cfg, iteration, first=1)
    seed_everything(cfg.seed + iteration)
    device = select_device(cfg.device)
    pool_size = _pool_size(layout)
    data = load_images(cfg.data.source, cfg.data.root)
    pool_file = layout.splits / "unlabeled.parquet"
    if pool_size == 0:
        raise ValueError("the unlabeled pool is empty: nothing to pseudo-label")
    start, stop = shard.rows(pool_size)
    pool = read_rows(pool_file, start, stop, ["image_id", "hidden_label"])
    _, checkpoint = _teacher(cfg, layout, iteration)
    pc, num_classes = cfg.pseudo_label, len(data.classes)
    manifest = empty_manifest(pc.mode, num_classes)
    if len(pool):
        teacher = _load_teacher(checkpoint, data)
        with precision(cfg.precision):
            manifest = pseudo_label(
                teacher,
                data.images,
                pool["image_id"].to_numpy(),
                device,
                mode=pc.mode,
                temperature=pc.temperature,
                threshold=pc.threshold,
                batch_size=pc.batch_size,
                hflip=pc.tta == "hflip",
            )
    hidden = pool.set_index("image_id")["hidden_label"].loc[manifest["image_id"]].to_numpy()
    stats = shard_stats(manifest, hidden, num_classes, len(pool))
    if pc.balance is not None:
        manifest = top_per_class(manifest, pc.balance)
    key = shard_key(pc, cfg.seed + iteration, file_md5(checkpoint), pool_size)
    return manifest, stats, key


def _write_labels(
    cfg: Config, layout: RunLayout, iteration: int, parts: list, stats: list[dict]
) -> Path:
    """The reduce's output: the manifest students read and its metrics."""
    splits = read_json(layout.splits / METRICS)
    manifest, reduced = reduce_shards(
        parts, stats, len(splits["classes"]), cfg.pseudo_label.balance
    )
    metrics = {
        "iteration": iteration,
        "teacher_iteration": _teacher(cfg, layout, iteration)[0],
        **reduced,
    }
    out = layout.pseudo_dir(iteration)
    write_parquet(out / PSEUDO_LABELS, manifest)
    write_json(out / METRICS, metrics)
    log.info(
        "pseudo-labels for student %d: kept %d/%d, accuracy %s",
        iteration,
        len(manifest),
        metrics["pool_size"],
        metrics["pseudo_label_accuracy"],
    )
    if manifest.empty:  # nothing above the threshold: no self-training in this iteration
        log.warning(
            "0 pseudo-labels above %g: student-%d learns from the %d labels alone",
            cfg.pseudo_label.threshold,
            iteration,
            splits["labeled"],
        )
    return out


def label_pool(cfg: Config, layout: RunLayout, iteration: int) -> Path:
    """The teacher of student ``iteration`` (``teacher_of``), un-noised, labels the
    unlabeled pool; the pool's hidden labels, where known, only score the result. One
    process: the map over a single shard, then the reduce (no part files)."""
    part, stats, _ = _label_slice(cfg, layout, iteration, Shard(0, 1))
    return _write_labels(cfg, layout, iteration, [part], [stats])


def label_shard(
    cfg: Config, layout: RunLayout, iteration: int, shard: Shard, worker: dict | None = None
) -> Path:
    """Label one shard of the pool for student ``iteration`` and write its part and
    statistics under the pseudo-label directory (``worker``: where it ran, recorded)."""
    part, stats, key = _label_slice(cfg, layout, iteration, shard)
    pool_size = _pool_size(layout)
    log.info("shard %s of the pool for student %d: kept %d", shard, iteration, len(part))
    return write_shard(
        layout.pseudo_dir(iteration), shard, part, stats, key, shard.rows(pool_size), worker
    )


def merge_shards(cfg: Config, layout: RunLayout, iteration: int, count: int | None = None) -> Path:
    """The reduce over the parts of ``count`` shards (default: the one count whose parts
    are present): the manifest and metrics ``label_pool`` writes, byte for byte."""
    check_iteration(cfg, iteration, first=1)
    out = layout.pseudo_dir(iteration)
    if count is None:
        counts = shard_counts(out)
        if len(counts) != 1:
            found = ", ".join(map(str, counts)) or "none"
            raise ShardError(
                f"merge: expected the parts of one shard count in {out / SHARDS}, "
                f"found counts: {found}; pass the count"
            )
        count = counts[0]
    pool_size = _pool_size(layout)
    _, checkpoint = _teacher(cfg, layout, iteration)
    key = shard_key(cfg.pseudo_label, cfg.seed + iteration, file_md5(checkpoint), pool_size)
    parts, stats = read_shards(out, count, key, pool_size)
    return _write_labels(cfg, layout, iteration, parts, stats)


def describe(cfg: Config, table: pd.DataFrame) -> str:
    """One sentence on what the run was and what it gave."""
    first = table.iloc[0]
    final = table.set_index("iteration").loc[final_iteration(table)]
    rejected = int((~table["promoted"].astype(bool)).sum())
    limit = cfg.data.labeled_limit
    labeled = "every labeled image" if limit is None else f"{limit} labels per class"
    return (
        f"Noisy Student on {cfg.data.source}, {labeled}, "
        f"{len(table) - 1} student iteration(s) ({rejected} not promoted), pseudo-labels "
        f"{cfg.pseudo_label.mode} (threshold {cfg.pseudo_label.threshold}), RandAugment "
        f"N={cfg.noise.randaugment_ops} M={cfg.noise.randaugment_magnitude}. Test accuracy: "
        f"teacher {first.test_accuracy:.4f} -> {final.model} {final.test_accuracy:.4f}."
    )


def summarize(cfg: Config, layout: RunLayout) -> pd.DataFrame:
    """One row per iteration (teacher first), written with the final model's per-class
    accuracy, the report's metrics and a self-contained report (markdown + HTML)."""
    columns = (
        "iteration",
        "model",
        "num_parameters",
        "num_labeled",
        "num_pseudo_labeled",
        "val_accuracy",
        "test_accuracy",
        "teacher_iteration",
        "promoted",
    )
    for iteration in range(len(cfg.iterations) + 1):  # the first step not run, named
        if iteration > 0:  # its pseudo-labels come first
            layout.require(layout.pseudo_dir(iteration) / METRICS)
        layout.require(layout.model_dir(iteration) / METRICS)
    rows = []
    for iteration in range(len(cfg.iterations) + 1):
        m = read_json(layout.model_dir(iteration) / METRICS)
        row = {k: m[k] for k in columns}
        row["pseudo_label_accuracy"] = None
        if iteration > 0:
            pseudo = read_json(layout.pseudo_dir(iteration) / METRICS)
            row["pseudo_label_accuracy"] = pseudo["pseudo_label_accuracy"]
        row["train_seconds"] = m["train_seconds"]
        rows.append(row)
    table = pd.DataFrame(rows).astype({"teacher_iteration": "Int64"})
    out = layout.report
    write_csv(out / "iterations.csv", table.drop(columns="train_seconds"))
    final = final_iteration(table)
    layout.require(layout.model_dir(final) / PER_CLASS)
    per_class = pd.read_csv(layout.model_dir(final) / PER_CLASS)
    write_csv(out / PER_CLASS, per_class)
    first, last = rows[0], rows[final]
    write_json(
        out / METRICS,
        {
            "teacher_val_accuracy": first["val_accuracy"],
            "teacher_test_accuracy": first["test_accuracy"],
            "final_iteration": final,
            "final_val_accuracy": last["val_accuracy"],
            "final_test_accuracy": last["test_accuracy"],
            "test_gain": last["test_accuracy"] - first["test_accuracy"],
            "iterations": len(rows) - 1,
            "promoted": int(table["promoted"].sum()) - 1,
        },
    )
    write_accuracy_by_iteration_png(out / "accuracy_by_iteration.png", table)
    write_per_class_accuracy_png(
        out / "per_class_accuracy.png",
        per_class["test_accuracy"].tolist(),
        per_class["class"].astype(str).tolist(),
    )
    write_report(
        out,
        f"Noisy Student run {cfg.fingerprint()}",
        describe(cfg, table),
        table,
        {
            "accuracy_by_iteration.png": "Accuracy by iteration",
            "per_class_accuracy.png": f"Per-class test accuracy of the final model "
            f"({last['model']})",
        },
    )
    return table


Step = Callable[[Config, RunLayout, int], Path]


def run_all(
    cfg: Config, layout: RunLayout, train_step: Step = train, label_step: Step = label_pool
) -> pd.DataFrame:
    """The whole loop in one process: prepare, teacher, then label -> student per iteration.
    ``train_step`` and ``label_step`` wrap ``train`` and ``label_pool`` (say, to record
    each step in MLflow as it runs)."""
    prepare(cfg, layout)
    train_step(cfg, layout, 0)
    for iteration in sorted(cfg.iterations):
        label_step(cfg, layout, iteration)
        train_step(cfg, layout, iteration)
    return summarize(cfg, layout)
