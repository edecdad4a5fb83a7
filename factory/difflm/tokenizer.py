"""Schema tokenizer: a record's generated columns <-> a fixed-length row of token ids.

Every column takes a fixed number of positions, so all rows of a batch decode in
lockstep and "which column, which digit" is a function of the step alone:
- a categorical column: 1 position, one token per (column, value), plus NULL;
- a numeric column: its value as a scaled non-negative integer (1234.56 -> 123456)
  written in base 100 ("chunk" tokens 00..99), most significant chunk first, in as
  many chunks as the column's upper bound needs. A null is NULL then PAD tokens.
  A column whose lower bound is negative is written as value - lo (so -12.50 in
  [-20, 20] is 750); a column with lo >= 0 is written as is, so its ids do not depend
  on lo.
Keys and separators are never tokens: the position implies them. This is what lets
schema-guided decoding mask every step with a tensor lookup for the whole batch,
and keeps a finance record at ~51 tokens (the text form is ~180 word pieces).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from schemas.columns import Categorical, Numeric, TableSpec
from schemas.constraints import (NULL_PATTERNS, AtLeast, AtLeastExpr, AtMost, AtMostExpr, Determines, Implies,
                                 Range, RangeBy, SumOf)

PAD, BOS, NULL = 0, 1, 2
FORCE = {"null": 1, "present": 2}  # a row's forced nullness in the mask state (0: free)
N_SPECIAL = 3
BASE = 100


@dataclass
class Slot:
    column: str
    kind: str  # "cat" | "num"
    chunk: int  # index of this chunk within the column (0 = most significant)
    n_chunks: int


class SchemaTokenizer:
    def __init__(self, spec: TableSpec, columns: list[str], constraints=()):
        self.spec = spec
        self.columns = list(columns)
        self.chunk0 = N_SPECIAL  # ids of chunk tokens 00..99
        next_id = N_SPECIAL + BASE
        self.cat_ids: dict[str, dict] = {}
        self.slots: list[Slot] = []
        self.offsets: dict[str, int] = {}  # numeric column -> the scaled value written as 0
        for name in self.columns:
            col = spec[name]
            if isinstance(col, Categorical):
                self.cat_ids[name] = {v: next_id + i for i, v in enumerate(col.values)}
                next_id += len(col.values)
                self.slots.append(Slot(name, "cat", 0, 1))
            else:
                self.offsets[name] = min(col.int_lo, 0)  # negative ranges are written shifted by lo
                n = max(1, math.ceil(len(str(col.int_hi - self.offsets[name])) / 2))
                self.slots += [Slot(name, "num", k, n) for k in range(n)]
        self.vocab_size = next_id
        self.length = len(self.slots)
        self.device = torch.device("cpu")  # where decoding state and masks live (see `to`)
        self._build_masks()
        self._compile_constraints(constraints)

    # ---- static structure ------------------------------------------------------------
    def _build_masks(self):
        V, L = self.vocab_size, self.length
        static = torch.zeros(L, V, dtype=torch.bool)
        for t, s in enumerate(self.slots):
            col = self.spec[s.column]
            if s.kind == "cat":
                static[t, list(self.cat_ids[s.column].values())] = True
                static[t, NULL] = col.nullable
            else:
                static[t, self.chunk0:self.chunk0 + BASE] = True
                if s.chunk == 0:
                    static[t, NULL] = col.nullable
        self.static_mask = static  # [L, V] what the schema allows before per-row state
        lo, hi, place = [], [], []
        for s in self.slots:
            if s.kind == "num":
                col = self.spec[s.column]
                lo.append(col.int_lo)
                hi.append(col.int_hi)
                place.append(BASE ** (s.n_chunks - 1 - s.chunk))
            else:
                lo.append(0), hi.append(0), place.append(1)
        self.slot_offset = torch.tensor([self.offsets.get(s.column, 0) for s in self.slots], dtype=torch.long)
        self.lo = torch.tensor(lo, dtype=torch.long)
        self.hi = torch.tensor(hi, dtype=torch.long)
        self.place = torch.tensor(place, dtype=torch.long)  # value of one unit of this chunk

    def to(self, device: str | torch.device) -> "SchemaTokenizer":
        """Keep the decoding masks and state on `device` (the decoder's), so decoding never leaves it."""
        self.device = torch.device(device)
        self.static_mask, self.lo, self.hi, self.place, self.slot_offset = (
            x.to(self.device) for x in (self.static_mask, self.lo, self.hi, self.place, self.slot_offset))
        for c in self._tables.values():
            for k, v in c.items():
                c[k] = v.to(self.device)
        return self

    # ---- records <-> ids -------------------------------------------------------------
    def encode(self, df: pl.DataFrame) -> torch.Tensor:
        """Frame with (at least) the tokenizer's columns -> LongTensor [N, L]."""
        out = np.zeros((df.height, self.length), dtype=np.int64)
        t = 0
        for name in self.columns:
            col = self.spec[name]
            s = df[name]
            if isinstance(col, Categorical):
                ids = s.replace_strict(self.cat_ids[name], default=NULL, return_dtype=pl.Int64).to_numpy()
                out[:, t] = ids
                t += 1
            else:
                n = self.slots[t].n_chunks
                null = s.is_null().to_numpy()
                v = (s.fill_null(0).cast(pl.Float64) * col.scale).round(0).cast(pl.Int64).to_numpy()
                v = np.where(null, 0, v - self.offsets[name])
                for k in range(n):
                    chunk = (v // BASE ** (n - 1 - k)) % BASE
                    out[:, t + k] = np.where(null, PAD if k else NULL, self.chunk0 + chunk)
                t += n
        return torch.from_numpy(out)

    def decode(self, ids: torch.Tensor) -> pl.DataFrame:
        """LongTensor [N, L] -> frame of the tokenizer's columns (typed as the spec says).

        Assumes a well-formed row (schema-guided decoding guarantees it); use
        `to_texts` for anything that must go through the strict parser.
        """
        a = ids.cpu().numpy()
        data, t = {}, 0
        for name in self.columns:
            col = self.spec[name]
            if isinstance(col, Categorical):
                inv = {i: v for v, i in self.cat_ids[name].items()}
                data[name] = pl.Series(name, [inv.get(int(i)) for i in a[:, t]], dtype=col.dtype)
                t += 1
            else:
                n = self.slots[t].n_chunks
                chunks = a[:, t:t + n] - self.chunk0
                null = a[:, t] == NULL
                v = np.zeros(len(a), dtype=np.int64)
                for k in range(n):
                    v = v * BASE + np.clip(chunks[:, k], 0, BASE - 1)
                s = pl.Series(name, v + self.offsets[name])
                s = s if col.decimals == 0 else (s.cast(pl.Float64) / col.scale).round(col.decimals)
                data[name] = s.cast(col.dtype).scatter(np.flatnonzero(null), None) if null.any() else s.cast(col.dtype)
                t += n
        return pl.DataFrame(data)

    def to_texts(self, ids: torch.Tensor) -> list[str]:
        """LongTensor [N, L] -> serialized `key: value, ...` texts, vectorized.

        A token that does not fit its slot (possible only with unconstrained
        decoding) is written as `<token ID>`, so the strict parser rejects the row
        with a reason naming the column.
        """
        a = ids.cpu().numpy()
        parts, t = [], 0
        for name in self.columns:
            col = self.spec[name]
            if isinstance(col, Categorical):
                ids_t = pl.Series(a[:, t])
                mapping = {i: str(v) for v, i in self.cat_ids[name].items()}
                if col.nullable:
                    mapping[NULL] = "null"
                vals = ids_t.replace_strict(mapping, default=None, return_dtype=pl.String)
                vals = vals.fill_null(pl.Series(["<token %d>" % i for i in a[:, t]]))
                t += 1
            else:
                n = self.slots[t].n_chunks
                block = a[:, t:t + n]
                chunks = block - self.chunk0
                is_chunk = (chunks >= 0) & (chunks < BASE)
                null = (block[:, 0] == NULL) & (block[:, 1:] == PAD).all(1) & col.nullable
                ok = is_chunk.all(1)
                v = np.zeros(len(a), dtype=np.int64)
                for k in range(n):
                    v = v * BASE + np.where(is_chunk[:, k], chunks[:, k], 0)
                v = v + self.offsets[name]
                if col.decimals:
                    a_v = np.abs(v)
                    ip, fp = a_v // col.scale, a_v % col.scale
                    sign = pl.Series(np.where(v < 0, "-", ""))
                    num = sign + pl.Series(ip).cast(pl.String) + "." + pl.Series(fp).cast(pl.String).str.zfill(col.decimals)
                else:
                    num = pl.Series(v).cast(pl.String)
                bad = pl.Series(["<token %d>" % block[i, 0] for i in range(len(a))]) if not ok.all() else num
                vals = pl.select(pl.when(pl.Series(null)).then(pl.lit("null"))
                                 .when(pl.Series(ok)).then(num).otherwise(bad)).to_series()
                t += n
            parts.append(pl.lit(f"{name}: ") + vals)
        return pl.select(pl.concat_str(parts, separator=", ")).to_series().to_list()

    # ---- schema-guided decoding ------------------------------------------------------
    # Decoding state, per row of the batch: the value prefix of the numeric column being
    # written, its null flag, the row's [lo, hi] bounds and null requirement for the
    # current column (from the spec and the decode constraints), and what earlier
    # columns were decoded to (constraints look them up).
    def _compile_constraints(self, constraints):
        order = {c: i for i, c in enumerate(self.columns)}
        self.constraints: dict[str, list] = {}
        self._tables: dict[int, dict] = {}  # id(constraint) -> lookup tensors indexed by a token id
        for c in constraints:
            column, _ = mask_plan(c, self.spec, order)
            self.constraints.setdefault(column, []).append(c)
        self.value_of = {n: {i: v for v, i in ids.items()} for n, ids in self.cat_ids.items()}
        for cs in self.constraints.values():
            for c in cs:
                if isinstance(c, Determines):
                    self._tables[id(c)] = self._determines_table(c)

    def _determines_table(self, c: Determines) -> dict:
        """Per token id of the source: the target token allowed (categorical target) or the target's
        scaled value (numeric target); a source value the mapping lacks allows only a null target."""
        V, target = self.vocab_size, self.spec[c.target]
        src_values = list(self.cat_ids[c.source]) + [None]
        lookup = c.lookup(src_values)
        src_id = {**self.cat_ids[c.source], None: NULL}
        if isinstance(target, Categorical):
            allow = torch.zeros(V, V, dtype=torch.bool)
            for v in src_values:
                t = lookup.get(v)
                allow[src_id[v], self.cat_ids[c.target][t] if t in self.cat_ids[c.target] else NULL] = True
            return {"allow": allow}
        val = torch.zeros(V, dtype=torch.long)
        null = torch.ones(V, dtype=torch.bool)
        for v in src_values:
            t = lookup.get(v)
            if t is not None:
                val[src_id[v]], null[src_id[v]] = round(float(t) * target.scale), False
        return {"val": val, "null": null}

    def _decoded_frame(self, names: list[str], state: dict) -> pl.DataFrame:
        """The values already decoded for columns `names`, one row per batch row (nulls kept)."""
        cols = []
        for n in names:
            col, isnull = self.spec[n], state["isnull"][n].cpu().numpy()
            if isinstance(col, Categorical):
                lut = self.value_of[n]
                vals = [None if z else lut.get(int(i)) for i, z in zip(state["tok"][n].cpu().numpy(), isnull)]
                cols.append(pl.Series(n, vals, dtype=col.dtype))
            else:
                v = state["val"][n].cpu().numpy().astype(np.float64) / col.scale
                cols.append(pl.Series(n, np.where(isnull, np.nan, v)).fill_nan(None).cast(col.dtype))
        return pl.DataFrame(cols)

    def _ids_of(self, column: str, values) -> torch.Tensor:
        return torch.tensor([self.cat_ids[column][v] for v in values if v in self.cat_ids[column]],
                            dtype=torch.long, device=self.device)

    def _hit(self, column: str, values, state: dict) -> torch.Tensor:
        """Rows whose decoded `column` is one of `values` (None: null)."""
        hit = state["isnull"][column] if None in values else torch.zeros_like(state["isnull"][column])
        if isinstance(self.spec[column], Categorical):
            hit = hit | torch.isin(state["tok"][column], self._ids_of(column, [v for v in values if v is not None]))
        return hit

    def _value(self, column: str, state: dict) -> torch.Tensor:
        """Decoded numeric column as float64 in its own units (0 where null)."""
        return state["val"][column].to(torch.float64) / self.spec[column].scale

    def _row_bounds(self, name: str, state: dict, B: int):
        col = self.spec[name]
        numeric = isinstance(col, Numeric)
        dev = self.device
        lo = torch.full((B,), col.int_lo if numeric else 0, dtype=torch.long, device=dev)
        hi = torch.full((B,), col.int_hi if numeric else 0, dtype=torch.long, device=dev)
        force = torch.zeros(B, dtype=torch.int8, device=dev)  # 1 = must be null, 2 = must not be null
        allow = None  # categorical: [B, V] tokens the category constraints leave
        floors = []

        def restrict(rows, ids_mask):
            nonlocal allow
            allow = torch.ones(B, self.vocab_size, dtype=torch.bool, device=dev) if allow is None else allow
            allow = torch.where(rows[:, None], allow & ids_mask, allow)

        for c in self.constraints.get(name, ()):
            if isinstance(c, NULL_PATTERNS):
                hit = self._hit(c.when, c.values, state)
                hit = ~hit if c.invert else hit
                miss = force if c.on_miss is None else FORCE[c.on_miss]
                force = torch.where(hit, FORCE[c.on_hit], miss).to(torch.int8)
            elif isinstance(c, Implies):
                hit = self._hit(c.if_column, c.if_values, state)
                if not isinstance(col, Categorical) or set(c.then_values) == {None}:
                    force = torch.where(hit, 1, force).to(torch.int8)
                    continue
                ok = torch.zeros(self.vocab_size, dtype=torch.bool, device=dev)
                ok[self._ids_of(name, c.then_values)] = True
                ok[NULL] = None in c.then_values
                restrict(hit, ok[None, :])
            elif isinstance(c, Determines):
                src = state["tok"][c.source]
                table = self._tables[id(c)]
                if "allow" in table:
                    restrict(torch.ones(B, dtype=torch.bool, device=dev), table["allow"][src])
                else:
                    null = table["null"][src]
                    force = torch.where(null, 1, force).to(torch.int8)
                    v = table["val"][src]
                    lo, hi = torch.where(null, lo, torch.maximum(lo, v)), torch.where(null, hi, torch.minimum(hi, v))
            elif isinstance(c, Range):
                lo = torch.maximum(lo, torch.tensor(math.ceil(c.lo * col.scale - 1e-6), device=dev))
                hi = torch.minimum(hi, torch.tensor(math.floor(c.hi * col.scale + 1e-6), device=dev))
            elif isinstance(c, SumOf):
                # target - sum(sign * term) = 0, solved for this column (the last generated of them)
                cols = [c.target, *c.terms]
                coef = [1, *(-s for s in c.signs)]
                k = cols.index(name)
                known = torch.ones(B, dtype=torch.bool, device=dev)
                rest = torch.zeros(B, dtype=torch.float64, device=dev)
                for j, (other, a) in enumerate(zip(cols, coef)):
                    if j != k:
                        known = known & ~state["isnull"][other]
                        rest = rest + a * self._value(other, state)
                # nulls: the rule passes a null target only beside a null sum
                terms_null = torch.zeros(B, dtype=torch.bool, device=dev)
                for other in c.terms:
                    if other != name:
                        terms_null = terms_null | state["isnull"][other]
                if k == 0:
                    force = torch.where(terms_null, 1, torch.where(known, 2, force)).to(torch.int8)
                else:
                    target_null = state["isnull"][c.target]
                    force = torch.where(~terms_null, torch.where(target_null, 1, 2), force).to(torch.int8)
                    # a present target beside a null term cannot hold whatever this column is: no value fits
                    void = ~target_null & terms_null
                    force = torch.where(void, 2, force).to(torch.int8)
                    lo, hi = torch.where(void, hi + 1, lo), hi
                x = -rest / coef[k]
                lo = torch.where(known, torch.maximum(lo, torch.ceil((x - c.tol) * col.scale - 1e-6).long()), lo)
                hi = torch.where(known, torch.minimum(hi, torch.floor((x + c.tol) * col.scale + 1e-6).long()), hi)
            elif isinstance(c, RangeBy):
                ids = state["tok"][c.by]
                lo_t = torch.full((self.vocab_size,), col.int_lo, dtype=torch.long, device=dev)
                hi_t = torch.full((self.vocab_size,), col.int_hi, dtype=torch.long, device=dev)
                for v, (a, b) in c.bounds.items():
                    if v in self.cat_ids[c.by]:
                        lo_t[self.cat_ids[c.by][v]] = round(a * col.scale)
                        hi_t[self.cat_ids[c.by][v]] = round(b * col.scale)
                lo, hi = torch.maximum(lo, lo_t[ids]), torch.minimum(hi, hi_t[ids])
            elif isinstance(c, AtMostExpr):
                b = self._decoded_frame(c.inputs, state).select(c.bound.cast(pl.Float64)).to_series()
                b = torch.from_numpy(b.fill_null(np.nan).to_numpy().copy()).to(dev)
                known = ~torch.isnan(b)
                if c.when:
                    known = known & self._hit(c.when[0], c.when[1], state)
                if isinstance(c, AtLeastExpr):  # applied after every upper bound (below)
                    floors.append((known, torch.ceil(torch.nan_to_num(b) * col.scale - 1e-6).to(torch.long)))
                    continue
                cap = torch.floor(torch.nan_to_num(b) * col.scale + 1e-6).to(torch.long)
                hi = torch.where(known, torch.minimum(hi, cap), hi)
            else:
                other = self.spec[c.other]
                v, known = state["val"][c.other], ~state["isnull"][c.other]
                if c.when:
                    known = known & self._hit(c.when[0], c.when[1], state)
                if isinstance(c, AtMost):  # value in this column's units, rounded toward feasibility
                    hi = torch.where(known, torch.minimum(hi, v * col.scale // other.scale), hi)
                else:
                    lo = torch.where(known, torch.maximum(lo, -((-v * col.scale) // other.scale)), lo)
        for known, floor in floors:  # a lower bound beyond the upper one holds the column at the upper one
            lo = torch.where(known, torch.maximum(lo, torch.minimum(floor, hi)), lo)
        return lo, hi, force, allow

    def init_state(self, batch: int) -> dict:
        z = torch.zeros(batch, dtype=torch.long, device=self.device)
        # fallback: rows where the constraints left no value at some step (the schema alone decided)
        return {"prefix": z, "null": z.bool(), "lo": z, "hi": z, "force": z.to(torch.int8), "allow": None,
                "fallback": None,
                "tok": {}, "val": {}, "isnull": {}}

    def allowed(self, t: int, state: dict) -> torch.Tensor:
        """Bool mask [B, V] of the tokens allowed at position t for every row of the batch."""
        s = self.slots[t]
        B = state["prefix"].shape[0]
        base = self.static_mask[t].expand(B, -1)
        if s.chunk == 0 and (s.kind == "num" or s.column in self.constraints):
            state["lo"], state["hi"], state["force"], state["allow"] = self._row_bounds(s.column, state, B)
        if s.kind == "cat":
            if s.column not in self.constraints:
                return base
            mask = base.clone() if state["allow"] is None else base & state["allow"]
            must_null, not_null = state["force"] == 1, state["force"] == 2
            mask[must_null] = False
            mask[must_null, NULL] = bool(base[0, NULL])
            mask[not_null, NULL] = False
        else:
            mask = base.clone()
            ok = self._chunks_ok(t, state["prefix"], state["lo"], state["hi"])
            if s.chunk == 0:
                mask[:, self.chunk0:self.chunk0 + BASE] = ok & (state["force"] != 1)[:, None]
                mask[:, NULL] = base[:, NULL] & (state["force"] != 2)
            else:
                null = state["null"]
                mask[:, self.chunk0:self.chunk0 + BASE] = ok & ~null[:, None]
                mask[:, PAD] = null
        # a row whose constraints cannot all hold falls back to the schema alone; the rules reject it
        stuck = ~mask.any(1)
        if bool(stuck.any()):
            mask[stuck] = base[stuck]
            state["fallback"] = stuck if state.get("fallback") is None else state["fallback"] | stuck
        return mask

    def _chunks_ok(self, t: int, prefix: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """[B, BASE]: chunk d is allowed at numeric position t iff some completion of
        prefix*BASE + d lies in the row's [lo, hi] (in written units: value - offset)."""
        d = torch.arange(BASE, device=self.device)
        low = (prefix[:, None] * BASE + d[None, :]) * self.place[t]
        high = low + self.place[t] - 1
        off = self.slot_offset[t]
        return (high >= (lo - off)[:, None]) & (low <= (hi - off)[:, None])

    # ---- conditions: a narrower set of values for some columns -----------------------------
    def narrowing(self, allowed: dict) -> dict:
        """Compile {column: set of values (None = null)} for categoricals and {column: (lo, hi,
        null_ok)} for numerics into what `narrow` reads. Columns the tokenizer does not write are
        ignored (a condition on a derived column is checked after decoding)."""
        out = {}
        for name, a in allowed.items():
            if name not in self.cat_ids and name not in self.offsets:
                continue
            col = self.spec[name]
            if isinstance(col, Categorical):
                ok = torch.zeros(self.vocab_size, dtype=torch.bool)
                ok[self._ids_of(name, [v for v in a if v is not None]).cpu()] = True
                ok[NULL] = None in a
                out[name] = ok.to(self.device)
            else:
                lo, hi, null_ok = a
                out[name] = (math.ceil(lo * col.scale - 1e-6), math.floor(hi * col.scale + 1e-6), bool(null_ok))
        return out

    def narrow(self, t: int, state: dict, mask: torch.Tensor, narrowing: dict) -> torch.Tensor | None:
        """The step-t mask `mask` (from `allowed`, same state) narrowed to a condition's values
        (`narrowing`), or None where the condition does not touch position t."""
        s = self.slots[t]
        a = narrowing.get(s.column)
        if a is None:
            return None
        if s.kind == "cat":
            return mask & a
        lo, hi, null_ok = a
        lo = torch.clamp(state["lo"], min=lo)
        hi = torch.clamp(state["hi"], max=hi)
        out = mask.clone()
        ok = self._chunks_ok(t, state["prefix"], lo, hi) & (lo <= hi)[:, None]  # an empty interval: no number
        out[:, self.chunk0:self.chunk0 + BASE] &= ok
        if s.chunk == 0 and not null_ok:
            out[:, NULL] = False
        return out

    @staticmethod
    def select_rows(state: dict, idx: torch.Tensor) -> dict:
        """The decoding state of rows `idx` (a resampling of the batch, see DomainDecoder.generate)."""
        def pick(v):
            if isinstance(v, dict):
                return {k: pick(x) for k, x in v.items()}
            return None if v is None else v[idx]
        return {k: pick(v) for k, v in state.items()}

    def advance(self, t: int, state: dict, tokens: torch.Tensor) -> dict:
        s = self.slots[t]
        if s.kind == "cat":
            state["tok"][s.column], state["isnull"][s.column] = tokens, tokens == NULL
            return state
        if s.chunk == 0:
            null = tokens == NULL
            prefix = torch.where(null, 0, tokens - self.chunk0)
        else:
            null = state["null"]
            prefix = torch.where(null, 0, state["prefix"] * BASE + (tokens - self.chunk0))
        if s.chunk + 1 == s.n_chunks:  # column complete: its scaled value, offset undone
            state["val"][s.column], state["isnull"][s.column] = prefix + self.slot_offset[t], null
            prefix = torch.zeros_like(prefix)
        state["prefix"], state["null"] = prefix, null
        return state

    # ---- save / load -----------------------------------------------------------------
    def config(self) -> dict:
        return {"columns": self.columns, "vocab_size": self.vocab_size, "length": self.length, "base": BASE,
                "spec": [c for c in self.spec.to_json() if c["name"] in self.columns]}

    def save_pretrained(self, path: str | Path):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "tokenizer.json").write_text(json.dumps(self.config(), indent=1))

    @classmethod
    def from_pretrained(cls, path: str | Path, spec: TableSpec, constraints=()) -> "SchemaTokenizer":
        from .config import ModelError, read_json_object

        cfg = read_json_object(Path(path) / "tokenizer.json")
        if not (isinstance(cfg.get("columns"), list) and all(isinstance(c, str) for c in cfg["columns"])
                and set(cfg["columns"]) <= set(spec.names) | set(spec.generated_names)):
            raise ModelError(f"{path}/tokenizer.json: field columns must list this domain's column names")
        tok = cls(spec, cfg["columns"], constraints)
        if tok.config() != cfg:
            raise ValueError(f"{path}/tokenizer.json was built for a different schema than this domain's "
                             "(columns, ranges or categories changed); retrain the stack")
        return tok


# ---- which constraints the mask can enforce ------------------------------------------------------
def mask_plan(c, spec: TableSpec, order: dict[str, int]) -> tuple[str, list[str]]:
    """(the column whose mask enforces `c`, the columns it reads, which must come earlier), for
    columns generated in `order` (name -> position). A ValueError says why the mask cannot."""
    def need_categorical(name):
        if not isinstance(spec[name], Categorical):
            raise ValueError(f"decode constraint {c}: condition column {name!r} must be categorical")

    def condition(name, values):  # a categorical, or any column when the condition is "is null"
        if not (isinstance(spec[name], Categorical) or set(values) == {None}):
            need_categorical(name)

    def numeric(name):
        if not isinstance(spec[name], Numeric):
            raise ValueError(f"decode constraint {c}: {name!r} must be numeric")

    for name in c.columns:
        try:
            spec[name]
        except KeyError:
            raise ValueError(f"decode constraint {c}: column {name!r} is not a column of the table") from None
    if isinstance(c, SumOf):
        for name in c.columns:
            numeric(name)
        cols = [n for n in c.columns if n in order]
        if len(cols) < len(c.columns):
            missing = next(n for n in c.columns if n not in order)
            raise ValueError(f"decode constraint {c}: column {missing!r} is not generated")
        column = max(cols, key=order.get)
        deps = [n for n in cols if n != column]
    elif isinstance(c, Determines):
        column, deps = c.target, [c.source]
        need_categorical(c.source)
    elif isinstance(c, Implies):
        column, deps = c.then_column, [c.if_column]
        condition(c.if_column, c.if_values)
        if not (isinstance(spec[column], Categorical) or set(c.then_values) == {None}):
            raise ValueError(f"decode constraint {c}: {column!r} must be categorical (or then_values (None,))")
    elif isinstance(c, NULL_PATTERNS):
        column, deps = c.column, [c.when]
        condition(c.when, c.values)
    elif isinstance(c, Range):
        column, deps = c.column, []
        numeric(column)
    elif isinstance(c, RangeBy):
        column, deps = c.column, [c.by]
        need_categorical(c.by)
        numeric(column)
    elif isinstance(c, (AtMost, AtLeast)):
        column, deps = c.column, [c.other] + ([c.when[0]] if c.when else [])
        numeric(column), numeric(c.other)
        if c.when:
            condition(*c.when)
    elif isinstance(c, AtMostExpr):  # and AtLeastExpr
        column, deps = c.column, c.inputs + ([c.when[0]] if c.when else [])
        numeric(column)
        if c.when:
            condition(*c.when)
    else:
        raise ValueError(f"decode constraint {c!r}: not a constraint the schema tokenizer knows")
    for name in [column] + deps:
        if name not in order:
            raise ValueError(f"decode constraint {c}: column {name!r} is not generated")
    for dep in deps:
        if order[dep] >= order[column]:
            raise ValueError(f"decode constraint {c}: {dep!r} must be generated before {column!r}")
    return column, deps


def enforceable(constraints, spec: TableSpec, columns: list[str]) -> tuple[list, list]:
    """Split `constraints` into (those the schema tokenizer masks when `columns` are generated in
    this order, those that stay rules only: a column they read is generated later, or not at all,
    e.g. a relation on a derived column). Never raises."""
    order = {c: i for i, c in enumerate(columns)}
    masked, rule_only = [], []
    for c in constraints:
        try:
            mask_plan(c, spec, order)
            masked.append(c)
        except ValueError:
            rule_only.append(c)
    return masked, rule_only
