import dataclasses

import duckdb
import polars as pl
import pytest

from factory.baseline import MarginalBaseline
from factory.generators import Generator, GeneratorError, load_generator
from factory.loop import (AttemptBudgetExceeded, batch_seed, next_batch_size, resume_generation, run_generation,
                          shard_sizes)
from factory.store import Store


class ListGenerator:
    """Cycles through fixed texts: a generator whose every output is known."""

    model_id = "fixed"
    model_version = "test"

    def __init__(self, texts):
        self.texts = texts
        self.calls = []

    def generate(self, n, seed):
        self.calls.append((n, seed))
        return [self.texts[i % len(self.texts)] for i in range(n)]


def _check_accounting(store, domain, run_id, n):
    run = store.run(run_id)
    records = store.frame(f"SELECT record_id FROM {domain.name}.records WHERE run_id = ?", [run_id])["record_id"]
    rej = store.frame("SELECT * FROM rejections WHERE run_id = ?", [run_id])
    rejected_ids = set(rej["attempt_id"].to_list())
    assert run["accepted"] == records.len() == n
    assert run["rejected"] == len(rejected_ids)
    assert run["attempted"] == run["accepted"] + run["rejected"]
    assert not rejected_ids & set(records.to_list())  # an attempt is accepted or rejected, never both
    assert rej.filter(pl.col("raw_text").is_null() | (pl.col("message") == "")).height == 0
    assert run["status"] == "succeeded"
    return run, rej


def test_toy_run_accounting(toy, store):
    gen = MarginalBaseline.fit(toy)
    result = run_generation(toy, gen, 150, seed=3, store=store, batch_size=64, progress=False)
    run, rej = _check_accounting(store, toy, result.run_id, 150)
    assert result.accepted == 150 and result.attempted == run["attempted"] and result.surplus == run["surplus"]
    assert result.rejected > 0 and set(rej["stage"]) == {"rule"}
    # every generated text is an attempt or surplus: attempt ids come from 0..generated-1
    ids = set(rej["attempt_id"]) | set(store.frame("SELECT record_id FROM toy.records")["record_id"])
    assert max(ids) < run["attempted"] + run["surplus"]
    records = store.records(toy, result.run_id)
    assert records.columns == toy.spec.names and toy.validator.validate(records).n_valid == 150


def test_finance_run_accounting(finance, store):
    gen = load_generator(finance, "baseline")
    # the marginal baseline fails the distribution gate even at 60 records (every run is gated):
    # override it, the accounting is what is tested
    result = run_generation(finance, gen, 60, seed=0, store=store, batch_size=1000, progress=False, allow_drift=True)
    assert result.gate.status == "overridden"
    run, rej = _check_accounting(store, finance, result.run_id, 60)
    # the baseline breaks cross-field rules, so rejected attempts often carry several rows
    per_attempt = rej.group_by("attempt_id").len()
    assert per_attempt["len"].max() > 1
    assert finance.validator.validate(store.records(finance, result.run_id)).n_valid == 60


def test_rejection_rows_one_per_failing_rule(toy, store):
    ser = toy.serializer
    good = ser.serialize({"kind": "small", "width": 2, "height": 3, "label": None, "weight": 1.5},
                         columns=toy.spec.generated_names)
    wrong_kind = good.replace("kind: small", "kind: large")
    out_of_range = good.replace("width: 2", "width: 99")  # area 297 also makes "small" wrong
    gen = ListGenerator([good, out_of_range, "not a record", wrong_kind])
    result = run_generation(toy, gen, 2, seed=0, store=store, batch_size=8, progress=False)
    # batch 0 asks for n=2 texts (good, out_of_range); acceptance 1/2 -> batch 1 asks for ceil(1/0.5*1.2)=3
    assert [k for k, _ in gen.calls] == [2, 3]
    rej = store.frame("SELECT attempt_id, stage, rule, raw_text FROM rejections ORDER BY attempt_id, rule")
    got = [(r["attempt_id"], r["stage"], r["rule"]) for r in rej.iter_rows(named=True)]
    # the generator restarts its list on each call: batch 1 is good, out_of_range, "not a record"
    assert got == [(1, "rule", "kind_matches_area"), (1, "schema", "width.range"),
                   (3, "rule", "kind_matches_area"), (3, "schema", "width.range"), (4, "parse", "parse")]
    assert rej.filter(pl.col("attempt_id") == 4)["raw_text"].item() == "not a record"
    assert result.accepted == 2 and result.rejected == 3 and result.attempted == 5 and result.surplus == 0
    assert store.frame("SELECT record_id FROM toy.records ORDER BY 1")["record_id"].to_list() == [0, 2]


def test_surplus_is_counted_not_stored(toy, store):
    good = toy.serializer.serialize({"kind": "small", "width": 2, "height": 3, "label": "a", "weight": None},
                                    columns=toy.spec.generated_names)
    gen = ListGenerator([good, good, "not a record"])
    result = run_generation(toy, gen, 5, seed=0, store=store, batch_size=8, progress=False)
    # batch 0: 5 texts, 4 valid; batch 1: ceil(1/0.8*1.2)=2 texts, both valid: 1 taken, 1 surplus
    assert [k for k, _ in gen.calls] == [5, 2]
    assert (result.accepted, result.attempted, result.rejected, result.surplus) == (5, 6, 1, 1)
    assert store.run(result.run_id)["surplus"] == 1


def test_exactly_n_and_deterministic(toy, store):
    gen = MarginalBaseline.fit(toy)
    a = run_generation(toy, gen, 97, seed=11, store=store, batch_size=32, progress=False)
    b = run_generation(toy, gen, 97, seed=11, store=store, batch_size=32, progress=False)
    c = run_generation(toy, gen, 97, seed=12, store=store, batch_size=32, progress=False)
    ra, rb, rc = (store.records(toy, r.run_id) for r in (a, b, c))
    assert ra.height == rb.height == rc.height == 97
    assert ra.equals(rb) and a.attempted == b.attempted
    assert not ra.equals(rc)


def test_finance_deterministic(finance, tmp_path):
    gen = load_generator(finance, "baseline")
    frames = []
    for name in ("a", "b"):
        with Store(tmp_path / f"{name}.duckdb") as s:
            r = run_generation(finance, gen, 30, seed=5, store=s, batch_size=500, progress=False)
            frames.append(s.records(finance, r.run_id))
    assert frames[0].equals(frames[1])


def test_attempt_budget(toy, store):
    gen = ListGenerator(["garbage"])
    with pytest.raises(AttemptBudgetExceeded) as e:
        run_generation(toy, gen, 10, seed=0, store=store, batch_size=16, max_attempts=40, progress=False)
    msg = str(e.value)
    assert "accepted 0 of 10" in msg and "40 attempts" in msg and "parse/parse: 40" in msg
    assert sum(n for n, _ in gen.calls) == 40  # the budget caps the last batch too
    run = store.runs().row(0, named=True)
    assert run["status"] == "failed" and run["attempted"] == 40 and run["finished_at"] is not None


def test_budget_message_lists_top_reasons(toy, store):
    gen = MarginalBaseline.fit(toy)
    with pytest.raises(AttemptBudgetExceeded, match=r"accepted \d+ of 1,000 .*rule/kind_matches_area: \d+"):
        run_generation(toy, gen, 1000, seed=0, store=store, batch_size=50, max_attempts=100, progress=False)


def test_batch_sizing():
    assert next_batch_size(2000, 500, 0, 0) == 500  # nothing seen yet: no more than could all be needed
    assert next_batch_size(2000, 5000, 0, 0) == 2000
    assert next_batch_size(2000, 500, 0, 700) == 2000  # nothing valid yet: full batches
    assert next_batch_size(2000, 10, 50, 100) == 24  # 10 / 0.5 * 1.2
    assert next_batch_size(2000, 1, 1, 1) == 2  # ceil(1.2)
    assert next_batch_size(100, 10_000, 1, 1000) == 100  # capped
    assert batch_seed(0, 1) == batch_seed(0, 1) != batch_seed(0, 2) != batch_seed(1, 1)


def test_batch_is_atomic(toy, store):
    """If any part of a batch's write fails, none of it is stored (records, rejections, counters)."""
    gen = MarginalBaseline.fit(toy)
    result = run_generation(toy, gen, 20, seed=0, store=store, batch_size=64, progress=False)
    store.start_run("open-run", toy, "baseline", "v", 0, 5, 8, {})
    before = (store.run("open-run"), store.shards("open-run"), store.frame("SELECT count(*) n FROM rejections")["n"].item(),
              store.frame("SELECT count(*) n FROM toy.records")["n"].item())
    records = store.records(toy, result.run_id).head(2).with_columns(
        run_id=pl.lit("open-run"), shard=pl.lit(0), record_id=pl.Series([0, 1]), batch=pl.lit(0))
    bad_rejections = pl.DataFrame({"run_id": ["open-run"], "shard": [0], "attempt_id": [2], "batch": [0],
                                   "stage": ["not-a-stage"], "rule": ["x"], "message": ["x"], "raw_text": ["x"]})
    counters = {"attempted": 3, "accepted": 2, "rejected": 1, "surplus": 0, "batches": 1}
    with pytest.raises(duckdb.ConstraintException):
        store.write_batch("open-run", toy, records, bad_rejections, 0, counters)
    after = (store.run("open-run"), store.shards("open-run"), store.frame("SELECT count(*) n FROM rejections")["n"].item(),
             store.frame("SELECT count(*) n FROM toy.records")["n"].item())
    assert after == before
    store.write_batch("open-run", toy, records, bad_rejections.clear(), 0, counters)  # the same batch, valid
    assert store.run("open-run")["accepted"] == 2 and store.shards("open-run")[0]["status"] == "running"


def test_a_done_shard_is_stored_once(toy, store):
    """Delivering a finished shard again (a retried Ray task) changes nothing."""
    gen = MarginalBaseline.fit(toy)
    result = run_generation(toy, gen, 20, seed=0, store=store, batch_size=64, progress=False)
    before = (store.run(result.run_id), store.records(toy, result.run_id))
    again = store.records(toy, result.run_id).with_columns(
        run_id=pl.lit(result.run_id), shard=pl.lit(0), record_id=pl.int_range(100, 120), batch=pl.lit(7))
    store.write_batch(result.run_id, toy, again, pl.DataFrame(), 0,
                      {"attempted": 99, "accepted": 99, "rejected": 0, "surplus": 0, "batches": 9}, done=True)
    after = (store.run(result.run_id), store.records(toy, result.run_id))
    assert after[0] == before[0] and after[1].equals(before[1])


def test_invalid_arguments(toy, store):
    gen = MarginalBaseline.fit(toy)
    for kwargs in ({"n": 0}, {"n": 5, "batch_size": 0}, {"n": 5, "seed": -1}):
        args = {"n": 5, "seed": 0, "batch_size": 8} | kwargs
        with pytest.raises(ValueError):
            run_generation(toy, gen, store=store, progress=False, **args)


# ---- generators --------------------------------------------------------------------------------
def test_baseline_is_a_generator(finance):
    gen = load_generator(finance, "baseline")
    assert isinstance(gen, Generator) and gen.model_id == "baseline" and len(gen.model_version) == 12
    assert gen.model_version == MarginalBaseline.fit(finance).model_version


def test_baseline_texts(finance):
    gen = load_generator(finance, "baseline")
    texts = gen.generate(300, seed=4)
    assert texts == gen.generate(300, seed=4) and texts != gen.generate(300, seed=5)
    names = finance.spec.generated_names
    frame, _, errors = finance.serializer.parse_many(texts, names)
    assert errors == []
    # the vectorized join writes exactly what the serializer writes
    assert texts == finance.serializer.serialize_frame(frame, names)
    # every value comes from the train split's marginal (nulls included)
    train = finance.to_generated(finance.load_split("train"))
    for name in names:
        assert set(frame[name].to_list()) <= set(train[name].to_list())
    assert frame["annual_income_joint"].null_count() > 0


def test_baseline_is_fast(finance):
    import time

    gen = load_generator(finance, "baseline")
    t = time.perf_counter()
    assert len(gen.generate(100_000, seed=0)) == 100_000
    assert time.perf_counter() - t < 10


def test_load_generator_errors(finance, toy, tmp_path):
    with pytest.raises(GeneratorError, match="unknown model 'gpt'; choose one of: baseline, difflm"):
        load_generator(finance, "gpt")
    with pytest.raises(GeneratorError, match=r"no trained DiffLM stack at .*toy.*factory train --domain toy"):
        load_generator(toy, "difflm")
    (tmp_path / "model").mkdir()  # a model folder without the trained files
    incomplete = dataclasses.replace(finance, root=tmp_path)
    with pytest.raises(GeneratorError, match="missing .*factory train --domain finance"):
        load_generator(incomplete, "difflm")


# ---- shards --------------------------------------------------------------------------------------
def test_shard_sizes_and_seeds():
    assert shard_sizes(10, 3) == [4, 3, 3] and shard_sizes(5, 5) == [1] * 5 and shard_sizes(7, 1) == [7]
    for bad in (0, 11, -1):
        with pytest.raises(ValueError, match="shards must be between 1 and n"):
            shard_sizes(10, bad)
    # a one-shard run keeps the seeds runs always had; shards get their own, all distinct
    assert batch_seed(3, 0) == batch_seed(3, 0, None)
    seeds = {batch_seed(3, b, s) for s in range(4) for b in range(50)} | {batch_seed(3, b) for b in range(50)}
    assert len(seeds) == 250


def test_sharded_run_accounting(toy, store):
    gen = MarginalBaseline.fit(toy)
    result = run_generation(toy, gen, 101, seed=4, store=store, batch_size=16, shards=3, progress=False)
    shards = store.shards(result.run_id)
    assert [s["requested_n"] for s in shards] == [34, 34, 33] == [s["accepted"] for s in shards]
    assert all(s["status"] == "done" and s["worker"] == "local" for s in shards)
    run = store.run(result.run_id)
    for col in ("attempted", "accepted", "rejected", "surplus"):
        assert run[col] == sum(s[col] for s in shards)
    per_shard = store.frame(f"SELECT shard, count(*) n, count(DISTINCT record_id) d FROM toy.records "
                            f"WHERE run_id = ? GROUP BY shard ORDER BY shard", [result.run_id])
    assert per_shard["n"].to_list() == per_shard["d"].to_list() == [34, 34, 33]
    rej = store.frame("SELECT shard, count(DISTINCT attempt_id) n FROM rejections WHERE run_id = ? "
                      "GROUP BY shard ORDER BY shard", [result.run_id])
    assert rej["n"].to_list() == [s["rejected"] for s in shards if s["rejected"]]
    assert result.batches == sum(s["batches"] for s in shards) and result.shards == 3
    # a different shard count is a different (still valid) sample
    other = run_generation(toy, gen, 101, seed=4, store=store, batch_size=16, shards=2, progress=False)
    assert not store.records(toy, other.run_id).equals(store.records(toy, result.run_id))


class Crashing:
    """Wraps a generator; raises after `after` calls, like a process killed mid-run."""

    def __init__(self, inner, after):
        self.inner, self.after, self.calls = inner, after, 0
        self.model_id, self.model_version = inner.model_id, inner.model_version

    def generate(self, n, seed):
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt("killed")
        return self.inner.generate(n, seed)


@pytest.mark.parametrize("after", [1, 4, 9])
def test_interrupted_sharded_run_resumes_to_the_same_records(toy, store, after):
    gen = MarginalBaseline.fit(toy)
    ref = run_generation(toy, gen, 90, seed=8, store=store, batch_size=12, shards=3, progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_generation(toy, Crashing(gen, after), 90, seed=8, store=store, batch_size=12, shards=3,
                       progress=False, run_id="crashed")
    assert store.run("crashed")["status"] == "failed"
    assert sum(s["status"] == "done" for s in store.shards("crashed")) < 3
    resumed = resume_generation(toy, gen, store, "crashed", progress=False)
    assert resumed.accepted == 90
    assert store.records(toy, "crashed").equals(store.records(toy, ref.run_id))
    cols = ["attempted", "accepted", "rejected", "surplus"]
    assert [store.run("crashed")[c] for c in cols] == [store.run(ref.run_id)[c] for c in cols]
    key = "SELECT shard, attempt_id, rule, raw_text FROM rejections WHERE run_id = ? ORDER BY ALL"
    assert store.frame(key, ["crashed"]).equals(store.frame(key, [ref.run_id]))


def test_ctrl_c_inside_a_duckdb_query_is_a_keyboard_interrupt_and_the_run_resumes(toy, store, monkeypatch):
    """DuckDB catches SIGINT during a query itself (RuntimeError 'Query interrupted', the signal consumed):
    the run must still end as a KeyboardInterrupt, with the batch rolled back, and resume to what an
    uninterrupted run stores. A real SIGINT, sent while a long query runs as the third batch is written."""
    import os
    import signal
    import threading

    gen = MarginalBaseline.fit(toy)
    ref = run_generation(toy, gen, 200, seed=4, store=store, batch_size=40, progress=False, allow_drift=True)
    real_write, calls = Store.write_batch, []

    def slow_write(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
            self.con.execute("SELECT count(*) FROM range(10000000000) t(i) WHERE i % 7 = 3").fetchall()
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Store, "write_batch", slow_write)
    with pytest.raises(KeyboardInterrupt):
        run_generation(toy, gen, 200, seed=4, store=store, batch_size=40, progress=False, allow_drift=True,
                       run_id="cut")
    assert len(calls) == 3 and store.run("cut")["status"] == "failed"
    assert store.frame("SELECT count(*) n FROM toy.records WHERE run_id = 'cut'")["n"].item() < 200
    monkeypatch.undo()
    resume_generation(toy, gen, store, "cut", progress=False, allow_drift=True)
    keep = "SELECT * EXCLUDE (run_id) FROM toy.records WHERE run_id = ? ORDER BY shard, record_id"
    assert store.frame(keep, ["cut"]).equals(store.frame(keep, [ref.run_id]))
