"""The study's report: ``reports/study/`` from the ledger (:mod:`pipeline.study.ledger`).

* ``differences.csv``: every variant − baseline Δ of the same method, strength and seed, paired on
  the same test images and episodes (:func:`pipeline.report.paired.paired_differences`: across
  seeds the t-interval and the decision, the t-test over seeds with Holm across methods, and a
  descriptive hierarchical bootstrap; one seed: the paired bootstrap over items and no decision),
  one row per strength × method × variant × λ × metric;
* the figures of :mod:`pipeline.study.figures` (forest per task, Δ against λ, against strength);
* ``cost.csv``: per variant, pretraining images/s and seconds and each evaluation step's seconds as
  the models' own runs logged them (the README's cost table);
* ``README.md``: what was run (models done out of planned), what the numbers show (written from them
  whichever way they fall), the main comparison, the probe, accuracies, cost, every difference.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.report.paired import DESCRIPTIVE, decided, decision_text
from pipeline.study.figures import (METHOD_ORDER, PRIMARY, STRENGTHS, TASKS, forest_by_task, headline, lambda_figure,
                                   strength_figure)
from pipeline.study.ledger import LEDGER, read_ledger
from pipeline.study.plan import Study
from pipeline.study.provenance import check, summary


# A confirmatory study's page before every planned model has finished: the rows show their estimates and
# intervals but no decision (the pre-registered stopping rule: fixed n, docs/study.md).  The first interim
# page labelled SimSiam's 2-seed rows "not distinguishable", as if a test had been read early.
INTERIM = "none (interim)"


def _mark_interim(diff: pd.DataFrame) -> pd.DataFrame:
    """``diff`` with every decision withheld (``distinguishable`` = :data:`INTERIM`) where one was made."""
    diff = diff.copy()
    diff["distinguishable"] = diff["distinguishable"].astype(object).where(diff["n_seeds"] < 2, INTERIM)
    return diff


def _is_interim(r) -> bool:
    v = r["distinguishable"]
    return isinstance(v, str) and v == INTERIM


def _decision(r) -> str:
    """The row's decision (``decision_text``), or :data:`INTERIM` on an interim page."""
    return INTERIM if _is_interim(r) else decision_text(r)


def _fmt_interval(r) -> str:
    """Δ [95 % interval]; a one-seed interval (evaluation noise, no decision) is marked ``1 seed``."""
    return f"{r['delta']:+.2f} [{r['low']:+.2f}, {r['high']:+.2f}]" + (" (1 seed)" if int(r["n_seeds"]) < 2 else "")


def differences(runs: pd.DataFrame, items: dict, notes: list[str]) -> pd.DataFrame:
    from pipeline.report import present_specs
    from pipeline.report.paired import paired_differences

    frames = []
    for strength, sub in runs.groupby("strength"):
        specs = present_specs(sub, [])
        d = paired_differences(sub, items, specs, notes)
        if not d.empty:
            d.insert(0, "strength", strength)
            frames.append(d)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


_TASKS = {"linear/cfmnist/hue/top1": "hue (24)", "linear/cfmnist/color/top1": "colour (6)",
          "linear/cfmnist/class/top1": "garment", "linear/digits/class/top1": "digits",
          "fewshot/cfmnist/hue/5way5shot": "hue 5-w 5-s"}
SPEED = "pretrain/images_per_s"


def _per_model_table(runs: pd.DataFrame, columns: dict[str, str], head: list[str]) -> list[str]:
    """Mean ± sd over seeds of ``columns``, one row per strength × method × variant × λ (R² to 3 digits)."""
    cols = [c for c in columns if c in runs]
    sub = runs.dropna(subset=cols, how="all") if cols else runs.iloc[:0]
    if sub.empty:
        return []
    lines = head + ["| strength | method | variant | λ | seeds | " + " | ".join(columns[c] for c in cols) + " |",
                    "|---|---|---|---:|---:|" + "---:|" * len(cols)]
    for (strength, method, variant, lam), g in sub.groupby(["strength", "method", "variant", "lambda"]):
        cells = []
        for c in cols:
            v = g[c].dropna()
            d = 3 if c.endswith("/r2") else 1
            cells.append("" if v.empty else f"{v.mean():.{d}f}" + (f" ± {v.std(ddof=1):.{d}f}" if len(v) > 1 else ""))
        lines.append(f"| {strength} | {method} | {variant} | {lam:g} | {g[cols[0]].notna().sum()} | "
                     + " | ".join(cells) + " |")
    return lines + [""]


def _means_table(runs: pd.DataFrame) -> list[str]:
    return _per_model_table(runs, _TASKS, ["## Accuracy per model (mean ± sd over seeds; the sd where ≥ 2 seeds ran)",
                                           ""])


BENCH = {"augself": Path("bench/results/pretrain-cpu-study.json"),
         "cassle": Path("bench/results/pretrain-cpu-study-cassle.json")}


def bench_cost(paths: dict[str, Path] = BENCH) -> list[str]:
    """The step-time cost of each variant from `bench/bench_pretrain.py` on the study's configuration:
    baseline and variant timed in one process, interleaved rounds, median and IQR (the real measure)."""
    rows = []
    for variant, path in paths.items():
        if not Path(path).exists():
            continue
        import json

        bench = json.loads(Path(path).read_text())
        key = "augself" if variant == "augself" else "cassle"
        for r in bench.get("methods", []):
            over, iqr = r.get(f"{key}_overhead_pct"), r.get(f"{key}_overhead_pct_iqr") or [float("nan")] * 2
            speed = r.get("images_per_s_lambda1" if key == "augself" else "images_per_s_cassle")
            if over is None:
                continue
            rows.append(f"| {r['method']} | {variant} | {r['images_per_s_lambda0']:.0f} | {speed:.0f} | "
                        f"{over:+.1f} % [{iqr[0]:+.1f}, {iqr[1]:+.1f}] | {bench.get('device_name', '')}, "
                        f"{bench.get('threads', '')} threads, {bench.get('clock', '')} clock |")
    if not rows:
        return []
    return ["### Step-time overhead of each variant (benchmark)", "",
            "Step time measured by `bench/bench_pretrain.py` on the study's configuration (baseline and variant "
            "in one process, interleaved rounds, median with the interquartile range over rounds; "
            f"{', '.join(f'`{p}`' for p in paths.values())}):", "",
            "| method | variant | baseline images/s | variant images/s | step-time overhead [IQR] | machine |",
            "|---|---|---:|---:|---|---|", *rows, ""]


WALL = "pretrain/wall_time_s"
MONITOR = "pretrain/monitor_s"


def eval_steps() -> tuple[str, ...]:
    """The evaluation steps, in the order a model runs them (features, then every evaluation task); each
    logs ``time/<step>_s`` (pipeline.workflow.STEP_SECONDS)."""
    from pipeline.workflow import evaluation_steps

    return evaluation_steps()


def _cell(v: pd.Series, digits: int = 0) -> str:
    """mean [min–max] of the models that recorded it, or "not recorded"."""
    v = v.dropna()
    if v.empty:
        return "not recorded"
    return f"{v.mean():.{digits}f}" + (f" [{v.min():.{digits}f}–{v.max():.{digits}f}]" if len(v) > 1 else "")


def cost_per_variant(runs: pd.DataFrame) -> pd.DataFrame:
    """Per strength × method × variant × λ: models, pretraining images/s and seconds, and each evaluation
    step's seconds, as recorded by each model's own run (mean, min, max, and how many models recorded it)."""
    cols = [SPEED, WALL, MONITOR] + [f"time/{s}_s" for s in eval_steps()]
    rows = []
    for (strength, method, variant, lam), g in runs.groupby(["strength", "method", "variant", "lambda"], sort=False):
        row = {"strength": strength, "method": method, "variant": variant, "lambda": float(lam), "models": len(g)}
        for c in cols:
            v = g[c].dropna() if c in g else pd.Series(dtype=float)
            row.update({f"{c}/mean": v.mean() if len(v) else float("nan"), f"{c}/min": v.min() if len(v) else float("nan"),
                        f"{c}/max": v.max() if len(v) else float("nan"), f"{c}/n": len(v)})
        rows.append(row)
    return pd.DataFrame(rows)


def cost_table(runs: pd.DataFrame) -> list[str]:
    """The cost of one model of each variant, from the ledger: pretraining images/s and seconds, and each
    evaluation step's seconds (recorded from the commit that added ``time/<step>_s``; the first study's
    models predate it), then the benchmark's step-time overhead of each variant."""
    if SPEED not in runs:
        return []
    steps = eval_steps()
    have_eval = [s for s in steps if f"time/{s}_s" in runs and runs[f"time/{s}_s"].notna().any()]
    lines = ["## Cost per model, from the ledger", "",
             "One row per variant: mean [min–max] over its models of what each model's own run logged. "
             "Pretraining seconds include the kNN monitor (its seconds are the next column). Evaluation "
             f"steps ({', '.join(f'`{s}`' for s in steps)}) log their wall seconds as `time/<step>_s` "
             "into the model's run, which the ledger copies; "
             + ("models exported before that was recorded show “not recorded”." if have_eval else
                "**no model in this ledger recorded them** (the first study's 34 models predate the "
                "`time/<step>_s` metrics; they are not in the ledger and cannot be recovered from it), so a "
                "budget computed from this table holds pretraining only; the next study's models record them.")
             + " These were measured under `make study`'s load (two DVC queue workers of one thread each beside "
             "whatever else the 2-core machine ran; the default slice alone at 2 threads), so a ratio to the "
             "baseline mixes a variant's cost with the load: the benchmark below times both in one process.", "",
             "| strength | method | variant | λ | models | images/s | pretraining s | monitor s | "
             + " | ".join(f"{s} s" for s in steps) + " |",
             "|---|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(steps)]
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    keys = runs.assign(_s=runs["strength"].map(lambda s: -STRENGTHS.index(s) if s in STRENGTHS else 9),
                       _m=runs["method"].map(lambda m: order.get(m, 99)))
    for (_, _, strength, method, variant, lam), g in keys.groupby(["_s", "_m", "strength", "method", "variant", "lambda"]):
        lines.append(f"| {strength} | {method} | {variant} | {lam:g} | {len(g)} | {_cell(g[SPEED])} | {_cell(g[WALL])} | "
                     f"{_cell(g[MONITOR]) if MONITOR in g else 'not recorded'} | "
                     + " | ".join(_cell(g[f"time/{s}_s"]) if f"time/{s}_s" in g else "not recorded" for s in steps)
                     + " |")
    total = runs[WALL].dropna() if WALL in runs else pd.Series(dtype=float)
    lines += ["", f"Pretraining over the {len(total)} models that recorded it: {total.sum() / 3600:.2f} worker-hours, "
              f"{total.mean():.0f} s per model on average (`cost.csv` holds this table's numbers)."]
    if have_eval:
        cols = [f"time/{s}_s" for s in steps]
        both = runs[[WALL, *cols]].dropna() if all(c in runs for c in cols) else pd.DataFrame()
        if not both.empty:
            evaluation = both[cols].sum(axis=1)
            lines += [f"Evaluation ({', '.join(steps)}) over the {len(both)} models that recorded every step: "
                      f"{evaluation.sum() / 3600:.2f} worker-hours, {evaluation.mean():.0f} s per model on average, "
                      f"{100 * evaluation.sum() / (evaluation.sum() + both[WALL].sum()):.0f} % of those models' "
                      "pretraining and evaluation seconds (DVC's and the queue's own overhead is in neither)."]
    return lines + [""] + bench_cost()


def _headline_table(diff: pd.DataFrame) -> list[str]:
    """Method × variant rows, task columns: the main comparison at a glance."""
    rows = headline(diff)
    if rows.empty:
        return []
    tasks = [t for t in TASKS if t in set(rows["metric"])]
    lines = ["## The main comparison: variant − baseline at strong colour (λ = 1)", "",
             "Δ in points, paired on the same test images / episodes. With ≥ 2 seeds: the t-interval over seeds, "
             "**bold** where the design's test (t over seeds, Holm across the methods) says Δ ≠ 0. With one seed: "
             "the paired bootstrap over the items of that seed, evaluation noise only, and no decision (one "
             "pretraining run cannot tell a method effect from a seed).", "",
             "| method | variant | seeds | " + " | ".join(TASKS[t] for t in tasks) + " |",
             "|---|---|---|" + "---|" * len(tasks)]
    for (method, variant), g in rows.groupby(["method", "variant"], sort=False):
        cells = []
        for t in tasks:
            r = g[g["metric"] == t]
            if r.empty:
                cells.append("")
                continue
            text = _fmt_interval(r.iloc[0])
            cells.append(f"**{text}**" if decided(r.iloc[0]) else text)
        lines.append(f"| {method} | {variant} | {g['seeds'].iloc[0]} | " + " | ".join(cells) + " |")
    return lines + [""]


def _primary_test(diff: pd.DataFrame, confirmatory: bool = False) -> list[str]:
    """The design's primary test: AugSelf − baseline on `hue`, one t-test over seeds per method, Holm over
    the methods (the ``holm_p`` of :func:`pipeline.report.paired.paired_differences`); in a confirmatory
    study these are the pre-registered secondary tests (its primary test is pooled, :mod:`pipeline.study.confirm`)."""
    rows = headline(diff)
    t = rows[(rows["variant"] == "augself") & (rows["metric"] == PRIMARY)] if not rows.empty else rows
    if t.empty:
        return []
    title = ("## The secondary tests (pre-registered): AugSelf λ = 1 − baseline on `hue`, one test per method"
             if confirmatory else
             "## The primary test (docs/study.md): AugSelf λ = 1 − baseline on `hue`, one test per method")
    lines = [title, "",
             "The decision is the design's test: the two-sided one-sample t-test of the per-seed paired Δ over "
             "seeds, Holm-corrected across the methods tested (“higher” / “lower”: Holm p < 0.05). The "
             f"{DESCRIPTIVE} is shown beside it and decides nothing: it can only resample the seeds "
             "that ran, and with this few it is narrower than the t-interval. A method with one seed has no test.", "",
             f"| method | seeds | Δ | t-interval over seeds | p | Holm p | decision | {DESCRIPTIVE} |",
             "|---|---|---:|---|---:|---:|---|---|"]
    for _, r in t.iterrows():
        one = int(r["n_seeds"]) < 2
        lines.append(f"| {r['method']} | {r['seeds']} | {r['delta']:+.2f} | "
                     + ("– (1 seed) | – | – | " if one else
                        f"[{r['low']:+.2f}, {r['high']:+.2f}] | {r['t_p']:.3f} | {r['holm_p']:.3f} | ")
                     + (f"**{_decision(r)}**" if decided(r) else _decision(r)) + " | "
                     + ("–" if one else f"[{r['boot_low']:+.2f}, {r['boot_high']:+.2f}]") + " |")
    return lines + [""]


def _direction(r) -> str:
    if int(r["n_seeds"]) < 2:
        return "no decision (1 seed)"
    if _is_interim(r):
        return "no decision (interim)"
    return {"higher": "higher than the baseline", "lower": "lower than the baseline"}.get(decision_text(r),
                                                                                       "not distinguishable from 0")


def _findings(diff: pd.DataFrame) -> list[str]:
    """What the numbers show, one sentence per claim, written from the rows whichever way they fall."""
    rows = headline(diff)
    if rows.empty:
        return []
    lines = ["## What the numbers show", "",
             "Decisions are the t-test over seeds with Holm across methods (docs/study.md); a method with one "
             "seed is reported with its evaluation-noise interval and no decision.", ""]
    if any(_is_interim(r) for _, r in rows.iterrows()):
        lines[-1:] = ["", "**Interim: no decision.** Not every planned model has finished; by the pre-registered "
                      "stopping rule (fixed n) no row carries a decision until they have, whatever its interval.", ""]
    aug = rows[rows["variant"] == "augself"]
    for task in TASKS:
        t = aug[aug["metric"] == task]
        if t.empty:
            continue
        said = [_decision(r) for _, r in t.iterrows()]
        up, down, none, interim = (said.count("higher"), said.count("lower"), said.count(decision_text({"n_seeds": 1})),
                                   said.count(INTERIM))
        per = "; ".join(f"{r['method']} {_fmt_interval(r)} (seeds {r['seeds']}"
                        + ("" if int(r["n_seeds"]) < 2 else f", Holm p {r['holm_p']:.3f}") + ")"
                        for _, r in t.iterrows())
        lines.append(f"* **{TASKS[task]}**, AugSelf λ = 1 − baseline, of {len(t)} method(s): higher in {up}, "
                     f"lower in {down}, not distinguishable in {len(t) - up - down - none - interim}"
                     + (f", no decision (1 seed) in {none}" if none else "")
                     + (f", no decision (interim) in {interim}" if interim else "") + f": {per}.")
    cas = rows[rows["variant"] == "cassle"]
    if not cas.empty:
        lines.append("* **CASSLE** − baseline (SimCLR): " + "; ".join(
            f"{TASKS[r['metric']]} {_fmt_interval(r)}, {_direction(r)}"
            for task in TASKS for _, r in cas[cas["metric"] == task].iterrows()) + ".")
    lam = diff[(diff["method"] == "simclr") & (diff["strength"] == "strong") & (diff["variant"] == "augself")]
    if lam["lambda"].nunique() > 1:
        for task in (PRIMARY, "linear/cfmnist/class/top1"):
            t = lam[lam["metric"] == task].sort_values("lambda")
            if not t.empty:
                lines.append(f"* λ (SimCLR, strong), {TASKS[task]}: " + "; ".join(
                    f"λ = {r['lambda']:g}: {_fmt_interval(r)}" for _, r in t.iterrows()) + ".")
    st = diff[(diff["method"] == "simclr") & (diff["variant"] == "augself") & (diff["lambda"] == 1.0)]
    if st["strength"].nunique() > 1:
        for task in (PRIMARY, "linear/cfmnist/class/top1"):
            t = st[st["metric"] == task]
            if not t.empty:
                lines.append(f"* colour strength (SimCLR, λ = 1), {TASKS[task]}: " + "; ".join(
                    f"{s}: {_fmt_interval(t[t['strength'] == s].iloc[0])}"
                    for s in STRENGTHS if s in set(t["strength"])) + ".")
    return lines + [""]


_PROBES = {"probe/crop/r2": "crop R²", "probe/color/r2": "colour R²", "probe/flip/acc": "flip acc. (%)"}


def _probe_table(runs: pd.DataFrame) -> list[str]:
    """How much of each view pair's ω difference a ridge / logistic map recovers from frozen features."""
    return _per_model_table(runs, _PROBES, [
        "## The augmentation probe (what the features keep of ω1 − ω2)", "",
        "Held-out R² of a ridge map (crop, colour) and accuracy of a logistic one (flip: same or not) from "
        "frozen features of two views to their augmentation difference; mean ± sd over seeds.", ""])


def _full_table(diff: pd.DataFrame) -> list[str]:
    lines = ["<details><summary>Every paired difference (strength × method × variant × λ × task)</summary>", "",
             f"| strength | method | variant | λ | metric | seeds | Δ [95 %] | interval | Holm p | decision | {DESCRIPTIVE} |",
             "|---|---|---|---:|---|---:|---|---|---:|---|---|"]
    for _, r in diff.iterrows():
        one = int(r["n_seeds"]) < 2
        lines.append(f"| {r['strength']} | {r['method']} | {r['variant']} | {r['lambda']:g} | {r['label']} | "
                     f"{r['seeds']} | {_fmt_interval(r)} | {r['interval']} | "
                     f"{'–' if one else format(r['holm_p'], '.3f')} | "
                     f"{'**' + _decision(r) + '**' if decided(r) else _decision(r)} | "
                     f"{'–' if one else '[{:+.2f}, {:+.2f}]'.format(r['boot_low'], r['boot_high'])} |")
    return lines + ["", "</details>", ""]


def _provenance(study: Study, runs: pd.DataFrame) -> str:
    """The check, from git history, that every model was trained after the pre-registration and by its code."""
    commits = dict(zip(runs["model"], runs["commit"])) if not runs.empty else {}
    return summary(check(study.preregistration, commits))


def build(study: Study, out_dir: Path = Path("reports/study"), ledger: Path = LEDGER) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lead: list[str] = []
    if study.report == "confirmatory":             # the pre-registered primary test comes first
        from pipeline.study.confirm import lead as confirmatory_lead

        lead = confirmatory_lead(study, out_dir, ledger)
    planned = study.models()
    runs, items = read_ledger(ledger, {k.name for k in planned})      # the ledger is shared by every study
    notes: list[str] = []
    lines = [f"# Study `{study.name}`", "",
             (f"Pre-registration: [docs/study.md](../../docs/study.md), “Pre-registration”; the first study: "
              f"`{study.compare_with}`. {_provenance(study, runs)}"
              if study.report == "confirmatory" else
              "Design: [docs/study.md](../../docs/study.md) (committed before any AugSelf run). "
              "Premise curves (baseline only): [premise.png](premise.png), [premise.csv](premise.csv)."), "",
             f"Models finished: **{len(runs)} of {len(planned)}** planned "
             + ("(`make study` trains the rest and rebuilds this page)." if study.source == "study.yaml" else
                f"(`python -m stages.study run --study {study.source}` trains the rest and rebuilds this page)."),
             "", *lead]
    if runs.empty:
        lines.append("No model of the study has finished yet.")
        (out_dir / "README.md").write_text("\n".join(lines) + "\n")
        return out_dir / "README.md"
    missing = sorted({k.name for k in planned} - set(runs["model"]))
    diff = differences(runs, items, notes)
    if study.report == "confirmatory" and missing and not diff.empty:
        diff = _mark_interim(diff)
    figures = {"forest.png": False, "lambda.png": False, "strength.png": False}
    if not diff.empty:
        diff.drop(columns=["per_seed"], errors="ignore").to_csv(out_dir / "differences.csv", index=False,
                                                              float_format="%.4f")
        figures["forest.png"] = forest_by_task(diff, out_dir / "forest.png")
        figures["lambda.png"] = lambda_figure(diff, out_dir / "lambda.png")
    figures["strength.png"] = strength_figure(runs, diff, out_dir / "strength.png")
    for name, drawn in figures.items():              # a figure whose data is gone must not outlive it
        if not drawn and (out_dir / name).exists():
            (out_dir / name).unlink()
    lines += _findings(diff)
    if figures["forest.png"]:
        lines += ["![paired differences per task](forest.png)", ""]
    lines += _headline_table(diff)
    lines += _primary_test(diff, study.report == "confirmatory")
    if figures["strength.png"]:
        lines += ["## Colour strength: the premise and the remedy", "", "![strength](strength.png)", ""]
    if figures["lambda.png"]:
        lines += ["## λ", "", "![lambda](lambda.png)", ""]
    lines += _probe_table(runs)
    lines += _means_table(runs)
    lines += cost_table(runs)
    if not diff.empty:
        lines += _full_table(diff)
    if missing:
        lines += ["## Not yet run", "", ", ".join(f"`{m}`" for m in missing), ""]
    if notes:
        lines += ["## Notes", "", *[f"* {n}" for n in notes], ""]
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")
    runs.drop(columns=[c for c in runs.columns if c.startswith("monitor/")], errors="ignore").to_csv(
        out_dir / "runs.csv", index=False, float_format="%.4f")
    if SPEED in runs:
        cost_per_variant(runs).to_csv(out_dir / "cost.csv", index=False, float_format="%.2f")
    return out_dir / "README.md"
