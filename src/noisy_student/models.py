"""A small-image ResNet family scaled by width and depth, with the student's noise
(dropout before the classifier, stochastic depth on residual branches) built in."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.ops import StochasticDepth

BASE_CHANNELS = (16, 32, 64)
BASE_BLOCKS = 2


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, drop_prob: float) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )
        # "row" mode drops the branch per sample, as in the stochastic depth paper;
        # StochasticDepth is the identity in eval mode.
        self.drop_path = StochasticDepth(drop_prob, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.shortcut(x) + self.drop_path(self.residual(x)))


class SmallResNet(nn.Module):
    """Three stages of basic blocks; ``width`` scales channels, ``depth`` blocks per stage.

    ``config`` holds the constructor arguments so a checkpoint can rebuild the model.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        width: float = 1.0,
        depth: float = 1.0,
        dropout: float = 0.0,
        stochastic_depth: float = 0.0,
    ) -> None:
        super().__init__()
        self.config: dict[str, Any] = dict(
            num_classes=num_classes,
            in_channels=in_channels,
            width=width,
            depth=depth,
            dropout=dropout,
            stochastic_depth=stochastic_depth,
        )
        channels = [max(8, round(c * width)) for c in BASE_CHANNELS]
        blocks = max(1, round(BASE_BLOCKS * depth))
        total = blocks * len(channels)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(channels[0]),
            nn.ReLU(inplace=True),
        )
        layers, c_in, index = [], channels[0], 0
        for stage, c_out in enumerate(channels):
            for b in range(blocks):
                # Linear decay rule: deeper blocks are dropped more often.
                drop = stochastic_depth * (index + 1) / total
                layers.append(BasicBlock(c_in, c_out, 2 if (b == 0 and stage > 0) else 1, drop))
                c_in, index = c_out, index + 1
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: float images in [0, 1], ``N x C x H x W``; returns logits."""
        return self.head(self.blocks(self.stem(x)))


def build_model(**config: Any) -> SmallResNet:
    return SmallResNet(**config)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_checkpoint(model: SmallResNet) -> dict[str, Any]:
    """A checkpoint of plain tensors and numbers, loadable with ``weights_only=True``."""
    return {"config": dict(model.config), "state_dict": model.state_dict()}


def load_checkpoint(
    path: str, map_location: str | torch.device = "cpu", **noise: float
) -> SmallResNet:
    """Rebuild a model from :func:`save_checkpoint`; ``noise`` may reset dropout and
    stochastic depth (they have no weights)."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    model = build_model(**{**ckpt["config"], **noise})
    model.load_state_dict(ckpt["state_dict"])
    return model
