"""Start a model from pretrained weights (our checkpoints, MLflow models, torchvision's
ImageNet weights) and choose what trains: everything, the head only, or the backbone at a
lower learning rate."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from noisy_student.config import check_checkpoint
from noisy_student.models import (
    CheckpointError,
    backbone_parameters,
    head,
    head_name,
    load_weights_only,
    read_checkpoint,
)

WEIGHTS_HOST = "download.pytorch.org"
PROBE_TIMEOUT_S = 3.0

Mode = Literal["scratch", "freeze", "finetune"]


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did with each tensor of the source."""

    source: str
    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)  # 3-channel weights summed to 1 channel
    skipped: dict[str, str] = field(default_factory=dict)  # source key -> why
    missing: list[str] = field(default_factory=list)  # model keys the source lacks
    head_replaced: bool = False

    def __str__(self) -> str:
        return (
            f"{self.source}: loaded {len(self.loaded)} tensors ({len(self.adapted)} adapted), "
            f"skipped {len(self.skipped)}, missing {len(self.missing)}, "
            f"head {'replaced' if self.head_replaced else 'loaded'}"
        )


def _reachable(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout`` seconds. The probe runs
    in a daemon thread because name resolution ignores socket timeouts and may hang."""
    opened: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(opened)


def _download_host() -> tuple[str, int]:
    """Where a download of the weights would connect first: the HTTPS proxy if one is set."""
    proxy = urllib.request.getproxies().get("https")
    if proxy and not urllib.request.proxy_bypass(WEIGHTS_HOST):
        parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        return parsed.hostname or WEIGHTS_HOST, parsed.port or 80
    return WEIGHTS_HOST, 443


def torchvision_weights(arch: str, name: str) -> torchvision.models.WeightsEnum:
    """torchvision's weights ``name`` for ``arch`` (nothing downloaded); ValueError naming
    the choices when ``arch`` has none of that name."""
    if arch not in torchvision.models.list_models():
        raise ValueError(f"arch {arch!r} has no torchvision weights; use a checkpoint instead")
    weights_enum = torchvision.models.get_model_weights(arch)
    try:
        weights = weights_enum[name]
    except KeyError:
        choices = ", ".join(["DEFAULT", *(w.name for w in weights_enum)])
        raise ValueError(f"{arch} has no torchvision weights {name!r}; choose {choices}") from None
    return weights


def _torchvision_state_dict(arch: str, name: str) -> dict[str, torch.Tensor]:
    """torchvision's weights ``name`` for ``arch``, from torch's hub cache or downloaded;
    fails within seconds, not at a network timeout, where the host cannot be reached."""
    weights = torchvision_weights(arch, name)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    message = (
        f"torchvision weights {arch}:{weights.name} are not in the torch hub cache ({cached}) "
        f"and cannot be downloaded here ({WEIGHTS_HOST} is not reachable). Download "
        f"{weights.url} on a machine with internet access and either copy it to {cached} "
        "(TORCH_HOME sets the cache) or pass the file's path as the source: a plain "
        "state_dict or a save_checkpoint file both load."
    )
    if not cached.exists() and not _reachable(*_download_host()):
        raise RuntimeError(message)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except OSError as error:  # URLError and HTTPError included
        raise RuntimeError(f"{message} ({error})") from error


def file_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"pretrained source {path!r} is not a file; expected a checkpoint path, "
            "'models:/name@alias', 'models:/name/version', 'runs:/<run_id>/model' "
            "or 'torchvision:<WEIGHTS>'"
        )
    data: Any = load_weights_only(path)
    if isinstance(data, dict) and "config" in data:  # a save_checkpoint file: check it
        data = check_checkpoint(data, path)["state_dict"]
    elif isinstance(data, dict) and "state_dict" in data:
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{path} holds neither a save_checkpoint dict nor a state_dict")
    return data


def _mlflow_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """The weights of the project checkpoint logged beside an MLflow model; the MLflow model
    itself is never loaded (its loader may unpickle code)."""
    # Imported here: MLflow takes seconds to import and only this source needs it.
    from noisy_student.inference import fetch_checkpoint

    with tempfile.TemporaryDirectory(prefix="noisy-student-pretrained-") as workdir:
        path = fetch_checkpoint(uri, workdir)
        try:
            return read_checkpoint(str(path))["state_dict"]
        except CheckpointError as err:
            raise CheckpointError(str(err).replace(str(path), f"{uri} ({path.name})")) from None


def _first_conv(model: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if isinstance(m, nn.Conv2d))


def load_pretrained(model: nn.Module, source: str | os.PathLike[str]) -> LoadReport:
    """Copy into ``model`` every tensor of ``source`` whose name and shape match.

    ``source``: a checkpoint path (``save_checkpoint`` format or a plain state_dict), an
    MLflow model URI (``models:/name@alias``, ``models:/name/3``, ``runs:/<id>/model``) or
    ``torchvision:<WEIGHTS>`` for the model's arch (e.g. ``torchvision:IMAGENET1K_V1``).
    A head for another number of classes is skipped, so the model keeps its own freshly
    initialised head; a 3-channel first conv is summed over its input channels for a
    1-channel model, which responds to a grey image as the original did to the same image
    in colour. Raises ValueError when nothing matches (a source for another arch).
    """
    source = os.fspath(source)
    if source.startswith("torchvision:"):
        state = _torchvision_state_dict(model.config["arch"], source.removeprefix("torchvision:"))
    elif source.startswith(("models:/", "runs:/")):
        state = _mlflow_state_dict(source)
    else:
        state = file_state_dict(source)
    report, copied = match_state(model, state, source)
    model.load_state_dict({**model.state_dict(), **copied})
    return report


def match_state(
    model: nn.Module, state: dict[str, torch.Tensor], source: str
) -> tuple[LoadReport, dict[str, torch.Tensor]]:
    """What :func:`load_pretrained` would copy from ``state`` into ``model`` (by name and
    shape; a model on the meta device will do, to check a source before a run)."""
    own = model.state_dict()
    head_keys = {f"{head_name(model)}.{k}" for k in head(model).state_dict()}
    first_conv = f"{_first_conv(model)}.weight"
    report = LoadReport(source, missing=[k for k in own if k not in state])
    copied: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        target = own.get(key)
        if target is None:
            report.skipped[key] = "not in model"
        elif value.shape == target.shape:
            copied[key] = value
        elif key in head_keys and value.shape[0] != target.shape[0]:
            report.skipped[key] = (
                f"classifier head: source has {value.shape[0]} classes, model {target.shape[0]}"
            )
            report.head_replaced = True
        elif (
            key == first_conv
            and value.shape[1] == 3
            and target.shape[1] == 1
            and value.shape[0] == target.shape[0]
            and value.shape[2:] == target.shape[2:]
        ):
            copied[key] = value.sum(dim=1, keepdim=True)
            report.adapted.append(key)
        else:
            report.skipped[key] = f"shape {tuple(value.shape)} != {tuple(target.shape)}"
    if not copied:
        raise ValueError(f"no tensor of {source} matches the model ({model.config['arch']})")
    report.loaded = list(copied)
    return report, copied


def optimizer_param_groups(
    model: nn.Module, mode: Mode, lr: float, backbone_lr_scale: float = 0.1
) -> list[dict[str, Any]]:
    """Parameter groups for a torch optimizer, and ``requires_grad`` set to match.

    "scratch": one group with everything at ``lr``; "freeze": the backbone stops
    training (call :func:`apply_freeze` after each ``model.train()``) and one group holds
    the head; "finetune": the backbone at ``lr * backbone_lr_scale``, so pretrained
    features are adjusted rather than overwritten, and the new head at ``lr``.
    """
    if mode not in ("scratch", "freeze", "finetune"):
        raise ValueError(f"mode must be 'scratch', 'freeze' or 'finetune', got {mode!r}")
    backbone = backbone_parameters(model)
    head_params = list(head(model).parameters())
    for p in backbone:
        p.requires_grad_(mode != "freeze")
    for p in head_params:
        p.requires_grad_(True)
    if mode == "scratch":
        return [{"params": backbone + head_params, "lr": lr, "name": "all"}]
    if mode == "freeze":
        return [{"params": head_params, "lr": lr, "name": "head"}]
    return [
        {"params": backbone, "lr": lr * backbone_lr_scale, "name": "backbone"},
        {"params": head_params, "lr": lr, "name": "head"},
    ]


def apply_freeze(model: nn.Module) -> nn.Module:
    """Put the BatchNorm layers of a frozen backbone in eval mode; call after
    ``model.train()``. Frozen weights alone are not enough: in train mode BatchNorm
    normalises with batch statistics and overwrites its running mean and variance, which
    would change the frozen features. A backbone that trains is left as it is."""
    if any(p.requires_grad for p in backbone_parameters(model)):
        return model
    in_head = set(head(model).modules())
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m not in in_head:
            m.eval()
    return model
