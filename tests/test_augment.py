from __future__ import annotations

import pytest
import torch

from noisy_student.augment import build_augment, random_crop


def test_random_crop_draws_an_offset_per_image() -> None:
    torch.manual_seed(0)
    batch = torch.arange(64, dtype=torch.uint8).reshape(1, 1, 8, 8).repeat(32, 1, 1, 1)
    out = random_crop(batch, 2)
    assert out.shape == batch.shape and out.dtype == torch.uint8
    distinct = {tuple(img.flatten().tolist()) for img in out}
    assert len(distinct) > 5  # one draw per image, not one per batch
    # Each crop is a window of the zero-padded original.
    padded = torch.nn.functional.pad(batch[0], (2, 2, 2, 2))
    windows = {
        tuple(padded[:, y : y + 8, x : x + 8].flatten().tolist())
        for y in range(5)
        for x in range(5)
    }
    assert distinct <= windows


def test_strong_policy_noises_each_image_differently() -> None:
    torch.manual_seed(0)
    batch = torch.randint(0, 256, (1, 1, 16, 16), dtype=torch.uint8).repeat(16, 1, 1, 1)
    out = build_augment("strong", 2, 9)(batch)
    assert out.shape == batch.shape and out.dtype == torch.uint8
    assert len({tuple(img.flatten().tolist()) for img in out}) > 8


def test_none_is_identity_and_unknown_policy_is_refused() -> None:
    batch = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    assert build_augment("none")(batch) is batch
    with pytest.raises(ValueError, match="allowed: none, weak, strong"):
        build_augment("heavy")
