"""End to end through the real CLI: train a tiny DiffLM stack, resume it, generate valid records with it."""
import json

import duckdb
import polars as pl
import pytest

from factory.domain import load_domain
from helpers import factory_run

pytestmark = pytest.mark.slow

TINY = {
    "max_train_rows": 400, "lm_epochs": 4, "lm_batch": 32, "lm_lr": 0.005, "vae_epochs": 2, "vae_batch": 32,
    "diffusion_steps": 300,
    "decoder": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128, "prompt_len": 2},
    "encoder": {"lora_layers": 1, "lora_r": 4},
    "denoiser": {"latent_dim": 8, "hidden": 64, "blocks": 2, "emb_dim": 32},
    "sampler": {"steps": 10},
}


def factory(*args, cwd):
    return factory_run(*args, cwd=cwd, timeout=900)  # training the tiny stack takes minutes


@pytest.fixture(scope="module")
def tiny_stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("difflm")
    (tmp / "tiny.json").write_text(json.dumps(TINY))
    r = factory("train", "--domain", "finance", "--config", "tiny.json", "--out", "model", "--db", "t.duckdb",
                "--quiet", cwd=tmp)
    assert r.returncode == 0, r.stderr[-2000:]
    return tmp


def test_train_writes_a_complete_small_stack_and_logs_losses(tiny_stack):
    model = tiny_stack / "model"
    for rel in ["tokenizer.json", "pipeline.json", "train_config.json", "decoder/decoder.safetensors",
                "encoder/encoder_adapter.safetensors", "injector/injector.safetensors",
                "denoiser/denoiser.safetensors", "denoiser/latent_stats.safetensors"]:
        assert (model / rel).is_file(), rel
    # the encoder is saved as a LoRA adapter + head, never as a copy of the 90 MB base model
    assert (model / "encoder/encoder_adapter.safetensors").stat().st_size < 2_000_000
    log = [json.loads(line) for line in open(model / "train_log.jsonl")]
    assert {r["stage"] for r in log} >= {"lm", "vae", "diffusion", "done"}
    lm = [r["val_nll_per_token"] for r in log if r["stage"] == "lm"]
    assert lm[-1] < lm[0]  # the decoder learned something
    vae = [r for r in log if r["stage"] == "vae"]
    assert all({"beta", "train_recon", "train_kl", "val_recon"} <= set(r) for r in vae)
    con = duckdb.connect(str(tiny_stack / "t.duckdb"), read_only=True)
    assert con.execute("SELECT status FROM train_runs").fetchall() == [("succeeded",)]
    assert con.execute("SELECT count(*) FROM train_log WHERE stage = 'vae'").fetchone()[0] == len(vae)


def test_resume_of_a_finished_stack_is_refused_and_keeps_it(tiny_stack):
    """A finished training leaves no staging folder: --resume has nothing of its own to continue,
    so it says so instead of building on the finished (or shipped) stack."""
    dec = (tiny_stack / "model/decoder/decoder.safetensors").read_bytes()
    r = factory("train", "--domain", "finance", "--config", "tiny.json", "--out", "model", "--db", "t.duckdb",
                "--quiet", "--resume", cwd=tiny_stack)
    assert r.returncode == 2 and "nothing to resume" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert (tiny_stack / "model/decoder/decoder.safetensors").read_bytes() == dec
    assert not (tiny_stack / ".model.training").exists()
    info = json.loads((tiny_stack / "model/pipeline.json").read_text())
    assert "decoder/decoder.safetensors" in info["files"]  # every file's sha256, checked on load


def test_generate_with_the_tiny_stack_exports_only_valid_records(tiny_stack):
    args = ["generate", "--domain", "finance", "-n", "20", "--model", "difflm", "--model-dir", "model",
            "--seed", "1", "--db", "g.duckdb", "--batch-size", "500", "--max-attempts", "30000", "--quiet",
            "--allow-drift"]  # a 4-epoch stack is far from the real distribution; every run is gated, even 20 records
    r = factory(*args, "--out", "a.parquet", cwd=tiny_stack)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    r2 = factory(*args, "--out", "b.parquet", cwd=tiny_stack)
    assert r2.returncode == 0
    a = pl.read_parquet(tiny_stack / "a.parquet")
    assert a.height == 20
    assert a.equals(pl.read_parquet(tiny_stack / "b.parquet"))  # same seed, same records
    domain = load_domain("finance")
    assert domain.validator.validate(a).n_valid == 20
    v = factory("validate", "--domain", "finance", "a.parquet", cwd=tiny_stack)
    assert v.returncode == 0, v.stdout
    con = duckdb.connect(str(tiny_stack / "g.duckdb"), read_only=True)
    model_id, stage_counts = con.execute("SELECT model_id FROM runs LIMIT 1").fetchone()[0], dict(
        con.execute("SELECT stage, count(DISTINCT attempt_id) FROM rejections GROUP BY stage").fetchall())
    assert model_id == "difflm"
    assert stage_counts.get("parse", 0) == 0  # schema-guided decoding: nothing unparsable


def test_generate_with_a_stack_for_the_wrong_columns_is_a_clear_error(tiny_stack, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_stack / "model", bad)
    info = json.loads((bad / "pipeline.json").read_text())
    info["columns"] = info["columns"][:-1]
    (bad / "pipeline.json").write_text(json.dumps(info))
    r = factory("generate", "--domain", "finance", "-n", "5", "--model", "difflm", "--model-dir", str(bad),
                "--db", str(tmp_path / "x.duckdb"), cwd=tiny_stack)
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout
    assert "other columns" in r.stderr + r.stdout
    (bad / "pipeline.json").write_text(json.dumps(info | {"columns": json.loads((tiny_stack / "model/pipeline.json").read_text())["columns"]}))
    (bad / "decoder/decoder.safetensors").write_bytes(b"\x00" * 10)  # truncated weights
    r = factory("generate", "--domain", "finance", "-n", "5", "--model", "difflm", "--model-dir", str(bad),
                "--db", str(tmp_path / "x.duckdb"), cwd=tiny_stack)
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout, r.stderr[-1500:]
