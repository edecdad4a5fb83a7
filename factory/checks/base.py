"""What a check is, and a domain's gate settings (read by factory.checks.gate.gate_config)."""
from __future__ import annotations

from dataclasses import dataclass, field

STATUSES = ("passed", "failed", "skipped")


class GateError(ValueError):
    pass


@dataclass(frozen=True)
class Check:
    """One gate check. `direction` '<=' means the statistic must not exceed the threshold,
    '>=' that it must reach it. A skipped check has passed = None and says why in `detail`."""

    name: str  # stable, e.g. "ks:annual_income", "tvd:state", "corr:max"
    columns: str  # the column(s) it looks at, comma-separated
    statistic: float | None
    threshold: float | None
    direction: str = "<="
    status: str = "passed"
    detail: str = ""

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"check status must be one of {STATUSES}, got {self.status!r}")

    @property
    def passed(self) -> bool | None:
        return None if self.status == "skipped" else self.status == "passed"

    @property
    def kind(self) -> str:
        return self.name.split(":", 1)[0]

    def describe(self) -> str:
        if self.status == "skipped":
            return f"{self.name} skipped ({self.detail})"
        op = {"<=": ">", ">=": "<"}[self.direction] if self.status == "failed" else self.direction
        return f"{self.name} {self.statistic:.4g} {op} {self.threshold:.4g}"


@dataclass(frozen=True)
class GateConfig:
    """A domain's gate settings (config.json "gates"); see factory/checks/calibrate.py."""

    alpha: float = 0.01  # family-wise false-refusal level over all checks (Bonferroni: alpha / K each)
    min_rows: int = 1  # below this many records the distribution gate is skipped (1: every run is gated)
    min_values: int = 10  # a quantile check needs this many non-null values in the run
    coverage_min_share: float = 0.01  # coverage counts real categories with at least this share
    ordinal: tuple[str, ...] = ()  # string categoricals whose spec value order is meaningful
    thresholds: dict[str, float] = field(default_factory=dict)  # check name -> calibrated tolerance
    near_copy_dcr: float | None = None  # privacy: DCR below this is a near-copy (None: no near-copy check)
    privacy: bool = True  # apply the privacy filter in the loop

    @classmethod
    def from_dict(cls, d: dict) -> GateConfig:
        known = {"alpha", "min_rows", "min_values", "coverage_min_share", "ordinal", "thresholds", "privacy"}
        extra = set(d) - known - {"calibration"}
        if extra:
            raise GateError(f"unknown gates settings: {', '.join(sorted(extra))}")
        p = d.get("privacy", {})
        return cls(alpha=float(d.get("alpha", cls.alpha)), min_rows=int(d.get("min_rows", cls.min_rows)),
                   min_values=int(d.get("min_values", cls.min_values)),
                   coverage_min_share=float(d.get("coverage_min_share", cls.coverage_min_share)),
                   ordinal=tuple(d.get("ordinal", ())), thresholds=dict(d.get("thresholds", {})),
                   near_copy_dcr=p.get("near_copy_dcr"), privacy=bool(p.get("enabled", True)))
