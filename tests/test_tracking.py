"""MLflow tracking against a real (SQLite) store in a temporary folder."""

from __future__ import annotations

import dataclasses

from pipeline.params import Params
from pipeline.tracking import RUN_ID_FILE, Tracker
from pipeline.workflow import _log_to_model_run


def test_evaluation_moves_the_model_run_to_the_current_config_group(tmp_path, monkeypatch):
    """Changing only eval.* re-runs the evaluation of the same model: its run must then belong to the
    new configuration's group, or the report (which reads one group) loses that seed."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    trained = Params()
    tracker = Tracker(trained)
    run_id = tracker.start_model_run("simclr", "baseline")
    assert run_id
    (tmp_path / "models" / "simclr-baseline").mkdir(parents=True)
    (tmp_path / "models" / "simclr-baseline" / RUN_ID_FILE).write_text(run_id)

    tighter = dataclasses.replace(trained, eval=dataclasses.replace(
        trained.eval, linear=dataclasses.replace(trained.eval.linear, tol=1e-6)))
    assert tighter.group_hash() != trained.group_hash()
    _log_to_model_run(tighter, tmp_path / "models", "simclr-baseline", {"linear/cfmnist/class/top1": 70.0})

    run = tracker.client.get_run(run_id)
    assert run.data.tags["group"] == tighter.group_hash()
    assert run.data.metrics["linear/cfmnist/class/top1"] == 70.0
    assert run.data.tags["method"] == "simclr" and run.data.tags["variant"] == "baseline"
