"""The study's ledger: one committed file pair per finished model, so no finished run is ever lost.

``reports/study/runs/<model>.json`` holds the model's key (method, variant, λ, strength, seed, and
``epochs`` / ``lr`` where its block set them), its MLflow run id, config group, commit, every metric and
(models exported since issue 24) ``monitor``: the kNN monitor's curve, one row per monitor point (step,
completed epochs, ``monitor/<task>/…``), from the run's MLflow metric history; ``<model>.npz`` the per-item scores the paired
statistics need (per test image correctness of the linear probe, per episode few-shot accuracy, in
%, keyed by metric column, as :func:`pipeline.results.collect_items` returns them).  The ledger is
filled from the MLflow store (where every queued DVC experiment logs) by :func:`export_finished`,
and read back by the study's report; a model is *finished* when its run carries every metric of every
evaluation task of the configuration (:func:`expected_metrics`) and the per-item scores of those with a
per-item file.  Because the files are committed, a study interrupted on one
machine continues on another from what the ledger already holds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.evaluate import tasks
from pipeline.params import Params, load_params
from pipeline.study.plan import Experiment, ModelKey, Study

LEDGER = Path("reports/study/runs")


def expected_metrics(params: Params) -> list[str]:
    """The metric columns a finished model has: those of every evaluation task (its record's ``expected``:
    linear top-1 and few-shot of every downstream task, the augmentation probe of every augmentation the
    views use, :mod:`pipeline.evaluate.tasks`); its stages may finish in any order."""
    from pipeline.evaluate.tasks import expected_metrics as expected

    return expected(params)


def params_of(key: ModelKey, study: Study, params_path: str | Path = "params.yaml") -> Params:
    lam = key.lam if key.variant == "augself" else load_params(params_path).augself.lambda_
    exp = Experiment(key.strength, lam, key.seed, (key.method,), (key.variant,), key.epochs, key.lr)
    return load_params(params_path, exp.overrides(study.overrides))


def items_from_experiment_refs(key: ModelKey, group: str, repo: Path = Path(".")) -> dict[str, np.ndarray]:
    """Per-item scores of the model ``key`` of config group ``group`` from the DVC experiment commit
    that holds its files.

    Every queued experiment is committed under ``refs/exps/`` with ``metrics/<model>/*.npz`` and
    ``models/<model>/run.json`` (method, variant, λ, seed and config group: what defines the model;
    the MLflow run id is kept out of committed files).  This is the source of record when the
    run's MLflow artifacts cannot be fetched (a store whose artifact root was the experiment's
    temporary copy, deleted when it ended)."""
    import io
    import subprocess

    from pipeline.results import RUN_INFO_FILE, item_scores

    def show(ref: str, path: str) -> bytes | None:
        r = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=repo, capture_output=True)
        return r.stdout if r.returncode == 0 else None

    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps/"], cwd=repo,
                          capture_output=True, text=True).stdout.split()
    model = f"{key.method}-{key.variant}"
    want = {"method": key.method, "variant": key.variant, "lambda": float(key.lam), "seed": key.seed, "group": group}
    for ref in refs:
        info = show(ref, f"models/{model}/{RUN_INFO_FILE}")
        if info is None or {k: json.loads(info).get(k) for k in want} != want:
            continue
        def open_items(name: str, ref: str = ref):
            data = show(ref, f"metrics/{model}/{name}")
            return None if data is None else np.load(io.BytesIO(data), allow_pickle=False)

        scores = item_scores(open_items)
        if scores:
            return scores
    return {}


def done(ledger: Path = LEDGER) -> set[str]:
    return {p.stem for p in Path(ledger).glob("*.json")}


def export_finished(study: Study, keys: list[ModelKey], ledger: Path = LEDGER,
                    params_path: str | Path = "params.yaml") -> list[str]:
    """Copy every finished model of ``keys`` that the ledger lacks from MLflow into the ledger."""
    from pipeline.checkpoint import write_npz, write_text
    from pipeline.results import collect_items, runs_from_mlflow

    ledger = Path(ledger)
    have, written = done(ledger), []
    by_group: dict[str, tuple[Params, list[ModelKey]]] = {}
    for key in keys:
        if key.name in have:
            continue
        p = params_of(key, study, params_path)
        by_group.setdefault(p.group_hash(), (p, []))[1].append(key)
    for group, (p, group_keys) in by_group.items():
        p.ssl.methods = sorted({k.method for k in group_keys})
        try:
            runs, curves = runs_from_mlflow(p)
        except Exception as e:  # noqa: BLE001 - the store is optional: report and keep the ledger as is
            print(f"[study] MLflow not readable ({type(e).__name__}: {e}); nothing exported")
            return written
        if runs.empty:
            continue
        need = expected_metrics(p)
        for key in group_keys:
            sel = runs[(runs["method"] == key.method) & (runs["variant"] == key.variant)
                       & (runs["lambda"].astype(float) == float(key.lam)) & (runs["seed"] == key.seed)]
            if sel.empty:
                continue
            row = sel.iloc[-1]
            if any(c not in row or pd.isna(row[c]) for c in need):
                continue                                  # still training or evaluating
            items = (collect_items(p, sel.iloc[[-1]]).get(str(row["run_id"]), {})
                     or items_from_experiment_refs(key, group))
            if any(c not in items for c in need if (task := tasks.task_of(c)) is not None and task.items):
                print(f"[study] {key.name}: finished, but its per-item scores are neither in MLflow's artifacts "
                      f"nor in a DVC experiment commit yet; not exported (the paired statistics need them)")
                continue
            metrics = {c: float(row[c]) for c in row.index if "/" in c and pd.notna(row[c])}
            record = {"key": {"method": key.method, "variant": key.variant, "lambda": key.lam,
                              "strength": key.strength, "seed": key.seed,
                              **({"epochs": key.epochs} if key.epochs else {}), **({"lr": key.lr} if key.lr else {})},
                      "run_id": str(row["run_id"]), "group": group, "commit": str(row.get("commit", "")),
                      "metrics": metrics}
            curve = monitor_curve(curves.get(str(row["run_id"])), metrics)
            if curve:
                record["monitor"] = curve
            write_npz(ledger / f"{key.name}.npz", {k: np.asarray(v, dtype=np.float32) for k, v in items.items()},
                      compressed=True)
            write_text(ledger / f"{key.name}.json", json.dumps(record, indent=1, sort_keys=True) + "\n")
            written.append(key.name)
    return written


def monitor_curve(curve: pd.DataFrame | None, metrics: dict) -> list[dict]:
    """The kNN monitor rows of a run's metric history (:func:`pipeline.results.runs_from_mlflow`'s curve:
    one row per logged step): each step that has a ``monitor/*`` value, with its completed epochs (step /
    steps per epoch, from the run's ``pretrain/steps`` and ``pretrain/epochs``)."""
    if curve is None or curve.empty:
        return []
    cols = [c for c in curve.columns if c.startswith("monitor/")]
    steps, epochs = metrics.get("pretrain/steps"), metrics.get("pretrain/epochs")
    if not cols or not steps or not epochs:
        return []
    per_epoch = steps / epochs
    rows = []
    for _, r in curve.dropna(subset=cols, how="all").iterrows():
        rows.append({"step": int(r["step"]), "epoch": round(float(r["step"]) / per_epoch, 3),
                     **{c: float(r[c]) for c in cols if pd.notna(r[c])}})
    return rows


def read_ledger(ledger: Path = LEDGER, models: set[str] | None = None
                ) -> tuple[pd.DataFrame, dict[str, dict[str, np.ndarray]]]:
    """(runs table, per-item scores by run id) of every model in the ledger, or of those named in ``models``
    (a study reads its own: the ledger is shared by every study).  ``epochs`` / ``lr`` columns appear only
    where a record's key sets them (NaN for the others: params.yaml's schedule)."""
    rows, items = [], {}
    for f in sorted(Path(ledger).glob("*.json")):
        if models is not None and f.stem not in models:
            continue
        r = json.loads(f.read_text())
        k = r["key"]
        rows.append({"run_id": r["run_id"], "model": f.stem, "method": k["method"], "variant": k["variant"],
                     "lambda": float(k["lambda"]), "strength": k["strength"], "seed": int(k["seed"]),
                     **{s: k[s] for s in ("epochs", "lr") if s in k}, "commit": r.get("commit", ""), **r["metrics"]})
        npz = f.with_suffix(".npz")
        if npz.exists():
            with np.load(npz, allow_pickle=False) as z:
                items[r["run_id"]] = {name: z[name].astype(np.float64) for name in z.files}
    return pd.DataFrame(rows), items


def read_curves(ledger: Path = LEDGER, models: set[str] | None = None) -> dict[str, pd.DataFrame]:
    """{model name: its kNN monitor curve (columns step, epoch, monitor/…)} of the ledger's records that hold one."""
    out = {}
    for f in sorted(Path(ledger).glob("*.json")):
        if models is None or f.stem in models:
            curve = json.loads(f.read_text()).get("monitor")
            if curve:
                out[f.stem] = pd.DataFrame(curve)
    return out
