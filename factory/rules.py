"""Named rules and vectorized validation of a batch with Pandera (polars backend).

Two stages are told apart, as the rejections table records them:
- "schema": a column's own type, range, category or nullability;
- "rule": a cross-field domain rule (a `Rule`).
Each failure carries a stable rule name and a human message.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import pandera.polars as pa
import polars as pl
from pandera.api.polars.types import PolarsData

from schemas.columns import Categorical, Numeric, TableSpec


@dataclass(frozen=True, eq=False)
class Rule:
    """A cross-field rule: `expr` is True for every row that passes."""

    name: str
    message: str
    expr: pl.Expr


def _rule_check(rule: Rule) -> pa.Check:
    def check(data: PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(rule.expr.fill_null(False).alias(rule.name))

    return pa.Check(check, error=rule.name, name=rule.name)


def column_rule_names(col) -> dict[str, str]:
    """Stable names + messages of the schema-stage checks of one column."""
    out = {f"{col.name}.dtype": f"{col.name} must be of type {col.dtype}"}
    if not col.nullable:
        out[f"{col.name}.not_null"] = f"{col.name} must not be null"
    if isinstance(col, Numeric):
        out[f"{col.name}.range"] = f"{col.name} must lie in [{col.lo}, {col.hi}]"
        if col.decimals:
            out[f"{col.name}.decimals"] = f"{col.name} must have at most {col.decimals} decimals"
    else:
        out[f"{col.name}.category"] = f"{col.name} must be one of {list(col.values)}"
    return out


def build_schema(spec: TableSpec, rules: list[Rule]) -> pa.DataFrameSchema:
    columns = {}
    for c in spec.columns:
        if isinstance(c, Numeric):
            checks = [pa.Check.in_range(c.lo, c.hi, error=f"{c.name}.range")]
            if c.decimals:
                checks.append(pa.Check(
                    lambda d, n=c.name, k=c.decimals: d.lazyframe.select(((pl.col(n) - pl.col(n).round(k)).abs() < 1e-9)),
                    error=f"{c.name}.decimals"))
        else:
            checks = [pa.Check.isin(list(c.values), error=f"{c.name}.category")]
        columns[c.name] = pa.Column(c.dtype, checks=checks, nullable=c.nullable)
    return pa.DataFrameSchema(columns, checks=[_rule_check(r) for r in rules], strict=True, ordered=False)


@dataclass
class Validation:
    """Outcome of validating a batch: which rows pass, and every failure of the others."""

    valid: pl.Series  # bool per row
    failures: pl.DataFrame  # row (int), stage, rule, message — all failures, several per row possible

    @property
    def n_valid(self) -> int:
        return int(self.valid.sum())

    def first_failure(self) -> pl.DataFrame:
        """One reason per rejected row: the first schema failure, else the first rule failure."""
        return self.failures.sort(["row", "stage_order", "rule_order"]).group_by("row", maintain_order=True).first()


class Validator:
    def __init__(self, spec: TableSpec, rules: list[Rule]):
        self.spec, self.rules = spec, rules
        self.schema = build_schema(spec, rules)
        self.messages = {r.name: r.message for r in rules}
        self.rule_order = {r.name: i for i, r in enumerate(rules)}
        for i, c in enumerate(spec.columns):
            for k, (name, msg) in enumerate(column_rule_names(c).items()):
                self.messages[name] = msg
                self.rule_order[name] = i * 10 + k

    def validate(self, df: pl.DataFrame) -> Validation:
        n = df.height
        empty = pl.DataFrame(schema={"row": pl.Int64, "stage": pl.String, "rule": pl.String, "message": pl.String,
                                     "stage_order": pl.Int64, "rule_order": pl.Int64})
        try:
            self.schema.validate(df, lazy=True)
            return Validation(pl.Series("valid", [True] * n, dtype=pl.Boolean), empty)
        except pa.errors.SchemaErrors as e:
            fc = e.failure_cases
        except pa.errors.SchemaError as e:  # non-lazy structural errors
            raise ValueError(str(e)) from None
        rows = []
        for r in fc.iter_rows(named=True):
            idx, check, column = r["index"], r["check"] or "", r["column"]
            if r["schema_context"] == "DataFrameSchema" and check in self.rule_order and column is None:
                stage, name = "rule", check
            else:
                stage = "schema"
                if check == "not_nullable":
                    name = f"{column}.not_null"
                elif check.startswith("dtype(") or check == "column_in_dataframe" or check == "column_in_schema":
                    name = f"{column}.dtype" if check.startswith("dtype(") else f"{column}.{check}"
                else:
                    name = check
            if idx is None:  # a whole-column failure (dtype, missing column): every row fails
                for i in range(n):
                    rows.append((i, stage, name))
            else:
                rows.append((int(idx), stage, name))
        failures = pl.DataFrame(rows, schema={"row": pl.Int64, "stage": pl.String, "rule": pl.String}, orient="row").unique(maintain_order=True)
        failures = failures.with_columns(
            message=pl.col("rule").replace_strict(self.messages, default=pl.col("rule")),
            stage_order=(pl.col("stage") == "rule").cast(pl.Int64),
            rule_order=pl.col("rule").replace_strict(self.rule_order, default=10**6, return_dtype=pl.Int64),
        )
        bad = set(failures["row"].to_list())
        valid = pl.Series("valid", [i not in bad for i in range(n)], dtype=pl.Boolean)
        return Validation(valid, failures)


def rule_set_hash(spec: TableSpec, rules: list[Rule]) -> str:
    payload = json.dumps({"spec": spec.to_json(), "rules": [[r.name, r.message, str(r.expr)] for r in rules]},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
