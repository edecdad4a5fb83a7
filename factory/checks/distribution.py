"""Distribution gate: a run's accepted records against the real train split.

Checks (names are stable; each has a statistic and a threshold):

- `ks:<col>` (numeric): two-sample Kolmogorov-Smirnov statistic, nulls counted as a value
  below every number (so a wrong null share shows up too).
- `q05:<col>`, `q50:<col>`, `q95:<col>` (numeric): where the run's q-quantile sits among the
  train values, in probability units: 0 if q lies in [F(x-), F(x)] of train at x = the run's
  quantile, else the distance to that interval (non-null values). Probability units, not
  value units: on a lumpy column (interest rates come in sub-grade steps) a tiny shift of
  mass moves a value quantile across a whole step (measured: p95 21.45 -> 22.91, 0.26 IQR,
  from 0.7 points more D/E loans), while its rank moves by ~1 point.
- `tvd:<col>` (categorical): total-variation distance of the category shares, null a category.
- `coverage:<col>` (categorical): share of the train categories with >= 1% mass that
  appear at least once in the run (must be at least the threshold).
- `corr:max`: the largest |difference| between the Spearman rank-correlation matrices of the
  run and of train, over numeric columns and ordinal categoricals (integer-valued,
  two-valued, or listed in gates.ordinal) encoded by their position in the spec's value
  list; nulls rank below every value.
- `duplicates`: the share of the run's records that repeat an earlier record of the run
  (every column equal). Collapsed latents or a stuck sampler show up here at any size.
- `constant`: the number of columns that take one value in the whole run although n real
  records would almost surely show more than one (P(one value) <= the check's level, from
  the train shares).

How a check decides (the gate as a test). The hypothesis a run must not reject is "this
generator is within the tolerance of the real distribution". For a statistic S with
tolerance t (the calibrated `gates.thresholds`, see calibrate.py) the threshold is

    t + b(n, m, a)        ('<=' checks; coverage: t - (1 - b))

where b is what chance alone reaches with probability at most a for a run of n records
against m train rows. Tolerance PLUS bound, not the larger of the two: a generator that is
off by t systematically still shows chance on top of it (by the triangle inequality for
KS and TVD, which are distances). The family of K checks is controlled at the family-wise
level alpha (gates.alpha, default 0.01) by Bonferroni: every check gets a = alpha / K.
Holm would give the same verdict (its first step is exactly this Bonferroni test of the
smallest p-value, and the gate refuses on any failure); it would only flag fewer checks
after the first, and it needs per-check p-values instead of a threshold a reader can
compare with the statistic. So: Bonferroni.

Bounds at level a (n: the run's records, m: train's):
- ks: c(a) sqrt((n + m) / (n m)), c(a) = sqrt(-ln(a / 2) / 2) (the two-sample
  Kolmogorov-Smirnov tail; conservative for discrete columns).
- quantiles: the run's q-quantile is an order statistic X_(k), k = ceil(n q), and F(X_(k))
  follows Beta(k, n + 1 - k) exactly (continuous F; conservative with ties): the run's part
  is the larger distance from q to that Beta's a/2 and 1 - a/2 quantiles, combined in
  quadrature with train's normal spread z(1 - a/2) sqrt(q (1 - q) / m). For large n that is
  the usual two-sample normal bound; for small n the exact Beta part dominates, so small
  runs are checked too, with bounds that widen as they should.
- tvd: E[TVD] between multinomial samples of sizes n and m from the train shares (seeded
  parametric bootstrap, 2,000 draws) plus McDiarmid's deviation sqrt(ln(1/a) / 2 (1/n + 1/m))
  (changing one record moves the TVD by at most 1/n, resp. 1/m). A bound at a ~ 1e-4 cannot
  be read off a bootstrap's tail; this one holds at any a.
- coverage: 1 - j/K, where j is the smallest number of the K frequent categories that n
  draws miss with probability <= a (exact Poisson-binomial over the train shares, each at its
  Clopper-Pearson lower bound at level a given the m train rows: with a small reference, as a
  conditioned run's, a category can look frequent by chance).
- corr:max: z(a / (2 P)) sqrt(1/(n-1) + 1/(m-1)), Bonferroni over the P pairs, using the
  standard error of a rank correlation at independence (its largest value).
- duplicates: Poisson(C(n, 2) c) quantile at 1 - a, divided by n, where c is the chance that
  two real records are equal: (duplicate pairs in train + 1) / C(m, 2), an upper estimate
  that stays positive when train has no duplicates.
- constant: no tolerance; a column counts when P(n real values all equal) = sum_v p_v^n
  (train shares, numerics by exact value) is <= a / (number of columns).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from statistics import NormalDist

import numpy as np
import polars as pl

from factory.checks.base import Check, GateConfig
from schemas.columns import NULL_TEXT, Numeric, TableSpec

QUANTILES = (0.05, 0.5, 0.95)
BOOTSTRAP_DRAWS = 2_000
BOOTSTRAP_SEED = 0
# Smallest calibrated tolerances, per kind: a test split that happens to match train very
# closely on one column must not make that column's tolerance zero.
# KS and TVD floors are SDMetrics' "good" column shape (KSComplement / TVComplement >= 0.95).
# duplicates: up to 1% of a run may repeat records before chance is even considered.
FLOORS = {"ks": 0.05, "q05": 0.02, "q50": 0.02, "q95": 0.02, "tvd": 0.05, "corr": 0.05, "duplicates": 0.01}
RUN_CHECKS = ("duplicates", "constant")  # checks over whole records, beside the per-column ones


def quantile_name(q: float) -> str:
    return f"q{round(q * 100):02d}"


def _z(p: float) -> float:
    """The standard normal quantile at 1 - p, for the tiny p a family-wise level needs."""
    return NormalDist().inv_cdf(1 - p)


# ---------------------------------------------------------------- statistics and bounds

def _numeric(frame: pl.DataFrame, name: str) -> np.ndarray:
    return frame[name].cast(pl.Float64).to_numpy().astype(np.float64)  # null -> nan


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample KS statistic; nan (null) counts as a value below every number."""
    a = np.sort(np.where(np.isnan(a), -np.inf, a))
    b = np.sort(np.where(np.isnan(b), -np.inf, b))
    grid = np.concatenate([a, b])
    fa = np.searchsorted(a, grid, side="right") / len(a)
    fb = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.max(np.abs(fa - fb)))


def ks_bound(n: int, m: int, alpha: float) -> float:
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


def quantile_rank_error(run_values: np.ndarray, train_sorted: np.ndarray, q: float) -> tuple[float, float]:
    """(the run's q-quantile x, distance from q to [F_train(x-), F_train(x)])."""
    x = float(np.quantile(run_values, q, method="inverted_cdf"))
    m = len(train_sorted)
    below = np.searchsorted(train_sorted, x, side="left") / m
    upto = np.searchsorted(train_sorted, x, side="right") / m
    return x, float(max(0.0, below - q, q - upto))


@lru_cache(maxsize=4096)
def quantile_bound(q: float, n: int, m: int, alpha: float) -> float:
    """How far from q chance puts the rank of the run's q-quantile, at level alpha: the exact
    order-statistic (Beta) interval for the run, combined in quadrature with train's normal
    spread (for large n this is the two-sample normal bound z sqrt(q (1 - q) (1/n + 1/m)))."""
    from scipy import stats  # here, not at import: worker processes import this module and never call it

    k = max(1, math.ceil(n * q - 1e-9))  # np.quantile(method="inverted_cdf") returns X_(k)
    lo, hi = stats.beta.ppf([alpha / 2, 1 - alpha / 2], k, n + 1 - k)
    run = max(q - float(lo), float(hi) - q, 0.0)
    return math.hypot(run, _z(alpha / 2) * math.sqrt(q * (1 - q) / m))


def _categories(frame: pl.DataFrame, name: str) -> pl.Series:
    return frame[name].cast(pl.String).fill_null(NULL_TEXT)


def shares(values: pl.Series, categories: list[str]) -> np.ndarray:
    counts = dict(values.value_counts().iter_rows())
    x = np.array([counts.get(c, 0) for c in categories], dtype=np.float64)
    return x / max(1, len(values))


def tvd(p: np.ndarray, q: np.ndarray) -> float:
    return float(0.5 * np.abs(p - q).sum())


@lru_cache(maxsize=1024)
def _expected_tvd(p: tuple, n: int, m: int, draws: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    a = rng.multinomial(n, p, size=draws) / n
    b = rng.multinomial(m, p, size=draws) / m
    return float(np.mean(0.5 * np.abs(a - b).sum(axis=1)))


def tvd_bound(p: np.ndarray, n: int, m: int, alpha: float, draws: int = BOOTSTRAP_DRAWS,
              seed: int = BOOTSTRAP_SEED) -> float:
    """E[TVD(Multinomial(n, p)/n, Multinomial(m, p)/m)] + McDiarmid's deviation at level alpha."""
    p = p[p > 0]
    if len(p) <= 1:
        return 0.0
    p = p / p.sum()
    mean = _expected_tvd(tuple(np.round(p, 12)), n, m, draws, seed)
    return mean + math.sqrt(math.log(1 / alpha) / 2 * (1 / n + 1 / m))


def coverage_bound(p: np.ndarray, n: int, alpha: float, m: int | None = None) -> float:
    """Smallest coverage that n draws from shares p reach with probability >= 1 - alpha
    (p: the shares of the K frequent categories, observed in m reference rows). With m, each
    share is taken at its one-sided Clopper-Pearson lower bound at level alpha: the reference's
    own sampling noise (a category of 4 in 321 conditioned rows is "frequent" at 1.2%, yet its
    share may be 0.3%) must not count against the run."""
    K = len(p)
    if K == 0:
        return 1.0
    if m is not None:
        from scipy import stats  # here, not at import (see quantile_bound)

        k = np.round(np.asarray(p) * m)
        p = np.where(k > 0, stats.beta.ppf(alpha, np.maximum(k, 1), m - k + 1), 0.0)
    miss = (1 - p) ** n  # P(category j absent from n draws), treated as independent
    dist = np.zeros(K + 1)
    dist[0] = 1.0
    for pj in miss:  # Poisson-binomial distribution of the number of missed categories
        dist[1:] = dist[1:] * (1 - pj) + dist[:-1] * pj
        dist[0] *= 1 - pj
    tail = 1 - np.cumsum(dist)  # P(missed > j)
    j = int(np.argmax(tail <= alpha))
    return 1 - j / K


def corr_columns(spec: TableSpec, ordinal: tuple[str, ...] = ()) -> list[str]:
    out = []
    for c in spec.columns:
        if isinstance(c, Numeric) or c.is_int or len(c.values) == 2 or c.name in ordinal:
            out.append(c.name)
    return out


def _encoded(frame: pl.DataFrame, spec: TableSpec, names: list[str]) -> pl.DataFrame:
    """Numbers for a rank correlation: numerics as they are, categoricals as their position
    in the spec's value list; nulls below every value."""
    cols = []
    for n in names:
        c = spec[n]
        if isinstance(c, Numeric):
            cols.append(pl.col(n).cast(pl.Float64).fill_null(-np.inf))
        else:
            mapping = {str(v): float(i) for i, v in enumerate(c.values)}
            cols.append(pl.col(n).cast(pl.String).replace_strict(mapping, default=-1.0, return_dtype=pl.Float64)
                        .fill_null(-1.0))
    return frame.select(cols)


def spearman(frame: pl.DataFrame, spec: TableSpec, names: list[str]) -> np.ndarray:
    enc = _encoded(frame, spec, names)
    ranks = enc.select(pl.all().rank("average").cast(pl.Float64)).to_numpy()
    ranks = ranks - ranks.mean(axis=0)
    norms = np.sqrt((ranks ** 2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (ranks.T @ ranks) / np.outer(norms, norms)
    return np.nan_to_num(r, nan=0.0)  # a constant column correlates with nothing


def corr_bound(n: int, m: int, pairs: int, alpha: float) -> float:
    z = _z(alpha / (2 * max(1, pairs)))
    return z * math.sqrt(1 / max(1, n - 1) + 1 / max(1, m - 1))


def duplicate_share(frame: pl.DataFrame) -> float:
    """Share of rows equal (every column, nulls equal) to an earlier row."""
    if frame.height == 0:
        return 0.0
    return 1 - frame.n_unique() / frame.height


def duplicates_bound(n: int, collision: float, alpha: float) -> float:
    """Share of repeated records that chance reaches with probability <= alpha when two real
    records are equal with probability `collision` (Poisson over the C(n, 2) pairs)."""
    if n < 2:
        return 0.0
    from scipy import stats

    lam = n * (n - 1) / 2 * collision
    return float(stats.poisson.ppf(1 - alpha, lam)) / n


# ---------------------------------------------------------------- what train contributes

@dataclass
class Reference:
    """Everything the checks need from the train split, computed once (a benchmark that
    gates hundreds of runs builds it once)."""

    spec: TableSpec
    m: int
    numeric: dict[str, np.ndarray] = field(default_factory=dict)  # column -> values, null as nan
    numeric_sorted: dict[str, np.ndarray] = field(default_factory=dict)  # non-null values, sorted
    categories: dict[str, pl.Series] = field(default_factory=dict)
    value_shares: dict[str, np.ndarray] = field(default_factory=dict)  # column -> shares of its values
    corr_names: list[str] = field(default_factory=list)
    corr: np.ndarray | None = None
    collision: float = 0.0

    @classmethod
    def build(cls, train: pl.DataFrame, spec: TableSpec, cfg: GateConfig) -> Reference:
        ref = cls(spec, train.height)
        for c in spec.columns:
            if isinstance(c, Numeric):
                v = _numeric(train, c.name)
                ref.numeric[c.name] = v
                ref.numeric_sorted[c.name] = np.sort(v[~np.isnan(v)])
            else:
                ref.categories[c.name] = _categories(train, c.name)
            counts = train[c.name].value_counts()["count"].to_numpy().astype(np.float64)
            ref.value_shares[c.name] = counts / max(1, counts.sum())
        ref.corr_names = corr_columns(spec, cfg.ordinal)
        if len(ref.corr_names) >= 2:
            ref.corr = spearman(train, spec, ref.corr_names)
        m = train.height
        if m >= 2:
            sizes = train.select(spec.names).group_by(spec.names).len()["len"].to_numpy().astype(np.float64)
            ref.collision = float((sizes * (sizes - 1) / 2).sum() + 1) / (m * (m - 1) / 2)
        return ref


def _p_constant(p: np.ndarray, n: int) -> float:
    """P(n draws from shares p all take one value)."""
    return float(np.sum(p.astype(np.float64) ** n)) if n >= 2 else 1.0


# ---------------------------------------------------------------- the checks

def _judge(name: str, columns: str, stat: float, tolerance: float | None, bound: float, direction: str = "<=",
           extra: str = "") -> Check:
    """tolerance + bound ('<='), or tolerance - (1 - bound) for coverage ('>=')."""
    if direction == "<=":
        threshold = bound + (tolerance or 0.0)
        ok = stat <= threshold + 1e-12
    else:
        threshold = max(0.0, bound - (1 - (1.0 if tolerance is None else tolerance)))
        ok = stat >= threshold - 1e-12
    which = (f"sampling bound {bound:.4g}, no calibrated tolerance" if tolerance is None else
             f"tolerance {tolerance:.4g} {'+' if direction == '<=' else '-'} sampling "
             f"{'bound ' + format(bound, '.4g') if direction == '<=' else 'shortfall ' + format(1 - bound, '.4g')}")
    return Check(name, columns, float(stat), float(threshold), direction, "passed" if ok else "failed",
                 "; ".join(x for x in (extra, which) if x))


def planned_checks(spec: TableSpec, cfg: GateConfig) -> list[tuple[str, str]]:
    """(check name, columns) of every check a run gets, in order."""
    out = []
    for c in spec.columns:
        kinds = ["ks", *map(quantile_name, QUANTILES)] if isinstance(c, Numeric) else ["tvd", "coverage"]
        out += [(f"{k}:{c.name}", c.name) for k in kinds]
    if len(corr_columns(spec, cfg.ordinal)) >= 2:
        out.append(("corr:max", ""))
    out += [(k, "") for k in RUN_CHECKS]
    return out


def distribution_checks(run: pl.DataFrame, train: pl.DataFrame, spec: TableSpec, cfg: GateConfig,
                        reference: Reference | None = None, level: float | None = None) -> list[Check]:
    """Every distribution check of `run` against `train`, each at level alpha / K (Bonferroni
    over the K checks that are evaluated), or at `level` each if given (calibrate.py uses 0.5:
    the level chance alone reaches half the time). Per-check skips: quantiles with fewer than
    gates.min_values non-null values. `reference`: Reference.build(train, ...) if at hand."""
    ref = reference or Reference.build(train, spec, cfg)
    n, m, thr = run.height, ref.m, cfg.thresholds
    if n == 0:
        raise ValueError("a run with no records has no distribution to check")
    numeric_run = {c.name: _numeric(run, c.name) for c in spec.columns if isinstance(c, Numeric)}
    skip = {f"{quantile_name(q)}:{name}" for name, a in numeric_run.items() for q in QUANTILES
            if int((~np.isnan(a)).sum()) < cfg.min_values or len(ref.numeric_sorted[name]) < cfg.min_values}
    planned = planned_checks(spec, cfg)
    K = sum(1 for name, _ in planned if name not in skip)
    a_check = cfg.alpha / max(1, K) if level is None else level  # Bonferroni: P(any fails by chance) <= alpha
    level = f"level {a_check:.2g} = alpha {cfg.alpha:g} / {K} checks" if level is None else f"level {level:g} each"
    checks: list[Check] = []
    for c in spec.columns:
        if isinstance(c, Numeric):
            a, b = numeric_run[c.name], ref.numeric[c.name]
            checks.append(_judge(f"ks:{c.name}", c.name, ks_statistic(a, b), thr.get(f"ks:{c.name}"),
                                 ks_bound(n, m, a_check), extra=level))
            a, b = a[~np.isnan(a)], ref.numeric_sorted[c.name]
            for q in QUANTILES:
                name = f"{quantile_name(q)}:{c.name}"
                if name in skip:
                    checks.append(Check(name, c.name, None, thr.get(name), status="skipped",
                                        detail=f"{len(a)} non-null values in the run, {len(b)} in train; "
                                               f"needs {cfg.min_values}"))
                    continue
                qa, err = quantile_rank_error(a, b, q)
                checks.append(_judge(name, c.name, err, thr.get(name), quantile_bound(q, len(a), len(b), a_check),
                                     extra=f"run {quantile_name(q)} {qa:.6g}, train "
                                           f"{np.quantile(b, q, method='inverted_cdf'):.6g}"))
        else:
            a, b = _categories(run, c.name), ref.categories[c.name]
            cats = sorted(set(str(v) for v in c.values) | set(b.unique().to_list()) | set(a.unique().to_list()))
            pa, pb = shares(a, cats), shares(b, cats)
            worst = int(np.argmax(np.abs(pa - pb)))
            checks.append(_judge(f"tvd:{c.name}", c.name, tvd(pa, pb), thr.get(f"tvd:{c.name}"),
                                 tvd_bound(pb, n, m, a_check),
                                 extra=f"largest gap {cats[worst]!r}: run {pa[worst]:.3f}, train {pb[worst]:.3f}"))
            frequent = pb >= cfg.coverage_min_share
            present = pa[frequent] > 0
            missing = [cat for cat, f, p in zip(cats, frequent, pa) if f and p == 0]
            checks.append(_judge(f"coverage:{c.name}", c.name, float(present.mean()) if frequent.any() else 1.0,
                                 thr.get(f"coverage:{c.name}"), coverage_bound(pb[frequent], n, a_check, m), ">=",
                                 extra=f"{int(present.sum())} of {int(frequent.sum())} categories with >= "
                                       f"{cfg.coverage_min_share:.0%} of train" +
                                       (f"; missing {', '.join(missing[:5])}" if missing else "")))
    names = ref.corr_names
    if len(names) >= 2:
        ra, rb = spearman(run, spec, names), ref.corr
        diff = np.abs(ra - rb)
        iu = np.triu_indices(len(names), k=1)
        order = np.argsort(-diff[iu], kind="stable")[:3]
        top = [(names[iu[0][k]], names[iu[1][k]]) for k in order]
        extra = "; ".join(f"{x}~{y}: run {ra[names.index(x), names.index(y)]:+.3f}, "
                          f"train {rb[names.index(x), names.index(y)]:+.3f}" for x, y in top)
        checks.append(_judge("corr:max", ",".join(top[0]), float(diff[iu].max()), thr.get("corr:max"),
                             corr_bound(n, m, len(iu[0]), a_check), extra=f"{len(names)} columns; {extra}"))
    checks += degeneracy_checks(run, ref, cfg, a_check)
    return checks


def degeneracy_checks(run: pl.DataFrame, ref: Reference, cfg: GateConfig, a_check: float) -> list[Check]:
    """`duplicates` and `constant`: a collapsed generator, refused at any size chance allows."""
    spec, n = ref.spec, run.height
    dup = duplicate_share(run.select(spec.names))
    out = [_judge("duplicates", "", dup, cfg.thresholds.get("duplicates", FLOORS["duplicates"]),
                  duplicates_bound(n, ref.collision, a_check),
                  extra=f"{round(dup * n):,} of {n:,} records repeat an earlier one; two train records are "
                        f"equal with probability <= {ref.collision:.2g}")]
    per_column = a_check / max(1, len(spec.columns))
    constant = []
    for c in spec.columns:
        if n >= 2 and run[c.name].n_unique() == 1 and _p_constant(ref.value_shares[c.name], n) <= per_column:
            constant.append(c.name)
    shown = ", ".join(constant[:8]) + (" ..." if len(constant) > 8 else "")
    out.append(Check("constant", ",".join(constant), float(len(constant)), 0.0, "<=",
                     "failed" if constant else "passed",
                     (f"one value in all {n:,} records: {shown}" if constant else
                      "no column is constant where n real records would vary") +
                     f"; a column counts when P(n real values all equal) <= {per_column:.2g}"))
    return out


def skipped_checks(spec: TableSpec, cfg: GateConfig, reason: str) -> list[Check]:
    """The checks a run would get, each marked skipped with `reason`."""
    return [Check(name, cols, None, cfg.thresholds.get(name), ">=" if name.startswith("coverage:") else "<=",
                  "skipped", reason) for name, cols in planned_checks(spec, cfg)]
