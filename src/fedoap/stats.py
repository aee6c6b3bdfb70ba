"""Paired comparisons of two methods on the same test patients, with intervals over seeds and
patients together.

A difference between two methods is measured patient by patient: at each seed both methods see
the same split, so each test case (patient, video) of each site has a score under both, and
``d = score_a - score_b`` is paired. The estimate is the mean of ``d`` over a site's patients and
the seeds (per site), and the mean of the sites' estimates (the mean over sites, as the report's
"mean" column weighs sites equally).

Its interval comes from a hierarchical bootstrap (Davison & Hinkley 1997, ch. 3.8; Saravanan et
al. 2020): each replicate resamples the seeds, then the patients within each site, and
recomputes the estimate; the interval is the 2.5th and 97.5th percentiles of the replicates.

* Where a site's test patients are the same at every seed (a fixed split), seeds and patients
  are crossed: one draw of the patients serves every drawn seed, so a patient who is hard for
  one method at every seed counts once, as it should.
* Where they differ by seed (``data.split.follow_run_seed``), patients are nested in seeds: each
  drawn seed gets its own draw of its own patients, and the interval includes the split's
  variance.

With few seeds the bootstrap's seed-level variance is biased low by a factor (S - 1) / S and its
percentiles come from a distribution as thin-tailed as the normal, not Student's t with S - 1
degrees of freedom. Both are corrected for: each seed's deviation from the mean is inflated by
``sqrt(S / (S - 1))`` before resampling (the usual small-sample correction of the cluster
bootstrap), and the replicates are spread about the estimate by ``t_{S-1} / z`` at the seed
level's share of the variance. ``tests/test_stats.py`` checks the coverage on simulated studies
with a known effect.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

#: One paired observation: (seed, site, case, difference).
Paired = tuple[int, str, str, float]


@dataclass(frozen=True)
class Interval:
    """An estimate with its 95% interval, and what it rests on."""

    mean: float
    low: float
    high: float
    seeds: int
    patients: int  # distinct (site, case) pairs; with the split following the seed, per seed

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def fmt(self, scale: float = 100.0, digits: int = 1) -> str:
        """``+2.4 [-0.8, +5.7]`` in points (``scale`` 100: Dice as points)."""
        if math.isnan(self.mean):
            return "–"
        m, lo, hi = (scale * x for x in (self.mean, self.low, self.high))
        return f"{m:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def pair(
    a: Iterable[tuple[int, str, str, float]], b: Iterable[tuple[int, str, str, float]]
) -> list[Paired]:
    """``a - b`` for every (seed, site, case) both hold a finite score for."""
    other = {(s, k, c): v for s, k, c, v in b if v is not None and math.isfinite(v)}
    return [
        (s, k, c, v - other[(s, k, c)])
        for s, k, c, v in a
        if v is not None and math.isfinite(v) and (s, k, c) in other
    ]


@dataclass
class _Site:
    """One site's differences, seed by seed."""

    seeds: list[int]
    values: list[np.ndarray]  # per seed, its patients' differences
    crossed: bool  # the same patients (in one order) at every seed

    @property
    def matrix(self) -> np.ndarray:  # (S, P), crossed only
        return np.stack(self.values)


def _sites(diffs: Sequence[Paired]) -> dict[str, _Site]:
    by: dict[str, dict[int, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for s, k, c, d in diffs:
        by[k][s][c] = d
    out: dict[str, _Site] = {}
    for k, per_seed in by.items():
        seeds = sorted(per_seed)
        cases = [sorted(per_seed[s]) for s in seeds]
        crossed = all(c == cases[0] for c in cases)
        values = [
            np.array([per_seed[s][c] for c in cs]) for s, cs in zip(seeds, cases, strict=True)
        ]
        out[k] = _Site(seeds, values, crossed)
    return out


def _estimate(site: _Site) -> float:
    return float(np.mean([v.mean() for v in site.values]))


def _inflate(site: _Site) -> _Site:
    """Each seed's patients shifted so that the seed means spread ``sqrt(S / (S - 1))`` times
    as far from their mean: the bootstrap then sees an unbiased seed-level variance.

    Where patients are nested in seeds, the spread of the seed means already holds the patients'
    sampling variance, which the second stage draws again; the spread is first shrunk to the
    seeds' own share, ``(B - W) / B`` (B: the variance of the seed means, W: the mean variance
    of one seed's patient mean), so that it is not counted twice."""
    n = len(site.seeds)
    if n < 2:
        return site
    means = np.array([v.mean() for v in site.values])
    grand = means.mean()
    factor = math.sqrt(n / (n - 1))
    if not site.crossed:
        between = means.var(ddof=1)
        within = float(
            np.mean([v.var(ddof=1) / len(v) if len(v) > 1 else 0.0 for v in site.values])
        )
        factor *= math.sqrt(max(between - within, 0.0) / between) if between > 0 else 0.0
    shift = (means - grand) * (factor - 1)
    return _Site(site.seeds, [v + d for v, d in zip(site.values, shift, strict=True)], site.crossed)


def _replicates(site: _Site, seed_idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The site's estimate in each replicate, given each replicate's drawn seeds (B, S)."""
    b, s = seed_idx.shape
    if site.crossed:
        m = site.matrix  # (S, P)
        p = m.shape[1]
        counts = rng.multinomial(p, np.full(p, 1 / p), size=b) / p  # (B, P) patient weights
        per_seed = counts @ m.T  # (B, S): each seed's mean over the drawn patients
        return np.take_along_axis(per_seed, seed_idx, axis=1).mean(1)
    # Nested: every drawn seed gets its own draw of its own patients. For each seed j, the
    # mean of a fresh resample at every (replicate, position) (B, S), then each position takes
    # the one of the seed drawn there.
    means = np.stack(
        [v[rng.integers(0, len(v), size=(b, s, len(v)))].mean(-1) for v in site.values]
    )  # (seeds, B, S)
    return np.take_along_axis(means, seed_idx[None], axis=0)[0].mean(1)


def _seed_share(sites: list[_Site]) -> float:
    """The share of the estimate's variance that comes from the seeds (0..1), by a one-way
    decomposition: the variance of seed means against that of patient means."""
    seed_var, patient_var = 0.0, 0.0
    for site in sites:
        n = len(site.seeds)
        means = np.array([v.mean() for v in site.values])
        within = np.mean([v.var(ddof=1) / len(v) if len(v) > 1 else 0.0 for v in site.values])
        between = means.var(ddof=1) if n > 1 else 0.0
        seed_var += max(between - within, 0.0) / n
        patient_var += within / n if not site.crossed else within
    total = seed_var + patient_var
    return seed_var / total if total > 0 else 0.0


def hierarchical_bootstrap(
    diffs: Sequence[Paired],
    n_boot: int = 4000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[dict[str, Interval], Interval]:
    """Per-site intervals and the interval of the mean over sites (see the module docstring).

    Every site must hold the same seeds. Raises ValueError on no data."""
    if not diffs:
        raise ValueError("no paired observations")
    sites = _sites(diffs)
    seeds = sorted({s for s, *_ in diffs})
    for k, site in sites.items():
        if site.seeds != seeds:
            raise ValueError(f"site {k!r} has seeds {site.seeds}, the others {seeds}")
    rng = np.random.default_rng(seed)
    n = len(seeds)
    seed_idx = rng.integers(0, n, size=(n_boot, n))
    inflated = {k: _inflate(s) for k, s in sites.items()}
    reps = {k: _replicates(s, seed_idx, rng) for k, s in inflated.items()}
    est = {k: _estimate(s) for k, s in sites.items()}
    tail = (1 - level) / 2
    # Student's t at the seed level: stretch the replicates about the estimate by t/z on the
    # seed share of their variance (1 when the patients dominate, t/z when the seeds do).
    stretch_full = sps.t.ppf(1 - tail, n - 1) / sps.norm.ppf(1 - tail) if n > 1 else 1.0

    def interval(point: float, r: np.ndarray, share: float, patients: int) -> Interval:
        stretch = math.sqrt(share * stretch_full**2 + (1 - share))
        r = point + (r - r.mean()) * stretch
        lo, hi = np.quantile(r, [tail, 1 - tail])
        return Interval(point, float(lo), float(hi), n, patients)

    def patients(site: _Site) -> int:
        return len(site.values[0]) if site.crossed else sum(len(v) for v in site.values)

    per_site = {
        k: interval(est[k], reps[k], _seed_share([sites[k]]), patients(sites[k])) for k in sites
    }
    mean_reps = np.mean(np.stack([reps[k] for k in sites]), axis=0)
    overall = interval(
        float(np.mean(list(est.values()))),
        mean_reps,
        _seed_share(list(sites.values())),
        sum(patients(s) for s in sites.values()),
    )
    return per_site, overall


def seed_t_interval(per_seed: Sequence[float], level: float = 0.95) -> Interval:
    """The t-interval over seeds of per-seed values (e.g. the client-mean difference)."""
    v = np.asarray(per_seed, dtype=float)
    n = len(v)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, 0)
    m = float(v.mean())
    if n == 1:
        return Interval(m, math.nan, math.nan, 1, 0)
    half = sps.t.ppf(1 - (1 - level) / 2, n - 1) * v.std(ddof=1) / math.sqrt(n)
    return Interval(m, m - half, m + half, n, 0)
