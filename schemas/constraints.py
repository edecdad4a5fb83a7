"""Decode constraints: cross-column relations that schema-guided decoding enforces per row.

A domain lists them beside its rules. The decoder's token mask then only allows
values that satisfy them, given the columns already generated (so the column a
constraint depends on must come earlier in generation order). They do not
replace the rules: every record is still validated by the rules, which stay the
single source of truth. Each class is one relation, SDV-constraint style.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl


@dataclass(frozen=True)
class MustBeNull:
    """`column` is null whenever column `when` takes one of `values`."""

    column: str
    when: str
    values: tuple


@dataclass(frozen=True)
class MustNotBeNull:
    """`column` is present whenever column `when` takes one of `values`."""

    column: str
    when: str
    values: tuple


@dataclass(frozen=True)
class RangeBy:
    """Numeric `column` lies in bounds[v] = (lo, hi) where v is the value of categorical column `by`."""

    column: str
    by: str
    bounds: dict = field(hash=False)


@dataclass(frozen=True)
class AtMost:
    """Numeric `column` <= numeric column `other` (optionally only when column when[0] is in when[1])."""

    column: str
    other: str
    when: tuple | None = None


@dataclass(frozen=True)
class AtLeast:
    """Numeric `column` >= numeric column `other` (optionally only when column when[0] is in when[1])."""

    column: str
    other: str
    when: tuple | None = None


@dataclass(frozen=True)
class AtMostExpr:
    """Numeric `column` <= `bound`, a polars expression over columns generated before it (e.g. the
    interest an amortization schedule has accrued); a row where `bound` is null is unconstrained.
    Optionally only when column when[0] is in when[1]. The domain's own expression is evaluated,
    so the mask and the arithmetic in `derive` cannot disagree."""

    column: str
    bound: pl.Expr = field(hash=False, compare=False)
    when: tuple | None = None

    @property
    def inputs(self) -> list[str]:
        return sorted(set(self.bound.meta.root_names()))


@dataclass(frozen=True)
class AtLeastExpr(AtMostExpr):
    """Numeric `column` >= `bound` (same inputs and `when` as AtMostExpr). Never empties a row's
    range: where the other bounds leave less than `bound`, the column is held at its upper bound."""


DecodeConstraint = MustBeNull | MustNotBeNull | RangeBy | AtMost | AtLeast | AtMostExpr | AtLeastExpr
