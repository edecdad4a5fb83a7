"""Hostile input (issue #7 item 4): the validator, domain config files and CLI arguments.

The parser has its own fuzz tests (tests/test_serializer.py). Here:
1. the validator (after `Domain.complete`) gets arbitrary polars frames: nulls, NaN, inf,
   huge and negative numbers, empty strings, unknown categories, wrong dtypes, missing and
   extra columns, zero rows. It never crashes: every failing row carries a stage, a rule name
   and a message, and a row is valid exactly when an independent oracle says it passes.
   A frame `complete` cannot work on (a generated column missing or wrongly typed) is a
   `FrameError` naming the column;
2. malformed domain folders (config.json, missing files) give one clear error naming the
   file and the field, and the CLI exits 2 with one line and touches no data;
3. out-of-range CLI arguments.
"""
from __future__ import annotations

import math
import string
from datetime import date
from decimal import Decimal

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factory.domain import FrameError
from schemas.columns import Categorical, Numeric

FUZZ = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
HOSTILE_INTS = [None, 0, -1, -5, 1, 36, 60, 100, 2**31, -(2**31), 2**53 + 1, INT64_MIN, INT64_MAX]
HOSTILE_FLOATS = [None, math.nan, math.inf, -math.inf, 0.0, -0.0, 5e-324, 1e-300, 1e308, -1e308, 0.1 + 0.2,
                  12.345, 1 / 3, 2.0**53, -0.01]
HOSTILE_STRINGS = [None, "", " ", "null", "None", "NaN", "0", "A1 ", "large ", "LARGE", "é", "\x00", "x" * 300,
                   "Fully Paid\n", "joint"]


def _cell(col):
    """Any value of the column's own dtype: valid ones, edge cases and garbage."""
    if isinstance(col, Numeric):
        if col.decimals == 0:
            edge = [int(col.lo) - 1, int(col.lo), int(col.hi), int(col.hi) + 1]
            return st.one_of(st.sampled_from(HOSTILE_INTS + edge), st.integers(INT64_MIN, INT64_MAX),
                             st.integers(int(col.lo), int(col.hi)))
        edge = [col.lo - 10**-col.decimals, col.lo, col.hi, col.hi + 10**-col.decimals]
        return st.one_of(st.sampled_from(HOSTILE_FLOATS + edge), st.floats(allow_nan=True, allow_infinity=True),
                         st.integers(col.int_lo, col.int_hi).map(lambda i, k=col.scale: i / k))
    if col.is_int:
        return st.one_of(st.sampled_from(HOSTILE_INTS + list(col.values)), st.integers(INT64_MIN, INT64_MAX))
    return st.one_of(st.sampled_from(HOSTILE_STRINGS + list(col.values)), st.text(max_size=8))


# Columns of a dtype other than the spec's: (dtype, how to make n values of it).
WRONG = {
    "Int32": lambda n: pl.Series([7] * n, dtype=pl.Int32),
    "UInt64": lambda n: pl.Series([2**64 - 1] * n, dtype=pl.UInt64),
    "Float32": lambda n: pl.Series([1.5] * n, dtype=pl.Float32),
    "Float64": lambda n: pl.Series([10.0] * n, dtype=pl.Float64),
    "Int64": lambda n: pl.Series([1] * n, dtype=pl.Int64),
    "String": lambda n: pl.Series(["12"] * n, dtype=pl.String),
    "Boolean": lambda n: pl.Series([True] * n, dtype=pl.Boolean),
    "Null": lambda n: pl.Series([None] * n, dtype=pl.Null),
    "Date": lambda n: pl.Series([date(2018, 1, 1)] * n, dtype=pl.Date),
    "List": lambda n: pl.Series([[1, 2]] * n, dtype=pl.List(pl.Int64)),
    "Struct": lambda n: pl.Series([{"a": 1}] * n),
    "Categorical": lambda n: pl.Series(["a"] * n, dtype=pl.Categorical),
    "Decimal": lambda n: pl.Series([Decimal("1.50")] * n, dtype=pl.Decimal(10, 2)),
    "Binary": lambda n: pl.Series([b"\x00"] * n, dtype=pl.Binary),
    "Object": lambda n: pl.Series([object()] * n, dtype=pl.Object),
}


@st.composite
def hostile_frames(draw, domain, names):
    """A frame meant to have the columns `names`: real rows with some cells replaced by hostile
    values and, in a third of the frames, some columns dropped, retyped or added.
    Returns (frame, missing columns, extra columns, wrongly typed columns)."""
    real = domain.load_split("train")
    n = draw(st.sampled_from([0, 1, 2, 3, 5, 8]))
    rows = draw(st.lists(st.integers(0, real.height - 1), min_size=n, max_size=n))
    df = real[rows].select(names)
    missing, wrong, extra = [], [], []
    if draw(st.sampled_from([False, False, True])):
        faulty = draw(st.lists(st.sampled_from(names), max_size=3, unique=True))
        missing = [c for c in faulty if draw(st.booleans())]
        wrong = [c for c in faulty if c not in missing]
        extra = draw(st.lists(st.text(string.ascii_lowercase + "_.", min_size=1, max_size=6)
                              .filter(lambda s: s not in domain.spec.names), max_size=2, unique=True))
        if not (missing or wrong or extra):
            extra = ["extra"]
    mangled = draw(st.lists(st.sampled_from(names), min_size=1, max_size=4, unique=True))
    cols = {}
    for name in names:
        col = domain.spec[name]
        if name in missing:
            continue
        if name in wrong:
            cols[name] = WRONG[draw(st.sampled_from([k for k in WRONG if k != str(col.dtype)]))](n).alias(name)
            continue
        values = df[name].to_list()
        if name in mangled:
            for i in range(n):
                if draw(st.booleans()):
                    values[i] = draw(_cell(col))
        cols[name] = pl.Series(name, values, dtype=col.dtype)
    for name in extra:
        cols[name] = WRONG[draw(st.sampled_from(sorted(WRONG)))](n).alias(name)
    order = draw(st.permutations(list(cols)))
    return pl.DataFrame([cols[k] for k in order], height=n), missing, extra, wrong


def oracle(domain, df: pl.DataFrame) -> list[bool]:
    """Row passes every schema check and every rule: computed cell by cell, without Pandera."""
    ok = [True] * df.height
    for col in domain.spec.columns:
        for i, v in enumerate(df[col.name].to_list()):
            if v is None:
                good = col.nullable
            elif isinstance(col, Numeric):
                good = (math.isfinite(v) and col.lo <= v <= col.hi
                        and (col.decimals == 0 or abs(v - round(v, col.decimals)) < 1e-9))
            else:
                good = v in col.values
            ok[i] = ok[i] and good
    for rule in domain.rules:
        passed = df.select(rule.expr.fill_null(False)).to_series().to_list()
        ok = [a and bool(b) for a, b in zip(ok, passed)]
    return ok


def check_validation(domain, df: pl.DataFrame, missing=(), extra=(), wrong=()):
    """The required property of Validator.validate on any frame."""
    v = domain.validator.validate(df)
    n = df.height
    assert v.valid.dtype == pl.Boolean and v.valid.len() == n and v.valid.null_count() == 0
    f = v.failures
    assert set(f.columns) >= {"row", "stage", "rule", "message"}
    assert f.select(pl.col("row", "stage", "rule", "message").null_count()).row(0) == (0, 0, 0, 0)
    for r in f.iter_rows(named=True):
        assert 0 <= r["row"] < n
        assert r["stage"] in ("schema", "rule")
        assert r["rule"].strip() and r["message"].strip()
        assert "None" not in r["rule"]
        if r["stage"] == "rule":
            assert r["rule"] in {x.name for x in domain.rules}
        else:
            col = r["rule"].rsplit(".", 1)[0]
            assert col in domain.spec.names or col in extra, r
    failing = set(f["row"].to_list())
    assert v.valid.to_list() == [i not in failing for i in range(n)]
    assert v.first_failure().height == len(failing)
    if missing or extra or wrong:  # a structural fault fails every row, and names its column
        assert not v.valid.any()
        for i in range(n):
            rules = set(f.filter(pl.col("row") == i)["rule"].to_list())
            assert {f"{c}.present" for c in missing} <= rules
            assert {f"{c}.unexpected" for c in extra} <= rules
            assert {f"{c}.dtype" for c in wrong} <= rules
    else:
        assert v.valid.to_list() == oracle(domain, df)
    return v


@pytest.mark.parametrize("name", ["toy", "finance"])
@FUZZ
@given(data=st.data())
def test_validator_on_hostile_full_frames(request, name, data):
    domain = request.getfixturevalue(name)
    df, missing, extra, wrong = data.draw(hostile_frames(domain, domain.spec.names))
    check_validation(domain, df, missing, extra, wrong)


@pytest.mark.parametrize("name", ["toy", "finance"])
@FUZZ
@given(data=st.data())
def test_complete_then_validate_on_hostile_frames(request, name, data):
    """As the loop does: generated columns -> complete -> validate."""
    domain = request.getfixturevalue(name)
    gen = domain.spec.generated_names
    df, missing, extra, wrong = data.draw(hostile_frames(domain, gen))
    if missing or wrong:
        with pytest.raises(FrameError) as e:
            domain.complete(df)
        assert any(repr(c) in str(e.value) for c in missing + wrong), str(e.value)
        return
    full = domain.complete(df)  # extra columns are dropped
    assert full.columns == domain.spec.names
    check_validation(domain, full)


# ---- regressions found by the fuzz above ----------------------------------------------------------
def _failures(domain, df):
    v = domain.validator.validate(df)
    return v, {(r["row"], r["stage"], r["rule"], r["message"]) for r in v.failures.iter_rows(named=True)}


def test_missing_and_extra_columns_are_named(toy):
    """Was: rule 'None.column_in_dataframe' / 'None.column_in_schema' (message the same), and
    every rule reading the missing column reported as broken (its ColumnNotFoundError)."""
    df = toy.load_split("train").head(2).drop("width").with_columns(colour=pl.lit("red"))
    v, got = _failures(toy, df)
    assert v.valid.to_list() == [False, False]
    assert got == {(i, "schema", rule, msg) for i in (0, 1) for rule, msg in [
        ("width.present", "column width is missing"),
        ("colour.unexpected", "column colour is not a column of this table")]}


@pytest.mark.parametrize("column", ["blob", "label"])
@pytest.mark.parametrize("values", [[b"a", b"b"], [object(), object()]], ids=["Binary", "Object"])
def test_exotic_dtype_next_to_a_row_failure_does_not_crash(toy, column, values):
    """Was: pyo3_runtime.PanicException 'Writing BinaryView to JSON' (Binary) and TypeError 'nested
    objects are not allowed' (Object) out of Pandera's failure report, as soon as another check failed."""
    df = toy.load_split("train").head(2).with_columns(pl.Series(column, values), height=pl.lit(99, pl.Int64))
    v, got = _failures(toy, df)
    assert not v.valid.any()
    fault = "blob.unexpected" if column == "blob" else "label.dtype"
    assert {(i, "schema", fault) for i in (0, 1)} | {(i, "schema", "height.range") for i in (0, 1)} <= {
        (row, stage, rule) for row, stage, rule, _ in got}


def test_wrong_dtype_fails_every_row_but_other_checks_still_run(toy):
    df = toy.load_split("train").head(3).with_columns(
        pl.col("width").cast(pl.Int32), height=pl.Series([5, 99, 5]))
    v, got = _failures(toy, df)
    assert not v.valid.any()
    assert {(i, "schema", "width.dtype", "width must be of type Int64, got Int32") for i in range(3)} <= got
    assert (1, "schema", "height.range", "height must lie in [1, 20]") in got
    assert not any(rule == "kind_matches_area" for _, _, rule, _ in got)  # reads width: not evaluated


def test_nan_and_inf_never_pass(finance, toy):
    row = finance.load_split("train").head(1)
    for value in (math.nan, math.inf, -math.inf):
        assert not finance.validator.validate(row.with_columns(interest_rate=pl.lit(value))).valid.any()
        assert not toy.validator.validate(toy.load_split("train").head(1).with_columns(
            weight=pl.lit(value))).valid.any()


def test_zero_rows(finance):
    empty = finance.spec.empty_frame()
    v = finance.validator.validate(empty)
    assert v.valid.len() == 0 and v.failures.height == 0
    assert finance.complete(empty.select(finance.spec.generated_names)).columns == finance.spec.names
    # a faulty zero-row frame has no row to fail, but complete() still refuses it
    with pytest.raises(FrameError, match="'loan_amount' is missing"):
        finance.complete(empty.select(finance.spec.generated_names).drop("loan_amount"))


def test_complete_names_the_faulty_column(finance, toy):
    """Was: a raw polars SchemaError / ColumnNotFoundError out of the domain's derive()."""
    gen = finance.load_split("train").head(2).select(finance.spec.generated_names)
    with pytest.raises(FrameError, match=r"finance records: column 'sub_grade' is Int64, expected String"):
        finance.complete(gen.with_columns(sub_grade=pl.lit(3, pl.Int64)))
    with pytest.raises(FrameError, match=r"column 'width' is missing; column 'height' is Float64, expected Int64"):
        toy.complete(toy.load_split("train").select(toy.spec.generated_names).drop("width")
                     .with_columns(pl.col("height").cast(pl.Float64)))


def test_first_failure_of_a_faulty_frame_is_the_column_fault(toy):
    df = toy.load_split("train").head(2).drop("label").with_columns(height=pl.lit(99, pl.Int64))
    assert toy.validator.validate(df).first_failure()["rule"].to_list() == ["label.present"] * 2
