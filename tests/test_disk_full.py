"""A disk that fills up mid-run: one clear line, nothing half-written, and a resume that ends
exactly where an uninterrupted run ends.

"Disk full" is simulated with a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored): writes past it
fail with EFBIG like they fail with ENOSPC on a full disk, without needing a small mount."""
import pytest

from factory.domain import load_domain
from factory.store import Store
from helpers import factory_run, file_size_limit

pytestmark = pytest.mark.slow
# one shard, in this process: every batch is its own transaction (what a full disk must not tear)
ARGS = ("-d", "toy", "-n", 12000, "--model", "baseline", "--batch-size", 200, "--seed", 6, "-q", "--allow-drift",
        "--shards", 1)


def cli(*args, cwd, max_file_bytes=None):
    return factory_run(*args, cwd=cwd, preexec_fn=file_size_limit(max_file_bytes) if max_file_bytes else None)


def state(db):
    with Store(db, read_only=True) as s:
        run = s.frame("SELECT run_id, status, attempted, accepted, rejected, surplus FROM runs").row(0, named=True)
        n_records = s.frame("SELECT count(*) n FROM toy.records")["n"].item()
        n_rejected = s.frame("SELECT count(DISTINCT attempt_id) n FROM rejections WHERE attempt_id IS NOT NULL").item()
        records = s.records(load_domain("toy"), run["run_id"])
    return run, n_records, n_rejected, records


def test_disk_full_mid_run_then_resume(tmp_path):
    ref = cli("generate", *ARGS, "--db", "ref.duckdb", cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-2000:]

    full = cli("generate", *ARGS, "--db", "full.duckdb", cwd=tmp_path, max_file_bytes=1_500_000)
    assert full.returncode == 2, full.stderr[-2000:]
    assert "Traceback" not in full.stderr and len(full.stderr.strip().splitlines()) == 1
    assert "cannot write to full.duckdb" in full.stderr and "--resume" in full.stderr

    run, n_records, n_rejected, _ = state(tmp_path / "full.duckdb")
    assert run["status"] in ("failed", "running") and 0 < run["accepted"] < 12000
    assert n_records == run["accepted"] and n_rejected == run["rejected"]  # whole batches only
    assert run["attempted"] == run["accepted"] + run["rejected"]

    resumed = cli("generate", "--resume", run["run_id"], "--db", "full.duckdb", "-q", "--allow-drift", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    run2, n_records2, _, records = state(tmp_path / "full.duckdb")
    ref_run, _, _, ref_records = state(tmp_path / "ref.duckdb")
    assert run2["status"] == "succeeded" and n_records2 == 12000
    assert records.equals(ref_records)
    assert [run2[k] for k in ("attempted", "accepted", "rejected", "surplus")] == \
        [ref_run[k] for k in ("attempted", "accepted", "rejected", "surplus")]
