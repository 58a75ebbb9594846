"""Pseudo-labeling with the un-noised teacher: eval mode, no augmentation, in batches."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from noisy_student.engine import Images, in_chunks, predict_logits_batches
from noisy_student.progress import bar

PROB = "prob_"  # soft-label column prefix: prob_0, prob_1, ...


def pseudo_label(
    model: nn.Module,
    images: Images,
    image_ids: np.ndarray,
    device: torch.device,
    mode: str = "soft",
    temperature: float = 1.0,
    threshold: float = 0.0,
    batch_size: int = 512,
    hflip: bool = False,
) -> pd.DataFrame:
    """Label rows ``image_ids`` of ``images``, streaming batch by batch; keep those whose
    confidence (max probability at ``temperature``) reaches ``threshold``. ``hflip``
    (test-time augmentation) labels with the teacher's probabilities averaged over each
    image and its mirror, for data whose labels survive a horizontal flip: fewer confident
    mistakes. Columns:
    ``image_id``, ``label``, ``confidence`` and, in soft mode, ``prob_0`` ... ``prob_<K-1>``
    (the full distribution, summing to 1; plain float columns hold a large pool in a
    fraction of the memory of one array object per row)."""
    if mode not in ("hard", "soft"):
        raise ValueError(f"pseudo_label mode {mode!r}; allowed: hard, soft")
    # The softmax runs where the model does, on a GPU over chunks of many batches. Kept rows
    # collect as arrays and become one frame at the end: a frame per batch would cost more
    # than a fast model's inference.
    ids, labels, confidences, distributions = [], [], [], []
    start = 0
    batches = predict_logits_batches(model, images, device, batch_size, image_ids, hflip)
    with bar("labeling", total=len(image_ids), unit="image") as progress:
        for logits in in_chunks(batches, device):
            probs = (logits / temperature).softmax(dim=-1)
            confidence, label = (t.cpu() for t in probs.max(dim=-1))
            probs = probs.cpu()
            keep = (confidence >= threshold).numpy()
            ids.append(image_ids[start : start + len(probs)][keep])
            start += len(probs)
            labels.append(label.numpy()[keep])
            confidences.append(confidence.numpy()[keep])
            if mode == "soft":
                distributions.append(probs.numpy()[keep])
            progress.advance(len(probs))
    if not ids:
        return pd.DataFrame(columns=["image_id", "label", "confidence"])
    columns = {
        "image_id": np.concatenate(ids),
        "label": np.concatenate(labels),
        "confidence": np.concatenate(confidences),
    }
    if mode == "soft":
        distribution = np.concatenate(distributions)
        columns |= {f"{PROB}{c}": distribution[:, c] for c in range(distribution.shape[1])}
    return pd.DataFrame(columns)


def balance_classes(manifest: pd.DataFrame, num_classes: int, per_class: int) -> pd.DataFrame:
    """Per-class balancing of the Noisy Student reference implementation: a class with more
    than ``per_class`` pseudo-labels keeps its most confident ones; a class with fewer has
    its images duplicated (whole copies, then its most confident ones) up to ``per_class``.
    A class with none stays empty: there is nothing to duplicate."""
    parts = []
    for label in range(num_classes):
        rows = manifest[manifest["label"] == label].sort_values(
            ["confidence", "image_id"], ascending=[False, True], kind="stable"
        )
        if len(rows) == 0:
            continue
        copies, rest = divmod(per_class, len(rows))
        parts.extend([rows] * copies + [rows.iloc[:rest]])
    if not parts:
        return manifest.iloc[:0]
    return pd.concat(parts, ignore_index=True)


def class_counts(manifest: pd.DataFrame, num_classes: int) -> list[int]:
    return np.bincount(manifest["label"].to_numpy(dtype=np.int64), minlength=num_classes).tolist()


def prob_columns(manifest: pd.DataFrame) -> list[str]:
    """The soft-label columns of a manifest, in class order; none for hard labels."""
    columns = [c for c in manifest.columns if str(c).startswith(PROB)]
    return sorted(columns, key=lambda c: int(c.removeprefix(PROB)))


def targets_from_manifest(manifest: pd.DataFrame, num_classes: int) -> torch.Tensor:
    """Probability targets: the stored distribution in soft mode, one-hot otherwise."""
    if len(manifest) == 0:
        return torch.zeros(0, num_classes)
    columns = prob_columns(manifest)
    if columns:
        return torch.tensor(manifest[columns].to_numpy(dtype=np.float32))
    return one_hot(manifest["label"].to_numpy(), num_classes)


def one_hot(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    labels = torch.tensor(labels, dtype=torch.long)  # a copy: parquet columns are read-only
    return torch.nn.functional.one_hot(labels, num_classes).float()
