"""The report's figures, drawn with matplotlib's object API (no pyplot, so no global backend state).

Every figure is saved as PNG (embedded in ``index.html``) and SVG (for papers).  Conventions:

* Colours from the Okabe–Ito palette (distinguishable with the common colour-vision deficiencies);
  baseline bars are also unhatched and AugSelf bars hatched, and methods differ by marker, so nothing
  relies on colour alone.
* Error bars are the sample std over seeds (drawn only where ≥ 2 seeds ran); bar charts also show
  each seed as a dot, and the AugSelf − baseline difference of means above each method.
* Legends sit outside the axes (below the subplots) so they never cover data; the layout is
  matplotlib's constrained layout.
* Output is deterministic (no dates in the SVG, fixed SVG id salt), so committed reports diff cleanly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.transforms import ScaledTranslation

from pipeline.augmentations import target_names
from pipeline.report.schema import MetricSpec, find_curve, lambda_label, method_order
from pipeline.report.tables import stat_column

OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
BASELINE_COLOUR = "#0072B2"
CASSLE_COLOUR = "#009E73"
AUGSELF_COLOURS = ["#E69F00", "#D55E00", "#CC79A7", "#009E73", "#56B4E9", "#F0E442", "#000000"]
METHOD_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
STYLE = {
    "font.size": 9.5, "axes.titlesize": 10.5, "axes.labelsize": 9.5, "legend.fontsize": 9.5,
    "figure.titlesize": 12, "axes.spines.top": False, "axes.spines.right": False,
    "axes.grid": True, "grid.alpha": 0.3, "axes.axisbelow": True,
    "svg.hashsalt": "augself-report", "svg.fonttype": "path",
}
PNG_DPI = 110


@dataclass
class Plot:
    """One saved figure: file stem, caption, the files written, and notes about what it left out."""
    stem: str
    title: str
    caption: str
    paths: list[Path] = field(default_factory=list)

    @property
    def png(self) -> Path:
        return next(p for p in self.paths if p.suffix == ".png")


def style():
    """Context manager applying the report's matplotlib style."""
    return matplotlib.rc_context(STYLE)


def save(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    paths = []
    for ext in ("png", "svg"):
        path = out_dir / f"{stem}.{ext}"
        fig.savefig(path, dpi=PNG_DPI, metadata={"Date": None} if ext == "svg" else {"Software": None})
        paths.append(path)
    return paths


def _grid(n: int, ncols: int = 3, width: float = 4.4, height: float = 3.3, title: str = "") -> tuple[Figure, list]:
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    fig = Figure(figsize=(width * ncols, height * nrows + 0.9), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontweight="bold")
    return fig, axes[:n]


def _stats(row: pd.Series | None, column: str) -> tuple[float, float]:
    """(mean, std) of a metric in a summary row; std is NaN unless ≥ 2 seeds have the metric."""
    if row is None:
        return np.nan, np.nan
    mean, std, n = (row[stat_column(column, s)] for s in ("mean", "std", "n"))
    return float(mean), float(std) if n >= 2 else np.nan


def _summary_row(summary: pd.DataFrame, method: str, variant: str, lam: float) -> pd.Series | None:
    rows = summary[(summary["method"] == method) & (summary["variant"] == variant) & (summary["lambda"] == lam)]
    return None if rows.empty else rows.iloc[0]


def bar_figure(runs: pd.DataFrame, summary: pd.DataFrame, specs: list[MetricSpec], ref_lambda: float | None,
               title: str) -> Figure:
    """One subplot per metric: per method a baseline and an AugSelf (λ = ``ref_lambda``) bar, and a
    CASSLE bar when there are CASSLE runs.

    ``ref_lambda`` None (no AugSelf run) draws no AugSelf bars.
    """
    methods = method_order(summary["method"])
    fig, axes = _grid(len(specs), title=title)
    has_cassle = bool((summary["variant"] == "cassle").any())
    bars = [("baseline", 0.0, BASELINE_COLOUR, "")]
    if ref_lambda is not None:
        bars.append(("augself", ref_lambda, AUGSELF_COLOURS[0], "//"))
    if has_cassle:
        bars.append(("cassle", 0.0, CASSLE_COLOUR, ".."))
    width = 0.76 / max(2, len(bars))
    configs = [(*bar, (i - (len(bars) - 1) / 2) * width) for i, bar in enumerate(bars)]
    for ax, spec in zip(axes, specs):
        x = np.arange(len(methods))
        lo, hi = 0.0, 0.0
        for variant, lam, colour, hatch, offset in configs:
            means, stds = zip(*(_stats(_summary_row(summary, m, variant, lam), spec.column) for m in methods))
            means, stds = np.array(means), np.array(stds)
            ax.bar(x + offset, np.nan_to_num(means), width, color=colour, hatch=hatch, edgecolor="white",
                   linewidth=0.5)
            for xi in (x + offset)[~np.isfinite(means)]:
                ax.text(xi, 0, "n/a", ha="center", va="bottom", fontsize=8, color="#555555")
            ok = np.isfinite(means) & np.isfinite(stds)
            if ok.any():
                ax.errorbar((x + offset)[ok], means[ok], yerr=stds[ok], fmt="none", ecolor="#333333",
                            capsize=3, linewidth=1.1, zorder=4)
            for i, m in enumerate(methods):
                seeds = (runs["method"] == m) & (runs["variant"] == variant) & (runs["lambda"] == lam)
                values = runs.loc[seeds, spec.column].dropna().to_numpy()
                if values.size:
                    jitter = np.linspace(-width * 0.22, width * 0.22, values.size) if values.size > 1 else [0.0]
                    ax.scatter(x[i] + offset + np.asarray(jitter), values, s=14, color="black", zorder=5,
                               edgecolor="white", linewidth=0.4)
                    lo, hi = min(lo, values.min()), max(hi, values.max())
            tops = means + np.nan_to_num(stds)
            bottoms = means - np.nan_to_num(stds)
            if np.isfinite(tops).any():
                hi, lo = max(hi, np.nanmax(tops)), min(lo, np.nanmin(bottoms))
        span = (hi - lo) or 1.0
        for i, m in enumerate(methods):
            base, _ = _stats(_summary_row(summary, m, "baseline", 0.0), spec.column)
            aug = np.nan if ref_lambda is None else \
                _stats(_summary_row(summary, m, "augself", ref_lambda), spec.column)[0]
            if np.isfinite(base) and np.isfinite(aug):
                ax.annotate(f"Δ {spec.fmt(aug - base, signed=True)}", (x[i], hi + 0.04 * span),
                            ha="center", va="bottom", fontsize=8.5)
        ax.set_ylim(lo - 0.05 * span if lo < 0 else 0, hi + 0.2 * span)
        ax.set_xticks(x, methods)
        ax.set_title(spec.label)
        ax.set_ylabel(spec.axis)
        ax.axhline(0, color="#555555", linewidth=0.6)
    handles = [Patch(facecolor=BASELINE_COLOUR, label="baseline (λ = 0)")]
    if ref_lambda is not None:
        handles.append(Patch(facecolor=AUGSELF_COLOURS[0], hatch="//", edgecolor="white",
                             label=f"AugSelf (λ = {lambda_label(ref_lambda)})"))
    if has_cassle:
        handles.append(Patch(facecolor=CASSLE_COLOUR, hatch="..", edgecolor="white", label="CASSLE"))
    handles += [Line2D([], [], marker="o", linestyle="", color="black", markersize=4, label="one seed"),
                Line2D([], [], color="#333333", label="± std over seeds")]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    return fig


def lambda_figure(summary: pd.DataFrame, specs: list[MetricSpec], title: str) -> Figure:
    """One subplot per metric: the metric against λ, one line per method (λ = 0 is the baseline)."""
    methods = method_order(summary["method"])
    fig, axes = _grid(len(specs), title=title)
    all_lambdas = sorted({0.0} | set(summary.loc[summary["variant"] == "augself", "lambda"]))
    positive = [lam for lam in all_lambdas if lam > 0]
    for ax, spec in zip(axes, specs):
        for i, method in enumerate(methods):
            rows = summary[summary["method"] == method]
            rows = pd.concat([rows[rows["variant"] == "baseline"], rows[rows["variant"] == "augself"]])
            xs = rows["lambda"].to_numpy(float)
            ys = rows[stat_column(spec.column, "mean")].to_numpy(float)
            n = rows[stat_column(spec.column, "n")].to_numpy(float)
            errs = np.where(n >= 2, rows[stat_column(spec.column, "std")].to_numpy(float), np.nan)
            ok = np.isfinite(ys)
            if not ok.any():
                continue
            colour = OKABE_ITO[i % len(OKABE_ITO)]
            # dodge methods sideways by a few points (any x scale) so their error bars do not hide each other
            dodge = ScaledTranslation((i - (len(methods) - 1) / 2) * 3.5 / 72, 0, fig.dpi_scale_trans)
            ax.errorbar(xs[ok], ys[ok], transform=ax.transData + dodge, yerr=np.nan_to_num(errs[ok]) if np.isfinite(errs[ok]).any() else None,
                        color=colour, marker=METHOD_MARKERS[i % len(METHOD_MARKERS)], markersize=5,
                        capsize=3, linewidth=1.4, label=method)
            spread = np.nan_to_num(errs[ok])
            ax.update_datalim(np.column_stack([np.r_[xs[ok], xs[ok]], np.r_[ys[ok] - spread, ys[ok] + spread]]))
        ax.autoscale_view()
        if positive and max(positive) / min(positive) > 20:
            ax.set_xscale("symlog", linthresh=min(positive), linscale=0.5)
        ax.set_xticks(all_lambdas, ["0\n(baseline)" if lam == 0 else lambda_label(lam) for lam in all_lambdas],
                      rotation=0 if len(all_lambdas) <= 5 else 45)
        ax.minorticks_off()
        ax.set_xlabel("AugSelf weight λ")
        ax.set_ylabel(spec.axis)
        ax.set_title(spec.label)
    handles = [Line2D([], [], color=OKABE_ITO[i % len(OKABE_ITO)], marker=METHOD_MARKERS[i % len(METHOD_MARKERS)],
                      label=m) for i, m in enumerate(methods)]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 3), frameon=False,
               title="mean over seeds, ± std where ≥ 2 seeds")
    return fig


def _loss_terms(curves: list[pd.DataFrame]) -> list[str]:
    cols = {c for df in curves for c in df.columns if c.startswith("pretrain/loss") and df[c].notna().any()}
    rank = {f"pretrain/loss_augself/{a}": i for i, a in enumerate(target_names())}
    augself = sorted((c for c in cols if c.startswith("pretrain/loss_augself/")), key=lambda c: (rank.get(c, 99), c))
    return [c for c in ["pretrain/loss_ssl", *augself, "pretrain/loss_total"] if c in cols]


def _term_label(term: str) -> str:
    name = term.removeprefix("pretrain/")
    return {"loss_ssl": "SSL loss", "loss_total": "total loss"}.get(name) or f"AugSelf {name.split('/', 1)[1]} loss"


def loss_figure(runs: pd.DataFrame, curves: Mapping[str, pd.DataFrame], title: str) -> tuple[Figure | None, list[str]]:
    """Rows: loss terms; columns: methods; one line per (variant, λ), mean over seeds with a ±std band.

    Returns (None, notes) when no run has a curve.  The x axis is the (fractional) epoch when the curves
    have one, else the optimiser step.
    """
    notes = []
    per_run = {}
    for _, run in runs.iterrows():
        curve = find_curve(curves, run)
        if curve is None:
            notes.append(f"no loss curve for run {run['run_id']} ({run['method']}, {run['variant']}, "
                         f"λ={lambda_label(run['lambda'])}, seed {run['seed']})")
        else:
            per_run[run["run_id"]] = curve
    if not per_run:
        return None, ["loss curves: no run has a curve; the loss plot is skipped"]
    terms = _loss_terms(list(per_run.values()))
    if not terms:
        return None, ["loss curves: no pretrain/loss_* column in any curve; the loss plot is skipped"]
    methods = method_order(runs["method"])
    use_epoch = all("epoch" in c.columns and c["epoch"].notna().any() for c in per_run.values())
    configs = list(dict.fromkeys(zip(runs["variant"], runs["lambda"])))
    aug_lams = sorted(lam for v, lam in configs if v == "augself")
    colour = {("baseline", 0.0): BASELINE_COLOUR}
    colour.update({("augself", lam): AUGSELF_COLOURS[i % len(AUGSELF_COLOURS)] for i, lam in enumerate(aug_lams)})

    fig = Figure(figsize=(3.9 * len(methods), 2.7 * len(terms) + 1.0), layout="constrained")
    axes = fig.subplots(len(terms), len(methods), squeeze=False, sharex="col")
    fig.suptitle(title, fontweight="bold")
    for col, method in enumerate(methods):
        for row, term in enumerate(terms):
            ax = axes[row][col]
            drawn = False
            for variant, lam in sorted(c for c in configs if c[0] == "baseline") + \
                    [("augself", lam) for lam in aug_lams]:
                ids = runs.loc[(runs["method"] == method) & (runs["variant"] == variant) & (runs["lambda"] == lam),
                               "run_id"]
                frames = [per_run[i][["step", "epoch", term] if use_epoch else ["step", term]].dropna(subset=[term])
                          for i in ids if i in per_run and term in per_run[i].columns]
                frames = [f for f in frames if not f.empty]
                if not frames:
                    continue
                stats = pd.concat(frames).groupby("step").agg(
                    x=("epoch" if use_epoch else "step", "mean"), mean=(term, "mean"), std=(term, "std"),
                    n=(term, "count")).sort_index()
                c = colour[(variant, lam)]
                ax.plot(stats["x"], stats["mean"], color=c, linewidth=1.4,
                        linestyle="-" if variant == "baseline" else "--")
                band = stats[stats["n"] >= 2]
                if not band.empty:
                    ax.fill_between(band["x"], band["mean"] - band["std"], band["mean"] + band["std"],
                                    color=c, alpha=0.2, linewidth=0)
                drawn = True
            ax.set_title(f"{method}: {_term_label(term)}")
            if not drawn:
                ax.text(0.5, 0.5, "not logged for these runs", ha="center", va="center",
                        transform=ax.transAxes, color="#555555")
                ax.set_yticks([])
            if col == 0:
                ax.set_ylabel("loss (per batch)")
            if row == len(terms) - 1:
                ax.set_xlabel("epoch" if use_epoch else "optimiser step")
                ax.tick_params(labelbottom=True)
    handles = [Line2D([], [], color=colour[c], linestyle="-" if c[0] == "baseline" else "--",
                      label="baseline (λ = 0)" if c[0] == "baseline" else f"AugSelf λ = {lambda_label(c[1])}")
               for c in colour if c in configs]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 3), frameon=False,
               title="mean over seeds, band ± std where ≥ 2 seeds")
    return fig, notes


def monitor_figure(runs: pd.DataFrame, curves: Mapping[str, pd.DataFrame], title: str) -> tuple[Figure | None, list[str]]:
    """The kNN monitor during pretraining (:mod:`pipeline.monitor`): rows: tasks; columns: methods.

    One colour per (variant, λ) as in the loss curves; solid: weighted kNN top-1, dotted: 1-NN top-1;
    mean over seeds with a ±std band (≥ 2 seeds).  The x axis is the optimiser step (monitor points
    sit at epoch ends).  Reads the ``monitor/<task>/{knn_top1,nn1_top1}`` columns of the runs' curves
    (monitor.csv or the MLflow metric history); (None, notes) when no run has them.
    """
    per_run = {run["run_id"]: c for _, run in runs.iterrows()
               if (c := find_curve(curves, run)) is not None and any(k.startswith("monitor/") for k in c.columns)}
    if not per_run:
        return None, ["kNN monitor: no run has monitor/* curves (ssl.monitor_every: 0, or older runs); plot skipped"]
    tasks = sorted({k.split("/")[1] for c in per_run.values() for k in c.columns if k.startswith("monitor/")})
    methods = method_order(runs["method"])
    configs = list(dict.fromkeys(zip(runs["variant"], runs["lambda"])))
    aug_lams = sorted(lam for v, lam in configs if v == "augself")
    colour = {("baseline", 0.0): BASELINE_COLOUR}
    colour.update({("augself", lam): AUGSELF_COLOURS[i % len(AUGSELF_COLOURS)] for i, lam in enumerate(aug_lams)})
    colour.update({("cassle", lam): CASSLE_COLOUR for v, lam in configs if v == "cassle"})
    fig = Figure(figsize=(max(7.5, 3.9 * len(methods)), 2.6 * len(tasks) + 1.4), layout="constrained")
    axes = fig.subplots(len(tasks), len(methods), squeeze=False, sharex="col")
    fig.suptitle(title, fontweight="bold")
    for col, method in enumerate(methods):
        for row, task in enumerate(tasks):
            ax = axes[row][col]
            for config in [c for c in colour if c in configs]:
                ids = runs.loc[(runs["method"] == method) & (runs["variant"] == config[0])
                               & (runs["lambda"] == config[1]), "run_id"]
                for metric, style in (("knn_top1", "-"), ("nn1_top1", ":")):
                    key = f"monitor/{task}/{metric}"
                    frames = [per_run[i][["step", key]].dropna() for i in ids if i in per_run and key in per_run[i]]
                    frames = [f for f in frames if not f.empty]
                    if not frames:
                        continue
                    stats = pd.concat(frames).groupby("step")[key].agg(["mean", "std", "count"]).sort_index()
                    ax.plot(stats.index, stats["mean"], color=colour[config], linestyle=style, marker=".", linewidth=1.4)
                    band = stats[stats["count"] >= 2]
                    if not band.empty:
                        ax.fill_between(band.index, band["mean"] - band["std"], band["mean"] + band["std"],
                                        color=colour[config], alpha=0.2, linewidth=0)
            ax.set_title(f"{method}: {task}")
            if col == 0:
                ax.set_ylabel("top-1 (%)")
            if row == len(tasks) - 1:
                ax.set_xlabel("optimiser step")
                ax.tick_params(labelbottom=True)
    handles = [Line2D([], [], color=colour[c], label="baseline (λ = 0)" if c[0] == "baseline" else "CASSLE"
                      if c[0] == "cassle" else f"AugSelf λ = {lambda_label(c[1])}") for c in colour if c in configs]
    handles += [Line2D([], [], color="#555555", linestyle="-", label="weighted kNN (k = 200)"),
                Line2D([], [], color="#555555", linestyle=":", label="1-NN")]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 3), frameon=False,
               title="frozen backbone on a fixed subset; mean over seeds, band ± std where ≥ 2 seeds")
    return fig, []


def forest_figure(paired: pd.DataFrame, title: str) -> Figure | None:
    """One row per method × variant × λ × metric: Δ with its 95 % interval against zero.  Rows come from
    :func:`pipeline.report.paired.paired_differences`: filled blue where the decision (t over seeds,
    Holm) says Δ ≠ 0, hollow grey otherwise, and hollow grey with a dotted bar for a one-seed row (its
    interval is evaluation noise and it carries no decision)."""
    from pipeline.report.paired import decided

    if paired.empty:
        return None
    fig = Figure(figsize=(7.5, 0.42 * len(paired) + 1.4), layout="constrained")
    ax = fig.add_subplot()
    labels = [f"{r.method}: {r.variant} (λ={r['lambda']:g}) − baseline · {r.label}"
              + (" (1 seed)" if int(r["n_seeds"]) < 2 else "") for _, r in paired.iterrows()]
    ys = np.arange(len(paired))[::-1]
    for y, (_, r) in zip(ys, paired.iterrows()):
        yes = decided(r)
        colour = "tab:blue" if yes else "tab:grey"
        ax.plot([r["low"], r["high"]], [y, y], color=colour, lw=2, ls=":" if int(r["n_seeds"]) < 2 else "-")
        ax.plot([r["delta"]], [y], "o", color=colour, mfc=colour if yes else "white")
    ax.axvline(0.0, color="black", lw=0.8, ls="--")
    ax.set_yticks(ys, labels, fontsize=8)
    ax.set_xlabel("Δ (percentage points), 95 % paired interval")
    fig.suptitle(title, fontsize=10)       # over the whole figure: the long row labels push the axes right
    return fig
