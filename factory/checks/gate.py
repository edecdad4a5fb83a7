"""The distribution gate of a stored run: compute, record, decide.

Outcome (runs.gate):
- 'passed': every check passed (skipped checks do not count);
- 'skipped': fewer than gates.min_rows records (default 1: never for a run with records;
  the bounds widen with a small n instead, see distribution.py) — every check is recorded
  as skipped with the reason, and export is allowed;
- 'failed': some check failed. The run's status becomes 'gate_failed', one rejection row
  per failed check is stored (stage 'distribution', rule = check name, attempt_id NULL),
  and export is refused;
- 'overridden': some check failed but the user passed --allow-drift; export happens and
  its manifest says so (no rejection rows: nothing was refused).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from factory.checks.base import Check, GateConfig
from factory.checks.distribution import Reference, distribution_checks, skipped_checks

EXIT_CODE = 3  # the CLI's exit code when a gate refuses a run


class GateFailed(RuntimeError):
    """A run's gate failed and was not overridden: it must not be exported."""

    def __init__(self, run_id: str, failed: list[dict]):
        self.run_id = run_id
        self.failed = failed
        names = "; ".join(describe_row(c) for c in failed)
        super().__init__(f"distribution gate failed for run {run_id}: {names} (records are stored: "
                         f"`factory checks {run_id}` shows every check; pass --allow-drift to export anyway)")


def describe_row(c: dict) -> str:
    op = {"<=": ">", ">=": "<"}[c["direction"]]
    return f"{c['check_name']} {c['statistic']:.4g} {op} {c['threshold']:.4g}"


@dataclass
class GateResult:
    status: str  # passed | failed | overridden | skipped
    checks: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "failed"]

    @property
    def blocks_export(self) -> bool:
        return self.status == "failed"


_cache: dict[tuple[str, str], GateConfig] = {}
_references: dict[tuple[str, str], Reference] = {}


def gate_config(domain) -> GateConfig:
    """The domain's `gates` block. A domain without calibrated thresholds (or without a
    near-copy distance) gets them calibrated now from its own test split, the same way
    `python -m factory.checks.calibrate` would (cached per process)."""
    key = (domain.name, str(domain.root))
    if key in _cache:
        return _cache[key]
    g = dict((domain.config or {}).get("gates", {}))
    if "thresholds" not in g or "near_copy_dcr" not in g.get("privacy", {}):
        from factory.checks.calibrate import calibrate

        settings = {k: v for k, v in g.items() if k not in ("thresholds", "privacy")}
        cal = calibrate(domain, GateConfig.from_dict(settings))
        g.setdefault("thresholds", cal["thresholds"])
        g["privacy"] = {**cal["privacy"], **g.get("privacy", {})}
    cfg = GateConfig.from_dict(g)
    _cache[key] = cfg
    return cfg


def reference(domain) -> Reference:
    """The train split's side of every check, computed once per process and domain."""
    key = (domain.name, str(domain.root))
    if key not in _references:
        _references[key] = Reference.build(domain.load_split("train"), domain.spec, gate_config(domain))
    return _references[key]


def evaluate_run(domain, records: pl.DataFrame, allow_drift: bool = False,
                 reference_rows: pl.DataFrame | None = None) -> GateResult:
    """`reference_rows`: the real rows to compare with (a conditioned run: the train rows that meet
    its condition, factory/conditions.gate_reference); default the train split (its side of the checks
    computed once per process)."""
    cfg = gate_config(domain)
    if records.height < max(1, cfg.min_rows):
        reason = (f"the run has {records.height:,} records, fewer than gates.min_rows = {max(1, cfg.min_rows):,}")
        return GateResult("skipped", skipped_checks(domain.spec, cfg, reason))
    if reference_rows is None:
        ref = reference(domain)
    else:
        ref = Reference.build(reference_rows, domain.spec, cfg)
    checks = distribution_checks(records, None, domain.spec, cfg, reference=ref)
    failed = any(c.status == "failed" for c in checks)
    return GateResult(("overridden" if allow_drift else "failed") if failed else "passed", checks)


def check_rows(checks: list[Check]) -> list[dict]:
    return [{"check_name": c.name, "column_names": c.columns, "statistic": c.statistic, "threshold": c.threshold,
             "direction": c.direction, "status": c.status, "passed": c.passed, "detail": c.detail} for c in checks]


def run_gate(store, domain, run_id: str, allow_drift: bool = False, reference: pl.DataFrame | None = None) -> GateResult:
    """Evaluate the stored run's records and record the checks and the outcome."""
    result = evaluate_run(domain, store.records(domain, run_id), allow_drift, reference)
    rejections = [{"rule": c.name, "message": f"{c.describe()}: {c.detail}"} for c in result.failed] \
        if result.blocks_export else []
    store.write_gate(run_id, result.status, check_rows(result.checks), rejections)
    return result


def gate_status_for_export(store, run_id: str, allow_drift: bool) -> str | None:
    """The gate status an export of this run carries; raises GateFailed if it must not be exported."""
    gate = store.run(run_id).get("gate")
    if gate == "failed":
        if not allow_drift:
            failed = store.checks(run_id).filter(pl.col("status") == "failed").to_dicts()
            raise GateFailed(run_id, failed)
        return "overridden"
    return gate
