"""Does the embedded default (``params.yaml``: digits, ``make run``) show a gain on any seed?
The whole loop per seed, the teacher's and the final model's test accuracy, and the mean
and spread of the gain over the seeds.

    python benchmarks/default_seeds.py --seeds 0 1 2 3 4 --jobs 2 --threads 1
    python benchmarks/default_seeds.py --set train.epochs=2 --seeds 0 --limit 1

Each seed runs in its own process (``--jobs`` at once, ``--threads`` torch threads each),
through the library's steps (``pipeline.run_all``), exactly as ``make run`` runs them
with ``seed: k``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
import yaml

from noisy_student import pipeline
from noisy_student.config import Config, load_config
from noisy_student.data import fetch
from noisy_student.runs import RunLayout, final_iteration

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs, values read as YAML (``null``, numbers, strings)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected key=value")
        out[key] = yaml.safe_load(value)
    return out


def _threads(count: int) -> None:
    torch.set_num_threads(count)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")


def run_seed(cfg: Config, work: Path) -> dict[str, Any]:
    """The whole loop for ``cfg``: teacher and final model's accuracy, the loop's time."""
    start = time.perf_counter()
    table = pipeline.run_all(cfg, RunLayout(work / f"seed-{cfg.seed}"))
    seconds = time.perf_counter() - start
    teacher = table.iloc[0]
    final = table.set_index("iteration").loc[final_iteration(table)]
    return {
        "seed": cfg.seed,
        "teacher_val": float(teacher.val_accuracy),
        "teacher_test": float(teacher.test_accuracy),
        "final_model": str(final.model),
        "final_val": float(final.val_accuracy),
        "final_test": float(final.test_accuracy),
        "gain": float(final.test_accuracy - teacher.test_accuracy),
        "seconds": seconds,
    }


def _mean_sd(values: list[float], sign: str = "") -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{sign}.4f} ± {sd:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=PARAMS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--set", action="append", default=[], help="override key=value")
    parser.add_argument("--limit", type=int, default=None, help="keep the first N students")
    parser.add_argument("--jobs", type=int, default=2, help="seeds run at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per seed")
    parser.add_argument("--data-root", type=Path, default=None, help="default: a temp folder")
    args = parser.parse_args()

    overrides = parse_sets(args.set)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_root or Path(tmp) / "data"
        base = overrides | {"data.root": str(root)}
        configs = [
            load_config(args.params, base | {"seed": seed}, max_iterations=args.limit)
            for seed in args.seeds
        ]
        first = configs[0]
        fetch(first.data.source, root)
        print(
            f"{first.data.source}, {first.data.labeled_per_class} labels per class, "
            f"{len(first.iterations)} student(s), seeds {args.seeds}, {args.jobs} at once, "
            f"{args.threads} torch thread(s) each"
            + (f", overrides {overrides}" if overrides else ""),
            flush=True,
        )
        start = time.perf_counter()
        pool = ProcessPoolExecutor(
            args.jobs,
            mp_context=get_context("spawn"),
            initializer=_threads,
            initargs=(args.threads,),
        )
        with pool:
            futures = [pool.submit(run_seed, cfg, Path(tmp)) for cfg in configs]
            rows = []
            for future in futures:
                row = future.result()
                rows.append(row)
                print(
                    f"seed {row['seed']}: teacher test {row['teacher_test']:.4f} "
                    f"(val {row['teacher_val']:.4f}) -> {row['final_model']} test "
                    f"{row['final_test']:.4f} (val {row['final_val']:.4f}), gain "
                    f"{row['gain']:+.4f}, {row['seconds']:.0f} s",
                    flush=True,
                )
    wall = time.perf_counter() - start
    print(f"teacher test  {_mean_sd([r['teacher_test'] for r in rows])}")
    print(f"final test    {_mean_sd([r['final_test'] for r in rows])}")
    print(f"gain          {_mean_sd([r['gain'] for r in rows], '+')}")
    print(f"min gain      {min(r['gain'] for r in rows):+.4f}")
    print(f"wall {wall:.0f} s, mean loop {statistics.mean(r['seconds'] for r in rows):.0f} s")


if __name__ == "__main__":
    main()
