import json
import os
import subprocess
import sys

import duckdb
import polars as pl
import pytest
from typer.testing import CliRunner

from factory.cli import app
from factory.store import Store
from helpers import assert_one_line_error, invoke


@pytest.fixture
def db(tmp_path):
    return tmp_path / "factory.duckdb"


@pytest.mark.slow  # ~100k baseline attempts: 10-20 s on 2 cores
def test_generate_finance_then_validate(tmp_path, db, finance):
    out = tmp_path / "x.parquet"
    # The marginal baseline breaks relations between columns: its records fail the distribution
    # gate (tests/test_gates.py covers that); --allow-drift exports them anyway.
    r = invoke("generate", "--domain", "finance", "-n", 2000, "--model", "baseline", "--seed", 1,
               "--out", out, "--db", db, "--quiet", "--allow-drift")
    assert r.exit_code == 0, r.output
    assert "2,000 of 2,000" in r.output and "interest_rate_in_sub_grade_band" in r.output
    df = pl.read_parquet(out)
    assert df.height == 2000 and df.columns == finance.spec.names

    r = invoke("validate", "--domain", "finance", out)
    assert r.exit_code == 0, r.output

    with Store(db, read_only=True) as s:
        run = s.runs().row(0, named=True)
        assert (run["accepted"], run["status"], run["model_id"]) == (2000, "succeeded", "baseline")
        rejected_ids = s.frame("SELECT count(DISTINCT attempt_id) AS n FROM rejections").item()
        assert run["rejected"] == rejected_ids == run["attempted"] - 2000
        stored = s.records(finance, run["run_id"])
    assert stored.equals(df)


def test_validate_reports_violations(tmp_path, finance):
    path = tmp_path / "bad.csv"
    df = finance.load_split("val").head(20).with_columns(
        grade=pl.when(pl.int_range(20) < 3).then(pl.lit("G")).otherwise(pl.col("grade")),
        state=pl.when(pl.int_range(20) == 5).then(pl.lit("XX")).otherwise(pl.col("state")))
    df.write_csv(path)
    r = invoke("validate", "-d", "finance", path)
    assert r.exit_code == 1, r.output
    assert "4 of 20 rows" in r.output
    row = next(line for line in r.output.splitlines() if "grade_matches_sub_grade" in line)
    assert row.split()[0] == "rule" and row.split()[-1] == "3"
    assert "state.category" in r.output


def test_toy_domain_through_cli(tmp_path, db):
    """The test-only domain, found via FACTORY_DOMAINS_PATH, runs through the same commands."""
    r = invoke("domains")
    assert r.exit_code == 0 and "toy" in r.output and "kind_matches_area" in r.output and "finance" in r.output
    out = tmp_path / "toy.csv"
    r = invoke("generate", "-d", "toy", "-n", 300, "--model", "baseline", "--out", out, "--db", db, "-q")
    assert r.exit_code == 0, r.output
    assert pl.read_csv(out).height == 300
    assert invoke("validate", "-d", "toy", out).exit_code == 0

    r = invoke("runs", "--db", db)
    assert r.exit_code == 0 and "toy-" in r.output and "succeeded" in r.output
    run_id = duckdb.connect(str(db), read_only=True).execute("SELECT run_id FROM runs").fetchall()[0][0]
    r = invoke("rejections", run_id, "--db", db)
    assert r.exit_code == 0 and "kind_matches_area" in r.output and "kind: " in r.output
    r = invoke("sql", "SELECT model_id, count(*) AS n FROM toy.lineage GROUP BY ALL", "--db", db)
    assert r.exit_code == 0 and "baseline" in r.output and "300" in r.output
    r = invoke("export", run_id, "--out", tmp_path / "again.parquet", "--db", db)
    assert r.exit_code == 0 and pl.read_parquet(tmp_path / "again.parquet").equals(
        pl.read_csv(out, schema_overrides={"weight": pl.Float64}))


def test_same_seed_same_file(tmp_path, db):
    paths = [tmp_path / f"{k}.parquet" for k in "abc"]
    for p, seed in zip(paths, (3, 3, 4)):
        assert invoke("generate", "-d", "toy", "-n", 50, "--model", "baseline", "--seed", seed, "--out", p,
                      "--db", db, "-q").exit_code == 0
    a, b, c = (pl.read_parquet(p) for p in paths)
    assert a.equals(b) and not a.equals(c)


# ---- user mistakes: one red line, exit 2, no traceback ----------------------------------------
def test_generate_mistakes(tmp_path, db):
    base = ["generate", "-d", "toy", "--model", "baseline", "--db", db, "-q"]
    assert_one_line_error(invoke("generate", "-d", "nope", "-n", 5), "unknown domain 'nope'", "finance", "toy")
    assert_one_line_error(invoke(*base, "-n", 0), "-n must be a positive")
    assert_one_line_error(invoke(*base, "-n", -3), "-n must be a positive")
    assert_one_line_error(invoke(*base, "-n", 5, "--batch-size", 0), "--batch-size")
    assert_one_line_error(invoke("generate", "-d", "toy", "-n", 5, "--model", "gpt", "--db", db), "unknown model 'gpt'")
    assert_one_line_error(invoke(*base, "-n", 5, "--out", tmp_path / "no" / "x.csv"), "does not exist")
    assert_one_line_error(invoke(*base, "-n", 5, "--out", tmp_path / "x.xlsx"), "unknown extension")
    (tmp_path / "exists.csv").write_text("x")
    assert_one_line_error(invoke(*base, "-n", 5, "--out", tmp_path / "exists.csv"), "--force")
    assert not db.exists()  # nothing ran


def test_difflm_without_a_stack_is_a_clear_error(db, tmp_path):
    missing, empty = tmp_path / "nowhere", tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(invoke("generate", "-d", "finance", "-n", 5, "--db", db, "--model-dir", missing),
                          "no trained DiffLM stack at", "factory train --domain finance", "--model baseline")
    assert_one_line_error(invoke("generate", "-d", "finance", "-n", 5, "--db", db, "--model-dir", empty),
                          "missing", "factory train --domain finance", "--model baseline")
    assert_one_line_error(invoke("generate", "-d", "toy", "-n", 5, "--db", db, "--model-dir", empty),
                          "--model-dir applies to --model difflm only")


def test_attempt_budget_exit(db):
    r = invoke("generate", "-d", "toy", "-n", 1000, "--model", "baseline", "--max-attempts", 50, "--db", db, "-q")
    assert_one_line_error(r, "accepted", "of 1,000", "kind_matches_area", code=1)
    with Store(db, read_only=True) as s:
        assert s.runs()["status"].to_list() == ["failed"]


def test_bad_databases(tmp_path):
    junk = tmp_path / "junk.duckdb"
    junk.write_bytes(os.urandom(5000))
    old = tmp_path / "old.duckdb"
    Store(old).close()
    con = duckdb.connect(str(old))
    con.execute("UPDATE meta SET value = '0'")
    con.close()
    for cmd in (["runs", "--db"], ["sql", "SELECT 1", "--db"],
                ["generate", "-d", "toy", "-n", 3, "--model", "baseline", "-q", "--db"]):
        assert_one_line_error(invoke(*cmd, junk), "not a valid DuckDB database")
        assert_one_line_error(invoke(*cmd, old), "schema version 0")
    assert_one_line_error(invoke("runs", "--db", tmp_path / "missing.duckdb"), "no database at")


def test_validate_mistakes(tmp_path):
    assert_one_line_error(invoke("validate", "-d", "toy", tmp_path / "missing.csv"), "no such file")
    path = tmp_path / "cols.csv"
    pl.DataFrame({"kind": ["small"], "width": [1], "bogus": [1]}).write_csv(path)
    assert_one_line_error(invoke("validate", "-d", "toy", path), "missing columns: height, label, weight, area",
                          "unexpected columns: bogus")
    assert_one_line_error(invoke("validate", "-d", "nope", path), "unknown domain")


def test_sql_is_read_only(tmp_path, db):
    assert invoke("generate", "-d", "toy", "-n", 5, "--model", "baseline", "--db", db, "-q").exit_code == 0
    assert_one_line_error(invoke("sql", "DELETE FROM runs", "--db", db), "read-only")
    assert_one_line_error(invoke("sql", "SELEC 1", "--db", db), "SQL error")
    assert_one_line_error(invoke("rejections", "nope", "--db", db), "no run 'nope'")
    with Store(db, read_only=True) as s:
        assert s.runs().height == 1


def test_real_process_has_no_traceback(tmp_path):
    """Outside CliRunner too: a corrupt --db gives one line on stderr and exit 2."""
    junk = tmp_path / "junk.duckdb"
    junk.write_text("garbage")
    p = subprocess.run([sys.executable, "-m", "factory", "runs", "--db", str(junk)], capture_output=True, text=True,
                       env=os.environ | {"COLUMNS": "80", "PYTHONPATH": os.pathsep.join(sys.path)}, cwd=tmp_path)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().startswith("error: ") and len(p.stderr.strip().splitlines()) == 1
    assert "Traceback" not in p.stderr


def test_evaluate_scores_a_run_and_writes_json(db, tmp_path):
    r = invoke("generate", "-d", "toy", "-n", 250, "--model", "baseline", "--db", db, "-q", "--allow-drift")
    assert r.exit_code == 0, r.output
    with Store(db, read_only=True) as s:
        run_id = s.runs()["run_id"][0]
    out = tmp_path / "metrics.json"
    r = invoke("evaluate", run_id, "--db", db, "--out", out)
    assert r.exit_code == 0, r.output
    m = json.loads(out.read_text())
    assert m["run_id"] == run_id and m["n_rows"] == 250
    assert m["rule_validity"]["valid_rate"] == 1.0  # exported records pass every rule
    assert 0 < m["quality"]["column_shapes"] <= 1 and m["mle"] is None  # toy declares no MLE tasks
    assert m["privacy"]["exact_copies"] == 0
    assert_one_line_error(invoke("evaluate", run_id, "--db", db, "--out", out), "--force")
    assert_one_line_error(invoke("evaluate", run_id, "--db", db, "--out", tmp_path / "m.csv"), "use a .json file")
    assert_one_line_error(invoke("evaluate", "no-such-run", "--db", db), "no run 'no-such-run'")


def test_report_writes_a_self_contained_page_and_metrics(db, tmp_path):
    r = invoke("generate", "-d", "toy", "-n", 250, "--model", "baseline", "--db", db, "-q", "--allow-drift")
    assert r.exit_code == 0, r.output
    with Store(db, read_only=True) as s:
        run_id = s.runs()["run_id"][0]
    r = invoke("report", run_id, "--db", db, "--out", tmp_path / "rep")
    assert r.exit_code == 0, r.output
    page = (tmp_path / "rep" / "report.html").read_text()
    assert run_id in page and "Distribution gate" in page and "Why attempts were rejected" in page
    assert page.count("data:image/png;base64,") >= 5 + 1  # one plot per toy column + heat-maps
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere
    m = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert m["run_id"] == run_id and m["rule_validity"]["valid_rate"] == 1.0
    assert_one_line_error(invoke("report", "no-such-run", "--db", db), "no run 'no-such-run'")


def test_help_keeps_bracketed_install_hint():
    # rich markup treats "[ray]" as a style tag and drops it unless escaped
    r = CliRunner().invoke(app, ["generate", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "factory[ray]" in r.output


def test_help_states_the_default_shards_and_workers_the_code_uses():
    import re

    from factory.api import LOCAL_SHARDS, LOCAL_SHARDS_FROM, default_shards, default_workers

    r = CliRunner().invoke(app, ["generate", "--help"], env={"COLUMNS": "400"})
    assert r.exit_code == 0, r.output
    text = re.sub(r"[\s│]+", " ", r.output)  # the help wraps inside a box
    assert f"(default: local {LOCAL_SHARDS} from {LOCAL_SHARDS_FROM:,} records, else 1; ray 4 per worker)" in text
    assert default_shards(LOCAL_SHARDS_FROM) == LOCAL_SHARDS and default_shards(LOCAL_SHARDS_FROM - 1) == 1
    assert default_shards(100, "ray", 3) == 12
    assert "(default: local min(2, CPUs), ray 2)" in text and default_workers() == min(2, os.cpu_count())
