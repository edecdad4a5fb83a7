"""What a check is, and where a domain's gate settings come from."""
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

    def to_dict(self) -> dict:
        return {"check": self.name, "columns": self.columns, "statistic": self.statistic,
                "threshold": self.threshold, "direction": self.direction, "status": self.status,
                "passed": self.passed, "detail": self.detail}


@dataclass(frozen=True)
class GateConfig:
    """A domain's gate settings (config.json "gates"); see factory/checks/calibrate.py."""

    alpha: float = 0.001  # per-check false-alarm level of the sample-size-aware bounds
    min_rows: int = 200  # below this many records the distribution gate is skipped
    min_values: int = 50  # a quantile check needs this many non-null values in the run
    coverage_min_share: float = 0.01  # coverage counts real categories with at least this share
    ordinal: tuple[str, ...] = ()  # string categoricals whose spec value order is meaningful
    thresholds: dict[str, float] = field(default_factory=dict)  # check name -> calibrated threshold
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


_cache: dict[tuple[str, str], GateConfig] = {}


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
