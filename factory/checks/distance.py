"""Distances between records and a training table: exact copies and DCR (distance to the closest
record). The loop's privacy filter (`factory.checks.privacy`), the privacy gate's calibration and
`factory.evaluate`'s privacy view share them, so generation never imports the evaluation module.
"""
from __future__ import annotations

import numpy as np
import polars as pl

from schemas.columns import NULL_TEXT, Categorical, Numeric, TableSpec


def _rounded(frame: pl.DataFrame, spec: TableSpec) -> pl.DataFrame:
    return frame.select([pl.col(c.name).cast(pl.Float64).round(c.decimals) if isinstance(c, Numeric)
                         else pl.col(c.name).cast(pl.String) for c in spec.columns])


def exact_copy_mask(train: pl.DataFrame, synth: pl.DataFrame, spec: TableSpec) -> np.ndarray:
    """For each synthetic row: is it equal to some training row on every column (numerics
    compared at the spec's decimals, nulls equal to nulls)?"""
    t = _rounded(train, spec).unique().with_columns(pl.lit(True).alias("_copy"))
    s = _rounded(synth, spec)
    joined = s.join(t, on=spec.names, how="left", nulls_equal=True, maintain_order="left")
    return joined["_copy"].fill_null(False).to_numpy().astype(bool)


def exact_copies(train: pl.DataFrame, synth: pl.DataFrame, spec: TableSpec) -> int:
    """Number of synthetic rows equal to some training row on every column (see `exact_copy_mask`)."""
    return int(exact_copy_mask(train, synth, spec).sum())


class _Encoder:
    """Rows -> vectors whose L1 distance is a sum of per-column distances:
    numeric |a - b| after min-max scaling by the training range (a null is 0 plus a null
    indicator of weight 1); categorical 0 if equal else 1 (one-hot at weight 1/2, null is
    its own value). Divided by the number of columns, so a distance is a mean per column."""

    def __init__(self, train: pl.DataFrame, spec: TableSpec):
        self.spec = spec
        self.ranges = {}
        for c in spec.columns:
            if isinstance(c, Numeric):
                s = train[c.name].cast(pl.Float64)
                lo, hi = s.min(), s.max()
                lo = 0.0 if lo is None else lo
                self.ranges[c.name] = (lo, (hi - lo) if hi is not None and hi > lo else 1.0)

    def __call__(self, frame: pl.DataFrame) -> np.ndarray:
        blocks = []
        for c in self.spec.columns:
            s = frame[c.name]
            if isinstance(c, Numeric):
                lo, width = self.ranges[c.name]
                x = s.cast(pl.Float64).to_numpy()
                null = np.isnan(x)
                blocks.append(np.where(null, 0.0, (x - lo) / width)[:, None])
                if c.nullable:
                    blocks.append(null.astype(float)[:, None])
            else:
                values = [str(v) for v in c.values] + [NULL_TEXT]
                codes = (s.cast(pl.String).fill_null(NULL_TEXT)
                         .replace_strict(values, list(range(len(values))), default=len(values), return_dtype=pl.Int64)
                         .to_numpy())
                onehot = np.zeros((len(codes), len(values) + 1))  # last slot: a value outside the spec
                onehot[np.arange(len(codes)), codes] = 0.5
                blocks.append(onehot)
        return np.hstack(blocks).astype(np.float32) / len(self.spec.columns)


class DCRIndex:
    """Distances to the closest row of a fixed training frame (the distance of `dcr`),
    with the training rows encoded once, for repeated queries (the loop's privacy filter)."""

    def __init__(self, train: pl.DataFrame, spec: TableSpec):
        import torch

        self.spec = spec
        self.encoder = _Encoder(train, spec)
        self.train = torch.from_numpy(self.encoder(train))
        self._train_keys = self._keys(train).with_row_index("j")

    def distances(self, other: pl.DataFrame, chunk: int = 1024) -> np.ndarray:
        import torch

        o = torch.from_numpy(self.encoder(other))
        out = []
        with torch.no_grad():
            for i in range(0, o.shape[0], chunk):
                out.append(torch.cdist(o[i:i + chunk], self.train, p=1).min(dim=1).values)
        return torch.cat(out).numpy() if out else np.zeros(0)

    def _keys(self, frame: pl.DataFrame) -> pl.DataFrame:
        """Per row: its categorical values and which nullable numerics are null."""
        cols = [pl.col(c.name).cast(pl.String).fill_null(NULL_TEXT).alias(f"k{i}") if isinstance(c, Categorical)
                else pl.col(c.name).is_null().alias(f"k{i}")
                for i, c in enumerate(self.spec.columns) if isinstance(c, Categorical) or c.nullable]
        return frame.select(cols) if cols else frame.select(pl.lit(True).alias("k"))

    def below(self, other: pl.DataFrame, threshold: float, pairs_chunk: int = 200_000) -> np.ndarray:
        """DCR of each row of `other` where it is below `threshold`, else inf.

        Exact, and fast for small thresholds: two rows that differ in a categorical value or
        in which nullable numerics are null are at least 1/len(columns) apart, so for
        threshold <= 1/len(columns) only training rows with the same categorical values and
        nulls need comparing (usually none or a handful)."""
        out = np.full(other.height, np.inf, dtype=np.float32)
        if other.height == 0 or threshold <= 0:
            return out
        if threshold > 1 / len(self.spec.columns):
            d = self.distances(other)
            return np.where(d < threshold, d, np.inf).astype(np.float32)
        keys = self._keys(other).with_row_index("i")
        on = [c for c in keys.columns if c != "i"]
        pairs = keys.join(self._train_keys, on=on, how="inner").select("i", "j")
        if pairs.height == 0:
            return out
        o = self.encoder(other)
        t = self.train.numpy()
        ii, jj = pairs["i"].to_numpy(), pairs["j"].to_numpy()
        for s in range(0, len(ii), pairs_chunk):
            i, j = ii[s:s + pairs_chunk], jj[s:s + pairs_chunk]
            np.minimum.at(out, i, np.abs(o[i] - t[j]).sum(axis=1))
        return np.where(out < threshold, out, np.inf).astype(np.float32)


def dcr(train: pl.DataFrame, other: pl.DataFrame, spec: TableSpec, *, chunk: int = 1024) -> np.ndarray:
    """Distance of each row of `other` to its closest row of `train` (see `_Encoder`)."""
    return DCRIndex(train, spec).distances(other, chunk)
