"""Power of the confirmatory study, from the first study's ledger (issue 24 item 3).

``python -m stages.study power`` reads ``reports/study/runs/`` and computes, for the primary task
(AugSelf λ = 1 − baseline on ``linear/cfmnist/hue/top1`` at strong colour), the paired Δ of every
method and seed (mean over the same test images of AugSelf's minus the baseline's correctness, as
the report does), each method's across-seed standard deviation and the pooled within-method SD.

**The primary test it powers: the method-blocked paired t-test.**  Over the four methods × n new
seeds, the Δ of method m and seed s is modelled as ``Δ_ms = μ + a_m + e_ms`` (the method a fixed
block, Σ a_m = 0); H0: μ = 0, where μ is the mean AugSelf − baseline gain over the four methods.  The
statistic is ``t = mean(Δ) / (s_w / √(4n))`` with ``s_w²`` the pooled within-method variance
(residuals after removing each method's mean), ``4(n − 1)`` degrees of freedom; two-sided, α = 0.05.
Why this one:

* **blocked, not a one-sample t over all 4n Δ**: the methods' mean gains differ (the first study:
  +0.9 to +2.6); a one-sample t over all Δ counts that spread as noise.  Removing per-method means
  (the block) costs 3 degrees of freedom and keeps only the seed-to-seed spread;
* **methods fixed, not a mixed model with a random method effect**: the question is about these four
  methods, not a population of SSL methods; a random method effect would test against 3 degrees of
  freedom whatever n, and could not reach 80 % power for a 1-point gain at any affordable n;
* **the heterogeneous SDs** (SimCLR's is ≈ 5× MoCo's): with equal n per method the variance of the
  mean over 4n Δ is mean_m(σ_m²)/(4n), and ``s_w²`` is unbiased for mean_m(σ_m²), so the standard
  error is right on average; the degrees of freedom are optimistic, and under the first study's
  per-method SDs the test's real size is ≈ 6–8 % instead of 5 % (:func:`simulate_blocked`, in the
  table).  :func:`blocked_welch_test` (each method's own variance, Welch–Satterthwaite df) holds 5 %
  there at the price of about one more seed per method; its power has no closed form (random df),
  so it is simulated.  The script reports both; the pre-registration picks one;
* **two-sided**: a reliable loss would be a finding too (the issue: "turns it into a result, or
  refutes it"); the one-sided power is printed beside it for reference only.

**Recommendation printed by the script**: the Welch–Satterthwaite blocked test, two-sided, with the
n at which its simulated power under the per-method SDs reaches the target (7 from the first
study's ledger), because the pooled test's exact n (6) buys its power with a real size of ≈ 7 %.

The secondary tests (one t-test over seeds per method, Holm across the four) are the report's
decision column; this module gives, per method, the n for a 95 % t half-width ≤ ``target`` points,
solved exactly (the t quantile depends on n): the smallest n with ``t_{0.975, n−1} σ_m / √n ≤ target``
at the planning value σ_m (the first study's SD), and the smallest n with an ``assurance``
probability that the half-width *realised* is ≤ target (``(n − 1) s² / σ² ~ χ²_{n−1}``).

Power is the noncentral t (scipy), not a normal approximation; the tests check it against a seeded
Monte-Carlo simulation.  The first study's seeds are not reused in the confirmatory test: n counts
new seeds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

PRIMARY = "linear/cfmnist/hue/top1"
METHODS = ("simclr", "simsiam", "moco", "byol")
ALPHA = 0.05


@dataclass(frozen=True)
class PerSeed:
    """Per method: {seed: Δ} of AugSelf λ = 1 − baseline on the primary task."""
    deltas: dict[str, dict[int, float]]

    def sd(self, method: str) -> float:
        return float(np.std(list(self.deltas[method].values()), ddof=1))

    def pooled_sd(self) -> float:
        """Pooled within-method SD: √(Σ_m Σ_s (Δ − mean_m)² / Σ_m (n_m − 1))."""
        ss = sum(((np.array(list(d.values())) - np.mean(list(d.values()))) ** 2).sum() for d in self.deltas.values())
        df = sum(len(d) - 1 for d in self.deltas.values())
        return float(np.sqrt(ss / df))

    def pooled_df(self) -> int:
        return sum(len(d) - 1 for d in self.deltas.values())


def per_seed_deltas(runs, items: dict, metric: str = PRIMARY, variant: str = "augself", lam: float = 1.0,
                    strength: str = "strong", methods: tuple[str, ...] = METHODS) -> dict[str, dict[int, float]]:
    """{method: {seed: Δ}} of ``variant`` (AugSelf at λ = ``lam``) − baseline of the same seed, from ledger rows
    (:func:`pipeline.study.ledger.read_ledger`): the mean over the same test items of the variant's minus the
    baseline's per-item score, in points.  A method without a paired seed is left out."""
    out: dict[str, dict[int, float]] = {}
    if runs.empty:
        return out
    for method in methods:
        sel = runs[(runs["method"] == method) & (runs["strength"] == strength)]
        base = {int(r.seed): r.run_id for r in sel[sel["variant"] == "baseline"].itertuples()}
        other = sel[sel["variant"] == variant]
        if variant == "augself":
            other = other[other["lambda"] == lam]
        var = {int(r.seed): r.run_id for r in other.itertuples()}
        deltas = {}
        for seed in sorted(set(base) & set(var)):
            if metric not in items.get(var[seed], {}) or metric not in items.get(base[seed], {}):
                continue
            a, b = items[var[seed]][metric], items[base[seed]][metric]
            if len(a) != len(b):
                raise ValueError(f"{method} seed {seed}: {len(a)} vs {len(b)} items; not paired")
            deltas[seed] = float(np.mean(a) - np.mean(b))
        if deltas:
            out[method] = deltas
    return out


def read_deltas(ledger: Path, metric: str = PRIMARY, strength: str = "strong", lam: float = 1.0,
                methods: tuple[str, ...] = METHODS, models: set[str] | None = None) -> PerSeed:
    """Paired per-seed Δ (points) of AugSelf λ = ``lam`` − baseline from the ledger's per-item scores, of the
    models named in ``models`` (the first study's: the confirmatory study's new seeds share the ledger and
    must not plan themselves) or of every model in the ledger."""
    from pipeline.study.ledger import read_ledger

    runs, items = read_ledger(ledger, models)
    for col in ("epochs", "lr"):                  # params.yaml's schedule only: the ledger is shared by every study
        if col in runs:
            runs = runs[runs[col].isna()]
    out = per_seed_deltas(runs, items, metric, "augself", lam, strength, methods)
    for method in methods:
        if len(out.get(method, {})) < 2:
            raise ValueError(f"{method}: {len(out.get(method, {}))} paired seed(s) in {ledger}; an SD needs 2")
    return PerSeed({m: out[m] for m in methods})


# -- the primary test: method-blocked paired t -----------------------------------------------------
def blocked_df(n: int, methods: int = 4) -> int:
    return methods * (n - 1)


def blocked_power(delta: float, sd: float, n: int, methods: int = 4, alpha: float = ALPHA,
                  sided: str = "two") -> float:
    """Exact power (noncentral t) of the method-blocked t-test of mean Δ = 0 with n seeds per method,
    a true mean gain ``delta`` and within-method SD ``sd`` (equal across methods)."""
    if n < 2:
        return float("nan")
    df = blocked_df(n, methods)
    ncp = delta / (sd / np.sqrt(methods * n))
    if sided == "two":
        crit = stats.t.ppf(1 - alpha / 2, df)
        return float(stats.nct.sf(crit, df, ncp) + stats.nct.cdf(-crit, df, ncp))
    if sided == "one":
        return float(stats.nct.sf(stats.t.ppf(1 - alpha, df), df, ncp))
    raise ValueError(f"sided: 'one' or 'two', got {sided!r}")


def blocked_test(deltas: np.ndarray, alpha: float = ALPHA, sided: str = "two") -> np.ndarray:
    """The test itself on ``deltas`` of shape (..., methods, n): True where H0 (mean Δ = 0) is rejected."""
    m, n = deltas.shape[-2:]
    resid = deltas - deltas.mean(-1, keepdims=True)
    s2 = (resid ** 2).sum((-2, -1)) / (m * (n - 1))
    t = deltas.mean((-2, -1)) / np.sqrt(s2 / (m * n))
    df = m * (n - 1)
    if sided == "two":
        return np.abs(t) > stats.t.ppf(1 - alpha / 2, df)
    return t > stats.t.ppf(1 - alpha, df)


def blocked_welch_test(deltas: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """The blocked test with each method's own variance: SE² = Σ_m s_m²/n / M², Welch–Satterthwaite df
    (Σ s_m²/n)² / Σ (s_m²/n)²/(n − 1); two-sided.  Holds its size when the methods' SDs differ."""
    m, n = deltas.shape[-2:]
    v = deltas.var(-1, ddof=1) / n                                   # (..., m)
    t = deltas.mean((-2, -1)) / np.sqrt(v.sum(-1) / m ** 2)
    df = v.sum(-1) ** 2 / ((v ** 2) / (n - 1)).sum(-1)
    return np.abs(t) > stats.t.ppf(1 - alpha / 2, df)


def simulate_blocked(delta: float, sds, n: int, reps: int = 20000, seed: int = 0, alpha: float = ALPHA,
                     sided: str = "two", method_effects=None, welch: bool = False) -> float:
    """Monte-Carlo rejection rate of :func:`blocked_test` (or :func:`blocked_welch_test`):
    Δ_ms ~ N(delta + a_m, sds[m]²)."""
    sds = np.asarray(sds, dtype=float)
    a = np.zeros(len(sds)) if method_effects is None else np.asarray(method_effects, dtype=float)
    rng = np.random.default_rng(seed)
    d = delta + a[None, :, None] + sds[None, :, None] * rng.standard_normal((reps, len(sds), n))
    return float((blocked_welch_test(d, alpha) if welch else blocked_test(d, alpha, sided)).mean())


def seeds_for_power(delta: float, sd: float, power: float = 0.8, methods: int = 4, alpha: float = ALPHA,
                    sided: str = "two", n_max: int = 1000) -> int:
    """Smallest n (new seeds per method) whose exact power reaches ``power``."""
    for n in range(2, n_max + 1):
        if blocked_power(delta, sd, n, methods, alpha, sided) >= power:
            return n
    raise ValueError(f"no n ≤ {n_max} reaches power {power}")


# -- the secondary tests: one t over seeds per method ----------------------------------------------
def t_half_width(sd: float, n: int, level: float = 0.95) -> float:
    return float(stats.t.ppf((1 + level) / 2, n - 1) * sd / np.sqrt(n)) if n >= 2 else float("inf")


def half_width_assurance(sd: float, n: int, target: float, level: float = 0.95) -> float:
    """P(the realised t half-width ≤ target) when the true SD is ``sd``: (n−1)s²/σ² ~ χ²_{n−1}."""
    if n < 2:
        return 0.0
    s_max = target * np.sqrt(n) / stats.t.ppf((1 + level) / 2, n - 1)
    return float(stats.chi2.cdf((n - 1) * (s_max / sd) ** 2, n - 1))


def seeds_for_half_width(sd: float, target: float, assurance: float | None = None, level: float = 0.95,
                         n_max: int = 10000) -> int:
    """Smallest n with t_{(1+level)/2, n−1}·sd/√n ≤ target (``assurance`` None), or with that probability
    that the realised half-width is ≤ target."""
    for n in range(2, n_max + 1):
        ok = (t_half_width(sd, n, level) <= target if assurance is None
              else half_width_assurance(sd, n, target, level) >= assurance)
        if ok:
            return n
    raise ValueError(f"no n ≤ {n_max} gives half-width ≤ {target}")


def per_method_t_power(delta: float, sd: float, n: int, alpha: float) -> float:
    """Exact power of one two-sided one-sample t-test over n seeds at level ``alpha``."""
    if n < 2:
        return float("nan")
    df, ncp = n - 1, delta / (sd / np.sqrt(n))
    crit = stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.sf(crit, df, ncp) + stats.nct.cdf(-crit, df, ncp))


def simulate_holm(delta: float, sds, n: int, reps: int = 20000, seed: int = 0, alpha: float = ALPHA) -> dict:
    """Monte-Carlo power of the per-method t-tests with Holm across methods, each true Δ = ``delta``:
    per method, and for at least one method."""
    sds = np.asarray(sds, dtype=float)
    rng = np.random.default_rng(seed)
    d = delta + sds[None, :, None] * rng.standard_normal((reps, len(sds), n))
    t = d.mean(-1) / (d.std(-1, ddof=1) / np.sqrt(n))
    reject = holm_rows(2 * stats.t.sf(np.abs(t), n - 1)) < alpha
    return {"per_method": reject.mean(0).tolist(), "any": float(reject.any(1).mean())}


def holm_rows(p: np.ndarray) -> np.ndarray:
    """Holm's adjusted p of every row of ``p`` (reps, methods), as :func:`pipeline.stats.holm` per row:
    sort, multiply by (m − rank), running max, capped at 1, back to the original order."""
    m = p.shape[1]
    order = np.argsort(p, axis=1, kind="stable")
    ps = np.take_along_axis(p, order, 1) * (m - np.arange(m))[None]
    adj_sorted = np.minimum(1.0, np.maximum.accumulate(ps, axis=1))
    adj = np.empty_like(adj_sorted)
    np.put_along_axis(adj, order, adj_sorted, 1)
    return adj



# -- the whole analysis ------------------------------------------------------------------------------
def analyse(per_seed: PerSeed, delta: float = 1.0, power: float = 0.8, half_width: float = 1.5,
            assurance: float = 0.8, ns=range(3, 13), first_delta: float = 2.0, reps: int = 20000) -> dict:
    methods = list(per_seed.deltas)
    sds = {m: per_seed.sd(m) for m in methods}
    pooled = per_seed.pooled_sd()
    n_first = min(len(d) for d in per_seed.deltas.values())
    df_p = per_seed.pooled_df()
    # 80 % upper confidence limit of the pooled SD (it rests on df_p degrees of freedom)
    sd_upper80 = float(pooled * np.sqrt(df_p / stats.chi2.ppf(0.2, df_p)))
    n_primary = seeds_for_power(delta, pooled, power, len(methods))
    n_primary_one = seeds_for_power(delta, pooled, power, len(methods), sided="one")
    n_primary_upper = seeds_for_power(delta, sd_upper80, power, len(methods))
    n_hw = {m: seeds_for_half_width(sds[m], half_width) for m in methods}
    n_hw_assured = {m: seeds_for_half_width(sds[m], half_width, assurance) for m in methods}
    sd_list = [sds[m] for m in methods]
    table = []
    for n in ns:
        table.append({
            "n": n, "models_core": 2 * len(methods) * n, "df": blocked_df(n, len(methods)),
            "primary_power_two_sided": blocked_power(delta, pooled, n, len(methods)),
            "primary_power_one_sided": blocked_power(delta, pooled, n, len(methods), sided="one"),
            "primary_power_two_sided_sd_upper80": blocked_power(delta, sd_upper80, n, len(methods)),
            # Monte-Carlo under each method's own SD: the pooled test's real size, and the Welch variant
            "pooled_size_per_method_sd": simulate_blocked(0.0, sd_list, n, reps, seed=100 + n),
            "welch_size_per_method_sd": simulate_blocked(0.0, sd_list, n, reps, seed=200 + n, welch=True),
            "welch_power_per_method_sd": simulate_blocked(delta, sd_list, n, reps, seed=300 + n, welch=True),
            "half_width": {m: t_half_width(sds[m], n) for m in methods},
            "half_width_assurance": {m: half_width_assurance(sds[m], n, half_width) for m in methods},
        })
    # The first study: n_first seeds, per method t with Holm across the four, a true +first_delta everywhere.
    bonferroni = {m: per_method_t_power(first_delta, pooled, n_first, ALPHA / len(methods)) for m in methods}
    first = {
        "seeds": n_first, "true_delta": first_delta,
        "holm_power_pooled_sd": simulate_holm(first_delta, [pooled] * len(methods), n_first, reps),
        "holm_power_per_method_sd": dict(zip(["per_method", "any"], simulate_holm(first_delta, [sds[m] for m in methods],
                                                                                  n_first, reps).values())),
        "first_step_bonferroni_power_pooled_sd": bonferroni[methods[0]],
        "unadjusted_power_pooled_sd": per_method_t_power(first_delta, pooled, n_first, ALPHA),
        "blocked_power_pooled_delta_1": blocked_power(1.0, pooled, n_first, len(methods)),
    }
    # The chosen n's primary test, simulated under the per-method SDs (size and power) and the observed
    # per-method means as block effects (they must not matter: the blocks remove them).
    means = np.array([np.mean(list(per_seed.deltas[m].values())) for m in methods])
    check = {
        "n": n_primary, "reps": reps,
        "power_equal_sd": simulate_blocked(delta, [pooled] * len(methods), n_primary, reps, seed=1),
        "power_per_method_sd": simulate_blocked(delta, [sds[m] for m in methods], n_primary, reps, seed=2,
                                                method_effects=means - means.mean()),
        "size_per_method_sd": simulate_blocked(0.0, [sds[m] for m in methods], n_primary, reps, seed=3,
                                               method_effects=means - means.mean()),
    }
    return {
        "metric": PRIMARY, "comparison": "AugSelf λ = 1 − baseline, strong colour, paired per seed",
        "first_study": {"per_seed_delta": {m: {str(s): v for s, v in per_seed.deltas[m].items()} for m in methods},
                        "mean": {m: float(means[i]) for i, m in enumerate(methods)},
                        "sd": sds, "pooled_sd": pooled, "pooled_df": df_p, "pooled_sd_upper80": sd_upper80,
                        "pooled_mean": float(means.mean()),
                        "pooled_blocked_p_two_sided": _blocked_p(per_seed)},
        "primary_test": {"name": "method-blocked paired t-test (methods fixed, per-method means removed), "
                                 "two-sided, alpha 0.05, df = 4(n-1)",
                         "target_delta": delta, "target_power": power,
                         "seeds_per_method": n_primary, "seeds_per_method_one_sided": n_primary_one,
                         "seeds_per_method_at_sd_upper80": n_primary_upper,
                         "power_at_n": blocked_power(delta, pooled, n_primary, len(methods)),
                         "size_at_n_per_method_sd": simulate_blocked(0.0, sd_list, n_primary, reps, seed=100 + n_primary)},
        "per_method_half_width": {"target": half_width, "level": 0.95,
                                  "seeds_at_planning_sd": n_hw, f"seeds_with_{int(assurance * 100)}pct_assurance": n_hw_assured},
        "welch_alternative": {
            "name": "method-blocked t with each method's own variance, Welch-Satterthwaite df, two-sided",
            "seeds_per_method": next((n for n in range(2, 201) if simulate_blocked(
                delta, sd_list, n, reps, seed=300 + n, welch=True) >= power), None),
            "power_by": f"Monte-Carlo, {reps} draws per n, under the first study's per-method SDs"},
        "table": table, "first_study_power": first, "simulation_check": check,
    }


def _blocked_p(per_seed: PerSeed) -> float | None:
    """The blocked test's p on the first study's seeds (post hoc: those seeds generated the hypothesis)."""
    ns = {len(d) for d in per_seed.deltas.values()}
    if len(ns) != 1:
        return None
    d = np.array([list(v.values()) for v in per_seed.deltas.values()])
    m, n = d.shape
    s2 = ((d - d.mean(1, keepdims=True)) ** 2).sum() / (m * (n - 1))
    t = d.mean() / np.sqrt(s2 / (m * n))
    return float(2 * stats.t.sf(abs(t), m * (n - 1)))


def format_report(res: dict) -> str:
    f, p, hw = res["first_study"], res["primary_test"], res["per_method_half_width"]
    methods = list(f["sd"])
    lines = [f"Power of the confirmatory study: {res['comparison']}, `{res['metric']}`", "",
             "First study (ledger): per-seed paired Δ (points)"]
    for m in methods:
        seeds = ", ".join(f"s{s} {v:+.2f}" for s, v in f["per_seed_delta"][m].items())
        lines.append(f"  {m:8s} {seeds}   mean {f['mean'][m]:+.2f}  SD {f['sd'][m]:.2f}")
    lines += [f"  pooled within-method SD {f['pooled_sd']:.2f} ({f['pooled_df']} df; 80 % upper confidence limit "
              f"{f['pooled_sd_upper80']:.2f}); mean over methods {f['pooled_mean']:+.2f}, blocked t p = "
              f"{f['pooled_blocked_p_two_sided']:.4f} (post hoc: these seeds generated the hypothesis)", "",
              f"Primary test: {p['name']}.",
              f"  {p['target_power']:.0%} power for a pooled Δ of {p['target_delta']:g} point: n = {p['seeds_per_method']} "
              f"new seeds per method (power {p['power_at_n']:.3f}); one-sided: n = {p['seeds_per_method_one_sided']}; "
              f"if the SD is at its 80 % upper limit: n = {p['seeds_per_method_at_sd_upper80']}.",
              f"Per method, 95 % t half-width ≤ {hw['target']:g} points (n solved exactly, t quantile at n − 1 df):"]
    key = [k for k in hw if k.startswith("seeds_with_")][0]
    for m in methods:
        lines.append(f"  {m:8s} SD {f['sd'][m]:.2f}: n = {hw['seeds_at_planning_sd'][m]} at the planning SD, "
                     f"n = {hw[key][m]} for {key.split('_')[2]} assurance")
    lines += ["", "n new seeds per method | core models | df | primary power (two-sided / one-sided / SD at upper "
              "80 %) | t half-width per method (" + ", ".join(methods) + ") | P(half-width ≤ "
              f"{hw['target']:g})", ""]
    lines.append("| n | models | df | power 2-sided | power 1-sided | power, SD upper 80 % | "
                 + " | ".join(f"half-width {m}" for m in methods) + " | "
                 + " | ".join(f"P(hw ≤ {hw['target']:g}) {m}" for m in methods) + " |")
    lines.append("|---:|---:|---:|---:|---:|---:|" + "---:|" * (2 * len(methods)))
    for r in res["table"]:
        lines.append(f"| {r['n']} | {r['models_core']} | {r['df']} | {r['primary_power_two_sided']:.3f} | "
                     f"{r['primary_power_one_sided']:.3f} | {r['primary_power_two_sided_sd_upper80']:.3f} | "
                     + " | ".join(f"{r['half_width'][m]:.2f}" for m in methods) + " | "
                     + " | ".join(f"{r['half_width_assurance'][m]:.2f}" for m in methods) + " |")
    w = res["welch_alternative"]
    lines += ["", f"Under each method's own SD (Monte-Carlo, {res['simulation_check']['reps']} draws per n): the pooled "
              "test's real size, and the Welch–Satterthwaite blocked test's size and power:", "",
              "| n | pooled: size | Welch: size | Welch: power |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['n']} | {r['pooled_size_per_method_sd']:.3f} | {r['welch_size_per_method_sd']:.3f} | "
              f"{r['welch_power_per_method_sd']:.3f} |" for r in res["table"]]
    lines += ["", f"{w['name']}: n = {w['seeds_per_method']} new seeds per method for "
              f"{res['primary_test']['target_power']:.0%} power ({w['power_by']}).",
              f"Recommendation: the Welch–Satterthwaite blocked test with n = {w['seeds_per_method']} (it holds "
              f"its 5 % size under these SDs); the pooled test's exact n = {p['seeds_per_method']} runs at a real "
              f"size of {p['size_at_n_per_method_sd']:.3f}."]
    fs, c = res["first_study_power"], res["simulation_check"]
    lines += ["", f"The first study ({fs['seeds']} seeds, per-method t with Holm over {len(methods)}), a true "
              f"+{fs['true_delta']:g} in every method (Monte-Carlo, {c['reps']} draws):",
              f"  at the pooled SD: per method {fs['holm_power_pooled_sd']['per_method'][0]:.3f} "
              f"(any method {fs['holm_power_pooled_sd']['any']:.3f}); first Holm step (α/4) exact "
              f"{fs['first_step_bonferroni_power_pooled_sd']:.3f}, unadjusted exact {fs['unadjusted_power_pooled_sd']:.3f}",
              "  at each method's own SD: " + ", ".join(f"{m} {v:.3f}" for m, v in
                                                        zip(methods, fs['holm_power_per_method_sd']['per_method']))
              + f" (any {fs['holm_power_per_method_sd']['any']:.3f})",
              f"  the blocked pooled test at {fs['seeds']} seeds for a true pooled Δ of 1: "
              f"{fs['blocked_power_pooled_delta_1']:.3f}", "",
              f"Check of the chosen n = {c['n']} by simulation of the blocked test: power {c['power_equal_sd']:.3f} "
              f"(equal SDs), {c['power_per_method_sd']:.3f} under the per-method SDs and means; size under the "
              f"per-method SDs {c['size_per_method_sd']:.3f} (nominal 0.05)."]
    return "\n".join(lines)


def main(ledger: Path, out: Path, models: set[str] | None = None, **kw) -> dict:
    res = analyse(read_deltas(ledger, models=models), **kw)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(format_report(res))
    print(f"\n[power] written {out}")
    return res
