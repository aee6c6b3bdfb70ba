"""Paired per-patient comparisons: the hierarchical bootstrap's estimate and its coverage."""

from __future__ import annotations

import numpy as np
import pytest

from fedoap.stats import hierarchical_bootstrap, pair, seed_t_interval

SITES = (7, 20, 6, 15)  # test patients per site, as in the LGG scarcity study


def simulate(rng, effect, seeds=5, seed_sd=0.04, patient_sd=0.12, noise_sd=0.08, crossed=True):
    """A study's paired differences: ``effect`` + a seed effect per (seed, site) + a patient
    effect (the same patient at every seed when ``crossed``, new patients per seed otherwise) +
    noise."""
    out = []
    for k, n in enumerate(SITES):
        patients = rng.normal(0, patient_sd, n)
        for s in range(seeds):
            own = patients if crossed else rng.normal(0, patient_sd, n)
            d = effect + rng.normal(0, seed_sd) + own + rng.normal(0, noise_sd, n)
            for i in range(n):
                case = f"p{i}" if crossed else f"s{s}p{i}"
                out.append((s, f"site{k}", case, float(d[i])))
    return out


def coverage(effect=0.02, runs=200, **kw):
    rng = np.random.default_rng(7)
    hits = site_hits = 0
    for i in range(runs):
        per_site, mean = hierarchical_bootstrap(simulate(rng, effect, **kw), n_boot=600, seed=i)
        hits += mean.low <= effect <= mean.high
        site_hits += sum(v.low <= effect <= v.high for v in per_site.values())
    return hits / runs, site_hits / (runs * len(SITES))


@pytest.mark.parametrize(
    "setting",
    [
        {},  # seeds and patients both matter (the scarcity study's spread)
        {"patient_sd": 0.0, "noise_sd": 0.0},  # the seeds alone: a plain bootstrap gives ~0.81
        {"crossed": False},  # the split follows the seed: patients nested in seeds
        {"seeds": 3},
    ],
    ids=["mixed", "seeds-only", "nested", "three-seeds"],
)
def test_the_interval_covers_a_known_effect_95_percent_of_the_time(setting):
    mean_cov, site_cov = coverage(**setting)
    # 200 simulated studies: a binomial standard error of 1.5 points about 0.95.
    assert 0.91 <= mean_cov <= 0.99, mean_cov
    assert 0.90 <= site_cov <= 0.99, site_cov


def test_the_estimate_is_the_mean_over_sites_of_their_patient_and_seed_means():
    diffs = [
        (0, "a", "x", 0.1),
        (0, "a", "y", 0.3),
        (1, "a", "x", 0.0),
        (1, "a", "y", 0.2),
        (0, "b", "z", -0.4),
        (1, "b", "z", 0.0),
    ]
    per_site, mean = hierarchical_bootstrap(diffs, n_boot=200)
    assert per_site["a"].mean == pytest.approx(0.15)
    assert per_site["b"].mean == pytest.approx(-0.2)
    assert mean.mean == pytest.approx((0.15 - 0.2) / 2)
    assert (mean.seeds, mean.patients, per_site["a"].patients) == (2, 3, 2)
    assert per_site["a"].low <= 0.15 <= per_site["a"].high


def test_a_large_effect_is_resolved_and_none_is_not():
    rng = np.random.default_rng(0)
    _, big = hierarchical_bootstrap(simulate(rng, 0.06), seed=1)
    _, none = hierarchical_bootstrap(simulate(rng, 0.0, seed_sd=0.0), seed=1)
    assert big.excludes_zero() and big.low > 0
    assert not none.excludes_zero()


def test_pairs_only_what_both_methods_scored_and_sites_must_share_seeds():
    a = [(0, "s", "p1", 0.9), (0, "s", "p2", 0.5), (1, "s", "p1", float("nan"))]
    b = [(0, "s", "p1", 0.7), (1, "s", "p1", 0.6), (0, "s", "p3", 0.1)]
    assert pair(a, b) == [(0, "s", "p1", pytest.approx(0.2))]
    with pytest.raises(ValueError, match="seeds"):
        hierarchical_bootstrap([(0, "s", "p", 0.1), (1, "s", "p", 0.2), (0, "t", "q", 0.3)])
    with pytest.raises(ValueError, match="no paired"):
        hierarchical_bootstrap([])


def test_the_seed_t_interval_is_the_textbook_one():
    t = seed_t_interval([0.1, 0.2, 0.3])
    # t_{0.975, 2} = 4.3027; sd = 0.1
    assert t.mean == pytest.approx(0.2)
    assert t.high - t.mean == pytest.approx(4.302653 * 0.1 / np.sqrt(3), rel=1e-5)
