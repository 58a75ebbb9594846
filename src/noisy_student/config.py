"""The one schema for ``params.yaml``: every parameter, its default and what it may be.

DVC reads ``params.yaml`` directly and Prefect passes overrides on top of it; both go
through :func:`load_config`, so an unknown key or a bad value is refused, naming the
key and what is allowed, before any work starts.
"""

from __future__ import annotations

import hashlib
import json
import re
import stat
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from noisy_student.data import SOURCES
from noisy_student.models import ARCHS, parameter_count


class ConfigError(ValueError):
    """Raised for an invalid ``params.yaml`` or override; the message lists every problem."""


# Model size bounds, for params.yaml and for a checkpoint's stored config alike: a
# small_resnet of width 8 and depth 4 has 39M parameters; beyond, pick a bigger arch.
MAX_WIDTH = 8.0
MAX_DEPTH = 4.0
MAX_CLASSES = 100_000
MAX_IMAGE_SIZE = 4096
# Bounds of every other number in params.yaml, sized for a 24 GiB, 2-core machine: each
# refuses a value that would exhaust memory or time before the first epoch (the batch plan
# of every epoch is drawn up front) or that no float arithmetic can carry.
MAX_EPOCHS = 10_000
MAX_ITERATIONS = 100
MAX_PER_CLASS = 100_000  # images or pseudo-labels of one class
MAX_PARAMS_IMAGE_SIZE = 512  # imagefolder images are held in memory at this side
MAX_BATCH = 8192
MAX_STEP_IMAGES = 65_536  # images a FixMatch step holds: labeled + two views of its pool share
MAX_LR = 1e30  # float arithmetic only: lr far above 1 diverges, which training reports
MAX_RATIO = 1000.0
MAX_WEIGHT = 100.0
MAX_MIX_ALPHA = 100.0
MAX_SEED = 2**32 - 1 - MAX_ITERATIONS  # seed + iteration seeds numpy, which takes < 2**32
# A registered model's name goes into MLflow search filters (name = '<name>') and into
# models:/<name>@<alias> URIs: letters, digits, '.', '_' and '-' only, so no quote changes
# a filter's meaning and no '/', ':' or '@' a URI's (MLflow refuses '/' and ':' itself, but
# only when registering, after the training). 200 characters leave room for the suffix the
# default name gets within MLflow's 256.
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")
MAX_EXPERIMENT_NAME = 500  # MLflow's own limit, checked only when the step creates it
MAX_PATH = 4096  # Linux's PATH_MAX: a longer path fails every file operation


def _no_nul(text: str) -> str:
    if "\x00" in text:
        raise ValueError("contains a NUL character, which no path or URI can hold")
    return text


# A path or model URI: the file operations that would fail on it later are refused here.
PathText = Annotated[str, Field(max_length=MAX_PATH), AfterValidator(_no_nul)]


class _Strict(BaseModel):
    # strict: a boolean is not a number (`epochs: true`), nor a string a number or a bool.
    # allow_inf_nan=False: `.inf` and `.nan` are no value of any parameter.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False
    )


class DataConfig(_Strict):
    source: Literal[tuple(SOURCES)] = Field(  # type: ignore[valid-type]
        "digits", description="dataset materialized under `root` by `noisy-student data fetch`"
    )
    root: PathText = Field("data", description="directory holding the materialized dataset")
    directory: PathText | None = Field(
        None, description="where `data fetch` reads the source (default per source)"
    )
    cache: PathText | None = Field(None, description="download cache (fashion_mnist fallback)")
    image_size: int = Field(
        32,
        ge=8,
        le=MAX_PARAMS_IMAGE_SIZE,
        description=f"imagefolder: side images are resized to, 8 to {MAX_PARAMS_IMAGE_SIZE} "
        "(the dataset is held in memory at this size)",
    )
    channels: Literal["RGB", "L"] = Field("RGB", description="imagefolder: colour or grey")
    extra: bool = Field(True, description="svhn: add the `extra` split to the unlabeled pool")
    unlabeled: bool = Field(True, description="stl10: add the 100k `unlabeled` split")
    follow_symlinks: bool = Field(
        False,
        description="imagefolder: follow symlinks leading outside the folder (refused and "
        "listed in skipped.json otherwise)",
    )
    hflip: bool = Field(False, description="random horizontal flips (not for digits or text)")
    labeled_per_class: int = Field(
        5,
        ge=1,
        le=MAX_PER_CLASS,
        description=f"labeled images per class (at most {MAX_PER_CLASS:_}) drawn from the "
        "training partition "
        "(imagefolder: only with cap_labeled)",
    )
    cap_labeled: bool = Field(
        False,
        description="imagefolder: keep labeled_per_class images of each labeled class, the "
        "rest joining the pool (reported with counts); false: the labeled folder is used whole",
    )
    val_per_class: int = Field(
        20,
        ge=1,
        le=MAX_PER_CLASS,
        description="validation images per class (unless the source has a val split)",
    )
    test_per_class: int = Field(
        40,
        ge=1,
        le=MAX_PER_CLASS,
        description="test images per class (unless the source has a test split)",
    )

    @property
    def labeled_limit(self) -> int | None:
        """Labeled images per class, or None for all: a user's own labeled folder is used
        whole unless a cap is asked for; benchmark sources always draw the budget."""
        if self.source == "imagefolder" and not self.cap_labeled:
            return None
        return self.labeled_per_class


class TrainConfig(_Strict):
    epochs: int = Field(
        40,
        ge=1,
        le=MAX_EPOCHS,
        description=f"epochs per model unless the model sets its own, at most {MAX_EPOCHS:_}",
    )
    batch_size: int = Field(64, ge=1, le=MAX_BATCH, description=f"at most {MAX_BATCH}")
    lr: float = Field(
        0.05,
        gt=0,
        le=MAX_LR,
        description="peak SGD learning rate (cosine decay); a diverging one stops training",
    )
    weight_decay: float = Field(5e-4, ge=0, le=1)
    val_every: int = Field(
        1,
        ge=1,
        le=MAX_EPOCHS,
        description="score validation every N epochs (and after the last one)",
    )
    sync_batchnorm: bool = Field(
        False,
        description="data-parallel training on several GPUs: batch-norm statistics over the "
        "global batch (SyncBatchNorm) instead of each GPU's share",
    )


class ModelSpec(_Strict):
    """One model of the loop: its architecture, size, and where its weights start."""

    arch: Literal[ARCHS] = Field(  # type: ignore[valid-type]
        "small_resnet", description="model family or torchvision architecture"
    )
    width: float = Field(
        1.0, gt=0, le=MAX_WIDTH, description="channel multiplier (small_resnet), at most 8"
    )
    depth: float = Field(
        1.0, gt=0, le=MAX_DEPTH, description="blocks-per-stage multiplier (small_resnet), at most 4"
    )
    epochs: int | None = Field(
        None, ge=1, le=MAX_EPOCHS, description=f"overrides train.epochs, at most {MAX_EPOCHS:_}"
    )
    pretrained: PathText | None = Field(
        None,
        description="initial weights: checkpoint path, MLflow model URI or torchvision:<WEIGHTS>",
    )
    transfer: Literal["scratch", "freeze", "finetune"] = Field(
        "scratch", description="freeze: train the new head only; finetune: low-lr backbone"
    )
    backbone_lr_scale: float = Field(0.1, gt=0, le=1, description="backbone lr / head lr")

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if self.transfer != "scratch" and self.pretrained is None:
            raise ValueError(f"transfer: {self.transfer!r} needs `pretrained` weights")
        if self.arch != "small_resnet" and (self.width, self.depth) != (1.0, 1.0):
            raise ValueError(
                f"width/depth: only small_resnet scales; {self.arch} needs width 1 and depth 1"
            )
        return self


class TeacherConfig(ModelSpec):
    augment: Literal["none", "weak", "classic", "strong"] = Field(
        "weak",
        description="teacher augmentation: none, weak (crop/flip), classic, or strong "
        "(RandAugment with teacher.randaugment_ops/magnitude, then crop/flip)",
    )
    # The teacher's own RandAugment and mixing keys, so a sweep of the students' noise
    # leaves the teacher (and its DVC stage) alone.
    randaugment_ops: int = Field(2, ge=0, le=14, description="RandAugment N of augment: strong")
    randaugment_magnitude: int = Field(
        5, ge=0, le=30, description="RandAugment M (0-30) of augment: strong"
    )
    cutmix_alpha: float = Field(
        0.0,
        ge=0,
        le=MAX_MIX_ALPHA,
        description="CutMix Beta(a, a) on a share teacher.mix_prob of the teacher's batches, "
        f"after its strong augmentation; 0: off, at most {MAX_MIX_ALPHA:g}",
    )
    method: Literal["supervised", "fixmatch"] = Field(
        "supervised",
        description="supervised: the labeled images only; fixmatch: the unlabeled pool too, "
        "its confident predictions on a weak view as targets for a strong view",
    )
    unlabeled_ratio: float = Field(
        7.0,
        gt=0,
        le=MAX_RATIO,
        description="fixmatch: pool images per labeled image in a step (mu); the step's "
        f"train.batch_size * (1 + 2 * mu) images at most {MAX_STEP_IMAGES:_}",
    )
    threshold: float = Field(
        0.95,
        ge=0,
        le=1,
        description="fixmatch: min confidence on the weak view for its class to be a target",
    )
    unlabeled_weight: float = Field(
        1.0,
        ge=0,
        le=MAX_WEIGHT,
        description=f"fixmatch: weight of the pool's loss (lambda_u), at most {MAX_WEIGHT:g}",
    )
    adaptive_threshold: bool = Field(
        False, description="fixmatch: FlexMatch's per-class thresholds, scaled by learning status"
    )
    ema_decay: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="fixmatch: moving average of the weights, per step, as the model kept; 0: off",
    )
    mix_prob: float = Field(
        0.5, ge=0, le=1, description="share of the teacher's batches mixed (cutmix_alpha > 0)"
    )

    @model_validator(mode="after")
    def _mix_needs_strong(self) -> TeacherConfig:
        if self.cutmix_alpha > 0 and self.augment != "strong":
            raise ValueError(
                f"cutmix_alpha: mixes on top of the strong augmentation, so it needs "
                f"augment: 'strong', got {self.augment!r}; allowed: 0 with {self.augment!r}"
            )
        return self

    @model_validator(mode="after")
    def _consistency(self) -> TeacherConfig:
        if self.method == "fixmatch" and self.augment != "weak":
            raise ValueError(
                f"augment: method 'fixmatch' takes its labeled batch and weak view from "
                f"augment, which must be 'weak', got {self.augment!r} (its strong view is "
                f"RandAugment with noise.randaugment_ops/magnitude)"
            )
        if self.method == "supervised":
            if self.adaptive_threshold:
                raise ValueError(
                    "adaptive_threshold: thresholds the pool's pseudo-labels, so it needs "
                    "method: 'fixmatch'; allowed with 'supervised': false"
                )
            if self.ema_decay > 0:
                raise ValueError(
                    f"ema_decay: averages the weights of method 'fixmatch' only, got "
                    f"{self.ema_decay} with method: 'supervised'; allowed: 0"
                )
        return self


class NoiseConfig(_Strict):
    """Noise applied to students only; the teacher is never noised."""

    randaugment_ops: int = Field(2, ge=0, le=14, description="RandAugment N")
    randaugment_magnitude: int = Field(5, ge=0, le=30, description="RandAugment M (0-30)")
    dropout: float = Field(0.3, ge=0, lt=1, description="dropout before the classifier")
    stochastic_depth: float = Field(
        0.2, ge=0, lt=1, description="drop probability of the last residual block"
    )
    cutmix_alpha: float = Field(
        0.0,
        ge=0,
        le=MAX_MIX_ALPHA,
        description=f"CutMix Beta(a, a); 0: off, at most {MAX_MIX_ALPHA:g}",
    )
    mixup_alpha: float = Field(
        0.0,
        ge=0,
        le=MAX_MIX_ALPHA,
        description=f"MixUp Beta(a, a); 0: off, at most {MAX_MIX_ALPHA:g}",
    )
    mix_prob: float = Field(0.5, ge=0, le=1, description="share of batches mixed")


class StudentConfig(_Strict):
    """How students learn from the labeled and pseudo-labeled images."""

    unlabeled_ratio: float | None = Field(
        None,
        gt=0,
        le=MAX_RATIO,
        description="pseudo-labeled per labeled image in each batch (null: shuffle)",
    )
    distillation: Literal["none", "offline", "online"] = Field(
        "none",
        description="none: cross-entropy on all targets; offline: alpha-weighted CE + KD on "
        "stored soft labels; online: KD on the teacher's logits for each clean batch",
    )
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the hard-label loss")
    finetune_epochs: int = Field(
        0, ge=0, le=MAX_EPOCHS, description="final epochs on labeled images only"
    )
    finetune_lr_scale: float = Field(0.1, gt=0, le=1, description="fine-tune lr / train.lr")
    allow_smaller: bool = Field(False, description="allow students smaller than their teacher")
    init: Literal["scratch", "teacher"] = Field(
        "scratch",
        description="scratch: students start from random weights; teacher: from their "
        "teacher's weights (same architecture and size), fewer epochs for the same accuracy",
    )
    promote: Literal["always", "if_better"] = Field(
        "if_better",
        description="if_better: a student that does not beat its teacher on validation (higher "
        "accuracy, or equal accuracy and lower loss; an exact tie on both is not a win) does "
        "not teach the next iteration (its teacher goes on teaching); always: every student does",
    )


class PseudoLabelConfig(_Strict):
    mode: Literal["hard", "soft"] = Field("soft", description="one-hot or full distribution")
    temperature: float = Field(
        1.0,
        ge=0.01,
        le=100,
        description="softmax temperature for soft labels, 0.01 to 100 (below, logits / T overflow)",
    )
    threshold: float = Field(0.5, ge=0, le=1, description="min teacher confidence to keep")
    balance: int | None = Field(
        None,
        ge=1,
        le=MAX_PER_CLASS,
        description=f"pseudo-labels per class after balancing, at most {MAX_PER_CLASS:_} (a "
        "class with fewer is duplicated up to it); null: no balancing",
    )
    batch_size: int = Field(512, ge=1, le=MAX_BATCH, description=f"at most {MAX_BATCH}")
    tta: Literal["none", "hflip"] = Field(
        "none", description="label with probabilities averaged over each image and its mirror"
    )


class IterationConfig(ModelSpec):
    teacher: int = Field(
        ge=0, le=MAX_ITERATIONS, description="iteration whose model labels the pool (i - 1)"
    )


class TrackingConfig(_Strict):
    experiment: str = Field(
        "noisy-student",
        min_length=1,
        max_length=MAX_EXPERIMENT_NAME,
        description=f"MLflow experiment, at most {MAX_EXPERIMENT_NAME} characters",
    )
    registered_model: str = Field(
        "noisy-student",
        min_length=1,
        description="MLflow registered model (the default gets -<source>-<task> appended): "
        "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 200 "
        "characters",
    )

    @field_validator("registered_model")
    @classmethod
    def _safe_model_name(cls, name: str) -> str:
        """Refused here, before any work: a name MLflow would refuse after the training, or
        one that would change the meaning of a search filter or a models:/ URI."""
        if not MODEL_NAME_PATTERN.fullmatch(name):
            raise ValueError(
                f"{name!r}: it names MLflow searches and models:/<name>@<alias> URIs; "
                "allowed: letters, digits, '.', '_' and '-', starting with a letter or digit, "
                "at most 200 characters"
            )
        return name


def _describe(spec: ModelSpec) -> str:
    return f"{spec.arch}, width {spec.width:g}, depth {spec.depth:g}"


def _size(spec: ModelSpec) -> tuple[str, float, float]:
    return spec.arch, spec.width, spec.depth


def _smaller(student: ModelSpec, teacher: ModelSpec) -> bool:
    """Same family: a smaller width or depth; across families: fewer parameters."""
    if student.arch == teacher.arch:
        return student.width < teacher.width or student.depth < teacher.depth
    return parameter_count(student.arch, student.width, student.depth) < parameter_count(
        teacher.arch, teacher.width, teacher.depth
    )


def _iteration_number(key: Any) -> int | None:
    """The iteration a key of ``iterations`` reads as ("1", " 01", 1 from Python code: 1),
    None for none ("1.0", "one", True)."""
    if type(key) is int:  # noqa: E721 - True is no iteration
        return key
    found = re.fullmatch(r"\s*\+?([0-9]{1,6})\s*", key) if isinstance(key, str) else None
    return int(found.group(1)) if found else None


def _spelling_refused(key: Any) -> str:
    return (
        f"key {key!r}: DVC's stages use the key's text in their paths; allowed: "
        f"'1' to '{MAX_ITERATIONS}', without leading zeros, spaces or signs"
    )


def _default_iterations() -> dict[int, IterationConfig]:
    return {
        1: IterationConfig(teacher=0, width=1.0, depth=1.0),
        2: IterationConfig(teacher=1, width=1.5, depth=1.0),
    }


class Config(_Strict):
    seed: int = Field(
        0,
        ge=0,
        le=MAX_SEED,
        description=f"0 to {MAX_SEED} (seed + iteration seeds numpy, which takes < 2**32)",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    teacher: TeacherConfig = TeacherConfig()
    noise: NoiseConfig = NoiseConfig()
    pseudo_label: PseudoLabelConfig = PseudoLabelConfig()
    student: StudentConfig = StudentConfig()
    iterations: dict[int, IterationConfig] = Field(
        default_factory=_default_iterations,
        description=f"students 1..N (at most {MAX_ITERATIONS}), keyed by the quoted number "
        "DVC's foreach needs: '1', '2', ...",
    )
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("iterations", mode="before")
    @classmethod
    def _numbered_keys(cls, value: Any) -> Any:
        """Keys arrive as the quoted strings DVC needs ("1"): each becomes its number. Two
        spellings of one number are refused, naming both, as is any spelling but the number
        itself ("01", " 1"): DVC's foreach writes the key's text into the stage's paths
        (iter_01) where the step writes iter_1, so the stage would fail after its work."""
        if not isinstance(value, dict):
            return value  # pydantic names the type
        spelled: dict[int, Any] = {}
        for key in value:
            number = _iteration_number(key)
            if number is None:
                raise ValueError(_spelling_refused(key))
            if number in spelled:
                raise ValueError(
                    f"keys {spelled[number]!r} and {key!r} are both iteration {number}; keep one"
                )
            spelled[number] = key
        for number, key in spelled.items():
            if not (type(key) is int or key == str(number)):  # noqa: E721 - True is no key
                raise ValueError(_spelling_refused(key))
        return {number: value[key] for number, key in spelled.items()}

    @model_validator(mode="after")
    def _check_loop(self) -> Config:
        keys = sorted(self.iterations)
        if keys != list(range(1, len(keys) + 1)):
            raise ValueError(f"iterations: keys must be 1..N in order, got {keys}")
        if len(keys) > MAX_ITERATIONS:
            raise ValueError(f"iterations: at most {MAX_ITERATIONS}, got {len(keys)}")
        for key in keys:
            spec, teacher = self.iterations[key], self.spec(key - 1)
            if spec.teacher != key - 1:
                raise ValueError(
                    f"iterations.{key}.teacher: must be {key - 1} (the previous iteration)"
                    f", got {spec.teacher}"
                )
            if not self.student.allow_smaller and _smaller(spec, teacher):
                raise ValueError(
                    f"iterations.{key}: a student must be equal to or larger than its teacher "
                    f"({_describe(teacher)}), got {_describe(spec)}; set "
                    "student.allow_smaller: true to distill into a smaller model"
                )
            same = _size(spec) == _size(teacher) and spec.pretrained is None
            if self.student.init == "teacher" and not same:
                raise ValueError(
                    f"student.init: 'teacher' copies the teacher's weights, so "
                    f"iterations.{key} must be {_describe(teacher)} without `pretrained`, "
                    f"got {_describe(spec)}; allowed: 'scratch' for students that grow"
                )
        step_images = self.train.batch_size * (1 + 2 * self.teacher.unlabeled_ratio)
        if self.teacher.method == "fixmatch" and step_images > MAX_STEP_IMAGES:
            raise ValueError(
                f"teacher.unlabeled_ratio: a FixMatch step holds train.batch_size * (1 + 2 * "
                f"unlabeled_ratio) = {step_images:g} images; allowed: at most {MAX_STEP_IMAGES:_}"
            )
        if self.pseudo_label.tta == "hflip" and not self.data.hflip:
            raise ValueError(
                "pseudo_label.tta: 'hflip' assumes labels survive a horizontal flip, which "
                "data.hflip: false denies (digits, text); allowed: 'none', or set data.hflip: true"
            )
        mixing = self.noise.cutmix_alpha > 0 or self.noise.mixup_alpha > 0
        if self.student.distillation == "online" and mixing:
            raise ValueError(
                "student.distillation: 'online' scores the clean batch, so it cannot be "
                "combined with noise.cutmix_alpha or noise.mixup_alpha > 0"
            )
        return self

    def spec(self, iteration: int) -> ModelSpec:
        """The teacher's spec for iteration 0, student ``iteration``'s otherwise."""
        return self.teacher if iteration == 0 else self.iterations[iteration]

    def epochs_for(self, iteration: int) -> int:
        return self.spec(iteration).epochs or self.train.epochs

    def fingerprint(self) -> str:
        """Short hash of the resolved config, for lineage tags and run names."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def _allowed_keys(loc: tuple[Any, ...], root: type[BaseModel]) -> list[str]:
    """Field names allowed at the parent of ``loc``, for unknown-key messages."""
    model: Any = root
    for part in loc[:-1]:
        if isinstance(part, int):  # a key of ``iterations``
            continue
        model = IterationConfig if part == "iterations" else model.model_fields[part].annotation
    return (
        list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []
    )


def _format(error: ValidationError, source: str, root: type[BaseModel] | None = None) -> str:
    """One line per problem, naming the key; a single problem fits on one line."""
    lines = []
    for err in error.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(loc, root or Config))
            lines.append(f"{key}: unknown key; allowed keys here: {allowed}")
        elif err["type"] == "value_error":
            message = err["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {message}" if loc else message)
        else:
            shown = repr(err.get("input"))
            shown = shown if len(shown) <= 80 else f"{shown[:60]}... ({len(shown)} characters)"
            lines.append(f"{key}: {err['msg']} (got {shown})")
    if len(lines) == 1:
        return f"invalid parameters in {source}: {lines[0]}"
    return "\n  ".join([f"invalid parameters in {source}:", *lines])


# A params file is a few KiB; reading is capped so an endless one (/dev/zero) or a huge
# one is refused without being read whole.
MAX_PARAMS_BYTES = 1 << 20


class _ParamsLoader(yaml.SafeLoader):
    """``yaml.safe_load`` as DVC reads ``params.yaml``: a duplicate key is an error (DVC
    refuses the file), and ``1e-3`` is a float (YAML 1.2), not the string YAML 1.1 makes.
    An alias (``*name``) is refused: parameters are plain values, and nested aliases
    expand exponentially ("billion laughs") in whatever walks the values."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None,
                None,
                f"alias *{event.anchor}: aliases are not allowed in params; write the value out",
                event.start_mark,
            )
        return super().compose_node(parent, index)


def _no_duplicates(loader: _ParamsLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if not isinstance(key, Hashable):  # a list or mapping as a key: PyYAML names it
            break
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (DVC refuses it too; keep one)", mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_ParamsLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)
_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _read_capped(path: Path) -> str:
    """The text of the regular file ``path``, refused unread when it is a folder, a device
    or a pipe (which could block or never end), or larger than ``MAX_PARAMS_BYTES``."""
    try:
        mode, size = (info := path.stat()).st_mode, info.st_size
        if stat.S_ISDIR(mode):
            raise ConfigError(f"{path}: is a folder; --params takes a YAML file (params.yaml)")
        if not stat.S_ISREG(mode):
            raise ConfigError(
                f"{path}: not a regular file (a device, pipe or socket); --params takes a "
                "YAML file (params.yaml)"
            )
        too_large = f"{path}: larger than {MAX_PARAMS_BYTES} bytes; a params file is a few KiB"
        if size > MAX_PARAMS_BYTES:
            raise ConfigError(too_large)
        with path.open("rb") as stream:
            data = stream.read(MAX_PARAMS_BYTES + 1)  # the file may have grown since
        if len(data) > MAX_PARAMS_BYTES:
            raise ConfigError(too_large)
        return data.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such params file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot be read ({err})") from None


def read_params_file(path: str | Path) -> Any:
    """The parsed YAML of ``path``; any problem (a folder, a device or pipe, a file over
    1 MiB, no such file, a syntax error, a tab indenting, a duplicate key, an alias) is
    one ConfigError line naming the file (and the line and column)."""
    path = Path(path)
    text = _read_capped(path)
    try:
        return yaml.load(text, Loader=_ParamsLoader) or {}
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = " ".join(filter(None, (err.context, err.problem)))
        if "\t" in problem or "'\\t'" in problem:
            problem += " (a tab: indent YAML with spaces)"
        kind = "" if problem.startswith("duplicate key") else "YAML error: "
        raise ConfigError(f"{where}: {kind}{problem}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: YAML error: {err}") from None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


def load_config(
    path: str | Path | None = "params.yaml",
    overrides: dict[str, Any] | None = None,
    max_iterations: int | None = None,
) -> Config:
    """Read ``params.yaml`` (or the defaults when ``path`` is None), apply dotted overrides
    such as ``{"train.epochs": 1}``, keep the first ``max_iterations`` students, validate."""
    raw: dict[str, Any] = Config().model_dump(mode="json")
    source = "defaults"
    if path is not None:
        source = str(path)
        raw = read_params_file(path)
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level")
    iterations = raw.get("iterations")
    bare = [k for k in iterations if not isinstance(k, str)] if isinstance(iterations, dict) else []
    if bare:
        raise ConfigError(
            f"{source}: iterations: quote the keys ({', '.join(f'{k!r}' for k in bare)} -> "
            f"{', '.join(f'{str(k)!r}' for k in bare)}); DVC's foreach skips unquoted numeric keys"
        )
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    if max_iterations is not None:
        if max_iterations < 0:
            raise ConfigError(f"iterations: must be >= 0, got {max_iterations}")
        if isinstance(raw.get("iterations"), dict):  # else the schema names what it is
            raw["iterations"] = {
                key: spec
                for key, spec in raw["iterations"].items()
                # a key of no number stays, for the schema to refuse
                if (number := _iteration_number(key)) is None or number <= max_iterations
            }
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format(err, source)) from None


class CheckpointModel(_Strict):
    """A checkpoint's stored model config (``models.save_checkpoint``), held to the bounds of
    ``params.yaml`` before any model is built from it."""

    arch: Literal[ARCHS] = "small_resnet"  # type: ignore[valid-type]
    num_classes: int = Field(ge=2, le=MAX_CLASSES)
    in_channels: Literal[1, 3] = 1
    width: float = Field(1.0, gt=0, le=MAX_WIDTH)
    depth: float = Field(1.0, gt=0, le=MAX_DEPTH)
    dropout: float = Field(0.0, ge=0, lt=1)
    stochastic_depth: float = Field(0.0, ge=0, lt=1)
    small_input: bool = True

    @model_validator(mode="after")
    def _scales_small_resnet_only(self) -> CheckpointModel:
        if self.arch != "small_resnet" and (self.width, self.depth) != (1.0, 1.0):
            raise ValueError(f"width/depth: only small_resnet scales; {self.arch} has 1 and 1")
        return self


CHECKPOINT_KEYS = ("config", "state_dict", "classes", "image_size")


def check_checkpoint(checkpoint: Any, path: str) -> dict[str, Any]:
    """``checkpoint`` (as ``torch.load`` returned it) if it is one of this project's, its
    model config within the schema's bounds; else a one-line ValueError naming ``path``.
    Old checkpoints lack ``arch``/``small_input`` (small_resnet, small input): kept so."""
    from noisy_student.models import CheckpointError

    if not isinstance(checkpoint, dict) or not {"config", "state_dict"} <= set(checkpoint):
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(
            f"{path}: not a noisy-student checkpoint (a dict with 'config' and 'state_dict'), "
            f"found {found}"
        )
    unknown = sorted(str(k) for k in checkpoint if k not in CHECKPOINT_KEYS)
    if unknown:
        raise CheckpointError(
            f"{path}: unknown checkpoint key {', '.join(unknown)}; allowed: "
            f"{', '.join(CHECKPOINT_KEYS)}"
        )
    config = checkpoint["config"]
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: config is a {type(config).__name__}, not a mapping")
    try:
        CheckpointModel.model_validate(config)
    except ValidationError as err:
        message = _format(err, f"{path} (its model config)", CheckpointModel)
        raise CheckpointError(" ".join(message.split())) from None
    state = checkpoint["state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{path}: state_dict is not a mapping of names to tensors")
    classes = checkpoint.get("classes")
    if classes is not None and (
        not isinstance(classes, list)
        or not all(isinstance(c, str) for c in classes)
        or len(classes) != config["num_classes"]
    ):
        raise CheckpointError(
            f"{path}: classes must be {config['num_classes']} names (num_classes)"
        )
    size = checkpoint.get("image_size")
    if size is not None and (
        type(size) is not int or not 1 <= size <= MAX_IMAGE_SIZE  # noqa: E721 - bool is no size
    ):
        raise CheckpointError(f"{path}: image_size must be an int in 1..{MAX_IMAGE_SIZE}")
    return checkpoint
