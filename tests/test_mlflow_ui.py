"""The MLflow UI, as a person sees it: a real `mlflow server` on a store made by a tiny pretraining +
evaluation, opened in headless Chromium (``--dump-dom`` after ``--virtual-time-budget``, and a
screenshot of each page; set ``AUGSELF_UI_SHOTS=<dir>`` to keep them).

What MLflow 3.17 does here, checked by hand on the screenshots: the experiment's runs table lists the
configuration group's parent run (``group <hash>``, the model runs nested in it); a model run's page shows
its parent, the prepared dataset with its digest and context, its model metrics and system metrics; the
experiment's Models tab lists the LoggedModel.  The UI's global "GenAI | Model training" switch (kept
in the browser, GenAI for a new profile) still opens ``#/experiments/<id>`` on the GenAI overview;
``?workflowType=machine_learning`` (what the UI itself adds when one clicks "Model training") opens the
runs table, so that is the link the README gives.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline import tracking
from pipeline.tracking import Tracker
from pipeline.workflow import _log_to_model_run, run_pretraining
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
            run_pretraining(params, "simclr", "augself", work / "models", device="cpu")
            _log_to_model_run(params, work / "models", "simclr-augself", {"linear/cfmnist/class/top1": 61.5})
            tracker = Tracker(params)
            run_id = (work / "models" / "simclr-augself" / tracking.RUN_ID_FILE).read_text()
            yield (server.uri, tracker.experiment_id(), run_id, tracker.model_id(run_id), params.group_hash(), work)
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
    uri, exp, run_id, model_id, group, work = ui
    assert model_id and model_id.startswith("m-")

    runs = open_page(f"{uri}/#/experiments/{exp}?workflowType=machine_learning", work / "1-runs.png")
    assert "matching runs" in runs and f"group {group}" in runs           # the runs table, the group's row
    assert "Run Name" in runs and "Dataset" in runs and "Model" in runs

    run = open_page(f"{uri}/#/experiments/{exp}/runs/{run_id}", work / "2-run.png")
    assert "simclr-augself λ=1 seed 0" in run and "Parent run" in run and f"group {group}" in run
    from mlflow.tracking import MlflowClient

    digests = {d.dataset.digest for d in MlflowClient(uri).get_run(run_id).inputs.dataset_inputs}
    assert "cfmnist" in run and any(d in run for d in digests)           # the dataset and its digest
    assert "pretraining" in run.lower()                                  # its context
    assert model_id in run and "System metrics" in run and "Model metrics" in run

    models = open_page(f"{uri}/#/experiments/{exp}/models?workflowType=machine_learning", work / "3-models.png")
    assert "simclr-augself" in models and model_id in models
