"""Model and checkpoint files are data, never code; a bad field is one line (issue 17, item 5)."""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from factory.difflm.config import ModelError
from factory.difflm.pipeline import DiffLMGenerator
from factory.difflm.train import TrainConfig, _safe_load, commit_stack, stack_manifest, staging_dir
from helpers import assert_one_line_error, invoke

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "domains" / "finance" / "model"
TINY = {"max_train_rows": 64, "lm_epochs": 1, "vae_epochs": 1, "diffusion_steps": 10,
        "decoder": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32, "prompt_len": 2},
        "denoiser": {"latent_dim": 4, "hidden": 16, "blocks": 1, "emb_dim": 8}, "sampler": {"steps": 2}}


class Planted:
    """Unpickling this writes a file: proof that a checkpoint ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_no_unsafe_torch_load_in_the_engine():
    for path in (ROOT / "factory").rglob("*.py"):
        for call in re.findall(r"torch\.load\([^)]*\)", path.read_text()):
            assert "weights_only=True" in call, f"{path}: {call}"


def test_a_pickle_in_a_checkpoint_never_runs(tmp_path):
    marker = tmp_path / "marker.txt"
    bad = tmp_path / "lm.pt"
    torch.save({"model": Planted(marker)}, bad)
    with pytest.raises(ModelError, match="cannot be loaded safely"):
        _safe_load(bad)
    assert not marker.exists()
    truncated = tmp_path / "vae.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(ModelError, match="vae.pt cannot be loaded safely"):
        _safe_load(truncated)


def test_train_resume_refuses_a_planted_checkpoint_in_one_line(tmp_path):
    marker = tmp_path / "marker.txt"
    out = tmp_path / "model"
    ckpt = staging_dir(out) / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.save({"model": Planted(marker)}, ckpt / "lm.pt")
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    line = assert_one_line_error(invoke("train", "--domain", "finance", "--config", tmp_path / "tiny.json",
                                        "--out", out, "--resume", "--db", tmp_path / "t.duckdb", "--quiet"))
    assert "lm.pt cannot be loaded safely" in line and not marker.exists() and not out.exists()


@pytest.mark.parametrize("config, message", [
    ("{x", "not valid JSON"), ("[]", "must be a JSON object"),
    (json.dumps({"lm_batch": 1e30}), "field lm_batch must be an integer"),
    (json.dumps({"sampler": {"steps": -1}}), "section sampler: field steps must be >= 1, got -1"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
], ids=["broken", "list", "huge-batch", "steps", "deeply-nested"])
def test_train_config_errors_are_one_line(tmp_path, config, message):
    (tmp_path / "c.json").write_text(config)
    line = assert_one_line_error(invoke("train", "--domain", "finance", "--config", tmp_path / "c.json", "--out",
                                        tmp_path / "m", "--db", tmp_path / "t.duckdb", "--quiet"))
    assert message in line and "c.json" in line, line


def test_train_user_mistakes_are_one_line(tmp_path):
    line = assert_one_line_error(invoke("train", "--domain", "nope", "--out", tmp_path / "m"))
    assert "unknown domain" in line.lower()
    corrupt = tmp_path / "bad.duckdb"
    corrupt.write_text("not a database" * 100)
    line = assert_one_line_error(invoke("train", "--domain", "finance", "--out", tmp_path / "m", "--db", corrupt,
                                        "--quiet"))
    assert "bad.duckdb" in line
    line = assert_one_line_error(invoke("train", "--domain", "finance", "--out", tmp_path / "m", "--resume", "--quiet"))
    assert "nothing to resume" in line


@pytest.fixture
def stack(tmp_path):
    dst = tmp_path / "stack"
    shutil.copytree(SHIPPED, dst)
    return dst


def _generate_error(stack, tmp_path):
    return assert_one_line_error(invoke("generate", "-d", "finance", "-n", 5, "--model-dir", stack, "--db",
                                        tmp_path / "g.duckdb", "-q"))


@pytest.mark.parametrize("rel, content, message", [
    ("pipeline.json", "{x", "pipeline.json: not valid JSON"),
    ("pipeline.json", "[]", "pipeline.json: must be a JSON object, got list"),
    ("tokenizer.json", "[]", "tokenizer.json: must be a JSON object"),
    ("decoder/decoder_config.json", None, "field hidden_size must be an integer, got \"128\""),
    ("denoiser/sampler_config.json", {"steps": -1}, "field steps must be >= 1, got -1"),
    ("denoiser/sampler_config.json", {"rho": 0}, "field rho must be > 0, got 0"),
    ("injector/injector_config.json", {"hidden": 10**12}, "field hidden must be an integer of at most"),
], ids=["pipeline-broken", "pipeline-list", "tokenizer-list", "hidden-string", "steps", "rho", "huge"])
def test_bad_stack_files_are_one_line(stack, tmp_path, rel, content, message):
    path = stack / rel
    if content is None:
        path.write_text(json.dumps({**json.loads(path.read_text()), "hidden_size": "128"}))
    elif isinstance(content, dict):
        path.write_text(json.dumps({**json.loads(path.read_text()), **content}))
    else:
        path.write_text(content)
    line = _generate_error(stack, tmp_path)
    assert message in line, line


@pytest.mark.parametrize("rel, content, message", [
    ("conditional/injector/injector_config.json", {"cond_dim": 0}, "field cond_dim must be >= 1, got 0"),
    ("conditional/denoiser/denoiser_config.json", {"cond_sizes": 5}, "field cond_sizes must be a list, got 5"),
], ids=["cond-dim", "cond-sizes"])
def test_bad_conditional_stage_files_are_one_line(stack, tmp_path, rel, content, message):
    """The conditional stage's configs go through the same checks as the base stack's (Pretrained)."""
    path = stack / rel
    path.write_text(json.dumps({**json.loads(path.read_text()), **content}))
    line = assert_one_line_error(invoke("generate", "-d", "finance", "-n", 5, "--model-dir", stack,
                                        "--where", "term = 60", "--db", tmp_path / "g.duckdb", "-q"))
    assert message in line, line


def test_a_stack_is_committed_whole_and_checked_on_load(stack, tmp_path, finance):
    info = json.loads((stack / "pipeline.json").read_text())
    info["files"] = stack_manifest(stack)
    (stack / "pipeline.json").write_text(json.dumps(info))
    DiffLMGenerator.from_pretrained(stack, finance)  # every file is the one recorded
    # a mixed stack (new decoder, old injector) is refused: the manifest names the odd file
    mixed = tmp_path / "mixed"
    shutil.copytree(stack, mixed)
    w = mixed / "injector" / "injector.safetensors"
    w.write_bytes(w.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    with pytest.raises(ModelError, match="injector/injector.safetensors is missing or differs"):
        DiffLMGenerator.from_pretrained(mixed, finance)
    # commit: the finished staging folder replaces the old stack in one rename; nothing else is left
    final = tmp_path / "final"
    shutil.copytree(SHIPPED, final)
    staging = staging_dir(final)
    shutil.copytree(stack, staging)
    (staging / "checkpoints").mkdir()
    (staging / "checkpoints" / "lm.pt").write_bytes(b"x")
    commit_stack(staging, final)
    assert json.loads((final / "pipeline.json").read_text())["files"] == info["files"]
    assert not staging.exists() and not (final / "checkpoints").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "mixed", "stack"]


def test_train_config_fields_are_checked(finance):
    assert TrainConfig.from_dict(finance.config["train"]).decoder.hidden_size == 128
    with pytest.raises(ModelError, match="section decoder: field hidden_size must be an integer"):
        TrainConfig.from_dict({"decoder": {"hidden_size": "128"}})
    with pytest.raises(ModelError, match="field beta_factor must be in"):
        TrainConfig.from_dict({"beta_factor": 2.0})


def test_training_never_replaces_a_trained_stack_without_force(finance, tmp_path):
    """`factory train --domain finance` would train into the shipped stack's folder: refused in one line,
    naming --out and --force; nothing in the folder changes."""
    from factory.difflm.pipeline import model_checksum

    before = model_checksum(finance.model_dir)
    line = assert_one_line_error(invoke("train", "-d", "finance", "--db", tmp_path / "t.duckdb", "--quiet"))
    assert "already holds a trained stack" in line and "--out DIR" in line and "--force" in line, line
    assert model_checksum(finance.model_dir) == before
    assert not (finance.model_dir.parent / ".model.training").exists()


def test_training_holds_the_database_only_while_it_writes(monkeypatch, tmp_path):
    """While a training runs, another process can open --db (here: read-only, as `factory sql` does);
    the log lines written before and after are all there."""
    import subprocess
    import sys

    import factory.difflm.train as train_module

    db = tmp_path / "t.duckdb"
    seen = {}

    class FakeTrainer:
        def __init__(self, dom, cfg, out, log, progress):
            self.log = log

        def run(self, resume=False):
            self.log({"stage": "lm", "epoch": 1, "train_nll_per_token": 1.0})
            probe = subprocess.run([sys.executable, "-c", "import duckdb, sys; c = duckdb.connect(sys.argv[1], "
                                    "read_only=True); print(c.execute('SELECT count(*) FROM train_log').fetchone()[0])",
                                    str(db)], capture_output=True, text=True, timeout=60)
            seen["probe"] = probe
            self.log({"stage": "lm", "epoch": 2, "train_nll_per_token": 0.9})
            return {"total_s": 0.0}

    monkeypatch.setattr(train_module, "Trainer", FakeTrainer)
    r = invoke("train", "-d", "finance", "--out", tmp_path / "m", "--db", db, "--quiet")
    assert r.exit_code == 0, r.output
    assert seen["probe"].returncode == 0, seen["probe"].stderr[-500:]  # opened while the training ran
    assert seen["probe"].stdout.strip() == "1"
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT count(*) FROM train_log").fetchone()[0] == 2
    assert con.execute("SELECT status FROM train_runs").fetchall() == [("succeeded",)]
    con.close()
