"""A run directory and the decisions read from it: where each step's files live, which
model teaches each student, whether a student is promoted, which model a run ends with.
Every step and every entry point (the CLI, DVC stages, Prefect tasks, MLflow records) asks
here, so these rules live in one place."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from noisy_student.config import Config, ConfigError, ModelSpec
from noisy_student.io import read_json

MODEL = "model.pt"
HISTORY = "history.csv"
METRICS = "metrics.json"
PSEUDO_LABELS = "pseudo_labels.parquet"
PER_CLASS = "per_class_accuracy.csv"
LOCK = ".noisy-student.lock"  # hidden: no step's output, no cached result lists it


class RunDirectoryBusy(RuntimeError):
    """Another command is writing into the same run directory (one line naming it)."""


@contextmanager
def hold(root: Path, command: str, shared: bool = False) -> Iterator[None]:
    """Hold the run directory's lock while ``command`` writes into it: exclusive for a
    command that may write any step's files, ``shared`` for the processes of one step that
    run side by side (the shards of one labeling, the machines of one training job). A
    second command on the same directory is refused at once, naming the first, instead of
    interleaving its files and MLflow records with the first's. The kernel drops the lock
    when its process ends, ``kill -9`` included, so a lock file left behind blocks nothing."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    with os.fdopen(fd, "r+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = handle.read().strip() or "another noisy-student command"
            raise RunDirectoryBusy(
                f"run directory {root} is in use by {holder}; wait for it to end, or give "
                "another --run-dir"
            ) from None
        handle.truncate(0)
        handle.write(f"`noisy-student {command}` (pid {os.getpid()})")
        handle.flush()
        yield


SPLITS = ("labeled", "unlabeled", "val", "test")


class NotYetRun(FileNotFoundError):
    """A file a step reads that no step has written yet: the message names the file and
    the command that writes it, so a step run out of order says which one to run first."""


@dataclass(frozen=True)
class RunLayout:
    """Where each step's files live inside a run directory. ``origin`` is the run
    directory's URL when ``root`` is a local copy of it (a step staged from s3://...)."""

    root: Path
    origin: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def identity(self) -> str:
        """Where the run lives, the same for every step: the URL of a staged copy, else
        the absolute path."""
        return self.origin or str(self.root.resolve())

    @property
    def splits(self) -> Path:
        return self.root / "splits"

    def model_dir(self, iteration: int) -> Path:
        """Iteration 0 is the teacher; iteration i >= 1 is student i."""
        return self.root / "models" / f"iter_{iteration}"

    def pseudo_dir(self, iteration: int) -> Path:
        """Pseudo-labels made by the model of ``iteration - 1`` for student ``iteration``."""
        return self.root / "pseudo" / f"iter_{iteration}"

    @property
    def report(self) -> Path:
        return self.root / "report"

    def require(self, *paths: Path) -> None:
        """Raise ``NotYetRun`` for the first of ``paths`` that does not exist, naming the
        step that writes it (a user who runs steps out of order, or reports on an
        unfinished run, learns what to run instead of reading a traceback)."""
        for path in paths:
            if not path.exists():
                raise NotYetRun(self._missing(Path(path)))

    def _missing(self, path: Path) -> str:
        rel = path.relative_to(self.root)
        shown = f"{self.origin.rstrip('/')}/{rel.as_posix()}" if self.origin else str(path)
        top, *rest = rel.parts
        iteration = rest[0].removeprefix("iter_") if rest else ""
        if top == "models":
            what = (
                "the teacher (iteration 0) has"
                if iteration == "0"
                else f"iteration {iteration} has"
            )
            return f"{what} no model ({shown}): run `noisy-student train --iteration {iteration}`"
        if top == "pseudo":
            return (
                f"student {iteration} has no pseudo-labels ({shown}): run "
                f"`noisy-student pseudo-label --iteration {iteration}`"
            )
        if top == "report":
            return f"the run has no report ({shown}): run `noisy-student report`"
        return f"the run has no splits ({shown}): run `noisy-student prepare`"


def check_iteration(cfg: Config, iteration: int, first: int = 0) -> None:
    """``iteration`` must name a model of the params, ``first`` or later (pseudo-labels
    are made for students only): otherwise a ConfigError naming ``--iteration``."""
    last = len(cfg.iterations)
    if first <= iteration <= last:
        return
    students = f"{_span(1, last)}: the students" if last else "no student"
    allowed = _span(first, last) if first <= last else "none"
    teacher = "0: the teacher" if first == 0 else "the teacher, 0, learns from labels only"
    raise ConfigError(
        f"--iteration {iteration}: allowed: {allowed} ({teacher}; {students} in the params' "
        "`iterations`)"
    )


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}..{last}"


def model_name(iteration: int, spec: ModelSpec) -> str:
    role = "teacher" if iteration == 0 else f"student-{iteration}"
    if spec.arch != "small_resnet":
        return f"{role} ({spec.arch})"
    return f"{role} (width x{spec.width:g}, depth x{spec.depth:g})"


def teacher_of(cfg: Config, layout: RunLayout, iteration: int) -> int:
    """The model that teaches student ``iteration``: the model named by
    ``iterations.<i>.teacher`` if it was promoted, else the model that taught it (a student
    that did not beat its teacher under ``student.promote: if_better`` teaches no one)."""
    check_iteration(cfg, iteration, first=1)
    named = cfg.iterations[iteration].teacher
    if named == 0:
        return 0
    layout.require(layout.model_dir(named) / METRICS)
    metrics = read_json(layout.model_dir(named) / METRICS)
    return named if metrics["promoted"] else metrics["teacher_iteration"]


def promotion(
    cfg: Config,
    layout: RunLayout,
    teacher_iteration: int | None,
    val_accuracy: float,
    val_loss: float,
) -> dict:
    """Whether the new model teaches the next iteration. The teacher (iteration 0) always
    does; a student under ``promote: if_better`` only when better on validation: higher
    accuracy, or the same accuracy (common on a small validation set) and a lower loss. An
    exact tie on both keeps the teacher: the student has not shown it is better."""
    if teacher_iteration is None:
        return {"teacher_iteration": None, "teacher_val_accuracy": None, "promoted": True}
    teacher = read_json(layout.model_dir(teacher_iteration) / METRICS)
    better = (val_accuracy, -val_loss) > (teacher["val_accuracy"], -teacher["val_loss"])
    return {
        "teacher_iteration": teacher_iteration,
        "teacher_val_accuracy": teacher["val_accuracy"],
        "promoted": better or cfg.student.promote == "always",
    }


def final_iteration(table: pd.DataFrame) -> int:
    """The model the run ends with: the last one promoted."""
    return int(table.loc[table["promoted"].astype(bool), "iteration"].max())
