"""One record per evaluation task (issue 25 item 3): adding one is its ``evaluate`` plus its record, a checked property.

A toy evaluation task ``centroid`` (the nearest class mean of the frozen training features, per test image
right or wrong) is defined here only: its ``evaluate`` and its record (:class:`pipeline.evaluate.tasks.
EvalTask`).  Registered for one test, it is a step of ``stages/evaluate.py``, writes its metrics, diagnostics
and per-item file, refuses bad params in the validate stage, and its metric and per-item scores reach the
report's tables, figures and paired differences, the study ledger and the study's queued targets, with no
other file edited; unregistered, every reader ignores or refuses it again.
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.config import ConfigError, to_dict
from pipeline.evaluate import tasks
from pipeline.evaluate.tasks import Column, EvalTask, Evaluation
from pipeline.params import DataParams, DatasetEntry, Params, TrackingParams


def _centroid(ctx) -> Evaluation:
    """Nearest class mean (squared Euclidean) of every downstream task on the model's frozen features."""
    metrics, items = {}, {}
    for name, task, a in ctx.features():
        t0 = time.perf_counter()
        y = a[f"train_{task}"]
        classes = np.unique(y)
        means = np.stack([a["train_x"][y == c].mean(0) for c in classes])
        nearest = classes[((a["test_x"][:, None, :] - means[None]) ** 2).sum(-1).argmin(1)]
        correct = nearest == a[f"test_{task}"]
        metrics[f"centroid/{name}/{task}/top1"] = 100.0 * float(correct.mean())
        items[f"{name}/{task}/correct"] = correct.astype(np.uint8)
        ctx.said(f"{ctx.model}: nearest class mean on {name}/{task}", t0)
    return Evaluation(metrics, {"classifier": "nearest class mean, squared Euclidean"}, items=items)


def _centroid_scores(arrays) -> dict[str, np.ndarray]:
    return {f"centroid/{k[: -len('/correct')]}/top1": 100.0 * arrays[k].astype(np.float64)
            for k in arrays.files if k.endswith("/correct")}


def _needs_a_task(params: Params) -> None:
    if not params.data.downstream:
        raise ConfigError("centroid: no downstream task to classify; list tasks under data.datasets")


CENTROID = EvalTask(
    "centroid", _centroid, title="Nearest class mean: top-1 accuracy (%)", figure="nearest-class-mean top-1",
    metric="centroid/<dataset>/<task>/top1",
    columns=(Column(r"^centroid/(?P<dataset>[^/]+)/(?P<task>[^/]+)/top1$", "{dataset}/{task}", "top-1 accuracy (%)", 2),),
    expected=lambda p: [f"centroid/{d}" + "/top1" for d in p.data.downstream],
    params=("seed", "tracking"), items="centroid_predictions.npz", scores=_centroid_scores, check=_needs_a_task)


@pytest.fixture
def centroid():
    """The toy task's record, registered for one test (removed afterwards)."""
    with tasks.registered(CENTROID):
        yield CENTROID
    assert "centroid" not in tasks.names()


MODELS = {"baseline": 0.0, "augself": 1.0}


def _params() -> Params:
    return Params(data=DataParams(pretrain="cfmnist", datasets={"cfmnist": DatasetEntry(tasks=["class"])}),
                  variants=list(MODELS), tracking=TrackingParams(enabled=False))


def _project(tmp_path, params: Params):
    """Frozen features of two models (the AugSelf one's classes further apart) and their run.json."""
    rng = np.random.default_rng(0)
    for variant, lam in MODELS.items():
        spread = 1.0 if variant == "baseline" else 1.6
        arrays = {}
        for split, n in (("train", 120), ("test", 90)):
            y = np.arange(n) % 3
            arrays[f"{split}_x"] = (spread * np.eye(3, 8)[y] + rng.normal(size=(n, 8))).astype(np.float32)
            arrays[f"{split}_class"] = y.astype(np.int64)
        (tmp_path / "features" / f"simclr-{variant}").mkdir(parents=True)
        np.savez(tmp_path / "features" / f"simclr-{variant}" / "cfmnist.npz", **arrays)
        (tmp_path / "models" / f"simclr-{variant}").mkdir(parents=True)
        (tmp_path / "models" / f"simclr-{variant}" / "run.json").write_text(json.dumps(
            {"method": "simclr", "variant": variant, "lambda": lam, "seed": params.seed, "group": params.group_hash()}))
    return {k: tmp_path / k for k in ("models", "features", "metrics")}


def test_the_toy_is_unknown_without_its_record():
    from pipeline.report.schema import metric_spec
    from pipeline.study.ledger import expected_metrics
    from pipeline.workflow import evaluation_steps

    assert "centroid" not in evaluation_steps()
    assert metric_spec("centroid/cfmnist/class/top1") is None
    assert not any(c.startswith("centroid/") for c in expected_metrics(_params()))
    with pytest.raises(KeyError, match="unknown evaluation task 'centroid'"):
        tasks.get("centroid")


def test_a_toy_evaluation_task_reaches_the_report_and_the_study_through_its_record(centroid, tmp_path, capsys,
                                                                                  monkeypatch):
    from pipeline.report.schema import metric_spec
    from pipeline.study.ledger import expected_metrics
    from pipeline.study.plan import ModelKey, dvc_queue_command, experiments_for
    from pipeline.study.report import eval_steps
    from pipeline.workflow import check_evaluations, evaluation_steps, run_evaluation_step, run_report
    from stages.evaluate import main as evaluate_stage

    params = _params()
    dirs = _project(tmp_path, params)

    # a step of stages/evaluate.py, and a refusal of the validate stage
    assert evaluation_steps() == ("features", *tasks.names()) and tasks.names()[-1] == "centroid"
    check_evaluations(params)
    with pytest.raises(ConfigError, match="centroid: no downstream task"):
        check_evaluations(dataclasses.replace(params, data=DataParams(pretrain="cfmnist",
                                                                      datasets={"cfmnist": DatasetEntry()})))

    # its stage (stages/evaluate.py, as dvc.yaml would run it): metrics, diagnostics and per-item file
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(to_dict(params)))
    assert evaluate_stage(["centroid", "simclr-baseline"]) == 0
    assert evaluate_stage(["nosuch", "simclr-baseline"]) == 2
    assert f"allowed values: {', '.join(evaluation_steps())}" in capsys.readouterr().err
    for model in ("simclr-baseline", "simclr-augself"):
        metrics = run_evaluation_step("centroid", params, model, dirs["models"], dirs["features"], dirs["metrics"])
        assert list(metrics) == ["centroid/cfmnist/class/top1"]
        out = dirs["metrics"] / model
        assert json.loads((out / "centroid.json").read_text()) == metrics
        assert "classifier" in json.loads((out / "centroid_diagnostics.json").read_text())
        with np.load(out / "centroid_predictions.npz") as f:
            assert f["cfmnist/class/correct"].shape == (90,)
    assert "[centroid] simclr-augself: nearest class mean on cfmnist/class" in capsys.readouterr().err

    # the report: its table (with the Δ row), its figures, results.csv and the paired differences
    report = tmp_path / "reports"
    run_report(params, dirs["models"], dirs["metrics"], report, tmp_path / "params.yaml")
    spec = metric_spec("centroid/cfmnist/class/top1")
    assert (spec.family, spec.label, spec.decimals) == ("centroid", "cfmnist/class", 2)
    readme = (report / "README.md").read_text()
    assert "## Nearest class mean: top-1 accuracy (%)" in readme
    assert "| **simclr** | **Δ AugSelf − baseline** | **1 (default)** |" in readme
    assert (report / "figures" / "fig_bars_centroid.png").exists()
    assert "centroid/cfmnist/class/top1/mean" in pd.read_csv(report / "results.csv").columns
    diffs = pd.read_csv(report / "differences.csv").set_index("metric")
    with np.load(dirs["metrics"] / "simclr-augself" / "centroid_predictions.npz") as a, \
            np.load(dirs["metrics"] / "simclr-baseline" / "centroid_predictions.npz") as b:
        by_hand = 100.0 * (a["cfmnist/class/correct"].astype(float) - b["cfmnist/class/correct"].astype(float)).mean()
    assert diffs.loc["centroid/cfmnist/class/top1", "delta"] == pytest.approx(by_hand)
    assert by_hand > 0

    # the study: the ledger waits for its metric and its per-item scores, experiments queue its stage,
    # the cost table has its seconds
    assert "centroid/cfmnist/class/top1" in expected_metrics(params)
    assert tasks.task_of("centroid/cfmnist/class/top1") is centroid
    cmd = dvc_queue_command(experiments_for([ModelKey("simclr", "augself", 1.0, "strong", 0)])[0])
    assert cmd[-len(tasks.names()):] == list(tasks.names()) and cmd[-1] == "centroid"
    assert eval_steps()[-1] == "centroid"


def test_the_ledger_reads_the_toys_per_item_scores(centroid, tmp_path):
    from pipeline.results import collect_items, collect_results

    params = _params()
    dirs = _project(tmp_path, params)
    from pipeline.workflow import run_task

    run_task("centroid", params, "simclr-augself", dirs["models"], dirs["features"], dirs["metrics"])
    runs, _, _ = collect_results(params, dirs["models"], dirs["metrics"])
    items = collect_items(params, runs, dirs["models"], dirs["metrics"])
    assert list(items) == ["file:simclr-augself"]
    assert list(items["file:simclr-augself"]) == ["centroid/cfmnist/class/top1"]
    assert set(np.unique(items["file:simclr-augself"]["centroid/cfmnist/class/top1"])) <= {0.0, 100.0}


def test_registry_refuses_a_second_record_of_a_name_or_a_file_and_inconsistent_records():
    with pytest.raises(ValueError, match="registered already"):
        tasks.register(dataclasses.replace(CENTROID, name="linear", columns=()))
    with pytest.raises(ValueError, match="belongs to another task"):
        tasks.register(dataclasses.replace(CENTROID, items="linear_predictions.npz"))
    assert "centroid" not in tasks.names()
    with pytest.raises(ValueError, match="go together"):
        dataclasses.replace(CENTROID, scores=None)
    with pytest.raises(ValueError, match="must start with"):
        dataclasses.replace(CENTROID, columns=(Column(r"^linear/(?P<x>.+)$", "{x}", "", 2),))
    with pytest.raises(ValueError, match="not one of"):
        dataclasses.replace(CENTROID, name="features")
