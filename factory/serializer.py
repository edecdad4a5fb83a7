"""Record <-> text, as DiffLM writes records: `key: value, key: value, ...`.

Parsing is strict. Keys must appear exactly in the spec's column order; a wrong,
missing, extra or duplicate key, a malformed number, a wrong number of decimals,
an unknown category or a null in a non-nullable column is a ParseError with a
reason. Nothing is guessed. Ranges are not checked here: that is the schema's
job (stage "schema"), so that a parse error always means "not a record".
"""
from __future__ import annotations

import re

import polars as pl

from schemas.columns import NULL_TEXT, Categorical, Numeric, TableSpec

FIELD_SEP = ", "
KEY_SEP = ": "


class ParseError(ValueError):
    def __init__(self, reason: str, column: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.column = column


_INT = re.compile(r"-?(0|[1-9][0-9]*)\Z")


def _decimal_re(decimals: int) -> re.Pattern:
    return re.compile(r"-?(0|[1-9][0-9]*)\.[0-9]{%d}\Z" % decimals)


class Serializer:
    def __init__(self, spec: TableSpec):
        self.spec = spec
        for c in spec.all_columns:  # latent columns are written and parsed like any other
            for bad in (FIELD_SEP, KEY_SEP):
                if bad in c.name or (isinstance(c, Categorical) and any(bad in str(v) for v in c.values)):
                    raise ValueError(f"column {c.name!r}: {bad!r} cannot appear in names or categories")
        self._cols = {c.name: c for c in spec.all_columns}  # O(1) lookup on the per-value hot path
        self._cats = {c.name: {str(v): v for v in c.values} for c in spec.all_columns if isinstance(c, Categorical)}
        self._num_re = {
            c.name: (_INT if c.decimals == 0 else _decimal_re(c.decimals))
            for c in spec.all_columns
            if isinstance(c, Numeric)
        }

    # ---- record -> text -------------------------------------------------------------
    def serialize(self, record: dict, columns: list[str] | None = None) -> str:
        names = self.spec.names if columns is None else columns
        return FIELD_SEP.join(f"{n}{KEY_SEP}{self.spec[n].format(record[n])}" for n in names)

    def serialize_frame(self, df: pl.DataFrame, columns: list[str] | None = None) -> list[str]:
        names = self.spec.names if columns is None else columns
        return [self.serialize(r, names) for r in df.select(names).iter_rows(named=True)]

    # ---- text -> record -------------------------------------------------------------
    def parse(self, text: str, columns: list[str] | None = None) -> dict:
        names = self.spec.names if columns is None else columns
        if not isinstance(text, str) or not text.strip():
            raise ParseError("empty record")
        parts = text.split(FIELD_SEP)
        record: dict = {}
        for i, part in enumerate(parts):
            key, sep, raw = part.partition(KEY_SEP)
            if not sep:
                raise ParseError(f"field {i + 1} {part[:40]!r} has no '{KEY_SEP.strip()}' separator")
            if key in record:
                raise ParseError(f"duplicate key {key!r}", key)
            if i >= len(names):
                raise ParseError(f"unexpected extra key {key!r} after the last column", key)
            if key != names[i]:
                if key not in names:
                    raise ParseError(f"unknown key {key!r} (expected {names[i]!r})", key)
                raise ParseError(f"key {key!r} out of order: expected {names[i]!r} at field {i + 1}", key)
            record[key] = self._parse_value(key, raw)
        if len(record) < len(names):
            missing = names[len(record)]
            raise ParseError(f"missing key {missing!r}", missing)
        return record

    def _parse_value(self, name: str, raw: str):
        col = self._cols[name]
        if raw == NULL_TEXT:
            if not col.nullable:
                raise ParseError(f"{name}: null in a non-nullable column", name)
            return None
        if isinstance(col, Categorical):
            try:
                return self._cats[name][raw]
            except KeyError:
                raise ParseError(f"{name}: unknown category {raw[:40]!r}", name) from None
        if not self._num_re[name].match(raw):
            want = "an integer" if col.decimals == 0 else f"a number with exactly {col.decimals} decimals"
            raise ParseError(f"{name}: {raw[:40]!r} is not {want}", name)
        return int(raw) if col.decimals == 0 else float(raw)

    def parse_many(self, texts: list[str], columns: list[str] | None = None):
        """Parse a batch. Returns (frame of parsed rows, list of (index, ParseError))."""
        names = self.spec.names if columns is None else columns
        rows, ok_index, errors = [], [], []
        for i, t in enumerate(texts):
            try:
                rows.append(self.parse(t, names))
                ok_index.append(i)
            except ParseError as e:
                errors.append((i, e))
        frame = pl.from_dicts(rows, schema=self.spec.polars_schema(names)) if rows else self.spec.empty_frame(names)
        return frame, ok_index, errors
