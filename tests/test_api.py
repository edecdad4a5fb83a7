"""The library API: a notebook user's two lines, the same records as the CLI, and a refused gate raising."""
import polars as pl
import pytest
from typer.testing import CliRunner

import factory
from factory.cli import app
from factory.store import Store


def test_generate_returns_records_like_the_cli(tmp_path):
    run = factory.generate("toy", 120, seed=3, model="baseline", batch_size=64)
    df = run.records
    assert isinstance(df, pl.DataFrame) and df.height == 120
    assert run.gate is not None and run.gate.status in ("passed", "skipped")
    assert factory.validate("toy", df).n_valid == 120

    db = tmp_path / "factory.duckdb"
    r = CliRunner().invoke(app, ["generate", "-d", "toy", "-n", "120", "--seed", "3", "--model", "baseline",
                                 "--batch-size", "64", "--db", str(db), "-q"])
    assert r.exit_code == 0, r.output
    with Store(db, read_only=True) as s:
        (run_id,), = s.frame("SELECT run_id FROM runs").rows()
        cli_records = s.records(factory.api.load_domain("toy"), run_id)
    assert cli_records.equals(df)  # one loop: same seed and flags, same records

    out = run.export(tmp_path / "toy.parquet")
    assert pl.read_parquet(out).equals(df) and out.with_name("toy.parquet.manifest.json").exists()
    run.close()


def test_refused_gate_raises_with_its_checks(finance):
    with pytest.raises(factory.GateFailed) as e:
        factory.generate(finance, 300, seed=1, model="baseline", batch_size=2000)
    err = e.value
    assert err.failed and all({"check_name", "statistic", "threshold"} <= set(c) for c in err.failed)
    assert err.run.records.height == 300 and err.run.gate.blocks_export  # stored, not exported
    drifted = factory.generate(finance, 300, seed=1, model="baseline", batch_size=2000, allow_drift=True)
    assert drifted.gate.status == "overridden" and drifted.records.equals(err.run.records)


def test_validate_names_the_broken_rule(finance):
    row = finance.load_split("train").head(3).with_columns(pl.col("open_credit_lines") + 1000)
    v = factory.validate("finance", row)
    assert v.n_valid == 0 and "open_lines_within_total" in v.failures["rule"].to_list()


def test_domains_lists_builtin_and_external():
    assert {"finance", "toy"} <= set(factory.domains())


def test_generate_with_a_condition_like_the_cli():
    run = factory.generate("toy", 60, seed=4, model="baseline", batch_size=32, where="width > 8", allow_drift=True)
    assert run.records.height == 60 and (run.records["width"] > 8).all()
    assert run.store.run_settings(run.run_id)["where"] == "width > 8"
    run.close()


@pytest.mark.parametrize("model", ["baseline", "difflm"])
def test_generation_does_not_import_the_evaluation_module_or_transformers(model):
    """The privacy filter's distances live in factory.checks.distance: a run with every gate on loads
    neither factory.evaluate nor SDMetrics/XGBoost; the DiffLM stack samples through DecodeStep
    from `_SamplingLlama`, without importing transformers (157 MiB per worker). Fresh interpreter,
    so other tests cannot hide it."""
    import subprocess
    import sys

    code = (f"import sys, factory; factory.generate('finance', 200, model={model!r}, allow_drift=True, workers=1); "
            "print(sorted(m for m in ('factory.evaluate', 'sdmetrics', 'xgboost', 'transformers') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"
