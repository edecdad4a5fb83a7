"""Benchmark: `factory generate` end to end (model load, generation, validation, DuckDB writes, export).

    python benchmarks/generate.py -n 100000 [--references]

Runs the real CLI in a subprocess, then reads the run's accounting from DuckDB.
With --references it also times, in the same run on the same machine, sampling
the same n raw rows from the marginal baseline and (if SDV is installed) SDV's
GaussianCopula and CTGAN, with their raw rule validity (fit time reported apart).
Writes reports/benchmarks/generate_<domain>_<n>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import duckdb  # noqa: E402

from benchmarks.machine import header, machine_info  # noqa: E402
from factory.domain import load_domain  # noqa: E402
from factory.store import ATTEMPT_KEY  # noqa: E402

REPORTS = Path(__file__).resolve().parent.parent / "reports" / "benchmarks"
TARGET_S, TARGET_RSS_GIB = 600, 4.0


def run_cli(domain: str, n: int, seed: int, model: str | None, work: Path) -> dict:
    db, out = work / "bench.duckdb", work / "bench.parquet"
    cmd = [sys.executable, "-m", "factory", "generate", "--domain", domain, "-n", str(n), "--seed", str(seed),
           "--db", str(db), "--out", str(out), "--quiet"] + (["--model", model] if model else [])
    t = time.time()
    rc = subprocess.run(cmd).returncode  # 3 = the distribution gate refused the run: report it
    wall = time.time() - t
    if rc not in (0, 3):
        raise SystemExit(f"factory generate failed with exit code {rc}")
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # the only child so far
    con = duckdb.connect(str(db), read_only=True)
    run = con.execute("SELECT run_id, model_id, model_version, attempted, accepted, rejected, surplus, settings, "
                      "gate FROM runs").fetchone()
    failed_checks = con.execute("SELECT check_name, statistic, threshold FROM checks WHERE status = 'failed'").fetchall()
    stages = dict(con.execute(f"SELECT stage, count(DISTINCT {ATTEMPT_KEY}) FROM rejections GROUP BY stage").fetchall())
    rules = con.execute(f"SELECT rule, count(DISTINCT {ATTEMPT_KEY}) c FROM rejections GROUP BY rule ORDER BY c DESC "
                        "LIMIT 8").fetchall()
    rule_failed = con.execute(f"SELECT count(DISTINCT {ATTEMPT_KEY}) FROM rejections "
                              "WHERE stage IN ('parse', 'schema', 'rule')").fetchone()[0]
    con.close()
    _, model_id, version, attempted, accepted, rejected, surplus, settings, gate = run
    return {"command": " ".join(["factory"] + cmd[3:]), "wall_s": round(wall, 1), "peak_rss_gib": round(rss, 2),
            "model": f"{model_id} {version}", "settings": json.loads(settings) if settings else {},
            "accepted": accepted, "attempted": attempted, "rejected": rejected, "surplus": surplus,
            "records_per_s": round(accepted / wall, 1), "attempts_per_accepted": round(attempted / accepted, 4),
            "first_pass_acceptance": round(accepted / attempted, 4),
            "first_pass_rule_validity": round(1 - rule_failed / attempted, 4), "parse_rejections": stages.get("parse", 0),
            "rejections_by_stage": stages, "top_rules": dict(rules),
            "gate": gate, "failed_checks": failed_checks, "exit_code": rc,
            "export_bytes": out.stat().st_size if out.exists() else None,
            "meets_targets": {"wall_le_600s": wall <= TARGET_S, "rss_lt_4gib": rss < TARGET_RSS_GIB,
                              "zero_parse_rejections": stages.get("parse", 0) == 0,
                              "first_pass_rule_validity_ge_95": 1 - rule_failed / attempted >= 0.95}}


def references(domain, n: int, seed: int, ctgan_epochs: int) -> dict:
    """Raw sampling of n rows by reference generators (no loop, no rejection): speed and validity."""
    from factory.baseline import MarginalBaseline

    out = {}
    t = time.time()
    base = MarginalBaseline.fit(domain)
    fit = time.time() - t
    t = time.time()
    texts = base.generate(n, seed)
    frame, _, errors = domain.serializer.parse_many(texts, domain.spec.generated_names)
    full = domain.complete(frame)
    sample = time.time() - t
    out["marginal baseline"] = {"fit_s": round(fit, 1), "sample_s": round(sample, 1),
                                "raw_validity": round(domain.validator.validate(full).n_valid / n, 4)}
    try:
        from benchmarks.peers import SDV_TABLE, from_sdv, make_sdv, sdv_metadata, to_sdv
    except ImportError as e:
        out["sdv"] = f"not installed ({e})"
        return out
    train = domain.load_split("train")
    for kind, epochs in (("gaussian_copula", 0), ("ctgan", ctgan_epochs)):
        model = make_sdv(kind, sdv_metadata(domain.spec), epochs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = time.time()
            model.fit({SDV_TABLE: to_sdv(train, domain.spec)})
            fit = time.time() - t
            t = time.time()
            pdf = model.sample(num_rows=n)[SDV_TABLE]
            sample = time.time() - t
        synth = from_sdv(pdf, domain.spec)
        out[f"SDV {kind}" + (f" ({epochs} epochs)" if epochs else "")] = {
            "fit_s": round(fit, 1), "sample_s": round(sample, 1),
            "raw_validity": round(domain.validator.validate(synth).n_valid / n, 4)}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--domain", default="finance")
    ap.add_argument("-n", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="default: the domain's default model")
    ap.add_argument("--references", action="store_true")
    ap.add_argument("--ctgan-epochs", type=int, default=50, help="only sampling speed is compared, so fewer epochs")
    args = ap.parse_args()
    info = machine_info()
    domain = load_domain(args.domain)
    with tempfile.TemporaryDirectory() as tmp:
        result = {"machine": info, "factory": run_cli(args.domain, args.n, args.seed, args.model, Path(tmp))}
    if args.references:
        result["references"] = references(domain, args.n, args.seed, args.ctgan_epochs)
    REPORTS.mkdir(parents=True, exist_ok=True)
    stem = f"generate_{args.domain}_{args.n}"
    (REPORTS / f"{stem}.json").write_text(json.dumps(result, indent=1))
    f = result["factory"]
    md = header(f"`factory generate --domain {args.domain} -n {args.n:,}`", "python benchmarks/generate.py "
                + " ".join(sys.argv[1:]), info)
    md += (f"\n| measure | value | target |\n|---|---|---|\n"
           f"| wall time, end to end | {f['wall_s']:.0f} s ({f['wall_s'] / 60:.1f} min) | <= 600 s |\n"
           f"| peak memory (RSS) | {f['peak_rss_gib']:.2f} GiB | < 4 GiB |\n"
           f"| accepted records/s | {f['records_per_s']} | |\n"
           f"| attempts per accepted record | {f['attempts_per_accepted']} | |\n"
           f"| first-pass rule validity (parse + schema + rules) | {f['first_pass_rule_validity']:.2%} | >= 95% |\n"
           f"| first-pass acceptance (also privacy) | {f['first_pass_acceptance']:.2%} | |\n"
           f"| parse rejections | {f['parse_rejections']} | 0 |\n"
           f"| distribution gate | {f['gate']} {f['failed_checks'] or ''} | passed |\n"
           f"| model | {f['model']} | |\n| settings | `{json.dumps(f['settings'])}` | |\n"
           f"\nRejections by stage: {f['rejections_by_stage']}; top rules: {f['top_rules']}\n")
    if args.references:
        md += ("\n## Reference points (same machine, same run): sampling the same n raw rows\n\n"
               "| generator | fit (s) | sample (s) | raw rule validity |\n|---|---|---|---|\n")
        for k, v in result["references"].items():
            md += f"| {k} | {v['fit_s']} | {v['sample_s']} | {v['raw_validity']:.2%} |\n" if isinstance(v, dict) \
                else f"| {k} | {v} | | |\n"
    (REPORTS / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
