"""Aggregation over seeds, AugSelf − baseline differences, and the tables built from them.

* :func:`aggregate` → one row per (method, variant, λ) with ``<metric>/mean``, ``<metric>/std`` and
  ``<metric>/n`` for every metric column (this is ``results.csv``).  ``std`` is the sample standard
  deviation (ddof = 1, pandas' default), empty for a single seed; ``n`` counts the seeds that have the
  metric (a run may lack one).
* :func:`differences` → per method and downstream metric, AugSelf − baseline as a difference of the
  means over seeds, with its standard error √(s²_a/n_a + s²_b/n_b) (Welch; empty unless both sides
  have ≥ 2 seeds).  Rows: the default λ (``augself.lambda`` of the params behind the runs) and, when
  several λ ran, the best λ *per metric*: an oracle choice on the evaluation numbers, labelled as such.
* :func:`build_tables` → :class:`Table` objects, rendered here to Markdown and by ``html.py`` to HTML,
  so the two always show the same cells.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pipeline.report.schema import (MetricSpec, ci_caption, downstream_families, families, family_title,
                                    lambda_label)

KEYS = ["method", "variant", "lambda"]
STATS = ("mean", "std", "n")


def stat_column(metric: str, stat: str) -> str:
    """Column of ``results.csv`` holding ``stat`` (mean, std, n) of ``metric``."""
    return f"{metric}/{stat}"


def aggregate(runs: pd.DataFrame, specs: list[MetricSpec]) -> pd.DataFrame:
    """Mean, std and count over seeds of every metric (and few-shot CI) column, per (method, variant, λ).

    ``runs`` must be the validated, sorted table of :func:`pipeline.report.schema.validate_runs`; the
    output keeps its order (methods in library order, baseline before AugSelf, λ ascending).
    """
    columns = [c for s in specs for c in (s.column, s.ci_column) if c]
    grouped = runs.groupby(KEYS, sort=False)
    out = grouped.agg(n_runs=("run_id", "size"),
                      seeds=("seed", lambda s: " ".join(map(str, sorted(s)))),
                      run_ids=("run_id", lambda s: " ".join(s))).reset_index()
    parts = [out]
    for col in columns:
        stats = grouped[col].agg(["mean", "std", "count"]).reset_index(drop=True)
        stats.columns = [stat_column(col, s) for s in STATS]
        parts.append(stats)
    return pd.concat(parts, axis=1)


def lambda_curves(summary: pd.DataFrame, specs: list[MetricSpec]) -> pd.DataFrame:
    """Tidy metric-against-λ table (``lambda.csv``, a DVC plot): one row per method × λ × metric.

    The baseline is the λ = 0 point of every method's curve.
    """
    rows = []
    for _, r in summary.iterrows():
        for spec in specs:
            mean = r[stat_column(spec.column, "mean")]
            if pd.notna(mean):
                rows.append({"method": r["method"], "lambda": float(r["lambda"]), "metric": spec.column,
                             "value": float(mean), "std": r[stat_column(spec.column, "std")],
                             "n": int(r[stat_column(spec.column, "n")])})
    return pd.DataFrame(rows, columns=["method", "lambda", "metric", "value", "std", "n"])


@dataclass(frozen=True)
class Difference:
    """AugSelf − baseline for one method and metric.  ``kind``: default | best | only (see module doc)."""
    method: str
    metric: str
    kind: str
    lam: float
    delta: float
    se: float
    n_baseline: int
    n_augself: int


def _row(summary: pd.DataFrame, method: str, variant: str, lam: float | None = None) -> pd.Series | None:
    sel = (summary["method"] == method) & (summary["variant"] == variant)
    if lam is not None:
        sel &= summary["lambda"] == lam
    rows = summary[sel]
    return None if rows.empty else rows.iloc[0]


def _difference(base: pd.Series, aug: pd.Series, spec: MetricSpec, kind: str) -> Difference | None:
    mean_b, mean_a = base[stat_column(spec.column, "mean")], aug[stat_column(spec.column, "mean")]
    if not (np.isfinite(mean_b) and np.isfinite(mean_a)):
        return None
    n_b, n_a = int(base[stat_column(spec.column, "n")]), int(aug[stat_column(spec.column, "n")])
    s_b, s_a = base[stat_column(spec.column, "std")], aug[stat_column(spec.column, "std")]
    se = float(np.sqrt(s_a ** 2 / n_a + s_b ** 2 / n_b)) if min(n_a, n_b) >= 2 else float("nan")
    return Difference(aug["method"], spec.column, kind, float(aug["lambda"]), float(mean_a - mean_b), se, n_b, n_a)


def differences(summary: pd.DataFrame, specs: list[MetricSpec], default_lambda: float | None) -> list[Difference]:
    """AugSelf − baseline per method and downstream metric, at the default λ and at the best λ."""
    out: list[Difference] = []
    downstream = downstream_families()
    for method in dict.fromkeys(summary["method"]):
        base = _row(summary, method, "baseline")
        augs = summary[(summary["method"] == method) & (summary["variant"] == "augself")]
        if base is None or augs.empty:
            continue
        lambdas = list(augs["lambda"])
        for spec in specs:
            if spec.family not in downstream:
                continue
            candidates = []
            if default_lambda is not None and default_lambda in lambdas:
                candidates.append((_row(summary, method, "augself", default_lambda), "default"))
            means = augs[stat_column(spec.column, "mean")]
            if means.notna().any():
                best = augs.loc[means.idxmax() if spec.higher_is_better else means.idxmin()]
                if len(lambdas) >= 2:
                    candidates.append((best, "best"))
                elif default_lambda not in lambdas:
                    candidates.append((best, "only"))
            out.extend(d for aug, kind in candidates if (d := _difference(base, aug, spec, kind)) is not None)
    return out


@dataclass
class Table:
    """A renderer-agnostic table: header cells, rows of cells, and which rows are Δ rows."""
    title: str
    caption: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    highlight: list[bool] = field(default_factory=list)
    align_right_from: int = 2

    def add(self, cells: list[str], highlight: bool = False) -> None:
        self.rows.append(cells)
        self.highlight.append(highlight)


def format_cell(row: pd.Series, spec: MetricSpec) -> str:
    """``mean ± std`` (std only for ≥ 2 seeds), ``(n=k)`` when fewer seeds than the row has, few-shot CI."""
    mean = row.get(stat_column(spec.column, "mean"), np.nan)
    if not np.isfinite(mean):
        return "–"
    n = int(row[stat_column(spec.column, "n")])
    std = row[stat_column(spec.column, "std")]
    text = spec.fmt(mean)
    if n >= 2 and np.isfinite(std):
        text += f" ± {spec.fmt(std)}"
    if n != int(row["n_runs"]):
        text += f" (n={n})"
    if spec.ci_column:
        ci = row.get(stat_column(spec.ci_column, "mean"), np.nan)
        if np.isfinite(ci):
            text += f" (CI ±{spec.fmt(ci)})"
    return text


def format_difference(d: Difference, spec: MetricSpec, with_lambda: bool) -> str:
    text = spec.fmt(d.delta, signed=True)
    if np.isfinite(d.se):
        text += f" ± {spec.fmt(d.se)}"
    if with_lambda:
        text += f" (λ={lambda_label(d.lam)})"
    return text


_CAPTION_STATS = ("Cells: mean ± sample std over seeds (std only where ≥ 2 seeds ran; n=k where a metric "
                  "exists for fewer seeds than the row has).")
_CAPTION_DELTA = ("**Bold Δ rows**: AugSelf − baseline difference of the means ± its standard error "
                  "√(s_a²/n_a + s_b²/n_b) (only where both sides have ≥ 2 seeds); “best λ” picks, per column, "
                  "the λ with the highest mean, an optimistic (oracle) choice.")

_DELTA_LABELS = {"default": "Δ AugSelf − baseline", "best": "Δ best λ (per column)",
                 "only": "Δ AugSelf − baseline"}


def build_tables(summary: pd.DataFrame, specs: list[MetricSpec], diffs: list[Difference],
                 default_lambda: float | None) -> list[Table]:
    """One table per metric family present: configuration rows, then each method's Δ rows."""
    tables = []
    by_key = {(d.method, d.metric, d.kind): d for d in diffs}
    downstream = downstream_families()
    for family in families():
        fspecs = [s for s in specs if s.family == family]
        if not fspecs:
            continue
        caption = _CAPTION_STATS
        if any(s.ci_column for s in fspecs) and ci_caption(family):
            caption += " " + ci_caption(family)
        table = Table(family_title(family), caption, ["method", "variant", "λ", "seeds"] + [s.label for s in fspecs])
        for method in dict.fromkeys(summary["method"]):
            for _, row in summary[summary["method"] == method].iterrows():
                table.add([method, row["variant"], lambda_label(row["lambda"]), str(int(row["n_runs"]))]
                          + [format_cell(row, s) for s in fspecs])
            if family not in downstream:
                continue
            for kind in ("default", "only", "best"):
                cells = [by_key.get((method, s.column, kind)) for s in fspecs]
                if not any(cells):
                    continue
                if kind == "best":
                    lam_cell = "per column"
                else:
                    lam = next(d.lam for d in cells if d)
                    lam_cell = lambda_label(lam) + (" (default)" if kind == "default" else "")
                table.add([method, _DELTA_LABELS[kind], lam_cell, ""]
                          + [format_difference(d, s, with_lambda=kind == "best") if d else "–"
                             for d, s in zip(cells, fspecs)], highlight=True)
        if any(table.highlight):
            table.caption += " " + _CAPTION_DELTA
        tables.append(table)
    return tables


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(table: Table) -> str:
    """A GitHub-flavoured Markdown table; Δ rows in bold."""
    n = len(table.header)
    lines = ["| " + " | ".join(map(_md_escape, table.header)) + " |",
             "|" + "|".join("---" if i < table.align_right_from else "---:" for i in range(n)) + "|"]
    for cells, bold in zip(table.rows, table.highlight):
        cells = [_md_escape(c) for c in cells]
        if bold:
            cells = [f"**{c}**" if c and c != "–" else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
