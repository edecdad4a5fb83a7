"""Benchmark: conditional generation (`--where`, `--rebalance`), issue 15.

    OMP_NUM_THREADS=1 python benchmarks/conditional.py -n 2000 --seed 7

For each condition, every method makes n accepted records through the library entry point
(`factory.loop.run_generation`, a temporary DuckDB; rules, privacy filter and the
condition's last check all apply):
- difflm_conditional   the default: z ~ p(z | c) and injector(z, c) for c = a drawn real row's values of
                       the columns named, the mask narrowed to the condition's values and the batch
                       resampled by each row's probability of meeting it (sequential importance
                       resampling, DomainDecoder.generate)
- difflm_cond_prior_z  the same with z ~ N(0, I) (the diffusion ablation)
- difflm_resample_uncond  the unconditional prompt (z ~ p(z), no conditional stage), resampling only
- difflm_force         the previous default: the conditional stage, and each row's condition columns
                       forced to the drawn real row's values (no resampling)
- difflm_mask_only     the unconditional prompt, condition columns forced to drawn values (no resampling)
- force_on_uncond      an unconditional difflm sample with the condition's columns overwritten by
                       values drawn from the real rows that meet it (the baseline to beat)
- mostly_seeded        (with --mostly PYTHON) MOSTLY AI's TabularARGN (mostlyai-engine) fitted on train
                       for --mostly-minutes, seeded generation `sample(seed_data=...)` with the named
                       columns' values drawn from the real rows that meet the condition (their real
                       joint, as the factory draws them); its raw output, judged by the same rules;
                       for the rebalance, `sample(rebalancing=...)` (benchmarks/mostly.py)
- sdv_ctgan            SDV 2 CTGAN (--ctgan-epochs), the same way
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
METHODS = ("difflm_conditional", "difflm_cond_prior_z", "difflm_resample_uncond", "difflm_force", "difflm_mask_only",
           "force_on_uncond", "sdv_gaussian_copula", "sdv_ctgan")
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


def rebalance_stats(domain, records: pl.DataFrame, train: pl.DataFrame) -> dict:
    per = {}
    for g in domain.spec["grade"].values:
        mine, real = records.filter(pl.col("grade") == g), train.filter(pl.col("grade") == g)
        per[g] = {"share": round(mine.height / records.height, 4), "real_rows": real.height,
                  "ks_interest_rate": round(ks_statistic(mine["interest_rate"].to_numpy(),
                                                         real["interest_rate"].to_numpy()), 4) if mine.height else 1.0}
    return {"grades": per, "max_share_error": round(max(abs(v["share"] - 1 / len(per)) for v in per.values()), 4),
            "max_ks_interest_rate": max(v["ks_interest_rate"] for v in per.values())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--domain", default="finance")
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--no-rebalance", action="store_true")
    ap.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance weight (1 = plain p(z | c))")
    ap.add_argument("--mostly", default=None, help="a Python with mostlyai-engine installed (benchmarks/mostly.py)")
    ap.add_argument("--ctgan-epochs", type=int, default=50)
    ap.add_argument("--mostly-minutes", type=float, default=10.0, help="TabularARGN max_training_time (minutes)")
    args = ap.parse_args()
    from factory.difflm.pipeline import DiffLMGenerator

    info = machine_info()
    domain = load_domain(args.domain)
    model_dir = Path(args.model_dir) if args.model_dir else domain.model_dir
    gens = {"difflm_conditional": lambda: DiffLMGenerator.from_pretrained(model_dir, domain, guidance=args.guidance),
            "difflm_cond_prior_z": lambda: DiffLMGenerator.from_pretrained(model_dir, domain, latent="prior"),
            "difflm_resample_uncond": lambda: DiffLMGenerator.from_pretrained(model_dir, domain,
                                                                              conditional_stack=False),
            "difflm_force": lambda: DiffLMGenerator.from_pretrained(model_dir, domain, guidance=args.guidance,
                                                                    conditioning="force"),
            "difflm_mask_only": lambda: DiffLMGenerator.from_pretrained(model_dir, domain, conditional_stack=False,
                                                                        conditioning="force")}
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
    ctgan = None
    if "sdv_ctgan" in args.methods:
        from sdv.single_table import CTGANSynthesizer

        from benchmarks.peers import SDV_TABLE, sdv_metadata, to_sdv

        t = time.perf_counter()
        ctgan = CTGANSynthesizer(sdv_metadata(domain.spec), epochs=args.ctgan_epochs, enable_gpu=False)
        ctgan.fit({SDV_TABLE: to_sdv(train, domain.spec)})
        out["ctgan_fit_seconds"] = round(time.perf_counter() - t, 1)
    if "force_on_uncond" in args.methods:
        uncond, meta = generate(domain, gens["difflm_mask_only"](), args.n, args.seed, gates=False)
        out["unconditional"] = meta
    mostly = None
    if args.mostly:
        from benchmarks.mostly import run_mostly

        jobs = [{"name": f"c{i}", "seed": parse_condition(domain, sql).draw(args.n, args.seed)
                 .select(parse_condition(domain, sql).columns)} for i, sql in enumerate(CONDITIONS)]
        values = domain.spec["grade"].values
        jobs.append({"name": "rebalance", "n": 7 * (args.n // 2),
                     "rebalancing": {"column": "grade", "probabilities": {g: round(1 / len(values), 6)
                                                                          for g in values}}})
        with tempfile.TemporaryDirectory() as tmp:
            mostly = run_mostly(args.mostly, train, domain.spec, Path(tmp), jobs, seed=args.seed,
                                max_training_time=args.mostly_minutes)
        out["mostly"] = {k: v for k, v in mostly.items() if k != "jobs"}
        print("mostly", out["mostly"], flush=True)
    for i, sql in enumerate(CONDITIONS):
        cond = parse_condition(domain, sql)
        real_train, real_val = train.filter(cond.holds(train)), val.filter(cond.holds(val))
        entry = {"support_train": round(cond.support, 4), "train_rows": real_train.height, "val_rows": real_val.height,
                 "real_val_vs_train": fidelity(domain, real_val, real_train, real_val), "methods": {}}
        if uncond is not None:  # rejection from the unconditional model: 1 / (share of its records that meet it)
            share = float(cond.holds(uncond).mean())
            entry["rejection_attempts_per_record"] = round(1 / share, 2) if share else None
        for m in [*args.methods, *(["mostly_seeded"] if mostly and "jobs" in mostly else [])]:
            if m in ("sdv_gaussian_copula", "sdv_ctgan"):
                records, seconds = sdv_conditional(domain, sdv if m == "sdv_gaussian_copula" else ctgan, cond, args.n)
                meta = {"rule_valid": round(domain.validator.validate(records).n_valid / records.height, 4),
                        "seconds": round(seconds, 1), "condition_holds": round(float(cond.holds(records).mean()), 4)}
            elif m == "mostly_seeded":
                job = mostly["jobs"][f"c{i}"]
                records = job["frame"]
                meta = {"rule_valid": round(domain.validator.validate(records).n_valid / records.height, 4),
                        "seconds": job["sample_s"], "condition_holds": round(float(cond.holds(records).mean()), 4)}
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
        meta |= rebalance_stats(domain, records, train)
        out["rebalance_grade"] = meta
        if mostly and "jobs" in mostly:
            job = mostly["jobs"]["rebalance"]
            mine = job["frame"]
            out["rebalance_grade_mostly"] = rebalance_stats(domain, mine, train) | {
                "seconds": job["sample_s"], "accepted": mine.height,
                "rule_valid": round(domain.validator.validate(mine).n_valid / mine.height, 4)}
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
        m = out.get("rebalance_grade_mostly")
        if m:
            lines.append(f"MOSTLY AI `sample(rebalancing=...)`: {m['accepted']} rows, {m['seconds']} s sampling; largest "
                         f"share error {m['max_share_error']}; largest interest_rate KS within a grade "
                         f"{m['max_ks_interest_rate']}; rule-valid {m['rule_valid']}.\n")
        lines.append("| grade | share | real train rows | KS interest_rate |" + (" MOSTLY share | MOSTLY KS |" if m else ""))
        lines.append("|---|---|---|---|" + ("---|---|" if m else ""))
        for g, v in r["grades"].items():
            lines.append(f"| {g} | {v['share']} | {v['real_rows']} | {v['ks_interest_rate']} |"
                         + (f" {m['grades'][g]['share']} | {m['grades'][g]['ks_interest_rate']} |" if m else ""))
        lines.append("")
    lines.append("SDV GaussianCopula `sample_from_conditions` is side by side above (fit once, "
                 f"{out.get('sdv_fit_seconds', 'n/a')} s; its seconds are sampling only; rule-valid = share of its raw "
                 "rows that pass every rule, which the factory's records do by construction).")
    if "mostly" in out:
        lines.append(f"MOSTLY AI's TabularARGN (mostlyai-engine): fit {out['mostly'].get('fit_s', 'n/a')} s "
                     f"(max_training_time {out['args']['mostly_minutes']} min); its seconds are sampling only; "
                     f"{out['mostly'].get('error', '')}")
    else:
        lines.append("MOSTLY AI's engine was not run (pass --mostly PYTHON).")
    lines.append(f"SDV CTGAN: {out['args']['ctgan_epochs']} epochs, fit {out.get('ctgan_fit_seconds', 'n/a')} s, "
                 "`sample_from_conditions` as for GaussianCopula.\n" if "ctgan_fit_seconds" in out else
                 "SDV CTGAN was not run (not in --methods).\n")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
