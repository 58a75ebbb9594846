"""Screenshots of the MLflow UI for the README: the compare view of the latest pipeline
run's iterations (docs/mlflow-compare.png) and its parent's accuracy by iteration
(docs/mlflow-iterations.png).

Needs Chromium and Playwright, kept out of the project's dependencies:

    apt-get install -y chromium fonts-dejavu-core
    python3 -m venv /tmp/shots && /tmp/shots/bin/pip install playwright
    mlflow server --backend-store-uri sqlite:///mlflow/mlflow.db --host 127.0.0.1 --port 5055 &
    /tmp/shots/bin/python docs/screenshots.py --url http://127.0.0.1:5055
"""

from __future__ import annotations

import argparse
import json
import urllib.parse
import urllib.request
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

# Hide the assistant side panel and use the "Model training" sidebar.
QUIET_UI = (
    "localStorage.setItem('mlflow.assistant.panelOpen_v1','false');"
    "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1','true');"
    "localStorage.setItem('mlflow.workflowType_v1','\"machine_learning\"');"
)


def _api(url: str, path: str, body: dict, method: str = "POST") -> dict:
    endpoint = f"{url}/api/2.0/mlflow/{path}"
    if method == "GET":
        request = urllib.request.Request(f"{endpoint}?{urllib.parse.urlencode(body)}")
    else:
        request = urllib.request.Request(
            endpoint, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def latest_run(url: str, experiment: str, name: str | None) -> tuple[str, str, list[str]]:
    """Experiment id, the latest parent run (whose name starts with ``name``, if given) and
    its training children (one per model), teacher first."""
    exp = _api(url, "experiments/get-by-name", {"experiment_name": experiment}, "GET")
    exp_id = exp["experiment"]["experiment_id"]
    runs = _api(url, "runs/search", {"experiment_ids": [exp_id], "max_results": 1000})["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    parents = [
        r
        for r, t in zip(runs, tags, strict=True)
        if "mlflow.parentRunId" not in t and r["info"]["run_name"].startswith(name or "")
    ]
    parent = max(parents, key=lambda r: r["info"]["start_time"])["info"]["run_id"]
    children = sorted(
        (
            (int(t["iteration"]), r["info"]["run_id"])
            for r, t in zip(runs, tags, strict=True)
            if t.get("mlflow.parentRunId") == parent and t.get("record") == "train"
        ),
    )
    return exp_id, parent, [run_id for _, run_id in children]


def compare_view(page: Page, url: str, exp_id: str, children: list[str], out: Path) -> None:
    runs = urllib.parse.quote(json.dumps(children, separators=(",", ":")))
    experiments = urllib.parse.quote(json.dumps([exp_id]))
    page.goto(f"{url}/#/compare-runs?runs={runs}&experiments={experiments}")
    page.wait_for_selector("text=Run details", timeout=60_000)
    page.wait_for_timeout(2000)
    # The parallel-coordinates chart: accuracies instead of the default first metric.
    metrics = page.locator(".du-bois-light-select").nth(1)
    metrics.locator(".du-bois-light-select-selection-item-remove").first.click()
    for name in ("val_accuracy", "test_accuracy"):
        metrics.click()
        page.wait_for_timeout(400)
        page.keyboard.type(name)
        page.wait_for_timeout(400)
        page.locator(f".du-bois-light-select-item-option[title='{name}']:visible").click()
        page.wait_for_timeout(400)
    page.keyboard.press("Escape")
    page.mouse.click(5, 1590)
    page.wait_for_timeout(1500)
    # Collapse the long parameter table so the metrics sit under the run names.
    page.get_by_text("Parameters", exact=True).click()
    page.wait_for_timeout(800)
    # The metric table is a 300 px virtual grid: scroll its values to the end (down to
    # val_accuracy) and its name column along with them.
    grid = page.locator(".ReactVirtualized__Grid").last.bounding_box()
    page.mouse.move(grid["x"] + grid["width"] / 2, grid["y"] + grid["height"] / 2)
    page.mouse.wheel(0, 400)
    page.wait_for_timeout(500)
    page.evaluate(
        "() => { const g = [...document.querySelectorAll('.ReactVirtualized__Grid')];"
        " g[0].scrollTop = g[g.length - 1].scrollTop;"
        " g[0].dispatchEvent(new Event('scroll')); }"
    )
    page.wait_for_timeout(1000)
    artifacts = page.get_by_text("Artifacts", exact=True).bounding_box()
    page.screenshot(path=out, clip={"x": 0, "y": 0, "width": 1400, "height": artifacts["y"] - 12})


def iterations_view(page: Page, url: str, exp_id: str, parent: str, out: Path) -> None:
    page.goto(f"{url}/#/experiments/{exp_id}/runs/{parent}/model-metrics")
    page.wait_for_selector(".js-plotly-plot, canvas, svg.main-svg", timeout=60_000)
    page.wait_for_timeout(4000)
    page.screenshot(path=out, clip={"x": 0, "y": 0, "width": 1400, "height": 1000})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:5055")
    parser.add_argument("--experiment", default="noisy-student")
    parser.add_argument("--name", default=None, help="pick the latest parent named so")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    exp_id, parent, children = latest_run(args.url, args.experiment, args.name)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=args.chromium, args=["--no-sandbox", "--disable-gpu"]
        )
        context = browser.new_context(viewport={"width": 1400, "height": 1600})
        context.add_init_script(QUIET_UI)
        page = context.new_page()
        compare_view(page, args.url, exp_id, children, args.out / "mlflow-compare.png")
        iterations_view(page, args.url, exp_id, parent, args.out / "mlflow-iterations.png")
        browser.close()


if __name__ == "__main__":
    main()
