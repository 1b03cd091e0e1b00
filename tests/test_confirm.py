"""The confirmatory study's pre-registered analysis (pipeline/study/confirm.py, docs/study.md "Pre-registration")."""

import json
import re
import subprocess

import numpy as np
import pytest
from scipy import stats

from pipeline.study import confirm, provenance
from pipeline.study.figures import PRIMARY
from pipeline.study.plan import ModelKey, load_study
from pipeline.study.power import blocked_welch_test
from pipeline.study.report import build

HUE = "linear/cfmnist/hue/top1"
GARMENT = "linear/cfmnist/class/top1"
METHODS = ["simclr", "simsiam", "moco", "byol"]


def test_one_method_is_the_one_sample_t_test():
    d = {"simclr": {3: 1.2, 4: -0.4, 5: 2.5, 6: 0.9}}
    r = confirm.welch_blocked(d)
    ref = stats.ttest_1samp(list(d["simclr"].values()), 0.0)
    assert (r.estimate, r.df, r.p) == pytest.approx((np.mean(list(d["simclr"].values())), 3, ref.pvalue))
    lo, hi = stats.t.interval(0.95, 3, loc=r.estimate, scale=stats.sem(list(d["simclr"].values())))
    assert (r.low, r.high) == pytest.approx((lo, hi))


def test_equal_seeds_give_the_test_the_power_analysis_sized():
    """With n seeds in every method the primary test rejects exactly where power.blocked_welch_test does
    (the test whose n the pre-registration took from the power script)."""
    rng = np.random.default_rng(0)
    draws = 0.6 + np.array([2.9, 1.0, 0.5, 1.0])[None, :, None] * rng.standard_normal((400, 4, 7))
    want = blocked_welch_test(draws)
    got = [confirm.welch_blocked({m: dict(enumerate(x[i])) for i, m in enumerate(METHODS)}).p < 0.05 for x in draws]
    assert 0 < want.sum() < len(want)                  # both outcomes occur, so the comparison means something
    assert np.array_equal(np.array(got), want)


def test_unequal_seeds_weigh_each_method_equally_with_its_own_variance():
    d = {"a": {0: 1.0, 1: 3.0}, "b": {0: 0.0, 1: 1.0, 2: 2.0, 3: 1.0}}
    r = confirm.welch_blocked(d)
    va, vb = np.var([1, 3], ddof=1) / 2, np.var([0, 1, 2, 1], ddof=1) / 4
    assert r.estimate == pytest.approx((2.0 + 1.0) / 2)
    assert r.se == pytest.approx(np.sqrt(va + vb) / 2)
    assert r.df == pytest.approx((va + vb) ** 2 / (va ** 2 / 1 + vb ** 2 / 3))
    assert confirm.welch_blocked({"a": {0: 1.0}, "b": d["b"]}) is None


@pytest.mark.parametrize("est, lo, hi, p, complete, want", [
    (1.5, 0.4, 2.6, 0.01, True, "higher"),
    (-1.5, -2.6, -0.4, 0.01, True, "lower"),
    (0.2, -0.5, 0.9, 0.5, True, "no gain of 1 point"),
    (0.5, -0.3, 1.3, 0.2, True, "inconclusive"),
    (1.5, 0.4, 2.6, 0.001, False, "interim: no decision"),
])
def test_the_outcome_is_read_as_pre_registered_and_not_before_the_study_is_complete(est, lo, hi, p, complete, want):
    r = confirm.Pooled(est, 0.5, 20.0, est / 0.5, p, lo, hi, {})
    assert confirm.outcome(r, complete).startswith(want)


def _record(ledger, key, items):
    ledger.mkdir(parents=True, exist_ok=True)
    rec = {"key": {"method": key.method, "variant": key.variant, "lambda": key.lam, "strength": key.strength,
                   "seed": key.seed}, "run_id": key.name, "group": "g", "commit": "c",
           "metrics": {m: float(v.mean()) for m, v in items.items()}}
    (ledger / f"{key.name}.json").write_text(json.dumps(rec))
    np.savez_compressed(ledger / f"{key.name}.npz", **items)


def _studies(tmp_path):
    first = tmp_path / "study.yaml"
    first.write_text("name: first\nseeds: [0, 1, 2]\nblocks:\n"
                     "  - {name: core, methods: [simclr, simsiam, moco, byol], variants: [baseline, augself], "
                     "lambda: [1.0], color_strength: [strong]}\n")
    conf = tmp_path / "study-confirm.yaml"
    conf.write_text(f"name: confirm\nseeds: [3, 4, 5]\nreport: confirmatory\ncompare_with: {first}\n"
                    "preregistration: \"ae6222c9\"\n"
                    f"report_dir: {tmp_path / 'out'}\nblocks:\n"
                    "  - {name: core, methods: [simclr, simsiam, moco, byol], variants: [baseline, augself], "
                    "lambda: [1.0], color_strength: [strong]}\n"
                    "  - {name: cassle, methods: [simclr], variants: [baseline, cassle], lambda: [1.0], "
                    "color_strength: [strong]}\n")
    return load_study(first), load_study(conf)


def test_the_confirmatory_report_tests_only_its_own_seeds_and_shows_both_studies(tmp_path):
    """The first study's seeds (a +3 gain here) never enter the primary test; the confirmatory seeds (no gain)
    decide it, and only once all are in; both studies' rows are in the side-by-side table and figure."""
    first, conf = _studies(tmp_path)
    ledger = tmp_path / "runs"
    rng = np.random.default_rng(1)
    base = {m: {s: (rng.random(2000) < 0.6).astype(np.float32) * 100 for s in range(6)} for m in METHODS}
    for m in METHODS:
        for s in range(6):
            aug = base[m][s].copy()              # first study: 50-80 wrong answers made right (+2.5 to +4 points);
            up, down = (rng.integers(50, 80), 0) if s < 3 else rng.integers(0, 20, 2)  # later: ±20, no gain
            aug[rng.choice(np.flatnonzero(aug == 0), up, replace=False)] = 100.0
            aug[rng.choice(np.flatnonzero(base[m][s] == 100), down, replace=False)] = 0.0
            _record(ledger, ModelKey(m, "baseline", 0.0, "strong", s), {HUE: base[m][s], GARMENT: base[m][s]})
            if (m, s) != ("byol", 5):
                _record(ledger, ModelKey(m, "augself", 1.0, "strong", s), {HUE: aug, GARMENT: base[m][s]})
    build(conf, tmp_path / "out", ledger)
    text = (tmp_path / "out" / "README.md").read_text()
    assert "interim: no decision" in text                      # BYOL seed 5 is missing
    # ... and no secondary row decides either (the first interim page called 2-seed rows "not distinguishable")
    decision_cell = re.compile(r"\| (\*\*)?(higher|lower|not distinguishable)(\*\*)? \|")
    assert not decision_cell.search(text) and "| none (interim) |" in text
    assert "no decision (interim) in 4" in text
    assert f"`python -m stages.study run --study {conf.source}` trains the rest" in text
    assert (tmp_path / "out" / "forest-both.png").exists()
    _record(ledger, ModelKey("byol", "augself", 1.0, "strong", 5), {HUE: base["byol"][5], GARMENT: base["byol"][5]})
    build(conf, tmp_path / "out", ledger)
    assert "interim: no decision" in (tmp_path / "out" / "README.md").read_text()    # the CASSLE pairs are planned too
    for s in range(3, 6):
        _record(ledger, ModelKey("simclr", "cassle", 0.0, "strong", s), {HUE: base["simclr"][s], GARMENT: base["simclr"][s]})
    build(conf, tmp_path / "out", ledger)
    text = (tmp_path / "out" / "README.md").read_text()
    new = confirm.study_deltas(conf, HUE, ledger=ledger)
    assert {m: sorted(d) for m, d in new.items()} == {m: [3, 4, 5] for m in METHODS}
    old = confirm.study_deltas(first, HUE, ledger=ledger)
    assert {m: sorted(d) for m, d in old.items()} == {m: [0, 1, 2] for m in METHODS}
    assert min(min(d.values()) for d in old.values()) > 2.0
    res = confirm.welch_blocked(new)
    assert res.estimate < 0.5 and res.p > 0.05
    row = next(line for line in text.splitlines() if line.startswith(f"| {res.estimate:+.2f} |"))
    assert confirm.outcome(res, True) in row and "interim" not in row
    assert decision_cell.search(text) and "none (interim)" not in text
    assert "| hue, 24-way linear (primary) | pooled |" in text
    sub = confirm.welch_blocked({m: new[m] for m in confirm.PREMISE_HOLDS})
    assert f"Δ {sub.estimate:+.2f} [{sub.low:+.2f}, {sub.high:+.2f}], p {sub.p:.4f}." in text
    assert text.index("pre-registered primary test") < text.index("## The secondary tests (pre-registered)")
    assert "## The primary test (docs/study.md)" not in text
    # The primary test's data, per seed, on the page: every method's Δ of seed 4, and their means.
    seed_row = next(line for line in text.splitlines() if line.startswith("| 4 | "))
    assert seed_row == "| 4 | " + " | ".join(f"{new[m][4]:+.2f}" for m in METHODS) + " |"
    mean_row = next(line for line in text.splitlines() if line.startswith("| mean | "))
    assert mean_row == "| mean | " + " | ".join(f"{np.mean(list(new[m].values())):+.2f}" for m in METHODS) + " |"


def test_a_confirmatory_study_names_the_study_it_confirms(tmp_path):
    from pipeline.config import ConfigError

    p = tmp_path / "s.yaml"
    p.write_text("name: c\nseeds: [3]\nreport: confirmatory\nblocks:\n"
                 "  - {name: core, methods: [simclr], variants: [baseline], lambda: [1.0], color_strength: [strong]}\n")
    with pytest.raises(ConfigError, match="compare_with"):
        load_study(p)
    p.write_text(p.read_text().replace("report: confirmatory\n", "report: confirmatory\ncompare_with: nope.yaml\n"))
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_study(p)


def test_a_filled_marker_is_the_design_tests_rejection_not_an_interval_that_misses_zero():
    """Per method the decision is Holm across the four: three methods whose own intervals miss 0 but whose
    Holm p does not pass stay hollow; the pooled row is filled only as the confirmatory primary test (the first
    study's pooled test was chosen after its data); SimCLR's CASSLE by its uncorrected t."""
    clear = {s: 3.0 + 0.1 * s for s in range(7)}                        # p ≈ 1e-9: rejected after Holm too
    borderline = dict(enumerate([1.0, 2.0, 0.3, 1.6, 0.4]))             # unadjusted p ≈ 0.033 each
    assert stats.ttest_1samp(list(borderline.values()), 0).pvalue < 0.05
    study = {(PRIMARY, "augself"): {"simclr": clear, "simsiam": borderline, "moco": dict(borderline),
                                    "byol": dict(borderline)},
             (PRIMARY, "cassle"): {"simclr": dict(borderline)}}
    assert all(confirm.t_row(d)[1] > 0 for d in study[(PRIMARY, "augself")].values())   # every interval misses 0
    rows = confirm.rejected_rows(study, PRIMARY, pooled_is_test=True)
    assert rows == {("augself", "simclr"), ("augself", "pooled"), ("cassle", "simclr")}
    assert ("augself", "pooled") not in confirm.rejected_rows(study, PRIMARY, pooled_is_test=False)


def _commit(repo, message, files):
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(git + ["add", "-A"], cwd=repo, check=True)
    subprocess.run(git + ["commit", "-qm", message], cwd=repo, check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, check=True, capture_output=True,
                          text=True).stdout.strip()


def test_provenance_passes_only_models_trained_after_the_preregistration_by_its_code(tmp_path):
    """From git history alone: a model trained from a descendant of the pre-registration commit with the same
    training code passes; one from a commit before it (or beside it), one after it whose training code changed,
    and one whose commit this clone lacks are each named, never passed."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    old = _commit(tmp_path, "code", {"pipeline/train.py": "v1\n", "pipeline/params.py": "p1\n"})
    prereg = _commit(tmp_path, "pre-register", {"docs/study.md": "design\n"})
    ledger = _commit(tmp_path, "ledger and report code", {"reports/x.json": "{}\n", "pipeline/study/x.py": "r\n"})
    retrained = _commit(tmp_path, "edit training code", {"pipeline/train.py": "v2\n"})
    subprocess.run(["git", "checkout", "-qb", "side", old], cwd=tmp_path, check=True)
    beside = _commit(tmp_path, "a branch that never saw the design", {"notes.txt": "x\n"})
    p = provenance.check(prereg, {"a": ledger, "b": ledger, "c": retrained, "d": old, "e": beside,
                                  "f": "0123abcd" * 5, "g": ""}, tmp_path)
    assert p.date and (p.after, p.code_changed, p.before, p.unchecked) == (["a", "b"], ["c"], ["d", "e"], ["f", "g"])
    assert not p.holds
    assert provenance.check(prereg, {"a": ledger, "b": ledger}, tmp_path).holds
    text = provenance.summary(p)
    assert "**2** were trained" in text and "`c`" in text and "`d`, `e`" in text and "`f`, `g`" in text
    missing = provenance.check("feedf00d" * 5, {"a": ledger}, tmp_path)
    assert missing.date is None and not missing.holds and "cannot be checked" in provenance.summary(missing)


def test_provenance_catches_a_params_colour_edit_after_the_preregistration(tmp_path):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    _commit(tmp_path, "code", {"pipeline/train.py": "v1\n", "pipeline/params.py": "p1\n"})
    prereg = _commit(tmp_path, "pre-register", {"docs/study.md": "design\n"})
    colour = _commit(tmp_path, "params colour arithmetic", {"pipeline/params.py": "p2\n"})
    assert provenance.check(prereg, {"m": colour}, tmp_path).code_changed == ["m"]


def test_a_confirmatory_study_names_its_preregistration_commit(tmp_path):
    from pipeline.config import ConfigError

    first = tmp_path / "study.yaml"
    first.write_text("name: f\nseeds: [0]\nblocks:\n"
                     "  - {name: core, methods: [simclr], variants: [baseline], lambda: [1.0], color_strength: [strong]}\n")
    p = tmp_path / "s.yaml"
    body = "blocks:\n  - {name: core, methods: [simclr], variants: [baseline], lambda: [1.0], color_strength: [strong]}\n"
    p.write_text(f"name: c\nseeds: [3]\nreport: confirmatory\ncompare_with: {first}\n" + body)
    with pytest.raises(ConfigError, match="preregistration"):
        load_study(p)
    p.write_text(f"name: c\nseeds: [3]\nreport: confirmatory\ncompare_with: {first}\npreregistration: 1234567\n" + body)
    with pytest.raises(ConfigError, match="quoted string"):
        load_study(p)
    p.write_text(f"name: c\nseeds: [3]\npreregistration: \"ae6222c9\"\n" + body)
    with pytest.raises(ConfigError, match="only with it"):
        load_study(p)
    p.write_text(f"name: c\nseeds: [3]\nreport: confirmatory\ncompare_with: {first}\npreregistration: \"ae6222c9\"\n"
                 + body)
    assert load_study(p).preregistration == "ae6222c9"


def test_the_spread_table_sets_the_design_assumption_beside_the_measured_spread():
    """Planned: the first study's SD and the half-width it promised at the planned n; measured: this study's. Once
    every seed is in, the measured pooled half-width is the primary test's own interval."""
    rng = np.random.default_rng(3)
    planning = {m: dict(enumerate(rng.normal(1.0, sd, 3))) for m, sd in zip(METHODS, (3.0, 1.0, 0.5, 1.0))}
    measured = {m: dict(enumerate(rng.normal(1.0, sd, 7), start=3)) for m, sd in zip(METHODS, (3.0, 2.0, 1.5, 1.5))}
    lines = confirm.spread_table(planning, measured, 7)
    rows = {line.split(" | ")[0].lstrip("| "): line.strip("|").split("|") for line in lines if line.startswith("| ")}
    for m in METHODS:
        sd_plan, sd_meas = np.std(list(planning[m].values()), ddof=1), np.std(list(measured[m].values()), ddof=1)
        cells = [c.strip() for c in rows[m]]
        assert cells[1:5] == [f"{sd_plan:.2f}", f"{sd_meas:.2f}", f"{stats.t.ppf(0.975, 6) * sd_plan / np.sqrt(7):.2f}",
                              f"{stats.t.ppf(0.975, 6) * sd_meas / np.sqrt(7):.2f}"]
    res = confirm.welch_blocked(measured)
    assert [c.strip() for c in rows["pooled (4 methods)"]][4] == f"{res.high - res.estimate:.2f}"
    assert confirm.spread_table(planning, {m: {3: 1.0} for m in METHODS}, 7) == []     # one seed: no spread yet
