import dataclasses

import duckdb
import polars as pl
import pytest

from factory.baseline import MarginalBaseline
from factory.export import ExportError, export_run, write_frame
from factory.inputs import InputError, read_table
from factory.loop import run_generation
from factory.store import SCHEMA_VERSION, Store, StoreError
from schemas.columns import Numeric, TableSpec


@pytest.fixture
def toy_run(toy, store):
    result = run_generation(toy, MarginalBaseline.fit(toy), 40, seed=1, store=store, batch_size=32, progress=False)
    return store, result.run_id


# ---- store ---------------------------------------------------------------------------------------
def test_reopen_keeps_runs(toy, tmp_path):
    path = tmp_path / "f.duckdb"
    with Store(path) as s:
        run_id = run_generation(toy, MarginalBaseline.fit(toy), 5, 0, s, 8, progress=False).run_id
    with Store(path, read_only=True) as s:
        assert s.run(run_id)["accepted"] == 5
        assert s.frame("SELECT value FROM meta WHERE key = 'schema_version'").item() == SCHEMA_VERSION


def test_not_a_duckdb_file(tmp_path):
    path = tmp_path / "junk.duckdb"
    path.write_text("this is not a database\n" * 100)
    with pytest.raises(StoreError, match="cannot open .* as a DuckDB database"):
        Store(path)


def test_other_schema_version(tmp_path):
    path = tmp_path / "old.duckdb"
    Store(path).close()
    con = duckdb.connect(str(path))
    con.execute("UPDATE meta SET value = '0' WHERE key = 'schema_version'")
    con.close()
    with pytest.raises(StoreError, match=f"schema version 0, this factory needs {SCHEMA_VERSION}"):
        Store(path)


def test_foreign_duckdb_database(tmp_path):
    path = tmp_path / "other.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE t (x INT)")
    con.close()
    with pytest.raises(StoreError, match="not a factory store"):
        Store(path)


def test_bad_paths(tmp_path):
    with pytest.raises(StoreError, match="no database at"):
        Store(tmp_path / "missing.duckdb", read_only=True)
    with pytest.raises(StoreError, match="does not exist"):
        Store(tmp_path / "no" / "dir.duckdb")
    with pytest.raises(StoreError, match="is a directory"):
        Store(tmp_path)


def test_read_only_rejects_writes(toy_run, tmp_path):
    store, run_id = toy_run
    store.close()
    with Store(store.path, read_only=True) as ro:
        assert ro.query("SELECT count(*) AS n FROM toy.records")["n"].item() == 40
        for sql in ("DELETE FROM runs", "DROP TABLE rejections", f"COPY runs TO '{tmp_path}/x.csv'"):
            with pytest.raises(StoreError, match="SQL error"):
                ro.query(sql)
        with pytest.raises(StoreError, match="SQL error: Parser Error"):
            ro.query("SELEC 1")


def test_records_table_is_typed_from_spec(finance, store):
    store.ensure_domain(finance)
    types = dict(store.frame("SELECT column_name, data_type FROM information_schema.columns "
                             "WHERE table_schema = 'finance' AND table_name = 'records'").iter_rows())
    assert types["loan_amount"] == "BIGINT" and types["interest_rate"] == "DECIMAL(18,2)"
    assert types["state"] == "VARCHAR" and types["term"] == "BIGINT"


def test_spec_change_is_detected(toy, toy_run):
    store, _ = toy_run
    changed = dataclasses.replace(toy, spec=TableSpec(toy.spec.columns + (Numeric("extra", 0, 1),)))
    with pytest.raises(StoreError, match="different toy column spec"):
        store.ensure_domain(changed)


def test_unusable_domain_name(toy, store):
    with pytest.raises(StoreError, match="cannot name a DuckDB schema"):
        store.ensure_domain(dataclasses.replace(toy, name="main"))


def test_lineage_view(toy_run):
    store, run_id = toy_run
    rows = store.frame("SELECT DISTINCT run_id, model_id, seed FROM toy.lineage").to_dicts()
    assert rows == [{"run_id": run_id, "model_id": "baseline", "seed": 1}]


# ---- export --------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", ["parquet", "csv"])
def test_export_round_trip(toy, toy_run, tmp_path, ext):
    store, run_id = toy_run
    path = tmp_path / f"out.{ext}"
    assert export_run(store, toy, run_id, path) == 40
    back = read_table(path, toy.spec)
    assert back.equals(store.records(toy, run_id)) and back.columns == toy.spec.names
    assert toy.validator.validate(back).n_valid == 40
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp file left


def test_manifest_counts_attempts_per_shard(toy, store, tmp_path):
    """Attempt ids restart in every shard: the manifest counts (shard, attempt) pairs."""
    import json

    result = run_generation(toy, MarginalBaseline.fit(toy), 120, seed=2, store=store, batch_size=16, shards=3,
                            progress=False, allow_drift=True)
    path = tmp_path / "sharded.parquet"
    export_run(store, toy, result.run_id, path, allow_drift=True)
    manifest = json.loads((tmp_path / "sharded.parquet.manifest.json").read_text())
    rej = store.frame("SELECT shard, attempt_id, stage, rule FROM rejections WHERE run_id = ? AND attempt_id IS NOT NULL",
                      [result.run_id])
    per_shard = rej.group_by("shard", "stage").agg(pl.col("attempt_id").n_unique()).group_by("stage").agg(
        pl.col("attempt_id").sum())
    want = dict(per_shard.iter_rows())
    assert want["rule"] > rej.filter(pl.col("stage") == "rule").group_by("shard").len()["len"].max()  # ids repeat
    assert {k: v["attempts"] for k, v in manifest["rejections_by_stage"].items() if k != "distribution"} == want
    assert manifest["settings"]["shards"] == 3 and manifest["settings"]["engine"] == "local"
    assert manifest["counts"]["accepted"] == 120 == pl.read_parquet(path).height


def test_export_refuses_overwrite(toy, toy_run, tmp_path):
    store, run_id = toy_run
    path = tmp_path / "out.parquet"
    path.write_text("keep me")
    with pytest.raises(ExportError, match="already exists; pass --force"):
        export_run(store, toy, run_id, path)
    assert path.read_text() == "keep me"
    export_run(store, toy, run_id, path, force=True)
    assert pl.read_parquet(path).height == 40


@pytest.mark.parametrize("name,msg", [("out.xlsx", "unknown extension '.xlsx'"),
                                      ("missing/out.csv", "does not exist"),
                                      ("adir.csv", "is a directory")])
def test_export_bad_targets(tmp_path, name, msg):
    (tmp_path / "adir.csv").mkdir()
    with pytest.raises(ExportError, match=msg):
        write_frame(pl.DataFrame({"a": [1]}), tmp_path / name)


def test_export_unknown_run(toy, toy_run, tmp_path):
    store, _ = toy_run
    with pytest.raises(StoreError, match="no run 'nope'"):
        export_run(store, toy, "nope", tmp_path / "x.csv")


# ---- reading user files --------------------------------------------------------------------------
def test_read_table_errors(toy, tmp_path):
    good = toy.load_split("val")
    cases = {
        "missing.csv": (good.drop("area", "label"), "missing columns: label, area"),
        "extra.parquet": (good.with_columns(x=pl.lit(1)), "unexpected columns: x"),
        "text.csv": (good.with_columns(width=pl.lit("wide")), "column 'width' cannot be read as Int64"),
        "frac.parquet": (good.with_columns(height=pl.col("height") + 0.5), "column 'height' holds non-integer"),
    }
    for name, (df, msg) in cases.items():
        path = tmp_path / name
        df.write_csv(path) if name.endswith(".csv") else df.write_parquet(path)
        with pytest.raises(InputError, match=msg):
            read_table(path, toy.spec)
    with pytest.raises(InputError, match="no such file"):
        read_table(tmp_path / "nope.csv", toy.spec)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(InputError, match="unknown extension"):
        read_table(tmp_path / "x.json", toy.spec)
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(InputError, match="cannot read"):
        read_table(tmp_path / "bad.parquet", toy.spec)


def test_read_table_reorders_and_casts(toy, tmp_path):
    good = toy.load_split("val")
    path = tmp_path / "shuffled.parquet"
    good.select(reversed(good.columns)).with_columns(pl.col("width").cast(pl.Float64)).write_parquet(path)
    assert read_table(path, toy.spec).equals(good)
