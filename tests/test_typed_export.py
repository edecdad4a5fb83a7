"""Exports keep their types: money as exact decimals by default (float on request), lineage columns on
request, file modes from the umask, and a manifest that says what the file holds."""
import json
import os
from decimal import Decimal

import polars as pl
import pytest
from typer.testing import CliRunner

import factory
from factory.cli import app
from factory.store import Store


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    db = tmp_path_factory.mktemp("typed") / "factory.duckdb"
    r = factory.generate("finance", 200, seed=2, model="baseline", batch_size=2000, allow_drift=True, db=db)
    yield r
    r.close()


def test_money_is_decimal_by_default_and_exact(run, tmp_path):
    out = run.export(tmp_path / "x.parquet", allow_drift=True)
    df = pl.read_parquet(out)
    money = [c.name for c in run.domain.spec.columns if getattr(c, "decimals", 0)]
    assert money and all(df.schema[c] == pl.Decimal(18, run.domain.spec[c].decimals) for c in money)
    stored = run.store.frame(f"SELECT installment FROM finance.records WHERE run_id = ? ORDER BY shard, record_id",
                             [run.run_id])["installment"]
    assert df["installment"].to_list() == stored.to_list()  # the stored DECIMAL values, digit for digit
    assert all(isinstance(v, Decimal) for v in df["installment"].head(5))
    assert factory.validate("finance", df).n_valid == df.height  # decimals are judged like the spec's floats
    manifest = json.loads(out.with_name("x.parquet.manifest.json").read_text())
    assert manifest["money"] == "decimal" and manifest["lineage"] is False
    assert {"name": "installment", "type": "Decimal(precision=18, scale=2)"} in manifest["columns"]
    csv = tmp_path / "x.csv"
    run.export(csv, allow_drift=True)
    first = csv.read_text().splitlines()[1].split(",")
    assert first[run.domain.spec.names.index("installment")].split(".")[1].__len__() == 2  # 2 decimals as text


def test_float_on_request_and_lineage(run, tmp_path):
    out = run.export(tmp_path / "f.parquet", allow_drift=True, money="float", lineage=True)
    df = pl.read_parquet(out)
    assert df.columns[:3] == ["run_id", "shard", "record_id"] and df["run_id"].unique().to_list() == [run.run_id]
    assert df.schema["installment"] == pl.Float64
    assert df.drop("run_id", "shard", "record_id").equals(run.records)
    r = CliRunner().invoke(app, ["validate", "-d", "finance", str(out)])  # lineage columns are not rule-checked
    assert r.exit_code == 0, r.output


def test_file_modes_follow_the_umask(run, tmp_path):
    old = os.umask(0o027)
    try:
        out = run.export(tmp_path / "m.parquet", allow_drift=True)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o640
    assert out.with_name("m.parquet.manifest.json").stat().st_mode & 0o777 == 0o640


def test_bad_money_is_one_line(run, tmp_path):
    r = CliRunner().invoke(app, ["export", run.run_id, "--db", str(run.store.path), "--out", str(tmp_path / "b.csv"),
                                 "--money", "cents"])
    assert r.exit_code == 2 and r.output.strip() == "error: --money must be one of decimal, float, got 'cents'"
