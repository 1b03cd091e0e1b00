"""Paired statistics (pipeline.stats) against closed forms and brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.stats import across_seeds, paired_bootstrap, t_interval


def test_paired_bootstrap_estimate_is_the_mean_difference_and_width_the_standard_error():
    rng = np.random.default_rng(0)
    base = (rng.random(2000) < 0.7).astype(float)
    variant = np.where(rng.random(2000) < 0.1, 1 - base, base)      # flips 10 % of the items
    d = variant - base
    res = paired_bootstrap(variant, base, samples=4000)
    assert res.estimate == pytest.approx(d.mean(), abs=1e-15)
    # The bootstrap distribution of a mean is ≈ normal with sd = population sd / √n.
    se = d.std() / np.sqrt(len(d))
    assert (res.high - res.low) / (2 * 1.959964) == pytest.approx(se, rel=0.08)
    # Pairing: the unpaired standard error is much larger when the two models agree on most items.
    unpaired = np.sqrt(variant.var() / len(d) + base.var() / len(d))
    assert se < 0.5 * unpaired
    assert paired_bootstrap(variant, base, samples=4000) == res           # fixed bootstrap seed


def test_paired_bootstrap_matches_the_exact_bootstrap_distribution_by_enumeration():
    variant = np.array([1.0, 0.0, 1.0, 1.0])
    base = np.array([0.0, 0.0, 1.0, 0.0])
    d = variant - base
    exact = np.array([d[list(i)].mean() for i in itertools.product(range(4), repeat=4)])   # all 256 resamples
    res = paired_bootstrap(variant, base, samples=200000)
    lo, hi = np.quantile(exact, [0.025, 0.975])
    assert res.low == pytest.approx(lo, abs=1e-12) and res.high == pytest.approx(hi, abs=1e-12)


def test_class_average_groups():
    variant = np.array([1, 1, 0, 1, 1, 1], float)
    base = np.array([1, 0, 0, 1, 1, 0], float)
    groups = np.array([0, 0, 0, 1, 1, 1])
    res = paired_bootstrap(variant, base, groups=groups, samples=200)
    assert res.estimate == pytest.approx((2 / 3 + 1) / 2 - (1 / 3 + 2 / 3) / 2)


def test_t_interval_closed_form_and_single_seed():
    res = t_interval([1.0, 2.0, 4.0])
    half = 4.302652729911275 * np.std([1, 2, 4], ddof=1) / np.sqrt(3)      # t_{0.975, 2}
    assert res.estimate == pytest.approx(7 / 3) and res.low == pytest.approx(7 / 3 - half)
    assert res.high == pytest.approx(7 / 3 + half) and not res.excludes_zero
    assert t_interval([1.0]) is None


def test_hierarchical_bootstrap_carries_seed_variance():
    rng = np.random.default_rng(1)
    # Three seeds whose true Δ differ a lot (seed variance), little item noise within each.
    pairs = []
    for shift in (0.0, 0.1, 0.2):
        base = rng.normal(size=4000)
        pairs.append((base + shift + 0.01 * rng.normal(size=4000), base))
    out = across_seeds(pairs, samples=1000)
    per_seed_width = np.mean([p.high - p.low for p in out["per_seed"]])
    hier = out["hierarchical"]
    assert hier.estimate == pytest.approx(np.mean([p.estimate for p in out["per_seed"]]))
    assert hier.high - hier.low > 20 * per_seed_width                  # seeds dominate
    # Resampling 3 seeds: the extremes of the bootstrap are the extreme seeds' Δ.
    assert hier.low >= -0.001 and hier.high <= 0.201
    assert out["t"].estimate == pytest.approx(hier.estimate)
    single = across_seeds(pairs[:1], samples=1000)
    assert single["hierarchical"] is None and single["t"] is None


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="same"):
        paired_bootstrap([1.0, 0.0], [1.0])
    with pytest.raises(ValueError, match="no seed"):
        across_seeds([])


def test_t_test_p_matches_the_t_interval_and_holm_steps_down():
    from pipeline.stats import holm, t_interval, t_test_p

    d = [1.2, 0.4, 0.9]
    ci = t_interval(d)
    # the 95 % t-interval excludes 0 exactly when p < 0.05; shifting Δ so its lower end sits at 0 gives p = 0.05
    assert (ci.low > 0) == (t_test_p(d) < 0.05)
    assert t_test_p([x - ci.low for x in d]) == pytest.approx(0.05, abs=1e-9)
    assert t_test_p([1.0]) is None and t_test_p([2.0, 2.0]) == 0.0
    # Holm: sorted p times (m − rank), made monotone; a missing p is no test and stays None
    adj = holm([0.01, 0.04, None, 0.03])
    assert adj[2] is None
    assert adj[0] == pytest.approx(0.03) and adj[3] == pytest.approx(0.06) and adj[1] == pytest.approx(0.06)
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
