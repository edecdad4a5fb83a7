"""Schema tokenizer: a record's generated columns <-> a fixed-length row of token ids.

Every column takes a fixed number of positions, so all rows of a batch decode in
lockstep and "which column, which digit" is a function of the step alone:
- a categorical column: 1 position, one token per (column, value), plus NULL;
- a numeric column: its value as a scaled non-negative integer (1234.56 -> 123456)
  written in base 100 ("chunk" tokens 00..99), most significant chunk first, in as
  many chunks as the column's upper bound needs. A null is NULL then PAD tokens.
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
from schemas.constraints import AtLeast, AtLeastExpr, AtMost, AtMostExpr, MustBeNull, MustNotBeNull, RangeBy

PAD, BOS, NULL = 0, 1, 2
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
        for name in self.columns:
            col = spec[name]
            if isinstance(col, Categorical):
                self.cat_ids[name] = {v: next_id + i for i, v in enumerate(col.values)}
                next_id += len(col.values)
                self.slots.append(Slot(name, "cat", 0, 1))
            else:
                if col.lo < 0:
                    raise ValueError(f"column {name!r}: the schema tokenizer needs lo >= 0, got {col.lo}")
                n = max(1, math.ceil(len(str(col.int_hi)) / 2))
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
        self.lo = torch.tensor(lo, dtype=torch.long)
        self.hi = torch.tensor(hi, dtype=torch.long)
        self.place = torch.tensor(place, dtype=torch.long)  # value of one unit of this chunk

    def to(self, device: str | torch.device) -> "SchemaTokenizer":
        """Keep the decoding masks and state on `device` (the decoder's), so decoding never leaves it."""
        self.device = torch.device(device)
        self.static_mask, self.lo, self.hi, self.place = (
            x.to(self.device) for x in (self.static_mask, self.lo, self.hi, self.place))
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
                s = pl.Series(name, v)
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
                if col.decimals:
                    ip, fp = v // col.scale, v % col.scale
                    num = pl.Series(ip).cast(pl.String) + "." + pl.Series(fp).cast(pl.String).str.zfill(col.decimals)
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
        for c in constraints:
            deps = {MustBeNull: lambda c: [c.when], MustNotBeNull: lambda c: [c.when], RangeBy: lambda c: [c.by],
                    AtMost: lambda c: [c.other] + ([c.when[0]] if c.when else []),
                    AtLeast: lambda c: [c.other] + ([c.when[0]] if c.when else []),
                    AtMostExpr: lambda c: c.inputs + ([c.when[0]] if c.when else []),  # and AtLeastExpr
                    }[AtMostExpr if isinstance(c, AtMostExpr) else type(c)](c)
            for name in [c.column] + deps:
                if name not in order:
                    raise ValueError(f"decode constraint {c}: column {name!r} is not generated")
            for dep in deps:
                if order[dep] >= order[c.column]:
                    raise ValueError(f"decode constraint {c}: {dep!r} must be generated before {c.column!r}")
            cond = [c.when] if isinstance(c, (MustBeNull, MustNotBeNull)) else [c.by] if isinstance(c, RangeBy) else \
                [c.when[0]] if c.when else []
            for name in cond:
                if not isinstance(self.spec[name], Categorical):
                    raise ValueError(f"decode constraint {c}: condition column {name!r} must be categorical")
            if isinstance(c, (RangeBy, AtMost, AtLeast, AtMostExpr)) and not isinstance(self.spec[c.column], Numeric):
                raise ValueError(f"decode constraint {c}: {c.column!r} must be numeric")
            if isinstance(c, (AtMost, AtLeast)) and not isinstance(self.spec[c.other], Numeric):
                raise ValueError(f"decode constraint {c}: {c.other!r} must be numeric")
            self.constraints.setdefault(c.column, []).append(c)
        self.value_of = {n: {i: v for v, i in ids.items()} for n, ids in self.cat_ids.items()}

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
        return torch.tensor([self.cat_ids[column][v] for v in values], device=self.device)

    def _row_bounds(self, name: str, state: dict, B: int):
        col = self.spec[name]
        numeric = isinstance(col, Numeric)
        dev = self.device
        lo = torch.full((B,), col.int_lo if numeric else 0, dtype=torch.long, device=dev)
        hi = torch.full((B,), col.int_hi if numeric else 0, dtype=torch.long, device=dev)
        force = torch.zeros(B, dtype=torch.int8, device=dev)  # 1 = must be null, 2 = must not be null
        floors = []
        for c in self.constraints.get(name, ()):
            if isinstance(c, (MustBeNull, MustNotBeNull)):
                hit = torch.isin(state["tok"][c.when], self._ids_of(c.when, c.values))
                force = torch.where(hit, 1 if isinstance(c, MustBeNull) else 2, force).to(torch.int8)
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
                    known = known & torch.isin(state["tok"][c.when[0]], self._ids_of(c.when[0], c.when[1]))
                if isinstance(c, AtLeastExpr):  # applied after every upper bound (below)
                    floors.append((known, torch.ceil(torch.nan_to_num(b) * col.scale - 1e-6).to(torch.long)))
                    continue
                cap = torch.floor(torch.nan_to_num(b) * col.scale + 1e-6).to(torch.long)
                hi = torch.where(known, torch.minimum(hi, cap), hi)
            else:
                other = self.spec[c.other]
                v, known = state["val"][c.other], ~state["isnull"][c.other]
                if c.when:
                    known = known & torch.isin(state["tok"][c.when[0]], self._ids_of(c.when[0], c.when[1]))
                if isinstance(c, AtMost):  # value in this column's units, rounded toward feasibility
                    hi = torch.where(known, torch.minimum(hi, v * col.scale // other.scale), hi)
                else:
                    lo = torch.where(known, torch.maximum(lo, -((-v * col.scale) // other.scale)), lo)
        for known, floor in floors:  # a lower bound beyond the upper one holds the column at the upper one
            lo = torch.where(known, torch.maximum(lo, torch.minimum(floor, hi)), lo)
        return lo, hi, force

    def init_state(self, batch: int) -> dict:
        z = torch.zeros(batch, dtype=torch.long, device=self.device)
        return {"prefix": z, "null": z.bool(), "lo": z, "hi": z, "force": z.to(torch.int8),
                "tok": {}, "val": {}, "isnull": {}}

    def allowed(self, t: int, state: dict) -> torch.Tensor:
        """Bool mask [B, V] of the tokens allowed at position t for every row of the batch."""
        s = self.slots[t]
        B = state["prefix"].shape[0]
        base = self.static_mask[t].expand(B, -1)
        if s.chunk == 0 and (s.kind == "num" or s.column in self.constraints):
            state["lo"], state["hi"], state["force"] = self._row_bounds(s.column, state, B)
        if s.kind == "cat":
            if s.column not in self.constraints:
                return base
            mask = base.clone()
            must_null, not_null = state["force"] == 1, state["force"] == 2
            mask[must_null] = False
            mask[must_null, NULL] = bool(base[0, NULL])
            mask[not_null, NULL] = False
        else:
            mask = base.clone()
            # chunk d is allowed iff some completion of prefix*BASE + d lies in the row's [lo, hi]
            d = torch.arange(BASE, device=self.device)
            low = (state["prefix"][:, None] * BASE + d[None, :]) * self.place[t]
            high = low + self.place[t] - 1
            ok = (high >= state["lo"][:, None]) & (low <= state["hi"][:, None])
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
        return mask

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
        if s.chunk + 1 == s.n_chunks:  # column complete
            state["val"][s.column], state["isnull"][s.column] = prefix, null
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
