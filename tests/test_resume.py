"""Crash safety: a generation killed with SIGKILL at random moments, resumed each time,
ends with exactly what an uninterrupted run of the same seed stores."""
import random
import signal
import time
from pathlib import Path

import duckdb
import pytest

from factory.domain import load_domain
from factory.store import Store
from helpers import factory_popen

pytestmark = pytest.mark.slow


def run_row(db):
    """The runs table's rows; none while the killed process had not yet created the file or its tables
    (on a loaded machine start-up can outlast the first sleep)."""
    if not Path(db).exists():
        return []
    con = duckdb.connect(str(db), read_only=True)
    try:
        if not con.execute("SELECT 1 FROM information_schema.tables WHERE table_name = 'runs'").fetchall():
            return []  # killed between creating the file and committing its schema
        return con.execute("SELECT run_id, status, attempted, accepted, rejected FROM runs").fetchall()
    except duckdb.CatalogException:
        return []
    finally:
        con.close()


def stored(db, run_id):
    with Store(db, read_only=True) as s:
        recs = s.frame("SELECT * EXCLUDE (run_id) FROM toy.records WHERE run_id = ? ORDER BY record_id", [run_id])
        rej = s.frame("SELECT attempt_id, stage, rule, raw_text FROM rejections WHERE run_id = ? "
                      "AND attempt_id IS NOT NULL ORDER BY attempt_id, rule", [run_id])
        counts = tuple(s.frame("SELECT attempted, accepted, rejected, surplus, status FROM runs WHERE run_id = ?",
                               [run_id]).row(0))
    return recs, rej, counts


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    n, args = 3000, ("-d", "toy", "-n", 3000, "--model", "baseline", "--batch-size", 40, "--seed", 4, "-q",
                     "--allow-drift")  # the marginal baseline fails the gate; accounting is what is tested
    ref = factory_popen("generate", *args, "--db", "ref.duckdb", cwd=tmp_path)
    assert ref.wait(timeout=300) == 0, ref.stderr.read()[-2000:]
    (ref_id, *_), = run_row(tmp_path / "ref.duckdb")

    rng = random.Random(7)
    db = tmp_path / "crash.duckdb"
    p = factory_popen("generate", *args, "--db", db, cwd=tmp_path)
    kills = 0
    while True:
        time.sleep(rng.uniform(1.5, 4.0))  # start-up is ~1.5 s; then batches commit every few ms
        if p.poll() is not None:
            break
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
        rows = run_row(db)
        if not rows:  # killed before the run row existed: start again
            p = factory_popen("generate", *args, "--db", db, cwd=tmp_path)
            continue
        (run_id, status, attempted, accepted, rejected), = rows
        assert status == "running" and attempted == accepted + rejected
        recs, rej, _ = stored(db, run_id)
        assert recs.height == accepted and rej["attempt_id"].n_unique() == rejected  # no half batch
        if kills >= 3:
            p = factory_popen("generate", "--resume", run_id, "--db", db, "-q", "--allow-drift", cwd=tmp_path)
            break
        p = factory_popen("generate", "--resume", run_id, "--db", db, "-q", cwd=tmp_path)
    assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    assert kills >= 1, "the run finished before it could be killed; lengthen it"
    (run_id, *_), = run_row(db)
    recs, rej, counts = stored(db, run_id)
    ref_recs, ref_rej, ref_counts = stored(tmp_path / "ref.duckdb", ref_id)
    assert recs.height == n and recs["record_id"].n_unique() == n
    assert recs.equals(ref_recs) and rej.equals(ref_rej)
    assert counts == ref_counts and counts[0] == counts[1] + counts[2] and counts[4] == "succeeded"
    toy = load_domain("toy")
    typed = recs.drop("shard", "record_id", "batch").cast(toy.spec.polars_schema())  # DuckDB DECIMAL -> spec dtypes
    assert toy.validator.validate(typed).n_valid == n


def test_resume_refuses_a_finished_run_and_extra_options(tmp_path):
    p = factory_popen("generate", "-d", "toy", "-n", 50, "--model", "baseline", "--db", "x.duckdb", "-q", cwd=tmp_path)
    assert p.wait(timeout=120) == 0
    (run_id, *_), = run_row(tmp_path / "x.duckdb")
    r = factory_popen("generate", "--resume", run_id, "--db", "x.duckdb", cwd=tmp_path)
    assert r.wait(timeout=120) == 2 and "only an interrupted run can be resumed" in r.stderr.read()
    r = factory_popen("generate", "--resume", run_id, "-n", 5, "--db", "x.duckdb", cwd=tmp_path)
    assert r.wait(timeout=120) == 2 and "do not pass them" in r.stderr.read()
    r = factory_popen("generate", "--resume", "nope", "--db", "x.duckdb", cwd=tmp_path)
    err = r.stderr.read()
    assert r.wait(timeout=120) == 2 and "no run 'nope'" in err and "Traceback" not in err
