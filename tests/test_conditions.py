"""--where / --rebalance: every record meets the condition, bad conditions are one-line errors that
store nothing, rebalance shares are exact, conditioned runs are deterministic and resume."""
import json

import duckdb
import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from factory.baseline import MarginalBaseline
from factory.cli import app
from factory.conditions import ConditionError, gate_reference, parse_condition, rebalance_plan
from factory.loop import resume_generation, run_generation

runner = CliRunner()
CONDITIONS = [
    "kind IN ('large')",  # categorical IN
    "label != 'a'",  # != (a null label does not meet it, as in SQL)
    "width > 12",  # numeric >
    "kind = 'small' AND height > 10",  # AND of two columns
    "area >= 150",  # a derived column
]


def violations(records: pl.DataFrame, sql: str) -> int:
    """Checked by a second engine (DuckDB), not by the polars expression the loop uses."""
    con = duckdb.connect()
    con.register("r", records.to_arrow())
    return con.execute(f"SELECT count(*) FROM r WHERE NOT coalesce(({sql}), false)").fetchone()[0]


class Unconditional:
    """A generator that cannot condition: the loop's last check alone must make the condition hold."""

    def __init__(self, inner):
        self.inner, self.model_id, self.model_version = inner, inner.model_id, inner.model_version

    def generate(self, n, seed):
        return self.inner.generate(n, seed)


@pytest.mark.parametrize("sql", CONDITIONS)
def test_condition_holds_on_every_record(toy, store, sql):
    result = run_generation(toy, MarginalBaseline.fit(toy), 120, seed=1, store=store, batch_size=64, progress=False,
                            where=sql, gates=False)
    records = store.records(toy, result.run_id)
    assert records.height == 120 and violations(records, sql) == 0
    settings = store.run_settings(result.run_id)
    assert settings["where"] == sql and settings["shard_conditions"] == [sql]
    assert 0 < settings["conditions"][0]["support"] < 1


@pytest.mark.parametrize("sql", ["width > 12", "kind = 'small' AND height > 10"])
def test_rows_that_miss_the_condition_are_rejected_last_with_stage_condition(toy, store, sql):
    result = run_generation(toy, Unconditional(MarginalBaseline.fit(toy)), 60, seed=2, store=store, batch_size=64,
                            progress=False, where=sql, gates=False)
    records = store.records(toy, result.run_id)
    assert records.height == 60 and violations(records, sql) == 0
    rej = store.frame("SELECT attempt_id, stage, rule, raw_text FROM rejections WHERE run_id = ?", [result.run_id])
    cond = rej.filter(pl.col("stage") == "condition")
    assert cond.height > 0 and set(cond["rule"]) == {"where"}
    # 'condition' is the last step: such an attempt broke no rule and was not a copy
    assert not set(cond["attempt_id"]) & set(rej.filter(pl.col("stage") != "condition")["attempt_id"])
    run = store.run(result.run_id)
    assert run["attempted"] == run["accepted"] + run["rejected"]


def test_forced_columns_include_the_determinant_of_a_derived_categorical(finance):
    assert parse_condition(finance, "grade IN ('E','F','G')").forced == ("sub_grade",)
    c = parse_condition(finance, "term = 60 AND homeownership = 'RENT'")
    assert set(c.forced) == {"term", "homeownership"} and c.columns == ("term", "homeownership")
    assert parse_condition(finance, "annual_income > 100000").forced == ("annual_income",)
    assert parse_condition(finance, "installment > 500").forced == ()  # derived numeric: the last check only


@pytest.mark.parametrize("sql, fragment", [
    ("nosuch = 1", "unknown column 'nosuch'"),
    ("kind > 5", "type mismatch"),
    ("width = 'wide'", "type mismatch"),
    ("kind = 'huge'", "no real toy train row meets it"),
    ("width > 1000", "no real toy train row meets it"),
    ("width >", "cannot parse"),
    ("width + 1", "not true/false"),
])
def test_bad_condition_is_one_line_exit_2_and_stores_nothing(tmp_path, sql, fragment):
    db = tmp_path / "c.duckdb"
    r = runner.invoke(app, ["generate", "-d", "toy", "-n", "10", "--model", "baseline", "--db", str(db),
                            "--where", sql, "-q"])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], r.output
    assert not db.exists()


@pytest.mark.parametrize("spec, fragment", [
    ("nosuch", "unknown column"), ("width", "numeric"), ("kind:small=0.5,large=0.4", "sum to 0.9"),
    ("kind:tiny=1", "not a value of kind"), ("kind:small=x,large=0.5", "must be a number"),
])
def test_bad_rebalance_is_one_line_exit_2(tmp_path, spec, fragment):
    db = tmp_path / "c.duckdb"
    r = runner.invoke(app, ["generate", "-d", "toy", "-n", "10", "--model", "baseline", "--db", str(db),
                            "--rebalance", spec, "-q"])
    assert r.exit_code == 2 and fragment in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not db.exists()


def test_low_support_warns_with_the_support(toy, tmp_path):
    sql = "weight > 49.5"  # 4 of the 240 toy train rows (1.67%) ...
    assert not parse_condition(toy, sql).low_support
    sql = "weight > 49.5 AND kind = 'small'"  # ... and 1 of them small (0.42% < 1%)
    assert parse_condition(toy, sql).low_support
    r = runner.invoke(app, ["generate", "-d", "toy", "-n", "5", "--model", "baseline", "--db",
                            str(tmp_path / "c.duckdb"), "--where", sql, "-q", "--allow-drift"])
    assert r.exit_code == 0, r.output
    assert "warning: few real rows meet weight > 49.5 AND kind = 'small' (met by 1 of 240 train rows, 0.42%)" in " ".join(r.output.split())


@pytest.mark.parametrize("spec, n, expected", [
    ("kind", 101, {"small": 51, "large": 50}),
    ("label:a=0.25,b=0.75", 40, {"a": 10, "b": 30}),
])
def test_rebalance_shares_are_exact(toy, store, spec, n, expected):
    result = run_generation(toy, MarginalBaseline.fit(toy), n, seed=3, store=store, batch_size=32, progress=False,
                            rebalance=spec, gates=False)
    records = store.records(toy, result.run_id)
    column = spec.split(":")[0]
    assert dict(records[column].value_counts().iter_rows()) == expected
    assert result.shards == len(expected)


def test_rebalance_plan_counts_sum_to_n_and_combine_with_where(toy):
    plan = rebalance_plan(toy, "kind", 7, where="height > 5")
    assert [k for _, k in plan] == [4, 3] and all("AND (height > 5)" in sql for sql, _ in plan)
    with pytest.raises(ConditionError, match="too small"):
        rebalance_plan(toy, "label:a=0.01,b=0.99", 10)


def test_gate_reference_is_the_real_rows_meeting_the_condition(toy):
    ref = gate_reference(toy, ["width > 12", "width > 12"], [5, 5])
    train = toy.load_split("train")
    assert ref.equals(train.filter(pl.col("width") > 12))
    assert gate_reference(toy, [None], [10]) is None
    # a rebalance: each category in its requested share (equal here), at the weighted sample's effective size
    ref = gate_reference(toy, ["kind = 'small'", "kind = 'large'"], [50, 50])
    shares = ref["kind"].value_counts(normalize=True)
    assert shares["proportion"].to_list() == pytest.approx([0.5, 0.5], abs=0.01)


def test_conditioned_runs_are_deterministic_per_seed(toy, store):
    gen = MarginalBaseline.fit(toy)
    a, b, c = (run_generation(toy, gen, 80, seed=s, store=store, batch_size=16, progress=False, where="width > 8",
                              gates=False) for s in (5, 5, 6))
    ra, rb, rc = (store.records(toy, r.run_id) for r in (a, b, c))
    assert ra.equals(rb) and not ra.equals(rc)


class Crashing:
    def __init__(self, inner, after):
        self.inner, self.after, self.calls = inner, after, 0
        self.model_id, self.model_version, self.conditional = inner.model_id, inner.model_version, True

    def generate(self, n, seed, condition=None):
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt("killed")
        return self.inner.generate(n, seed, condition=condition)


@pytest.mark.parametrize("opts", [{"where": "height > 6"}, {"rebalance": "kind:small=0.3,large=0.7"}])
def test_interrupted_conditioned_run_resumes_to_the_same_records(toy, store, opts):
    gen = MarginalBaseline.fit(toy)
    ref = run_generation(toy, gen, 60, seed=8, store=store, batch_size=8, progress=False, **opts)
    with pytest.raises(KeyboardInterrupt):
        run_generation(toy, Crashing(gen, 3), 60, seed=8, store=store, batch_size=8, progress=False,
                       run_id="crashed", **opts)
    resumed = resume_generation(toy, gen, store, "crashed", progress=False)  # no condition passed: settings give it
    assert resumed.accepted == 60
    assert store.records(toy, "crashed").equals(store.records(toy, ref.run_id))
    assert store.run("crashed")["gate"] == store.run(ref.run_id)["gate"]


def test_manifest_records_the_condition(toy, tmp_path):
    out = tmp_path / "x.parquet"
    r = runner.invoke(app, ["generate", "-d", "toy", "-n", "30", "--model", "baseline", "--db",
                            str(tmp_path / "c.duckdb"), "--where", "width > 10", "-q", "--allow-drift",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    manifest = json.loads(out.with_name(out.name + ".manifest.json").read_text())
    assert manifest["condition"]["where"] == "width > 10"
    train = toy.load_split("train")
    assert manifest["condition"]["conditions"][0]["train_rows_meeting"] == train.filter(pl.col("width") > 10).height
    assert (pl.read_parquet(out)["width"] > 10).all()


def test_resume_refuses_a_new_condition(tmp_path):
    r = runner.invoke(app, ["generate", "--resume", "x", "--where", "width > 3", "--db", str(tmp_path / "c.duckdb")])
    assert r.exit_code == 2 and "condition" in r.output


def test_decoder_row_masks_force_a_value_per_row_and_fall_back_when_infeasible(finance):
    from factory.difflm.decoder import DecoderConfig, DomainDecoder
    from factory.difflm.tokenizer import NULL, SchemaTokenizer

    tok = SchemaTokenizer(finance.spec, finance.spec.generated_names)
    torch.manual_seed(0)
    dec = DomainDecoder(DecoderConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, prompt_len=2,
                                      vocab_size=tok.vocab_size, seq_len=tok.length)).freeze()
    t = next(i for i, s in enumerate(tok.slots) if s.column == "sub_grade")
    values = ["E1", "G1", "A1", "F3"] * 8
    mask = torch.zeros(len(values), tok.vocab_size, dtype=torch.bool)
    mask[torch.arange(len(values)), torch.tensor([tok.cat_ids["sub_grade"][v] for v in values])] = True
    mask[-1] = False  # infeasible for the last row: it keeps the schema mask
    mask[-1, NULL] = True  # (sub_grade is not nullable)
    ids = dec.generate(None, tok, torch.Generator().manual_seed(1), batch=len(values), row_masks={t: mask})
    got = tok.decode(ids)["sub_grade"].to_list()
    assert got[:-1] == values[:-1] and got[-1] in finance.spec["sub_grade"].values
    # without the hook the same draws do not reproduce the forced values
    free = tok.decode(dec.generate(None, tok, torch.Generator().manual_seed(1), batch=len(values)))["sub_grade"]
    assert free.to_list()[:-1] != values[:-1]


# ---- the conditional DiffLM stage ----------------------------------------------------------
def test_condition_codec_bins_and_absent_columns(finance):
    from factory.difflm.condition import ABSENT, FIRST, NULL_ID, CodecConfig, ConditionCodec, column_dropout

    train = finance.load_split("train")
    codec = ConditionCodec(CodecConfig.fit(finance.spec, train, bins=4))
    assert codec.names == finance.spec.names  # exported columns only, no latent ones
    c = codec.encode(train.head(200), keep=["grade", "annual_income", "annual_income_joint"])
    j = {n: i for i, n in enumerate(codec.names)}
    assert (c[:, j["state"]] == ABSENT).all()
    grades = train.head(200)["grade"].to_list()
    assert c[:, j["grade"]].tolist() == [FIRST + finance.spec["grade"].values.index(g) for g in grades]
    bins = c[:, j["annual_income"]]
    assert bins.min() >= FIRST and bins.max() <= FIRST + 3 and len(set(bins.tolist())) > 1
    joint_null = train.head(200)["annual_income_joint"].is_null().to_numpy()
    assert (c[joint_null, j["annual_income_joint"]] == NULL_ID).all()
    back = codec.encode(train.head(200))
    kept = column_dropout(back, torch.Generator().manual_seed(0), p_empty=0.2, max_keep=3)
    n_kept = (kept != ABSENT).sum(1)
    assert n_kept.max() <= 3 and 0.1 < (n_kept == 0).float().mean() < 0.35
    assert ((kept == back) | (kept == ABSENT)).all()


@pytest.mark.slow
def test_tiny_conditional_stage_trains_saves_and_generates_records_meeting_the_condition(finance, tmp_path, store):
    import shutil

    from factory.difflm.pipeline import DiffLMGenerator
    from factory.difflm.train import ConditionalConfig, ConditionalTrainer

    stack = tmp_path / "model"
    shutil.copytree(finance.model_dir, stack, ignore=shutil.ignore_patterns("conditional"))
    cfg = ConditionalConfig(max_train_rows=96, epochs=1, batch=32, diffusion_steps=30, diffusion_batch=32)
    summary = ConditionalTrainer(finance, stack, cfg).run()
    assert summary["condition_columns"] == finance.spec.names
    for rel in ["condition_codec.json", "injector/injector.safetensors", "denoiser/denoiser.safetensors",
                "denoiser/latent_stats.safetensors", "encoder/encoder_adapter.safetensors", "decoder/decoder.safetensors"]:
        assert (stack / "conditional" / rel).is_file(), rel
    log = [json.loads(line) for line in open(stack / "conditional" / "train_log.jsonl")]
    assert [r["epoch"] for r in log if r["stage"] == "cvae"] == [0, 1]
    gen = DiffLMGenerator.from_pretrained(stack, finance)
    assert gen.cstack is not None and gen.settings["conditional_stack"]
    sql = "grade IN ('E','F','G') AND annual_income > 60000"
    runs = [run_generation(finance, gen, 40, seed=3, store=store, batch_size=40, progress=False, where=sql,
                           gates=False) for _ in range(2)]
    a, b = (store.records(finance, r.run_id) for r in runs)
    assert a.height == 40 and violations(a, sql) == 0 and a.equals(b)


# ---- sequential importance resampling (conditioning="resample") ----------------------------
def test_systematic_resample_keeps_each_row_in_proportion_to_its_weight():
    from factory.difflm.decoder import systematic_resample

    w = torch.tensor([0.0, 0.5, 0.25, 0.25])
    for seed in range(5):
        idx = systematic_resample(w.log(), torch.Generator().manual_seed(seed), 8)
        assert torch.bincount(idx, minlength=4).tolist() == [0, 4, 2, 2]  # exact: floor/ceil of n * w
    idx = systematic_resample(torch.tensor([float("-inf"), 0.0, float("-inf")]), torch.Generator().manual_seed(0))
    assert idx.tolist() == [1, 1, 1]  # a row of weight 0 is never kept
    idx = systematic_resample(torch.zeros(6), torch.Generator().manual_seed(0), 3)
    assert len(idx) == 3 and len(set(idx.tolist())) == 3  # fewer rows than particles: no row twice


def _sharp_decoder(tok, seed=0):
    from factory.difflm.decoder import DecoderConfig, DomainDecoder

    torch.manual_seed(seed)
    dec = DomainDecoder(DecoderConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, prompt_len=2,
                                      vocab_size=tok.vocab_size, seq_len=tok.length))
    with torch.no_grad():  # a random LM whose columns depend strongly on each other
        dec.lm.get_input_embeddings().weight.mul_(40)
    return dec.freeze()


def test_resampling_follows_the_lms_conditional_where_forcing_does_not(finance):
    """A condition on a later column (homeownership) must shift an earlier one (application_type)
    as the LM's own joint does. Reference: the LM's exact conditional, by rejection from a large
    unconditional sample."""
    from factory.difflm.tokenizer import SchemaTokenizer

    tok = SchemaTokenizer(finance.spec, finance.spec.generated_names)
    dec = _sharp_decoder(tok)
    n = 6000

    def shares(ids, column):
        vals = tok.decode(ids)[column].cast(pl.String).fill_null("null")
        return vals.value_counts(normalize=True).sort(column)

    free = dec.generate(None, tok, torch.Generator().manual_seed(1), batch=4 * n)
    rare = shares(free, "homeownership").sort("proportion")["homeownership"][0]  # the condition: the rarest value
    reference = tok.decode(free).filter(pl.col("homeownership") == rare)
    assert reference.height > 300
    want = reference["application_type"].value_counts(normalize=True).sort("application_type")
    narrowing = tok.narrowing({"homeownership": {rare}})
    smc = dec.generate(None, tok, torch.Generator().manual_seed(2), batch=n, narrowing=narrowing)
    t = next(i for i, s in enumerate(tok.slots) if s.column == "homeownership")
    mask = torch.zeros(n, tok.vocab_size, dtype=torch.bool)
    mask[:, tok.cat_ids["homeownership"][rare]] = True
    forced = dec.generate(None, tok, torch.Generator().manual_seed(2), batch=n, row_masks={t: mask})

    def gap(ids):
        got = shares(ids, "application_type").join(want, on="application_type", how="full", coalesce=True)
        return 0.5 * (got["proportion"].fill_null(0) - got["proportion_right"].fill_null(0)).abs().sum()

    assert (tok.decode(smc)["homeownership"] == rare).all()
    assert gap(forced) > 0.1  # the test can fail: forcing keeps the LM's marginal of the earlier column
    assert gap(smc) < 0.04


def test_particles_keep_the_rows_asked_for_and_more_of_them_distinct(finance):
    from factory.difflm.tokenizer import SchemaTokenizer

    tok = SchemaTokenizer(finance.spec, finance.spec.generated_names)
    dec = _sharp_decoder(tok)
    narrowing = tok.narrowing({"homeownership": {"OWN"}, "term": {60}})
    t = next(i for i, s in enumerate(tok.slots) if s.column == "term")
    distinct = []
    for particles in (1, 4):
        ids = dec.generate(None, tok, torch.Generator().manual_seed(3), batch=400 * particles, narrowing=narrowing,
                           keep=400)
        assert ids.shape == (400, tok.length)
        got = tok.decode(ids)
        assert (got["homeownership"] == "OWN").all() and (got["term"] == 60).all()
        distinct.append(torch.unique(ids[:, :t], dim=0).shape[0])
    assert distinct[1] > distinct[0]


def test_numeric_narrowing_keeps_values_inside_the_interval(finance):
    from factory.difflm.tokenizer import SchemaTokenizer

    tok = SchemaTokenizer(finance.spec, finance.spec.generated_names)
    dec = _sharp_decoder(tok, seed=1)
    narrowing = tok.narrowing({"annual_income": (123456.78, 150000.0, False)})
    got = tok.decode(dec.generate(None, tok, torch.Generator().manual_seed(4), batch=300, narrowing=narrowing))
    income = got["annual_income"]
    assert income.null_count() == 0 and income.min() >= 123456.78 and income.max() <= 150000.0
    # no value at all (the real rows meeting a condition have only nulls there): null only
    got = tok.decode(dec.generate(None, tok, torch.Generator().manual_seed(5), batch=100,
                                  narrowing=tok.narrowing({"application_type": {"individual"},
                                                          "annual_income_joint": (1.0, 0.0, True)})))
    assert got["annual_income_joint"].null_count() == 100


@pytest.mark.parametrize("opts, fragment", [({"conditioning": "magic"}, "conditioning must be one of resample, force"),
                                            ({"particles": 0}, "particles must be a positive integer"),
                                            ({"particles": True}, "particles must be a positive integer")])
def test_bad_conditioning_options_are_one_line_model_errors(finance, opts, fragment):
    from factory.difflm.pipeline import DiffLMGenerator, ModelError

    with pytest.raises(ModelError, match=fragment):
        DiffLMGenerator.from_pretrained(finance.model_dir, finance, **opts)
