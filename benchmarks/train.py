"""Benchmark: train a domain's DiffLM stack with the real CLI and report time, losses and memory.

    python benchmarks/train.py --domain finance --out /tmp/finance_model

Runs `python -m factory train --domain D --out OUT` in a subprocess (the exact
user command), then writes reports/benchmarks/train_<domain>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.machine import header, machine_info  # noqa: E402

REPORTS = Path(__file__).resolve().parent.parent / "reports" / "benchmarks"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--domain", default="finance")
    ap.add_argument("--out", default="/tmp/factory_train_bench")
    ap.add_argument("--config", default=None)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    info = machine_info()
    cmd = [sys.executable, "-m", "factory", "train", "--domain", args.domain, "--out", args.out,
           "--db", str(Path(args.out).with_suffix(".duckdb")), "--quiet"]
    if args.config:
        cmd += ["--config", args.config]
    if args.resume:
        cmd += ["--resume"]
    t = time.time()
    subprocess.run(cmd, check=True)
    wall = time.time() - t
    rss_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    log = [json.loads(line) for line in open(Path(args.out) / "train_log.jsonl")]
    summary = json.loads((Path(args.out) / "pipeline.json").read_text())
    last = {s: [r for r in log if r.get("stage") == s][-1] for s in ("lm", "vae", "diffusion")}
    result = {"machine": info, "command": " ".join(cmd[2:]).replace("-m factory", "factory"), "wall_s": round(wall, 1),
              "peak_rss_gib": round(rss_gib, 2), "stages_s": summary["times_s"], "final": last, "log": log,
              "target_s": 3600, "meets_target": wall <= 3600}
    REPORTS.mkdir(parents=True, exist_ok=True)
    (REPORTS / f"train_{args.domain}.json").write_text(json.dumps(result, indent=1))
    md = header(f"Training the {args.domain} DiffLM stack", "python benchmarks/train.py " + " ".join(sys.argv[1:]), info)
    md += (f"\n| stage | wall time (s) |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in summary["times_s"].items())
           + f"| **total (process)** | **{wall:.0f}** ({wall / 60:.1f} min; target <= 60 min: "
           f"{'met' if wall <= 3600 else 'NOT met'}) |\n\nPeak RSS: {rss_gib:.2f} GiB\n\n## Per-epoch losses\n\n"
           "| stage | epoch/step | metrics |\n|---|---|---|\n")
    for r in log:
        if r.get("stage") in ("lm", "vae", "diffusion"):
            m = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k not in ("stage", "epoch", "step")}
            md += f"| {r['stage']} | {r.get('epoch', r.get('step'))} | {m} |\n"
    (REPORTS / f"train_{args.domain}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
