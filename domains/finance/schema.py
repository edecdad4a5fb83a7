"""The finance domain's table: columns, cross-field rules, and derived columns.

Every rule has a stable name (stored in DuckDB as the rejection reason) and a
message a loan officer can read. RULES.md reports each rule's pass rate on the
real data (regenerate with `python -m domains.finance.data --report`).
"""
from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from factory.rules import Rule
from schemas.checks import amortized_installment, scheduled_principal, within
from schemas.columns import Categorical, Numeric, TableSpec
from schemas.constraints import AtLeast, AtLeastExpr, AtMost, AtMostExpr, MustBeNull, MustNotBeNull, NullExactlyWhen, RangeBy

HERE = Path(__file__).parent

STATES = (
    "AK", "AL", "AR", "AZ", "CA", "CO", "CT", "DC", "DE", "FL", "GA", "HI", "ID", "IL", "IN", "KS", "KY",
    "LA", "MA", "MD", "ME", "MI", "MN", "MO", "MS", "MT", "NC", "ND", "NE", "NH", "NJ", "NM", "NV", "NY",
    "OH", "OK", "OR", "PA", "RI", "SC", "SD", "TN", "TX", "UT", "VA", "VT", "WA", "WI", "WV", "WY",
)
VERIFICATION = ("Not Verified", "Source Verified", "Verified")
PURPOSES = (
    "car", "credit_card", "debt_consolidation", "home_improvement", "house", "major_purchase",
    "medical", "moving", "other", "renewable_energy", "small_business", "vacation",
)
LOAN_STATUS = ("Charged Off", "Current", "Fully Paid", "In Grace Period", "Late (16-30 days)", "Late (31-120 days)")
SETTLED = ("Charged Off", "Fully Paid")

# The lender's rate card for Jan-Mar 2018: the interest-rate band of each sub_grade,
# as observed in the cleaned real table (see DATA.md). Sub-grades with no observed
# loans (G2, G3, G5) are not allowed: no band is known for them.
RATE_BANDS: dict[str, tuple[float, float]] = {
    k: tuple(v) for k, v in json.loads((HERE / "data" / "rate_bands.json").read_text()).items()
}
SUB_GRADES = tuple(sorted(RATE_BANDS))
GRADES = tuple(sorted({s[0] for s in SUB_GRADES}))

CENT = 0.01 + 1e-6  # "within a cent", with float slack

SPEC = TableSpec((
    Categorical("application_type", ("individual", "joint"), description="individual or joint application"),
    Categorical("emp_length", tuple(range(11)), nullable=True, description="years employed, 10 = 10+; null = unknown"),
    Categorical("state", STATES, description="borrower's US state"),
    Categorical("homeownership", ("MORTGAGE", "OWN", "RENT")),
    Numeric("annual_income", 0, 9_999_999, description="applicant's annual income, USD"),
    Categorical("verified_income", VERIFICATION),
    Numeric("debt_to_income", 0, 999.99, decimals=2, nullable=True, description="DTI %, null when income is 0"),
    Numeric("annual_income_joint", 0, 9_999_999, nullable=True, description="joint income, joint applications only"),
    Categorical("verification_income_joint", VERIFICATION, nullable=True),
    Numeric("debt_to_income_joint", 0, 999.99, decimals=2, nullable=True),
    Numeric("delinq_2y", 0, 99, description="delinquencies in the last 2 years"),
    Numeric("inquiries_last_12m", 0, 99),
    Numeric("total_credit_lines", 0, 199),
    Numeric("open_credit_lines", 0, 199),
    Numeric("total_credit_limit", 0, 9_999_999),
    Numeric("total_credit_utilized", 0, 9_999_999),
    Categorical("loan_purpose", PURPOSES),
    Numeric("loan_amount", 1_000, 40_000, description="LendingClub lends 1,000-40,000 USD"),
    Categorical("term", (36, 60), description="months"),
    Categorical("sub_grade", SUB_GRADES),
    Categorical("grade", GRADES, derived=True),
    Numeric("interest_rate", 1, 40, decimals=2, description="annual %, set by sub_grade"),
    Numeric("installment", 0, 9_999.99, decimals=2, derived=True, description="monthly payment"),
    Categorical("loan_status", LOAN_STATUS),
    # Latent (generated, not exported): paid_principal = the amortization schedule's principal
    # after `payments_made` payments + `principal_extra` (see `latents`).
    Numeric("payments_made", 0, 60, latent=True, description="scheduled payments covered by paid_principal"),
    Numeric("principal_extra", 0, 40_000, decimals=2, latent=True,
            description="principal paid beyond the schedule after payments_made payments"),
    Numeric("paid_principal", 0, 40_000, decimals=2, derived=True),
    # Latent: paid_interest = the schedule's interest after payments_made payments, minus or plus
    # interest_gap (the schema tokenizer writes non-negative numbers, so the sign is a category).
    Categorical("interest_vs_schedule", ("below", "above"), latent=True,
                description="is paid_interest below or above the schedule's interest"),
    Numeric("interest_gap", 0, 99_999.99, decimals=2, latent=True,
            description="|paid_interest - the schedule's interest after payments_made payments|"),
    Numeric("paid_interest", 0, 99_999.99, decimals=2, derived=True),
    Numeric("paid_late_fees", 0, 9_999.99, decimals=2),
    Numeric("paid_total", 0, 199_999.99, decimals=2, derived=True),
    Numeric("balance", 0, 40_000, decimals=2, derived=True, description="outstanding principal"),
))

_amort = amortized_installment(pl.col("loan_amount"), pl.col("interest_rate"), pl.col("term"))
_paid_sum = pl.col("paid_principal") + pl.col("paid_interest") + pl.col("paid_late_fees")
_outstanding = pl.col("loan_amount") - pl.col("paid_principal")

# The relations the decoder's token mask also enforces, each declared once: one object yields its
# mask (factory/difflm/tokenizer.py) and its rule (`.rule()`, listed in RULES below).
RATE_BAND = RangeBy("interest_rate", "sub_grade", RATE_BANDS, name="interest_rate_in_sub_grade_band",
                    message="interest_rate must lie in the rate band of its sub_grade")
JOINT_INCOME = NullExactlyWhen("annual_income_joint", "application_type", ("joint",), invert=True,
                               name="joint_income_iff_joint",
                               message="annual_income_joint is present exactly when application_type is joint")
JOINT_DTI = NullExactlyWhen("debt_to_income_joint", "application_type", ("joint",), invert=True,
                            name="joint_dti_iff_joint",
                            message="debt_to_income_joint is present exactly when application_type is joint")
JOINT_VERIFICATION = MustBeNull("verification_income_joint", "application_type", ("individual",),
                                name="joint_verification_only_if_joint",
                                message="verification_income_joint must be null for individual applications")
JOINT_COVERS = AtLeast("annual_income_joint", "annual_income", name="joint_income_covers_applicant",
                       message="annual_income_joint must be at least the applicant's annual_income")
INDIVIDUAL_DTI = MustNotBeNull("debt_to_income", "application_type", ("individual",), name="individual_has_dti",
                               message="individual applications must state debt_to_income")
OPEN_LINES = AtMost("open_credit_lines", "total_credit_lines", name="open_lines_within_total",
                    message="open_credit_lines must not exceed total_credit_lines")

RULES = [
    Rule("grade_matches_sub_grade", "grade must be the first letter of sub_grade",
         pl.col("grade") == pl.col("sub_grade").str.slice(0, 1)),
    Rule("installment_matches_amortization",
         "installment must equal the amortized payment of loan_amount at interest_rate over term, within a cent",
         within(pl.col("installment"), _amort, CENT)),
    RATE_BAND.rule(),
    JOINT_INCOME.rule(),
    JOINT_DTI.rule(),
    JOINT_VERIFICATION.rule(),
    JOINT_COVERS.rule(),
    INDIVIDUAL_DTI.rule(),
    OPEN_LINES.rule(),
    # the rest hold on derived columns, which `derive` computes after decoding (no mask)
    Rule("paid_principal_within_amount", "paid_principal must not exceed loan_amount",
         pl.col("paid_principal") <= pl.col("loan_amount")),
    Rule("paid_total_is_sum", "paid_total must equal paid_principal + paid_interest + paid_late_fees, within a cent",
         within(pl.col("paid_total"), _paid_sum, CENT)),
    Rule("balance_within_amount", "balance must not exceed loan_amount",
         pl.col("balance") <= pl.col("loan_amount")),
    Rule("balance_is_outstanding_principal",
         "balance must equal loan_amount - paid_principal (0 for a charged-off loan), within a cent",
         pl.when(pl.col("loan_status") == "Charged Off").then(pl.col("balance") == 0)
         .otherwise(within(pl.col("balance"), _outstanding, CENT))),
    Rule("settled_loans_have_zero_balance", "a Fully Paid or Charged Off loan must have balance 0",
         ~pl.col("loan_status").is_in(SETTLED) | (pl.col("balance") == 0)),
]


def _principal_after(k: pl.Expr) -> pl.Expr:
    """The schedule's principal after k payments."""
    return scheduled_principal(pl.col("loan_amount"), pl.col("interest_rate"), pl.col("term"), k)


def _interest_after(k: pl.Expr) -> pl.Expr:
    """The schedule's interest after k payments: payments minus principal, at the derived installment."""
    return (k.cast(pl.Float64) * _amort.round(2) - _principal_after(k)).round(2)


_scheduled = _principal_after(pl.col("payments_made"))
# The reference for paid_interest: the schedule's interest after payments_made payments. 0 for a
# Fully Paid loan: it was repaid early, after an unknown number of payments, so its interest is
# written as is.
_scheduled_interest = (pl.when(pl.col("loan_status") == "Fully Paid").then(0.0)
                       .otherwise(_interest_after(pl.col("payments_made"))))
MAX_PAYMENTS = 60

# What schema-guided decoding enforces while a record is written: the relations above, and bounds
# on the latent columns (which are never stored, so they have no rule; the rules on the derived
# paid amounts check what they produce). A small LM gets these relations mostly right on its own;
# the mask makes them exact instead of leaving them to rejection.
DECODE_CONSTRAINTS = [
    JOINT_INCOME, JOINT_DTI, JOINT_VERIFICATION, INDIVIDUAL_DTI, JOINT_COVERS, OPEN_LINES, RATE_BAND,
    RangeBy("payments_made", "term", {36: (0, 36), 60: (0, 60)}),
    # paid_principal <= loan_amount: principal beyond the schedule is at most what the schedule leaves
    AtMostExpr("principal_extra", pl.col("loan_amount") - _scheduled),
    # paid_interest in its range: below the schedule by at most the schedule's interest, above it by at
    # most what the column's upper bound leaves
    AtMostExpr("interest_gap", _scheduled_interest, when=("interest_vs_schedule", ("below",))),
    AtMostExpr("interest_gap", SPEC["paid_interest"].hi - _scheduled_interest, when=("interest_vs_schedule", ("above",))),
]


def derived_caps(maxima: dict) -> list:
    """The sampler's train-max cap for paid_interest, which the model writes as a gap to the
    schedule's interest: above the schedule, the gap is at most what the train maximum leaves;
    below it, at least the schedule's excess over that maximum (a long schedule at a high rate can
    accrue more interest than any real loan paid)."""
    m = maxima.get("paid_interest")
    if m is None:
        return []
    # payments_made at most the last k whose scheduled interest stays within the maximum (the
    # schedule's interest grows with k), so that "above the schedule" stays feasible too
    k_max = pl.sum_horizontal([((pl.col("term") >= k) & (_interest_after(pl.lit(k)) <= m)).cast(pl.Int32)
                               for k in range(1, MAX_PAYMENTS + 1)])
    unsettled_schedule = tuple(v for v in LOAN_STATUS if v != "Fully Paid")  # Fully Paid: reference 0
    return [AtMostExpr("payments_made", k_max, when=("loan_status", unsettled_schedule)),
            AtMostExpr("interest_gap", (m - _scheduled_interest).clip(lower_bound=0),
                       when=("interest_vs_schedule", ("above",))),
            AtLeastExpr("interest_gap", _scheduled_interest - m, when=("interest_vs_schedule", ("below",)))]



def latents(df: pl.DataFrame) -> pl.DataFrame:
    """Records -> the same rows plus the latent columns that `derive` turns back into
    paid_principal and paid_interest.

    Why: on the real loans, 91% of Current loans have paid exactly the amortization schedule's
    principal after a whole number of payments (2-5 for loans issued Jan-Mar 2018), and interest
    within tens of dollars of the schedule's. That schedule is what ties the paid amounts to
    interest_rate, and so to grade. A small LM writing the amounts digit by digit misses the
    schedule by +-0.3 installments (a 10k-record sample), which blurs the grade signal; writing a
    count of payments plus small remainders keeps it.

    payments_made = the largest k <= term whose scheduled principal is at most paid_principal;
    principal_extra = paid_principal - that scheduled principal (>= 0, in cents; a Fully Paid
    loan is k = term, extra 0); interest_vs_schedule and interest_gap = the sign and size of
    paid_interest - the schedule's interest after k payments. `derive` computes both amounts back
    exactly (tested on every real row).
    """
    rows = df.select("loan_amount", "interest_rate", "term", "paid_principal").with_row_index("_row")
    counts = pl.DataFrame({"payments_made": pl.int_range(0, MAX_PAYMENTS + 1, eager=True)})
    best = (rows.join(counts, how="cross")
            .filter(pl.col("payments_made") <= pl.col("term"))
            .with_columns(_s=_scheduled)  # the same expression `derive` uses, so the round trip is exact
            .filter(pl.col("_s") <= pl.col("paid_principal"))
            .group_by("_row").agg(pl.col("payments_made").max(), pl.col("_s").max()))
    best = rows.select("_row").join(best, on="_row", how="left", maintain_order="left")
    out = df.with_columns(payments_made=best["payments_made"].fill_null(0).cast(pl.Int64),
                          principal_extra=(df["paid_principal"].cast(pl.Float64) - best["_s"].fill_null(0.0)).round(2))
    gap = (pl.col("paid_interest").cast(pl.Float64) - _scheduled_interest).round(2)
    return out.with_columns(interest_vs_schedule=pl.when(gap < 0).then(pl.lit("below")).otherwise(pl.lit("above")),
                            interest_gap=gap.abs())


def derive(df: pl.DataFrame) -> pl.DataFrame:
    """Fill the columns that a rule fully determines (SDV-style constraint transform).

    A language model cannot do this arithmetic reliably (see findings), so these
    columns are computed, not generated; the rules above still check every record.
    """
    return df.with_columns(
        grade=pl.col("sub_grade").str.slice(0, 1),
        installment=_amort.round(2),
        paid_principal=pl.when(pl.col("loan_status") == "Fully Paid").then(pl.col("loan_amount").cast(pl.Float64))
        .otherwise((_scheduled + pl.col("principal_extra")).round(2)),
        paid_interest=(_scheduled_interest + pl.when(pl.col("interest_vs_schedule") == "below")
                       .then(-pl.col("interest_gap")).otherwise(pl.col("interest_gap"))).round(2),
    ).with_columns(
        paid_total=_paid_sum.round(2),
        balance=pl.when(pl.col("loan_status") == "Charged Off").then(0.0).otherwise(_outstanding.cast(pl.Float64).round(2)),
    ).select(SPEC.names)
