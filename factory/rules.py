"""Named rules and vectorized validation of a batch with Pandera (polars backend).

Two stages are told apart, as the rejections table records them:
- "schema": a column's own type, range, category or nullability;
- "rule": a cross-field domain rule (a `Rule`).
Each failure carries a stable rule name and a human message.

A frame whose columns do not match the spec is not an error either: every row fails,
with one schema-stage failure per faulty column — `<col>.present` (the column is
missing), `<col>.unexpected` (a column the spec does not have) or `<col>.dtype` (a
column of another dtype). Checks that cannot run on such a frame (a rule reading a
missing column) are not reported as broken; the checks that can run still are.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from typing import TYPE_CHECKING

import polars as pl

if TYPE_CHECKING:  # pandera (and with it pandas) loads on first validation, so the CLI starts fast
    import pandera.polars as pa
    from pandera.api.polars.types import PolarsData

from schemas.columns import Numeric, TableSpec


@dataclass(frozen=True, eq=False)
class Rule:
    """A cross-field rule: `expr` is True for every row that passes."""

    name: str
    message: str
    expr: pl.Expr


def _rule_check(rule: Rule) -> pa.Check:
    import pandera.polars as pa

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
    import pandera.polars as pa

    columns = {}
    for c in spec.columns:
        if isinstance(c, Numeric):
            checks = [pa.Check.in_range(c.lo, c.hi, error=f"{c.name}.range")]
            if c.decimals:
                # NaN and inf are the range check's to report (they fail it), not a question of decimals
                checks.append(pa.Check(
                    lambda d, n=c.name, k=c.decimals: d.lazyframe.select(
                        ((pl.col(n) - pl.col(n).round(k)).abs() < 1e-9) | ~pl.col(n).is_finite()),
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

    def structure_faults(self, df: pl.DataFrame) -> dict[str, str]:
        """Rule name -> message of each column fault: missing, unexpected or of another dtype."""
        spec_dtypes = self.spec.polars_schema()
        faults = {f"{name}.present": f"column {name} is missing" for name in spec_dtypes if name not in df.columns}
        for name, dtype in df.schema.items():
            if name not in spec_dtypes:
                faults[f"{name}.unexpected"] = f"column {name} is not a column of this table"
            elif dtype != spec_dtypes[name]:
                faults[f"{name}.dtype"] = f"{self.messages[f'{name}.dtype']}, got {dtype}"
        return faults

    def validate(self, df: pl.DataFrame) -> Validation:
        import pandera.polars as pa

        # an export's exact decimals (the default, `--money decimal`) are judged as the spec's floats
        spec_dtypes = self.spec.polars_schema()
        df = df.with_columns(pl.col(name).cast(spec_dtypes[name]) for name, dtype in df.schema.items()
                             if isinstance(dtype, pl.Decimal) and name in spec_dtypes and spec_dtypes[name].is_float())
        n = df.height
        faults = self.structure_faults(df)
        rows = [(i, "schema", name) for name in faults for i in range(n)]  # a column fault fails every row
        # Pandera sees only the columns of the spec's dtypes: others can crash it (polars panics
        # writing a Binary failure case to JSON), and their faults are already named above.
        bad = [name.rsplit(".", 1)[0] for name in faults if not name.endswith(".present")]
        try:
            self.schema.validate(df.drop(bad), lazy=True)
            fc = None
        except pa.errors.SchemaErrors as e:
            fc = e.failure_cases
        except pa.errors.SchemaError as e:  # pandera gave up before checking values: only a column fault does that
            if not faults:
                raise ValueError(f"pandera rejected a frame with the spec's columns and dtypes: {e}") from None
            fc = None
        for r in ([] if fc is None else fc.iter_rows(named=True)):
            idx, check, column = r["index"], r["check"] or "", r["column"]
            if check.startswith("dtype(") or check in ("column_in_dataframe", "column_in_schema"):
                continue  # column faults are found above, each named after its column
            if idx is None and faults:
                continue  # a check that could not run on a faulty frame (e.g. it reads a missing column)
            if r["schema_context"] == "DataFrameSchema" and check in self.rule_order and column is None:
                stage, name = "rule", check
            else:
                stage = "schema"
                name = f"{column}.not_null" if check == "not_nullable" else check
            if idx is None:  # a check that raised on a well-formed frame: it fails every row
                rows.extend((i, stage, name) for i in range(n))
            else:
                rows.append((int(idx), stage, name))
        if not rows:
            empty = pl.DataFrame(schema={"row": pl.Int64, "stage": pl.String, "rule": pl.String,
                                         "message": pl.String, "stage_order": pl.Int64, "rule_order": pl.Int64})
            return Validation(pl.Series("valid", [True] * n, dtype=pl.Boolean), empty)
        failures = pl.DataFrame(rows, schema={"row": pl.Int64, "stage": pl.String, "rule": pl.String}, orient="row").unique(maintain_order=True)
        failures = failures.with_columns(
            message=pl.col("rule").replace_strict({**self.messages, **faults}, default=pl.col("rule")),
            stage_order=(pl.col("stage") == "rule").cast(pl.Int64),
            rule_order=pl.col("rule").replace_strict({**self.rule_order, **dict.fromkeys(faults, -1)},  # faults first
                                                     default=10**6, return_dtype=pl.Int64),
        )
        bad = set(failures["row"].to_list())
        valid = pl.Series("valid", [i not in bad for i in range(n)], dtype=pl.Boolean)
        return Validation(valid, failures)


def rule_set_hash(spec: TableSpec, rules: list[Rule]) -> str:
    payload = json.dumps({"spec": spec.to_json(), "rules": [[r.name, r.message, str(r.expr)] for r in rules]},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
