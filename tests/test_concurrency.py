"""Concurrent readers: analysts query the store while a run writes it.

The writer holds the DuckDB file only while it stores a batch (factory/store.py), so
read-only Stores and `factory sql` get in between batches; each sees a consistent
snapshot (records, rejections and counters of whole batches only)."""
import subprocess
import sys
import time

import pytest

from factory.store import Store, StoreError
from helpers import factory_popen

pytestmark = pytest.mark.slow


def snapshot(db):
    with Store(db, read_only=True) as s:
        runs = s.frame("SELECT run_id, status, attempted, accepted, rejected FROM runs")
        if not runs.height:
            return None
        run_id, status, attempted, accepted, rejected = runs.row(0)
        n_records = s.frame("SELECT count(*) n FROM toy.records WHERE run_id = ?", [run_id])["n"].item()
        n_rejected = s.frame("SELECT count(DISTINCT (shard, attempt_id)) n FROM rejections WHERE run_id = ? "
                             "AND attempt_id IS NOT NULL", [run_id])["n"].item()
        shard_sum = s.frame("SELECT sum(accepted) n FROM shards WHERE run_id = ?", [run_id])["n"].item()
    return status, attempted, accepted, rejected, n_records, n_rejected, shard_sum


def test_readers_query_while_a_run_writes(tmp_path):
    db = tmp_path / "live.duckdb"
    writer = factory_popen("generate", "-d", "toy", "-n", 4000, "--model", "baseline", "--batch-size", 40,
                           "--seed", 2, "-q", "--allow-drift", "--shards", 2, "--workers", 1, "--db", db, cwd=tmp_path)
    seen, sql_ok = [], 0
    deadline = time.monotonic() + 240
    while writer.poll() is None and time.monotonic() < deadline:
        if not db.exists():
            time.sleep(0.05)
            continue
        try:
            snap = snapshot(db)
        except StoreError as e:  # only a store that is still being created may refuse a reader
            assert "not a factory store" in str(e) or "empty" in str(e), e
            continue
        if snap is None:
            continue
        status, attempted, accepted, rejected, n_records, n_rejected, shard_sum = snap
        # a consistent snapshot: whole batches only, counters equal to the rows
        assert n_records == accepted == shard_sum and n_rejected == rejected and attempted == accepted + rejected
        seen.append((status, accepted))
        if len(seen) % 10 == 0:  # the analyst's command line, too
            q = factory_popen("sql", "SELECT count(*) AS n FROM toy.records", "--db", db, cwd=tmp_path)
            assert q.wait(timeout=60) == 0, q.stderr.read()
            sql_ok += 1
    assert writer.wait(timeout=60) == 0, writer.stderr.read()[-2000:]
    running = [a for s, a in seen if s == "running"]
    assert len(set(running)) >= 3, f"readers saw too little of the run: {seen[:5]}..."
    assert running == sorted(running)  # progress only moves forward
    assert sql_ok >= 1
    status, _, accepted, _, n_records, _, _ = snapshot(db)
    assert (status, accepted, n_records) == ("succeeded", 4000, 4000)


def test_a_long_reader_makes_the_writer_wait_then_fail_clearly(tmp_path, monkeypatch):
    """A session that never lets go blocks the writer; it waits FACTORY_LOCK_TIMEOUT, then
    fails with a message saying so. The run stays resumable."""
    db = tmp_path / "held.duckdb"
    Store(db).close()
    holder = subprocess.Popen([sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({str(db)!r}, "
                               "read_only=True); print('held', flush=True); time.sleep(30)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv("FACTORY_LOCK_TIMEOUT", "1")
        t = time.monotonic()
        with pytest.raises(StoreError, match="another process holds it.*waited 1 s"):
            Store(db)
        assert 0.9 < time.monotonic() - t < 10
    finally:
        holder.kill()
        holder.wait()
    Store(db).close()  # free again
