"""Shared column types: the one description of a table that every layer reads.

A domain declares its table once as a list of these columns. The Pandera schema,
the serializer, the model tokenizer (fixed-width, schema-guided decoding), the
baseline sampler and the DuckDB DDL are all derived from that one list, so they
cannot disagree about a column's type, range, categories or nullability.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

NULL_TEXT = "null"  # how a missing value is written in serialized text


@dataclass(frozen=True)
class Numeric:
    """A number in [lo, hi] with a fixed number of decimals (0 = integer)."""

    name: str
    lo: float
    hi: float
    decimals: int = 0
    nullable: bool = False
    derived: bool = False  # computed from other columns by the domain, never generated
    description: str = ""

    def __post_init__(self):
        if self.lo > self.hi:
            raise ValueError(f"column {self.name!r}: lo {self.lo} > hi {self.hi}")
        if self.decimals < 0:
            raise ValueError(f"column {self.name!r}: decimals must be >= 0")

    @property
    def dtype(self) -> pl.DataType:
        return pl.Int64() if self.decimals == 0 else pl.Float64()

    @property
    def sql_type(self) -> str:
        return "BIGINT" if self.decimals == 0 else f"DECIMAL(18,{self.decimals})"

    def format(self, value) -> str:
        if value is None:
            return NULL_TEXT
        if self.decimals == 0:
            return str(int(value))
        return f"{value:.{self.decimals}f}"

    # Scaled-integer view used by the model tokenizer: 1234.56 -> 123456.
    @property
    def scale(self) -> int:
        return 10**self.decimals

    @property
    def int_lo(self) -> int:
        return round(self.lo * self.scale)

    @property
    def int_hi(self) -> int:
        return round(self.hi * self.scale)


@dataclass(frozen=True)
class Categorical:
    """One of a fixed set of values (strings, or integers such as a loan term)."""

    name: str
    values: tuple = field(default_factory=tuple)
    nullable: bool = False
    derived: bool = False
    description: str = ""

    def __post_init__(self):
        if not self.values:
            raise ValueError(f"column {self.name!r}: a categorical needs values")
        kinds = {type(v) for v in self.values}
        if len(kinds) != 1 or kinds.pop() not in (str, int):
            raise ValueError(f"column {self.name!r}: values must be all str or all int")
        texts = [str(v) for v in self.values]
        if len(set(texts)) != len(texts):
            raise ValueError(f"column {self.name!r}: duplicate values")
        if NULL_TEXT in texts:
            raise ValueError(f"column {self.name!r}: {NULL_TEXT!r} is reserved for missing values")

    @property
    def is_int(self) -> bool:
        return isinstance(self.values[0], int)

    @property
    def dtype(self) -> pl.DataType:
        return pl.Int64() if self.is_int else pl.String()

    @property
    def sql_type(self) -> str:
        return "BIGINT" if self.is_int else "VARCHAR"

    def format(self, value) -> str:
        return NULL_TEXT if value is None else str(value)


Column = Numeric | Categorical


@dataclass(frozen=True)
class TableSpec:
    """An ordered list of columns. Order is the serialization (and generation) order."""

    columns: tuple[Column, ...]

    def __post_init__(self):
        names = [c.name for c in self.columns]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"duplicate column names: {sorted(dupes)}")

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def generated(self) -> list[Column]:
        return [c for c in self.columns if not c.derived]

    @property
    def generated_names(self) -> list[str]:
        return [c.name for c in self.generated]

    def __getitem__(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    def polars_schema(self, names: list[str] | None = None) -> dict[str, pl.DataType]:
        names = self.names if names is None else names
        return {n: self[n].dtype for n in names}

    def empty_frame(self, names: list[str] | None = None) -> pl.DataFrame:
        return pl.DataFrame(schema=self.polars_schema(names))

    def to_json(self) -> list[dict]:
        out = []
        for c in self.columns:
            d = {"name": c.name, "kind": type(c).__name__.lower(), "nullable": c.nullable, "derived": c.derived}
            if isinstance(c, Numeric):
                d |= {"lo": c.lo, "hi": c.hi, "decimals": c.decimals}
            else:
                d |= {"values": list(c.values)}
            out.append(d)
        return out
