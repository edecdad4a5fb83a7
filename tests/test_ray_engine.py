"""The Ray engine end to end: a local Ray cluster, 2 workers, one worker killed mid-shard.

The run must still store exactly n valid, distinct records with exact accounting, and the
same records as the local engine with the same seed and shard count."""
import signal
import time

import polars as pl
import psutil
import pytest

from factory.domain import load_domain
from factory.store import Store
from helpers import factory_popen

pytestmark = pytest.mark.slow


def busy_workers() -> list[psutil.Process]:
    """Ray worker processes of this run that are inside ShardWorker.run_shard right now."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "ray::ShardWorker.run_shard" in " ".join(p.info["cmdline"] or []):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def test_ray_two_workers_one_killed_gives_exactly_n_and_the_local_records(tmp_path):
    n, shards = 3000, 6
    common = ("-d", "finance", "-n", n, "--seed", 3, "--shards", shards, "-q")
    ray_run = factory_popen("generate", *common, "--engine", "ray", "--workers", 2, "--db", "ray.duckdb",
                            "--out", "ray.parquet", cwd=tmp_path)
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and ray_run.poll() is None and time.monotonic() < deadline:
        busy = busy_workers()
        if busy:
            time.sleep(0.3)  # well inside the shard
            try:
                busy[0].send_signal(signal.SIGKILL)
                killed = busy[0].pid
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.05)
    assert ray_run.wait(timeout=600) == 0, ray_run.stderr.read()[-3000:]
    assert killed is not None, "no worker was caught mid-shard; the run is too short to test a kill"

    local = factory_popen("generate", *common, "--db", "local.duckdb", "--out", "local.parquet", cwd=tmp_path)
    assert local.wait(timeout=600) == 0, local.stderr.read()[-3000:]

    finance = load_domain("finance")
    with Store(tmp_path / "ray.duckdb", read_only=True) as s:
        (run_id, status, attempted, accepted, rejected, settings), = s.frame(
            "SELECT run_id, status, attempted, accepted, rejected, settings FROM runs").rows()
        records = s.records(finance, run_id)
        shard_rows = s.shards(run_id)
        keys = s.frame("SELECT count(*) n, count(DISTINCT (shard, record_id)) d FROM finance.records").row(0)
        n_rej = s.frame("SELECT count(DISTINCT (shard, attempt_id)) n FROM rejections WHERE attempt_id IS NOT NULL"
                        ).item()
    assert status == "succeeded" and '"engine": "ray"' in settings
    assert accepted == n == records.height == keys[0] == keys[1] and attempted == accepted + rejected == accepted + n_rej
    assert records.unique().height == n  # distinct records
    assert finance.validator.validate(records).n_valid == n
    assert [r["status"] for r in shard_rows] == ["done"] * shards
    assert all(r["worker"].startswith("ray:") for r in shard_rows)
    assert pl.read_parquet(tmp_path / "ray.parquet").equals(pl.read_parquet(tmp_path / "local.parquet"))


def test_engine_option_mistakes(tmp_path):
    for args, msg in [(("--engine", "spark"), "--engine must be one of"),
                      (("--address", "auto"), "applies to --engine ray only"),
                      (("--engine", "ray", "--workers", 0), "--workers must be positive"),
                      (("--shards", 0), "--shards must be between 1 and n"),
                      (("--shards", 11), "--shards must be between 1 and n"),
                      (("--device", "cuda"), "the baseline runs on CPU only"),
                      (("--device", "gpu"), "--device must be one of")]:
        p = factory_popen("generate", "-d", "toy", "-n", 10, "--model", "baseline", "--db", "x.duckdb", *args,
                          cwd=tmp_path)
        err = p.stderr.read()
        assert p.wait(timeout=120) == 2 and msg in err and "Traceback" not in err, (args, err)
