"""Exports that cannot lie and can never destroy the database (issue 17, items 2 and 3)."""
import json
import os

import duckdb
import polars as pl
import pytest

import factory.cli as cli
import factory.export as export
from factory.baseline import MarginalBaseline
from factory.export import ExportError, export_run, is_duckdb_file, manifest_path, sha256_file, verify_export
from factory.loop import run_generation
from factory.store import Store
from helpers import assert_one_line_error, factory_run, file_size_limit, invoke


@pytest.fixture
def stored(tmp_path):
    """A database with one finished toy run, and its id."""
    db = tmp_path / "f.duckdb"
    r = invoke("generate", "-d", "toy", "-n", 30, "--model", "baseline", "--db", db, "-q", "--seed", 1)
    assert r.exit_code == 0, r.output
    with Store(db, read_only=True) as s:
        return db, s.runs()["run_id"][0]


def _runs(db):
    with Store(db, read_only=True) as s:
        return s.runs().height


# ---- never lose the database ----------------------------------------------------------------------
def test_generate_refuses_out_equal_to_db(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "x.parquet"
    assert invoke("generate", "-d", "toy", "-n", 10, "--model", "baseline", "--db", db, "-q").exit_code == 0
    before = db.read_bytes()
    for out in (db, "x.parquet", "./sub/../x.parquet"):  # same file, spelled three ways
        (tmp_path / "sub").mkdir(exist_ok=True)
        line = assert_one_line_error(invoke("generate", "-d", "toy", "-n", 10, "--model", "baseline",
                                            "--db", "x.parquet", "--out", out, "--force", "-q"))
        assert "it is the database (--db)" in line
    link = tmp_path / "link.parquet"
    link.symlink_to(db)
    line = assert_one_line_error(invoke("generate", "-d", "toy", "-n", 10, "--model", "baseline", "--db", db,
                                        "--out", link, "--force", "-q"))
    assert "it is the database" in line
    assert db.read_bytes() == before and is_duckdb_file(db) and _runs(db) == 1  # nothing ran, nothing lost


def test_export_refuses_db_wal_and_any_duckdb_file(stored, tmp_path):
    db, run_id = stored
    # the case: `factory export RUN --db x.csv --out x.csv --force`
    csv_db = tmp_path / "x.csv"
    db.rename(csv_db)
    line = assert_one_line_error(invoke("export", run_id, "--db", csv_db, "--out", csv_db, "--force"))
    assert "it is the database (--db)" in line and is_duckdb_file(csv_db)
    # the database's write-ahead log, reached through a symlink
    wal = csv_db.with_name(csv_db.name + ".wal")
    wal.write_bytes(b"wal bytes")
    (tmp_path / "w.csv").symlink_to(wal)
    line = assert_one_line_error(invoke("export", run_id, "--db", csv_db, "--out", tmp_path / "w.csv", "--force"))
    assert "the database's WAL" in line and wal.read_bytes() == b"wal bytes"
    wal.unlink()
    # another factory database, not the --db one
    other = tmp_path / "other.parquet"
    duckdb.connect(str(other)).close()
    line = assert_one_line_error(invoke("export", run_id, "--db", csv_db, "--out", other, "--force"))
    assert "is a DuckDB database file" in line and is_duckdb_file(other)
    assert _runs(csv_db) == 1


# ---- exports that cannot lie ----------------------------------------------------------------------
class Crashing:
    """The baseline, but the second generate() call dies: an interrupted run."""

    def __init__(self, domain):
        self.base, self.calls = MarginalBaseline.fit(domain), 0
        self.model_id, self.model_version = "baseline", self.base.model_version  # so that --resume may continue it

    def generate(self, n, seed):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("killed")
        return self.base.generate(n, seed)


def test_export_refuses_unfinished_and_ungated_runs(toy, tmp_path):
    db = tmp_path / "f.duckdb"
    with Store(db) as s:
        with pytest.raises(RuntimeError, match="killed"):
            run_generation(toy, Crashing(toy), 300, 0, s, 64, progress=False)
        run = s.runs().row(0, named=True)
    assert run["status"] == "failed" and 0 < run["accepted"] < 300
    out = tmp_path / "x.csv"
    for extra in ((), ("--allow-drift",)):  # --allow-drift covers a refused gate, never an incomplete run
        line = assert_one_line_error(invoke("export", run["run_id"], "--db", db, "--out", out, *extra))
        assert "status 'failed'" in line and "of 300 records" in line and "--resume" in line
        assert not out.exists() and not manifest_path(out).exists()
    with Store(db) as s:
        s.con.execute("UPDATE runs SET status = 'running' WHERE run_id = ?", [run["run_id"]])
    assert "status 'running'" in assert_one_line_error(invoke("export", run["run_id"], "--db", db, "--out", out))
    # a finished run whose gate never ran
    with Store(db) as s:
        good = run_generation(toy, MarginalBaseline.fit(toy), 20, 0, s, 32, progress=False).run_id
        s.con.execute("UPDATE runs SET gate = NULL WHERE run_id = ?", [good])
    assert "never gated" in assert_one_line_error(invoke("export", good, "--db", db, "--out", out, "--allow-drift"))
    assert not out.exists()


def test_manifest_and_data_commit_as_a_pair(toy, stored, tmp_path, monkeypatch):
    db, run_id = stored
    out = tmp_path / "x.parquet"
    with Store(db, read_only=True) as s:
        assert export_run(s, toy, run_id, out) == 30
    old = verify_export(out)
    assert old["sha256"] == sha256_file(out) and old["rows"] == 30
    with Store(db) as s:  # a second run to export over the first
        new_id = run_generation(toy, MarginalBaseline.fit(toy), 25, 5, s, 32, progress=False).run_id
    real_replace = os.replace

    def dies_at(k):
        calls = []

        def replace(a, b):
            calls.append(b)
            if len(calls) == k:
                raise KeyboardInterrupt  # a kill between the renames
            return real_replace(a, b)
        return replace

    # killed before the first rename: old file, old manifest, consistent
    monkeypatch.setattr(export.os, "replace", dies_at(1))
    with Store(db, read_only=True) as s, pytest.raises(KeyboardInterrupt):
        export_run(s, toy, new_id, out, force=True)
    assert verify_export(out)["run_id"] == run_id
    # killed between the renames: the manifest is the new one, the file still the old one.
    # A reader never sees a new file under an old manifest; the sha256 shows the mismatch.
    monkeypatch.setattr(export.os, "replace", dies_at(2))
    with Store(db, read_only=True) as s, pytest.raises(KeyboardInterrupt):
        export_run(s, toy, new_id, out, force=True)
    assert json.loads(manifest_path(out).read_text())["run_id"] == new_id
    assert pl.read_parquet(out).height == 30  # old data
    with pytest.raises(ExportError, match="does not match its manifest"):
        verify_export(out)
    assert not list(tmp_path.glob(".*.tmp"))  # the interrupted export cleaned its temp files
    monkeypatch.setattr(export.os, "replace", real_replace)
    with Store(db, read_only=True) as s:
        assert export_run(s, toy, new_id, out, force=True) == 25
    m = verify_export(out)
    assert m["run_id"] == new_id and m["rows"] == 25 == pl.read_parquet(out).height


def test_stale_temp_files_of_a_killed_export_are_removed(toy, stored, tmp_path):
    db, run_id = stored
    out = tmp_path / "x.csv"
    stale = [tmp_path / ".x.csv.abc123.tmp", tmp_path / ".x.csv.manifest.json.def456.tmp"]
    for p in stale:
        p.write_text("half")
    unrelated = tmp_path / ".y.csv.abc123.tmp"
    unrelated.write_text("not ours")
    with Store(db, read_only=True) as s:
        export_run(s, toy, run_id, out)
    assert not any(p.exists() for p in stale) and unrelated.exists()
    verify_export(out)


@pytest.mark.slow
def test_export_onto_a_full_disk_is_one_line_and_leaves_nothing(toy, tmp_path):
    db = tmp_path / "f.duckdb"
    r = factory_run("generate", "-d", "toy", "-n", 1000, "--model", "baseline", "--db", db, "-q", "--allow-drift",
                    cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    with Store(db, read_only=True) as s:
        run_id = s.runs()["run_id"][0]

    for name in ("x.csv", "x.parquet"):  # writes past 2 kB fail as they fail on a full disk
        r = factory_run("export", run_id, "--db", db, "--out", name, cwd=tmp_path, preexec_fn=file_size_limit(2_000))
        assert r.returncode == 2, (r.stdout, r.stderr[-2000:])
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert f"cannot write {name}" in r.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["f.duckdb"], list(tmp_path.iterdir())


# ---- one-line errors at the edges ----------------------------------------------------------------
def test_resume_of_a_live_run_is_refused(toy, tmp_path):
    from factory.loop import RunLock

    db = tmp_path / "f.duckdb"
    with Store(db) as s:
        with pytest.raises(RuntimeError, match="killed"):
            run_generation(toy, Crashing(toy), 300, 0, s, 64, progress=False)
        run_id = s.runs()["run_id"][0]
        before = s.run(run_id)["accepted"]
        lock = RunLock(s, run_id).__enter__()  # another process generating this run holds this lock
    try:
        line = assert_one_line_error(invoke("generate", "--resume", run_id, "--db", db, "-q", "--allow-drift"))
        assert "is being generated by another process" in line
        with Store(db, read_only=True) as s:
            assert s.run(run_id)["accepted"] == before and s.run(run_id)["status"] == "failed"
    finally:
        lock.__exit__(None, None, None)
    r = invoke("generate", "--resume", run_id, "--db", db, "-q", "--allow-drift")  # the lock is gone: it resumes
    assert r.exit_code == 0, r.output
    assert not list(tmp_path.glob(".*.lock"))


@pytest.mark.parametrize("args, message", [
    (("rejections", "RUN", "--examples", 99999999999999999999), "--examples must be between 0 and 10,000"),
    (("sql", "SELECT 1", "--max-rows", 99999999999999999999), "--max-rows must be between 0 and"),
    (("generate", "-d", "toy", "-n", 99999999999999999999, "-q"), "-n must be at most 1,000,000,000,000"),
    (("generate", "-d", "toy", "-n", 10**13, "-q"), "-n must be at most 1,000,000,000,000"),
], ids=["examples", "max-rows", "n", "n-1e13"])
def test_huge_integers_are_one_line(stored, args, message):
    db, run_id = stored
    args = tuple(run_id if a == "RUN" else a for a in args) + ("--db", db)
    assert message in assert_one_line_error(invoke(*args))


def test_validate_refuses_a_header_only_file_and_counts_in_chunks(toy, tmp_path, monkeypatch):
    header = tmp_path / "empty.csv"
    header.write_text(",".join(toy.spec.names) + "\n")
    assert "has a header but no rows" in assert_one_line_error(invoke("validate", "-d", "toy", header))
    # chunked validation counts exactly what one pass counts
    rows = toy.load_split("train")
    bad = pl.concat([rows] * 3).with_columns(pl.lit(-1.0).alias("weight"))
    path = tmp_path / "bad.parquet"
    bad.write_parquet(path)
    whole = invoke("validate", "-d", "toy", path)
    monkeypatch.setattr(cli, "VALIDATE_CHUNK", 7)
    chunked = invoke("validate", "-d", "toy", path)
    assert whole.exit_code == chunked.exit_code == 1 and whole.output == chunked.output
    assert f"{bad.height:,} of {bad.height:,} rows violate a rule" in chunked.output
