"""``noisy-student``: one subcommand per pipeline step, the commands DVC stages call."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from noisy_student import pipeline
from noisy_student.config import ConfigError, load_config
from noisy_student.data import fetch, source_options


def print_table(table: pd.DataFrame) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Table(title="Noisy Student iterations")
    for column in (
        "iteration",
        "model",
        "#labeled",
        "#pseudo-labeled",
        "pseudo-label acc",
        "val acc",
        "test acc",
    ):
        out.add_column(column, justify="left" if column == "model" else "right")
    for row in table.to_dict("records"):
        pl = row["pseudo_label_accuracy"]
        out.add_row(
            str(row["iteration"]),
            row["model"],
            str(row["num_labeled"]),
            str(row["num_pseudo_labeled"]),
            "-" if pd.isna(pl) else f"{pl:.4f}",
            f"{row['val_accuracy']:.4f}",
            f"{row['test_accuracy']:.4f}",
        )
    Console(width=120).print(out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="noisy-student", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="parameters file (params.yaml)")
    parser.add_argument("--run-dir", default="artifacts", help="run directory for all outputs")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="dataset commands")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    data_fetch = data_sub.add_parser("fetch", help="materialize the dataset under data.root")
    data_fetch.add_argument("--source", help="defaults to data.source from the params file")
    data_fetch.add_argument("--root", help="defaults to data.root from the params file")

    sub.add_parser("validate", help="validate the params file and print the resolved config")
    sub.add_parser("prepare", help="split into labeled / unlabeled / val / test manifests")
    for name, text in (
        ("train", "train the teacher (0) or student i"),
        ("pseudo-label", "label the pool with model i-1 for student i"),
    ):
        step = sub.add_parser(name, help=text)
        step.add_argument("--iteration", type=int, required=True)
    report = sub.add_parser("report", help="summarize the run, print the table, log to MLflow")
    report.add_argument(
        "--entry-point", default="cli", help="recorded as the MLflow tag entry_point"
    )
    report.add_argument("--no-mlflow", action="store_true", help="skip MLflow logging")
    sub.add_parser("show", help="print the iteration table of a finished run")
    run = sub.add_parser("run", help="run every step in this process (no DVC, no Prefect)")
    run.add_argument("--no-mlflow", action="store_true", help="skip MLflow logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = load_config(args.params)
    except (ConfigError, FileNotFoundError) as err:
        print(f"noisy-student: {err}", file=sys.stderr)
        return 2
    layout = pipeline.RunLayout(Path(args.run_dir))
    if args.command == "data":
        source = args.source or cfg.data.source
        options = {
            key: value
            for key in source_options(source)
            if (value := getattr(cfg.data, key, None)) is not None
        }
        try:
            print(fetch(source, args.root or cfg.data.root, **options))
        except (OSError, RuntimeError, ValueError) as err:
            print(f"noisy-student: data fetch {source}: {err}", file=sys.stderr)
            return 2
    elif args.command == "validate":
        import yaml

        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    elif args.command == "prepare":
        pipeline.prepare(cfg, layout)
    elif args.command == "train":
        pipeline.train(cfg, layout, args.iteration)
    elif args.command == "pseudo-label":
        pipeline.label_pool(cfg, layout, args.iteration)
    elif args.command in ("report", "run"):
        if args.command == "run":
            pipeline.run_all(cfg, layout)
        print_table(pipeline.summarize(cfg, layout))
        if not args.no_mlflow:
            from noisy_student.tracking import log_pipeline_run

            log_pipeline_run(cfg, layout, getattr(args, "entry_point", "library"))
    elif args.command == "show":
        print_table(pd.read_csv(layout.report / "iterations.csv"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
