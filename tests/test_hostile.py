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

import hashlib
import json
import math
import os
import re
import shutil
import string
from datetime import date
from decimal import Decimal
from pathlib import Path

import duckdb
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factory.domain import DomainError, FrameError, load_domain
from helpers import TOY_DOMAINS, assert_one_line_error, invoke
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
    if domain.latents is not None:  # record columns and latent ones
        real = domain.latents(real)
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
            # an exact Decimal is a float column's export type (--money decimal), judged as that float
            kinds = [k for k in WRONG if k != str(col.dtype) and not (k == "Decimal" and col.dtype.is_float())]
            cols[name] = WRONG[draw(st.sampled_from(kinds))](n).alias(name)
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
        v = finance.validator.validate(row.with_columns(interest_rate=pl.lit(value)))
        assert not v.valid.any() and "interest_rate.range" in v.failures["rule"].to_list()
        v = toy.validator.validate(toy.load_split("train").head(1).with_columns(weight=pl.lit(value)))
        assert not v.valid.any() and set(v.failures["rule"]) == {"weight.range"}


def test_zero_rows(finance):
    empty = finance.spec.empty_frame()
    v = finance.validator.validate(empty)
    assert v.valid.len() == 0 and v.failures.height == 0
    assert finance.complete(finance.to_generated(empty)).columns == finance.spec.names
    # a faulty zero-row frame has no row to fail, but complete() still refuses it
    with pytest.raises(FrameError, match="'loan_amount' is missing"):
        finance.complete(finance.to_generated(empty).drop("loan_amount"))


def test_complete_names_the_faulty_column(finance, toy):
    """Was: a raw polars SchemaError / ColumnNotFoundError out of the domain's derive()."""
    gen = finance.to_generated(finance.load_split("train").head(2))
    with pytest.raises(FrameError, match=r"finance records: column 'sub_grade' is Int64, expected String"):
        finance.complete(gen.with_columns(sub_grade=pl.lit(3, pl.Int64)))
    with pytest.raises(FrameError, match=r"column 'width' is missing; column 'height' is Float64, expected Int64"):
        toy.complete(toy.load_split("train").select(toy.spec.generated_names).drop("width")
                     .with_columns(pl.col("height").cast(pl.Float64)))


def test_first_failure_of_a_faulty_frame_is_the_column_fault(toy):
    df = toy.load_split("train").head(2).drop("label").with_columns(height=pl.lit(99, pl.Int64))
    assert toy.validator.validate(df).first_failure()["rule"].to_list() == ["label.present"] * 2


# ---- 2. malformed domain folders ---------------------------------------------------------------
TOY = TOY_DOMAINS / "toy"


def make_domain(base: Path, name: str, config: str | None = None, edit=lambda src: src) -> Path:
    """A copy of the toy domain named `name` under `base`, reading its settings from config.json
    (text written as given: it may be anything)."""
    folder = base / name
    shutil.copytree(TOY, folder, ignore=shutil.ignore_patterns("__pycache__"))
    src = (folder / "domain.py").read_text()
    for old, new in [('name="toy"', f'name="{name}"'),
                     ('config={"batch_size": 64}', "config=load_config(Path(__file__).parent)"),
                     ("from factory.domain import Domain", "from factory.domain import Domain, load_config")]:
        assert old in src
        src = src.replace(old, new)
    (folder / "domain.py").write_text(edit(src))
    if config is not None:
        (folder / "config.json").write_text(config)
    return folder


@pytest.fixture
def bad_domains(tmp_path, monkeypatch):
    """A folder on FACTORY_DOMAINS_PATH (before the test domains) for broken domains."""
    base = tmp_path / "extra_domains"
    base.mkdir()
    monkeypatch.setenv("FACTORY_DOMAINS_PATH", os.pathsep.join([str(base), os.environ["FACTORY_DOMAINS_PATH"]]))
    return base


@pytest.fixture(scope="module")
def existing_data(tmp_path_factory):
    """A database holding one toy run, and an exported file: what a failed command must not touch."""
    d = tmp_path_factory.mktemp("existing")
    r = invoke("generate", "-d", "toy", "-n", 5, "--model", "baseline", "--db", d / "factory.duckdb",
               "--out", d / "out.csv", "-q")
    assert r.exit_code == 0, r.output
    return d


@pytest.fixture
def stored(existing_data, tmp_path):
    """A fresh copy of the existing data; `unchanged()` says whether every file is byte-identical."""
    d = tmp_path / "data"
    shutil.copytree(existing_data, d)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.iterdir()}

    class Data:
        db, out = d / "factory.duckdb", d / "out.csv"

        @staticmethod
        def unchanged() -> bool:
            return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.iterdir()} == before

    return Data


def _json(obj) -> str:
    return json.dumps(obj, indent=1)


BAD_CONFIGS = [  # (id, config.json text, what the one-line error must say besides the file)
    ("invalid-json", '{"batch_size": 64,\n', "invalid JSON at line 2"),
    ("empty-file", "", "invalid JSON at line 1"),
    ("not-an-object", _json([1, 2]), "must be a JSON object, got list"),
    ("batch-size-text", _json({"batch_size": "abc"}), 'batch_size must be a positive integer, got "abc"'),
    ("batch-size-negative", _json({"batch_size": -5}), "batch_size must be a positive integer, got -5"),
    ("batch-size-zero", _json({"batch_size": 0}), "batch_size must be a positive integer, got 0"),
    ("batch-size-float", _json({"batch_size": 2.5}), "batch_size must be a positive integer, got 2.5"),
    ("batch-size-bool", _json({"batch_size": True}), "batch_size must be a positive integer, got true"),
    ("unknown-key", _json({"bach_size": 64}), "unknown key bach_size (known: default_model, batch_size"),
    ("default-model", _json({"default_model": "gpt"}), 'default_model must be one of baseline, difflm, got "gpt"'),
    ("train-not-object", _json({"train": "fast"}), 'train must be an object of training settings, got "fast"'),
    ("mle-kind", _json({"mle_tasks": [{"name": "w", "target": "width", "kind": "ranking"}]}),
     "mle_tasks[0].kind must be 'regression' or 'classification'"),
    ("gates-not-object", _json({"gates": "strict"}), 'gates must be an object, got "strict"'),
    ("gates-unknown-key", _json({"gates": {"alfa": 0.01}}), "unknown key gates.alfa"),
    ("threshold-negative", _json({"gates": {"thresholds": {"ks:width": -0.1}}}),
     "gates.thresholds.ks:width must be a number >= 0, got -0.1"),
    ("threshold-text", _json({"gates": {"thresholds": {"ks:width": "abc"}}}),
     'gates.thresholds.ks:width must be a number >= 0, got "abc"'),
    ("threshold-nan", '{"gates": {"thresholds": {"tvd:kind": NaN}}}', "gates.thresholds.tvd:kind must be a number"),
    ("coverage-above-1", _json({"gates": {"thresholds": {"coverage:kind": 1.5}}}),
     "gates.thresholds.coverage:kind must be a number in [0, 1], got 1.5"),
    ("thresholds-list", _json({"gates": {"thresholds": [0.1]}}), "gates.thresholds must be an object"),
    ("alpha-zero", _json({"gates": {"alpha": 0}}), "gates.alpha must be a number between 0 and 1, got 0"),
    ("alpha-text", _json({"gates": {"alpha": "0.01"}}), 'gates.alpha must be a number between 0 and 1, got "0.01"'),
    ("min-rows-negative", _json({"gates": {"min_rows": -1}}), "gates.min_rows must be an integer >= 0, got -1"),
    ("near-copy-negative", _json({"gates": {"privacy": {"near_copy_dcr": -1}}}),
     "gates.privacy.near_copy_dcr must be a number >= 0 (or null), got -1"),
    ("privacy-enabled-text", _json({"gates": {"privacy": {"enabled": "yes"}}}),
     'gates.privacy.enabled must be true or false, got "yes"'),
]


@pytest.mark.parametrize("config,message", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_one_clear_line(bad_domains, stored, config, message):
    folder = make_domain(bad_domains, "broken", config)
    where = f"{folder / 'config.json'}: "
    with pytest.raises(DomainError) as e:
        load_domain("broken")
    assert str(e.value).startswith(where) and message in str(e.value), str(e.value)
    assert_one_line_error(invoke("domains"), where, message)
    assert_one_line_error(invoke("generate", "-d", "broken", "-n", 5, "--model", "baseline", "--db", stored.db,
                                 "--out", stored.out, "--force", "-q"), where, message)
    assert_one_line_error(invoke("validate", "-d", "broken", stored.out), where, message)
    assert stored.unchanged()


def test_a_good_config_copy_loads(bad_domains, stored):
    """The control for the cases above: the same copy with valid settings works end to end."""
    make_domain(bad_domains, "fine", _json({"batch_size": 16, "default_model": "baseline",
                                            "gates": {"min_rows": 200, "thresholds": {"ks:width": 0.2}}}))
    assert load_domain("fine").config == {"batch_size": 16, "default_model": "baseline",
                                          "gates": {"min_rows": 200, "thresholds": {"ks:width": 0.2}}}
    r = invoke("domains")
    assert r.exit_code == 0 and "fine  rectangles" in r.output, r.output
    out = stored.out.with_name("fine.csv")
    r = invoke("generate", "-d", "fine", "-n", 5, "--db", stored.db.with_name("other.duckdb"), "--out", out, "-q")
    assert r.exit_code == 0, r.output
    assert pl.read_csv(out).height == 5


MISSING_FILES = [  # (id, how domain.py is changed, what the error says)
    ("sibling-module", lambda s: s.replace("import polars as pl", "import polars as pl\nfrom .schema import SPEC2"),
     "domain.py imports 'schema', but neither {folder}/schema.py nor {folder}/schema/ exists"),
    ("sibling-name", lambda s: s.replace("import polars as pl", "import polars as pl\nfrom . import helpers"),
     "domain.py: cannot import name 'helpers' from 'missing'"),
    ("data-file-at-import", lambda s: s + '\nBANDS = (Path(__file__).parent / "data" / "bands.json").read_text()\n',
     "domain.py reads {folder}/data/bands.json, which does not exist"),
]


@pytest.mark.parametrize("edit,message", [c[1:] for c in MISSING_FILES], ids=[c[0] for c in MISSING_FILES])
def test_missing_file_is_one_clear_line(bad_domains, stored, edit, message):
    folder = make_domain(bad_domains, "missing", edit=edit)
    message = message.format(folder=folder)
    with pytest.raises(DomainError, match=re.escape(message)):
        load_domain("missing")
    assert_one_line_error(invoke("domains"), message)
    assert_one_line_error(invoke("generate", "-d", "missing", "-n", 5, "--model", "baseline", "--db", stored.db,
                                 "-q"), message)
    assert stored.unchanged()


def test_missing_data_file_of_a_split(bad_domains, stored):
    """The domain loads, but its training data is gone: generate stops before touching the database."""
    folder = make_domain(bad_domains, "nodata", edit=lambda s: s.replace(
        "    return _table()[lo:hi]", '    return pl.read_parquet(Path(__file__).parent / "data" / f"{name}.parquet")'))
    assert invoke("domains").exit_code == 0
    assert_one_line_error(invoke("generate", "-d", "nodata", "-n", 5, "--model", "baseline", "--db", stored.db, "-q"),
                          "domain 'nodata': the train split needs a file that does not exist:",
                          "nodata/data/train.parquet")  # polars shortens the start of the path
    assert stored.unchanged()


def test_folder_without_domain_py(bad_domains, stored):
    (bad_domains / "empty").mkdir()
    (bad_domains / "empty" / "config.json").write_text("{}")
    assert_one_line_error(invoke("generate", "-d", "empty", "-n", 5, "--db", stored.db, "-q"),
                          f"{bad_domains / 'empty'} is not a domain: it has no domain.py")
    assert invoke("domains").exit_code == 0  # a folder without domain.py is not listed
    assert stored.unchanged()


def test_domain_name_must_match_its_folder(bad_domains, stored):
    make_domain(bad_domains, "renamed", edit=lambda s: s.replace('name="renamed"', 'name="toy"'))
    message = "domain.py defines a domain named 'toy'; its folder is 'renamed'"
    assert_one_line_error(invoke("domains"), message)
    assert_one_line_error(invoke("generate", "-d", "renamed", "-n", 5, "--model", "baseline", "--db", stored.db,
                                 "-q"), message)
    assert stored.unchanged()


# ---- 3. out-of-range CLI arguments (those test_cli.py does not cover yet) -------------------------
@pytest.mark.parametrize("args,message", [
    (("-n", 5, "--seed", -1), "--seed must be >= 0, got -1"),
    (("-n", 5, "--batch-size", -5), "--batch-size must be positive, got -5"),
    (("-n", 5, "--max-attempts", 0), "--max-attempts must be positive, got 0"),
    (("-n", 5, "--max-attempts", -1), "--max-attempts must be positive, got -1"),
], ids=["seed-negative", "batch-size-negative", "max-attempts-zero", "max-attempts-negative"])
def test_generate_refuses_out_of_range_numbers(tmp_path, args, message):
    db = tmp_path / "f.duckdb"
    assert_one_line_error(invoke("generate", "-d", "toy", "--model", "baseline", "--db", db, "-q", *args), message)
    assert not db.exists()  # refused before anything ran


def test_huge_n_beyond_the_attempt_budget_stops_at_the_budget(tmp_path):
    """10^12 records with a budget of 200 attempts: exit 1 after 200 attempts (nothing sized by n
    is allocated up front), naming the reasons; the run is recorded as failed."""
    db = tmp_path / "f.duckdb"
    r = invoke("generate", "-d", "toy", "--model", "baseline", "-n", 10**12, "--max-attempts", 200, "--shards", 1,
               "--db", db, "-q")
    assert_one_line_error(r, "attempt budget exhausted", "of 1,000,000,000,000 records after 200 attempts",
                          "kind_matches_area", code=1)
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT status, requested_n, attempted FROM runs").fetchall() == [("failed", 10**12, 200)]


def _run_id(db: Path) -> str:
    return duckdb.connect(str(db), read_only=True).execute("SELECT run_id FROM runs").fetchall()[0][0]


def test_export_and_evaluate_to_a_bad_place(stored, tmp_path):
    run_id = _run_id(stored.db)
    missing = tmp_path / "no" / "such"
    assert_one_line_error(invoke("export", run_id, "--out", missing / "x.csv", "--db", stored.db),
                          f"directory {missing} does not exist")
    assert_one_line_error(invoke("export", run_id, "--out", tmp_path, "--db", stored.db), "unknown extension ''")
    assert_one_line_error(invoke("export", run_id, "--out", stored.out, "--db", stored.db), "--force")
    assert_one_line_error(invoke("evaluate", run_id, "--out", missing / "m.json", "--db", stored.db),
                          f"directory {missing} does not exist")
    assert not missing.parent.exists() and stored.unchanged()


@pytest.mark.parametrize("value,code,fragment", [
    ("nan", 1, "weight.range"), ("inf", 1, "weight.range"), ("-inf", 1, "weight.range"),
    ("1e400", 1, "weight.range"),  # parses as inf
], ids=["nan", "inf", "-inf", "overflow"])
def test_validate_file_with_non_finite_numbers(tmp_path, value, code, fragment):
    path = tmp_path / "x.csv"
    path.write_text(f"kind,width,height,label,weight,area\nsmall,2,3,a,{value},6\nsmall,2,3,a,1.0,6\n")
    r = invoke("validate", "-d", "toy", path)
    text = " ".join(r.output.split())
    assert r.exit_code == code and "1 of 2 rows violate a rule" in text and fragment in text, r.output
    assert "weight.decimals" not in text  # was also reported: a NaN or inf is out of range, not badly rounded


@pytest.mark.parametrize("value", ["99999999999999999999", "NaN", "1e3", "2.0"])
def test_validate_file_with_unreadable_integers(tmp_path, value):
    path = tmp_path / "x.csv"
    path.write_text(f"kind,width,height,label,weight,area\nsmall,{value},3,a,1.0,6\n")
    assert_one_line_error(invoke("validate", "-d", "toy", path), "column 'width' cannot be read as Int64")


# Out-of-range arguments that used to end in a traceback.
@pytest.mark.parametrize("args", [("-n", 5, "--seed", 2**63), ("-n", 2**63), ("-n", 5, "--batch-size", 2**63)],
                         ids=["seed", "n", "batch-size"])
def test_numbers_beyond_int64_are_one_line(tmp_path, args):
    """Was: a duckdb.ConversionException traceback (exit 1) when the run is stored as BIGINT."""
    r = invoke("generate", "-d", "toy", "--model", "baseline", "--db", tmp_path / "f.duckdb", "-q", *args)
    assert_one_line_error(r, "must be")


def test_negative_examples_is_one_line(stored):
    """Was: a duckdb.BinderException traceback (LIMIT -1)."""
    assert_one_line_error(invoke("rejections", _run_id(stored.db), "--examples", -1, "--db", stored.db), "--examples")


def test_negative_max_rows_is_one_line(stored):
    """Was: exit 0, no row shown, and '... 2 more rows not shown' for a one-row result."""
    assert_one_line_error(invoke("sql", "SELECT 1 AS x", "--max-rows", -1, "--db", stored.db), "--max-rows")


def test_database_named_after_the_domain(tmp_path):
    """Was: a duckdb.BinderException 'Ambiguous reference to catalog or schema "toy"' traceback."""
    db = tmp_path / "toy.duckdb"
    r = invoke("generate", "-d", "toy", "--model", "baseline", "-n", 5, "--db", db, "-q")
    assert_one_line_error(r, "named after the domain")
    assert not db.exists()  # refused before the file is created
