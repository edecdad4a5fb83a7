"""Read a user's CSV or Parquet file as a domain table, with errors that name the problem."""
from __future__ import annotations

from pathlib import Path

import polars as pl

from schemas.columns import TableSpec


LINEAGE_COLUMNS = ("run_id", "shard", "record_id")


class InputError(ValueError):
    pass


def read_table(path: str | Path, spec: TableSpec) -> pl.DataFrame:
    """The file's columns checked against the spec, then cast to the spec's dtypes (spec order)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such file: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            df = pl.read_parquet(path)
        elif suffix == ".csv":
            # All text first: casting below reports the column that does not fit, instead of a guess.
            df = pl.read_csv(path, infer_schema=False)
        else:
            raise InputError(f"{path}: unknown extension {path.suffix!r}; expected .csv or .parquet")
    except (pl.exceptions.PolarsError, OSError) as e:
        raise InputError(f"cannot read {path}: {str(e).strip().splitlines()[0]}") from None
    # an export made with --lineage: its run_id, shard and record_id columns are not the domain's
    df = df.drop([c for c in LINEAGE_COLUMNS if c in df.columns and c not in spec.names])
    missing = [n for n in spec.names if n not in df.columns]
    extra = [n for n in df.columns if n not in spec.names]
    if missing or extra:
        parts = ([f"missing columns: {', '.join(missing)}"] if missing else []) + (
            [f"unexpected columns: {', '.join(extra)}"] if extra else [])
        raise InputError(f"{path}: " + "; ".join(parts))
    out = []
    for name, dtype in spec.polars_schema().items():
        col = df[name]
        if col.dtype.is_float() and dtype.is_integer():
            frac = col.drop_nulls().drop_nans()
            if (frac != frac.round(0)).any():
                raise InputError(f"{path}: column {name!r} holds non-integer numbers; expected {dtype}")
        try:
            col = col.str.strip_chars() if col.dtype == pl.String and dtype != pl.String else col
            out.append(col.cast(dtype, strict=True))
        except pl.exceptions.PolarsError:
            raise InputError(f"{path}: column {name!r} cannot be read as {dtype}") from None
    return pl.DataFrame(out)
