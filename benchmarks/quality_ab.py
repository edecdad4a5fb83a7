"""Benchmark: quality of this checkout's exported records against an earlier checkout's, same seeds.

    python benchmarks/quality_ab.py --before /tmp/before --seeds 7 8 9 10 11 12 [-n 10000]

For a change that alters the records but should not alter their quality (a faster kernel, a
different rounding): for each seed, each checkout runs `factory.generate` in its own subprocess
(so each imports its own factory; local engine, 1 worker, gate recorded, not enforced) and writes
its accepted records; this checkout's `factory.evaluate` then scores both, so only the records
differ: SDMetrics shapes and trends against the held-out test split, and MLE ratios. Reports each
seed, the means and the paired differences (after - before). Writes
reports/benchmarks/quality_ab_<domain>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.machine import header, machine_info  # noqa: E402
from factory import evaluate as ev  # noqa: E402
from factory.domain import load_domain  # noqa: E402

REPORTS = ROOT / "reports" / "benchmarks"
CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import factory
from factory.domain import load_domain
t = time.time()
run = factory.generate(load_domain(sys.argv[2]), int(sys.argv[3]), seed=int(sys.argv[4]), allow_drift=True, workers=1)
run.records.write_parquet(sys.argv[5])
print(json.dumps({"factory": factory.__file__, "wall_s": round(time.time() - t, 1), "attempted": run.result.attempted,
                  "gate": run.result.gate.status if run.result.gate else "off",
                  "settings": getattr(run.generator, "settings", {})}, default=str))
run.close()
"""


def generate(checkout: Path, domain: str, n: int, seed: int, out: Path) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, str(checkout), domain, str(n), str(seed), str(out)],
                       cwd=checkout, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{checkout} seed {seed} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    import polars as pl

    ap = argparse.ArgumentParser()
    ap.add_argument("--before", type=Path, required=True, help="a checkout of the earlier commit")
    ap.add_argument("--domain", default="finance")
    ap.add_argument("-n", type=int, default=10_000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[7, 8, 9, 10, 11, 12])
    args = ap.parse_args()
    if not (args.before / "factory" / "__init__.py").is_file():
        ap.error(f"--before {args.before}: not a checkout of this project (no factory/__init__.py)")
    info = machine_info()
    before_commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.before, capture_output=True,
                                   text=True).stdout.strip()
    domain = load_domain(args.domain)
    train, test = domain.load_split("train"), domain.load_split("test")
    real_mle = ev.mle(train, test, domain)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for side, checkout in (("before", args.before.resolve()), ("after", ROOT)):
                out = Path(tmp) / f"{side}_{seed}.parquet"
                run = generate(checkout, args.domain, args.n, seed, out)
                e = ev.evaluate(domain, pl.read_parquet(out), train, test, real_mle=real_mle)
                rows.append({"side": side, "seed": seed, **run, "shapes": e["quality"]["column_shapes"],
                             "trends": e["quality"]["column_pair_trends"], "mle": e["mle"]["ratio"]})
                r = rows[-1]
                print(f"[{side} seed {seed}] gate {r['gate']}, shapes {r['shapes']:.4f}, trends {r['trends']:.4f}, "
                      f"mle {r['mle']}", flush=True)
    tasks = list(rows[0]["mle"])
    metrics = ["shapes", "trends"] + tasks

    def value(r, m):
        return r["mle"][m] if m in tasks else r[m]

    by = {(r["side"], r["seed"]): r for r in rows}
    summary = {m: {"before": statistics.mean(value(by["before", s], m) for s in args.seeds),
                   "after": statistics.mean(value(by["after", s], m) for s in args.seeds),
                   "paired_diffs": [value(by["after", s], m) - value(by["before", s], m) for s in args.seeds]}
               for m in metrics}
    REPORTS.mkdir(parents=True, exist_ok=True)
    result = {"machine": info, "before_commit": before_commit, "args": {**vars(args), "before": str(args.before)},
              "rows": rows, "summary": summary}
    (REPORTS / f"quality_ab_{args.domain}.json").write_text(json.dumps(result, indent=1, default=str))
    md = header(f"Quality before/after: {args.domain}, commit {before_commit} vs {info['commit']}",
                "python benchmarks/quality_ab.py " + " ".join(sys.argv[1:]), info)
    md += (f"\n{args.n:,} accepted records per run (`factory.generate`, 1 worker, gate recorded); both sides "
           "scored by this checkout's `factory.evaluate` against the held-out test split.\n\n"
           f"| seed | side | gate | settings.kv_cache | column shapes | pair trends | "
           + " | ".join(f"MLE {t}" for t in tasks) + " |\n|---|---|---|---|---|---|" + "---|" * len(tasks) + "\n")
    for r in rows:
        md += (f"| {r['seed']} | {r['side']} | {r['gate']} | {r['settings'].get('kv_cache', '-')} | {r['shapes']:.4f} | "
               f"{r['trends']:.4f} | " + " | ".join(f"{r['mle'][t]:.3f}" for t in tasks) + " |\n")
    md += ("\n| metric | mean before | mean after | paired differences (after - before) | largest |\n"
           "|---|---|---|---|---|\n")
    for m, s in summary.items():
        d = s["paired_diffs"]
        md += (f"| {m} | {s['before']:.4f} | {s['after']:.4f} | {', '.join(f'{x:+.4f}' for x in d)} | "
               f"{max(d, key=abs):+.4f} |\n")
    (REPORTS / f"quality_ab_{args.domain}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
