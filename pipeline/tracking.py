"""The one place that talks to MLflow.

* Store: ``MLFLOW_TRACKING_URI`` when set, else a SQLite file ``mlflow.db`` in the project root.  The
  root is ``$DVC_ROOT`` when DVC runs the stage (for queued experiments DVC points it at the parent
  repository, not the temporary copy the experiment runs in), so every run of every experiment lands
  in the same store.
* One MLflow run per pretrained model (method, variant, λ, seed).  Pretraining creates it and writes its
  id to ``models/<method>-<variant>/mlflow_run_id``; evaluation stages log into that same run.
* Runs of one configuration share the tag ``group`` (hash of all params except seed, λ and the method
  list), so the MLflow UI's compare view and the report line them up by method and λ.
* MLflow is never allowed to lose work: every call goes through :meth:`Tracker._safe`; on failure the
  stage prints one clear message and carries on, since every metric is also written to files under
  ``metrics/`` and ``models/`` that the report can read without MLflow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from pipeline.config import flatten, to_dict
from pipeline.params import Params

# Fail fast against a tracking server that is down (MLflow's defaults retry for minutes).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")

RUN_ID_FILE = "mlflow_run_id"
RUN_INFO_FILE = "run.json"
TAG_KEYS = ("method", "variant", "lambda", "seed", "group", "commit", "dvc_exp")


def project_root() -> Path:
    """The repository the results belong to (the parent repo for queued DVC experiments)."""
    env = os.environ.get("DVC_ROOT")
    if env:
        return Path(env).resolve()
    here = Path.cwd().resolve()
    for d in (here, *here.parents):
        if (d / "dvc.yaml").exists() or (d / ".git").exists():
            # A queued experiment's temp copy lives at <root>/.dvc/tmp/exps/<x>: report to <root>.
            parts = d.parts
            if ".dvc" in parts:
                return Path(*parts[: parts.index(".dvc")])
            return d
    return here


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def git_commit(cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def run_tags(params: Params, method: str, variant: str) -> dict[str, str]:
    return {
        "method": method,
        "variant": variant,
        "lambda": repr(params.lambda_for(variant)),
        "seed": str(params.seed),
        "group": params.group_hash(),
        "commit": git_commit(),
        "dvc_exp": os.environ.get("DVC_EXP_NAME", ""),
        "mlflow.runName": f"{method}-{variant}-lam{params.lambda_for(variant):g}-seed{params.seed}",
    }


def model_name(method: str, variant: str) -> str:
    return f"{method}-{variant}"


class Tracker:
    """MLflow logging that degrades to a clear warning instead of failing the stage."""

    def __init__(self, params: Params, enabled: bool | None = None):
        self.params = params
        self.enabled = params.tracking.enabled if enabled is None else enabled
        self.failed = False
        self._client = None

    # -- plumbing -----------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=tracking_uri())
        return self._client

    def _safe(self, what: str, fn: Callable[[], Any], retries: int = 5) -> Any:
        """Run one MLflow call; retry SQLite lock contention; on failure warn once and disable."""
        if not self.enabled or self.failed:
            return None
        delay = 0.5
        for attempt in range(retries):
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - any MLflow/backend failure must not stop training
                locked = "locked" in str(e).lower() or "busy" in str(e).lower()
                if locked and attempt + 1 < retries:
                    time.sleep(delay)
                    delay *= 2
                    continue
                self.failed = True
                print(f"WARNING: MLflow logging failed while trying to {what} at {tracking_uri()}: "
                      f"{type(e).__name__}: {str(e).splitlines()[0][:300]}\n"
                      f"         Training and evaluation go on; metrics are still written to the files "
                      f"under models/ and metrics/, and `dvc repro report` builds the report from them.",
                      file=sys.stderr, flush=True)
                return None
        return None

    def _experiment_id(self) -> str:
        name = self.params.tracking.experiment
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        # With the local SQLite store MLflow would put artifacts under ./mlruns of whatever directory the
        # stage runs in (a queued experiment's temporary copy): pin them to the project root instead.
        artifacts = None if os.environ.get("MLFLOW_TRACKING_URI") else (project_root() / "mlartifacts").as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=artifacts)
        except Exception:  # created concurrently by another stage: read it back
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    # -- API used by the stages ---------------------------------------------------------------
    def start_model_run(self, method: str, variant: str, reuse_run_id: str | None = None) -> str | None:
        """Create the model's run (or reuse ``reuse_run_id`` when resuming) and log params + tags."""
        def create() -> str:
            if reuse_run_id:
                run = self.client.get_run(reuse_run_id)
                self.client.update_run(run.info.run_id, status="RUNNING")
                return run.info.run_id
            tags = run_tags(self.params, method, variant)
            run = self.client.create_run(self._experiment_id(), tags=tags, run_name=tags["mlflow.runName"])
            flat = flatten(to_dict(self.params))
            from mlflow.entities import Param

            batch = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in flat.items()]
            for i in range(0, len(batch), 100):
                self.client.log_batch(run.info.run_id, params=batch[i:i + 100])
            return run.info.run_id

        return self._safe("create the model's run", create)

    def log_metrics(self, run_id: str | None, metrics: dict[str, float], step: int | None = None) -> None:
        if not run_id or not metrics:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if v is not None]
        self._safe("log metrics", lambda: self.client.log_batch(run_id, metrics=batch))

    def set_tags(self, run_id: str | None, tags: dict[str, str]) -> None:
        if run_id:
            self._safe("set tags", lambda: [self.client.set_tag(run_id, k, v) for k, v in tags.items()])

    def log_artifact(self, run_id: str | None, path: Path) -> None:
        if run_id and Path(path).exists():
            self._safe(f"upload {path}", lambda: self.client.log_artifact(run_id, str(path)))

    def end_run(self, run_id: str | None, status: str = "FINISHED") -> None:
        if run_id:
            self._safe("end the run", lambda: self.client.set_terminated(run_id, status=status))


def read_run_id(model_dir: Path) -> str | None:
    p = Path(model_dir) / RUN_ID_FILE
    if p.exists():
        text = p.read_text().strip()
        return text or None
    return None


# -- reading results back (the report) ---------------------------------------------------------
def _runs_from_mlflow(params: Params) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
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
        for key in [k for k in client.get_run(run_id).data.metrics if k.startswith("pretrain/loss")]:
            hist = client.get_metric_history(run_id, key)
            cols[key] = pd.Series({m.step: m.value for m in hist})
        if cols:
            curve = pd.DataFrame(cols).sort_index()
            curve.index.name = "step"
            curves[run_id] = curve.reset_index()
    return runs, curves


def _runs_from_files(params: Params, models_dir: Path, metrics_dir: Path) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    rows, curves = [], {}
    from pipeline.params import VARIANTS

    for method in params.ssl.methods:
        for variant in VARIANTS:
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
    return pd.DataFrame(rows), curves


def collect_results(params: Params, models_dir: Path = Path("models"), metrics_dir: Path = Path("metrics"),
                    source: str = "auto") -> tuple[pd.DataFrame, dict[str, pd.DataFrame], str]:
    """All finished runs of this configuration: (runs, loss curves, where they came from).

    ``source='auto'`` reads MLflow (every seed and λ ever run with this configuration) and falls back
    to the workspace's metrics files when MLflow is disabled, unreachable or holds none of them.
    """
    if source in ("auto", "mlflow") and params.tracking.enabled:
        try:
            runs, curves = _runs_from_mlflow(params)
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


ITEM_FILES = {"linear": "linear_predictions.npz", "fewshot": "fewshot_episodes.npz"}


def _item_scores(family: str, arrays) -> dict[str, "np.ndarray"]:
    """Per-item scores in % keyed by the metric column they belong to: linear ``pred == label``,
    few-shot the episode accuracy."""
    import numpy as np

    out = {}
    if family == "linear":
        for key in arrays.files:
            if key.endswith("/pred"):
                task = key[: -len("/pred")]
                out[f"linear/{task}/top1"] = 100.0 * (arrays[key] == arrays[f"{task}/label"]).astype(np.float64)
    else:
        for key in arrays.files:
            if key.endswith("/acc"):
                out[f"fewshot/{key[: -len('/acc')]}"] = 100.0 * np.asarray(arrays[key], dtype=np.float64)
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
        scores: dict[str, np.ndarray] = {}
        local = Path(metrics_dir) / model_name(str(run["method"]), str(run["variant"]))
        info = Path(models_dir) / local.name / RUN_INFO_FILE
        owner = json.loads(info.read_text()).get("run_id") if info.exists() else None
        for family, name in ITEM_FILES.items():
            path = None
            if client is not None and not run_id.startswith("file:"):
                try:
                    path = Path(client.download_artifacts(run_id, name, tempfile.mkdtemp(prefix="items-")))
                except Exception:  # noqa: BLE001 - no such artifact (older run) or store down
                    path = None
            if path is None and (local / name).exists() and (run_id.startswith("file:") or owner in (None, run_id)):
                path = local / name
            if path is not None and path.exists():
                with np.load(path) as arrays:
                    scores.update(_item_scores(family, arrays))
        if scores:
            out[run_id] = scores
    return out
