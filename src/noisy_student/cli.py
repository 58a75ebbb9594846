"""``noisy-student``: one subcommand per pipeline step, the commands DVC stages call."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from pathlib import Path

import pandas as pd

from noisy_student import pipeline, progress, runs, storage
from noisy_student.config import Config, ConfigError, load_config
from noisy_student.data import fetch, source_options
from noisy_student.distributed import drop_stray_launch_variables, launched_by_torchrun
from noisy_student.io import DiskFull
from noisy_student.models import CheckpointError
from noisy_student.preflight import preflight
from noisy_student.runs import NotYetRun, RunLayout
from noisy_student.shards import ShardError, parse_shard
from noisy_student.signals import Stopped, stop_on_signals

# What the library raises for input it refuses (a flag, a planted or stale file, a step run
# before the steps it reads from, a run directory another command is writing): caught
# once, in ``main``, as one line and exit 2.
REFUSED = (ConfigError, CheckpointError, ShardError, NotYetRun, runs.RunDirectoryBusy)


def print_table(table: pd.DataFrame) -> None:
    from rich.console import Console
    from rich.table import Table

    from noisy_student.report import PSEUDO_LABEL_ACCURACY_NOTE, labels_alone

    caption = "\n".join([*labels_alone(table), PSEUDO_LABEL_ACCURACY_NOTE])
    out = Table(title="Noisy Student iterations", caption=caption)
    for column in (
        "iteration",
        "model",
        "#labeled",
        "#pseudo-labeled",
        "pseudo-label acc",
        "val acc",
        "test acc",
        "promoted",
    ):
        out.add_column(column, justify="left" if column == "model" else "right")
    for row in table.to_dict("records"):
        pl = row["pseudo_label_accuracy"]
        out.add_row(
            str(row["iteration"]),
            row["model"],
            str(row["num_labeled"]),
            "0: labels alone"
            if row["iteration"] and not row["num_pseudo_labeled"]
            else str(row["num_pseudo_labeled"]),
            "-" if pd.isna(pl) else f"{pl:.4f}",
            f"{row['val_accuracy']:.4f}",
            f"{row['test_accuracy']:.4f}",
            "yes" if row["promoted"] else f"no, {int(row['teacher_iteration'])} teaches",
        )
    Console(width=140).print(out)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="noisy-student", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="parameters file (params.yaml)")
    parser.add_argument("--run-dir", default="artifacts", help="run directory for all outputs")
    # A local copy's URL (set when a step of an s3:// run directory runs on a staged copy):
    # the records of every step of one run meet under one MLflow parent.
    parser.add_argument("--run-origin", default=None, help=argparse.SUPPRESS)
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="dataset commands")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    data_fetch = data_sub.add_parser("fetch", help="materialize the dataset under data.root")
    data_fetch.add_argument("--source", help="defaults to data.source from the params file")
    data_fetch.add_argument("--root", help="defaults to data.root from the params file")

    sub.add_parser("validate", help="validate the params file and print the resolved config")
    sub.add_parser("prepare", help="split into labeled / unlabeled / val / test manifests")
    steps = []
    for name, text in (
        ("train", "train the teacher (0) or student i"),
        ("pseudo-label", "label the pool with model i-1 for student i"),
    ):
        step = sub.add_parser(name, help=text)
        step.add_argument("--iteration", type=int, required=True)
        if name == "pseudo-label":
            shard = step.add_mutually_exclusive_group()
            shard.add_argument(
                "--shard",
                metavar="INDEX/COUNT",
                help="label one shard of the pool (0-based, e.g. 3/16) and write its part",
            )
            shard.add_argument(
                "--merge",
                nargs="?",
                const=0,
                type=_positive,
                metavar="COUNT",
                help="reduce the shards' parts into the manifest (COUNT: when parts of "
                "several shard counts are present)",
            )
        steps.append(step)
    steps.append(sub.add_parser("report", help="summarize, print the table, close the records"))
    _launch_options(sub.choices["train"])
    sub.add_parser("show", help="print the iteration table of a finished run")
    steps.append(sub.add_parser("run", help="run every step in this process (no DVC, Prefect)"))
    for step in steps:
        step.add_argument(
            "--entry-point",
            help="recorded as the MLflow tag entry_point (default: dvc in a DVC stage, else cli)",
        )
        step.add_argument(
            "--no-mlflow",
            action="store_true",
            help="record nothing in MLflow (also: NOISY_STUDENT_MLFLOW=off)",
        )
        # A caller's tags on the step's MLflow records (an orchestrator's run id), hidden:
        # set by launchers, not by hand.
        step.add_argument("--tag", type=_tag, action="append", default=[], help=argparse.SUPPRESS)
    classify = sub.add_parser("predict", help="classify image files or folders with a model")
    classify.add_argument(
        "--model",
        required=True,
        help="MLflow model URI (models:/<registered model>@champion, runs:/<id>/model), "
        "a checkpoint path (model.pt) or a downloaded run's folder; only the project's "
        "checkpoint is ever loaded",
    )
    classify.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    classify.add_argument("--output", help="write a CSV (path, class, class_index, confidence)")
    classify.add_argument("--classes", help="JSON list of class names (default: the run's)")
    classify.add_argument(
        "--size",
        type=_positive,
        help="square input side, for a checkpoint that does not record its own",
    )
    classify.add_argument(
        "--convert",
        action="store_true",
        help="convert colour images for a grey model (and grey for a colour one), with a warning",
    )
    classify.add_argument(
        "--resize",
        action="store_true",
        help="resize images of another size to the model's, with a warning",
    )
    classify.add_argument(
        "--batch-size", type=_positive, default=256, help="images per forward pass"
    )
    return parser


def _launch_options(train: argparse.ArgumentParser) -> None:
    """Run options of data-parallel training (never parameters: the fingerprint ignores
    them)."""
    group = train.add_argument_group("data-parallel training (see README: Scale out)")
    group.add_argument(
        "--nproc",
        default="1",
        help="processes on this machine, one per GPU ('auto': as many as GPUs); "
        "with --ray, Ray Train workers in all (default 1: this process)",
    )
    group.add_argument("--nnodes", type=_positive, default=1, help="machines (torchrun)")
    group.add_argument("--rdzv-endpoint", help="HOST:PORT of the c10d rendezvous (torchrun)")
    group.add_argument("--rdzv-id", help="job id shared by every machine (torchrun)")
    group.add_argument(
        "--rdzv-timeout",
        type=_positive,
        default=300,
        help="seconds to wait for the rendezvous and the other machines",
    )
    group.add_argument(
        "--ray", metavar="ADDRESS", help="run on a Ray cluster ('auto': the running one)"
    )


def _child_args(args: argparse.Namespace) -> list[str]:
    """The command each launched process runs: this one without the launch options."""
    return [
        "--params",
        args.params,
        "--run-dir",
        args.run_dir,
        *(["--run-origin", args.run_origin] if args.run_origin else []),
        *(["-q"] if args.quiet else []),
        "train",
        "--iteration",
        str(args.iteration),
        *(["--no-mlflow"] if args.no_mlflow else []),
        *(["--entry-point", args.entry_point] if args.entry_point else []),
        *[f"--tag={key}={value}" for key, value in args.tag],
    ]


def train(
    args: argparse.Namespace,
    cfg: Config,
    layout: RunLayout,
    step: Callable,
    entry_point: str | None = None,
) -> int:
    """Train in this process (``step``: the recorded or the plain training step), or
    launch the data-parallel job the options ask for. Under torchrun rank 0 records as it
    trains; a Ray Train job is recorded from its files after it ends (``entry_point``)."""
    from noisy_student import launch
    from noisy_student.distributed import DistributedError
    from noisy_student.engine import TrainingDiverged

    try:
        nproc = launch.resolve_nproc(args.nproc, cfg.device)
        plan = launch.Launch(
            nproc, args.nnodes, args.rdzv_endpoint, args.rdzv_id, args.rdzv_timeout, args.ray
        )
        if plan.world_size > 1 or args.ray or args.rdzv_endpoint:
            launch.check(cfg, plan)
            if args.ray:
                launch.run_ray(cfg, plan, layout.root, args.iteration)
                if entry_point is not None:
                    from noisy_student import records

                    records.record_training(cfg, layout, args.iteration, entry_point)
                return 0
            status = launch.run_torchrun(plan, _child_args(args))
            if status:
                print(
                    f"noisy-student: train: the {plan.world_size}-process job failed (exit "
                    f"{status}; the failed rank is named above); nothing was written",
                    file=sys.stderr,
                )
            return status
        step(cfg, layout, args.iteration)
    except (DistributedError, TrainingDiverged, launch.JobFailed) as err:
        print(f"noisy-student: train: {err}", file=sys.stderr)
        return 2 if isinstance(err, DistributedError) else 1
    return 0


def _stderr(message: str) -> None:
    print(f"noisy-student: predict: {message}", file=sys.stderr)


def _class_names(path: str) -> list[str]:
    """The names ``--classes`` gives; a file that is not a JSON list is named with why."""
    try:
        names = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"--classes {path}: not JSON ({err})") from None
    if not isinstance(names, list):
        raise ValueError(f"--classes {path}: expected a JSON list of class names")
    return [str(name) for name in names]


def predict(args: argparse.Namespace) -> int:
    """``noisy-student predict``: exit 0 when any image was classified, 1 when none could
    be read, 2 when the model, the images or ``--output`` are refused (before any image
    is classified)."""
    from noisy_student.inference import (
        check_output,
        classify,
        image_files,
        load_inference_model,
        with_classes,
        with_size,
    )
    from noisy_student.io import write_csv

    try:
        check_output(args.output)
        model = with_size(load_inference_model(args.model), args.size)
        model = with_classes(model, _class_names(args.classes) if args.classes else None)
        files, missing = image_files(args.paths)
        for name in missing:
            _stderr(f"skipped {name}: no such file or folder")
        _stderr(model.describe())
        table, skipped = classify(
            model, files, args.batch_size, convert=args.convert, resize=args.resize, warn=_stderr
        )
    except (OSError, ValueError) as err:
        _stderr(str(err))
        return 2
    for path, reason in skipped:
        _stderr(f"skipped {path}: {reason}")
    _stderr(f"{len(table)} images classified, {len(skipped) + len(missing)} skipped")
    if table.empty:
        return 1
    if args.output:
        write_csv(args.output, table)
    else:
        shown = table[["path", "class", "confidence"]]
        print(shown.to_string(index=False, formatters={"confidence": "{:.4f}".format}))
    return 0


def _step(args: argparse.Namespace, cfg, layout: RunLayout) -> int:
    """A pipeline step, recorded in MLflow as it runs unless told not to."""
    train_step, label, entry_point = pipeline.train, pipeline.label_pool, None
    if not args.no_mlflow and int(os.environ.get("RANK", "0")) == 0:  # rank 0 records
        from noisy_student import records
        from noisy_student.tracking import StoreUnavailable, check_store

        if records.enabled():
            try:  # before any work: a store that cannot record is refused, not retried
                check_store()
            except StoreUnavailable as err:
                print(f"noisy-student: {args.command}: {err}", file=sys.stderr)
                return 2
            entry_point = args.entry_point or ("dvc" if os.environ.get("DVC_STAGE") else "cli")
            tags = dict(args.tag) or None
            train_step = partial(records.train_step, entry_point=entry_point, extra_tags=tags)
            label = partial(records.label_step, entry_point=entry_point, extra_tags=tags)
    if args.command == "train":
        return train(args, cfg, layout, train_step, entry_point)
    elif args.command == "pseudo-label":
        return _pseudo_label(cfg, layout, args, label, entry_point)
    else:
        if args.command == "run":
            from noisy_student.engine import TrainingDiverged

            try:
                pipeline.run_all(cfg, layout, train_step=train_step, label_step=label)
            except TrainingDiverged as err:
                print(f"noisy-student: run: {err}", file=sys.stderr)
                return 1
        table = pipeline.summarize(cfg, layout)
        print_table(table)
        if entry_point is not None:
            records.record_run(cfg, layout, entry_point)
    return 0


def _pseudo_label(
    cfg: Config, layout: RunLayout, args: argparse.Namespace, label, entry_point: str | None
) -> int:
    """The whole pool in this process (``label``), one shard of it (``--shard``: a part,
    recorded by the merge), or the reduce of the shards' parts (``--merge``, recorded in
    MLflow when ``entry_point`` is set)."""
    if args.shard is not None:
        pipeline.label_shard(cfg, layout, args.iteration, parse_shard(args.shard))
    elif args.merge is not None:
        pipeline.merge_shards(cfg, layout, args.iteration, args.merge or None)
        if entry_point is not None:
            from noisy_student import records

            records.record_pseudo_labels(cfg, layout, args.iteration, entry_point)
    else:
        label(cfg, layout, args.iteration)
    return 0


class _Failed(Exception):
    """A step that returned a failure status: its files are not published."""


def _staged_step(args: argparse.Namespace) -> str | None:
    """Which step a command runs, for staging a run directory on an object store."""
    if args.command == "pseudo-label":
        return "shard" if args.shard else "merge" if args.merge is not None else "label"
    return {"prepare": "prepare", "train": "train"}.get(
        args.command, "report" if args.command in ("report", "run", "show") else None
    )


def main(argv: list[str] | None = None) -> int:
    """The command line; SIGTERM or SIGINT stop a command as an exception, so that its
    records are closed (KILLED) and its files cleaned up before it exits 128 + signal. A
    disk that fills is one line naming the file (exit 1)."""
    args = _parser().parse_args(argv)
    try:
        with stop_on_signals():
            return _dispatch(args)
    except Stopped as stopped:
        print(f"noisy-student: {args.command}: {stopped}", file=sys.stderr)
        return stopped.exit_status
    except DiskFull as err:
        print(f"noisy-student: {args.command}: {err}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    stray = drop_stray_launch_variables()
    rank = int(os.environ.get("RANK", "0"))  # under torchrun: rank 0 alone reports progress
    logging.basicConfig(
        level=logging.WARNING if args.quiet or rank > 0 else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if stray:
        logging.getLogger(__name__).warning(
            "ignoring %s: not set by torchrun, this command runs as one process",
            ", ".join(stray),
        )
    progress.configure(quiet=args.quiet)
    try:
        return _run_command(args)
    except storage.StorageError as err:  # names its URL first
        print(f"noisy-student: {err}", file=sys.stderr)
    except REFUSED as err:
        command = "data fetch" if args.command == "data" else args.command
        print(f"noisy-student: {command}: {err}", file=sys.stderr)
    return 2


def _run_command(args: argparse.Namespace) -> int:
    step = _staged_step(args)
    if step is not None:  # a command on a run directory: named strictly, before any work
        args.run_dir = storage.run_location(args.run_dir, "--run-dir")
    if step is None or not storage.is_remote(args.run_dir):
        return _main(args)
    # A run directory on an object store: this step works on a local copy of what it
    # reads, and publishes what it wrote only when it succeeds.
    try:
        if getattr(args, "shard", None):
            parse_shard(args.shard)
        storage.check_root(args.run_dir, "--run-dir")
        with storage.staged(
            args.run_dir, storage.step_needs(step, getattr(args, "iteration", None)), step
        ) as staged:
            local = {"run_dir": str(staged.root), "run_origin": staged.origin}
            code = _main(argparse.Namespace(**{**vars(args), **local}))
            if code:
                raise _Failed(code)
    except _Failed as failed:
        return failed.args[0]
    return 0


def _main(args: argparse.Namespace) -> int:
    if args.command == "predict":  # needs a model, not the params file
        return predict(args)
    try:
        cfg = load_config(args.params)
        if args.command not in ("data", "show"):  # fetch makes the data; show only reads
            preflight(cfg)
    except (ConfigError, FileNotFoundError) as err:
        print(f"noisy-student: {err}", file=sys.stderr)
        return 2
    if args.command not in ("data", "validate"):
        _check_run_dir(args.run_dir)
    layout = RunLayout(Path(args.run_dir), origin=args.run_origin)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.command != "train":
        print(
            f"noisy-student: {args.command}: only `train` runs as several processes",
            file=sys.stderr,
        )
        return 2
    with _run_dir_lock(args, layout):
        return _command(args, cfg, layout)


def _run_dir_lock(args: argparse.Namespace, layout: RunLayout) -> AbstractContextManager:
    """The run directory's lock for a command that writes into it (runs.hold): shared by
    the shards of one labeling and the machines of one training job; none for a staged
    copy (private to its process) or a rank of a torchrun job (its launcher holds it)."""
    writes = args.command in ("prepare", "train", "pseudo-label", "report", "run")
    if not writes or layout.origin is not None or launched_by_torchrun():
        return nullcontext()
    shard = args.command == "pseudo-label" and args.shard is not None
    machines = args.command == "train" and (args.nnodes > 1 or args.rdzv_endpoint is not None)
    return runs.hold(layout.root, args.command, shared=shard or machines)


def _command(args: argparse.Namespace, cfg: Config, layout: RunLayout) -> int:
    """The command ``args`` names, on the checked ``cfg`` and ``layout``."""
    if args.command == "data":
        source = args.source or cfg.data.source
        try:
            options = {
                key: value
                for key in source_options(source)
                if (value := getattr(cfg.data, key, None)) is not None
            }
            folder = fetch(source, args.root or cfg.data.root, **options)
        except (OSError, RuntimeError, ValueError) as err:
            given = f"--source {source}" if args.source else source
            print(f"noisy-student: data fetch {given}: {err}", file=sys.stderr)
            return 2
        print(folder)
        skipped = folder / "skipped.json"
        if skipped.is_file():
            count = len(json.loads(skipped.read_text(encoding="utf-8")))
            print(
                f"noisy-student: data fetch: {count} unreadable files skipped; listed in {skipped}"
            )
    elif args.command == "validate":
        import yaml

        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    elif args.command == "prepare":
        try:
            pipeline.prepare(cfg, layout)
        except (FileNotFoundError, ValueError) as err:  # data that cannot give the splits
            print(f"noisy-student: prepare: {err}", file=sys.stderr)
            return 2
    elif args.command in ("train", "pseudo-label", "report", "run"):
        return _step(args, cfg, layout)
    elif args.command == "show":
        layout.require(layout.report / "iterations.csv")
        print_table(pd.read_csv(layout.report / "iterations.csv"))
    return 0


def _check_run_dir(run_dir: str) -> None:
    """A local ``--run-dir`` must be a folder or a path a folder can be made at: a file
    there, or above it, is refused before any step writes."""
    if storage.is_remote(run_dir):
        return
    path = Path(run_dir)
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(
                    f"--run-dir {run_dir}: {folder} is a file; allowed: a folder (made when "
                    "missing) for the run's outputs"
                )
            return


if __name__ == "__main__":
    sys.exit(main())
