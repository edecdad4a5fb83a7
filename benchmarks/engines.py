"""Benchmark: the local engine vs a local Ray cluster, same machine, same run.

    python benchmarks/engines.py -n 100000 [--workers 2] [--shards 8]

Runs the real CLI three times, one after another:
  1. `--engine local` (the default: one shard, one process)
  2. `--engine ray --workers W --shards K` (a local Ray cluster started for the run)
  3. `--engine local --shards K` (the same shards as 2, one after another)
and reports wall time, accepted records/s, peak memory of the whole process tree (driver,
Ray's raylet/GCS and workers; sampled every 0.25 s), rule validity, gate result, and whether
exports 2 and 3 are byte-identical (the same seed and shard count must give the same data on
either engine). Target (issue #8): Ray's throughput >= 90% of the local engine's.
Writes reports/benchmarks/engines_<domain>_<n>.{json,md}.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import duckdb  # noqa: E402
import psutil  # noqa: E402

from benchmarks.machine import header, machine_info  # noqa: E402
from factory.store import ATTEMPT_KEY  # noqa: E402

REPORTS = Path(__file__).resolve().parent.parent / "reports" / "benchmarks"
TARGET_RATIO = 0.90


def tree_rss(root: psutil.Process) -> int:
    total = 0
    for p in [root] + root.children(recursive=True):
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def run_cli(label: str, args: list[str], work: Path) -> dict:
    db, out = work / f"{label}.duckdb", work / f"{label}.parquet"
    cmd = [sys.executable, "-m", "factory", "generate", *args, "--db", str(db), "--out", str(out), "--quiet"]
    t = time.time()
    proc = subprocess.Popen(cmd)
    root, peak, done = psutil.Process(proc.pid), 0, threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            try:
                peak = max(peak, tree_rss(root))
            except psutil.NoSuchProcess:
                return
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rc = proc.wait()
    wall = time.time() - t
    done.set()
    sampler.join()
    if rc not in (0, 3):  # 3 = the distribution gate refused the run: reported, not a crash
        raise SystemExit(f"{label}: factory generate failed with exit code {rc}")
    con = duckdb.connect(str(db), read_only=True)
    run_id, attempted, accepted, settings, gate = con.execute(
        "SELECT run_id, attempted, accepted, settings, gate FROM runs").fetchone()
    rule_failed = con.execute(f"SELECT count(DISTINCT {ATTEMPT_KEY}) FROM rejections "
                              "WHERE stage IN ('parse', 'schema', 'rule')").fetchone()[0]
    shards = con.execute("SELECT count(*) FROM shards").fetchone()[0]
    con.close()
    return {"label": label, "command": " ".join(["factory"] + cmd[3:]), "exit_code": rc, "wall_s": round(wall, 1),
            "records_per_s": round(accepted / wall, 1), "peak_tree_rss_gib": round(peak / 2**30, 2),
            "accepted": accepted, "attempted": attempted, "shards": shards, "gate": gate,
            "first_pass_rule_validity": round(1 - rule_failed / attempted, 4),
            "export_sha256": hashlib.sha256(out.read_bytes()).hexdigest() if out.exists() else None,
            "settings": json.loads(settings)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--domain", default="finance")
    ap.add_argument("-n", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shards", type=int, default=None, help="default: 4 per worker (the ray engine's default)")
    ap.add_argument("--out", type=Path, default=REPORTS)
    args = ap.parse_args()
    shards = args.shards or 4 * args.workers
    machine = machine_info()  # before the runs: the load average then is the one that matters
    base = ["--domain", args.domain, "-n", str(args.n), "--seed", str(args.seed)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        local = run_cli("local", base, work)
        ray = run_cli("ray", base + ["--engine", "ray", "--workers", str(args.workers), "--shards", str(shards)], work)
        local_k = run_cli("local_sharded", base + ["--shards", str(shards)], work)
    ratio = ray["records_per_s"] / local["records_per_s"]
    result = {"machine": machine, "domain": args.domain, "n": args.n, "seed": args.seed,
              "workers": args.workers, "shards": shards, "runs": [local, ray, local_k],
              "ray_over_local_throughput": round(ratio, 3), "target_ratio": TARGET_RATIO,
              "meets_target": ratio >= TARGET_RATIO,
              "ray_export_equals_local_sharded_export": ray["export_sha256"] == local_k["export_sha256"]}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"engines_{args.domain}_{args.n}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(
        f"| {r['label']} | `{r['command']}` | {r['shards']} | {r['wall_s']} | {r['records_per_s']:,} | "
        f"{r['peak_tree_rss_gib']} | {r['first_pass_rule_validity']:.2%} | {r['gate']} |" for r in result["runs"])
    title = f"Engines: local vs Ray ({args.domain}, n = {args.n:,})"
    md = f"""{header(title, ' '.join(['python'] + sys.argv), machine)}

| run | command | shards | wall s | accepted records/s | peak RSS, process tree (GiB) | first-pass rule validity | gate |
|---|---|---|---|---|---|---|---|
{rows}

- Ray ({args.workers} single-threaded workers) / local throughput: **{ratio:.2f}**
  (target >= {TARGET_RATIO:.2f}: {'met' if result['meets_target'] else 'NOT met'}).
- Ray export byte-identical to the local engine's with the same seed and {shards} shards:
  **{result['ray_export_equals_local_sharded_export']}**.
- Wall time is the whole command: model load, Ray cluster start-up and worker model loads,
  generation, validation, DuckDB writes, gates and export.
"""
    stem.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
