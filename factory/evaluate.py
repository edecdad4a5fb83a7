"""Evaluation of a synthetic table against the real one (domain-agnostic).

Four views of one synthetic polars frame that has every spec column:

- `quality`: SDMetrics single-table QualityReport (Column Shapes, Column Pair Trends),
  with SDMetrics metadata built from the spec (Numeric -> numerical, Categorical ->
  categorical, including integer categoricals such as a loan term).
- `mle`: machine-learning efficiency. XGBoost is trained on the candidate frame and
  scored on the real test split; `mle_ratio` divides by the same model trained on the
  real train split.
- `privacy`: exact copies of training rows and DCR (distance to closest training record)
  against the same distribution for the real test split.
- `rule_validity`: share of rows passing every schema check and domain rule, and the
  pass rate of each rule.

`evaluate` combines them into one JSON-serializable dict, with its `setup`: what every
metric depends on besides the candidate rows (splits, rule set, metric code, settings). Two
results are comparable only if their setups are equal.
"""
from __future__ import annotations

import hashlib
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

if TYPE_CHECKING:
    import pandas as pd

from factory.checks.distance import dcr, exact_copies
from schemas.columns import NULL_TEXT, Categorical, Numeric, TableSpec

# Pair trends scales with the number of rows of both frames (406 pairs for 29 columns).
# Measured on the finance table (2 cores, sdmetrics 0.32): 10,000 synthetic rows vs the
# 1,001-row test split take ~1.5 s for the whole report, so there is no subsampling by default.
QUALITY_MAX_ROWS: int | None = None
SEED = 0


# ---------------------------------------------------------------- helpers

def _to_pandas(frame: pl.DataFrame, spec: TableSpec) -> pd.DataFrame:
    import pandas as pd  # lazily: the CLI starts without pandas

    """Spec columns as pandas: categoricals as strings (null -> "null" category), numerics as float."""
    out = {}
    for c in spec.columns:
        s = frame[c.name]
        if isinstance(c, Categorical):
            out[c.name] = s.cast(pl.String).fill_null(NULL_TEXT).to_numpy().astype(object)
        else:
            out[c.name] = s.cast(pl.Float64).to_numpy()
    return pd.DataFrame(out)


def _subsample(frame: pl.DataFrame, max_rows: int | None, seed: int) -> pl.DataFrame:
    if max_rows is None or frame.height <= max_rows:
        return frame
    return frame.sample(n=max_rows, seed=seed, shuffle=True)


def _f(x) -> float | None:
    """A JSON-safe float (NaN/inf -> None)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# ---------------------------------------------------------------- quality

def sdmetrics_metadata(spec: TableSpec) -> dict:
    return {"columns": {c.name: {"sdtype": "numerical" if isinstance(c, Numeric) else "categorical"}
                        for c in spec.columns}}


def quality(real: pl.DataFrame, synth: pl.DataFrame, spec: TableSpec, *,
            max_rows: int | None = QUALITY_MAX_ROWS, seed: int = SEED) -> dict:
    """SDMetrics Column Shapes and Column Pair Trends of `synth` against `real` (scores in [0, 1]).

    Categorical nulls are compared as their own category; numeric nulls are left to
    SDMetrics (which drops them). If `max_rows` is set, both frames are subsampled to
    at most that many rows with a fixed seed and the output says so.
    """
    with warnings.catch_warnings():  # the single-table alias is deprecated (FutureWarning), same metrics
        warnings.simplefilter("ignore", FutureWarning)
        from sdmetrics.reports.single_table import QualityReport

    r, s = _subsample(real, max_rows, seed), _subsample(synth, max_rows, seed)
    report = QualityReport()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report.generate(_to_pandas(r, spec), _to_pandas(s, spec), sdmetrics_metadata(spec), verbose=False)
    seconds = time.perf_counter() - t0
    props = report.get_properties().set_index("Property")["Score"]
    shapes = report.get_details("Column Shapes")
    return {
        "score": _f(report.get_score()),
        "column_shapes": _f(props["Column Shapes"]),
        "column_pair_trends": _f(props["Column Pair Trends"]),
        "per_column_shape": {row["Column"]: _f(row["Score"]) for _, row in shapes.iterrows()},
        "n_real": r.height,
        "n_synth": s.height,
        "subsampled": r.height < real.height or s.height < synth.height,
        "subsample_seed": seed if max_rows is not None else None,
        "seconds": round(seconds, 2),
    }


# ---------------------------------------------------------------- machine-learning efficiency

@dataclass(frozen=True)
class MLETask:
    """Predict `target` from every spec column except the target and `exclude`."""

    name: str
    target: str
    kind: str  # "regression" | "classification"
    exclude: tuple[str, ...] = ()


def mle_tasks(domain) -> tuple[MLETask, ...]:
    """The domain's MLE tasks: its settings' `mle_tasks` (finance: config.json; an init domain:
    domain.toml, proposed from `factory init --target`). None is a KeyError."""
    cfg = (domain.config or {}).get("mle_tasks")
    if cfg:
        return tuple(MLETask(t["name"], t["target"], t["kind"], tuple(t.get("exclude", ()))) for t in cfg)
    raise KeyError(f"no MLE tasks for domain {domain.name!r} (set mle_tasks in its settings, "
                   f"or pass --target to factory init)")


def _features(frame: pl.DataFrame, spec: TableSpec, names: list[str]) -> pd.DataFrame:
    import pandas as pd

    """XGBoost input: numerics as float (null = missing), categoricals as pandas category
    with the spec's value set (unknown values and nulls = missing)."""
    out = {}
    for n in names:
        c = spec[n]
        if isinstance(c, Categorical):
            values = [str(v) for v in c.values]
            out[n] = pd.Categorical(frame[n].cast(pl.String).to_list(), categories=values)
        else:
            out[n] = frame[n].cast(pl.Float64).to_numpy()
    return pd.DataFrame(out)


def _fit_score(task: MLETask, train: pl.DataFrame, test: pl.DataFrame, spec: TableSpec,
               n_estimators: int, seed: int, n_jobs: int = 2) -> dict:
    import xgboost as xgb
    from sklearn.metrics import accuracy_score, f1_score, r2_score

    names = [n for n in spec.names if n != task.target and n not in task.exclude]
    train = train.filter(pl.col(task.target).is_not_null())
    test = test.filter(pl.col(task.target).is_not_null())
    X, Xt = _features(train, spec, names), _features(test, spec, names)
    common = dict(n_estimators=n_estimators, max_depth=6, learning_rate=0.1, tree_method="hist",
                  enable_categorical=True, n_jobs=n_jobs, random_state=seed)
    if task.kind == "regression":
        y, yt = train[task.target].cast(pl.Float64).to_numpy(), test[task.target].cast(pl.Float64).to_numpy()
        model = xgb.XGBRegressor(**common).fit(X, y)
        return {"r2": _f(r2_score(yt, model.predict(Xt)))}
    if task.kind == "classification":
        y = train[task.target].cast(pl.String).to_numpy()
        yt = test[task.target].cast(pl.String).to_numpy()
        classes = np.unique(y)  # the classes the candidate data contains (may miss some)
        if len(classes) == 1:
            pred = np.full(len(yt), classes[0])
        else:
            model = xgb.XGBClassifier(**common).fit(X, np.searchsorted(classes, y))
            pred = classes[model.predict(Xt).astype(int)]
        return {"accuracy": _f(accuracy_score(yt, pred)),
                "macro_f1": _f(f1_score(yt, pred, average="macro", labels=np.unique(yt), zero_division=0))}
    raise ValueError(f"unknown task kind {task.kind!r}")


def mle(train_frame: pl.DataFrame, test_frame: pl.DataFrame, domain, *,
        n_estimators: int = 200, seed: int = SEED, n_jobs: int = 2) -> dict:
    """Scores on `test_frame` of XGBoost models trained on `train_frame`, one entry per task:
    {"interest_rate": {"r2"}, "grade": {"accuracy", "macro_f1"}} for finance."""
    return {t.name: _fit_score(t, train_frame, test_frame, domain.spec, n_estimators, seed, n_jobs)
            for t in mle_tasks(domain)}


def mle_ratio(synth_scores: dict, real_scores: dict) -> dict:
    """score(trained on candidate) / score(trained on real train), per task and metric."""
    out = {}
    for task, metrics in synth_scores.items():
        for metric, v in metrics.items():
            ref = real_scores[task][metric]
            out[f"{task}.{metric}"] = _f(v / ref) if v is not None and ref else None
    return out


# ---------------------------------------------------------------- privacy

def _quantiles(d: np.ndarray) -> dict:
    if len(d) == 0:
        return {"p1": None, "p5": None, "median": None, "zero_rate": None}
    return {"p1": _f(np.quantile(d, 0.01)), "p5": _f(np.quantile(d, 0.05)),
            "median": _f(np.median(d)), "zero_rate": _f((d <= 1e-7).mean())}


def privacy(train: pl.DataFrame, synth: pl.DataFrame, spec: TableSpec, *,
            reference: pl.DataFrame | None = None) -> dict:
    """Exact copies of training rows and DCR quantiles; `reference` (the real test split)
    gives the DCR a fresh real sample has to the same training rows."""
    copies = exact_copies(train, synth, spec)
    out = {"exact_copies": copies, "exact_copy_rate": _f(copies / synth.height) if synth.height else None,
           "dcr": _quantiles(dcr(train, synth, spec))}
    if reference is not None:
        out["dcr_reference"] = _quantiles(dcr(train, reference, spec))
        out["reference_exact_copies"] = exact_copies(train, reference, spec)
    return out


# ---------------------------------------------------------------- rules

def rule_validity(domain, frame: pl.DataFrame) -> dict:
    """Share of rows passing every check, the pass rate of each domain rule, and the pass rate
    of each schema check that some row failed (a missing/wrongly typed column fails all rows)."""
    n = frame.height
    v = domain.validator.validate(frame)
    failing = v.failures.group_by("stage", "rule").agg(pl.col("row").n_unique().alias("n"))
    counts = {(r["stage"], r["rule"]): r["n"] for r in failing.iter_rows(named=True)}
    rules = {r.name: _f(1 - counts.get(("rule", r.name), 0) / n) if n else None for r in domain.rules}
    schema = {name: _f(1 - k / n) for (stage, name), k in sorted(counts.items()) if stage == "schema"}
    schema_rows = v.failures.filter(pl.col("stage") == "schema")["row"].n_unique()
    return {"n": n, "valid_rate": _f(v.n_valid / n) if n else None,
            "schema_pass_rate": _f(1 - schema_rows / n) if n else None,
            "rules": rules, "schema_failures": schema}


# ---------------------------------------------------------------- all together

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def setup(domain, train: pl.DataFrame, test: pl.DataFrame, *, n_estimators: int = 200, seed: int = SEED,
          quality_max_rows: int | None = QUALITY_MAX_ROWS) -> dict:
    """Everything the metrics of `evaluate` depend on besides the candidate rows: the real splits
    (rows and a hash of their spec columns as CSV), the rule set, this file's source (the metric
    code) and the settings. Metrics with equal setups were computed the same way on the same data."""
    split = lambda f: {"rows": f.height, "sha256": _sha256(f.select(domain.spec.names).write_csv().encode())}  # noqa: E731
    return {"train": split(train), "test": split(test), "rule_set_hash": domain.rule_set_hash,
            "metric_code_sha256": _sha256(Path(__file__).read_bytes()),
            "n_estimators": n_estimators, "seed": seed, "quality_max_rows": quality_max_rows}


def evaluate(domain, synth: pl.DataFrame, train: pl.DataFrame, test: pl.DataFrame, *,
             real_mle: dict | None = None, quality_max_rows: int | None = QUALITY_MAX_ROWS,
             n_estimators: int = 200, seed: int = SEED) -> dict:
    """Every metric of `synth` (all spec columns) against the real splits, JSON-serializable.
    Pass `real_mle = mle(train, test, domain)` to reuse the real-train reference."""
    spec = domain.spec
    synth = synth.select(spec.names)
    timings = {}
    t0 = time.perf_counter()
    rules = rule_validity(domain, synth)
    timings["rules"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    q = quality(test, synth, spec, max_rows=quality_max_rows, seed=seed)
    timings["quality"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    try:
        mle_tasks(domain)
    except KeyError:  # a domain without MLE tasks: report the other metrics
        synth_mle = real_mle = None
    else:
        if real_mle is None:
            real_mle = mle(train, test, domain, n_estimators=n_estimators, seed=seed)
        synth_mle = mle(synth, test, domain, n_estimators=n_estimators, seed=seed)
    timings["mle"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    p = privacy(train, synth, spec, reference=test)
    timings["privacy"] = time.perf_counter() - t0

    return {
        "domain": domain.name,
        "n_rows": synth.height,
        "setup": setup(domain, train, test, n_estimators=n_estimators, seed=seed, quality_max_rows=quality_max_rows),
        "rule_validity": rules,
        "quality": q,
        "mle": None if synth_mle is None else
        {"synthetic": synth_mle, "real_train": real_mle, "ratio": mle_ratio(synth_mle, real_mle)},
        "privacy": p,
        "seconds": {k: round(v, 2) for k, v in timings.items()},
    }
