"""Does the loop learn? Fashion-MNIST with 100 labels per class, the recipe of
``presets/fashion_mnist.yaml`` against two supervised references trained by the same code:
the 1,000 labels only (the loop's own teacher) and all labels (the ceiling).

Validation is 50 images per class carved from the training images outside the labeled
set; the other 58,500 training images are the unlabeled pool (their labels only score the
pseudo-labels); the official 10,000 test images give the test accuracy.

    python benchmarks/fashion_mnist.py --seeds 0 1 2 --ceiling
    python benchmarks/fashion_mnist.py --seeds 0 --ablations hard,no-noise,no-balance
    python benchmarks/fashion_mnist.py --set train.epochs=1 --set teacher.epochs=2 --limit 2

``--work DIR --resume`` keeps the models an earlier run with the same settings left in
DIR (each counted at the training time it recorded) and trains only the missing ones:
students on top of a teacher trained before, without training it again.

Every loop runs in this process through the library's steps (``pipeline``), each step
timed; ``--out`` keeps the per-model rows as CSV.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

from noisy_student import pipeline
from noisy_student.config import Config, load_config
from noisy_student.data import fetch
from noisy_student.io import read_json
from noisy_student.report import markdown_table
from noisy_student.runs import METRICS, PER_CLASS, RunLayout

PRESET = Path(__file__).resolve().parents[1] / "presets" / "fashion_mnist.yaml"

# Each ablation changes one ingredient of the recipe.
ABLATIONS: dict[str, dict[str, Any]] = {
    "hard": {"pseudo_label.mode": "hard"},
    "no-noise": {
        "noise.randaugment_ops": 0,
        "noise.dropout": 0.0,
        "noise.stochastic_depth": 0.0,
    },
    "no-balance": {"pseudo_label.balance": None},
    "no-threshold": {"pseudo_label.threshold": 0.0},
    "no-ratio": {"student.unlabeled_ratio": None},
    "same-size": {"iterations.2.width": 1.0, "iterations.3.width": 1.0},
    "finetune": {"student.finetune_epochs": 2},
    "scratch": {"student.init": "scratch"},
    "weak-teacher": {"teacher.augment": "weak"},
    "promote-always": {"student.promote": "always"},
    "no-tta": {"pseudo_label.tta": "none"},
    # The teacher learns from the pool too (FixMatch); with a FixMatch recipe (--set
    # teacher.method=fixmatch ...), its moving average or adaptive thresholds off.
    "fixmatch-teacher": {"teacher.method": "fixmatch", "teacher.augment": "weak"},
    "no-ema": {"teacher.ema_decay": 0.0},
    "no-adaptive": {"teacher.adaptive_threshold": False},
}


# Where the errors concentrate: the upper-body garments, each a column of the rows.
CONFUSED = ("T-shirt/top", "Pullover", "Coat", "Shirt")


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs, values read as YAML (``null``, numbers, strings)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected key=value")
        out[key] = yaml.safe_load(value)
    return out


def run_loop(cfg: Config, root: Path, resume: bool = False) -> tuple[list[dict[str, Any]], float]:
    """The whole loop, each step timed; one row per model and the loop's wall time (with
    ``resume``, the recorded training time of each model kept from an earlier run)."""
    layout = RunLayout(root)
    start = time.perf_counter()
    pipeline.prepare(cfg, layout)
    seconds = {0: 0.0}
    kept = 0.0
    for iteration in [0, *sorted(cfg.iterations)]:
        done = layout.model_dir(iteration) / METRICS
        if resume and done.exists():
            seconds[iteration] = read_json(done)["train_seconds"]
            kept += seconds[iteration]
            print(f"kept model {iteration} from {root} ({seconds[iteration]:.0f} s)")
            continue
        step = time.perf_counter()
        if iteration:
            pipeline.label_pool(cfg, layout, iteration)
        pipeline.train(cfg, layout, iteration)
        seconds[iteration] = time.perf_counter() - step
    wall = time.perf_counter() - start + kept
    table = pipeline.summarize(cfg, layout)
    rows = []
    for row in table.to_dict("records"):
        i = int(row["iteration"])
        kept = read_json(layout.pseudo_dir(i) / "metrics.json") if i else {}
        per_class = pd.read_csv(layout.model_dir(i) / PER_CLASS).set_index("class")
        confused = {
            f"test_{name}": round(float(per_class.loc[name, "test_accuracy"]), 4)
            for name in CONFUSED
            if name in per_class.index
        }
        rows.append(
            {
                "model": row["model"],
                "params": row["num_parameters"],
                "labeled": row["num_labeled"],
                "pseudo_kept": kept.get("num_above_threshold", 0),
                "pseudo_trained": row["num_pseudo_labeled"],
                "pseudo_acc": row["pseudo_label_accuracy"],
                "val_acc": row["val_accuracy"],
                "test_acc": row["test_accuracy"],
                "promoted": bool(row["promoted"]),
                "seconds": round(seconds[i], 1),
                **confused,
            }
        )
    return rows, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=PRESET)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", action="append", default=[], help="recipe override key=value")
    parser.add_argument("--limit", type=int, default=None, help="keep the first N students")
    parser.add_argument("--ablations", default="", help=f"comma list of {', '.join(ABLATIONS)}")
    parser.add_argument(
        "--no-recipe", action="store_true", help="run only the ablations (one per process)"
    )
    parser.add_argument("--ceiling", action="store_true", help="also train on all labels")
    parser.add_argument("--only-ceiling", action="store_true", help="skip the loops")
    parser.add_argument(
        "--ceiling-epochs", type=int, default=None, help="epochs of the ceiling (train.epochs)"
    )
    parser.add_argument("--data-root", type=Path, default=Path("data"))
    parser.add_argument(
        "--source-dir", default=None, help="Fashion-MNIST .gz folder (default: Debian's)"
    )
    parser.add_argument("--device", default=None, help="cpu | cuda (default: the params')")
    parser.add_argument("--work", type=Path, default=None, help="keep run dirs here")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as CSV")
    parser.add_argument(
        "--resume", action="store_true", help="keep the models already trained in --work"
    )
    args = parser.parse_args()
    if args.resume and args.work is None:
        raise SystemExit("--resume: needs --work, the folder of the run to resume")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    base = parse_sets(args.set) | {"data.root": str(args.data_root)}
    if args.device:
        base["device"] = args.device
    unknown = set(filter(None, args.ablations.split(","))) - set(ABLATIONS)
    if unknown:
        raise SystemExit(f"--ablations: unknown {sorted(unknown)}; allowed: {list(ABLATIONS)}")
    variants = ({} if args.no_recipe else {"recipe": {}}) | {
        name: ABLATIONS[name] for name in filter(None, args.ablations.split(","))
    }
    # Validate every config before any work.
    configs = {
        (name, seed): load_config(
            args.params, base | changes | {"seed": seed}, max_iterations=args.limit
        )
        for name, changes in variants.items()
        for seed in args.seeds
    }
    first = next(iter(configs.values()))
    fetch("fashion_mnist", args.data_root, directory=args.source_dir)
    print(
        f"Fashion-MNIST, {first.data.labeled_per_class} labels per class, seeds {args.seeds}, "
        f"device {first.device}, torch threads {torch.get_num_threads()}"
    )

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for (name, seed), cfg in configs.items():
            if args.only_ceiling:
                break
            models, wall = run_loop(cfg, work / f"{name}-{seed}", args.resume)
            rows += [{"variant": name, "seed": seed, **m, "loop_seconds": wall} for m in models]
            final = [m for m in models if m["promoted"]][-1]
            print(
                f"{name} seed {seed}: {wall:.0f} s, final model {final['model']}: "
                f"test {final['test_acc']:.4f}"
            )
        if args.ceiling or args.only_ceiling:
            for seed in args.seeds:
                per_class = 6000 - first.data.val_per_class - 1  # the pool keeps one
                cfg = load_config(
                    args.params,
                    base
                    | {
                        "seed": seed,
                        "data.labeled_per_class": per_class,
                        "teacher.epochs": args.ceiling_epochs or first.train.epochs,
                    },
                    max_iterations=0,
                )
                models, wall = run_loop(cfg, work / f"ceiling-{seed}")
                rows.append({"variant": "supervised-all", "seed": seed, **models[0]})
                rows[-1]["loop_seconds"] = wall
    frame = pd.DataFrame(rows)
    if args.out:
        frame.to_csv(args.out, index=False)
    print(markdown_table(frame))
    print(markdown_table(summarize(frame)))


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean and spread over seeds: the supervised references, then each variant's final
    model (the last promoted) and its gain over its own teacher."""
    out = []
    loops = frame[frame["variant"] != "supervised-all"]
    teachers = loops[loops["model"].str.startswith("teacher")]
    recipe_teachers = teachers[teachers["variant"] == "recipe"]
    if len(recipe_teachers):
        labels = recipe_teachers["labeled"].iloc[0]
        out.append(_stats(f"supervised, {labels:,} labels (the teacher)", recipe_teachers))
    ceiling = frame[frame["variant"] == "supervised-all"]
    if len(ceiling):
        out.append(_stats(f"supervised, all {ceiling['labeled'].iloc[0]:,} labels", ceiling))
    for variant, runs in loops.groupby("variant", sort=False):
        finals = runs.groupby("seed").apply(_final, include_groups=False)
        stats = _stats(f"{variant}: final model", finals)
        own = teachers[teachers["variant"] == variant].set_index("seed")["test_acc"]
        gains = finals["test_acc"] - own.loc[finals.index]
        stats["gain_over_teacher"] = f"{gains.mean():+.4f}"
        out.append(stats)
    return pd.DataFrame(out)


def _final(runs: pd.DataFrame) -> pd.Series:
    """The loop's final model: the last one promoted."""
    return runs[runs["promoted"]].iloc[-1]


def _stats(name: str, rows: pd.DataFrame) -> dict[str, Any]:
    def spread(column: str) -> str:
        values = rows[column].astype(float)
        sd = values.std(ddof=0) if len(values) > 1 else 0.0
        return f"{values.mean():.4f} ± {sd:.4f}"

    return {
        "model": name,
        "seeds": len(rows),
        "val_acc": spread("val_acc"),
        "test_acc": spread("test_acc"),
        "loop_seconds": f"{rows['loop_seconds'].mean():.0f}",
    }


if __name__ == "__main__":
    main()
