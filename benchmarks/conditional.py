"""Benchmark: conditional generation (`--where`, `--rebalance`), issue 15.

    OMP_NUM_THREADS=1 python benchmarks/conditional.py -n 2000 --seed 7

For each condition, every method makes n accepted records through the library entry point
(`factory.loop.run_generation`, a temporary DuckDB; rules, privacy filter and the
condition's last check all apply):
- difflm_conditional   drawn condition values, mask forcing, z ~ p(z | c), injector(z, c) (the default)
- difflm_cond_prior_z  the same conditional stage with z ~ N(0, I) (the diffusion ablation)
- difflm_mask_only     the shipped unconditional stack, condition columns forced in the mask only
- force_on_uncond      an unconditional difflm sample with the condition's columns overwritten by
                       values drawn from the real rows that meet it (the baseline to beat)
- sdv_gaussian_copula  SDV 2 GaussianCopula fitted on train, `sample_from_conditions` with one
                       `Condition` per combination of the named columns' values, in the real
                       conditional shares (SDV conditions are equalities); its raw output, judged
                       by the same rules (no factory loop: nothing is rejected or topped up)
Fidelity: per exported column, KS (numeric) or TVD (categorical) between the method's records
and the real train rows that meet the condition; the target per column is the same statistic
between those real train rows and the real val rows that meet it, + 0.05. Cost: attempts per
accepted record. Then rebalancing grade to equal shares: each share, and interest_rate's KS
within each grade vs that grade's real train rows.
Writes reports/benchmarks/conditional_<domain>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from benchmarks.machine import header, machine_info  # noqa: E402
from factory.checks.distribution import ks_statistic, shares, tvd  # noqa: E402
from factory.conditions import parse_condition  # noqa: E402
from factory.domain import load_domain  # noqa: E402
from factory.loop import run_generation  # noqa: E402
from factory.store import Store  # noqa: E402
from schemas.columns import NULL_TEXT, Numeric  # noqa: E402

REPORTS = Path(__file__).resolve().parent.parent / "reports" / "benchmarks"
CONDITIONS = ("grade IN ('E','F','G')", "loan_status != 'Current'", "term = 60 AND homeownership = 'RENT'")
METHODS = ("difflm_conditional", "difflm_cond_prior_z", "difflm_mask_only", "force_on_uncond", "sdv_gaussian_copula")
MARGIN = 0.05


def column_stat(spec, name: str, a: pl.DataFrame, b: pl.DataFrame) -> float:
    if isinstance(spec[name], Numeric):
        return ks_statistic(a[name].cast(pl.Float64).to_numpy(), b[name].cast(pl.Float64).to_numpy())
    ca, cb = (f[name].cast(pl.String).fill_null(NULL_TEXT) for f in (a, b))
    cats = sorted(set(ca.unique().to_list()) | set(cb.unique().to_list()))
    return tvd(shares(ca, cats), shares(cb, cats))


def fidelity(domain, records: pl.DataFrame, real_train: pl.DataFrame, real_val: pl.DataFrame) -> dict:
    cols = {}
    for name in domain.spec.names:
        stat = column_stat(domain.spec, name, records, real_train)
        target = column_stat(domain.spec, name, real_val, real_train) + MARGIN
        cols[name] = {"stat": round(stat, 4), "target": round(target, 4), "ok": stat <= target}
    stats = [c["stat"] for c in cols.values()]
    return {"columns": cols, "mean_stat": round(float(np.mean(stats)), 4), "max_stat": round(float(np.max(stats)), 4),
            "columns_ok": sum(c["ok"] for c in cols.values()), "n_columns": len(cols),
            "failed": [k for k, c in cols.items() if not c["ok"]]}


def generate(domain, gen, n, seed, where=None, rebalance=None, gates=True):
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "b.duckdb") as store:
        t = time.perf_counter()
        r = run_generation(domain, gen, n, seed, store, batch_size=1000, progress=False, where=where,
                           rebalance=rebalance, gates=gates, allow_drift=True)
        seconds = time.perf_counter() - t
        records = store.records(domain, r.run_id)
        by_stage = store.frame("SELECT stage, count(DISTINCT attempt_id) AS n FROM rejections WHERE run_id = ? "
                               "AND attempt_id IS NOT NULL GROUP BY stage", [r.run_id])
    gate = None if r.gate is None else {"status": r.gate.status, "failed": [c.name for c in r.gate.failed],
                                        "checks": len(r.gate.checks)}
    return records, {"attempted": r.attempted, "accepted": r.accepted,
                     "attempts_per_record": round(r.attempted / r.accepted, 3), "seconds": round(seconds, 1),
                     "rejected_by_stage": dict(by_stage.iter_rows()), "gate": gate}


def force_on(domain, uncond: pl.DataFrame, cond, seed: int) -> pl.DataFrame:
    """Overwrite the condition's columns (and the generated columns forced for it) with values
    drawn from real rows that meet it; every other column stays as the unconditional sample made it."""
    rows = cond.draw(uncond.height, seed)
    names = list(dict.fromkeys([*cond.columns, *cond.forced]))
    return uncond.with_columns([rows[c].alias(c) for c in names])


def sdv_conditional(domain, model, cond, n: int) -> tuple[pl.DataFrame, float]:
    from sdv.sampling import Condition

    from benchmarks.peers import from_sdv

    names = list(cond.columns)
    combos = cond.real.group_by(names).len().sort(names)
    raw = combos["len"].to_numpy() * n / combos["len"].sum()
    counts = np.floor(raw).astype(int)
    counts[np.argsort(counts - raw)[: n - counts.sum()]] += 1
    conditions = [Condition(num_rows=int(k), column_values={c: (str(v) if domain.spec[c].is_int else v)
                                                             for c, v in zip(names, row)})
                  for row, k in zip(combos.select(names).iter_rows(), counts) if k > 0]
    t = time.perf_counter()
    pdf = model.sample_from_conditions(conditions)
    if isinstance(pdf, dict):
        pdf = next(iter(pdf.values()))
    return from_sdv(pdf, domain.spec), time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--domain", default="finance")
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--no-rebalance", action="store_true")
    ap.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance weight (1 = plain p(z | c))")
    args = ap.parse_args()
    from factory.difflm.pipeline import DiffLMGenerator

    info = machine_info()
    domain = load_domain(args.domain)
    model_dir = Path(args.model_dir) if args.model_dir else domain.model_dir
    gens = {"difflm_conditional": lambda: DiffLMGenerator.from_pretrained(model_dir, domain, guidance=args.guidance),
            "difflm_cond_prior_z": lambda: DiffLMGenerator.from_pretrained(model_dir, domain, latent="prior"),
            "difflm_mask_only": lambda: DiffLMGenerator.from_pretrained(model_dir, domain, conditional_stack=False)}
    train, val = domain.load_split("train"), domain.load_split("val")
    out = {"machine": info, "args": vars(args), "margin": MARGIN, "conditions": {}}
    uncond = sdv = None
    if "sdv_gaussian_copula" in args.methods:
        from sdv.single_table import GaussianCopulaSynthesizer

        from benchmarks.peers import SDV_TABLE, sdv_metadata, to_sdv

        t = time.perf_counter()
        sdv = GaussianCopulaSynthesizer(sdv_metadata(domain.spec))
        sdv.fit({SDV_TABLE: to_sdv(train, domain.spec)})  # SDV 2: {table: frame}
        out["sdv_fit_seconds"] = round(time.perf_counter() - t, 1)
    if "force_on_uncond" in args.methods:
        uncond, meta = generate(domain, gens["difflm_mask_only"](), args.n, args.seed, gates=False)
        out["unconditional"] = meta
    for sql in CONDITIONS:
        cond = parse_condition(domain, sql)
        real_train, real_val = train.filter(cond.holds(train)), val.filter(cond.holds(val))
        entry = {"support_train": round(cond.support, 4), "train_rows": real_train.height, "val_rows": real_val.height,
                 "real_val_vs_train": fidelity(domain, real_val, real_train, real_val), "methods": {}}
        if uncond is not None:  # rejection from the unconditional model: 1 / (share of its records that meet it)
            share = float(cond.holds(uncond).mean())
            entry["rejection_attempts_per_record"] = round(1 / share, 2) if share else None
        for m in args.methods:
            if m == "sdv_gaussian_copula":
                records, seconds = sdv_conditional(domain, sdv, cond, args.n)
                meta = {"rule_valid": round(domain.validator.validate(records).n_valid / records.height, 4),
                        "seconds": round(seconds, 1), "condition_holds": round(float(cond.holds(records).mean()), 4)}
            elif m == "force_on_uncond":
                records, meta = force_on(domain, uncond, cond, args.seed), {"rule_valid": None}
                meta["rule_valid"] = round(domain.validator.validate(records).n_valid / records.height, 4)
            else:
                records, meta = generate(domain, gens[m](), args.n, args.seed, where=sql)
            meta["fidelity"] = fidelity(domain, records, real_train, real_val)
            entry["methods"][m] = meta
            print(sql, m, meta["fidelity"]["columns_ok"], meta["fidelity"]["mean_stat"],
                  meta.get("attempts_per_record"), flush=True)
        out["conditions"][sql] = entry
    if not args.no_rebalance:
        n = 7 * (args.n // 2)
        records, meta = generate(domain, gens["difflm_conditional"](), n, args.seed, rebalance="grade")
        per = {}
        for g in domain.spec["grade"].values:
            mine, real = records.filter(pl.col("grade") == g), train.filter(pl.col("grade") == g)
            per[g] = {"share": round(mine.height / records.height, 4), "real_rows": real.height,
                      "ks_interest_rate": round(ks_statistic(mine["interest_rate"].to_numpy(),
                                                             real["interest_rate"].to_numpy()), 4)}
        meta["grades"] = per
        meta["max_share_error"] = round(max(abs(v["share"] - 1 / 7) for v in per.values()), 4)
        meta["max_ks_interest_rate"] = max(v["ks_interest_rate"] for v in per.values())
        out["rebalance_grade"] = meta
        print("rebalance", meta["max_share_error"], meta["max_ks_interest_rate"], flush=True)
    REPORTS.mkdir(parents=True, exist_ok=True)
    stem = REPORTS / (f"conditional_{args.domain}" + ("" if args.guidance == 1.0 else f"_guidance{args.guidance:g}"))
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1, default=str))
    stem.with_suffix(".md").write_text(render(out, " ".join(["python", "benchmarks/conditional.py", *sys.argv[1:]])))
    print(f"wrote {stem}.md")


def render(out: dict, command: str) -> str:
    lines = [header("Conditional generation (--where / --rebalance)", command, out["machine"]), ""]
    lines.append(f"Per-column target: stat(synthetic, real train rows meeting the condition) <= "
                 f"stat(real val rows meeting it, those train rows) + {out['margin']}. KS for numeric columns, "
                 f"TVD for categorical ones, over all 29 exported columns.\n")
    for sql, e in out["conditions"].items():
        lines.append(f"## `{sql}`\n")
        rv = e["real_val_vs_train"]
        lines.append(f"Support: {e['support_train']:.2%} of train ({e['train_rows']} rows; {e['val_rows']} val rows). "
                     f"Real val vs train: mean stat {rv['mean_stat']}, max {rv['max_stat']}."
                     + (f" Rejection from the unconditional model would need "
                        f"{e['rejection_attempts_per_record']} attempts per record."
                        if e.get("rejection_attempts_per_record") else "") + "\n")
        lines.append("| method | columns within target | mean stat | max stat | attempts / record | rule-valid | gate | s | failed columns |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for m, r in e["methods"].items():
            f = r["fidelity"]
            gate = r.get("gate") or {}
            valid = r.get("rule_valid", 1.0)
            lines.append(f"| {m} | {f['columns_ok']}/{f['n_columns']} | {f['mean_stat']} | {f['max_stat']} | "
                         f"{r.get('attempts_per_record', 'n/a')} | {valid if valid is not None else 'n/a'} | "
                         f"{gate.get('status', 'n/a')}{' (' + str(len(gate['failed'])) + ' failed)' if gate.get('failed') else ''} | "
                         f"{r.get('seconds', 'n/a')} | {', '.join(f['failed']) or '-'} |")
        lines.append("")
    if "rebalance_grade" in out:
        r = out["rebalance_grade"]
        lines.append("## `--rebalance grade` (equal shares)\n")
        lines.append(f"{r['accepted']} records, {r['attempts_per_record']} attempts per record, {r['seconds']} s; "
                     f"largest share error {r['max_share_error']} (target <= 0.01); largest interest_rate KS within a "
                     f"grade {r['max_ks_interest_rate']} (target <= 0.1); gate {r['gate']['status'] if r['gate'] else 'n/a'}.\n")
        lines.append("| grade | share | real train rows | KS interest_rate |")
        lines.append("|---|---|---|---|")
        for g, v in r["grades"].items():
            lines.append(f"| {g} | {v['share']} | {v['real_rows']} | {v['ks_interest_rate']} |")
        lines.append("")
    lines.append("SDV GaussianCopula `sample_from_conditions` is side by side above (fit once, "
                 f"{out.get('sdv_fit_seconds', 'n/a')} s; its seconds are sampling only; rule-valid = share of its raw "
                 "rows that pass every rule, which the factory's records do by construction). CTGAN and "
                 "mostlyai-engine were not run (time; mostlyai-engine is not installed).\n")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
