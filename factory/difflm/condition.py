"""Condition codec: a record's own column values -> the ids a conditional DiffLM stage reads.

Each column of the record (exported columns, derived ones included) becomes one id:
0 = absent (the column is not part of the condition), 1 = null, then 2.. = a category
(categoricals as-is) or a train-split quantile bin (numerics). Training drops columns at
random, so the same model answers p(z | any small subset of columns), and c = all
absent is the unconditional model.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

ABSENT, NULL_ID, FIRST = 0, 1, 2


@dataclass
class CodecConfig:
    columns: list  # [{"name", "kind": "cat"|"num", "values": [...] | "edges": [...]}]

    @classmethod
    def fit(cls, spec, frame: pl.DataFrame, bins: int = 10) -> "CodecConfig":
        from schemas.columns import Categorical

        cols = []
        for c in spec.columns:
            if c.latent:
                continue
            if isinstance(c, Categorical):
                cols.append({"name": c.name, "kind": "cat", "values": list(c.values)})
            else:
                v = frame[c.name].drop_nulls().cast(pl.Float64).to_numpy()
                edges = np.unique(np.quantile(v, np.linspace(0, 1, bins + 1)[1:-1])) if len(v) else np.array([])
                cols.append({"name": c.name, "kind": "num", "edges": [float(e) for e in edges]})
        return cls(cols)


class ConditionCodec:
    def __init__(self, cfg: CodecConfig):
        self.cfg = cfg
        self.names = [c["name"] for c in cfg.columns]
        # ids per column: absent, null, then values / bins
        self.sizes = [FIRST + (len(c["values"]) if c["kind"] == "cat" else len(c["edges"]) + 1) for c in cfg.columns]

    def encode(self, frame: pl.DataFrame, keep: list[str] | None = None) -> torch.Tensor:
        """Frame -> LongTensor [B, C]; columns outside `keep` (None = all in the frame) are absent."""
        out = np.zeros((frame.height, len(self.names)), dtype=np.int64)
        for j, c in enumerate(self.cfg.columns):
            name = c["name"]
            if name not in frame.columns or (keep is not None and name not in keep):
                continue
            s = frame[name]
            null = s.is_null().to_numpy()
            if c["kind"] == "cat":
                lut = {v: FIRST + i for i, v in enumerate(c["values"])}
                ids = np.array([lut.get(v, NULL_ID) for v in s.to_list()], dtype=np.int64)
            else:
                v = s.cast(pl.Float64).fill_null(0.0).to_numpy()
                ids = FIRST + np.searchsorted(np.asarray(c["edges"]), v, side="right")
            out[:, j] = np.where(null, NULL_ID, ids)
        return torch.from_numpy(out)

    def save_pretrained(self, path: str | Path):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "condition_codec.json").write_text(json.dumps(asdict(self.cfg), indent=1))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ConditionCodec":
        return cls(CodecConfig(**json.loads((Path(path) / "condition_codec.json").read_text())))


def column_dropout(c: torch.Tensor, generator: torch.Generator, p_empty: float = 0.2, max_keep: int = 3) -> torch.Tensor:
    """Keep 1..max_keep random columns per row (all absent with probability p_empty): the
    subsets a `--where` condition names at generation time."""
    B, C = c.shape
    k = torch.randint(1, max_keep + 1, (B,), generator=generator)
    k = torch.where(torch.rand(B, generator=generator) < p_empty, 0, k)
    rank = torch.rand(B, C, generator=generator).argsort(1).argsort(1)
    return torch.where(rank < k[:, None], c, ABSENT)
