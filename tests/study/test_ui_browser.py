"""A real browser on the MLflow UI of a finished small study, as a newcomer would open it.

`mlflow server` (one worker) on the study's SQLite store, after a real study and a real
`python -m fractal_mlops.promote`; Debian's chromium driven by Playwright (Playwright cannot
download its own browsers here). MLflow's UI keeps polling, so pages are awaited by `load` and
then by the element the check needs, never by `networkidle`.

Screenshots go to the test's temp dir; with FRACTAL_SCREENSHOTS=1 they are also written to docs/
(the README shows them). Where chromium or Playwright is missing the test skips, except in CI
(CI=true), where it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, StudyDir, write_config
from servers import missing_tool, mlflow_server

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STUDY = "ui-browser"
# The study report (report/report.html on the study run) is checked whenever the study run has
# it. Set True once `fractal_mlops.report` is part of the study, so that a missing report fails.
REQUIRE_REPORT = True
WAIT_MS = 30_000


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """A finished study with a champion, an `mlflow server` on its store, and the URL it printed."""
    root = tmp_path_factory.mktemp("ui-browser")
    config = write_config(root / "study.yaml", study_name=STUDY,
                          space={"unit": ["conv-norm-act"], "activation": ["relu", "sigmoid"]},
                          training={"epochs": 3})
    study = StudyDir(root)
    proc = study.run("--config", str(config), *study.args())
    assert proc.returncode == 0, proc.stderr
    url = next(line.strip() for line in proc.stdout.splitlines()
               if line.strip().startswith("http://127.0.0.1:5000/#/experiments/"))
    promote = subprocess.run([sys.executable, "-m", "fractal_mlops.promote", "--experiment", STUDY,
                              "--tracking-uri", study.tracking_uri], cwd=root, env=study.env(),
                             capture_output=True, text=True, timeout=300)
    assert promote.returncode == 0, promote.stderr
    with mlflow_server(study.tracking_uri, root / "mlartifacts") as server:
        yield study, url.replace("http://127.0.0.1:5000", server)


@pytest.fixture(scope="module")
def page():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing_tool("Playwright is not installed (pip install -e '.[dev]')")
    if not Path(CHROMIUM).exists():
        missing_tool(f"no browser at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        yield context.new_page()
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("screenshots")

    def save(page, name: str) -> None:
        page.wait_for_timeout(1500)  # charts and tables settle after their data arrives
        path = folder / f"ui-{name}.png"
        page.screenshot(path=path)
        if os.environ.get("FRACTAL_SCREENSHOTS") == "1":
            (REPO / "docs").mkdir(exist_ok=True)
            shutil.copy(path, REPO / "docs" / path.name)

    return save


def _open(page, url: str) -> None:
    page.goto(url, wait_until="load")
    close = page.get_by_role("button", name="Close")  # MLflow's assistant panel, if it opens
    try:
        close.first.click(timeout=5000)
    except Exception:  # noqa: BLE001 - not shown: nothing to close
        pass


def _trials(study: StudyDir):
    return study.runs(STUDY)


def test_the_printed_url_lands_on_the_trials(ui, page, shots):
    study, url = ui
    _open(page, url)
    trials = sorted(_trials(study), key=lambda r: -r.data.metrics.get("final_val_acc", -1))
    first = page.get_by_text(trials[0].info.run_name, exact=True).first
    first.wait_for(timeout=WAIT_MS)
    page.get_by_text(trials[-1].info.run_name, exact=True).first.wait_for(timeout=WAIT_MS)
    table = page.inner_text("body")
    for run in trials:  # each trial on the first page, not folded under the study run
        assert run.info.run_name in table
    assert any(r.info.run_name.endswith("[PRUNED]") for r in trials)
    assert "Model training" in table and "Sort: final_val_acc" in table
    shots(page, "runs")
    _remember_model_training(page)


def _remember_model_training(page) -> None:
    """What a press on "Model training" on a run page stores: MLflow keeps the choice in the
    browser (run links carry no workflowType), and the run pages keep the model-training menus."""
    page.evaluate("localStorage.setItem('mlflow.workflowType_v1', "
                  "JSON.stringify('machine_learning'))")
    page.reload(wait_until="load")  # the app reads it when it starts


def test_a_trials_page_shows_its_val_acc_curve(ui, page, shots):
    study, url = ui
    _open(page, url)
    best = max(_trials(study), key=lambda r: r.data.metrics.get("final_val_acc", -1))
    page.get_by_text(best.info.run_name, exact=True).first.click(timeout=WAIT_MS)
    page.get_by_text("Model metrics", exact=True).first.click(timeout=WAIT_MS)
    page.get_by_placeholder("Search metric charts").fill("val_acc")
    page.get_by_text("val_acc", exact=True).first.wait_for(timeout=WAIT_MS)
    # a line chart over the epochs: its legend names the run and the per-step metric
    page.get_by_text(f"{best.info.run_name} (val_acc)", exact=True).first.wait_for(
        timeout=WAIT_MS)
    page.locator(".js-plotly-plot").first.wait_for(timeout=WAIT_MS)
    assert best.info.run_id in page.url
    assert "final_val_acc" in page.inner_text("body")
    shots(page, "trial-metrics")


def test_the_study_run_leads_to_the_best_trial_and_shows_the_report(ui, page, shots):
    study, url = ui
    parent = study.runs(STUDY, role="study")[0]
    base = url.split("/#/", 1)[0]
    experiment = parent.info.experiment_id
    _open(page, f"{base}/#/experiments/{experiment}/runs/{parent.info.run_id}")
    best_variant = parent.data.tags["fractal.best_variant"]
    page.get_by_text("python -m fractal_mlops.promote", exact=False).first.wait_for(
        timeout=WAIT_MS)
    page.get_by_text("Show more", exact=True).first.click()  # the whole description
    text = page.inner_text("body")
    assert f"Best: {best_variant}" in text
    assert "best_final_val_acc" in text
    shots(page, "study-run")

    page.get_by_text("Artifacts", exact=True).first.click()
    page.get_by_text("config.yaml", exact=True).first.wait_for(timeout=WAIT_MS)
    has_report = bool(study.client().list_artifacts(parent.info.run_id, "report"))
    assert has_report or not REQUIRE_REPORT, "the study run has no report/ artifacts"
    if has_report:
        page.get_by_text("report", exact=True).first.click()
        page.get_by_text("report.html", exact=True).first.click(timeout=WAIT_MS)
        page.locator("iframe").first.wait_for(timeout=WAIT_MS)  # MLflow previews HTML in one
        shots(page, "study-report")


def test_the_models_tab_ranks_the_logged_models(ui, page, shots):
    study, url = ui
    _open(page, url.split("/runs?", 1)[0] + "/models")
    complete = [r for r in _trials(study) if r.data.tags["fractal.state"] == "COMPLETE"]
    names = [re.sub(r"[/:.%\"']", "_", r.data.tags["fractal.variant"]) for r in complete]
    page.get_by_text(names[0], exact=True).first.wait_for(timeout=WAIT_MS)
    text = page.inner_text("body")
    assert all(name in text for name in names)
    shots(page, "models")


def test_the_registry_shows_the_champion(ui, page, shots):
    _, url = ui
    _open(page, url.split("/#/", 1)[0] + "/#/models")
    page.get_by_text("FractalNet", exact=True).first.wait_for(timeout=WAIT_MS)
    row = page.get_by_role("row").filter(has_text="FractalNet")
    assert re.search(r"@\s*champion", row.first.inner_text())
    shots(page, "registry")
