"""Privacy filter: no record may copy, or nearly copy, a row of the training split.

Applied per batch inside the loop, to the records that pass every rule; a failing record
is rejected like a rule failure (stage 'privacy'), so the loop tops up and the run's
accounting (attempted = accepted + rejected) stays exact.

- `exact_copy`: equal to a training row on every column (numerics at the spec's decimals,
  nulls equal to nulls; factory.checks.distance.exact_copy_mask). The training rows are taken as
  the factory would write them: generated columns as they are, derived columns recomputed
  by the domain (a real row's stored installment can differ from the recomputed one by a
  cent, which must not hide a copy of its generated columns).
- `near_copy`: not an exact copy, but its DCR (distance to the closest training record,
  factory.checks.distance.dcr / DCRIndex: mean per-column distance, numerics min-max scaled) is below
  gates.privacy.near_copy_dcr. Calibrated as 0.5 x the 1st percentile of the DCR of the
  real test split to train (calibrate.py): a threshold that fresh real records
  essentially never fall below (finance: none of the 1,001 test or 999 val rows).
  DCRIndex.below computes it exactly but only against training rows with the same
  categorical values and nulls (any other row is farther than such a small threshold):
  ~50x faster than the full distance matrix, which matters at 100k records.
"""
from __future__ import annotations

import numpy as np
import polars as pl

from factory.checks.gate import gate_config
from factory.checks.distance import DCRIndex, exact_copy_mask
from schemas.columns import TableSpec

RULES = ("exact_copy", "near_copy")


class PrivacyFilter:
    def __init__(self, train: pl.DataFrame, spec: TableSpec, near_copy_dcr: float | None):
        self.train = train.select(spec.names)
        self.spec = spec
        self.near_copy_dcr = near_copy_dcr
        self.index = DCRIndex(self.train, spec) if near_copy_dcr else None

    @classmethod
    def for_domain(cls, domain) -> PrivacyFilter | None:
        """The domain's filter, or None when its gates turn privacy off."""
        cfg = gate_config(domain)
        if not cfg.privacy:
            return None
        return cls(domain.complete(domain.to_generated(domain.load_split("train"))), domain.spec, cfg.near_copy_dcr)

    def judge(self, frame: pl.DataFrame) -> pl.DataFrame:
        """Failing rows of `frame`: columns row (index in frame), rule, message."""
        schema = {"row": pl.Int64, "rule": pl.String, "message": pl.String}
        if frame.height == 0:
            return pl.DataFrame(schema=schema)
        frame = frame.select(self.spec.names)
        exact = exact_copy_mask(self.train, frame, self.spec)
        rows, rules, messages = [], [], []
        for i in np.flatnonzero(exact):
            rows.append(int(i)), rules.append("exact_copy"), messages.append(
                "equal to a training row on every column (distance 0)")
        if self.index is not None and not exact.all():
            idx = np.flatnonzero(~exact)
            dist = self.index.below(frame[idx], self.near_copy_dcr)
            for i, d in zip(idx[dist < self.near_copy_dcr], dist[dist < self.near_copy_dcr]):
                rows.append(int(i)), rules.append("near_copy"), messages.append(
                    f"distance to the closest training row {float(d):.5f} is below the near-copy "
                    f"threshold {self.near_copy_dcr:.5f}")
        return pl.DataFrame({"row": rows, "rule": rules, "message": messages}, schema=schema).sort("row")
