"""`dvc repro` in a temporary git + DVC copy of the repository, with the real CLI and
a real MLflow sqlite store; then an `mlflow server` on loopback serves the records."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pytest
import yaml

from tests.e2e.conftest import (
    REPO,
    base_env,
    free_port,
    make_repo_copy,
    run,
    stop,
    wait_http,
)

pytestmark = pytest.mark.e2e


def read_metrics(repo: Path) -> dict[str, dict]:
    files = sorted((repo / "artifacts").glob("**/metrics.json"))
    return {str(p.relative_to(repo)): json.loads(p.read_text()) for p in files}


def strip_timing(metrics: dict[str, dict]) -> dict[str, dict]:
    return {k: {m: v for m, v in d.items() if m != "train_seconds"} for k, d in metrics.items()}


@pytest.fixture(scope="module")
def repro(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = make_repo_copy(tmp_path_factory.mktemp("dvc") / "repo")
    run(["dvc", "repro"], repo)
    return repo


def mlflow_client(repo: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow' / 'mlflow.db'}")


def test_repro_writes_metrics_and_one_mlflow_run_per_iteration(repro: Path) -> None:
    metrics = read_metrics(repro)
    for name in (
        "splits",
        "models/iter_0",
        "models/iter_1",
        "models/iter_2",
        "pseudo/iter_1",
        "pseudo/iter_2",
        "report",
    ):
        assert f"artifacts/{name}/metrics.json" in metrics
    assert metrics["artifacts/report/metrics.json"]["iterations"] == 2

    client = mlflow_client(repro)
    experiment = client.get_experiment_by_name("noisy-student")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    children = sorted(
        (r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
        key=lambda r: (r.data.tags["record"], int(r.data.tags["iteration"])),
    )
    assert [r.info.run_name for r in children] == [
        "pseudo-labels 1",
        "pseudo-labels 2",
        "teacher w1 d1",
        "student-1 w1 d1",
        "student-2 w1.5 d1",
    ]
    assert {r.info.status for r in children} == {"FINISHED"}
    children = children[2:]  # the models
    for run_ in (parent, *children):
        assert run_.data.tags["entry_point"] == "dvc"
        assert len(run_.data.tags["git_commit"]) == 40
        assert run_.data.tags["data_dvc_md5"].endswith(".dir")
    student = children[2]
    assert student.data.params["randaugment_ops"] == "2"
    assert float(student.data.params["stochastic_depth"]) > 0
    assert int(student.data.metrics["num_pseudo_labeled"]) == int(
        metrics["artifacts/pseudo/iter_2/metrics.json"]["num_pseudo_labeled"]
    )
    assert student.data.metrics["test_accuracy"] == pytest.approx(
        metrics["artifacts/models/iter_2/metrics.json"]["test_accuracy"]
    )
    assert len(client.get_metric_history(children[0].info.run_id, "epoch/val_accuracy")) == 12
    versions = client.search_model_versions(f"name='{registered_model(repro)}'")
    assert len(versions) == 3


def registered_model(repo: Path) -> str:
    """The registered model of the run's task (one per task: the default name + the task)."""
    client = mlflow_client(repo)
    [parent] = client.search_runs(
        [client.get_experiment_by_name("noisy-student").experiment_id], "tags.record = 'pipeline'"
    )
    name = parent.data.tags["registered_model"]
    assert name.startswith("noisy-student-digits-")
    return name


def records(repo: Path) -> tuple[set[str], set[str]]:
    """Every run and every registered version in the store."""
    client = mlflow_client(repo)
    runs = client.search_runs([client.get_experiment_by_name("noisy-student").experiment_id])
    versions = client.search_model_versions(f"name='{registered_model(repo)}'")
    return {r.info.run_id for r in runs}, {str(v.version) for v in versions}


def test_second_repro_does_nothing(repro: Path) -> None:
    before = len(mlflow_client(repro).search_runs(["0", "1"]))
    result = run(["dvc", "repro"], repro)
    assert "Data and pipelines are up to date." in result.stdout
    assert len(mlflow_client(repro).search_runs(["0", "1"])) == before


def test_changing_a_student_reruns_only_what_depends_on_it(repro: Path) -> None:
    params = yaml.safe_load((repro / "params.yaml").read_text())
    params["iterations"]["2"]["epochs"] = 2
    (repro / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(run(["dvc", "status", "--json"], repro).stdout)
    assert set(status) == {"student@2", "report"}
    run(["git", "checkout", "params.yaml"], repro)
    assert json.loads(run(["dvc", "status", "--json"], repro).stdout) == {}


def model_hashes(repo: Path) -> dict[str, str]:
    files = sorted((repo / "artifacts").glob("models/iter_*/model.pt"))
    return {str(p.relative_to(repo)): hashlib.md5(p.read_bytes()).hexdigest() for p in files}


def test_forced_repro_gives_identical_metrics_models_and_records(repro: Path) -> None:
    before, models, recorded = read_metrics(repro), model_hashes(repro), records(repro)
    assert len(models) == 3
    run(["dvc", "repro", "--force"], repro)
    assert strip_timing(read_metrics(repro)) == strip_timing(before)
    assert model_hashes(repro) == models
    # The same files: the same parent and children, no new version.
    assert records(repro) == recorded


def test_plots_render_accuracy_by_iteration_and_per_class(repro: Path) -> None:
    result = run(["dvc", "plots", "show", "--json"], repro)
    plots = json.loads(result.stdout)["data"]
    assert {
        "accuracy by iteration",
        "pseudo-label accuracy by iteration",
        "per-class test accuracy of the final model",
    } <= set(plots)
    [per_class] = plots["per-class test accuracy of the final model"]
    values = per_class["content"]["data"]["values"]
    assert sorted(v["class"] for v in values) == [str(c) for c in range(10)]


def colored_pixels(png: Path) -> int:
    """Pixels of a screenshot in colour (the plots' marks), not white, grey or black text."""
    from PIL import Image

    with Image.open(png) as image:
        hsv = np.asarray(image.convert("RGB").convert("HSV"))
    return int((hsv[..., 1] > 80).sum())


def test_plots_page_draws_without_internet(repro: Path, tmp_path: Path) -> None:
    """`dvc plots show` writes a page with Vega inlined (plots/offline.html, built by
    `make install`); headless Chromium, with every host name unresolvable, draws it."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Chromium is not installed (`apt-get install chromium`, as .ci/run does)")
    template = REPO / "plots" / "offline.html"
    assert template.is_file(), "plots/offline.html is missing: run `make install`"
    shutil.copy(template, repro / "plots" / "offline.html")
    run(["dvc", "plots", "show", "-o", str(tmp_path / "page")], repro)
    page = tmp_path / "page" / "index.html"
    assert "cdn.jsdelivr.net" not in page.read_text(encoding="utf-8")
    shot = tmp_path / "plots.png"
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--window-size=1200,4000",
            "--virtual-time-budget=15000",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )
    # One line plot alone draws over a thousand coloured pixels; a page whose scripts did
    # not load is white.
    assert colored_pixels(shot) > 1000


def test_library_run_gives_the_same_files_as_dvc(repro: Path) -> None:
    """One implementation of every step: the in-process loop reproduces DVC's outputs."""
    run(["noisy-student", "--run-dir", "in-process", "run", "--no-mlflow"], repro)
    for dvc_out in sorted((repro / "artifacts").glob("*/iter_*/*.p*")):
        twin = repro / "in-process" / dvc_out.relative_to(repro / "artifacts")
        assert (
            hashlib.md5(twin.read_bytes()).digest() == hashlib.md5(dvc_out.read_bytes()).digest()
        ), dvc_out


def test_mlflow_server_serves_the_runs(repro: Path) -> None:
    port = free_port()
    server = subprocess.Popen(
        [
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{repro / 'mlflow' / 'mlflow.db'}",
            "--workers",
            "1",
        ],
        cwd=repro,
        env=base_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        api = f"http://127.0.0.1:{port}/api/2.0/mlflow"
        wait_http(f"http://127.0.0.1:{port}/health", process=server)
        experiment = httpx.get(
            f"{api}/experiments/get-by-name", params={"experiment_name": "noisy-student"}
        ).json()["experiment"]
        runs = httpx.post(
            f"{api}/runs/search", json={"experiment_ids": [experiment["experiment_id"]]}
        ).json()["runs"]
        names = {r["info"]["run_name"] for r in runs}
        assert {"teacher w1 d1", "student-2 w1.5 d1"} <= names
        name = registered_model(repro)
        model = httpx.get(f"{api}/registered-models/get", params={"name": name}).json()
        assert model["registered_model"]["name"] == name
    finally:
        stop(server)


def test_remote_round_trip_reproduces_in_a_fresh_clone(repro: Path, tmp_path: Path) -> None:
    """Push data and every output to a local-directory remote; a fresh clone pulls them and
    has nothing left to reproduce."""
    run(["dvc", "remote", "add", "-d", "storage", str(tmp_path / "remote")], repro)
    run(["git", "add", "-A"], repro)
    run(["git", "commit", "-q", "-m", "pipeline run and remote"], repro)
    run(["dvc", "push"], repro)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repro), str(clone)], tmp_path)
    run(["dvc", "pull"], clone)
    assert "Data and pipelines are up to date." in run(["dvc", "status"], clone).stdout
    for model in sorted((repro / "artifacts" / "models").glob("iter_*/model.pt")):
        twin = clone / model.relative_to(repro)
        assert hashlib.md5(twin.read_bytes()).digest() == hashlib.md5(model.read_bytes()).digest()
    assert read_metrics(clone) == read_metrics(repro)


def test_experiment_sweep_lists_its_metrics(repro: Path) -> None:
    run(["dvc", "exp", "run", "-S", "pseudo_label.threshold=0.3", "--name", "low-threshold"], repro)
    shown = run(["dvc", "exp", "show", "--json"], repro).stdout
    assert "low-threshold" in shown and "final_test_accuracy" in shown
    table = run(["dvc", "exp", "show", "--csv"], repro).stdout
    row = next(line for line in table.splitlines() if "low-threshold" in line)
    assert ",0.3," in row

    # The README's command, in a 120-column terminal: a few columns, no cell cut short.
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    command = readme.split("\ndvc exp show", 1)[1].split("\n```", 1)[0]
    command = "dvc exp show" + command.replace("\\\n", " ")
    shown = run(
        ["script", "-qec", f"{command} --no-pager", "/dev/null"],
        repro,
        base_env(COLUMNS="120", LINES="40", SHELL="/bin/bash"),
    ).stdout
    text = re.sub(r"\x1b\[[0-9;]*m", "", shown)
    header = next(line for line in text.splitlines() if "Experiment" in line)
    columns = header.split()
    assert "final_test_accuracy" in columns and "pseudo_label.threshold" in columns, header
    assert len(columns) <= 8, header
    assert "\u2026" not in text, text


def test_experiment_with_a_fixmatch_teacher(repro: Path) -> None:
    """``dvc exp run -S teacher.method=fixmatch teacher``: the teacher stage trains on the
    pool too (its history has the share of pool images above the threshold) and MLflow
    records its method. Only that stage runs: the students are the other tests' concern."""
    run(
        ["dvc", "exp", "run", "--name", "fixmatch-teacher", "-S", "teacher.method=fixmatch",
         "-S", "teacher.augment=weak", "-S", "teacher.unlabeled_ratio=1", "teacher"],
        repro,
    )  # fmt: skip
    history = (repro / "artifacts" / "models" / "iter_0" / "history.csv").read_text()
    assert "unlabeled_mask_rate" in history.splitlines()[0]
    client = mlflow_client(repro)
    experiments = [e.experiment_id for e in client.search_experiments()]
    [teacher] = client.search_runs(experiments, "params.method = 'fixmatch'")
    assert teacher.data.params["augment"] == "weak"
    table = run(["dvc", "exp", "show", "--csv"], repro).stdout
    row = next(line for line in table.splitlines() if "fixmatch-teacher" in line)
    assert ",fixmatch," in row
