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
import torch
from torch import nn

from noisy_student import distributed
from noisy_student.augment import build_augment
from noisy_student.config import Config
from noisy_student.data import ImageSet, load_images, make_splits
from noisy_student.engine import (
    TrainData,
    TrainSettings,
    accuracy,
    predict_proba,
    seed_everything,
    select_device,
    train_model,
)
from noisy_student.io import read_json, save_torch, write_csv, write_json, write_parquet
from noisy_student.losses import student_loss
from noisy_student.models import build_model, load_checkpoint, num_parameters, save_checkpoint
from noisy_student.pseudo_label import (
    balance_classes,
    class_counts,
    one_hot,
    pseudo_label,
    targets_from_manifest,
)
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
    RunLayout,
    final_iteration,
    model_name,
    promotion,
    teacher_of,
)
from noisy_student.transfer import apply_freeze, load_pretrained, optimizer_param_groups

log = logging.getLogger(__name__)


def prepare(cfg: Config, layout: RunLayout) -> Path:
    """Split the dataset into labeled / unlabeled / val / test manifests."""
    data = load_images(cfg.data.source, cfg.data.root)
    frames = make_splits(
        data.labels,
        cfg.data.labeled_per_class,
        cfg.data.val_per_class,
        cfg.data.test_per_class,
        cfg.seed,
        partition=data.partition,
        hidden_labels=data.hidden_labels,
        class_names=data.classes,
    )
    for name, frame in frames.items():
        write_parquet(layout.splits / f"{name}.parquet", frame)
    counts = {name: len(frame) for name, frame in frames.items()}
    write_json(
        layout.splits / METRICS,
        {"classes": data.classes, "skipped_files": len(data.skipped), **counts},
    )
    if data.skipped:
        log.warning(
            "%d unreadable files were skipped; see the source's skipped.json", len(data.skipped)
        )
    log.info("prepared splits %s", counts)
    return layout.splits


def _split(layout: RunLayout, name: str) -> pd.DataFrame:
    return pd.read_parquet(layout.splits / f"{name}.parquet")


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
    device = select_device(cfg.device)
    with distributed.process_group(device, cfg.train.batch_size, cfg.train.sync_batchnorm) as group:
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
            source = load_checkpoint(
                str(layout.model_dir(teacher_iteration) / MODEL),
                dropout=0.0,
                stochastic_depth=0.0,
            )
            if sc.init == "teacher":  # a copy: the student's own noise is kept
                model.load_state_dict(source.state_dict())
                log.info("%s starts from model %d", model_name(iteration, spec), teacher_iteration)
            if sc.distillation == "online":
                teacher = source
    else:
        train_data = labeled_data
        augment = build_augment(
            cfg.teacher.augment,
            randaugment_ops=cfg.noise.randaugment_ops,
            randaugment_magnitude=cfg.noise.randaugment_magnitude,
            cutmix_alpha=cfg.teacher.cutmix_alpha,
            mix_prob=cfg.noise.mix_prob,
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
    history = train_model(
        model,
        train_data,
        settings,
        augment,
        device,
        val=val_set,
        loss_fn=loss_fn,
        param_groups=optimizer_param_groups(model, spec.transfer, tc.lr, spec.backbone_lr_scale),
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


def _nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the true labels."""
    return float(-probs.gather(1, labels[:, None]).clamp_min(1e-12).log().mean())


def label_pool(cfg: Config, layout: RunLayout, iteration: int) -> Path:
    """The teacher of student ``iteration`` (``teacher_of``), un-noised, labels the
    unlabeled pool; the pool's hidden labels, where known, only score the result."""
    seed_everything(cfg.seed + iteration)
    device = select_device(cfg.device)
    data = load_images(cfg.data.source, cfg.data.root)
    pool = _split(layout, "unlabeled")
    if pool.empty:
        raise ValueError("the unlabeled pool is empty: nothing to pseudo-label")
    teacher_iteration = teacher_of(cfg, layout, iteration)
    teacher = load_checkpoint(
        str(layout.model_dir(teacher_iteration) / MODEL), dropout=0.0, stochastic_depth=0.0
    )
    pc = cfg.pseudo_label
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
    scored = hidden >= 0
    correct = manifest["label"].to_numpy()[scored] == hidden[scored]
    num_classes = len(data.classes)
    metrics = {
        "iteration": iteration,
        "teacher_iteration": teacher_iteration,
        "pool_size": len(pool),
        "num_above_threshold": len(manifest),
        "kept_fraction": len(manifest) / len(pool),
        "pseudo_label_accuracy": float(correct.mean()) if scored.any() else None,
        "mean_confidence": float(manifest["confidence"].mean()) if len(manifest) else 0.0,
        "class_counts_before_balancing": class_counts(manifest, num_classes),
    }
    if pc.balance is not None:
        manifest = balance_classes(manifest, num_classes, pc.balance)
    metrics["class_counts"] = class_counts(manifest, num_classes)
    metrics["num_pseudo_labeled"] = len(manifest)
    out = layout.pseudo_dir(iteration)
    write_parquet(out / PSEUDO_LABELS, manifest)
    write_json(out / METRICS, metrics)
    log.info(
        "pseudo-labels for student %d: kept %d/%d, accuracy %s",
        iteration,
        len(manifest),
        len(pool),
        metrics["pseudo_label_accuracy"],
    )
    return out


def describe(cfg: Config, table: pd.DataFrame) -> str:
    """One sentence on what the run was and what it gave."""
    first = table.iloc[0]
    final = table.set_index("iteration").loc[final_iteration(table)]
    rejected = int((~table["promoted"].astype(bool)).sum())
    return (
        f"Noisy Student on {cfg.data.source}, {cfg.data.labeled_per_class} labels per class, "
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
