"""The confirmatory study's power script (pipeline/study/power.py) against simulation and closed forms."""

import json

import numpy as np
import pytest
from scipy import stats

from pipeline.study import power as pw
from pipeline.study.plan import ModelKey


@pytest.mark.parametrize("n, delta, sided", [(3, 1.0, "two"), (5, 1.0, "two"), (4, 1.5, "one"), (4, 0.0, "two")])
def test_noncentral_t_power_matches_a_seeded_monte_carlo_of_the_blocked_test(n, delta, sided):
    """The exact power (noncentral t) equals the rejection rate of the test itself run on simulated
    data (4 methods with different block means, equal SDs), within 4 Monte-Carlo standard errors; at
    Δ = 0 it is the size α."""
    sd, reps = 1.63, 40000
    exact = pw.blocked_power(delta, sd, n, sided=sided)
    sim = pw.simulate_blocked(delta, [sd] * 4, n, reps=reps, seed=11, sided=sided, method_effects=[-1, 0, 0.5, 0.5])
    se = np.sqrt(exact * (1 - exact) / reps)
    assert abs(sim - exact) < 4 * se, (sim, exact)
    if delta == 0:
        assert exact == pytest.approx(0.05, abs=1e-12)


def test_power_is_not_the_normal_approximation_and_n_is_the_smallest_that_reaches_it():
    sd = 1.63
    n = pw.seeds_for_power(1.0, sd, 0.8)
    assert pw.blocked_power(1.0, sd, n) >= 0.8 > pw.blocked_power(1.0, sd, n - 1)
    # the normal approximation (z instead of t, no noncentral t) is optimistic at these df
    z = stats.norm.sf(1.959964 - 1.0 / (sd / np.sqrt(4 * 3)))
    assert pw.blocked_power(1.0, sd, 3) < z - 0.02


def test_half_width_n_is_solved_exactly_with_the_t_quantile_of_its_own_df():
    for sd in (2.88, 0.99, 0.52, 1.03):
        n = pw.seeds_for_half_width(sd, 1.5)
        hw = lambda k: stats.t.ppf(0.975, k - 1) * sd / np.sqrt(k)
        assert hw(n) <= 1.5 and (n == 2 or hw(n - 1) > 1.5)
    assert pw.seeds_for_half_width(2.88, 1.5) > (1.959964 * 2.88 / 1.5) ** 2      # t, not z
    # assurance: the chi-square probability, checked by simulating s over seeds
    rng = np.random.default_rng(4)
    sd, n = 1.03, 5
    s = rng.normal(0, sd, (40000, n)).std(1, ddof=1)
    sim = np.mean(stats.t.ppf(0.975, n - 1) * s / np.sqrt(n) <= 1.5)
    assert sim == pytest.approx(pw.half_width_assurance(sd, n, 1.5), abs=0.01)
    assert pw.seeds_for_half_width(sd, 1.5, 0.8) >= pw.seeds_for_half_width(sd, 1.5)


def test_the_vectorised_holm_of_the_simulation_is_pipeline_stats_holm_row_by_row():
    from pipeline.stats import holm

    rng = np.random.default_rng(6)
    p = rng.random((500, 4)) ** 3
    p[:50, 1] = p[:50, 2]                                    # ties
    np.testing.assert_allclose(pw.holm_rows(p), [holm(list(row)) for row in p], rtol=0, atol=1e-15)
    # under H0 everywhere Holm holds the family-wise error at α
    res = pw.simulate_holm(0.0, [1.0, 2.0, 0.5, 1.0], 4, reps=20000, seed=5)
    assert res["any"] < 0.05 + 4 * np.sqrt(0.05 * 0.95 / 20000)


def _write(ledger, key, arr):
    ledger.mkdir(parents=True, exist_ok=True)
    rec = {"key": {"method": key.method, "variant": key.variant, "lambda": key.lam, "strength": key.strength,
                   "seed": key.seed}, "run_id": key.name, "group": "g", "commit": "c",
           "metrics": {pw.PRIMARY: float(arr.mean())}}
    (ledger / f"{key.name}.json").write_text(json.dumps(rec))
    np.savez_compressed(ledger / f"{key.name}.npz", **{pw.PRIMARY: arr})


def test_the_script_reads_the_paired_delta_of_each_method_and_seed_from_the_ledger(tmp_path):
    rng = np.random.default_rng(0)
    want = {}
    for method in pw.METHODS:
        for seed in (0, 1, 2):
            base = (rng.random(300) < 0.6).astype(np.float32) * 100
            aug = (rng.random(300) < 0.62).astype(np.float32) * 100
            _write(tmp_path, ModelKey(method, "baseline", 0.0, "strong", seed), base)
            _write(tmp_path, ModelKey(method, "augself", 1.0, "strong", seed), aug)
            _write(tmp_path, ModelKey(method, "augself", 0.5, "strong", seed), base)     # another λ: not read
            want.setdefault(method, []).append(float(aug.mean() - base.mean()))
        # a pair of another study's schedule (the shared ledger, issue 24's 20-epoch arm): not read
        for variant, lam in (("baseline", 0.0), ("augself", 1.0)):
            key = ModelKey(method, variant, lam, "strong", 3, 20)
            _write(tmp_path, key, (rng.random(300) < 0.9).astype(np.float32) * 100)
            rec = json.loads((tmp_path / f"{key.name}.json").read_text())
            rec["key"]["epochs"] = 20
            (tmp_path / f"{key.name}.json").write_text(json.dumps(rec))
    # a pair of a later study on new seeds at the same schedule (the confirmatory study): read only when asked
    first_study = {f.stem for f in tmp_path.glob("*.json")}
    for variant, lam in (("baseline", 0.0), ("augself", 1.0)):
        _write(tmp_path, ModelKey("simclr", variant, lam, "strong", 5), (rng.random(300) < 0.5).astype(np.float32) * 100)
    assert 5 in pw.read_deltas(tmp_path).deltas["simclr"]
    per = pw.read_deltas(tmp_path, models=first_study)
    for m in pw.METHODS:
        assert list(per.deltas[m].values()) == pytest.approx(want[m], abs=1e-4)
        assert per.sd(m) == pytest.approx(np.std(want[m], ddof=1), abs=1e-4)
    assert per.pooled_sd() == pytest.approx(np.sqrt(np.mean([np.var(want[m], ddof=1) for m in pw.METHODS])), abs=1e-4)
    res = pw.main(tmp_path, tmp_path / "out" / "power.json", first_study, reps=2000)
    assert json.loads((tmp_path / "out" / "power.json").read_text())["primary_test"]["seeds_per_method"] == \
        res["primary_test"]["seeds_per_method"] == pw.seeds_for_power(1.0, per.pooled_sd(), 0.8)
    assert [r["n"] for r in res["table"]] == list(range(3, 13))


def test_with_unequal_method_sds_the_pooled_test_is_liberal_and_the_welch_test_holds_its_size():
    """Why the script reports the Welch variant: under the first study's SDs (2.88 / 0.99 / 0.52 / 1.03)
    the pooled-variance blocked test rejects a true 0 more often than 5 %, the Welch-Satterthwaite one
    does not (seeded Monte-Carlo, 4 standard errors)."""
    sds, reps = [2.88, 0.99, 0.52, 1.03], 40000
    se = 4 * np.sqrt(0.05 * 0.95 / reps)
    assert pw.simulate_blocked(0.0, sds, 4, reps, seed=21) > 0.05 + se
    assert abs(pw.simulate_blocked(0.0, sds, 4, reps, seed=22, welch=True) - 0.05) < se
    # with equal SDs the two agree on power to within a few points (Welch pays for its estimated df)
    eq = [1.63] * 4
    assert pw.simulate_blocked(1.0, eq, 6, reps, seed=23, welch=True) == pytest.approx(pw.blocked_power(1.0, 1.63, 6), abs=0.04)
