"""The comparison report: tables and plots across methods, λ and seeds.

:func:`build_report` turns plain pandas data (``pipeline.results`` reads it from MLflow or from the
metric files) into ``reports/``:

* ``results.csv``: one row per method × variant × λ; per metric ``<metric>/mean``, ``/std``, ``/n``
  over seeds (see :mod:`pipeline.report.tables` for the statistics),
* ``lambda.csv``: the same means in tidy form against λ (the DVC plot of accuracy vs λ),
* ``differences.csv``: paired Δ of every non-baseline variant against the baseline of the same
  method and seed, with its interval (t over seeds; one seed: the paired bootstrap over items) and,
  with ≥ 2 seeds only, the decision (t-test, Holm across methods) and the descriptive hierarchical
  bootstrap (:mod:`pipeline.report.paired`; empty without per-item scores), also a table and ``fig_forest``,
* ``README.md``: the tables (Δ AugSelf − baseline rows in bold), the figures, the run list,
* ``figures/fig_*.png`` / ``.svg``: grouped bars per family, metric against λ, loss curves
  (:mod:`pipeline.report.plots`),
* ``index.html``: everything above in one self-contained page, plus the parameters
  (:mod:`pipeline.report.html`).

The input contract is in :mod:`pipeline.report.schema`.  Whatever is missing (a metric, a second
seed, a second λ, a curve) is skipped and said in the report's notes rather than failing the build.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import pandas as pd

from pipeline.config import flatten
from pipeline.report import plots as _plots
from pipeline.report.html import render_page
from pipeline.evaluate import tasks
from pipeline.report.schema import (LAMBDA_DECIMALS, MetricSpec, curve_key, downstream_families, family_title,
                                    lambda_label, metric_specs, validate_runs)
from pipeline.report.paired import paired_differences, paired_table
from pipeline.report.tables import (Difference, Table, aggregate, build_tables, differences, lambda_curves,
                                    to_markdown)

__all__ = ["build_report", "present_specs", "aggregate", "differences", "curve_key", "Difference", "Table"]

TITLE = "AugSelf vs baseline: comparison report"
FIGURE_PREFIX = "fig_"
# The figures live in their own folder so the report stage can name each of its outputs (dvc.yaml): the
# folder reports/ also holds the committed study (reports/study/), which is not this stage's output.
FIGURES_DIR = "figures"
# The runs table of the committed report holds only what a rerun that reproduces gives again: run ids,
# commits and start times are machine- and time-local (issue 17), they are in MLflow (its runs table).
_RUN_COLUMNS = {"method": "method", "variant": "variant", "lambda": "λ", "seed": "seed", "dvc_exp": "dvc exp"}


def build_report(runs: pd.DataFrame, curves: Mapping[str, pd.DataFrame] | None, out_dir: str | Path,
                 context: Mapping, items: Mapping[str, Mapping] | None = None) -> list[Path]:
    """Regenerate the report in ``out_dir``; return the files written.

    ``context``: ``params`` (flattened, dotted keys; a nested mapping is flattened here), ``command``,
    optional ``notes`` (a string or a list of strings) and optional ``source`` (where the runs were read
    from).  ``commit`` and ``generated_at`` may be given but are not written: the report is a function
    of the runs, so a rerun that reproduces them rewrites it byte for byte (the commit that holds it
    is its provenance).  The default λ
    of the Δ rows is ``params['augself.lambda']``.  Previous ``fig_*`` files in ``out_dir`` are removed
    first, so a figure that can no longer be drawn does not linger.  ``items``: per run id, per-item
    scores by metric column (``pipeline.results.collect_items``); with them the report adds the
    paired differences (``differences.csv``, a table and a forest plot, :mod:`pipeline.report.paired`).
    """
    if not isinstance(context, Mapping):
        raise ValueError(f"context: expected a mapping with params and command; "
                         f"got {type(context).__name__}")
    runs, notes = validate_runs(runs)
    curves = curves or {}
    params = dict(context.get("params") or {})
    if any(isinstance(v, Mapping) for v in params.values()):
        params = flatten(params)
    extra = context.get("notes") or []
    notes = ([extra] if isinstance(extra, str) else list(extra)) + notes

    specs = present_specs(runs, notes)
    default_lambda = _default_lambda(params, notes)
    ref_lambda = _reference_lambda(runs, default_lambda, notes)
    summary = aggregate(runs, specs)
    diffs = differences(summary, specs, default_lambda)
    _note_missing_sides(summary, notes)
    tables = build_tables(summary, specs, diffs, default_lambda)
    downstream = downstream_families()
    paired = paired_differences(runs, items or {}, [s for s in specs if s.family in downstream], notes)
    if not paired.empty:
        tables.append(paired_table(paired))
    elif items is not None:
        notes.append(f"no per-item scores ({' / '.join(t.items for t in tasks.with_items())}) pair up: no paired Δ")

    out_dir = Path(out_dir)
    fig_dir = out_dir / FIGURES_DIR
    fig_dir.mkdir(parents=True, exist_ok=True)
    for folder in (out_dir, fig_dir):   # out_dir: where figures lived before they had a folder
        for stale in list(folder.glob(f"{FIGURE_PREFIX}*.png")) + list(folder.glob(f"{FIGURE_PREFIX}*.svg")):
            stale.unlink()
    figures = _draw_figures(runs, summary, curves, specs, ref_lambda, fig_dir, notes)
    if not paired.empty:
        with _plots.style():
            title = "Paired differences to the baseline (same method and seed)"
            figures.append(_saved(_plots.forest_figure(paired, title), fig_dir, "forest", title,
                                  "Dot: Δ (mean of per-seed paired Δ); bar: its 95 % interval (t over seeds with "
                                  "≥ 2 seeds; dotted, with one seed: the paired bootstrap over items, evaluation "
                                  "noise only, no decision); filled blue: the t-test over seeds, Holm-corrected "
                                  "across methods, says Δ ≠ 0."))
    differences_csv = out_dir / "differences.csv"
    paired.to_csv(differences_csv, index=False)

    results = out_dir / "results.csv"
    summary.to_csv(results, index=False)
    curves_vs_lambda = out_dir / "lambda.csv"
    lambda_curves(summary, specs).to_csv(curves_vs_lambda, index=False)
    run_list = _run_list(runs)
    meta = _meta(context, runs, default_lambda)
    readme = out_dir / "README.md"
    readme.write_text(_markdown(meta, notes, tables, figures, run_list), encoding="utf-8")
    page = out_dir / "index.html"
    page.write_text(render_page(title=TITLE, meta=meta, notes=notes, tables=tables, plots=figures,
                                run_list=run_list, params=params), encoding="utf-8")
    return [results, curves_vs_lambda, differences_csv, readme, page] + [p for f in figures for p in f.paths]


def present_specs(runs: pd.DataFrame, notes: list[str]) -> list[MetricSpec]:
    """Metric specs with at least one value; note empty metrics and missing downstream families."""
    specs = []
    for spec in metric_specs(runs):
        if runs[spec.column].notna().any():
            specs.append(spec)
        else:
            notes.append(f"`{spec.column}` has no value in any run: skipped")
    for task in tasks.records():
        if not any(s.family == task.name for s in specs):
            notes.append(f"no {task.name} metric (`{task.metric}`) in the runs: the "
                         f"“{family_title(task.name)}” table and plots are skipped")
    return specs


def _default_lambda(params: Mapping, notes: list[str]) -> float | None:
    value = params.get("augself.lambda")
    if value is None:
        notes.append("`augself.lambda` is not in the params behind the runs: no Δ row at the default λ")
        return None
    return round(float(value), LAMBDA_DECIMALS)


def _reference_lambda(runs: pd.DataFrame, default_lambda: float | None, notes: list[str]) -> float | None:
    """The AugSelf λ shown in the bar charts: the default, else the λ with the most runs (smallest on ties)."""
    counts = runs.loc[runs["variant"] == "augself", "lambda"].value_counts()
    if counts.empty:
        return None
    if default_lambda in counts.index:
        return default_lambda
    best = min(counts.index, key=lambda lam: (-counts[lam], lam))
    if default_lambda is not None:
        notes.append(f"no AugSelf run at the default λ = {lambda_label(default_lambda)}; the bar charts show "
                     f"λ = {lambda_label(best)}")
    return float(best)


def _note_missing_sides(summary: pd.DataFrame, notes: list[str]) -> None:
    for method in dict.fromkeys(summary["method"]):
        variants = set(summary.loc[summary["method"] == method, "variant"])
        for missing in {"baseline", "augself"} - variants:
            notes.append(f"{method}: no {missing} run, so no AugSelf − baseline difference")


def _draw_figures(runs, summary, curves, specs, ref_lambda, out_dir, notes) -> list[_plots.Plot]:
    figures: list[_plots.Plot] = []
    has_lambda = ref_lambda is not None
    with _plots.style():
        for family, what in ((task.name, task.figure) for task in tasks.records()):
            fspecs = [s for s in specs if s.family == family]
            if not fspecs:
                continue
            title = f"{what.capitalize()}: baseline vs AugSelf" + (f" (λ = {lambda_label(ref_lambda)})" if has_lambda else "")
            fig = _plots.bar_figure(runs, summary, fspecs, ref_lambda, title)
            figures.append(_saved(fig, out_dir, f"bars_{family}", title,
                                  "Bars: mean over seeds; whiskers: ± std over seeds (where ≥ 2 seeds); dots: "
                                  "individual seeds; Δ: AugSelf − baseline difference of the means."))
            if has_lambda:
                title = f"{what.capitalize()} against the AugSelf weight λ"
                fig = _plots.lambda_figure(summary, fspecs, title)
                figures.append(_saved(fig, out_dir, f"lambda_{family}", title,
                                      "λ = 0 is the baseline; points: every λ that ran, mean ± std over seeds."))
        if not has_lambda:
            notes.append("no AugSelf run: the λ plots are skipped")
        fig, curve_notes = _plots.loss_figure(runs, curves, "Pretraining losses")
        notes.extend(curve_notes)
        if fig is not None:
            figures.append(_saved(fig, out_dir, "loss_curves", "Pretraining losses",
                                  "Columns: methods; rows: loss terms (AugSelf terms unweighted, total = SSL + "
                                  "λ·Σ AugSelf); lines: mean over seeds, band: ± std."))
        fig, monitor_notes = _plots.monitor_figure(runs, curves, "kNN monitor during pretraining")
        notes.extend(monitor_notes)
        if fig is not None:
            figures.append(_saved(fig, out_dir, "monitor_curves", "kNN monitor during pretraining",
                                  "Top-1 of the frozen backbone on a fixed subset of the pretraining dataset's "
                                  "tasks (weighted kNN, k = 200, T = 0.1: solid; 1-NN: dotted), every "
                                  "ssl.monitor_every epochs; lines: mean over seeds, band: ± std."))
    return figures


def _saved(fig, out_dir: Path, name: str, title: str, caption: str) -> _plots.Plot:
    stem = FIGURE_PREFIX + name
    return _plots.Plot(stem, title, caption, _plots.save(fig, out_dir, stem))


def _run_list(runs: pd.DataFrame) -> pd.DataFrame:
    frame = runs[list(_RUN_COLUMNS)].rename(columns=_RUN_COLUMNS).copy()
    frame["λ"] = frame["λ"].map(lambda_label)
    return frame.fillna("").astype(str).replace({"nan": "", "NaT": "", "None": ""})


def _meta(context: Mapping, runs: pd.DataFrame, default_lambda: float | None) -> dict[str, str]:
    groups = sorted(set(runs["group"].astype(str)) - {"", "nan", "None"})
    lambdas = sorted(set(runs.loc[runs["variant"] == "augself", "lambda"]))
    return {
        "command": f"`{context.get('command') or 'unknown'}`",
        "config group": f"`{groups[0]}`" if groups else "unknown",
        **({"source": str(context["source"])} if context.get("source") else {}),
        "runs": f"{len(runs)} ({', '.join(dict.fromkeys(runs['method']))}; seeds "
                f"{', '.join(map(str, sorted(set(runs['seed']))))})",
        "AugSelf λ": (", ".join(map(lambda_label, lambdas)) or "none")
                     + (f" (default {lambda_label(default_lambda)})" if default_lambda is not None else ""),
    }


def _markdown(meta: Mapping[str, str], notes: list[str], tables: list[Table], figures: list[_plots.Plot],
              run_list: pd.DataFrame) -> str:
    lines = [f"# {TITLE}", "",
             "Generated by the `report` stage; open `index.html` for the self-contained page (all figures "
             "and the parameters behind the numbers).", ""]
    lines += [f"- **{k}**: {v}" for k, v in meta.items()] + [""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    for t in tables:
        lines += [f"## {t.title}", "", to_markdown(t), "", t.caption, ""]
    if figures:
        lines += ["## Figures", ""]
        for f in figures:
            lines += [f"### {f.title}", "", f"![{f.title}]({FIGURES_DIR}/{f.png.name})", "", f.caption,
                      f"([SVG]({FIGURES_DIR}/{f.stem}.svg))", ""]
    run_table = Table("Runs", "", list(run_list.columns), align_right_from=len(run_list.columns))
    for row in run_list.itertuples(index=False):
        run_table.add(list(row))
    lines += [f"## Runs ({len(run_list)})", "", to_markdown(run_table), ""]
    return "\n".join(lines)
