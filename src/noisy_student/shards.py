"""Pseudo-labeling as map/reduce, so a pool too large for one worker is labeled by many.

The map labels one shard, a contiguous slice of the unlabeled manifest, and writes its
part (the rows at or above the threshold; with balancing only each class's most confident
``balance``, since the global top-K of a class is the top-K of the shards' top-Ks) and its
per-class statistics (counts, exact confidence sums, hidden-label accuracy). The reduce
balances the union of the parts and writes the manifest students read, byte for byte the
one a single process writes: the shard count is how a run is executed, not what it
computes, so it is no parameter of the config.

A shard's statistics file is written after its part and marks it complete; it carries a
key (the pseudo-label params, the teacher's file hash, the pool's size) that the reduce
checks, so a part made by another teacher or other params is never merged.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from noisy_student.config import PseudoLabelConfig
from noisy_student.io import read_json, write_json, write_parquet
from noisy_student.pseudo_label import PROB, balance_classes, class_counts

SHARDS = "shards"  # sub-directory of a pseudo-label directory holding the parts
_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


class ShardError(ValueError):
    """A malformed shard spec, or a part the reduce cannot trust (names the shard)."""


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (0-based) of ``count`` equal contiguous slices of the pool."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ShardError(f"shard count must be >= 1, got {self.count}")
        if not 0 <= self.index < self.count:
            raise ShardError(
                f"shard index must be in 0..{self.count - 1} for {self.count} shards "
                f"(0-based), got {self.index}"
            )

    def rows(self, pool_size: int) -> tuple[int, int]:
        """[start, stop) of this shard's rows: sizes differ by at most one row."""
        return pool_size * self.index // self.count, pool_size * (self.index + 1) // self.count

    @property
    def name(self) -> str:
        return f"{self.index:05d}-of-{self.count:05d}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``"3/16"`` -> shard 3 of 16 (0-based index)."""
    match = _SPEC.match(text)
    if match is None:
        raise ShardError(f"shard {text!r}: expected INDEX/COUNT, e.g. 3/16 (0-based index)")
    try:
        return Shard(int(match[1]), int(match[2]))
    except ShardError as err:
        raise ShardError(f"shard {text!r}: {err}") from None


def part_path(directory: Path, shard: Shard) -> Path:
    return Path(directory) / SHARDS / f"part-{shard.name}.parquet"


def stats_path(directory: Path, shard: Shard) -> Path:
    return Path(directory) / SHARDS / f"stats-{shard.name}.json"


def read_rows(path: Path, start: int, stop: int, columns: list[str]) -> pd.DataFrame:
    """Rows [start, stop) of a parquet file, reading only the row groups that hold them, so
    a shard's memory follows the shard, not the pool."""
    file = pq.ParquetFile(path)
    groups, first, offset = [], None, 0
    for g in range(file.num_row_groups):
        size = file.metadata.row_group(g).num_rows
        if offset < stop and offset + size > start:
            groups.append(g)
            first = offset if first is None else first
        offset += size
    if not groups or start >= stop:
        return file.schema_arrow.empty_table().select(columns).to_pandas()
    table = file.read_row_groups(groups, columns=columns)
    return table.slice(start - first, stop - start).to_pandas()


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_key(params: PseudoLabelConfig, seed: int, teacher_md5: str, pool_size: int) -> str:
    """What a part depends on besides its slice: merged parts must all share it."""
    text = json.dumps(
        [params.model_dump(mode="json"), seed, teacher_md5, pool_size], sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _exact_sum(values: np.ndarray) -> int:
    """The sum of float32 values in [0, 1] as an integer count of 2**-160: exact, so
    sums over any split of the rows add up to the same total, bit for bit."""
    mantissa, exponent = np.frexp(values.astype(np.float32))
    mantissa = (mantissa.astype(np.float64) * 2**24).astype(np.int64)  # exact: 24 bits
    total = 0
    for e in np.unique(exponent):
        total += int(mantissa[exponent == e].sum()) << int(e + 160 - 24)
    return total


def shard_stats(
    manifest: pd.DataFrame, hidden: np.ndarray, num_classes: int, pool_rows: int
) -> dict[str, Any]:
    """Per-class statistics of the rows a shard kept (before any balancing)."""
    labels = manifest["label"].to_numpy(dtype=np.int64)
    scored = hidden >= 0
    correct = scored & (labels == hidden)
    confidence = manifest["confidence"].to_numpy()
    return {
        "pool_size": pool_rows,
        "above_threshold": class_counts(manifest, num_classes),
        "scored": np.bincount(labels[scored], minlength=num_classes).tolist(),
        "correct": np.bincount(labels[correct], minlength=num_classes).tolist(),
        "confidence_sum": [str(_exact_sum(confidence[labels == c])) for c in range(num_classes)],
    }


def top_per_class(manifest: pd.DataFrame, per_class: int) -> pd.DataFrame:
    """Each class's ``per_class`` most confident rows (ties: lower image id), pool order
    kept: all the reduce needs from a shard to balance exactly."""
    order = manifest.sort_values(["confidence", "image_id"], ascending=[False, True], kind="stable")
    kept = order.groupby("label", sort=False).head(per_class).index
    return manifest.loc[manifest.index.isin(kept)].reset_index(drop=True)


def write_shard(
    directory: Path,
    shard: Shard,
    part: pd.DataFrame,
    stats: dict[str, Any],
    key: str,
    rows: tuple[int, int],
    worker: dict[str, Any] | None = None,
) -> Path:
    """The part, then its statistics: a part without statistics is not complete."""
    write_parquet(part_path(directory, shard), part)
    record = {
        "shard": shard.index,
        "count": shard.count,
        "start": rows[0],
        "stop": rows[1],
        "key": key,
        "rows": len(part),
        "host": socket.gethostname(),
        **stats,
        **(worker or {}),
    }
    write_json(stats_path(directory, shard), record)
    return part_path(directory, shard)


def shard_counts(directory: Path) -> list[int]:
    """The shard counts of the statistics files present under ``directory``."""
    found = Path(directory / SHARDS).glob("stats-*-of-*.json")
    return sorted({int(p.stem.rsplit("-of-", 1)[1]) for p in found})


def read_shards(
    directory: Path, count: int, key: str, pool_size: int
) -> tuple[list[pd.DataFrame], list[dict[str, Any]]]:
    """Every part and statistics of ``count`` shards, checked: present, complete, made
    with ``key``, covering the pool. A problem is a ``ShardError`` naming the shard."""
    parts, stats = [], []
    for index in range(count):
        shard = Shard(index, count)
        stats_file, part_file = stats_path(directory, shard), part_path(directory, shard)
        if not stats_file.exists():
            raise ShardError(
                f"shard {shard}: missing (no {SHARDS}/{stats_file.name}); run it, then merge"
            )
        try:
            record = read_json(stats_file)
            part = pd.read_parquet(part_file)
        except (OSError, ValueError) as err:
            raise ShardError(
                f"shard {shard}: unreadable part or stats ({SHARDS}/{part_file.name}): "
                f"{str(err).splitlines()[0]}; run it again"
            ) from None
        problem = _shape_problem(record, stats[0] if stats else None)
        if problem:
            raise ShardError(
                f"shard {shard}: {SHARDS}/{stats_file.name} is not a shard's statistics "
                f"({problem}); run it again"
            )
        if record["key"] != key:
            raise ShardError(
                f"shard {shard}: made by another teacher or other pseudo_label params "
                f"({SHARDS}/{stats_file.name}); run it again"
            )
        if (record["start"], record["stop"]) != shard.rows(pool_size) or len(part) != record[
            "rows"
        ]:
            raise ShardError(f"shard {shard}: its part does not match its stats; run it again")
        parts.append(part)
        stats.append(record)
    return parts, stats


# What the reduce reads of a statistics file: a count, or one value per class.
_COUNTS = ("start", "stop", "rows", "pool_size")
_PER_CLASS = ("above_threshold", "scored", "correct", "confidence_sum")


def _shape_problem(record: Any, first: dict[str, Any] | None) -> str | None:
    """What makes ``record`` (a parsed statistics file) unfit for the reduce, if anything:
    valid JSON of another shape would otherwise fail inside it as a KeyError or TypeError.
    ``first``: the first shard's record, whose number of classes every shard shares."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, expected an object"
    if not isinstance(record.get("key"), str):
        return "no string 'key'"
    for name in _COUNTS:
        value = record.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"{name!r} is {value!r}, expected a count"
    for name in _PER_CLASS:
        values = record.get(name)
        # confidence_sum: exact integers as decimal strings (too large for JSON numbers)
        kind = str if name == "confidence_sum" else int
        if not isinstance(values, list) or not all(
            type(v) is kind and (kind is int or v.isdigit()) for v in values
        ):
            return f"{name!r} is not a list of per-class counts"
        classes = len((first or record)["above_threshold"])
        if len(values) != classes:
            return f"{name!r} has {len(values)} classes, expected {classes}"
    return None


def reduce_shards(
    parts: list[pd.DataFrame],
    stats: list[dict[str, Any]],
    num_classes: int,
    balance: int | None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The manifest and metrics of the whole pool from its shards' parts and statistics
    (in shard order): parts joined in pool order, then balanced when asked."""
    manifest = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    before = np.sum([s["above_threshold"] for s in stats], axis=0, dtype=np.int64)
    scored = sum(sum(s["scored"]) for s in stats)
    correct = sum(sum(s["correct"]) for s in stats)
    above = int(before.sum())
    confidence = sum(int(v) for s in stats for v in s["confidence_sum"])
    pool_size = sum(s["pool_size"] for s in stats)
    metrics = {
        "pool_size": pool_size,
        "num_above_threshold": above,
        "kept_fraction": above / pool_size,
        "pseudo_label_accuracy": correct / scored if scored else None,
        "mean_confidence": float(Fraction(confidence, above << 160)) if above else 0.0,
        "class_counts_before_balancing": before.tolist(),
    }
    if balance is not None:
        manifest = balance_classes(manifest, num_classes, balance)
    metrics["class_counts"] = class_counts(manifest, num_classes)
    metrics["num_pseudo_labeled"] = len(manifest)
    return manifest, metrics


def empty_manifest(mode: str, num_classes: int) -> pd.DataFrame:
    """A manifest with no rows and the columns and dtypes of a full one, so that joining it
    with others changes no dtype."""
    columns = {
        "image_id": np.zeros(0, np.int64),
        "label": np.zeros(0, np.int64),
        "confidence": np.zeros(0, np.float32),
    }
    if mode == "soft":
        columns |= {f"{PROB}{c}": np.zeros(0, np.float32) for c in range(num_classes)}
    return pd.DataFrame(columns)
