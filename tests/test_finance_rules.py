"""Each finance rule, broken on purpose on a real valid row.

Breaking a *generated* column is followed by `derive` (as the loop does), so the
derived columns stay consistent and only the targeted rule fires. Where one rule
cannot break without another (noted per case), the test asserts inclusion.
"""
import polars as pl
import pytest

from domains.finance.schema import RATE_BANDS


def _row(finance, where: pl.Expr) -> pl.DataFrame:
    rows = finance.load_split("train").filter(where)
    assert rows.height, "no real row matches the test's precondition"
    return rows.head(1)


def _rules_failed(finance, df: pl.DataFrame, stage: str = "rule") -> set[str]:
    v = finance.validator.validate(df)
    assert not v.valid[0]
    f = v.failures.filter(pl.col("row") == 0)
    return set(f.filter(pl.col("stage") == stage)["rule"]), set(f["rule"])


individual = pl.col("application_type") == "individual"
joint = pl.col("application_type") == "joint"

# (rule, precondition on the real row, change, re-derive?, only this rule fails?)
CASES = [
    ("grade_matches_sub_grade", pl.col("sub_grade") == "B2",
     {"grade": pl.lit("C")}, False, True),
    ("installment_matches_amortization", pl.lit(True),
     {"installment": pl.col("installment") + 0.02}, False, True),
    ("interest_rate_in_sub_grade_band", pl.col("sub_grade") == "A1",
     {"interest_rate": pl.lit(RATE_BANDS["A1"][1] + 1.0)}, True, True),
    ("joint_income_iff_joint", individual,
     {"annual_income_joint": pl.col("annual_income") * 2}, True, True),
    ("joint_dti_iff_joint", individual,
     {"debt_to_income_joint": pl.lit(10.0)}, True, True),
    ("joint_verification_only_if_joint", individual,
     {"verification_income_joint": pl.lit("Verified")}, True, True),
    ("joint_income_covers_applicant", joint & (pl.col("annual_income") > 0),
     {"annual_income_joint": pl.col("annual_income") - 1}, True, True),
    ("individual_has_dti", individual,
     {"debt_to_income": pl.lit(None, pl.Float64)}, True, True),
    ("open_lines_within_total", pl.col("total_credit_lines") < 199,
     {"open_credit_lines": pl.col("total_credit_lines") + 1}, True, True),
    # A charged-off loan keeps balance 0, so overpaid principal breaks only this rule.
    ("paid_principal_within_amount", (pl.col("loan_status") == "Charged Off") & (pl.col("loan_amount") <= 39_000),
     {"paid_principal": (pl.col("loan_amount") + 100).cast(pl.Float64)}, True, True),
    ("paid_total_is_sum", pl.lit(True),
     {"paid_total": pl.col("paid_total") + 0.05}, False, True),
    # balance > loan_amount also contradicts balance = loan_amount - paid_principal: not isolable.
    ("balance_within_amount", pl.col("loan_status") == "Current",
     {"balance": (pl.col("loan_amount") + 1).cast(pl.Float64)}, False, False),
    ("balance_is_outstanding_principal", (pl.col("loan_status") == "Current") & (pl.col("balance") >= 1),
     {"balance": pl.col("balance") - 1.0}, False, True),
    # A Fully Paid loan with principal left: balance is the outstanding principal (consistent) but not 0.
    # Not re-derived: `derive` sets a Fully Paid loan's paid_principal to loan_amount.
    ("settled_loans_have_zero_balance", pl.col("loan_status") == "Fully Paid",
     {"paid_principal": pl.col("loan_amount") - 100.0, "balance": pl.lit(100.0),
      "paid_total": pl.col("paid_total") - 100.0}, False, True),
]


def test_every_rule_has_a_case(finance):
    assert {c[0] for c in CASES} == {r.name for r in finance.rules}


def test_real_rows_pass(finance):
    df = finance.load_split("val")
    v = finance.validator.validate(df)
    assert v.n_valid == df.height, v.failures.head()


@pytest.mark.parametrize("rule,where,change,rederive,only", CASES, ids=[c[0] for c in CASES])
def test_breaking_a_rule_is_caught(finance, rule, where, change, rederive, only):
    row = _row(finance, where)
    assert finance.validator.validate(row).n_valid == 1
    broken = row.with_columns(**change)
    if rederive:
        broken = finance.complete(finance.to_generated(broken))
    rule_failures, all_failures = _rules_failed(finance, broken)
    assert rule in rule_failures
    if only:
        assert all_failures == {rule}


@pytest.mark.parametrize("name,change", [
    ("loan_amount.range", {"loan_amount": pl.lit(500, pl.Int64)}),
    ("interest_rate.range", {"interest_rate": pl.lit(45.0)}),
    ("state.category", {"state": pl.lit("XX")}),
    ("loan_status.category", {"loan_status": pl.lit("Defaulted")}),
    ("state.not_null", {"state": pl.lit(None, pl.String)}),
    ("loan_amount.not_null", {"loan_amount": pl.lit(None, pl.Int64)}),
    ("interest_rate.decimals", {"interest_rate": pl.col("interest_rate") + 0.001}),
])
def test_schema_checks(finance, name, change):
    row = finance.load_split("train").head(1).with_columns(**change)
    schema_failures, _ = _rules_failed(finance, row, stage="schema")
    assert name in schema_failures


def test_failures_are_per_row(finance):
    """A batch with one good and two bad rows: failures point at the bad rows only."""
    rows = finance.load_split("train").head(3).with_columns(
        grade=pl.when(pl.int_range(3) == 1).then(pl.lit("G")).otherwise(pl.col("grade")),
        state=pl.when(pl.int_range(3) == 2).then(pl.lit("ZZ")).otherwise(pl.col("state")))
    v = finance.validator.validate(rows)
    assert v.valid.to_list() == [True, False, False]
    got = {(r["row"], r["stage"], r["rule"]) for r in v.failures.iter_rows(named=True)}
    assert got == {(1, "rule", "grade_matches_sub_grade"), (2, "schema", "state.category")}
