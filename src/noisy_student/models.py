"""Models by name: a small-image ResNet family scaled by width and depth, and torchvision's
ResNets and EfficientNets, all with the student's noise (dropout before the classifier,
stochastic depth on residual branches) built in and a ``config`` dict that rebuilds them."""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv_resnet
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

    The stem keeps full resolution (3x3 stride-1 conv, no pooling) because the inputs are
    tiny; ``small_input=False`` downsamples by 4 first (7x7 stride-2 conv and max-pool), as
    ImageNet ResNets do, for larger images. ``config`` holds the constructor arguments so a
    checkpoint can rebuild the model.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        width: float = 1.0,
        depth: float = 1.0,
        dropout: float = 0.0,
        stochastic_depth: float = 0.0,
        small_input: bool = True,
    ) -> None:
        super().__init__()
        self.config: dict[str, Any] = dict(
            arch="small_resnet",
            num_classes=num_classes,
            in_channels=in_channels,
            width=width,
            depth=depth,
            dropout=dropout,
            stochastic_depth=stochastic_depth,
            small_input=small_input,
        )
        channels = [max(8, round(c * width)) for c in BASE_CHANNELS]
        blocks = max(1, round(BASE_BLOCKS * depth))
        total = blocks * len(channels)
        if small_input:
            stem_conv = nn.Conv2d(in_channels, channels[0], 3, 1, 1, bias=False)
        else:
            stem_conv = nn.Conv2d(in_channels, channels[0], 7, 2, 3, bias=False)
        stem: list[nn.Module] = [stem_conv, nn.BatchNorm2d(channels[0]), nn.ReLU(inplace=True)]
        if not small_input:
            stem.append(nn.MaxPool2d(3, 2, 1))
        self.stem = nn.Sequential(*stem)
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


class _DropPathBasicBlock(tv_resnet.BasicBlock):
    """torchvision's BasicBlock with stochastic depth on its residual branch; the module
    names (and so the state-dict keys) are torchvision's, so its weights load by name."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.drop_path = StochasticDepth(0.0, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(self.drop_path(out) + identity)


class _DropPathBottleneck(tv_resnet.Bottleneck):
    """torchvision's Bottleneck with stochastic depth on its residual branch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.drop_path = StochasticDepth(0.0, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(self.drop_path(out) + identity)


# block, blocks per stage, width per group: the layouts of torchvision's builders.
_RESNET_LAYOUTS: dict[
    str, tuple[type[tv_resnet.BasicBlock | tv_resnet.Bottleneck], list[int], int]
] = {
    "resnet18": (_DropPathBasicBlock, [2, 2, 2, 2], 64),
    "resnet34": (_DropPathBasicBlock, [3, 4, 6, 3], 64),
    "resnet50": (_DropPathBottleneck, [3, 4, 6, 3], 64),
    "wide_resnet50_2": (_DropPathBottleneck, [3, 4, 6, 3], 128),
}


def _new_conv(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Conv2d:
    """A bias-free conv with torchvision's initialisation for the stems it replaces."""
    conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def _refuse_scaling(arch: str, width: float, depth: float) -> None:
    """torchvision archs have fixed sizes: a student that silently kept the teacher's size
    would make a "bigger student" experiment meaningless, so say so instead."""
    if width != 1.0 or depth != 1.0:
        raise ValueError(
            f"{arch}: width/depth multipliers apply to 'small_resnet' only "
            f"(got width={width}, depth={depth}); pick a bigger arch instead"
        )


def _remember(
    model: nn.Module,
    arch: str,
    num_classes: int,
    in_channels: int,
    dropout: float,
    stochastic_depth: float,
    small_input: bool,
) -> nn.Module:
    """Keep the constructor arguments on the model so a checkpoint can rebuild it."""
    model.config = dict(
        arch=arch,
        num_classes=num_classes,
        in_channels=in_channels,
        dropout=dropout,
        stochastic_depth=stochastic_depth,
        small_input=small_input,
    )
    return model


def _build_resnet(
    arch: str,
    num_classes: int,
    in_channels: int = 3,
    dropout: float = 0.0,
    stochastic_depth: float = 0.0,
    small_input: bool = False,
    width: float = 1.0,
    depth: float = 1.0,
) -> nn.Module:
    _refuse_scaling(arch, width, depth)
    block, layers, width_per_group = _RESNET_LAYOUTS[arch]
    model = tv_resnet.ResNet(
        block, layers, num_classes=num_classes, width_per_group=width_per_group
    )
    if small_input:
        model.conv1 = _new_conv(in_channels, 64, 3, 1)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = _new_conv(in_channels, 64, 7, 2)
    # Dropout joins the parameter-free pooling so that the state-dict keys stay torchvision's.
    model.avgpool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Dropout(dropout))
    blocks = [m for m in model.modules() if isinstance(m, block)]
    for index, b in enumerate(blocks):
        # Linear decay rule, as in SmallResNet: deeper blocks are dropped more often.
        b.drop_path.p = stochastic_depth * (index + 1) / len(blocks)
    return _remember(model, arch, num_classes, in_channels, dropout, stochastic_depth, small_input)


def _build_efficientnet(
    arch: str,
    num_classes: int,
    in_channels: int = 3,
    dropout: float = 0.0,
    stochastic_depth: float = 0.0,
    small_input: bool = False,
    width: float = 1.0,
    depth: float = 1.0,
) -> nn.Module:
    _refuse_scaling(arch, width, depth)
    # EfficientNet decays stochastic_depth_prob linearly over its blocks by itself.
    model = torchvision.models.get_model(
        arch,
        weights=None,
        num_classes=num_classes,
        dropout=dropout,
        stochastic_depth_prob=stochastic_depth,
    )
    if small_input or in_channels != 3:
        stem = model.features[0][0]
        model.features[0][0] = _new_conv(in_channels, stem.out_channels, 3, 1 if small_input else 2)
    return _remember(model, arch, num_classes, in_channels, dropout, stochastic_depth, small_input)


@dataclass(frozen=True)
class _Arch:
    build: Callable[..., nn.Module]
    head: str  # module path of the final Linear


_REGISTRY: dict[str, _Arch] = {
    "small_resnet": _Arch(SmallResNet, "head.3"),
    **{name: _Arch(partial(_build_resnet, name), "fc") for name in _RESNET_LAYOUTS},
    **{
        f"efficientnet_b{i}": _Arch(
            partial(_build_efficientnet, f"efficientnet_b{i}"), "classifier.1"
        )
        for i in range(5)
    },
}
ARCHS: tuple[str, ...] = tuple(_REGISTRY)


def _arch(name: str) -> _Arch:
    if name not in _REGISTRY:
        raise ValueError(f"unknown arch {name!r}; choose one of {', '.join(ARCHS)}")
    return _REGISTRY[name]


def build_model(arch: str = "small_resnet", **kwargs: Any) -> nn.Module:
    """Build ``arch`` with ``num_classes``, ``in_channels``, ``dropout``,
    ``stochastic_depth`` and ``small_input`` (``width``/``depth`` for small_resnet);
    the model's ``config`` holds these, arch included, for :func:`load_checkpoint`.

    Defaults follow each family's purpose: small_resnet is for tiny grey images
    (``in_channels=1``, ``small_input=True``), torchvision archs match their ImageNet
    weights (``in_channels=3``, ``small_input=False``); pass ``small_input=True`` for
    images of 64 px or less, so that the stem does not throw away most of the resolution."""
    return _arch(arch).build(**kwargs)


def head_name(model: nn.Module) -> str:
    """Module path of the classifier head (the final Linear) of a model built here."""
    return _arch(model.config["arch"]).head


def head(model: nn.Module) -> nn.Linear:
    """The classifier head: what is replaced when the number of classes changes."""
    return model.get_submodule(head_name(model))


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter outside the head: what is frozen or fine-tuned at a lower rate."""
    in_head = {id(p) for p in head(model).parameters()}
    return [p for p in model.parameters() if id(p) not in in_head]


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_checkpoint(
    model: nn.Module, classes: list[str] | None = None, image_size: int | None = None
) -> dict[str, Any]:
    """A checkpoint of plain tensors, numbers and strings, loadable with
    ``weights_only=True``; ``classes`` and ``image_size`` (the square side the model was
    trained on) let ``predict`` name its classes and refuse images that do not fit."""
    checkpoint: dict[str, Any] = {"config": dict(model.config), "state_dict": model.state_dict()}
    if classes is not None:
        checkpoint["classes"] = [str(c) for c in classes]
    if image_size is not None:
        checkpoint["image_size"] = int(image_size)
    return checkpoint


class CheckpointError(ValueError):
    """A file that is not a checkpoint of this project, or one whose stored model is outside
    what ``params.yaml`` allows; the message is one line naming the file."""


# What a checkpoint's archive may inflate to, read from its zip directory before torch.load
# allocates a byte of it: twice the largest model params.yaml allows (wide_resnet50_2 with
# 100,000 classes holds 1.01 GiB of float32 weights), so a small file declaring gigabytes of
# tensor storage, or a compression bomb, is refused instead of loaded.
MAX_CHECKPOINT_BYTES = 2 * 1024**3


def _check_archive(path: str) -> None:
    """Refuse a file that is not a zip archive (torch.save's format since torch 1.6; the
    legacy format allocates whatever sizes its pickle declares) or whose entries declare
    more than MAX_CHECKPOINT_BYTES."""
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(entry.file_size for entry in archive.infolist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as err:
        raise CheckpointError(
            f"{path}: not a torch checkpoint archive (torch.save writes a zip: {err})"
        ) from None
    if declared > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(
            f"{path}: its entries inflate to {declared} bytes; a checkpoint may hold at most "
            f"{MAX_CHECKPOINT_BYTES} (twice the largest model params.yaml allows)"
        )


def load_weights_only(path: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)``: tensors, numbers and strings, never code; a file
    holding anything else (a pickled model, a payload), or whose archive declares more
    than MAX_CHECKPOINT_BYTES, is refused in one line."""
    _check_archive(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()  # torch's bold for terminals
        first = text.splitlines()[0] if text else type(err).__name__
        raise CheckpointError(
            f"{path}: refused, it holds more than tensors and numbers (torch.load with "
            f"weights_only=True: {first})"
        ) from None
    except (RuntimeError, EOFError) as err:  # not a torch file, a truncated archive
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({err})") from None


def read_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint at ``path``, loaded without running code and its model config checked
    against the schema's bounds before anything is built, so a hostile or broken file can
    neither execute code nor allocate a model of gigabytes."""
    # Imported here: config imports this module for ARCHS.
    from noisy_student.config import check_checkpoint

    return check_checkpoint(load_weights_only(path, map_location), path)


def load_checkpoint(
    path: str, map_location: str | torch.device = "cpu", **noise: float
) -> nn.Module:
    """Rebuild a model from :func:`save_checkpoint`; ``noise`` may reset dropout and
    stochastic depth (they have no weights). Checkpoints without an arch are small_resnet."""
    ckpt = read_checkpoint(path, map_location)
    model = build_model(**{**ckpt["config"], **noise})
    load_weights(model, ckpt["state_dict"], path)
    return model


def load_weights(model: nn.Module, state: dict[str, Any], source: str) -> None:
    """``model.load_state_dict(state)``, with a file whose weights do not fit the model (a
    checkpoint of another width, keys missing) refused in one CheckpointError line naming
    ``source``, where torch raises a RuntimeError of one line per key."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [
        f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape
    ]
    problems = [
        f"{len(found)} {what} (first: {found[0]})"
        for what, found in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("tensors of another shape", reshaped),
        )
        if found
    ]
    if problems:
        config = model.config
        size = (
            f", width {config['width']:g}, depth {config['depth']:g}" if "width" in config else ""
        )
        raise CheckpointError(
            f"{source}: its weights do not fit the model ({config['arch']}{size}): "
            f"{'; '.join(problems)}"
        )
    model.load_state_dict(state)


def parameter_count(arch: str, width: float = 1.0, depth: float = 1.0) -> int:
    """Parameters of ``arch`` at a given size (10 classes, 3 channels), counted on the meta
    device so that comparing model sizes costs no memory or initialization time."""
    size = {"width": width, "depth": depth} if arch == "small_resnet" else {}
    with torch.device("meta"):
        return num_parameters(build_model(arch, num_classes=10, in_channels=3, **size))
