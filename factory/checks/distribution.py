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
  list; nulls rank below every value. Cheap (one rank transform and one correlation matrix
  per frame) and catches a generator that breaks relations between columns.

Thresholds: every check compares against max(calibrated threshold, sampling bound), or
min(...) for coverage. The calibrated threshold (config.json gates.thresholds, see
calibrate.py) is how far a fresh real sample of the test split's size strays from train,
with a margin; it is the practical tolerance for large runs. The sampling bound is what
chance alone produces at level alpha (default 0.001) for a run of n rows against m train
rows, so a small run of real-looking data is not failed for being small:

- ks: the asymptotic critical value c(alpha) * sqrt((n + m) / (n m)), c = sqrt(-ln(alpha/2) / 2)
  (1.95 at alpha = 0.001); conservative for discrete columns.
- quantiles: the train quantile function at q +- z * sqrt(q (1 - q) (1/n + 1/m)) (z = the
  two-sided normal quantile at alpha, 3.29), in IQR units: the spread of a sample quantile.
- tvd: the 1 - alpha quantile of the TVD between two multinomial samples of sizes n and m
  drawn from the train shares (seeded parametric bootstrap, 10,000 draws).
- coverage: 1 - j/K, where j is the smallest number of the K frequent categories that n
  draws miss with probability <= alpha (exact Poisson-binomial over the train shares).
- corr:max: z(alpha / (2 P)) * sqrt(1/(n-1) + 1/(m-1)), Bonferroni over the P pairs, using the
  standard error of a rank correlation at independence (its largest value).
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import polars as pl

from factory.checks.base import Check, GateConfig
from schemas.columns import NULL_TEXT, Numeric, TableSpec

QUANTILES = (0.05, 0.5, 0.95)
BOOTSTRAP_DRAWS = 10_000
BOOTSTRAP_SEED = 0
# Smallest calibrated thresholds, per kind: a test split that happens to match train very
# closely on one column must not make that column's threshold zero.
# KS and TVD floors are SDMetrics' "good" column shape (KSComplement / TVComplement >= 0.95):
# with 1.5x the test split's own noise-level statistic as the only bound, a 100k-record run
# was refused for KS 0.044 on interest_rate and TVD 0.027 on homeownership.
FLOORS = {"ks": 0.05, "q05": 0.02, "q50": 0.02, "q95": 0.02, "tvd": 0.05, "corr": 0.05}


def quantile_name(q: float) -> str:
    return f"q{round(q * 100):02d}"


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


def quantile_bound(q: float, n: int, m: int, alpha: float) -> float:
    """Chance spread of a sample quantile's rank: z * sqrt(q (1 - q) (1/n + 1/m))."""
    z = NormalDist().inv_cdf(1 - alpha / 2)
    return z * math.sqrt(q * (1 - q) * (1 / n + 1 / m))


def _categories(frame: pl.DataFrame, name: str) -> pl.Series:
    return frame[name].cast(pl.String).fill_null(NULL_TEXT)


def shares(values: pl.Series, categories: list[str]) -> np.ndarray:
    counts = dict(values.value_counts().iter_rows())
    x = np.array([counts.get(c, 0) for c in categories], dtype=np.float64)
    return x / max(1, len(values))


def tvd(p: np.ndarray, q: np.ndarray) -> float:
    return float(0.5 * np.abs(p - q).sum())


def tvd_bound(p: np.ndarray, n: int, m: int, alpha: float, draws: int = BOOTSTRAP_DRAWS,
              seed: int = BOOTSTRAP_SEED) -> float:
    """1 - alpha quantile of TVD(Multinomial(n, p)/n, Multinomial(m, p)/m)."""
    p = p[p > 0]
    if len(p) <= 1:
        return 0.0
    p = p / p.sum()
    rng = np.random.default_rng(seed)
    a = rng.multinomial(n, p, size=draws) / n
    b = rng.multinomial(m, p, size=draws) / m
    return float(np.quantile(0.5 * np.abs(a - b).sum(axis=1), 1 - alpha))


def coverage_bound(p: np.ndarray, n: int, alpha: float) -> float:
    """Smallest coverage that n draws from shares p reach with probability >= 1 - alpha
    (p: the shares of the K frequent categories)."""
    K = len(p)
    if K == 0:
        return 1.0
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
    z = NormalDist().inv_cdf(1 - alpha / (2 * max(1, pairs)))
    return z * math.sqrt(1 / max(1, n - 1) + 1 / max(1, m - 1))


# ---------------------------------------------------------------- the checks

def _judge(name: str, columns: str, stat: float, calibrated: float | None, bound: float, direction: str = "<=",
           extra: str = "") -> Check:
    if direction == "<=":
        threshold = bound if calibrated is None else max(calibrated, bound)
        ok = stat <= threshold + 1e-12
    else:
        threshold = bound if calibrated is None else min(calibrated, bound)
        ok = stat >= threshold - 1e-12
    which = "no calibrated threshold" if calibrated is None else (
        f"calibrated {calibrated:.4g}, sampling bound {bound:.4g}")
    return Check(name, columns, float(stat), float(threshold), direction, "passed" if ok else "failed",
                 "; ".join(x for x in (extra, which) if x))


def distribution_checks(run: pl.DataFrame, train: pl.DataFrame, spec: TableSpec, cfg: GateConfig) -> list[Check]:
    """Every distribution check of `run` against `train`. No minimum size is applied here
    (see `gate_checks`); per-check skips are for quantiles with too few non-null values."""
    n, m, alpha, thr = run.height, train.height, cfg.alpha, cfg.thresholds
    checks: list[Check] = []
    for c in spec.columns:
        if isinstance(c, Numeric):
            a, b = _numeric(run, c.name), _numeric(train, c.name)
            checks.append(_judge(f"ks:{c.name}", c.name, ks_statistic(a, b), thr.get(f"ks:{c.name}"),
                                 ks_bound(n, m, alpha)))
            a, b = a[~np.isnan(a)], np.sort(b[~np.isnan(b)])
            for q in QUANTILES:
                name = f"{quantile_name(q)}:{c.name}"
                if len(a) < cfg.min_values or len(b) < cfg.min_values:
                    checks.append(Check(name, c.name, None, thr.get(name), status="skipped",
                                        detail=f"{len(a)} non-null values in the run, {len(b)} in train; "
                                               f"needs {cfg.min_values}"))
                    continue
                qa, err = quantile_rank_error(a, b, q)
                checks.append(_judge(name, c.name, err, thr.get(name), quantile_bound(q, len(a), len(b), alpha),
                                     extra=f"run {quantile_name(q)} {qa:.6g}, train "
                                           f"{np.quantile(b, q, method='inverted_cdf'):.6g}"))
        else:
            a, b = _categories(run, c.name), _categories(train, c.name)
            cats = sorted(set(str(v) for v in c.values) | set(b.unique().to_list()) | set(a.unique().to_list()))
            pa, pb = shares(a, cats), shares(b, cats)
            worst = int(np.argmax(np.abs(pa - pb)))
            checks.append(_judge(f"tvd:{c.name}", c.name, tvd(pa, pb), thr.get(f"tvd:{c.name}"),
                                 tvd_bound(pb, n, m, alpha),
                                 extra=f"largest gap {cats[worst]!r}: run {pa[worst]:.3f}, train {pb[worst]:.3f}"))
            frequent = pb >= cfg.coverage_min_share
            present = pa[frequent] > 0
            missing = [cat for cat, f, p in zip(cats, frequent, pa) if f and p == 0]
            checks.append(_judge(f"coverage:{c.name}", c.name, float(present.mean()) if frequent.any() else 1.0,
                                 thr.get(f"coverage:{c.name}"), coverage_bound(pb[frequent], n, alpha), ">=",
                                 extra=f"{int(present.sum())} of {int(frequent.sum())} categories with >= "
                                       f"{cfg.coverage_min_share:.0%} of train" +
                                       (f"; missing {', '.join(missing[:5])}" if missing else "")))
    names = corr_columns(spec, cfg.ordinal)
    if len(names) >= 2:
        ra, rb = spearman(run, spec, names), spearman(train, spec, names)
        diff = np.abs(ra - rb)
        iu = np.triu_indices(len(names), k=1)
        order = np.argsort(-diff[iu], kind="stable")[:3]
        top = [(names[iu[0][k]], names[iu[1][k]]) for k in order]
        extra = "; ".join(f"{x}~{y}: run {ra[names.index(x), names.index(y)]:+.3f}, "
                          f"train {rb[names.index(x), names.index(y)]:+.3f}" for x, y in top)
        checks.append(_judge("corr:max", ",".join(top[0]), float(diff[iu].max()), thr.get("corr:max"),
                             corr_bound(n, m, len(iu[0]), alpha), extra=f"{len(names)} columns; {extra}"))
    return checks


def skipped_checks(spec: TableSpec, cfg: GateConfig, reason: str) -> list[Check]:
    """The checks a run would get, each marked skipped with `reason`."""
    out = []
    for c in spec.columns:
        kinds = ["ks", *map(quantile_name, QUANTILES)] if isinstance(c, Numeric) else ["tvd", "coverage"]
        out += [Check(f"{k}:{c.name}", c.name, None, cfg.thresholds.get(f"{k}:{c.name}"),
                      ">=" if k == "coverage" else "<=", "skipped", reason) for k in kinds]
    if len(corr_columns(spec, cfg.ordinal)) >= 2:
        out.append(Check("corr:max", "", None, cfg.thresholds.get("corr:max"), "<=", "skipped", reason))
    return out
