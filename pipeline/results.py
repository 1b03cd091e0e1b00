"""Reading finished runs back: the public interface the report and the study use.

* :func:`collect_results`: every finished run of one configuration (MLflow tag ``group``), the newest of
  each (method, variant, λ, seed), with its metrics and loss / kNN-monitor curves; from MLflow (every seed
  and λ ever run with the configuration) or, when MLflow is off, unreachable or holds none of them, from
  the workspace's files (``models/<model>/run.json``, ``metrics.json``, ``timing.json``, ``losses.csv``,
  ``monitor.csv`` and ``metrics/<model>/*.json``).
* :func:`runs_from_mlflow`: the MLflow half of it alone (the study ledger exports from it).
* :func:`collect_items`: per run, the per-item scores the paired statistics need, from the run's MLflow
  artifacts or its ``metrics/<model>/`` files: the per-item file of each evaluation task that has one,
  read by its record's ``scores`` hook (:mod:`pipeline.evaluate.tasks`).
* :func:`item_scores`: the scores of every per-item file of one model, given a reader of its files (the
  study ledger reads them from DVC experiment commits).
* :data:`RUN_INFO_FILE`: the name of the run file it reads (defined by the stage that writes it,
  :mod:`pipeline.tracking`).

Writing is :mod:`pipeline.tracking`'s (the logger the stages call while they run); this module reads
the same store (:func:`pipeline.tracking.tracking_uri`, whose import also caps MLflow's HTTP retries) and
writes nothing to it but the re-pointed artifact locations of a copied project
(:func:`pipeline.tracking.relocate_artifacts`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from pipeline.config import flatten
from pipeline.evaluate import tasks
from pipeline.params import Params
from pipeline.tracking import RUN_INFO_FILE, model_name, relocate_artifacts, tracking_uri

__all__ = ["RUN_INFO_FILE", "collect_items", "collect_results", "item_scores", "runs_from_mlflow"]


def runs_from_mlflow(params: Params) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """This configuration's model runs in MLflow (tag ``group`` = :meth:`Params.group_hash`, a method of
    ``ssl.methods``, a pretraining loss logged), the newest of each (method, variant, λ, seed): (runs table
    with their tags and metrics, {run id: its ``pretrain/loss*`` and ``monitor/*`` history by step})."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri())
    df = mlflow.search_runs(experiment_names=[params.tracking.experiment],
                            filter_string=f"tags.group = '{params.group_hash()}'")
    if df.empty:
        return pd.DataFrame(), {}
    runs = pd.DataFrame({
        "run_id": df["run_id"],
        "method": df["tags.method"],
        "variant": df["tags.variant"],
        "lambda": df["tags.lambda"].astype(float),
        "seed": df["tags.seed"].astype(int),
        "group": df["tags.group"],
        "commit": df.get("tags.commit", ""),
        "dvc_exp": df.get("tags.dvc_exp", ""),
        "start_time": df["start_time"],
    })
    metric_cols = [c for c in df.columns if c.startswith("metrics.")]
    for c in metric_cols:
        runs[c[len("metrics."):]] = df[c].values
    runs = runs[runs["method"].isin(params.ssl.methods)]
    runs = runs.dropna(subset=[c for c in runs.columns if c == "pretrain/loss_ssl"])
    # A configuration re-run (dvc repro -f, or the same exp twice) leaves several runs: keep the newest.
    runs = (runs.sort_values("start_time").groupby(["method", "variant", "lambda", "seed"], as_index=False).tail(1)
            .reset_index(drop=True))
    client = MlflowClient(tracking_uri=tracking_uri())
    curves = {}
    for run_id in runs["run_id"]:
        cols = {}
        for key in [k for k in client.get_run(run_id).data.metrics if k.startswith(("pretrain/loss", "monitor/"))]:
            hist = client.get_metric_history(run_id, key)
            cols[key] = pd.Series({m.step: m.value for m in hist})
        if cols:
            curve = pd.DataFrame(cols).sort_index()
            curve.index.name = "step"
            curves[run_id] = curve.reset_index()
    return runs, curves


def _runs_from_files(params: Params, models_dir: Path, metrics_dir: Path) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    rows, curves = [], {}
    for method in params.ssl.methods:
        for variant in params.variants:
            name = model_name(method, variant)
            info_path = models_dir / name / RUN_INFO_FILE
            if not info_path.exists():
                continue
            info = json.loads(info_path.read_text())
            row = {k: info.get(k) for k in ("method", "variant", "lambda", "seed", "group", "commit", "dvc_exp")}
            row["run_id"] = info.get("run_id") or f"file:{name}"
            row["start_time"] = info.get("start_time")
            for f in [models_dir / name / "metrics.json", models_dir / name / "timing.json",
                      *sorted((metrics_dir / name).glob("*.json"))]:
                if f.exists():
                    row.update({k: v for k, v in flatten(json.loads(f.read_text())).items()
                                if isinstance(v, (int, float))})
            rows.append(row)
            losses = models_dir / name / "losses.csv"
            if losses.exists():
                curves[row["run_id"]] = pd.read_csv(losses)
            monitor = models_dir / name / "monitor.csv"      # kNN monitor points: joined on the step
            if monitor.exists() and row["run_id"] in curves:
                curves[row["run_id"]] = curves[row["run_id"]].merge(
                    pd.read_csv(monitor).drop(columns="epoch"), on="step", how="outer")
    return pd.DataFrame(rows), curves


def collect_results(params: Params, models_dir: Path = Path("models"), metrics_dir: Path = Path("metrics"),
                    source: str = "auto") -> tuple[pd.DataFrame, dict[str, pd.DataFrame], str]:
    """All finished runs of this configuration: (runs, loss curves, where they came from).

    ``source='auto'`` reads MLflow (every seed and λ ever run with this configuration) and falls back
    to the workspace's metrics files when MLflow is disabled, unreachable or holds none of them.
    """
    if source in ("auto", "mlflow") and params.tracking.enabled:
        try:
            relocate_artifacts(params.tracking.experiment)      # a copied project reads its own artifacts
            runs, curves = runs_from_mlflow(params)
            if not runs.empty:
                return runs, curves, f"MLflow ({tracking_uri()})"
            if source == "mlflow":
                return runs, curves, f"MLflow ({tracking_uri()})"
        except Exception as e:  # noqa: BLE001
            if source == "mlflow":
                raise
            print(f"WARNING: could not read runs from MLflow at {tracking_uri()} "
                  f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); building the report from the "
                  f"metrics files instead.", file=sys.stderr)
    runs, curves = _runs_from_files(params, models_dir, metrics_dir)
    return runs, curves, "metrics files (models/, metrics/)"


def item_scores(open_items: Callable[[str], "np.lib.npyio.NpzFile | None"]) -> dict[str, "np.ndarray"]:
    """Per-item scores in % keyed by the metric column they belong to, from every evaluation task with a
    per-item file (:func:`pipeline.evaluate.tasks.with_items`, in the registry's order): ``open_items(name)``
    opens that file of one model (None where it has none), the task's ``scores`` hook reads it (linear
    ``pred == label``, few-shot the episode accuracy)."""
    out = {}
    for task in tasks.with_items():
        arrays = open_items(task.items)
        if arrays is not None:
            with arrays:
                out.update(task.scores(arrays))
    return out


def collect_items(params: Params, runs: pd.DataFrame, models_dir: Path = Path("models"),
                  metrics_dir: Path = Path("metrics"), source: str = "auto") -> dict[str, dict[str, "np.ndarray"]]:
    """Per run id, the per-item scores the paired statistics need (``{metric column: scores}``).

    A run's npz files are its MLflow artifacts (every seed and λ in the store); a run read from the
    files (or whose artifacts cannot be fetched) uses ``metrics/<method>-<variant>/*.npz`` when that
    directory belongs to it (``models/<model>/run.json`` names the same run, or the runs came from
    files).  Runs without them are simply absent: the report then falls back to unpaired statistics.
    """
    import tempfile

    import numpy as np

    out: dict[str, dict[str, np.ndarray]] = {}
    client = None
    if source in ("auto", "mlflow") and params.tracking.enabled:
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=tracking_uri())
        except Exception:  # noqa: BLE001 - MLflow missing or broken: files only
            client = None
    for _, run in runs.iterrows():
        run_id = str(run["run_id"])
        local = Path(metrics_dir) / model_name(str(run["method"]), str(run["variant"]))
        info = Path(models_dir) / local.name / RUN_INFO_FILE
        owner = json.loads(info.read_text()).get("run_id") if info.exists() else None

        def open_items(name: str):
            path = None
            if client is not None and not run_id.startswith("file:"):
                try:
                    path = Path(client.download_artifacts(run_id, name, tempfile.mkdtemp(prefix="items-")))
                except Exception:  # noqa: BLE001 - no such artifact (older run) or store down
                    path = None
            if path is None and (local / name).exists() and (run_id.startswith("file:") or owner in (None, run_id)):
                path = local / name
            return np.load(path) if path is not None and path.exists() else None

        scores = item_scores(open_items)
        if scores:
            out[run_id] = scores
    return out
