"""The simplest honest generator: every generated column drawn independently from
its empirical marginal on the train split (nulls included).

It keeps each column's shape and breaks every relation between columns, so it is
the floor that a real model must beat, and a fast, dependency-free generator for
exercising the engine. Sampling is vectorized: each column's distinct values are
serialized once, then rows are index draws joined with polars.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import polars as pl

from factory.domain import Domain
from factory.serializer import FIELD_SEP


@dataclass(frozen=True)
class Marginal:
    values: tuple  # distinct values, None for null, in first-seen-sorted order
    probs: np.ndarray
    pieces: np.ndarray  # "name: value" text of each value, as the serializer writes it


class MarginalBaseline:
    model_id = "baseline"
    conditional = True  # generate(n, seed, condition=...): the named columns come from real rows that meet it

    def __init__(self, domain: Domain, marginals: dict[str, Marginal]):
        self.domain = domain
        self.columns = domain.spec.generated_names
        if list(marginals) != self.columns:
            raise ValueError("marginals must cover exactly the generated columns, in spec order")
        self.marginals = marginals
        payload = {n: [[m.values[i], int(round(p * 1e12))] for i, p in enumerate(m.probs)] for n, m in marginals.items()}
        self.model_version = hashlib.sha256(json.dumps(payload, default=str).encode()).hexdigest()[:12]

    @classmethod
    def fit(cls, domain: Domain, split: str = "train") -> MarginalBaseline:
        names = domain.spec.generated_names
        data = domain.to_generated(domain.load_split(split))
        if data.height == 0:
            raise ValueError(f"domain {domain.name!r}: the {split} split is empty")
        marginals = {}
        for name in names:
            counts = data.group_by(name).len().sort(name, nulls_last=True)
            values = tuple(counts[name].to_list())
            freq = counts["len"].to_numpy().astype(np.float64)
            pieces = np.array([domain.serializer.serialize({name: v}, columns=[name]) for v in values], dtype=object)
            marginals[name] = Marginal(values, freq / freq.sum(), pieces)
        return cls(domain, marginals)

    def generate(self, n: int, seed: int, condition=None) -> list[str]:
        if n < 0:
            raise ValueError("n must be >= 0")
        rng = np.random.default_rng(seed)
        parts = {name: m.pieces[rng.choice(len(m.values), size=n, p=m.probs)] for name, m in self.marginals.items()}
        if condition is not None:  # the condition's generated columns, jointly, from real rows that meet it
            rows = condition.draw(n, seed)
            for name in dict.fromkeys([*condition.forced, *condition.columns]):
                if name in parts:
                    text = {v: self.domain.serializer.serialize({name: v}, columns=[name]) for v in rows[name].unique()}
                    parts[name] = np.array([text[v] for v in rows[name].to_list()], dtype=object)
        frame = pl.DataFrame({name: pl.Series(name, p.tolist(), dtype=pl.String) for name, p in parts.items()})
        return frame.select(pl.concat_str(self.columns, separator=FIELD_SEP).alias("text"))["text"].to_list()
