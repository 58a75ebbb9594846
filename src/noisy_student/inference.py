"""Inference in one place: load a model without running any code from where it came from,
and classify image files the way the model saw images in training.

A model is only ever read from this project's checkpoint format (``save_checkpoint``:
tensors, numbers and strings, loaded with ``torch.load(weights_only=True)``, its config
checked against the schema's bounds before anything is built). For an MLflow URI that is
the run's ``checkpoint/model.pt`` artifact, logged beside the MLflow model ``model``;
MLflow's own loaders are never called: its PyTorch flavor unpickles a ``model.pth`` and a
pyfunc model imports a loader module, either of which runs whatever code the file holds,
so anyone able to write to a shared artifact store could run code on every machine that
predicts or trains from it. Anything else is refused with one line naming what was found.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from noisy_student.data.imagefolder import DECODE_ERRORS, decode_image
from noisy_student.models import CheckpointError, build_model, load_weights, read_checkpoint
from noisy_student.progress import track

if TYPE_CHECKING:
    import mlflow

CHECKPOINT_ARTIFACT = "checkpoint/model.pt"  # in every run that logs a model
MLFLOW_SCHEMES = ("models:/", "runs:/")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
GREY_MODES = {
    "1",
    "L",
    "LA",
    "La",
    "I",
    "I;16",
    "I;16B",
    "I;16L",
    "I;16N",
    "F",
}  # PIL modes of one-channel images
SHOWN_CLASSES = 20
SHOWN_FILES = 8
# The memory one predict batch may take (float input and activations, as
# :func:`bytes_per_image` estimates them): a larger --batch-size is shrunk to fit, and an
# image size of which a single image needs more (a checkpoint within the schema's bounds may
# record up to 4096 px) is refused before any image is decoded.
PREDICT_BATCH_BYTES = 1024**3


class ModelSourceError(ValueError):
    """A model source that cannot be loaded safely, or at all; one line naming it."""


class ImageMismatchError(ValueError):
    """Images whose channel count or size do not fit the model, and no flag to convert."""


@dataclass(frozen=True)
class InferenceModel:
    """A model that maps float ``N x C x H x W`` batches in [0, 1] to logits, with what its
    input must look like and, where recorded, its class names."""

    module: nn.Module
    in_channels: int
    size: int | None  # the square side it was trained on; None: not recorded (old files)
    classes: list[str] | None
    source: str

    def describe(self) -> str:
        """What the model takes and which classes it predicts, for the user to check."""
        side = f"{self.size}x{self.size}" if self.size else "any-size"
        head = f"{self.source}: {self.in_channels}-channel {side} images -> "
        n = self.module.config["num_classes"]
        if self.classes is None:
            return head + f"{n} classes, names not recorded (0..{n - 1}; --classes names them)"
        names = ", ".join(self.classes[:SHOWN_CLASSES])
        more = f", ... (+{n - SHOWN_CLASSES} more)" if n > SHOWN_CLASSES else ""
        return head + f"{n} classes: {names}{more}"


def _client() -> mlflow.MlflowClient:
    import mlflow  # here: it takes seconds to import, and only MLflow sources need it

    from noisy_student.tracking import tracking_uri

    return mlflow.MlflowClient(tracking_uri())


def _mlflow_message(err: Exception) -> str:
    text = getattr(err, "message", None) or str(err)
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def run_id_of(uri: str) -> str:
    """The run that logged the model ``uri`` names: ``runs:/<id>/...``, or the run of a
    registered version, ``models:/name@alias`` or ``models:/name/<version>``."""
    from mlflow.exceptions import MlflowException

    if uri.startswith("runs:/"):
        run_id = uri.removeprefix("runs:/").split("/")[0]
        if not run_id:
            raise ModelSourceError(f"{uri}: expected runs:/<run id>/model")
        return run_id
    name = uri.removeprefix("models:/")
    try:
        if "@" in name:
            name, alias = name.split("@", 1)
            version = _client().get_model_version_by_alias(name, alias)
        else:
            name, _, number = name.rpartition("/")
            if not name or not number.isdigit():
                raise ModelSourceError(
                    f"{uri}: expected models:/<name>@<alias> or models:/<name>/<version number>"
                )
            version = _client().get_model_version(name, number)
    except MlflowException as err:
        raise ModelSourceError(f"{uri}: {_mlflow_message(err)}") from None
    if not version.run_id:
        raise ModelSourceError(f"{uri}: version {version.version} was registered without a run")
    return version.run_id


def checkpoint_exists(uri: str) -> str:
    """The run id behind ``uri`` if that run holds the project checkpoint; ModelSourceError
    naming what it holds otherwise. Downloads nothing (the checks before a run use it)."""
    from mlflow.exceptions import MlflowException

    run_id = run_id_of(uri)
    client = _client()
    try:
        found = {a.path for a in client.list_artifacts(run_id, "checkpoint")}
        if CHECKPOINT_ARTIFACT in found:
            return run_id
        held = _artifact_files(client, run_id)
    except (MlflowException, OSError) as err:
        raise ModelSourceError(f"{uri}: run {run_id}: {_mlflow_message(err)}") from None
    shown = ", ".join(held[:SHOWN_FILES]) + (", ..." if len(held) > SHOWN_FILES else "")
    raise ModelSourceError(
        f"{uri}: run {run_id} has no {CHECKPOINT_ARTIFACT} (found: {shown or 'nothing'}); "
        "only this project's checkpoint is loaded, never a pickled or pyfunc model, which "
        "could run code"
    )


def _artifact_files(client: mlflow.MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    """Every artifact file of the run, to say what a run without a checkpoint holds."""
    files = []
    for item in client.list_artifacts(run_id, path):
        files += _artifact_files(client, run_id, item.path) if item.is_dir else [item.path]
    return sorted(files)


def fetch_checkpoint(uri: str, dst: str | Path) -> Path:
    """Download the project checkpoint of the run behind ``uri`` into ``dst``; refuse a run
    that has none (a model logged elsewhere, pickled or as a pyfunc)."""
    from mlflow.exceptions import MlflowException

    run_id = checkpoint_exists(uri)
    quiet = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # one file: no progress bar
    previous = {key: os.environ.get(key) for key in quiet}
    os.environ.update(quiet)
    try:
        return Path(_client().download_artifacts(run_id, CHECKPOINT_ARTIFACT, str(dst)))
    except (MlflowException, OSError) as err:
        raise ModelSourceError(f"{uri}: run {run_id}: {_mlflow_message(err)}") from None
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _listing(folder: Path, limit: int = 6) -> str:
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    shown = ", ".join(files[:limit]) + (
        f", ... (+{len(files) - limit})" if len(files) > limit else ""
    )
    return shown or "nothing"


def checkpoint_in_folder(folder: Path) -> Path:
    """The project checkpoint a folder holds: ``checkpoint/model.pt`` in it (a downloaded
    run), beside it when the folder is the run's MLflow model, or ``model.pt`` in it (a
    run directory's model folder)."""
    candidates = [folder / CHECKPOINT_ARTIFACT, folder / "model.pt"]
    if (folder / "MLmodel").is_file():
        candidates.insert(1, folder.parent / CHECKPOINT_ARTIFACT)
    for path in candidates:
        if path.is_file():
            return path
    raise ModelSourceError(
        f"{folder}: no noisy-student checkpoint ({CHECKPOINT_ARTIFACT} or model.pt) in or "
        f"beside this folder (found: {_listing(folder)}); a pickled model or a pyfunc "
        "loader is never loaded: it could run code"
    )


def checkpoint_path(source: str, workdir: str | Path) -> Path:
    """The local project checkpoint for ``source`` (a file, a folder, or an MLflow URI whose
    checkpoint is downloaded into ``workdir``)."""
    if source.startswith(MLFLOW_SCHEMES):
        return fetch_checkpoint(source, workdir)
    path = Path(source)
    if path.is_dir():
        return checkpoint_in_folder(path)
    if path.is_file():
        return path
    raise ModelSourceError(
        f"{source}: no such file or folder, nor an MLflow URI (models:/<name>@<alias>, "
        "models:/<name>/<version>, runs:/<run id>/model)"
    )


def _run_classes(uri: str) -> list[str] | None:
    """The class names logged beside a model (``classes.json`` of its run: JSON), if any."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    try:
        classes = mlflow.artifacts.load_dict(f"runs:/{run_id_of(uri)}/classes.json")
    except (MlflowException, OSError, ValueError):
        return None
    return [str(c) for c in classes] if isinstance(classes, list) else None


def load_inference_model(source: str) -> InferenceModel:
    """The model behind ``source`` (a checkpoint file, a folder holding one, or
    ``models:/name@alias``, ``models:/name/<version>``, ``runs:/<id>/model``), on the CPU,
    in eval mode; never anything but the project's checkpoint format."""
    with tempfile.TemporaryDirectory(prefix="noisy-student-model-") as workdir:
        path = checkpoint_path(source, workdir)
        try:
            checkpoint = read_checkpoint(str(path))
        except CheckpointError as err:
            raise CheckpointError(str(err).replace(str(path), f"{source} ({path.name})")) from None
    model = build_model(**checkpoint["config"])
    load_weights(model, checkpoint["state_dict"], source)
    classes = checkpoint.get("classes")
    if classes is None and source.startswith(MLFLOW_SCHEMES):
        classes = _run_classes(source)
    in_channels = int(checkpoint["config"].get("in_channels", 1))
    return InferenceModel(model.eval(), in_channels, checkpoint.get("image_size"), classes, source)


def image_files(paths: list[str]) -> tuple[list[Path], list[str]]:
    """Files named directly, and the image files under named folders (recursively, in a
    fixed order, hidden ones left out); plus the paths that do not exist."""
    files, missing = [], []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files += [
                f
                for f in sorted(path.rglob("*"), key=lambda f: f.as_posix())
                if f.is_file()
                and f.suffix.lower() in IMAGE_SUFFIXES
                and not any(p.startswith(".") for p in f.relative_to(path).parts)
            ]
        elif path.is_file():
            files.append(path)
        else:
            missing.append(name)
    return files, missing


def check_output(output: str | None) -> None:
    """Refuse an ``--output`` that cannot be written before any image is classified: a
    folder, a path under a file, a folder without write permission."""
    if output is None:
        return
    path = Path(output)
    if path.is_dir():
        raise ValueError(f"--output {output}: is a folder; name a CSV file (preds.csv)")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--output {output}: {parent} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise ValueError(f"--output {output}: {parent} is not writable ({err.strerror})") from None


def _fit(
    model: InferenceModel, files: list[Path], convert: bool, resize: bool
) -> tuple[list[Path], list[tuple[Path, str]], list[str]]:
    """Read each file's header (mode and size, no pixels): the files that can be
    classified, those that cannot be read, and warnings for those converted. Raises
    ImageMismatchError for images that do not fit the model unless a flag allows it."""
    kept, unreadable = [], []
    colour, grey, sized = [], [], []
    for path in files:
        try:
            with Image.open(path) as image:
                channels = 1 if image.mode in GREY_MODES else 3
                size = image.size
        except DECODE_ERRORS as err:
            unreadable.append((path, f"{type(err).__name__}: {err}".replace(str(path), path.name)))
            continue
        kept.append(path)
        if channels != model.in_channels:
            (colour if channels == 3 else grey).append(path)
        if model.size is not None and size != (model.size, model.size):
            sized.append(path)
    problems, warnings = [], []
    want = f"{model.in_channels}-channel"
    for found, label in ((colour, "colour (3-channel)"), (grey, "grey (1-channel)")):
        if found:
            text = f"{len(found)} {label} images for a {want} model (e.g. {found[0].name})"
            (warnings if convert else problems).append(text)
    if sized:
        text = (
            f"{len(sized)} images not {model.size}x{model.size}, the size the model was "
            f"trained on (e.g. {sized[0].name})"
        )
        (warnings if resize else problems).append(text)
    if problems:
        flags = [f for f, p in (("--convert", colour or grey), ("--resize", sized)) if p]
        raise ImageMismatchError(
            "; ".join(problems) + f": refused; {' and '.join(flags)} to convert them anyway "
            "(a model predicts nonsense with confidence on images unlike its training data)"
        )
    conversions = [f"{text}: converted" for text in warnings]
    return kept, unreadable, conversions


def bytes_per_image(model: InferenceModel) -> int:
    """The memory one image takes through ``model``: its float input plus three times the
    largest activation (a residual block holds its input, its branch and its output at
    once), measured on a twin of the model on the meta device: no memory, no compute."""
    with torch.device("meta"):
        twin = build_model(**model.module.config).eval()
    largest = 0

    def record(module: nn.Module, inputs: object, output: object) -> None:
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output.numel() * output.element_size())

    for module in twin.modules():
        module.register_forward_hook(record)
    with torch.inference_mode():
        image = torch.empty(1, model.in_channels, model.size, model.size, device="meta")
        twin(image)
    return image.numel() * image.element_size() + 3 * largest


def fitting_batch(model: InferenceModel, batch_size: int) -> int:
    """``batch_size``, or fewer images so that a batch stays under PREDICT_BATCH_BYTES;
    ValueError when not even one image fits."""
    per_image = bytes_per_image(model)
    fits = PREDICT_BATCH_BYTES // per_image
    if not fits:
        raise ValueError(
            f"{model.source}: one {model.size}x{model.size} image needs "
            f"{per_image // 2**20} MiB through this model, more than the "
            f"{PREDICT_BATCH_BYTES // 2**20} MiB predict allows for a batch"
        )
    return min(batch_size, fits)


def classify(
    model: InferenceModel,
    files: list[Path],
    batch_size: int = 256,
    convert: bool = False,
    resize: bool = False,
    warn: Callable[[str], None] = print,
) -> tuple[pd.DataFrame, list[tuple[Path, str]]]:
    """Classify ``files`` as the model saw images in training: PIL-decoded, grey or RGB to
    match its input channels, at its side, scaled to [0, 1]. Returns one row per image
    (path, class, class_index, confidence) and the ``(file, reason)`` skipped as
    unreadable. Images of another channel count or size are refused before any is
    classified unless ``convert`` / ``resize`` allow it (each conversion is warned of);
    a ``batch_size`` whose batch would exceed PREDICT_BATCH_BYTES is shrunk, with a warning."""
    names = model.classes
    if model.size is None:
        raise ValueError(f"{model.source}: records no image size; pass --size")
    fitting = fitting_batch(model, batch_size)
    kept, skipped, conversions = _fit(model, files, convert, resize)
    if fitting < batch_size:
        conversions.append(
            f"a batch of {batch_size} {model.size}x{model.size} images would exceed "
            f"{PREDICT_BATCH_BYTES // 2**20} MiB: {fitting} at a time"
        )
        batch_size = fitting
    for text in conversions:
        warn(f"WARNING: {text}")
    mode = "L" if model.in_channels == 1 else "RGB"
    rows = []
    for start in track(range(0, len(kept), batch_size), "classifying", unit="batch"):
        pixels, done = [], []
        for path in kept[start : start + batch_size]:
            decoded = decode_image(path, mode, model.size)  # as the imagefolder source decodes
            if isinstance(decoded, str):
                skipped.append((path, decoded))
            else:
                pixels.append(decoded)
                done.append(path)
        if not pixels:
            continue
        with torch.inference_mode():
            batch = torch.from_numpy(np.stack(pixels)).float().div_(255.0)
            probs = model.module(batch).float().softmax(dim=-1)
        confidence, index = probs.max(dim=-1)
        for path, i, conf in zip(done, index.tolist(), confidence.tolist(), strict=True):
            name = names[i] if names is not None else str(i)
            rows.append({"path": str(path), "class": name, "class_index": i, "confidence": conf})
    columns = ["path", "class", "class_index", "confidence"]
    return pd.DataFrame(rows, columns=columns), skipped


def with_size(model: InferenceModel, size: int | None) -> InferenceModel:
    """``model`` with the input side a user names for a checkpoint that records none; a
    side other than the recorded one is refused."""
    if size is None or size == model.size:
        return model
    if model.size is not None:
        raise ValueError(
            f"the model takes {model.size}x{model.size} images (recorded in its checkpoint)"
        )
    return InferenceModel(model.module, model.in_channels, size, model.classes, model.source)


def with_classes(model: InferenceModel, classes: list[str] | None) -> InferenceModel:
    """``model`` naming its outputs ``classes`` (None: keep the recorded names)."""
    if classes is None:
        return model
    n = model.module.config["num_classes"]
    if len(classes) != n:
        raise ValueError(f"{len(classes)} class names for a model with {n} outputs")
    return dataclasses.replace(model, classes=classes)
