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


def test_with_workers_the_main_process_keeps_no_model_and_stores_the_same_records(tmp_path):
    """The driver records the generator a worker loaded (WorkerGenerator) instead of loading its own copy."""
    from factory import api
    from factory.pool import WorkerGenerator

    common = dict(seed=4, model="baseline", shards=4, batch_size=16, allow_drift=True)
    pooled = api.generate("toy", 240, workers=2, db=tmp_path / "a.duckdb", **common)
    alone = api.generate("toy", 240, workers=1, db=tmp_path / "b.duckdb", **common)
    try:
        assert isinstance(pooled.generator, WorkerGenerator) and pooled.generator._generator is None
        assert not isinstance(alone.generator, WorkerGenerator)
        assert (pooled.generator.model_id, pooled.generator.model_version) == (
            alone.generator.model_id, alone.generator.model_version)
        assert pooled.records.equals(alone.records)
        a, b = (r.store.run_settings(r.run_id) for r in (pooled, alone))
        assert {k: v for k, v in a.items() if k != "workers"} == {k: v for k, v in b.items() if k != "workers"}
    finally:
        pooled.close()
        alone.close()


def test_a_stack_the_workers_cannot_load_is_a_one_line_error_not_a_dead_pool(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-m", "factory", "generate", "-d", "toy", "-n", "40", "--model", "difflm",
                        "--model-dir", str(tmp_path / "no-stack"), "--workers", "2", "--shards", "2",
                        "--db", "w.duckdb", "-q"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith(f"error: no trained DiffLM stack at {tmp_path / 'no-stack'}")
    assert "Traceback" not in p.stderr and "worker process died" not in p.stderr


def test_progress_counts_batches_of_shards_still_running_in_workers(toy, store, capsys, monkeypatch):
    """Workers report each batch; the progress line moves within a shard, not only per stored shard,
    never goes back, and ends at exactly n."""
    import re

    from factory import pool

    monkeypatch.setenv("FACTORY_PROGRESS_INTERVAL", "0")
    monkeypatch.setattr(pool, "PROGRESS_POLL_S", 0.02)
    gen = MarginalBaseline.fit(toy)
    run_generation(toy, gen, 4000, seed=1, store=store, batch_size=8, shards=2, progress=True, allow_drift=True,
                   engine=LocalEngine(2, GeneratorSpec("toy", "baseline")))
    done = [int(m.replace(",", "")) for m in re.findall(r"generate: ([\d,]+) of 4,000", capsys.readouterr().err)]
    assert done[-1] == 4000 and done == sorted(done)
    assert any(d not in (0, 2000, 4000) for d in done), done  # a count between stored shards


def test_a_worker_process_does_not_import_scipy_stats():
    """What a worker imports (model, privacy filter) leaves the gate's scipy.stats (~0.6 s) to the main process."""
    code = ("import sys, factory.pool, factory.ray_engine, factory.generators, factory.difflm.pipeline, "
            "factory.checks.privacy; print('scipy.stats' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "False"
