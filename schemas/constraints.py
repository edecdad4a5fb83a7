"""Constraints: cross-column relations, each declared once, yielding both its decode mask and its rule.

A domain lists them beside its rules. Each is one relation, SDV-constraint style:
- `rule()` is its validation rule (factory.rules.Rule: a stable name, a plain-language message
  and a polars expression that is True for every valid row), so every record is checked;
- the schema tokenizer (factory/difflm/tokenizer.py) compiles it into the decoder's token mask,
  which then only allows values that satisfy it given the columns already generated;
- `to_json()` / `constraint_from_json()` write and read it (a declarative domain file);
- a constraint that fully determines a column (`Determines`, `SumOf`) names it in `determines`
  and computes it with `derive_expr()`, so the column can be derived, holding by construction.

Generation order: the mask can only enforce a relation on the column written last among those it
reads (the ones it depends on must be generated earlier). `factory.difflm.tokenizer.enforceable()`
splits a list into the constraints the mask enforces for a given generation order and those that
stay rules only (e.g. a <= b where a is written before b, or a relation on a derived column); the
tokenizer itself refuses a constraint it cannot enforce with an error naming it.

Null is a condition value: write it as None (`MustBeNull("b", "a", (None,))` is "b is null when
a is null"; `Implies("a", ("x",), "b", ("y", None))` is "a = x implies b is y or null"), and
`invert=True` negates a null pattern's condition (`MustNotBeNull("b", "a", (None,), invert=True)`
is "b is present when a is present").

Rule semantics for nulls: a comparison with a null operand passes (the column's own nullability
is the schema's business); a condition is true exactly when the column takes one of the values
(None: when it is null).
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import MISSING, dataclass, field, fields
from typing import ClassVar

import polars as pl


# ---- helpers ----------------------------------------------------------------------------------
def is_in(column: str, values) -> pl.Expr:
    """True when `column` takes one of `values` (None in values: also when it is null); never null."""
    values = tuple(values)
    present = [v for v in values if v is not None]
    e = pl.col(column).is_in(present).fill_null(False) if present else pl.lit(False)
    return (e | pl.col(column).is_null()) if None in values else e


def _values_text(values) -> str:
    return ", ".join("null" if v is None else str(v) for v in values)


def _short_values(values) -> str:
    """A name part for a value set: the values themselves when short, else a stable hash."""
    text = "_".join("null" if v is None else str(v) for v in values)
    clean = "".join(ch if ch.isalnum() else "_" for ch in text)
    if len(clean) <= 24:
        return clean
    return "h" + hashlib.sha256(json.dumps([v for v in values], default=str).encode()).hexdigest()[:8]


def _expr_to_json(e: pl.Expr) -> str:
    return e.meta.serialize(format="json")


def _expr_from_json(s: str) -> pl.Expr:
    return pl.Expr.deserialize(io.StringIO(s), format="json")


def _when_expr(when) -> pl.Expr:
    return pl.lit(True) if when is None else is_in(when[0], when[1])


def _when_text(when) -> str:
    return "" if when is None else f" when {when[0]} is {_values_text(when[1])}"


def _when_name(when) -> str:
    return "" if when is None else f"_when_{when[0]}_{_short_values(when[1])}"


class _Relation:
    """What every constraint offers. Subclasses define `_name`, `_message`, `_expr` and `columns`."""

    determines: str | None = None  # the column this constraint fully determines, if any

    @property
    def columns(self) -> list[str]:  # every column the relation reads (the constrained one first)
        raise NotImplementedError

    def rule(self):
        from factory.rules import Rule

        return Rule(self.name or self._name(), self.message or self._message(), self._expr())

    def derive_expr(self) -> pl.Expr | None:
        """The expression that computes `determines` from the other columns (None: determines none)."""
        return None

    def to_json(self) -> dict:
        out = {"kind": type(self).__name__}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("name", "message", "invert") and not v:
                continue
            out[f.name] = _to_jsonable(f.name, v)
        return out


def _to_jsonable(name, v):
    if isinstance(v, pl.Expr):
        return {"polars_expr": _expr_to_json(v)}
    if name == "bounds":  # keys may be ints (a loan term): keep them typed
        return [[k, lo, hi] for k, (lo, hi) in v.items()]
    if name == "mapping" and v is not None:
        return [[k, x] for k, x in v.items()]
    if isinstance(v, tuple):
        return [_to_jsonable("", x) for x in v]
    return v


_NAMING = dict(kw_only=True, default="", compare=False)  # optional overrides of the rule's name / message


# ---- null patterns ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _NullPattern(_Relation):
    """What MustBeNull, MustNotBeNull and NullExactlyWhen share: `column`'s nullness is fixed whenever column `when`
    takes one of `values` (None: when `when` is null), or with `invert` whenever it does not."""

    column: str
    when: str
    values: tuple
    invert: bool = field(default=False, kw_only=True)  # the condition is "when is NOT one of values"
    name: str = field(**_NAMING)
    message: str = field(**_NAMING)
    _word: ClassVar[str]  # in the rule's name
    _text: ClassVar[str]  # in its message
    # what the relation makes of `column` on rows where the condition holds, and where it does not
    # ("null", "present", or None: free); the mask (factory/difflm/tokenizer.py) reads these
    on_hit: ClassVar[str]
    on_miss: ClassVar[str | None] = None

    @property
    def columns(self):
        return [self.column, self.when]

    def condition(self) -> pl.Expr:
        hit = is_in(self.when, self.values)
        return ~hit if self.invert else hit

    def _name(self):
        return f"{self.column}_{self._word}_{self.when}_{'not_' if self.invert else ''}{_short_values(self.values)}"

    def _message(self):
        return f"{self.column} {self._text} {self.when} is {'not ' if self.invert else ''}{_values_text(self.values)}"


@dataclass(frozen=True)
class MustBeNull(_NullPattern):
    """`column` is null whenever column `when` takes one of `values` (None: when `when` is null)."""

    _word: ClassVar[str] = "null_if"
    _text: ClassVar[str] = "must be null when"
    on_hit: ClassVar[str] = "null"

    def _expr(self):
        return ~self.condition() | pl.col(self.column).is_null()


@dataclass(frozen=True)
class MustNotBeNull(_NullPattern):
    """`column` is present whenever column `when` takes one of `values` (None: when `when` is null)."""

    _word: ClassVar[str] = "present_if"
    _text: ClassVar[str] = "must not be null when"
    on_hit: ClassVar[str] = "present"

    def _expr(self):
        return ~self.condition() | pl.col(self.column).is_not_null()


@dataclass(frozen=True)
class NullExactlyWhen(_NullPattern):
    """`column` is null exactly when column `when` takes one of `values` (None: when `when` is
    null), and present otherwise: a MustBeNull and its complementary MustNotBeNull as one relation,
    so one rule ("b is present exactly when a is x" is `NullExactlyWhen("b", "a", ("x",), invert=True)`)."""

    _word: ClassVar[str] = "null_iff"
    _text: ClassVar[str] = "must be null exactly when"
    on_hit: ClassVar[str] = "null"
    on_miss: ClassVar[str] = "present"

    def _expr(self):
        return pl.col(self.column).is_null() == self.condition()


NULL_PATTERNS = (MustBeNull, MustNotBeNull, NullExactlyWhen)  # every kind that fixes a column's nullness


# ---- categories --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Implies(_Relation):
    """`if_column` in `if_values` implies `then_column` in `then_values` (None in either: null).

    The mask enforces it when `then_column` is categorical (or `then_values` is (None,)) and
    `if_column` is generated before it; `if_column` may be numeric only with if_values (None,)."""

    if_column: str
    if_values: tuple
    then_column: str
    then_values: tuple
    name: str = field(**_NAMING)
    message: str = field(**_NAMING)

    @property
    def column(self) -> str:
        return self.then_column

    @property
    def columns(self):
        return [self.then_column, self.if_column]

    def _name(self):
        return (f"{self.then_column}_{_short_values(self.then_values)}_if_"
                f"{self.if_column}_{_short_values(self.if_values)}")

    def _message(self):
        return (f"{self.then_column} must be {_values_text(self.then_values)} "
                f"when {self.if_column} is {_values_text(self.if_values)}")

    def _expr(self):
        return ~is_in(self.if_column, self.if_values) | is_in(self.then_column, self.then_values)


@dataclass(frozen=True)
class Determines(_Relation):
    """Column `source` determines column `target`: target = mapping[source] (a code and its label,
    a sub-category and its category; a None key maps a null source), or, with `prefix=n`, target
    is the first n characters of source. `derive_expr()` computes target."""

    source: str
    target: str
    mapping: dict | None = field(default=None, hash=False)
    prefix: int | None = None
    name: str = field(**_NAMING)
    message: str = field(**_NAMING)

    def __post_init__(self):
        if (self.mapping is None) == (self.prefix is None):
            raise ValueError(f"Determines({self.source!r} -> {self.target!r}): give exactly one of mapping, prefix")
        if self.prefix is not None and not (isinstance(self.prefix, int) and self.prefix > 0):
            raise ValueError(f"Determines({self.source!r} -> {self.target!r}): prefix must be a positive integer")

    @property
    def determines(self) -> str:
        return self.target

    @property
    def column(self) -> str:
        return self.target

    @property
    def columns(self):
        return [self.target, self.source]

    def _name(self):
        return f"{self.target}_determined_by_{self.source}"

    def _message(self):
        if self.prefix is not None:
            return f"{self.target} must be the first {self.prefix} characters of {self.source}"
        return f"{self.target} must be the value that {self.source} maps to ({len(self.mapping)} pairs)"

    def derive_expr(self) -> pl.Expr:
        src = pl.col(self.source)
        if self.prefix is not None:
            return src.cast(pl.String).str.slice(0, self.prefix).alias(self.target)
        pairs = {k: v for k, v in self.mapping.items() if k is not None}
        kinds = {type(v) for v in self.mapping.values() if v is not None}
        dtype = {int: pl.Int64, float: pl.Float64, bool: pl.Boolean}.get(kinds.pop(), pl.String) if len(kinds) == 1 \
            else pl.String
        mapped = src.replace_strict(pairs, default=None, return_dtype=dtype) if pairs else pl.lit(None, dtype)
        if None in self.mapping:
            mapped = pl.when(src.is_null()).then(pl.lit(self.mapping[None], dtype)).otherwise(mapped)
        return mapped.alias(self.target)

    def lookup(self, values) -> dict:
        """source value -> the target value it determines, for the given source values."""
        if self.prefix is not None:
            return {v: None if v is None else str(v)[:self.prefix] for v in values}
        return {v: self.mapping.get(v) for v in values if v in self.mapping}

    def _expr(self):
        return pl.col(self.target).eq_missing(self.derive_expr())


# ---- numbers -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Range(_Relation):
    """Numeric `column` lies in [lo, hi], a bound narrower than the spec's (a mined range, or the
    sampler's train-max cap). A null passes (nullability is the schema's)."""

    column: str
    lo: float
    hi: float
    name: str = field(**_NAMING)
    message: str = field(**_NAMING)

    def __post_init__(self):
        if self.lo > self.hi:
            raise ValueError(f"Range({self.column!r}): lo {self.lo} > hi {self.hi}")

    @property
    def columns(self):
        return [self.column]

    def _name(self):
        return f"{self.column}_in_observed_range"

    def _message(self):
        return f"{self.column} must lie in [{self.lo}, {self.hi}]"

    def _expr(self):
        c = pl.col(self.column)
        return c.is_null() | c.is_between(self.lo, self.hi)


@dataclass(frozen=True)
class RangeBy(_Relation):
    """Numeric `column` lies in bounds[v] = (lo, hi) where v is the value of categorical column `by`
    (a value without bounds leaves the column unconstrained)."""

    column: str
    by: str
    bounds: dict = field(hash=False)
    name: str = field(**_NAMING)
    message: str = field(**_NAMING)

    @property
    def columns(self):
        return [self.column, self.by]

    def _name(self):
        return f"{self.column}_in_band_of_{self.by}"

    def _message(self):
        return f"{self.column} must lie in the band of its {self.by} ({len(self.bounds)} bands)"

    def _expr(self):
        by = pl.col(self.by)
        lo = by.replace_strict({k: float(v[0]) for k, v in self.bounds.items()}, default=None, return_dtype=pl.Float64)
        hi = by.replace_strict({k: float(v[1]) for k, v in self.bounds.items()}, default=None, return_dtype=pl.Float64)
        c = pl.col(self.column)
        return c.is_null() | ((c >= lo).fill_null(True) & (c <= hi).fill_null(True))


@dataclass(frozen=True)
class _ColumnBound(_Relation):
    """What AtMost and AtLeast share: numeric `column` compared with numeric column `other`
    (optionally only when column when[0] is in when[1]); a null on either side passes."""

    column: str
    other: str
    when: tuple | None = None
    name: str = field(**_NAMING)
    message: str = field(**_NAMING)
    _word: ClassVar[str]  # in the rule's name
    _text: ClassVar[str]  # in its message

    @property
    def columns(self):
        return [self.column, self.other] + ([self.when[0]] if self.when else [])

    def _name(self):
        return f"{self.column}_{self._word}_{self.other}{_when_name(self.when)}"

    def _message(self):
        return f"{self.column} {self._text} {self.other}{_when_text(self.when)}"

    def _holds(self) -> pl.Expr:
        raise NotImplementedError

    def _expr(self):
        return ~_when_expr(self.when) | self._holds().fill_null(True)


@dataclass(frozen=True)
class AtMost(_ColumnBound):
    """Numeric `column` <= numeric column `other` (optionally only when column when[0] is in when[1])."""

    _word: ClassVar[str] = "at_most"
    _text: ClassVar[str] = "must not exceed"

    def _holds(self):
        return pl.col(self.column) <= pl.col(self.other)


@dataclass(frozen=True)
class AtLeast(_ColumnBound):
    """Numeric `column` >= numeric column `other` (optionally only when column when[0] is in when[1])."""

    _word: ClassVar[str] = "at_least"
    _text: ClassVar[str] = "must be at least"

    def _holds(self):
        return pl.col(self.column) >= pl.col(self.other)


@dataclass(frozen=True)
class AtMostExpr(_Relation):
    """Numeric `column` <= `bound`, a polars expression over columns generated before it (e.g. the
    interest an amortization schedule has accrued); a row where `bound` is null is unconstrained.
    Optionally only when column when[0] is in when[1]. The domain's own expression is evaluated,
    so the mask and the arithmetic in `derive` cannot disagree."""

    column: str
    bound: pl.Expr = field(hash=False, compare=False)
    when: tuple | None = None
    name: str = field(**_NAMING)
    message: str = field(**_NAMING)

    @property
    def inputs(self) -> list[str]:
        return sorted(set(self.bound.meta.root_names()))

    @property
    def columns(self):
        return [self.column] + self.inputs + ([self.when[0]] if self.when else [])

    def _name(self):
        # the expression's inputs name it; a hash of the expression tells two bounds on them apart
        h = hashlib.sha256(_expr_to_json(self.bound).encode()).hexdigest()[:6]
        return f"{self.column}_at_most_bound_{h}{_when_name(self.when)}"

    def _message(self):
        return f"{self.column} must not exceed its bound from {', '.join(self.inputs)}{_when_text(self.when)}"

    def _expr(self):  # the mask rounds the bound down to the column's decimals, with 1e-6 slack
        return ~_when_expr(self.when) | (pl.col(self.column) <= self.bound + 1e-6).fill_null(True)


@dataclass(frozen=True)
class AtLeastExpr(AtMostExpr):
    """Numeric `column` >= `bound` (same inputs and `when` as AtMostExpr). Never empties a row's
    range: where the other bounds leave less than `bound`, the mask holds the column at its upper
    bound, which the rule then rejects (it is written for caps, where that is the intent)."""

    def _name(self):
        h = hashlib.sha256(_expr_to_json(self.bound).encode()).hexdigest()[:6]
        return f"{self.column}_at_least_bound_{h}{_when_name(self.when)}"

    def _message(self):
        return f"{self.column} must be at least its bound from {', '.join(self.inputs)}{_when_text(self.when)}"

    def _expr(self):
        return ~_when_expr(self.when) | (pl.col(self.column) >= self.bound - 1e-6).fill_null(True)


@dataclass(frozen=True)
class SumOf(_Relation):
    """target = sum(sign * term) within `tol` (c = a + b: terms ("a", "b"), signs (1, 1); c = a - b:
    signs (1, -1)). `derive_expr()` computes target, rounded to `decimals` when given. A row with a
    null term passes only if target is null too. The mask enforces it on whichever of target and
    terms is generated last."""

    target: str
    terms: tuple
    signs: tuple | None = None
    tol: float = 0.01 + 1e-6
    decimals: int | None = None
    name: str = field(**_NAMING)
    message: str = field(**_NAMING)

    def __post_init__(self):
        if not self.terms:
            raise ValueError(f"SumOf({self.target!r}): terms must not be empty")
        if self.signs is None:
            object.__setattr__(self, "signs", (1,) * len(self.terms))
        if len(self.signs) != len(self.terms) or any(s not in (1, -1) for s in self.signs):
            raise ValueError(f"SumOf({self.target!r}): signs must be one 1 or -1 per term")
        object.__setattr__(self, "terms", tuple(self.terms))
        object.__setattr__(self, "signs", tuple(self.signs))

    @property
    def determines(self) -> str:
        return self.target

    @property
    def column(self) -> str:
        return self.target

    @property
    def columns(self):
        return [self.target, *self.terms]

    def _name(self):
        ops = "".join(("plus_" if s > 0 else "minus_") + t + "_" for t, s in zip(self.terms, self.signs))
        return f"{self.target}_is_{ops.removeprefix('plus_').rstrip('_')}"

    def _formula(self):
        out = ""
        for i, (t, s) in enumerate(zip(self.terms, self.signs)):
            out += (t if s > 0 else f"-{t}") if i == 0 else (f" + {t}" if s > 0 else f" - {t}")
        return out

    def _message(self):
        within = "exactly" if self.tol < 1e-5 else f"within {round(self.tol, 5):g}"
        return f"{self.target} must equal {self._formula()}, {within}"

    def sum_expr(self) -> pl.Expr:
        parts = [pl.col(t).cast(pl.Float64) * s for t, s in zip(self.terms, self.signs)]
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        return total

    def derive_expr(self) -> pl.Expr:
        """The sum, rounded to `decimals` when given (an Int64 for decimals 0, else a Float64)."""
        total = self.sum_expr()
        if self.decimals == 0:
            return total.round(0).cast(pl.Int64).alias(self.target)
        return (total if self.decimals is None else total.round(self.decimals)).alias(self.target)

    def _expr(self):
        t, s = pl.col(self.target), self.sum_expr()
        return ((t - s).abs() <= self.tol).fill_null(False) | (t.is_null() & s.is_null())

    def cap(self, maximum: float, order: list[str]):
        """A decode constraint that keeps a derived target at most `maximum`: a bound on the term
        generated last (in `order`) from the others (t <= max - rest, or t >= rest - max for a
        minus term). None when a term is not generated."""
        if any(t not in order for t in self.terms):
            return None
        last = max(self.terms, key=order.index)
        rest = [pl.col(t).cast(pl.Float64) * s for t, s in zip(self.terms, self.signs) if t != last]
        rest_sum = pl.sum_horizontal(rest) if rest else pl.lit(0.0)
        sign = self.signs[self.terms.index(last)]
        if sign > 0:
            return AtMostExpr(last, maximum - rest_sum, name=f"{self.target}_at_most_train_max")
        return AtLeastExpr(last, rest_sum - maximum, name=f"{self.target}_at_most_train_max")


DecodeConstraint = (MustBeNull | MustNotBeNull | NullExactlyWhen | Implies | Determines | Range | RangeBy | AtMost | AtLeast
                    | AtMostExpr | AtLeastExpr | SumOf)
KINDS = {k.__name__: k for k in (MustBeNull, MustNotBeNull, NullExactlyWhen, Implies, Determines, Range, RangeBy, AtMost, AtLeast,
                                 AtMostExpr, AtLeastExpr, SumOf)}


def constraint_from_json(d: dict):
    """The inverse of `to_json()`. Bad input is a ValueError naming the field, in one line."""
    if not isinstance(d, dict):
        raise ValueError(f"a constraint must be an object with a 'kind', got {type(d).__name__}")
    kind = d.get("kind")
    if kind not in KINDS:
        raise ValueError(f"constraint kind: must be one of {', '.join(KINDS)}, got {kind!r}")
    cls = KINDS[kind]
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known) - {"kind"})
    if unknown:
        raise ValueError(f"{kind}: unknown field {unknown[0]!r} (known: {', '.join(known)})")
    args = {}
    for name, f in known.items():
        if name not in d:
            continue
        v = d[name]
        try:
            args[name] = _from_jsonable(name, v, kind)
        except (TypeError, ValueError, pl.exceptions.PolarsError) as e:
            raise ValueError(f"{kind}.{name}: cannot read {json.dumps(v, default=str)[:80]} ({e})") from None
    for name, f in known.items():
        if name not in d and f.default is MISSING and f.default_factory is MISSING:
            raise ValueError(f"{kind}.{name}: missing")
    try:
        return cls(**args)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{kind}: {e}") from None


def _from_jsonable(name, v, kind=""):
    if isinstance(v, dict) and "polars_expr" in v:
        return _expr_from_json(v["polars_expr"])
    if name == "bounds":
        if isinstance(v, dict):
            return {k: (float(a), float(b)) for k, (a, b) in v.items()}
        return {k: (float(a), float(b)) for k, a, b in v}
    if name == "mapping" and v is not None:
        return dict(v.items()) if isinstance(v, dict) else {k: x for k, x in v}
    if name == "when" and v is not None and not isinstance(v, str):  # AtMost's (column, values)
        if not isinstance(v, list) or len(v) != 2:
            raise ValueError("when must be [column, [values...]]")
        col, vals = v
        if not isinstance(col, str):
            raise ValueError("when must be [column, [values...]]")
        return (col, tuple(vals))
    if name in ("values", "if_values", "then_values", "terms", "signs"):
        if not isinstance(v, list):
            raise ValueError("must be a list")
        return tuple(v)
    if name == "when" and kind not in {k.__name__ for k in NULL_PATTERNS}:
        return v  # None: no condition
    if name in ("column", "when", "other", "if_column", "then_column", "source", "target", "by"):
        if not isinstance(v, str) or not v:
            raise ValueError("must be a column name")
    if name in ("lo", "hi", "tol"):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError("must be a number")
    return v
