"""The local engine with worker processes: same records as one process, shards stored whole."""
import os
import subprocess
import sys

import polars as pl
import pytest

from factory.baseline import MarginalBaseline
from factory.loop import LocalEngine, run_generation
from factory.ray_engine import GeneratorSpec


def records(store, domain, run_id):
    return store.records(domain, run_id)  # spec columns in (shard, record_id) order


def test_two_workers_store_the_same_records_as_one_process(toy, store):
    gen = MarginalBaseline.fit(toy)
    spec = GeneratorSpec("toy", "baseline")
    one = run_generation(toy, gen, 240, seed=4, store=store, batch_size=16, shards=4, progress=False)
    two = run_generation(toy, gen, 240, seed=4, store=store, batch_size=16, shards=4, progress=False,
                         engine=LocalEngine(2, spec))
    assert records(store, toy, one.run_id).equals(records(store, toy, two.run_id))
    assert (one.accepted, one.attempted, one.rejected) == (two.accepted, two.attempted, two.rejected) == (
        240, two.attempted, two.attempted - 240)
    shards = store.shards(two.run_id)
    assert all(s["status"] == "done" and s["worker"].startswith("local:") for s in shards)
    assert len({s["worker"] for s in shards}) <= 2
    assert store.run_settings(two.run_id)["workers"] == 2
    # another shard count is another sample: the shard count, not the worker count, makes the seeds
    three = run_generation(toy, gen, 240, seed=4, store=store, batch_size=16, shards=3, progress=False,
                           engine=LocalEngine(2, spec))
    assert not records(store, toy, three.run_id).equals(records(store, toy, one.run_id))


def test_workers_need_a_spec():
    with pytest.raises(ValueError, match="GeneratorSpec"):
        LocalEngine(2)
    with pytest.raises(ValueError, match="positive"):
        LocalEngine(0)


def test_cli_warns_when_workers_exceed_the_cpus(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    n = (os.cpu_count() or 1) + 1
    p = subprocess.run([sys.executable, "-m", "factory", "generate", "-d", "toy", "-n", "20", "--model", "baseline",
                        "--workers", str(n), "--shards", "2", "--db", "w.duckdb", "-q"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert f"--workers {n} is more than this machine's" in p.stderr
