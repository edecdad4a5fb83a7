"""Gates before export: a run's records are compared with the real training split.

- `privacy` (per batch, inside the loop): a record that copies a training row, or lies
  closer to one than fresh real data does, is rejected like a rule failure (stage
  'privacy'), so the loop tops up to exactly n.
- `distribution` (whole run, after the loop): marginals and pairwise associations of
  the accepted records against the train split. A failed check blocks export unless
  the user overrides it (`--allow-drift`).
- `gate`: runs the distribution checks on a stored run and records them.
- `calibrate`: derives the thresholds from the real held-out test split
  (`python -m factory.checks.calibrate --domain finance --write`).
"""
from factory.checks.base import Check, GateConfig, GateError

__all__ = ["Check", "GateConfig", "GateError"]  # gate_config: factory.checks.gate (scipy: not for workers)
