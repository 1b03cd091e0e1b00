"""The study's figures (``reports/study/*.png``), drawn from the paired differences and the ledger.

* :func:`forest_by_task`: the headline, every method's AugSelf (λ = 1) and CASSLE − baseline Δ with
  its 95 % paired interval against zero, one panel per task (the difference itself is drawn: bars
  from zero hide a difference of a point), CASSLE in its own row of panels on its own x-axis;
* :func:`lambda_figure`: Δ against λ per task (SimCLR, strong colour), λ = 0 being the baseline itself;
* :func:`strength_figure`: the premise and the remedy in one picture: the baseline's and AugSelf's
  hue accuracy against colour strength, and their Δ against strength per task.

Bars: the t-interval over seeds; dotted bars: one seed, the paired bootstrap over items (evaluation
noise only, no decision).  Filled marker: the design's test (t over seeds, Holm across methods) says
Δ ≠ 0.  Every figure reads the same ``differences`` frame as the
README's tables (:func:`pipeline.study.report.differences`), so a picture and its table cannot disagree.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

PRIMARY = "linear/cfmnist/hue/top1"
# The tasks the study reads, augmentation-sensitive first, then the ones that do not need colour (the cost).
TASKS = {PRIMARY: "hue, 24-way linear", "fewshot/cfmnist/hue/5way5shot": "hue, 5-way 5-shot",
         "linear/cfmnist/color/top1": "colour (6), linear", "linear/cfmnist/class/top1": "garment, linear",
         "linear/digits/class/top1": "digits, linear"}
STRENGTHS = ["weak", "default", "strong"]
METHOD_ORDER = ["simclr", "simsiam", "moco", "byol"]


def headline(diff: pd.DataFrame, lam: float = 1.0, strength: str = "strong") -> pd.DataFrame:
    """The main comparison's rows: AugSelf at ``lam`` and CASSLE, at ``strength``, on :data:`TASKS`."""
    if diff.empty:
        return diff
    d = diff[(diff["strength"] == strength) & diff["metric"].isin(list(TASKS))
             & (((diff["variant"] == "augself") & (diff["lambda"] == lam)) | (diff["variant"] == "cassle"))]
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    return d.assign(_m=d["method"].map(lambda m: rank.get(m, 99)), _v=(d["variant"] != "augself")
                    ).sort_values(["_v", "_m"]).drop(columns=["_m", "_v"])


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display): what every study figure draws with."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _interval(ax, x, r, colour, horizontal: bool):
    from pipeline.report.paired import decided

    filled = decided(r)
    ls = ":" if int(r["n_seeds"]) < 2 else "-"          # one seed: evaluation noise, no decision
    if horizontal:
        ax.plot([r["low"], r["high"]], [x, x], color=colour, lw=2, ls=ls)
        ax.plot([r["delta"]], [x], "o", color=colour, mfc=colour if filled else "white")
    else:
        ax.plot([x, x], [r["low"], r["high"]], color=colour, lw=2, ls=ls)
        ax.plot([x], [r["delta"]], "o", color=colour, mfc=colour if filled else "white")


def forest_by_task(diff: pd.DataFrame, path: Path) -> bool:
    rows = headline(diff)
    if rows.empty:
        return False
    plt = pyplot()
    models = list(dict.fromkeys(zip(rows["method"], rows["variant"])))
    tasks = [t for t in TASKS if t in set(rows["metric"])]
    # AugSelf above, CASSLE below on its own x-axis: CASSLE's Δ is ten times AugSelf's and would squeeze
    # AugSelf's intervals into a sliver of a shared axis (as in confirm.forest_both).
    groups = [g for g in ([m for m in models if m[1] == "augself"], [m for m in models if m[1] != "augself"]) if g]
    fig, axes = plt.subplots(len(groups), len(tasks),
                             figsize=(2.6 * len(tasks) + 1.6, 0.42 * len(models) + 1.6 + 0.5 * (len(groups) - 1)),
                             sharey="row", squeeze=False,
                             gridspec_kw={"height_ratios": [len(g) + 0.6 for g in groups]})
    seeds = rows.groupby(["method", "variant"])["seeds"].first()
    for g, group in enumerate(groups):
        ys = {m: len(group) - 1 - i for i, m in enumerate(group)}
        for ax, task in zip(axes[g], tasks):
            for _, r in rows[rows["metric"] == task].iterrows():
                if (r["method"], r["variant"]) in ys:
                    _interval(ax, ys[(r["method"], r["variant"])], r,
                              "tab:blue" if r["variant"] == "augself" else "tab:orange", horizontal=True)
            ax.axvline(0.0, color="black", lw=0.8, ls="--")
            ax.set_ylim(-0.6, len(group) - 0.4)
            ax.grid(axis="x", alpha=0.3)
            if g == 0:
                ax.set_title(TASKS[task], fontsize=9)
            if g == len(groups) - 1:
                ax.set_xlabel("Δ (points)")
        axes[g][0].set_yticks(list(ys.values()),
                              [f"{m} + {'AugSelf' if v == 'augself' else 'CASSLE'} (seeds {seeds[(m, v)]})"
                               for m, v in ys], fontsize=8)
    fig.suptitle("Variant − baseline at strong colour, paired: t-interval over seeds (dotted: 1 seed, evaluation noise); "
                 "filled: t-test, Holm, Δ ≠ 0", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def lambda_figure(diff: pd.DataFrame, path: Path, method: str = "simclr", strength: str = "strong") -> bool:
    d = diff[(diff["method"] == method) & (diff["strength"] == strength) & (diff["variant"] == "augself")
             & diff["metric"].isin(list(TASKS))] if not diff.empty else diff
    if d.empty or d["lambda"].nunique() < 2:
        return False
    plt = pyplot()
    tasks = [t for t in TASKS if t in set(d["metric"])]
    lams = sorted(d["lambda"].unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(2.7 * len(tasks), 3.0), sharey=False, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        t = d[d["metric"] == task].sort_values("lambda")
        xs = [lams.index(v) + 1 for v in t["lambda"]]
        ax.plot([0] + xs, [0.0] + list(t["delta"]), color="tab:blue", lw=0.8, alpha=0.6)
        for x, (_, r) in zip(xs, t.iterrows()):
            _interval(ax, x, r, "tab:blue", horizontal=False)
        ax.plot([0], [0.0], "s", color="black")
        ax.axhline(0.0, color="black", lw=0.8, ls="--")
        ax.set_xticks(range(len(lams) + 1), ["0"] + [f"{v:g}" for v in lams])
        ax.set_xlabel("λ (0: the baseline)")
        ax.set_title(TASKS[task], fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Δ AugSelf − baseline (points)")
    fig.suptitle(f"{method}, {strength} colour: the paired Δ against λ (dotted: 1 seed, evaluation noise, no decision; "
                 "filled: t-test over seeds, Holm, Δ ≠ 0)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def strength_figure(runs: pd.DataFrame, diff: pd.DataFrame, path: Path, method: str = "simclr",
                    lam: float = 1.0) -> bool:
    r = runs[(runs["method"] == method) & runs["variant"].isin(["baseline", "augself"])
             & ((runs["variant"] == "baseline") | (runs["lambda"] == lam))]
    if r.empty or r["strength"].nunique() < 2 or PRIMARY not in r:
        return False
    d = diff[(diff["method"] == method) & (diff["variant"] == "augself") & (diff["lambda"] == lam)] \
        if not diff.empty else diff
    plt = pyplot()
    tasks = [PRIMARY, "linear/cfmnist/class/top1"]
    fig, axes = plt.subplots(1, 1 + len(tasks), figsize=(4.0 * (1 + len(tasks)), 3.3), squeeze=False)
    ax = axes[0][0]
    for variant, colour in (("baseline", "tab:grey"), ("augself", "tab:blue")):
        g = r[r["variant"] == variant]
        for s, x in ((s, STRENGTHS.index(s)) for s in STRENGTHS):
            v = g.loc[g["strength"] == s, PRIMARY].dropna()
            ax.plot([x] * len(v), v, ".", color=colour, alpha=0.5)
        means = g.groupby("strength")[PRIMARY].mean().reindex(STRENGTHS)
        ax.plot(range(len(STRENGTHS)), means, "o-", color=colour, label=variant)
    ax.set_xticks(range(len(STRENGTHS)), STRENGTHS)
    ax.set_xlabel("colour strength")
    ax.set_ylabel("hue, 24-way linear top-1 (%)")
    ax.set_title("what the baseline loses, what AugSelf keeps", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    for ax, task in zip(axes[0][1:], tasks):
        t = d[d["metric"] == task] if not d.empty else d
        for _, row in t.iterrows():
            if row["strength"] in STRENGTHS:
                _interval(ax, STRENGTHS.index(row["strength"]), row, "tab:blue", horizontal=False)
        ax.axhline(0.0, color="black", lw=0.8, ls="--")
        ax.set_xticks(range(len(STRENGTHS)), STRENGTHS)
        ax.set_xlim(-0.5, len(STRENGTHS) - 0.5)
        ax.set_xlabel("colour strength")
        ax.set_ylabel("Δ AugSelf − baseline (points)")
        ax.set_title(TASKS[task], fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{method}, λ = {lam:g}: hue accuracy and the paired Δ against colour strength", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
