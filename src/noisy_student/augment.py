"""Augmentation policies on uint8 image batches (``N x C x H x W``).

Randomness is drawn per image: each image of a batch gets its own crop offset and its
own RandAugment ops and magnitudes, so the noise is real per-sample noise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2

Augment = Callable[[torch.Tensor], torch.Tensor]


def random_crop(batch: torch.Tensor, padding: int) -> torch.Tensor:
    """Pad by ``padding`` (zeros) and crop back to size at a random offset per image."""
    if padding == 0:
        return batch
    n, _, h, w = batch.shape
    padded = torch.nn.functional.pad(batch, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,))
    dx = torch.randint(0, 2 * padding + 1, (n,))
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]
    index = torch.arange(n)[:, None, None, None]
    channel = torch.arange(batch.shape[1])[None, :, None, None]
    return padded[index, channel, rows, cols]


def _padding_for(batch: torch.Tensor) -> int:
    return max(1, batch.shape[-1] // 8)


def build_augment(policy: str, randaugment_ops: int = 2, randaugment_magnitude: int = 9) -> Augment:
    """``none``; ``weak`` (random crop with padding, for the teacher); ``strong``
    (RandAugment(N, M) per image, then the weak crop, for students)."""
    if policy == "none":
        return lambda batch: batch
    if policy == "weak":
        return lambda batch: random_crop(batch, _padding_for(batch))
    if policy == "strong":
        rand_augment = v2.RandAugment(num_ops=randaugment_ops, magnitude=randaugment_magnitude)

        def strong(batch: torch.Tensor) -> torch.Tensor:
            noised = torch.stack([rand_augment(image) for image in batch])
            return random_crop(noised, _padding_for(batch))

        return strong
    raise ValueError(f"unknown augment policy {policy!r}; allowed: none, weak, strong")
