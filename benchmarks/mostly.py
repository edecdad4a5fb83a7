"""MOSTLY AI's open-source engine (PyPI `mostlyai-engine`, TabularARGN) as a side-by-side peer.

It runs in its own Python (`--mostly PYTHON`, e.g. a venv), never in this project's: it pins its
own torch stack. Set up here (2026-12-02) as:

    python -m venv /work/venvs/mostly
    /work/venvs/mostly/bin/pip install <the local torch 2.13.0 CPU wheel>
    /work/venvs/mostly/bin/pip install -c <(echo torch==2.13.0+cpu) mostlyai-engine==2.7.3
    /work/venvs/mostly/bin/pip uninstall -y torchvision torchaudio   # CUDA builds that fail to import

`run_mostly` fits once on a frame and runs several sampling jobs in one subprocess:
- {"name", "n"}: `sample(n_samples=n)`;
- {"name", "seed": frame}: seeded generation, `sample(seed_data=frame)` (one row per seed row,
  its columns fixed: MOSTLY AI's conditional generation);
- {"name", "n", "rebalancing": {"column", "probabilities"}}: `sample(rebalancing=...)`.
Each job's output comes back as a polars frame with the domain's dtypes (`benchmarks.peers.from_sdv`
does the same for SDV), with its wall time. Every sample call is seeded (`set_random_state`).
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import polars as pl

SCRIPT = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
import pandas as pd
t = time.time()
from mostlyai.engine import TabularARGN, set_random_state
spec = json.load(open(sys.argv[1]))
out = {"import_s": round(time.time() - t, 1), "jobs": {}}
train = pd.read_parquet(spec["train"])
t = time.time()
model = TabularARGN(max_training_time=spec["max_training_time"], random_state=spec["seed"],
                    workspace_dir=spec["workspace"])
model.fit(train)
out["fit_s"] = round(time.time() - t, 1)
for job in spec["jobs"]:
    set_random_state(spec["seed"])
    kw = {}
    if "seed" in job:
        kw["seed_data"] = pd.read_parquet(job["seed"])
    else:
        kw["n_samples"] = job["n"]
    if "rebalancing" in job:
        kw["rebalancing"] = job["rebalancing"]
    t = time.time()
    synth = model.sample(**kw)
    s = time.time() - t
    synth.to_parquet(job["out"])
    out["jobs"][job["name"]] = {"sample_s": round(s, 2), "rows": len(synth)}
print(json.dumps(out))
"""


def run_mostly(python: str, train: pl.DataFrame, spec, work: Path, jobs: list[dict], seed: int = 0,
               max_training_time: float = 1.0) -> dict:
    """Fit TabularARGN on `train` (`max_training_time` minutes) and run `jobs` (see the module
    docstring). -> {"fit_s", "import_s", "jobs": {name: {"sample_s", "rows", "frame"}}} or {"error"}."""
    from benchmarks.peers import from_sdv

    work.mkdir(parents=True, exist_ok=True)
    _pandas(train.select(spec.names), spec).to_parquet(work / "train.parquet")
    plan = []
    for job in jobs:
        j = {k: v for k, v in job.items() if k != "seed"}
        j["out"] = str(work / f"{job['name']}.parquet")
        if "seed" in job:
            j["seed"] = str(work / f"{job['name']}_seed.parquet")
            _pandas(job["seed"], spec).to_parquet(j["seed"])
        plan.append(j)
    (work / "plan.json").write_text(json.dumps({"train": str(work / "train.parquet"), "jobs": plan, "seed": seed,
                                                "max_training_time": max_training_time,
                                                "workspace": str(work / "workspace")}))
    (work / "mostly_job.py").write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([python, str(work / "mostly_job.py"), str(work / "plan.json")], capture_output=True,
                       text=True, env=env, cwd=work)
    if p.returncode != 0:
        return {"error": p.stderr.strip().splitlines()[-1][:300] if p.stderr.strip() else f"exit {p.returncode}"}
    out = json.loads(p.stdout.strip().splitlines()[-1])
    for j in plan:
        out["jobs"][j["name"]]["frame"] = from_sdv(pl.read_parquet(j["out"]).to_pandas(), spec)
    return out


def _pandas(frame: pl.DataFrame, spec):
    """Int categoricals as strings, as for SDV (`benchmarks.peers.to_sdv`), for any subset of columns."""
    from schemas.columns import Categorical

    return frame.with_columns([pl.col(c.name).cast(pl.String) for c in spec.columns
                               if c.name in frame.columns and isinstance(c, Categorical) and c.is_int]).to_pandas()
