"""CLI conventions: --version, long forms of short flags, choices in help, --format for scripts."""
import csv
import io
import json

import pytest

from factory import __version__
from helpers import invoke


@pytest.fixture(scope="module")
def toy_db(tmp_path_factory):
    db = tmp_path_factory.mktemp("conv") / "factory.duckdb"
    r = invoke("generate", "-d", "toy", "--rows", 30, "--model", "baseline", "--db", db, "-q")
    assert r.exit_code == 0, r.output
    return db


def test_version():
    r = invoke("--version")
    assert r.exit_code == 0 and r.output.strip() == f"factory {__version__}"


def test_help_lists_choices():
    r = invoke("generate", "--help")
    assert r.exit_code == 0
    for choices in ("[baseline|difflm]", "[local|ray]", "[cpu|cuda|auto]"):
        assert choices in r.output, choices
    assert "--rows" in r.output


def test_runs_checks_rejections_sql_as_csv_and_json(toy_db):
    r = invoke("runs", "--db", toy_db, "--format", "json")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.output.splitlines()]
    assert len(rows) == 1 and rows[0]["accepted"] == 30 and rows[0]["requested_n"] == 30
    run_id = rows[0]["run_id"]

    r = invoke("checks", run_id, "--db", toy_db, "--format", "csv")
    assert r.exit_code == 0, r.output
    checks = list(csv.DictReader(io.StringIO(r.output)))
    assert checks and {"check_name", "statistic", "threshold", "status"} <= set(checks[0])

    r = invoke("rejections", run_id, "--db", toy_db, "--format", "json")
    assert r.exit_code == 0, r.output
    counts = [json.loads(line) for line in r.output.splitlines()]
    assert sum(c["attempts"] for c in counts) >= rows[0]["rejected"] > 0

    r = invoke("sql", "SELECT count(*) AS n FROM toy.records", "--db", toy_db, "--format", "csv")
    assert r.exit_code == 0 and r.output.splitlines() == ["n", "30"], r.output


def test_bad_format_is_one_line(toy_db):
    r = invoke("runs", "--db", toy_db, "--format", "xml")
    assert r.exit_code == 2
    assert r.output.strip() == "error: --format must be one of table, csv, json, got 'xml'"
