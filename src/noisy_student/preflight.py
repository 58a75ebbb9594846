"""Checks before any work that need the machine or the data, not only ``params.yaml``:
what a run would otherwise fail on minutes or hours later. Each failure is one
ConfigError line naming the key. The schema (``config.py``) checks the file itself; every
entry point (``noisy-student validate``, each CLI step, the Prefect flow) calls
:func:`preflight` after loading the config."""

from __future__ import annotations

from pathlib import Path

import torch

from noisy_student.config import Config, ConfigError
from noisy_student.data import ImageSet, load_images
from noisy_student.models import build_model
from noisy_student.pipeline import split


def check_device(cfg: Config) -> None:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device: 'cuda' but this machine has no usable CUDA device; allowed here: 'auto', 'cpu'"
        )


def check_data(cfg: Config) -> ImageSet:
    """The materialized dataset, and labeled/val/test counts every class can give."""
    root = Path(cfg.data.root)
    try:
        is_dir = root.is_dir()
    except OSError as err:  # a name too long for the file system, a folder not searchable
        raise ConfigError(f"data.root: {err.strerror}: {root}") from None
    if not is_dir:
        raise ConfigError(
            f"data.root: {root} does not exist; run `noisy-student data fetch` (or `dvc pull`) "
            "first, or point data.root at the materialized data"
        )
    try:
        data = load_images(cfg.data.source, root)
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.root: {err}") from None
    try:
        split(cfg, data)
    except ValueError as err:
        raise ConfigError(f"data.labeled_per_class: {err}") from None
    return data


def check_pretrained(cfg: Config, data: ImageSet) -> None:
    """Each ``pretrained`` source exists and fits its model: a file holds tensors of that
    architecture, an MLflow URI names a run holding a project checkpoint, torchvision
    weights of that name exist for the arch. Nothing is downloaded."""
    from noisy_student.transfer import file_state_dict, match_state, torchvision_weights

    for iteration in range(len(cfg.iterations) + 1):
        spec = cfg.spec(iteration)
        source = spec.pretrained
        if source is None:
            continue
        key = "teacher.pretrained" if iteration == 0 else f"iterations.{iteration}.pretrained"
        try:
            if source.startswith("torchvision:"):
                torchvision_weights(spec.arch, source.removeprefix("torchvision:"))
            elif source.startswith(("models:/", "runs:/")):
                from noisy_student.inference import checkpoint_exists

                checkpoint_exists(source)
            else:
                size = {"width": spec.width, "depth": spec.depth}
                with torch.device("meta"):  # shapes only: no memory, no initialization
                    model = build_model(
                        spec.arch,
                        num_classes=len(data.classes),
                        in_channels=data.images.shape[1],
                        small_input=data.images.shape[-1] <= 64,
                        **(size if spec.arch == "small_resnet" else {}),
                    )
                match_state(model, file_state_dict(source), source)
        except (OSError, ValueError, RuntimeError) as err:
            raise ConfigError(f"{key}: {err}") from None


def preflight(cfg: Config, data: bool = True) -> None:
    """Raise ConfigError (one line, naming the key) for what this machine or the data
    cannot give the run ``cfg``; ``data=False`` checks the machine only."""
    check_device(cfg)
    if data:
        check_pretrained(cfg, check_data(cfg))
