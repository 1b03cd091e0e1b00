"""What each DVC stage does, in terms of the library: the glue between data, training, evaluation,
tracking and the files DVC tracks.  Stage scripts in ``stages/`` only parse arguments and call these.

File layout (docs/architecture.md):
  models/<method>-<variant>/{checkpoint.pt, final.pt, mlflow_run_id, run.json, metrics.json, losses.csv}
  features/<method>-<variant>/<dataset>.npz      train_x, test_x, train_<task>, test_<task>
  metrics/<method>-<variant>/<task>.json               the headline numbers of each evaluation task (DVC metrics)
  metrics/<method>-<variant>/<task>_diagnostics.json   solver settings, stops, episode digests
                                                       (DVC outputs, not metrics: issue 27)
  metrics/<method>-<variant>/<its per-item file>       linear_predictions.npz, fewshot_episodes.npz
The evaluation tasks and their files are the records of pipeline.evaluate.tasks; run_task runs any of them.
"""

from __future__ import annotations

import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.cli import write_json
from pipeline.config import ConfigError, check_choice, flatten, to_dict
from pipeline.evaluate import tasks
from pipeline.params import Params
from pipeline.request import RunRequest
from pipeline.results import collect_items, collect_results
from pipeline.tracking import RUN_ID_FILE, RUN_INFO_FILE, Tracker, display_uri, read_run_id, tracking_uri


# Pretrain glue added after the confirmatory study (issue 24) started.  Listing it in
# fingerprint.PRETRAIN_GLUE would edit fingerprint.py, which is training code (it defines the hash): every
# model's training hash would change mid-study (the weights would not, but no interrupted model could
# resume and final.pt would differ).  Fold it into PRETRAIN_GLUE when the fingerprint next changes anyway.
PRETRAIN_GLUE_OUTSIDE_FINGERPRINT = ("checkpoint_pool.py",)

def default_device() -> str:
    """Where a stage computes: the CPU, the one GPU, or a GPU this process claimed among several
    (:mod:`pipeline.gpus`: side-by-side queue workers each take a different GPU)."""
    from pipeline.gpus import stage_device

    return stage_device()


def parse_model(params: Params, model: str) -> tuple[str, str]:
    """'simclr-augself' → ('simclr', 'augself'), validated against ssl.methods and the variants."""
    method, _, variant = model.rpartition("-")
    check_choice("model (<method>-<variant>) method", method, params.ssl.methods)
    check_choice("model (<method>-<variant>) variant", variant, params.variants)
    return method, variant


def _said(stage: str, what: str, t0: float) -> None:
    """One progress line on stderr: what a stage fitted and how long it took (stdout has the tables)."""
    print(f"[{stage}] {what}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def _load_split(params: Params, name: str, split: str):
    from pipeline.data import load_split

    return load_split(Path(params.data.prepared), name, split)


def check_evaluations(params: Params) -> None:
    """Every evaluation task's refusal before any compute (:func:`pipeline.evaluate.tasks.check_all`: e.g. a
    few-shot setting that some downstream task cannot serve)."""
    tasks.check_all(params)


# -- pretraining --------------------------------------------------------------------------------
def monitor_data(params: Params):
    """The kNN monitor's labelled images (:mod:`pipeline.monitor`): fixed subsets of the pretraining
    dataset's train and test splits, with every task listed for it under ``data.datasets``; None when
    ``ssl.monitor_every`` is 0 or the dataset lists no tasks."""
    from pipeline.monitor import MonitorData

    name = params.data.pretrain
    tasks = params.data.datasets[name].tasks
    if params.ssl.monitor_every == 0 or not tasks:
        return None
    return MonitorData.from_splits(_load_split(params, name, "train"), _load_split(params, name, "test"), tasks,
                                   seed=params.data.seed)


def run_pretraining(params: Params, method: str, variant: str, models_dir: Path, track: bool = True,
                    device: str | None = None, max_steps: int | None = None) -> dict:
    from pipeline.checkpoint_pool import adopt
    from pipeline.fingerprint import training_hash
    from pipeline.train import checkpoint_resumable, pretrain_request

    from pipeline.data import pretrain_images

    # Every refusal before anything is written (tests/test_reliability.py: the tree stays byte-identical).
    # The request is resolved here, once: training, the MLflow run and run.json read it.
    request = RunRequest.resolve(params, method, variant)
    check_evaluations(params)
    images = pretrain_images(params.data.prepared, params.data.pretrain)
    monitor = monitor_data(params)
    out_dir = Path(models_dir) / f"{method}-{variant}"
    out_dir.mkdir(parents=True, exist_ok=True)

    tracker = Tracker(params, enabled=params.tracking.enabled and track)
    # Under the study's queue (AUGSELF_CHECKPOINT_POOL set): the checkpoint an interrupted experiment left
    # in its own workspace, if any (pipeline.checkpoint_pool); run_state resumes it by its usual checks.
    adopt(training_hash(request), int(os.environ.get("WORLD_SIZE", "1")), out_dir)
    resuming = checkpoint_resumable(request, out_dir)
    run_id = tracker.start_model_run(request, reuse_run_id=read_run_id(out_dir) if resuming else None)
    if track:
        # machine-local (gitignored, not a DVC output): which run of this machine's store to log into
        (out_dir / RUN_ID_FILE).write_text(run_id or "")
    tracker.log_datasets(run_id, Path(params.data.prepared), [params.data.pretrain], "pretraining")
    tracker.start_system_metrics(run_id)

    def on_log(step: int, metrics: dict[str, float]) -> None:
        tracker.log_metrics(run_id, metrics, step=step)

    try:
        result = pretrain_request(request, images, out_dir, on_log=on_log,
                                  device=device or default_device(), max_steps=max_steps, monitor=monitor)
    except BaseException:
        tracker.end_run(run_id, status="FAILED")
        raise
    if not track:
        return {}
    metrics = dict(result.metrics)
    # The summary (last-epoch means, images/s) goes at the last step, so it extends the loss curves
    # logged during training instead of appearing as a point at step 0.
    tracker.log_metrics(run_id, metrics, step=result.step)
    tracker.log_artifact(run_id, out_dir / "losses.csv")
    tracker.log_artifact(run_id, out_dir / "monitor.csv")         # absent (skipped) when the monitor is off
    tracker.set_tags(run_id, {"checkpoint": str((out_dir / "final.pt").resolve())})
    if result.finished:
        tracker.log_backbone(run_id, out_dir / "final.pt", f"{method}-{variant}")
    tracker.end_run(run_id)
    # run.json is committed (a DVC output with cache: false): only what the params determine, so a repro
    # that reproduces rewrites the same bytes.  Run ids, start times and commits live in MLflow.
    write_json(out_dir / RUN_INFO_FILE, {"method": request.method, "variant": request.variant, "lambda": request.lam,
                                         "seed": params.seed, "group": params.group_hash()})
    return metrics


# -- evaluation ---------------------------------------------------------------------------------
# Each evaluation task (pipeline.evaluate.tasks) writes its headline numbers to <task>.json (declared as DVC
# metrics: what `dvc metrics show` / `dvc exp show` / `dvc metrics diff` compare) and everything else it
# records (solver settings, per-fit stops, episode digests) to <task>_diagnostics.json (a DVC output, not a
# metric), so the comparison tables hold accuracies, not solver strings; a task with per-item scores also
# writes its per-item file (linear_predictions.npz, fewshot_episodes.npz) for the paired statistics.


def _write_items(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """The per-item results the paired statistics need (pipeline.stats), next to the metrics json."""
    from pipeline.checkpoint import write_npz   # imports torch: not at module level (validate, report)

    return write_npz(path, arrays, compressed=True)


def _log_to_model_run(params: Params, models_dir: Path, model: str, metrics: dict[str, float],
                      datasets: list[str] | None = None, artifact: Path | None = None) -> None:
    """Log evaluation metrics into the model's run and move the run to the current config ``group``:
    when only ``eval.*`` changed, DVC re-runs the evaluation of the same model, so the run now holds
    metrics of the current configuration and the report must find it there (its parameters, logged
    when the run was created, keep the values it was trained with).

    ``datasets`` (default: every downstream dataset) are logged as the run's ``evaluation`` inputs, and
    the metrics also onto the model's LoggedModel, linked to the dataset their key names."""
    tracker = Tracker(params)
    run_id = read_run_id(Path(models_dir) / model)
    if datasets is None:
        datasets = [name for name, entry in params.data.datasets.items() if entry.tasks]
    digests = tracker.log_datasets(run_id, Path(params.data.prepared), datasets, "evaluation")
    tracker.log_metrics(run_id, metrics, model_id=tracker.model_id(run_id), datasets=digests)
    tracker.move_to_group(run_id, params.group_hash())
    if artifact is not None:
        tracker.log_artifact(run_id, artifact)
    tracker.end_run(run_id)


def _load_model(params: Params, models_dir: Path, model: str, device: str):
    """The model's frozen backbone; refuses a final.pt written for another method, variant or backbone."""
    from pipeline.models import load_backbone

    method, variant = parse_model(params, model)
    path = Path(models_dir) / model / "final.pt"
    backbone, meta = load_backbone(path)
    expected = {"method": method, "variant": variant, "backbone_name": params.ssl.backbone}
    found = {k: meta.get(k) for k in expected}
    if found != expected:
        wrong = ", ".join(f"{k}={found[k]!r} (expected {v!r})" for k, v in expected.items() if found[k] != v)
        raise ValueError(f"{path}: this checkpoint was written for another model: {wrong}; re-create it with "
                         f"`dvc repro pretrain@{method}-{variant}` (or `dvc checkout {path}`)")
    return backbone.to(device).eval(), meta


def run_features(params: Params, model: str, models_dir: Path, features_dir: Path, metrics_dir: Path) -> None:
    """Frozen features of every downstream dataset, once per model (the eval stages read these)."""
    from pipeline.checkpoint import write_npz
    from pipeline.evaluate.features import extract_features

    device = default_device()
    backbone, meta = _load_model(params, models_dir, model, device)
    out_dir = Path(features_dir) / model
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, entry in params.data.datasets.items():
        if not entry.tasks:
            continue
        arrays, t0 = {}, time.perf_counter()
        for split in ("train", "test"):
            data = _load_split(params, name, split)
            arrays[f"{split}_x"] = extract_features(backbone, data.images, meta["mean"], meta["std"],
                                                    params.eval.batch_size, device, size=meta["image_size"])
            for task in entry.tasks:
                arrays[f"{split}_{task}"] = data.labels[task]
        write_npz(out_dir / f"{name}.npz", arrays)
        print(f"{model}: features of {name}: train {arrays['train_x'].shape}, test {arrays['test_x'].shape}")
        _said("features", f"{model}: {len(arrays['train_x']) + len(arrays['test_x'])} images of {name} on {device}", t0)


def _features(params: Params, features_dir: Path, model: str) -> Iterator[tuple[str, str, dict]]:
    for name, entry in params.data.datasets.items():
        if not entry.tasks:
            continue
        path = Path(features_dir) / model / f"{name}.npz"
        if not path.exists():
            raise FileNotFoundError(f"{path}: features not extracted; run `dvc repro features@{model}`")
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        for task in entry.tasks:
            yield name, task, arrays


def run_task(task: str, params: Params, model: str, models_dir: Path, features_dir: Path, metrics_dir: Path) -> dict:
    """One evaluation task's stage (``<task>@<model>``), as its record says (:mod:`pipeline.evaluate.tasks`):
    its refusal, its ``evaluate`` on the model's features or backbone, then ``metrics/<model>/<task>.json``,
    ``<task>_diagnostics.json``, its per-item file, and the metrics logged into the model's MLflow run."""
    record = tasks.get(task)
    parse_model(params, model)
    if record.check is not None:
        record.check(params)
    device = default_device()
    ctx = tasks.EvalContext(params, model, device,
                            features=lambda: _features(params, features_dir, model),
                            backbone=lambda: _load_model(params, models_dir, model, device),
                            load_split=lambda name, split: _load_split(params, name, split),
                            said=lambda what, t0: _said(task, what, t0))
    result = record.run(ctx)
    out = Path(metrics_dir) / model
    write_json(out / record.metrics_file, result.metrics)
    write_json(out / record.diagnostics_file, result.diagnostics)
    artifact = None
    if record.items is not None:
        if result.items is None:
            raise ValueError(f"evaluation task {task!r} names a per-item file ({record.items}) but returned no items")
        artifact = _write_items(out / record.items, result.items)
    _log_to_model_run(params, models_dir, model, result.metrics, datasets=result.datasets, artifact=artifact)
    return result.metrics


def evaluation_steps() -> tuple[str, ...]:
    """The steps of ``stages/evaluate.py``: the frozen features, then every registered evaluation task."""
    return ("features", *tasks.names())


# Wall seconds of each evaluation step, logged into the model's MLflow run only (not into the committed
# metric files, which a rerun that reproduces must rewrite byte for byte): the study's ledger copies
# every metric of the run, so its cost table reads them (issue 23 item 5).
STEP_SECONDS = "time/{step}_s"


def run_evaluation_step(step: str, params: Params, model: str, models_dir: Path, features_dir: Path,
                        metrics_dir: Path):
    """Run one evaluation step (:func:`evaluation_steps`) and log its wall time as ``time/<step>_s`` into the
    model's run."""
    t0 = time.perf_counter()
    run = run_features if step == "features" else partial(run_task, step)
    out = run(params, model, models_dir=models_dir, features_dir=features_dir, metrics_dir=metrics_dir)
    seconds = time.perf_counter() - t0
    tracker = Tracker(params)
    tracker.log_metrics(read_run_id(Path(models_dir) / model), {STEP_SECONDS.format(step=step): seconds})
    return out


# -- report -------------------------------------------------------------------------------------
HEADLINE = "metrics.json"     # reports/metrics.json: the DVC metric `dvc exp show` compares experiments by


def write_headline(params: Params, metrics_dir: Path, out_dir: Path) -> Path:
    """``reports/metrics.json``: each variant's linear top-1 minus the baseline's, in points, per method and
    downstream task (``Δ<variant>/<dataset>/<task>``; ``<method>/Δ<variant>/<dataset>/<task>`` when
    ``ssl.methods`` lists several), read from this workspace's metrics files.

    The per-model files (``metrics/<model>/linear.json``) share their keys, so DVC's tables must prefix
    each with its path (60 characters a column); these short keys are what lets `dvc exp show` at 160
    columns show the experiments' names, the params that differ and the comparison the pipeline exists
    for (README, "Experiments"): with the method in every key, three tasks and two changed params made a
    167-column table (tests/test_dvc_docs.py), so the one-method default leaves it out.  A model whose
    files are missing is left out."""
    import json

    out: dict[str, float] = {}
    for method in params.ssl.methods:
        base = Path(metrics_dir) / f"{method}-baseline" / "linear.json"
        if not base.exists():
            continue
        b = json.loads(base.read_text())
        for variant in params.variants:
            f = Path(metrics_dir) / f"{method}-{variant}" / "linear.json"
            if variant == "baseline" or not f.exists():
                continue
            v = json.loads(f.read_text())
            for key in sorted(set(b) & set(v)):
                if key.startswith("linear/") and key.endswith("/top1"):
                    task = key[len("linear/"):-len("/top1")]
                    prefix = f"{method}/" if len(params.ssl.methods) > 1 else ""
                    out[f"{prefix}Δ{variant}/{task}"] = round(float(v[key]) - float(b[key]), 6)
    return write_json(Path(out_dir) / HEADLINE, out)


# pipeline.run_state.TIMING_KEYS, spelled out: importing it imports torch, which the report stage
# does not otherwise need (issue 23 item 2); tests/test_overhead.py keeps the two equal.
REPORT_LEAVES_OUT = ("pretrain/images_per_s", "pretrain/wall_time_s", "pretrain/monitor_s")


def run_report(params: Params, models_dir: Path, metrics_dir: Path, out_dir: Path, params_path: Path) -> list[Path]:
    from pipeline.report import build_report

    runs, curves, source = collect_results(params, Path(models_dir), Path(metrics_dir))
    if runs.empty:
        raise FileNotFoundError(f"no finished runs of this configuration in {source}; run `dvc repro` first")
    # Speed is machine-local: a rerun that reproduces every model still measures other images/s, so the
    # committed report leaves it out (issue 17); it is in MLflow (pretrain/images_per_s) and in the
    # study's cost table, measured once per study model (reports/study/).
    runs = runs.drop(columns=[c for c in REPORT_LEAVES_OUT if c in runs.columns])
    context = {
        "notes": ["Throughput (images/s) is not in this report: it differs between machines and runs, so a "
                  "rerun would rewrite the committed file. It is in MLflow (`pretrain/images_per_s`) and in "
                  "the study's cost table (`reports/study/`)."],
        "params": flatten(to_dict(params)),
        "params_file": str(params_path),
        "source": source.replace(tracking_uri(), display_uri(tracking_uri())),   # no machine paths in reports/
        "command": "dvc repro (seed 0) + dvc exp run --queue -S seed=N; dvc queue start; dvc repro -f -s report",
    }
    items = collect_items(params, runs, Path(models_dir), Path(metrics_dir))
    paths = build_report(runs, curves, Path(out_dir), context, items=items)
    paths.append(write_headline(params, Path(metrics_dir), Path(out_dir)))
    print(f"report: {len(runs)} runs from {source} → {out_dir}/index.html")
    return paths
