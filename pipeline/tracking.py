"""Writing to MLflow: where the store is and the logger the stages call while they run.
(Reading finished runs back, for the report and the study, is :mod:`pipeline.results`.)

* Store: ``MLFLOW_TRACKING_URI`` when set, else a SQLite file ``mlflow.db`` in the project root.  The
  root is ``$DVC_ROOT`` when DVC runs the stage (for queued experiments DVC points it at the parent
  repository, not the temporary copy the experiment runs in), so every run of every experiment lands
  in the same store.
* One MLflow run per pretrained model (method, variant, λ, seed).  Pretraining creates it and writes its
  id to ``models/<method>-<variant>/mlflow_run_id``; evaluation stages log into that same run.
* Runs of one configuration share the tag ``group`` (:meth:`Params.group_hash`: all params but seed, λ,
  the method list and the keys named there), so the MLflow UI's compare view and the report line them up by method and λ.
* The experiment carries ``mlflow.experimentKind = custom_model_development`` (set on creation and on
  an existing experiment that lacks it): without it MLflow 3's UI opens on the GenAI overview (traces,
  tokens) instead of the runs table.
* One parent run per configuration group (tag ``group_run = <group>``, run name ``group <group>``, the
  group's params logged on it); every model run is nested under it (``mlflow.parentRunId``), so the UI's
  tree lines the runs of one ``dvc repro`` / study up by method, variant, λ and seed.  The parent does
  not carry the ``group`` tag itself, so the report's ``tags.group`` query reads model runs only.
* Inputs: the prepared datasets are logged with :meth:`Tracker.log_datasets` (context ``pretraining`` /
  ``evaluation``), name = the dataset and the splits that context reads (``cfmnist/train``,
  ``cfmnist/train+test``), digest = the first 16 hex digits of a sha256 over meta.json's sha256 of those
  split files (:func:`context_splits`; MLflow's digest column holds 36 characters; the full per-file
  hashes are in the dataset's profile).
* Run names ``<method>-<variant> λ=<λ> seed <seed>``; Source and User are MLflow's own context tags
  (:func:`source_tags`: entry point ``stages.pretrain``, git commit and branch, user), which the client's
  ``create_run`` leaves out.
* Output: the final backbone as an MLflow model (:meth:`Tracker.log_backbone`), a LoggedModel whose
  metrics are the evaluation results (the evaluation stages log each metric with its ``model_id`` and,
  where the key names one, its dataset).  It is saved in PyTorch's ``pt2`` format (``torch.export``):
  the weights as raw tensors plus the traced graph, which MLflow checks to be free of pickles before it
  loads it; MLflow's other format pickles the ``nn.Module`` (code runs on load) and is not used.  The
  weights are stored once in MLflow (the ``final.pt`` is not uploaded as a run artifact besides);
  ``final.pt`` lives in DVC (cache + remote).
* System metrics (CPU, memory, disk, network; GPU through pynvml) are sampled on pretraining runs by
  MLflow's ``SystemMetricsMonitor`` when ``psutil`` is importable, and skipped otherwise (GPU metrics
  only when ``pynvml`` is); ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` sets the period (default 10 s).
* Artifacts of the local store live in ``<project>/mlartifacts``.  MLflow stores their locations as
  absolute URIs; a copied or moved project's store is re-pointed at its own ``mlartifacts/`` when a stage
  or the report opens it, or by ``python -m pipeline.tracking relocate`` (:func:`relocate_artifacts`).
* MLflow is never allowed to lose work: every call goes through :meth:`Tracker._safe`; on failure the
  stage prints one clear message and carries on, since every metric is also written to files under
  ``metrics/`` and ``models/`` that the report can read without MLflow (:mod:`pipeline.results`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from pipeline.config import flatten, to_dict
from pipeline.params import Params
from pipeline.request import RunRequest

# Fail fast against a tracking server that is down (MLflow's defaults retry for minutes).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")

RUN_ID_FILE = "mlflow_run_id"
RUN_INFO_FILE = "run.json"
TAG_KEYS = ("method", "variant", "lambda", "seed", "group", "commit", "dvc_exp")
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
GROUP_RUN_TAG = "group_run"          # on a configuration group's parent run: the group hash
MODEL_ID_TAG = "model_id"            # on a model run: the LoggedModel of its final backbone
DATASET_DIGEST_CHARS = 16


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


def is_server_uri(uri: str) -> bool:
    """A tracking server (http, https, databricks…), as opposed to a local store (sqlite, file, a path)."""
    if "://" not in uri and ":" not in uri:
        return uri == "databricks"                      # else a directory path: a local file store
    return uri.split(":", 1)[0].lower() not in ("sqlite", "file")


def display_uri(uri: str) -> str:
    """``uri`` as a reader of the committed report should see it: the default store inside the project
    as ``sqlite:///mlflow.db`` (relative to the project root), not the building machine's absolute path;
    any other URI (a server) unchanged."""
    local = f"sqlite:///{project_root() / 'mlflow.db'}"
    return "sqlite:///mlflow.db" if uri == local else uri


ARTIFACTS_DIR = "mlartifacts"


def _local_store(uri: str) -> Path | None:
    """The SQLite file of a ``sqlite:///`` tracking URI (None for any other store)."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def relocate_artifacts(experiment: str, root: Path | None = None) -> str | None:
    """Point a copied or moved project's store at its own ``mlartifacts/``; returns the old root or None.

    MLflow keeps artifact locations absolute (``file:///old/clone/mlartifacts/<run>/artifacts``): a local
    store never holds a relative one (``create_experiment`` resolves it against the working directory,
    mlflow/mlflow#7670; a relative location is the open feature request mlflow/mlflow#3144), and no client
    API changes a run's or a LoggedModel's artifact location.  So when the project's own store
    (``<root>/mlflow.db``) names another folder's ``mlartifacts`` (the clone it was copied from), the
    experiment's, its runs' and its LoggedModels' locations under that old root are rewritten to this
    root in the SQLite file, as long as the artifacts came along (``<root>/mlartifacts`` exists) or the
    old folder is gone.  Without that, a copy's reads resolve to the old clone (or nothing) and its new
    runs write their artifacts into the old clone.  Stores elsewhere (a server, ``MLFLOW_TRACKING_URI``
    naming another file) are left alone: a server keeps its own artifact root.
    """
    import sqlite3
    import urllib.parse

    root = Path(root or project_root()).resolve()
    db = _local_store(tracking_uri())
    if db is None or db.resolve() != root / "mlflow.db" or not db.exists():
        return None
    new = (root / ARTIFACTS_DIR).as_uri()
    with sqlite3.connect(db, timeout=60) as con:
        row = con.execute("SELECT artifact_location FROM experiments WHERE name = ?", (experiment,)).fetchone()
        old = row[0] if row else None
        if not old or old == new or not old.startswith("file://") or not old.endswith("/" + ARTIFACTS_DIR):
            return None
        old_root = Path(urllib.parse.unquote(urllib.parse.urlsplit(old).path)).parent
        if not (root / ARTIFACTS_DIR).exists() and (old_root / ARTIFACTS_DIR).exists():
            return None                               # the artifacts stayed behind: keep reading them there
        for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                              ("logged_models", "artifact_location")):
            con.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE substr({column}, 1, ?) = ?",
                        (new, len(old) + 1, len(old), old))
    return str(old_root)


def dataset_digest(sha256: dict[str, str]) -> str:
    """A short digest of a prepared dataset from meta.json's per-file sha256 (order independent)."""
    text = "\n".join(f"{name}:{digest}" for name, digest in sorted(sha256.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:DATASET_DIGEST_CHARS]


def context_splits(meta: dict, context: str) -> list[str]:
    """The splits of a prepared dataset that a ``pretraining`` / ``evaluation`` run reads.

    Pretraining reads meta.json's ``pretrain_splits`` (STL-10: train + unlabeled), evaluation the
    labelled train and test splits (the probe only test; it is logged with the evaluation dataset).  The
    digest is taken over those files, so the two contexts are two datasets to MLflow, which keeps one
    input (one context) per dataset and run.
    """
    if context == "pretraining":
        return list(meta["pretrain_splits"])
    return [split for split in ("train", "test") if split in meta["splits"]]


def dataset_input_name(name: str, splits: list[str]) -> str:
    """A dataset input's name in MLflow: the dataset and the splits read, ``cfmnist/train`` (pretraining),
    ``cfmnist/train+test`` (evaluation: the probes fit on train and report test), ``stl10/train+unlabeled``."""
    return f"{name}/{'+'.join(splits)}"


def system_metrics_available() -> bool:
    """MLflow's CPU/memory sampler needs psutil (GPU sampling additionally pynvml, checked by MLflow)."""
    return importlib.util.find_spec("psutil") is not None


def group_params(params: Params) -> dict[str, str]:
    """The flattened params that define a configuration group (:meth:`Params.group_config`, what the hash covers)."""
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in flatten(params.group_config()).items()}


def git_commit(cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def git_branch(cwd: Path | None = None) -> str:
    """The checked-out branch ("" when detached, as in a queued DVC experiment's copy, or not a repo)."""
    try:
        out = subprocess.run(["git", "symbolic-ref", "--short", "-q", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def entry_point() -> str:
    """What was run: the module of ``python -m stages.pretrain`` / ``torchrun -m …`` (``stages.pretrain``),
    else the script as given (``sys.argv[0]``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return spec.name.removesuffix(".__main__")
    return sys.argv[0] if sys.argv and sys.argv[0] else "<console>"


def source_tags() -> dict[str, str]:
    """The run's Source and User columns in the MLflow UI: the same context tags MLflow puts on a
    LoggedModel (``mlflow.tracking.context.registry.resolve_tags``: ``mlflow.user``, ``mlflow.source.type``,
    git commit / branch / repo URL of the entry script), which ``MlflowClient.create_run`` does not add,
    with ``mlflow.source.name`` the entry point's module (not the clone's absolute path) and the git
    commit and branch of the working directory (the clone the stage runs in) where known."""
    from mlflow.tracking.context import registry

    tags = {k: str(v) for k, v in registry.resolve_tags().items()}
    tags["mlflow.source.name"] = entry_point()
    for key, value in (("mlflow.source.git.commit", git_commit()), ("mlflow.source.git.branch", git_branch())):
        if value:
            tags[key] = value
    return tags


def run_name(request: RunRequest) -> str:
    """The run's name in the MLflow UI, e.g. ``simclr-augself λ=1 seed 0``."""
    return f"{model_name(request.method, request.variant)} λ={request.lam:g} seed {request.params.seed}"


def run_tags(request: RunRequest) -> dict[str, str]:
    params = request.params
    return {
        "method": request.method,
        "variant": request.variant,
        "lambda": repr(request.lam),
        "seed": str(params.seed),
        "group": params.group_hash(),
        "commit": git_commit(),
        "dvc_exp": os.environ.get("DVC_EXP_NAME", ""),
        "mlflow.runName": run_name(request),
    }


def run_params(request: RunRequest) -> dict[str, str]:
    """The params a model run trained with (DESIGN.md, "Metrics and names"): the sections of the other
    variants are left out (the run did not read them), ``augself.lambda`` is the effective λ (0 for the
    baseline and CASSLE), and ``method``, ``variant``, ``lambda`` are params as well as tags, so MLflow's
    compare view ("show diff only") shows what differs between a baseline and an AugSelf run."""
    from pipeline.params import VARIANTS

    d = to_dict(request.params)
    for other in VARIANTS:
        if other != request.variant:
            d.pop(other, None)
    flat = {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in flatten(d).items()}
    lam = repr(request.lam)
    flat["augself.lambda"] = lam
    flat.update(method=request.method, variant=request.variant, **{"lambda": lam})
    return flat


def model_name(method: str, variant: str) -> str:
    return f"{method}-{variant}"


class Tracker:
    """MLflow logging that degrades to a clear warning instead of failing the stage."""

    def __init__(self, params: Params, enabled: bool | None = None):
        self.params = params
        self.enabled = params.tracking.enabled if enabled is None else enabled
        self.failed = False
        self._client = None
        self._monitor = None

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
        # With a local store (SQLite or a directory) MLflow would put artifacts under ./mlruns of whatever
        # directory the stage runs in (a queued experiment's temporary copy, deleted when it ends): pin them
        # to the project root.  Decided by the store's kind, not by whether MLFLOW_TRACKING_URI is set:
        # mlflow.set_tracking_uri exports that variable, so a parent that queried the store (stages.study)
        # hands it to every queued stage.  A server keeps its own artifact root.
        artifacts = None if is_server_uri(tracking_uri()) else (project_root() / ARTIFACTS_DIR).as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=artifacts, tags=dict([EXPERIMENT_KIND]))
        except Exception:  # created concurrently by another stage: read it back
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def experiment_id(self) -> str:
        """The project's experiment, created when missing; tags an existing one with the experiment kind."""
        relocate_artifacts(self.params.tracking.experiment)      # a copied project: its own mlartifacts/
        exp = self.client.get_experiment_by_name(self.params.tracking.experiment)
        if exp is not None and exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
            self.client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
        return self._experiment_id()

    def group_run_id(self, experiment_id: str, group: str) -> str:
        """The parent run of configuration ``group``, created (finished, with the group's params) when missing.

        Two stages creating it at once (``dvc queue start -j 2``) would make two: after creating one we
        search again and keep the oldest, deleting ours if another came first.
        """
        def find() -> list:
            return self.client.search_runs([experiment_id], filter_string=f"tags.{GROUP_RUN_TAG} = '{group}'",
                                           order_by=["attributes.start_time ASC"], max_results=5)

        found = find()
        if found:
            return found[0].info.run_id
        from mlflow.entities import Param

        run = self.client.create_run(experiment_id, run_name=f"group {group}", tags={
            **source_tags(), GROUP_RUN_TAG: group,
            "mlflow.note.content": f"Configuration group {group}: the runs nested here share the params logged "
                                   f"here (Params.group_config); the others are on each run."})
        batch = [Param(k, v) for k, v in group_params(self.params).items()]
        for i in range(0, len(batch), 100):
            self.client.log_batch(run.info.run_id, params=batch[i:i + 100])
        self.client.set_terminated(run.info.run_id)
        first = find()[0].info.run_id
        if first != run.info.run_id:
            self.client.delete_run(run.info.run_id)
        return first

    def _holds_run(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return True

    # -- API used by the stages ---------------------------------------------------------------
    def start_model_run(self, request: RunRequest, reuse_run_id: str | None = None) -> str | None:
        """Create the model's run (or reuse ``reuse_run_id`` when resuming) and log params + tags.  A
        ``reuse_run_id`` this store does not hold (the checkpoint came from another store's run) gets a new run."""
        def create() -> str:
            if reuse_run_id and self._holds_run(reuse_run_id):
                self.client.update_run(reuse_run_id, status="RUNNING")
                return reuse_run_id
            tags = {**source_tags(), **run_tags(request)}
            experiment = self.experiment_id()
            tags["mlflow.parentRunId"] = self.group_run_id(experiment, tags["group"])
            run = self.client.create_run(experiment, tags=tags, run_name=tags["mlflow.runName"])
            from mlflow.entities import Param

            batch = [Param(k, v) for k, v in run_params(request).items()]
            for i in range(0, len(batch), 100):
                self.client.log_batch(run.info.run_id, params=batch[i:i + 100])
            return run.info.run_id

        return self._safe("create the model's run", create)

    def log_metrics(self, run_id: str | None, metrics: dict[str, float], step: int | None = None,
                    model_id: str | None = None, datasets: dict[str, tuple[str, str]] | None = None) -> None:
        """Log ``metrics`` into the run; with ``model_id`` also onto that LoggedModel, each metric whose key
        is ``<protocol>/<dataset>/...`` linked to ``datasets[<dataset>]`` (the (MLflow name, digest) that
        :meth:`log_datasets` returns) when given."""
        if not run_id or not metrics:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        datasets = datasets or {}

        def metric(k: str, v: float) -> Metric:
            name = k.split("/")[1] if k.count("/") >= 2 else None
            linked = ({"dataset_name": datasets[name][0], "dataset_digest": datasets[name][1]}
                      if model_id and name in datasets else {})
            return Metric(k, float(v), ts, step or 0, model_id=model_id, **linked)

        batch = [metric(k, v) for k, v in metrics.items() if v is not None]
        self._safe("log metrics", lambda: self.client.log_batch(run_id, metrics=batch))

    def log_datasets(self, run_id: str | None, prepared_root: Path, names: list[str],
                     context: str) -> dict[str, tuple[str, str]]:
        """Log the prepared datasets ``names`` as the run's inputs (``mlflow.data.context`` = ``context``).

        Each is named after the splits that context reads (:func:`dataset_input_name`: ``cfmnist/train``
        for pretraining, ``cfmnist/train+test`` for evaluation), so a run's two inputs of one dataset
        say which is which.  Returns {name: (MLflow name, digest)} of those logged.  The source is the prepared folder as DVC tracks it; the
        profile holds the splits, image size, tasks and meta.json's full per-file sha256.
        """
        if not run_id:
            return {}

        def log() -> dict[str, str]:
            from mlflow.entities import Dataset, DatasetInput, InputTag

            from pipeline.data.prepared import load_meta

            inputs, digests = [], {}
            for name in names:
                try:
                    meta = load_meta(prepared_root, name)
                except FileNotFoundError:  # not prepared here (a test, a stage run by hand): nothing to log
                    continue
                splits = context_splits(meta, context)
                sha = {f"{split}.npz": meta["sha256"][f"{split}.npz"] for split in splits}
                digests[name] = (dataset_input_name(name, splits), dataset_digest(sha))
                profile = {"splits": {split: meta["splits"][split] for split in splits}, "sha256": sha,
                           "image_size": meta["image_size"],
                           "tasks": {t: v["num_classes"] for t, v in meta["tasks"].items()}}
                dataset = Dataset(name=digests[name][0], digest=digests[name][1], source_type="local",
                                  source=json.dumps({"uri": str(Path(prepared_root) / name)}),
                                  profile=json.dumps(profile, sort_keys=True))
                inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)]))
            if inputs:
                self.client.log_inputs(run_id, datasets=inputs)
            return digests

        return self._safe(f"log the {context} datasets", log) or {}

    def log_backbone(self, run_id: str | None, final_path: Path, name: str) -> str | None:
        """Log ``final.pt``'s backbone as the run's MLflow model (``pt2``: no pickles); returns its model id.

        Loading it: ``mlflow.pytorch.load_model("models:/<model_id>")`` returns the backbone as an
        exported module taking normalised ``(B, 3, S, S)`` float images (any batch size, the trained size
        ``S``); normalisation and sizes are in the model's metadata.
        """
        if not run_id:
            return None

        def log() -> str:
            import mlflow
            import numpy as np
            import torch

            from pipeline.models import load_backbone

            backbone, meta = load_backbone(final_path)
            size = int(meta["image_size"])
            mlflow.set_tracking_uri(tracking_uri())
            keep = ("backbone_name", "width", "cifar_stem", "image_size", "feat_dim", "method", "variant",
                    "lambda", "mean", "std", "params_hash")
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pytorch.log_model(
                    backbone, name=name, serialization_format="pt2",
                    input_example=np.zeros((2, 3, size, size), np.float32),
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                    params={k: str(meta[k]) for k in ("method", "variant", "lambda", "backbone_name")},
                    metadata={k: meta[k] for k in keep if k in meta})
            self.client.set_tag(run_id, MODEL_ID_TAG, info.model_id)
            return info.model_id

        if not self.enabled or self.failed:
            return None
        try:  # not through _safe: a model that cannot be exported must not stop the rest of the run's logging
            return log()
        except Exception as e:  # noqa: BLE001
            print(f"WARNING: could not log {final_path} as an MLflow model ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:300] if str(e) else ''}); the run, its metrics and final.pt (DVC) "
                  f"are unaffected", file=sys.stderr, flush=True)
            return None

    def model_id(self, run_id: str | None) -> str | None:
        """The LoggedModel of the run's final backbone (None before pretraining logged one)."""
        if not run_id:
            return None
        return self._safe("read the run's model id", lambda: self.client.get_run(run_id).data.tags.get(MODEL_ID_TAG))

    def start_system_metrics(self, run_id: str | None) -> bool:
        """Sample CPU/memory/disk/network (+GPU with pynvml) into the run until :meth:`end_run`."""
        if not run_id or not self.enabled or self.failed or not system_metrics_available():
            return False

        def start():
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(run_id, tracking_uri=tracking_uri())
            monitor.start()
            return monitor

        self._monitor = self._safe("start the system metrics monitor", start)
        return self._monitor is not None

    def move_to_group(self, run_id: str | None, group: str) -> None:
        """Re-tag a model run with ``group`` and nest it under that group's parent run."""
        if not run_id:
            return
        def move():
            parent = self.group_run_id(self.experiment_id(), group)
            self.client.set_tag(run_id, "group", group)
            self.client.set_tag(run_id, "mlflow.parentRunId", parent)
        self._safe("move the run to its configuration group", move)

    def set_tags(self, run_id: str | None, tags: dict[str, str]) -> None:
        if run_id:
            self._safe("set tags", lambda: [self.client.set_tag(run_id, k, v) for k, v in tags.items()])

    def log_artifact(self, run_id: str | None, path: Path) -> None:
        if run_id and Path(path).exists():
            self._safe(f"upload {path}", lambda: self.client.log_artifact(run_id, str(path)))

    def end_run(self, run_id: str | None, status: str = "FINISHED") -> None:
        if self._monitor is not None:
            monitor, self._monitor = self._monitor, None
            self._safe("stop the system metrics monitor", monitor.finish)
        if run_id:
            self._safe("end the run", lambda: self.client.set_terminated(run_id, status=status))


def read_run_id(model_dir: Path) -> str | None:
    p = Path(model_dir) / RUN_ID_FILE
    if p.exists():
        text = p.read_text().strip()
        return text or None
    return None


if __name__ == "__main__":          # python -m pipeline.tracking relocate [experiment]
    if len(sys.argv) < 2 or sys.argv[1] != "relocate":
        sys.exit("usage: python -m pipeline.tracking relocate [experiment]   (default: params.yaml's tracking.experiment)")
    if len(sys.argv) > 2:
        name = sys.argv[2]
    else:
        from pipeline.params import load_params

        name = load_params().tracking.experiment
    old = relocate_artifacts(name)
    print(f"{tracking_uri()}: experiment {name!r}: artifact locations moved from {old}/mlartifacts to "
          f"{project_root() / ARTIFACTS_DIR}" if old else
          f"{tracking_uri()}: experiment {name!r}: artifact locations already point at this project (or its "
          f"artifacts are still in the original folder): nothing changed")
