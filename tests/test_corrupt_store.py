"""A damaged database is refused when it is opened, in one line naming the file, and is never
written to (issue 17, item 4)."""
import hashlib
import os
import shutil

import duckdb
import pytest

from factory.store import Store, StoreError
from helpers import invoke


@pytest.fixture(scope="module")
def good_db(tmp_path_factory):
    db = tmp_path_factory.mktemp("corrupt") / "good.duckdb"
    r = invoke("generate", "-d", "toy", "-n", 2000, "--model", "baseline", "--db", db, "-q", "--allow-drift")
    assert r.exit_code == 0, r.output
    with Store(db, read_only=True) as s:
        return db, s.runs()["run_id"][0]


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_refused_everywhere(db, run_id, what, tmp_path):
    """runs, export and generate all end in one line naming the file; generate writes nothing."""
    before = digest(db)
    for args in (("runs", "--db", db), ("export", run_id, "--db", db, "--out", tmp_path / "x.csv"),
                 ("generate", "-d", "toy", "-n", 5, "--model", "baseline", "--db", db, "-q"),
                 ("checks", run_id, "--db", db)):
        r = invoke(*args)
        lines = r.output.strip().splitlines()
        assert r.exit_code == 2, (args, r.output)
        assert lines[-1].startswith("error: ") and "Traceback" not in r.output, r.output
        assert f"{db} is corrupt" in lines[-1] and what in lines[-1] and "restore it from a backup" in lines[-1], \
            lines[-1]
    assert digest(db) == before and not (tmp_path / "x.csv").exists()


def test_truncated_database_is_refused(good_db, tmp_path):
    db = tmp_path / "half.duckdb"
    shutil.copy(good_db[0], db)
    os.truncate(db, db.stat().st_size // 2)
    assert_refused_everywhere(db, good_db[1], "truncated", tmp_path)


def test_flipped_byte_is_refused(good_db, tmp_path):
    src = good_db[0]
    size = src.stat().st_size
    db = tmp_path / "flip.duckdb"
    found = False
    for pos in range(size // 3, size, 37_003):  # a data byte DuckDB's checksums catch (not in a free block)
        shutil.copy(src, db)
        with open(db, "r+b") as f:
            f.seek(pos)
            b = f.read(1)
            f.seek(pos)
            f.write(bytes([b[0] ^ 0x10]))
        con = None
        try:
            con = duckdb.connect(str(db), read_only=True)
            for (schema, table) in con.execute("SELECT table_schema, table_name FROM information_schema.tables "
                                               "WHERE table_type = 'BASE TABLE'").fetchall():
                con.execute(f'SELECT sum(hash(COLUMNS(*))) FROM "{schema}"."{table}"').fetchall()
        except duckdb.Error:
            found = True
        finally:
            if con is not None:
                con.close()
        if found:
            break
    assert found, "no flipped byte was detectable"
    before = digest(db)
    with pytest.raises(StoreError, match=r"is corrupt \(.*checksum"):
        Store(db)  # a writer: refused before it writes anything
    assert digest(db) == before
    r = invoke("generate", "-d", "toy", "-n", 5, "--model", "baseline", "--db", db, "-q")
    assert r.exit_code == 2 and "is corrupt" in r.output and digest(db) == before


@pytest.mark.parametrize("damage, what", [
    ("DROP TABLE checks", "table checks is missing"),
    ("ALTER TABLE runs DROP COLUMN settings", "table runs does not have the columns"),
    ("UPDATE runs SET accepted = accepted - 1, attempted = attempted - 1", "counters disagree with its shards"),
    ("DELETE FROM toy.records WHERE record_id IN (SELECT record_id FROM toy.records LIMIT 3)",
     "runs.accepted differs from the records stored in toy.records"),
    ("UPDATE runs SET settings = '{broken'", "its settings are not a JSON object"),
], ids=["dropped-table", "dropped-column", "counters", "deleted-records", "settings-json"])
def test_edited_database_is_refused(good_db, tmp_path, damage, what):
    db = tmp_path / "edited.duckdb"
    shutil.copy(good_db[0], db)
    con = duckdb.connect(str(db))
    con.execute(damage)
    con.close()
    assert_refused_everywhere(db, good_db[1], what, tmp_path)


def test_a_good_database_still_opens(good_db):
    with Store(good_db[0]) as s:  # writer: full verification passes
        assert s.run(good_db[1])["accepted"] == 2000
