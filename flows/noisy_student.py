"""The Noisy Student loop as a Prefect flow: teacher, then label -> student per iteration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from noisy_student.config import load_config
from noisy_student.preflight import preflight
from tasks import steps


@flow(name="noisy-student", log_prints=True)
def noisy_student(
    params_file: str = "params.yaml",
    iterations: int | None = None,
    overrides: dict[str, Any] | None = None,
    runs_root: str = "runs",
) -> dict[str, Any]:
    """Run the loop with ``params_file``; ``iterations`` keeps the first N students and
    ``overrides`` sets dotted keys (``{"train.epochs": 2}``). Outputs go to
    ``runs_root/<config hash>``; a re-run reuses a finished step only while its files, code,
    data and inputs are unchanged (tasks/cache.py), and runs it again otherwise."""
    cfg = load_config(params_file, overrides, max_iterations=iterations)
    preflight(cfg)  # what this machine or the data cannot give the run, before any task
    config = cfg.model_dump(mode="json")
    run_dir = str(Path(runs_root) / cfg.fingerprint())

    splits = steps.prepare(config, run_dir)
    models = [steps.train(config, run_dir, 0, [splits])]  # the teacher, no noise
    for iteration in sorted(cfg.iterations):
        pseudo = steps.pseudo_label(config, run_dir, iteration, [splits, *models])
        models.append(steps.train(config, run_dir, iteration, [splits, pseudo, *models]))
    return steps.report(config, run_dir)


if __name__ == "__main__":  # python -m flows.noisy_student
    noisy_student()
