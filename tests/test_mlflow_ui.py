"""The MLflow UI, as a person sees it: a real `mlflow server` on a store made by a tiny pretraining +
evaluation, opened in headless Chromium (``--dump-dom`` after ``--virtual-time-budget``, and a
screenshot of each page; set ``AUGSELF_UI_SHOTS=<dir>`` to keep them).

Pages that need a click (the compare view's "Show diff only", the runs table's group expander) are
driven over the DevTools protocol (``tests/cdp.py``).

What MLflow 3.17 does here, checked by hand on the screenshots: the experiment's runs table lists the
configuration group's parent run (``group <hash>``, the model runs nested in it); a model run's page shows
its parent, the prepared dataset with its digest and context, its model metrics and system metrics; the
experiment's Models tab lists the LoggedModel.  The UI's global "GenAI | Model training" switch (kept
in the browser, GenAI for a new profile) still opens ``#/experiments/<id>`` on the GenAI overview;
``?workflowType=machine_learning`` (what the UI itself adds when one clicks "Model training") opens the
runs table, so that is the link the README gives.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pipeline import tracking
from pipeline.tracking import Tracker
from pipeline.workflow import _log_to_model_run, run_pretraining
from tests.cdp import Page
from tests.e2e import MlflowServer
from tests.test_tracking import tracked_params

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """(server URI, experiment id, run id, model id, group hash) of a store holding one tiny model."""
    work = tmp_path_factory.mktemp("mlflow_ui")
    old_cwd, old_uri = Path.cwd(), os.environ.get("MLFLOW_TRACKING_URI")
    with MlflowServer(work) as server:
        os.environ["MLFLOW_TRACKING_URI"] = server.uri
        os.chdir(work)
        try:
            params = tracked_params(work)
            for variant, top1 in (("baseline", 60.0), ("augself", 61.5)):
                run_pretraining(params, "simclr", variant, work / "models", device="cpu")
                _log_to_model_run(params, work / "models", f"simclr-{variant}", {"linear/cfmnist/class/top1": top1})
            tracker = Tracker(params)
            run_id = (work / "models" / "simclr-augself" / tracking.RUN_ID_FILE).read_text()
            baseline_id = (work / "models" / "simclr-baseline" / tracking.RUN_ID_FILE).read_text()
            yield (server.uri, tracker.experiment_id(), run_id, tracker.model_id(run_id), params.group_hash(), work,
                   baseline_id)
        finally:
            os.chdir(old_cwd)
            if old_uri is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = old_uri


def open_page(url: str, shot: Path) -> str:
    """The page's DOM after 20 s of virtual time, and a 1600×1000 screenshot; a fresh profile each."""
    def chromium(*args: str) -> subprocess.CompletedProcess:
        profile = shot.parent / f"profile-{shot.stem}-{len(args)}"
        return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=20000",
                               *args, url], capture_output=True, text=True, timeout=180)

    chromium(f"--screenshot={shot}", "--window-size=1600,1000")
    assert shot.exists() and shot.stat().st_size > 10_000, f"no screenshot of {url}"
    if os.environ.get("AUGSELF_UI_SHOTS"):
        Path(os.environ["AUGSELF_UI_SHOTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(os.environ["AUGSELF_UI_SHOTS"]) / shot.name)
    return chromium("--dump-dom").stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; make test does)")
def test_experiment_page_lists_the_runs_with_their_dataset_and_model(ui):
    uri, exp, run_id, model_id, group, work, _ = ui
    assert model_id and model_id.startswith("m-")

    runs = open_page(f"{uri}/#/experiments/{exp}?workflowType=machine_learning", work / "1-runs.png")
    assert "matching runs" in runs and f"group {group}" in runs           # the runs table, the group's row
    assert "Run Name" in runs and "Dataset" in runs and "Model" in runs

    run = open_page(f"{uri}/#/experiments/{exp}/runs/{run_id}", work / "2-run.png")
    assert "simclr-augself λ=1 seed 0" in run and "Parent run" in run and f"group {group}" in run
    from mlflow.tracking import MlflowClient

    digests = {d.dataset.digest for d in MlflowClient(uri).get_run(run_id).inputs.dataset_inputs}
    assert "cfmnist/train" in run and any(d in run for d in digests)     # the dataset and its digest
    assert "pretraining" in run.lower()                                  # its context
    assert model_id in run and "System metrics" in run and "Model metrics" in run

    models = open_page(f"{uri}/#/experiments/{exp}/models?workflowType=machine_learning", work / "3-models.png")
    assert "simclr-augself" in models and model_id in models


def keep_shot(shot: Path) -> None:
    if os.environ.get("AUGSELF_UI_SHOTS"):
        Path(os.environ["AUGSELF_UI_SHOTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(os.environ["AUGSELF_UI_SHOTS"]) / shot.name)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; make test does)")
def test_compare_view_shows_what_differs_between_baseline_and_augself(ui):
    """The comparison the pipeline exists for, as MLflow shows it: the compare view of the baseline and
    AugSelf runs, "Show diff only" switched on (a click), lists the params that differ: the effective λ
    (``augself.lambda``, ``lambda``) and ``variant`` (issue 27: it said "No parameters to display" when
    the baseline logged the params file's λ and variant/λ were tags only)."""
    uri, exp, run_id, _, _, work, baseline_id = ui
    with Page(CHROMIUM) as page:
        page.goto(f"{uri}/#/compare-runs?runs={json.dumps([baseline_id, run_id])}&experiments={json.dumps([exp])}")
        page.wait_text("Comparing 2 Runs", "simclr-baseline λ=0 seed 0", "simclr-augself λ=1 seed 0", "Show diff only")
        switch = 'button[aria-label="Parameters - Show diff only"]'
        page.click(switch)
        assert page.js(f"document.querySelector({json.dumps(switch)}).getAttribute('aria-checked')") == "true"
        time.sleep(1)
        text = page.text()
        keep_shot(page.screenshot(work / "4-compare-diff-only.png"))
    params = text[text.index("Parameters\nShow diff only"):text.index("Metrics\nShow diff only")]
    assert "No parameters to display" not in params, params
    rows = {m.group(1): m.group(2).split("\t") for m in re.finditer(r"^([\w.]+)\t(.*)$", params, re.M)}
    assert rows["augself.lambda"] == ["0.0", "1.0"] and rows["lambda"] == ["0.0", "1.0"], rows
    assert rows["variant"] == ["baseline", "augself"], rows
    assert "ssl.epochs" not in rows and "seed" not in rows                  # equal params are hidden


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; make test does)")
def test_runs_table_shows_run_names_source_and_user(ui):
    """The runs table, the group's row expanded: each model run by its name (``simclr-augself λ=1 seed 0``)
    with its Source (the entry point, not "-"); the run page says who created it (User)."""
    from mlflow.tracking import MlflowClient

    uri, exp, run_id, _, group, work, baseline_id = ui
    tags = MlflowClient(uri).get_run(run_id).data.tags
    source = Path(tags["mlflow.source.name"]).name
    with Page(CHROMIUM) as page:
        page.goto(f"{uri}/#/experiments/{exp}?workflowType=machine_learning")
        page.wait_text("matching runs", f"group {group}", "Source")
        page.click('button[data-component-id$="runnamecellrenderer.tsx_46"]')      # the group row's expander
        page.wait_text("simclr-augself λ=1 seed 0", "simclr-baseline λ=0 seed 0")
        # the grid draws the pinned Run Name column and the other columns as separate rows: join by row-id (the run)
        rows = page.js("""(() => { const rows = {}; document.querySelectorAll('[role=row][row-id]').forEach(r => {
            const i = r.getAttribute('row-id'); rows[i] = (rows[i] || '') + '\\t' + r.innerText; });
            return rows; })()""")
        keep_shot(page.screenshot(work / "5-runs-expanded.png"))
        for rid, name in ((run_id, "simclr-augself λ=1 seed 0"), (baseline_id, "simclr-baseline λ=0 seed 0")):
            assert name in rows[rid] and re.search(rf"(^|\s){re.escape(source)}(\s|$)", rows[rid]), (source, rows)
            assert "cfmnist/train (" in rows[rid], rows[rid]                       # the Dataset column

        page.goto(f"{uri}/#/experiments/{exp}/runs/{run_id}?workflowType=machine_learning")
        text = page.wait_text("simclr-augself λ=1 seed 0", "Created by", "Source")
    assert re.search(rf"Created by\s+{re.escape(tags['mlflow.user'])}\b", text), text[:2000]
    assert re.search(rf"Source\s+{re.escape(source)}", text), text[:2000]
