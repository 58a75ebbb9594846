from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import noisy_student.pseudo_label as pseudo_label_module
from noisy_student.engine import in_chunks, precision
from noisy_student.pseudo_label import (
    balance_classes,
    class_counts,
    prob_columns,
    pseudo_label,
    targets_from_manifest,
)

pytestmark = pytest.mark.float_path  # `make test` runs it on both CPU float paths


class FixedLogits(nn.Module):
    """Returns preset logits for the images it is given, in order."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.logits[self.seen : self.seen + len(x)]
        self.seen += len(x)
        return out


LOGITS = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.2, 0.0], [0.0, 0.0, 9.0], [1.0, 2.0, 0.0]])
IMAGES = torch.zeros(14, 1, 2, 2, dtype=torch.uint8)  # rows 10-13 are labeled
IDS = np.array([10, 11, 12, 13])


def test_threshold_keeps_confident_images_only() -> None:
    probs = LOGITS.softmax(-1)
    manifest = pseudo_label(
        FixedLogits(LOGITS),
        IMAGES,
        IDS,
        torch.device("cpu"),
        mode="hard",
        threshold=0.6,
        batch_size=3,
    )
    expected = (probs.max(-1).values >= 0.6).numpy()
    assert manifest["image_id"].tolist() == IDS[expected].tolist() == [10, 12, 13]
    assert manifest["label"].tolist() == [0, 2, 1]
    np.testing.assert_allclose(manifest["confidence"], probs.max(-1).values[expected], rtol=1e-6)
    assert prob_columns(manifest) == []
    assert torch.equal(targets_from_manifest(manifest, 3).argmax(-1), torch.tensor([0, 2, 1]))


def test_soft_labels_sum_to_one_and_follow_temperature() -> None:
    cold = pseudo_label(FixedLogits(LOGITS), IMAGES, IDS, torch.device("cpu"), mode="soft")
    hot = pseudo_label(
        FixedLogits(LOGITS), IMAGES, IDS, torch.device("cpu"), mode="soft", temperature=4.0
    )
    for manifest in (cold, hot):
        targets = targets_from_manifest(manifest, 3)
        torch.testing.assert_close(targets.sum(-1), torch.ones(4))
    expected = (LOGITS / 4).softmax(-1)
    np.testing.assert_allclose(hot[prob_columns(hot)].to_numpy(), expected, rtol=1e-5)
    assert (hot["confidence"].to_numpy() < cold["confidence"].to_numpy()).all()


def test_teacher_is_run_in_eval_mode() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.9), nn.Linear(4, 3))
    model.train()
    first = pseudo_label(model, IMAGES + 255, IDS, torch.device("cpu"), mode="soft")
    second = pseudo_label(model, IMAGES + 255, IDS, torch.device("cpu"), mode="soft")
    assert not model.training
    assert prob_columns(first) == ["prob_0", "prob_1", "prob_2"]
    np.testing.assert_array_equal(first[prob_columns(first)], second[prob_columns(second)])


def test_nothing_above_threshold_gives_empty_targets() -> None:
    manifest = pseudo_label(
        FixedLogits(LOGITS), IMAGES, IDS, torch.device("cpu"), mode="soft", threshold=1.0
    )
    assert len(manifest) == 0
    assert targets_from_manifest(manifest, 3).shape == (0, 3)


def manifest_of(labels: list[int], confidences: list[float]) -> pd.DataFrame:
    return pd.DataFrame(
        {"image_id": range(len(labels)), "label": labels, "confidence": confidences}
    )


def test_balance_keeps_most_confident_of_frequent_classes() -> None:
    manifest = manifest_of([0, 0, 0, 0, 1, 1], [0.6, 0.9, 0.7, 0.8, 0.95, 0.5])
    balanced = balance_classes(manifest, num_classes=3, per_class=2)
    assert balanced[balanced["label"] == 0]["image_id"].tolist() == [1, 3]
    assert balanced[balanced["label"] == 1]["image_id"].tolist() == [4, 5]
    assert class_counts(balanced, 3) == [2, 2, 0]  # nothing to duplicate for class 2


def test_balance_duplicates_rare_classes_most_confident_first() -> None:
    manifest = manifest_of([0, 0, 1], [0.6, 0.9, 0.7])
    balanced = balance_classes(manifest, num_classes=2, per_class=5)
    assert balanced[balanced["label"] == 0]["image_id"].tolist() == [1, 0, 1, 0, 1]
    assert balanced[balanced["label"] == 1]["image_id"].tolist() == [2] * 5
    assert class_counts(manifest, 2) == [2, 1] and class_counts(balanced, 2) == [5, 5]


def test_hflip_tta_averages_the_probabilities_of_each_image_and_its_mirror() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))  # not flip-invariant
    images = torch.randint(0, 256, (6, 1, 2, 2), dtype=torch.uint8)
    ids = np.arange(6)
    with precision("fp32"):  # the expected probabilities below are float32's
        manifest = pseudo_label(model, images, ids, torch.device("cpu"), mode="soft", hflip=True)
    with torch.no_grad():
        x = images.float() / 255
        expected = (model(x).softmax(-1) + model(x.flip(-1)).softmax(-1)) / 2
    np.testing.assert_allclose(manifest[prob_columns(manifest)], expected, rtol=1e-5)
    plain = pseudo_label(model, images, ids, torch.device("cpu"), mode="soft")
    assert not np.allclose(plain[prob_columns(plain)], expected, rtol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_labels_on_cuda_match_the_cpu_ones_wherever_the_pool_lives() -> None:
    """The softmax runs on the GPU and results come back in chunks: the same manifest."""
    cuda = torch.device("cuda")
    expected = pseudo_label(
        FixedLogits(LOGITS), IMAGES, IDS, torch.device("cpu"), threshold=0.6, batch_size=3
    )
    for pool in (IMAGES.to(cuda), IMAGES.numpy()):
        manifest = pseudo_label(
            FixedLogits(LOGITS.to(cuda)), pool, IDS, cuda, threshold=0.6, batch_size=3
        )
        pd.testing.assert_frame_equal(manifest, expected, rtol=1e-5)


def test_ids_stay_with_their_labels_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    whole = pseudo_label(FixedLogits(LOGITS), IMAGES, IDS, torch.device("cpu"), threshold=0.6)
    # Chunks as on a GPU, of two one-image batches each (6 logits): the ids must follow.
    as_on_gpu = partial(in_chunks, device=torch.device("cuda"), values=6)
    monkeypatch.setattr(pseudo_label_module, "in_chunks", lambda batches, _: as_on_gpu(batches))
    chunked = pseudo_label(
        FixedLogits(LOGITS), IMAGES, IDS, torch.device("cpu"), threshold=0.6, batch_size=1
    )
    assert chunked["image_id"].tolist() == [10, 12, 13]
    pd.testing.assert_frame_equal(chunked, whole)
