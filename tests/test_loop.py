import dataclasses

import duckdb
import polars as pl
import pytest

from factory.baseline import MarginalBaseline
from factory.generators import Generator, GeneratorError, load_generator
from factory.loop import AttemptBudgetExceeded, batch_seed, next_batch_size, run_generation
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
    result = run_generation(finance, gen, 60, seed=0, store=store, batch_size=1000, progress=False)
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
    before = (store.run(result.run_id), store.frame("SELECT count(*) n FROM rejections")["n"].item(),
              store.frame("SELECT count(*) n FROM toy.records")["n"].item())
    records = store.records(toy, result.run_id).head(2).with_columns(
        run_id=pl.lit(result.run_id), record_id=pl.Series([10_000, 10_001]), batch=pl.lit(99))
    bad_rejections = pl.DataFrame({"run_id": [result.run_id], "attempt_id": [10_002], "batch": [99],
                                   "stage": ["not-a-stage"], "rule": ["x"], "message": ["x"], "raw_text": ["x"]})
    with pytest.raises(duckdb.ConstraintException):
        store.write_batch(result.run_id, toy, records, bad_rejections,
                          {"attempted": 1, "accepted": 1, "rejected": 1, "surplus": 1})
    after = (store.run(result.run_id), store.frame("SELECT count(*) n FROM rejections")["n"].item(),
             store.frame("SELECT count(*) n FROM toy.records")["n"].item())
    assert after == before


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
    train = finance.load_split("train")
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
