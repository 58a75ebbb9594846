"""Metrics and figures that show where a model errs and what its pseudo-labels look like,
for comparing iterations side by side in MLflow.

Pure functions of arrays; the figure writers draw on matplotlib's Agg canvas (no display,
no pyplot state) and write each PNG atomically, so a crash never leaves a half-written
image behind to be logged.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from noisy_student.io import atomic_path, write_bytes

FIGSIZE = (4.0, 4.0)  # inches; small PNGs keep logging fast
DPI = 80


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``num_classes x num_classes``: row = true class, column = predicted class."""
    labels, preds = np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    if labels.shape != preds.shape:
        raise ValueError(f"{labels.shape} labels but {preds.shape} predictions")
    if labels.size and min(labels.min(), preds.min()) < 0:
        raise ValueError("class indices must be >= 0")
    if labels.size and max(labels.max(), preds.max()) >= num_classes:
        raise ValueError(f"class indices must be < num_classes ({num_classes})")
    flat = np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def per_class_accuracy(matrix: np.ndarray) -> list[float | None]:
    """Recall of each class from a confusion matrix; None for a class with no images
    (JSON has no NaN)."""
    totals = matrix.sum(axis=1)
    return [float(matrix[c, c] / n) if n else None for c, n in enumerate(totals)]


def sample_rows(frame: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """At most ``n`` rows, a seeded sample in the frame's order when there are more, so the
    same run logs the same rows."""
    if len(frame) <= n:
        return frame
    return frame.sample(n, random_state=seed).sort_index()


# Why a pseudo-label accuracy can be "-", under every iteration table.
PSEUDO_LABEL_ACCURACY_NOTE = (
    "pseudo-label accuracy: the share of pseudo-labels that match the pool's known labels; "
    '"-" for the teacher (it learns from labels only) and where the source knows no label '
    "for its unlabeled images (imagefolder's unlabeled/, STL-10's unlabeled split)."
)


def labels_alone(table: pd.DataFrame) -> list[str]:
    """A sentence for each student that had no pseudo-label to learn from (its teacher
    kept none above the threshold), which a table of numbers alone does not say."""
    rows = table[(table["iteration"] > 0) & (table["num_pseudo_labeled"] == 0)]
    return [
        f"{row['model']}: 0 pseudo-labels above pseudo_label.threshold; it learned from the "
        f"{row['num_labeled']} labels alone."
        for row in rows.to_dict("records")
    ]


def markdown_table(frame: pd.DataFrame) -> str:
    """The table as GitHub markdown, floats to 4 decimals, missing values as ``-``."""
    cells = frame.astype(object).where(frame.notna(), None)  # tabulate marks only None missing
    return cells.to_markdown(index=False, floatfmt=".4f", missingval="-") + "\n"


def _save(fig: Figure, path: str | Path) -> None:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)


# Class names are the user's folder names, shown as they are: matplotlib would read
# `$x^2$` as mathtext (garbled) and fail the whole figure on `$\foo$` (a ValueError).
_PLAIN_TEXT = {"parse_math": False}


def _class_axis(ax: Axes, classes: Sequence[str], axis: str = "x") -> None:
    ticks = np.arange(len(classes))
    if axis == "x":
        rotation = 90 if len(classes) > 10 else 0
        ax.set_xticks(ticks, classes, rotation=rotation, fontsize=7, **_PLAIN_TEXT)
    else:
        ax.set_yticks(ticks, classes, fontsize=7, **_PLAIN_TEXT)


def write_confusion_matrix_png(
    path: str | Path, matrix: np.ndarray, classes: Sequence[str]
) -> None:
    """Counts shaded by row share, so a rare class's errors show as clearly as a common one's."""
    fig = Figure(figsize=FIGSIZE)
    ax = fig.subplots()
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    if len(classes) <= 20:
        for (row, col), count in np.ndenumerate(matrix):
            if count:
                color = "white" if share[row, col] > 0.5 else "black"
                ax.text(col, row, str(count), ha="center", va="center", fontsize=6, color=color)
    _class_axis(ax, classes, "x")
    _class_axis(ax, classes, "y")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    total = int(matrix.sum())
    accuracy = np.trace(matrix) / total if total else 0.0
    ax.set_title(f"test: {total} images, accuracy {accuracy:.4f}", fontsize=9)
    _save(fig, path)


def write_per_class_accuracy_png(
    path: str | Path, accuracy: Sequence[float | None], classes: Sequence[str]
) -> None:
    """One bar per class; a class with no images has no bar."""
    fig = Figure(figsize=FIGSIZE)
    ax = fig.subplots()
    ax.bar(np.arange(len(classes)), [np.nan if a is None else a for a in accuracy])
    _class_axis(ax, classes)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("test accuracy")
    ax.set_title("per-class accuracy (test)", fontsize=9)
    _save(fig, path)


def write_confidence_histogram_png(
    path: str | Path, confidence: np.ndarray, threshold: float
) -> None:
    """Teacher confidence of the kept pseudo-labels, with the threshold that cut the rest."""
    fig = Figure(figsize=FIGSIZE)
    ax = fig.subplots()
    ax.hist(np.asarray(confidence, dtype=np.float64), bins=20, range=(0.0, 1.0))
    ax.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold:g}")
    ax.legend(fontsize=7)
    ax.set_xlabel("confidence")
    ax.set_ylabel("pseudo-labels")
    ax.set_title(f"{len(confidence)} pseudo-labels", fontsize=9)
    _save(fig, path)


def write_class_counts_png(
    path: str | Path, before: Sequence[int], after: Sequence[int], classes: Sequence[str]
) -> None:
    """Pseudo-labels per class before and after balancing, side by side."""
    fig = Figure(figsize=FIGSIZE)
    ax = fig.subplots()
    x = np.arange(len(classes))
    ax.bar(x - 0.2, before, width=0.4, label="before balancing")
    ax.bar(x + 0.2, after, width=0.4, label="after balancing")
    _class_axis(ax, classes)
    ax.set_ylabel("pseudo-labels")
    ax.legend(fontsize=7)
    ax.set_title("pseudo-labels per class", fontsize=9)
    _save(fig, path)


def write_sample_grid_png(
    path: str | Path,
    images: np.ndarray,
    labels: Sequence[int],
    confidence: Sequence[float],
    classes: Sequence[str],
    columns: int = 8,
) -> None:
    """uint8 ``N x C x H x W`` images, each titled with its pseudo-label and confidence."""
    rows = max(1, -(-len(images) // columns))
    fig = Figure(figsize=(columns * 0.9, rows * 1.0))
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, image, label, conf in zip(axes, images, labels, confidence, strict=False):
        if image.shape[0] == 1:
            ax.imshow(image[0], cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(np.transpose(image, (1, 2, 0)))
        ax.set_title(f"{classes[int(label)]} {conf:.2f}", fontsize=6, **_PLAIN_TEXT)
    _save(fig, path)


def write_accuracy_by_iteration_png(path: str | Path, table: pd.DataFrame) -> None:
    """Validation, test and pseudo-label accuracy against iteration (0 = teacher); a student
    that was not promoted is circled in red."""
    fig = Figure(figsize=(5.0, 3.5))
    ax = fig.subplots()
    x = table["iteration"].to_numpy()
    for column, style in (
        ("val_accuracy", "o-"),
        ("test_accuracy", "s-"),
        ("pseudo_label_accuracy", "^--"),
    ):
        values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=np.float64)
        if np.isfinite(values).any():
            ax.plot(x, values, style, label=column.removesuffix("_accuracy").replace("_", " "))
    rejected = table[~table["promoted"].astype(bool)]
    if len(rejected):
        ax.scatter(
            rejected["iteration"],
            rejected["val_accuracy"],
            s=160,
            facecolors="none",
            edgecolors="red",
            label="not promoted",
        )
    ax.set_xticks(x)
    ax.set_xlabel("iteration (0 = teacher)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def write_report(
    out: str | Path, title: str, description: str, table: pd.DataFrame, figures: Mapping[str, str]
) -> None:
    """``report.md`` (figures as the PNG files beside it) and ``report.html``, one file with
    the figures embedded, so it can be mailed or opened from an artifact store as is.
    ``figures`` maps a PNG file name in ``out`` to its caption."""
    out = Path(out)
    notes = [*labels_alone(table), PSEUDO_LABEL_ACCURACY_NOTE]
    md = [f"# {title}", "", description, "", markdown_table(table), *notes, ""]
    page = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .5em}"
        "</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(description)}</p>",
        table.to_html(index=False, na_rep="-", float_format=lambda v: f"{v:.4f}", border=0),
        *(f"<p><small>{html.escape(note)}</small></p>" for note in notes),
    ]
    for name, caption in figures.items():
        md += [f"## {caption}", "", f"![{caption}]({name})", ""]
        encoded = base64.b64encode((out / name).read_bytes()).decode("ascii")
        page += [
            f"<h2>{html.escape(caption)}</h2>",
            f'<img alt="{html.escape(caption)}" src="data:image/png;base64,{encoded}">',
        ]
    page.append("</body></html>")
    write_bytes(out / "report.md", "\n".join(md).encode())
    write_bytes(out / "report.html", "\n".join(page).encode())
