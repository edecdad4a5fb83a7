"""Conditions on the exported columns: `--where "EXPR"` and `--rebalance COL[:value=share,...]`.

A condition is a SQL predicate parsed by polars (`pl.sql_expr`), never by hand. It is
checked once, before anything is stored:
- every column it names must be an exported column of the domain;
- it must evaluate to a boolean on the domain's schema-typed empty frame and on the real
  train split (a type mismatch such as `grade > 5` fails here);
- some real train row must meet it (else no rule-valid record is known to meet it);
and a condition met by fewer than `LOW_SUPPORT` of the train rows gets a warning.

How a run uses it (data flow stays one-way):
- a generator that can condition (`conditional = True`) receives the `Condition`: DiffLM
  narrows its decoder to the values the real train rows meeting it take (`allowed_values`)
  and resamples its batch toward the condition (DomainDecoder.generate), and conditions its
  latent on values drawn from those rows (their real joint); the baseline copies drawn values;
- the loop's judge step checks it last, on every rule-valid record: a record that does not
  meet it is rejected with stage 'condition' (rejection is the last step, not the method);
- the gate compares the run with the real train rows that meet it (`gate_reference`).

A rebalance is a list of per-category conditions with their shares; each becomes one shard
of the run (with its own count and seeds), so resume and determinism work as for any shard.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl

LOW_SUPPORT = 0.01  # warn below 1% of the train rows


class ConditionError(ValueError):
    """A condition the factory cannot honour: the message is one line naming the problem."""


@dataclass(frozen=True)
class Condition:
    sql: str
    expr: pl.Expr
    columns: tuple[str, ...]  # the exported columns the condition names
    real: pl.DataFrame  # the real train rows (full records + latent columns) that meet it
    train_rows: int
    forced: tuple[str, ...]  # generated columns a decoder can force from a drawn real row

    @property
    def support(self) -> float:
        return self.real.height / self.train_rows

    @property
    def low_support(self) -> bool:
        return self.support < LOW_SUPPORT

    def describe(self) -> str:
        return f"{self.sql} (met by {self.real.height:,} of {self.train_rows:,} train rows, {self.support:.2%})"

    def holds(self, frame: pl.DataFrame) -> pl.Series:
        """Boolean per row of a frame of full records (null counts as not met)."""
        return frame.select(self.expr.fill_null(False).alias("ok"))["ok"]

    def draw(self, n: int, seed: int) -> pl.DataFrame:
        """n real rows that meet the condition, drawn with replacement (their real joint)."""
        # its own stream, so the draws do not correlate with a generator's use of the same seed
        idx = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(15,))).integers(0, self.real.height, size=n)
        return self.real[idx]

    def allowed_values(self, spec) -> dict:
        """What the real rows meeting the condition take in each of `forced` (columns of `spec`, the
        domain's): {categorical: set of values (None = null)}, {numeric: (min, max, any null)}.
        It is the narrowing a decoder applies; it is wider than the condition only where the
        condition relates columns to each other (an OR across columns): the last check decides."""
        from schemas.columns import Categorical

        out = {}
        for name in self.forced:
            s = self.real[name]
            if isinstance(spec[name], Categorical):
                out[name] = set(s.unique().to_list())
            else:
                v = s.drop_nulls().cast(pl.Float64)
                out[name] = (v.min(), v.max(), s.null_count() > 0) if len(v) else (1.0, 0.0, True)  # null only
        return out

    def settings(self) -> dict:
        return {"sql": self.sql, "columns": list(self.columns), "support": round(self.support, 6),
                "train_rows_meeting": self.real.height}


_CACHE: dict[tuple[int, str], Condition] = {}


def parse_condition(domain, sql: str) -> Condition:
    """Check `sql` against the domain (see the module docstring); cached per domain and text."""
    key = (id(domain), sql)
    if key in _CACHE:
        return _CACHE[key]
    text = " ".join(str(sql).split())
    if not text:
        raise ConditionError("--where: the condition is empty")
    try:
        expr = pl.sql_expr(text)
        names = expr.meta.root_names()
    except Exception as e:  # polars raises several types for a malformed predicate
        raise ConditionError(f"--where {text!r}: cannot parse it as SQL: {_first_line(e)}") from None
    exported = domain.spec.names
    unknown = [c for c in names if c not in exported]
    if unknown:
        raise ConditionError(f"--where {text!r}: unknown column {unknown[0]!r}; the {domain.name} columns are "
                             f"{', '.join(exported)}")
    if not names:
        raise ConditionError(f"--where {text!r}: the condition names no column")
    empty = pl.DataFrame(schema=domain.spec.polars_schema(exported))
    records = domain.load_split("train")
    for frame in (empty, records):
        try:
            out = frame.select(expr.alias("ok"))
        except Exception as e:
            raise ConditionError(f"--where {text!r}: type mismatch: {_first_line(e)}") from None
        if out.schema["ok"] != pl.Boolean:
            raise ConditionError(f"--where {text!r}: the condition gives {out.schema['ok']}, not true/false")
    mask = records.select(expr.fill_null(False).alias("ok"))["ok"]
    real = domain.to_generated(records).hstack(records.drop(domain.spec.generated_names, strict=False)).filter(mask)
    if real.height == 0:
        raise ConditionError(f"--where {text!r}: no real {domain.name} train row meets it, so no record that "
                             f"passes the rules is known to (check the values against `factory domains`)")
    cond = Condition(text, expr, tuple(dict.fromkeys(names)), real, records.height,
                     forced_columns(domain, names, records))
    _CACHE[key] = cond
    return cond


def forced_columns(domain, names: list[str], records: pl.DataFrame) -> tuple[str, ...]:
    """Generated columns whose value a decoder can copy from a drawn real row so that the
    condition holds by construction: the named generated ones (categorical or numeric: a
    numeric condition such as `annual_income > 150000` otherwise cost 12 attempts per record
    with the conditional stage, which only knows the value's train-quantile bin), and for a
    named *derived* categorical the generated categorical with fewest values that determines
    it in the train split (finance: sub_grade determines grade). A named derived numeric
    (installment) cannot be forced: the last check filters it."""
    from schemas.columns import Categorical

    spec, gen = domain.spec, domain.spec.generated_names
    out = []
    for n in names:
        col = spec[n]
        if n in gen:
            out.append(n)
            continue
        if not isinstance(col, Categorical):
            continue
        best = None
        for g in gen:
            if g in records.columns and isinstance(spec[g], Categorical) and \
                    records.group_by(g).agg(pl.col(n).n_unique()).get_column(n).max() == 1:
                if best is None or len(spec[g].values) < len(spec[best].values):
                    best = g
        if best is not None:
            out.append(best)
    return tuple(dict.fromkeys(out))


def _literal(v) -> str:
    return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else "'" + str(v).replace("'", "''") + "'"


def parse_rebalance(domain, text: str) -> tuple[str, list[tuple[object, float]]]:
    """`COL` (equal shares over the column's values) or `COL:value=share,...` (shares summing to 1)."""
    from schemas.columns import Categorical

    column, _, rest = str(text).partition(":")
    column = column.strip()
    if column not in domain.spec.names:
        raise ConditionError(f"--rebalance {text!r}: unknown column {column!r}")
    col = domain.spec[column]
    if not isinstance(col, Categorical):
        raise ConditionError(f"--rebalance {text!r}: {column!r} is numeric; rebalance a categorical column "
                             f"(or use --where)")
    by_text = {str(v): v for v in col.values}
    if not rest.strip():
        return column, [(v, 1.0 / len(col.values)) for v in col.values]
    shares = []
    for part in rest.split(","):
        value, eq, share = part.partition("=")
        value = value.strip()
        if value not in by_text:
            raise ConditionError(f"--rebalance {text!r}: {value!r} is not a value of {column} "
                                 f"({', '.join(by_text)})")
        try:
            s = float(share) if eq else math.nan
        except ValueError:
            s = math.nan
        if not 0 < s <= 1:
            raise ConditionError(f"--rebalance {text!r}: the share of {value!r} must be a number in (0, 1], "
                                 f"got {share.strip() or 'none'!r}")
        shares.append((by_text[value], s))
    if len({v for v, _ in shares}) != len(shares):
        raise ConditionError(f"--rebalance {text!r}: a value is listed twice")
    total = sum(s for _, s in shares)
    if abs(total - 1) > 1e-6:
        raise ConditionError(f"--rebalance {text!r}: the shares sum to {total:g}, not 1")
    return column, shares


def rebalance_plan(domain, text: str, n: int, where: str | None = None) -> list[tuple[str, int]]:
    """One (condition sql, count) per category; counts sum to n (largest remainders), so each
    share is exact to within 1/n."""
    column, shares = parse_rebalance(domain, text)
    raw = [s * n for _, s in shares]
    counts = [math.floor(x) for x in raw]
    for i in sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))[: n - sum(counts)]:
        counts[i] += 1
    plan = []
    for (value, _), k in zip(shares, counts):
        if k == 0:
            raise ConditionError(f"--rebalance {text!r}: -n {n} is too small to give {column} = {value} a record")
        sql = f"{column} = {_literal(value)}" + (f" AND ({where})" if where else "")
        parse_condition(domain, sql)  # every category must be possible
        plan.append((sql, k))
    return plan


def gate_reference(domain, shard_conditions: list[str | None], shard_sizes: list[int]) -> pl.DataFrame | None:
    """The real rows a conditioned run is gated against: the train rows meeting its condition,
    or for several conditions (a rebalance) each condition's rows in the run's shares,
    resampled to the weighted sample's effective size 1 / sum(w_k^2 / m_k) (so the gate's
    sampling bounds stay honest). None for an unconditioned run."""
    if not any(shard_conditions):
        return None
    weight: dict[str, float] = {}
    total = sum(shard_sizes)
    for sql, k in zip(shard_conditions, shard_sizes):
        weight[sql or ""] = weight.get(sql or "", 0.0) + k / total
    real = {sql: (parse_condition(domain, sql).real if sql else domain.load_split("train")) for sql in weight}
    if len(weight) == 1:
        frame = next(iter(real.values()))
    else:
        ess = 1.0 / sum(w * w / real[s].height for s, w in weight.items())
        rng = np.random.default_rng(0)
        parts = []
        for s, w in weight.items():
            m = max(1, round(w * ess))
            rows = real[s]
            idx = rng.choice(rows.height, size=m, replace=m > rows.height)
            parts.append(rows[np.sort(idx)])
        frame = pl.concat(parts)
    return frame.select(domain.spec.names)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
