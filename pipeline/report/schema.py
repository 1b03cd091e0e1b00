"""What the report reads: the runs table, its metric columns and the loss curves.

The report takes plain pandas data (``pipeline.results`` produces it from MLflow or from the metric
files), never MLflow itself.  This module checks that data, names every metric column it understands
and says how to label, format and compare it, so that tables and plots agree on every number.

Conventions
-----------
* One row of ``runs`` is one pretrained model: ``run_id, method, variant, lambda, seed`` are required;
  ``group, commit, dvc_exp, start_time`` are shown when present.  ``variant`` is ``baseline`` (λ = 0)
  or ``augself`` (λ > 0 normally; λ = 0 is allowed and kept as its own row).
* A *configuration* is (method, variant, λ); its seeds are aggregated.  λ is rounded to 12 decimals
  before grouping so that ``0.1`` from a tag and ``0.1000000000001`` from arithmetic are one λ.
* Metric columns are recognised by name (``linear/<dataset>/<task>/top1`` ...), as the records of the
  evaluation tasks describe them (:mod:`pipeline.evaluate.tasks`); any other column is ignored.  Accuracies are in percent (linear top-1, few-shot, ``probe/flip/acc``), R² is unitless.
  Every downstream metric is *higher is better*, which is what "best λ" uses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pandas as pd

from pipeline.augmentations import target_names
from pipeline.evaluate import tasks
from pipeline.params import METHODS, VARIANTS

REQUIRED_COLUMNS = ("run_id", "method", "variant", "lambda", "seed")
OPTIONAL_COLUMNS = ("group", "commit", "dvc_exp", "start_time")
LAMBDA_DECIMALS = 12

# Metric families, in the order the report shows them: every evaluation task (pipeline.evaluate.tasks, its
# record names its columns, title and figures), then the pretraining losses.
PRETRAIN = "pretrain"
PRETRAIN_TITLE = "Pretraining: final losses"
_PRETRAIN_RE = re.compile(r"^pretrain/(?P<name>loss_ssl|loss_total|images_per_s|loss_augself/[^/]+)$")


def families() -> tuple[str, ...]:
    """The metric families in the order the report shows them: the evaluation tasks, then ``pretrain``."""
    return (*tasks.names(), PRETRAIN)


def downstream_families() -> tuple[str, ...]:
    """The families of the evaluation tasks (Δ rows, paired differences)."""
    return tasks.names()


def family_title(family: str) -> str:
    """The title of a family's table (its task's ``title``)."""
    return PRETRAIN_TITLE if family == PRETRAIN else tasks.get(family).title


def ci_caption(family: str) -> str:
    """What a family's table caption says about its confidence-interval columns (few-shot: over episodes)."""
    return "" if family == PRETRAIN else tasks.get(family).ci_caption


@dataclass(frozen=True)
class MetricSpec:
    """How one metric column is shown.

    ``label`` is the short column header (``cfmnist/class 5-way 1-shot``), ``axis`` the y-axis label
    with its unit, ``decimals`` the number of decimals in tables, ``ci_column`` the per-run 95 %
    confidence half-width column (few-shot only) when the runs table has it.
    """
    column: str
    family: str
    label: str
    axis: str
    decimals: int
    ci_column: str | None = None
    higher_is_better: bool = True
    augmentation: str | None = None      # the augmentation the column is about (ordered as the records list them)

    def fmt(self, value: float, signed: bool = False) -> str:
        if value is None or not np.isfinite(value):
            return "–"
        return f"{value:+.{self.decimals}f}" if signed else f"{value:.{self.decimals}f}"


def metric_spec(column: str, available: set[str] | frozenset[str] = frozenset()) -> MetricSpec | None:
    """The spec of a metric column, or None when the column is not a metric the report knows: an evaluation
    task's column as its record describes it (:class:`pipeline.evaluate.tasks.Column`), or a pretraining loss."""
    for task in tasks.records():
        if found := task.column(column):
            col, m = found
            groups = m.groupdict()
            ci = column + col.ci_suffix if col.ci_suffix else None
            return MetricSpec(column, task.name, col.label.format(**groups), col.axis.format(**groups), col.decimals,
                              ci_column=ci if ci in available else None,
                              augmentation=groups[col.augmentation] if col.augmentation else None)
    if m := _PRETRAIN_RE.match(column):
        name = m["name"]
        if name == "images_per_s":
            return MetricSpec(column, PRETRAIN, "images/s", "throughput (images/s)", 0)
        label = {"loss_ssl": "SSL loss", "loss_total": "total loss"}.get(name)
        aug = name.split("/", 1)[1] if name.startswith("loss_augself/") else None
        label = label or f"AugSelf {aug} loss"
        return MetricSpec(column, PRETRAIN, label, "loss (final)", 4, higher_is_better=False, augmentation=aug)
    return None


def metric_specs(runs: pd.DataFrame) -> list[MetricSpec]:
    """Specs of every recognised metric column of ``runs``, grouped by family, in a stable order."""
    available = set(runs.columns)
    specs = [s for c in runs.columns if (s := metric_spec(c, available)) is not None]
    return sorted(specs, key=_order_key)


def _order_key(spec: MetricSpec) -> tuple:
    """Family order; augmentations in the library's order (crop, flip, color, blur); the SSL loss first,
    then the AugSelf terms, the total and the throughput; otherwise natural order (1-shot before 10-shot)."""
    augs = target_names()
    aug_rank = augs.index(spec.augmentation) if spec.augmentation in augs else len(augs)
    pretrain_rank = {"pretrain/loss_ssl": 0, "pretrain/loss_total": 2, "pretrain/images_per_s": 3}.get(spec.column, 1)
    natural = [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", spec.column)]
    return families().index(spec.family), pretrain_rank, aug_rank, natural


def method_order(methods) -> list[str]:
    """Known methods in the library's order, then any others alphabetically."""
    methods = set(methods)
    return [m for m in METHODS if m in methods] + sorted(methods - set(METHODS))


def lambda_label(lam: float) -> str:
    return f"{lam:g}"


def curve_key(method: str, variant: str, lam: float, seed: int) -> str:
    """The fallback key of a run's loss curve: ``<method>-<variant>-λ<lam>-s<seed>`` (λ as ``%g``)."""
    return f"{method}-{variant}-λ{lambda_label(float(lam))}-s{int(seed)}"


def validate_runs(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Check the runs table; return a clean copy (typed keys, one row per seed) and notes for the reader.

    Raises ValueError naming the problem: a missing key column, an unknown variant, a baseline with
    λ ≠ 0, a negative or missing λ, runs from several config groups, a non-numeric metric column.
    Several runs of the same (method, variant, λ, seed), e.g. a re-run, keep the latest by
    ``start_time`` (the last row when there is no start time) and say so in the notes.
    """
    if not isinstance(runs, pd.DataFrame):
        raise ValueError(f"runs: expected a pandas DataFrame, got {type(runs).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in runs.columns]
    if missing:
        raise ValueError(f"runs: missing column(s) {', '.join(missing)}; pipeline.results must provide "
                         f"{', '.join(REQUIRED_COLUMNS)} for every run")
    if runs.empty:
        raise ValueError("runs: no runs to report; run the pipeline first (dvc repro) or check the "
                         "MLflow experiment / metrics directory that pipeline.results reads")
    notes: list[str] = []
    df = runs.copy().reset_index(drop=True)
    for col in OPTIONAL_COLUMNS:
        if col not in df.columns:
            df[col] = ""
    df["run_id"] = df["run_id"].astype(str)
    df["method"] = df["method"].astype(str)
    df["variant"] = df["variant"].astype(str)
    bad_variants = sorted(set(df["variant"]) - set(VARIANTS))
    if bad_variants:
        raise ValueError(f"runs.variant: unknown value(s) {bad_variants}; allowed values: {', '.join(VARIANTS)}")
    try:
        df["lambda"] = pd.to_numeric(df["lambda"], errors="raise").astype(float)
        df["seed"] = pd.to_numeric(df["seed"], errors="raise").astype(int)
    except (ValueError, TypeError) as e:
        raise ValueError(f"runs: 'lambda' must be numbers and 'seed' integers ({e})") from e
    if df["lambda"].isna().any() or (df["lambda"] < 0).any():
        bad = df.loc[df["lambda"].isna() | (df["lambda"] < 0), "run_id"].tolist()
        raise ValueError(f"runs.lambda: missing or negative for run(s) {bad}; λ is ≥ 0 (0 for baseline)")
    df["lambda"] = df["lambda"].round(LAMBDA_DECIMALS)
    wrong = df[(df["variant"] == "baseline") & (df["lambda"] != 0)]
    if not wrong.empty:
        raise ValueError(f"runs: baseline run(s) {wrong['run_id'].tolist()} have λ = "
                         f"{sorted(set(wrong['lambda']))}; a baseline is trained with λ = 0, so pipeline.results "
                         f"must report lambda 0 for variant 'baseline'")
    groups = sorted(set(df["group"].astype(str)) - {"", "nan", "None"})
    if len(groups) > 1:
        raise ValueError(f"runs: {len(groups)} config groups {groups}; runs with different configs are not "
                         f"comparable: select one group (Params.group_hash) before building the report")
    for spec in metric_specs(df):
        for col in filter(None, (spec.column, spec.ci_column)):
            try:
                df[col] = pd.to_numeric(df[col], errors="raise").astype(float)
            except (ValueError, TypeError) as e:
                raise ValueError(f"runs[{col!r}]: metric values must be numbers ({e})") from e

    key = ["method", "variant", "lambda", "seed"]
    if df.duplicated(key).any():
        order = pd.to_datetime(df["start_time"], errors="coerce", utc=True) if df["start_time"].ne("").any() \
            else pd.Series(pd.NaT, index=df.index)
        df = df.assign(_order=order, _row=np.arange(len(df)))
        df = df.sort_values(["_order", "_row"], na_position="first")
        dropped = df[df.duplicated(key, keep="last")]
        df = df.drop_duplicates(key, keep="last").drop(columns=["_order", "_row"])
        notes.append(f"{len(dropped)} superseded run(s) of an already reported (method, variant, λ, seed) "
                     f"ignored (the latest is kept): {', '.join(dropped['run_id'])}")
    methods = method_order(df["method"])
    df["_m"] = df["method"].map(methods.index)
    df["_v"] = df["variant"].map(VARIANTS.index)
    df = df.sort_values(["_m", "_v", "lambda", "seed"]).drop(columns=["_m", "_v"]).reset_index(drop=True)
    return df, notes


def find_curve(curves: Mapping[str, pd.DataFrame], run: Mapping) -> pd.DataFrame | None:
    """The loss curve of one run: by ``run_id``, else by :func:`curve_key` (λ as ``%g`` or as given)."""
    candidates = [str(run["run_id"]), curve_key(run["method"], run["variant"], run["lambda"], run["seed"]),
                  f"{run['method']}-{run['variant']}-λ{run['lambda']}-s{int(run['seed'])}"]
    for key in candidates:
        if key in curves and curves[key] is not None and not curves[key].empty:
            return curves[key]
    return None
