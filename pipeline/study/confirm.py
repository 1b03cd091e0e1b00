"""The confirmatory study's pre-registered analysis (docs/study.md, "Pre-registration"), fixed before its runs.

A study file with ``report: confirmatory`` and ``compare_with: study.yaml`` (``study-confirm.yaml``) gets
the usual study report of its own models (:mod:`pipeline.study.report`: per-method t over seeds with Holm
across the methods, the secondary tests) with, above it:

* **the primary test** (:func:`welch_blocked`): AugSelf λ = 1 − baseline on ``linear/cfmnist/hue/top1``,
  paired per seed, pooled over the four methods with each method a fixed block: the estimate is the
  mean of the four methods' mean Δ, its variance Σ_m s_m²/n_m / 4², the degrees of freedom
  Welch–Satterthwaite; two-sided, α = 0.05.  With equal n it is
  :func:`pipeline.study.power.blocked_welch_test`, the test the power analysis sized.
  Its data, each seed's paired Δ per method (:func:`per_seed_table`), is printed under it.
* **its outcome** (:func:`outcome`), in the words fixed before the runs: *higher*, *lower*, *no gain of
  1 point* (not rejected and the interval's upper end below the 1 point the study was powered for: the
  first study's hypothesis refuted at that size), or *inconclusive*.  No outcome is read until every
  planned pair of the primary test has finished: an interim table is shown, labelled so, with no
  decision (the stopping rule is the planned n, never the data).
* **the first and the confirmatory study side by side** (:func:`forest_both`, ``forest-both.png``): per
  method and pooled, the first study's seeds (which generated the hypothesis) and the new ones; a filled
  marker is a rejection by the design's test (:func:`rejected_rows`), never an interval that merely misses 0.
* **the design's assumption, measured** (:func:`spread_table`): the across-seed SD of the primary Δ the
  seeds were sized from (the first study's) beside the one measured, and the half-width each gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from pipeline.stats import holm, t_interval, t_test_p
from pipeline.study.figures import METHOD_ORDER, PRIMARY, pyplot
from pipeline.study.ledger import LEDGER, done, read_ledger
from pipeline.study.plan import Study, load_study
from pipeline.study.power import ALPHA, per_seed_deltas, t_half_width

TARGET = 1.0            # the pooled gain the study was powered for (points), docs/study.md
# The methods whose premise held at 5 epochs (strong baseline ≥ 5 hue points below `none`, reports/study-premise/,
# measured before the pre-registration): the pre-registered secondary pooled test runs over them alone.  At their
# confirmatory schedules all four clear the rule (premise-at-schedule, measured after); the pair is not revised.
PREMISE_HOLDS = ("simclr", "moco")
PANELS = {PRIMARY: "hue, 24-way linear (primary)", "fewshot/cfmnist/hue/5way5shot": "hue, 5-way 5-shot",
          "linear/cfmnist/class/top1": "garment, linear"}


@dataclass(frozen=True)
class Pooled:
    """The Welch–Satterthwaite method-blocked paired t over the methods' per-seed Δ."""
    estimate: float
    se: float
    df: float
    t: float
    p: float
    low: float
    high: float
    seeds: dict                 # method -> number of paired seeds


def _welch_se_df(variances, ns) -> tuple[float, float]:
    """Standard error and Welch–Satterthwaite degrees of freedom of the mean of the methods' means, each
    method with across-seed variance ``variances[i]`` over ``ns[i]`` seeds."""
    v = np.array([s2 / n for s2, n in zip(variances, ns)], dtype=float)
    df = float(v.sum() ** 2 / sum(vi ** 2 / (n - 1) for vi, n in zip(v, ns))) if v.sum() > 0 else float("inf")
    return float(np.sqrt(v.sum()) / len(v)), df


def welch_blocked(deltas: dict[str, dict[int, float]], level: float = 0.95) -> Pooled | None:
    """The primary test on {method: {seed: Δ}}; None while a method has fewer than 2 paired seeds."""
    if not deltas or any(len(d) < 2 for d in deltas.values()):
        return None
    vals = [np.array(list(d.values()), dtype=float) for d in deltas.values()]
    est = float(np.mean([x.mean() for x in vals]))
    se, df = _welch_se_df([x.var(ddof=1) for x in vals], [len(x) for x in vals])
    t = est / se if se > 0 else (0.0 if est == 0 else float(np.copysign(np.inf, est)))
    q = stats.t.ppf((1 + level) / 2, df)
    return Pooled(est, se, df, float(t), float(2 * stats.t.sf(abs(t), df)), est - q * se, est + q * se,
                  {k: len(d) for k, d in deltas.items()})


def outcome(res: Pooled | None, complete: bool, target: float = TARGET, alpha: float = ALPHA) -> str:
    """The pre-registered reading of the primary test (docs/study.md): none before the study is complete."""
    if res is None or not complete:
        return "interim: no decision (the planned seeds have not all finished)"
    if res.p < alpha:
        return "higher: AugSelf raises hue accuracy" if res.estimate > 0 else "lower: AugSelf lowers hue accuracy"
    if res.high < target:
        return f"no gain of {target:g} point: not rejected, and the interval excludes a pooled gain of {target:g}"
    return "inconclusive: not rejected, and the interval still holds a pooled gain of 1 point"


def t_row(d: dict[int, float], level: float = 0.95) -> tuple[float, float, float] | None:
    """(mean, low, high) of one method's per-seed Δ: the t-interval over seeds (None under 2 seeds)."""
    iv = t_interval(list(d.values()), level)
    return None if iv is None else (iv.estimate, iv.low, iv.high)


def study_deltas(study: Study, metric: str, variant: str = "augself", ledger: Path = LEDGER
                 ) -> dict[str, dict[int, float]]:
    """{method: {seed: Δ}} of ``variant`` − baseline on ``metric`` over the models ``study`` plans."""
    return panel_deltas(study, ledger, [(metric, variant)])[(metric, variant)]


def panel_deltas(study: Study, ledger: Path = LEDGER, cells=None) -> dict:
    """{(metric, variant): {method: {seed: Δ}}} for every (metric, variant) of ``cells`` (default: each task
    of :data:`PANELS` × AugSelf and CASSLE), the study's ledger records read once."""
    cells = cells or [(m, v) for m in PANELS for v in ("augself", "cassle")]
    runs, items = read_ledger(ledger, {k.name for k in study.models()})
    return {(m, v): per_seed_deltas(runs, items, m, variant=v, methods=tuple(METHOD_ORDER)) for m, v in cells}


def rejected_rows(study: dict, metric: str, pooled_is_test: bool, alpha: float = ALPHA) -> set[tuple[str, str]]:
    """The (variant, method) rows of one task whose Δ = 0 the design's tests reject (docs/study.md): each
    method's AugSelf Δ by the t-test over seeds, Holm across the methods; SimCLR's CASSLE Δ by the t-test,
    uncorrected (one method); the pooled row by :func:`welch_blocked` only where ``pooled_is_test`` (the
    confirmatory study's primary task: the first study's pooled test was chosen after its data, and the
    other tasks' pooled rows were never tests)."""
    per = study.get((metric, "augself")) or {}
    methods = [m for m in METHOD_ORDER if m in per]
    adjusted = holm([t_test_p(list(per[m].values())) for m in methods])
    rows = {("augself", m) for m, p in zip(methods, adjusted) if p is not None and p < alpha}
    cassle = (study.get((metric, "cassle")) or {}).get("simclr")
    p = t_test_p(list(cassle.values())) if cassle else None
    if p is not None and p < alpha:
        rows.add(("cassle", "simclr"))
    pooled = welch_blocked(per) if pooled_is_test else None
    if pooled is not None and pooled.p < alpha:
        rows.add(("augself", "pooled"))
    return rows


def forest_both(first: dict, confirm: dict, path: Path, labels=("first study", "confirmatory"),
                complete: bool = True) -> bool:
    """One panel per task of :data:`PANELS`: per method (AugSelf, then SimCLR's CASSLE) and pooled, the two
    studies' Δ with their 95 % intervals (t over seeds; pooled: :func:`welch_blocked`).  ``first`` and
    ``confirm`` map (metric, variant) to {method: {seed: Δ}}.  Filled marker: the design's test rejects
    Δ = 0 (:func:`rejected_rows`); on the confirmatory side only once it is ``complete`` (no decision before
    every planned model is in), so a filled marker is never an interval that merely misses 0."""
    panels = [m for m in PANELS if any(first.get((m, "augself"))) or any(confirm.get((m, "augself")))]
    if not panels:
        return False
    plt = pyplot()
    # AugSelf (per method, pooled) above; SimCLR's CASSLE below on its own x-axis: its Δ is ten times
    # AugSelf's and would squeeze AugSelf's intervals into a sliver of a shared axis.
    groups = [[("augself", m) for m in METHOD_ORDER] + [("augself", "pooled")]]
    if any(s.get((m, "cassle")) for s in (first, confirm) for m in panels):
        groups.append([("cassle", "simclr")])
    fig, axes = plt.subplots(len(groups), len(panels), figsize=(4.6 * len(panels), 1.2 + 0.55 * sum(map(len, groups))
                                                                 + 0.5 * len(groups)),
                             sharey="row", squeeze=False,
                             gridspec_kw={"height_ratios": [len(g) + 0.8 for g in groups]})
    for g, rows in enumerate(groups):
        for ax, metric in zip(axes[g], panels):
            for j, (study, colour, off) in enumerate(((first, "0.55", -0.15), (confirm, "C0", 0.15))):
                label = labels[j]
                decided = (rejected_rows(study, metric, pooled_is_test=j == 1 and metric == PRIMARY)
                           if j == 0 or complete else set())
                for i, (variant, method) in enumerate(rows):
                    per = study.get((metric, variant)) or {}
                    if method == "pooled":
                        r = welch_blocked(per)
                        cell = None if r is None else (r.estimate, r.low, r.high)
                    else:
                        cell = t_row(per[method]) if method in per else None
                    if cell is None:
                        continue
                    y = len(rows) - 1 - i + off
                    mid, lo, hi = cell
                    filled = (variant, method) in decided
                    ax.plot([lo, hi], [y, y], color=colour, lw=2)
                    ax.plot([mid], [y], "s" if method == "pooled" else "o", color=colour,
                            mfc=colour if filled else "white", label=label)
                    label = None
            ax.axvline(0, color="k", lw=0.8)
            ax.set_ylim(-0.6, len(rows) - 0.4)
            if g == 0:
                ax.set_title(PANELS[metric], fontsize=10)
            if g == len(groups) - 1:
                ax.set_xlabel("Δ vs baseline (points), 95 % interval")
        names = ["pooled (4 methods)" if m == "pooled" else m if v == "augself" else "SimCLR CASSLE" for v, m in rows]
        axes[g][0].set_yticks(range(len(rows)))
        axes[g][0].set_yticklabels(list(reversed(names)))
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle("AugSelf λ = 1 (and CASSLE) − baseline, strong colour: first study (seeds 0–2, generated the "
                 "hypothesis) vs confirmatory\nfilled marker: the design's test rejects Δ = 0 (per method: t over "
                 "seeds, Holm across the four; CASSLE: t; pooled: the primary test, confirmatory hue linear only)"
                 + ("" if complete else "; confirmatory: interim, no decision"), fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _fmt(cell) -> str:
    return "–" if cell is None else f"{cell[0]:+.2f} [{cell[1]:+.2f}, {cell[2]:+.2f}]"


def per_seed_table(deltas: dict[str, dict[int, float]]) -> list[str]:
    """The primary test's data: each seed's paired Δ per method, then each method's mean and sd, so the test
    above can be recomputed from the page (and a seed that carries a mean is seen)."""
    methods = [m for m in METHOD_ORDER if deltas.get(m)]
    if not methods:
        return []
    seeds = sorted({s for m in methods for s in deltas[m]})
    lines = ["Its data, the paired Δ (points) of every seed:", "",
             "| seed | " + " | ".join(methods) + " |", "|---:|" + "---:|" * len(methods)]
    for s in seeds:
        lines.append(f"| {s} | " + " | ".join(f"{deltas[m][s]:+.2f}" if s in deltas[m] else "–" for m in methods)
                     + " |")
    values = [list(deltas[m].values()) for m in methods]
    lines.append("| mean | " + " | ".join(f"{np.mean(v):+.2f}" for v in values) + " |")
    lines.append("| sd | " + " | ".join(f"{np.std(v, ddof=1):.2f}" if len(v) > 1 else "–" for v in values) + " |")
    return lines + [""]


def spread_table(planning: dict[str, dict[int, float]], measured: dict[str, dict[int, float]], n: int
                 ) -> list[str]:
    """The design's assumption against what the study measured: each method's across-seed SD of the primary
    Δ in the study that sized it (``planning``) and in this one, with the 95 % half-width each gives at the
    planned ``n`` seeds, then the same for the pooled estimate (:func:`welch_blocked`).  Descriptive: a
    wider spread than planned means less power than the design aimed for, and changes nothing (fixed n)."""
    methods = [m for m in METHOD_ORDER if len(planning.get(m, {})) > 1 and len(measured.get(m, {})) > 1]
    if not methods:
        return []
    lines = ["## The design's assumption, measured: the spread over seeds", "",
             f"The number of seeds ({n} per method) was sized from the first study's across-seed SD of the "
             "primary Δ (5-epoch models); the confirmatory models train 10–15 epochs. What the design assumed "
             f"and what these seeds show, with the 95 % half-width each gives at {n} seeds (the measured one is "
             "the interval above once every seed is in). A wider spread than planned means less power than the "
             "design's 80 % for a pooled 1 point; by the stopping rule it changes nothing.", "",
             "| method | SD planned (first study) | SD measured | half-width planned | half-width measured | seeds |",
             "|---|---:|---:|---:|---:|---:|"]
    sd = {k: {m: float(np.std(list(d[m].values()), ddof=1)) for m in methods} for k, d in
          (("planned", planning), ("measured", measured))}
    for m in methods:
        lines.append(f"| {m} | {sd['planned'][m]:.2f} | {sd['measured'][m]:.2f} | "
                     f"{t_half_width(sd['planned'][m], n):.2f} | {t_half_width(sd['measured'][m], n):.2f} "
                     f"| {len(measured[m])} |")
    pooled = {}
    for k in ("planned", "measured"):       # the primary test's half-width at n seeds per method with these SDs
        se, df = _welch_se_df([sd[k][m] ** 2 for m in methods], [n] * len(methods))
        pooled[k] = float(stats.t.ppf(0.975, df) * se)
    lines += [f"| pooled ({len(methods)} methods) | | | {pooled['planned']:.2f} | {pooled['measured']:.2f} | |", ""]
    return lines


def lead(study: Study, out_dir: Path, ledger: Path = LEDGER) -> list[str]:
    """The confirmatory report's first sections: the primary test, its outcome, both studies side by side."""
    first_study = load_study(study.compare_with)
    first, new = panel_deltas(first_study, ledger), panel_deltas(study, ledger)
    planned = {k.seed for k in study.models() if k.variant == "augself"}
    primary = new[(PRIMARY, "augself")]
    # Complete: every planned model of the study is in (the CASSLE pairs too), the moment the secondary
    # tests lose their interim mark as well (pipeline.study.report), so no decision shows before another.
    complete = (set(primary) == set(METHOD_ORDER)
                and all(set(primary[m]) >= planned for m in METHOD_ORDER)
                and {k.name for k in study.models()} <= done(ledger))
    res = welch_blocked(primary)
    lines = ["## The pre-registered primary test ([docs/study.md](../../docs/study.md), “Pre-registration”)", "",
             "AugSelf λ = 1 − baseline on `hue` 24-way linear top-1, paired per seed on the same 5 000 test images, "
             "pooled over the four methods (each a fixed block; Welch–Satterthwaite degrees of freedom), "
             f"two-sided, α = {ALPHA:g}; seeds {', '.join(map(str, sorted(planned)))} (the first study's seeds "
             "generated the hypothesis and are not in it).", ""]
    if res is None:
        lines += ["Not computable yet: a method has fewer than 2 paired seeds.", ""]
    else:
        lines += ["| pooled Δ | 95 % interval | t | df | p | seeds per method | outcome |",
                  "|---:|---|---:|---:|---:|---|---|",
                  f"| {res.estimate:+.2f} | [{res.low:+.2f}, {res.high:+.2f}] | {res.t:.2f} | {res.df:.1f} | "
                  f"{res.p:.4f} | " + ", ".join(f"{m} {n}" for m, n in res.seeds.items()) + " | "
                  f"**{outcome(res, complete)}** |", ""]
    lines += per_seed_table(primary)
    sub = welch_blocked({m: d for m, d in primary.items() if m in PREMISE_HOLDS})
    if sub is not None:
        lines += [f"Secondary, pre-registered: the same test over the methods whose premise held at 5 epochs "
                  f"({', '.join(PREMISE_HOLDS)}): Δ {sub.estimate:+.2f} [{sub.low:+.2f}, {sub.high:+.2f}], "
                  f"p {sub.p:.4f}" + ("" if complete else " (interim)") + ".", ""]
    drawn = forest_both(first, new, out_dir / "forest-both.png", complete=complete)
    if not drawn and (out_dir / "forest-both.png").exists():
        (out_dir / "forest-both.png").unlink()
    lines += ["## The first study and the confirmatory one, side by side", "",
              "Per method: mean of the per-seed paired Δ and its t-interval over seeds; pooled: the primary test "
              "above (for the first study computed after the fact on seeds 0–2, which generated the hypothesis; "
              "not a test). The per-method decisions (t over seeds, Holm across the four methods) are the "
              "secondary tests, in the tables below. In the figure a filled marker is a rejection by that test "
              "(CASSLE: t over seeds; pooled: the primary test, on the confirmatory `hue` linear only), never an "
              "interval that merely misses 0" + ("" if complete else "; the confirmatory side has none before "
              "every planned model is in") + ".", ""]
    if drawn:
        lines += ["![first and confirmatory study](forest-both.png)", ""]
    lines += ["| task | method | first study (seeds 0–2) | confirmatory |", "|---|---|---|---|"]
    for metric, label in PANELS.items():
        for variant in ("augself", "cassle"):
            f, c = first[(metric, variant)], new[(metric, variant)]
            for method in METHOD_ORDER + (["pooled"] if variant == "augself" else []):
                if method == "pooled":
                    fr, cr = welch_blocked(f), welch_blocked(c)
                    cells = [None if r is None else (r.estimate, r.low, r.high) for r in (fr, cr)]
                else:
                    cells = [t_row(s[method]) if method in s else None for s in (f, c)]
                if cells == [None, None]:
                    continue
                name = f"{method} (CASSLE)" if variant == "cassle" else method
                lines.append(f"| {label} | {name} | {_fmt(cells[0])} | {_fmt(cells[1])} |")
    return lines + [""] + spread_table(first[(PRIMARY, "augself")], primary, len(planned))
