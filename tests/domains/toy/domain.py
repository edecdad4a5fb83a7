"""A tiny second domain, defined only in tests: rectangles.

It shares nothing with finance, so running it through the same loop and CLI
shows that the engine is domain-agnostic. It is found via FACTORY_DOMAINS_PATH.
"""
from pathlib import Path

import polars as pl

from factory.domain import Domain
from factory.rules import Rule
from schemas.columns import Categorical, Numeric, TableSpec

SPEC = TableSpec((
    Categorical("kind", ("small", "large"), description="large when the area is at least 100"),
    Numeric("width", 1, 20),
    Numeric("height", 1, 20),
    Categorical("label", ("a", "b"), nullable=True),
    Numeric("weight", 0, 50, decimals=1, nullable=True),
    Numeric("area", 1, 400, derived=True),
))

RULES = [
    Rule("kind_matches_area", "kind must be large exactly when width * height >= 100",
         (pl.col("kind") == "large") == (pl.col("width") * pl.col("height") >= 100)),
    Rule("area_is_product", "area must equal width * height", pl.col("area") == pl.col("width") * pl.col("height")),
]


def derive(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_columns(area=pl.col("width") * pl.col("height")).select(SPEC.names)


def _table() -> pl.DataFrame:
    i = pl.int_range(0, 300, eager=True)
    df = pl.DataFrame({
        "width": 1 + (i * 7) % 20,
        "height": 1 + (i * 11) % 20,
        "label": pl.Series([None, "a", "b"] * 100, dtype=pl.String),
        "weight": pl.Series([None if k % 5 == 0 else round((k * 37 % 500) / 10, 1) for k in range(300)]),
    }).with_columns(pl.col("width", "height").cast(pl.Int64))
    df = df.with_columns(kind=pl.when(pl.col("width") * pl.col("height") >= 100).then(pl.lit("large")).otherwise(pl.lit("small")))
    return derive(df)


def load_split(name: str) -> pl.DataFrame:
    bounds = {"train": (0, 240), "val": (240, 270), "test": (270, 300)}
    if name not in bounds:
        raise ValueError(f"unknown split {name!r}")
    lo, hi = bounds[name]
    return _table()[lo:hi]


DOMAIN = Domain(
    name="toy",
    root=Path(__file__).parent,
    spec=SPEC,
    rules=RULES,
    derive=derive,
    load_split=load_split,
    description="rectangles (test-only domain)",
    config={"batch_size": 64},
)
