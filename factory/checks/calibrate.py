"""Calibrate a domain's gate thresholds on its real held-out test split.

    python -m factory.checks.calibrate --domain finance          # print
    python -m factory.checks.calibrate --domain finance --write  # update config.json "gates"

Distribution: every check is computed for the real test split against the train split
(the same comparison a run gets). Its tolerance (`gates.thresholds`) is the systematic
part of that statistic, with a margin:
  max(floor, MARGIN x (the test split's statistic - its chance level))   for '<=' checks,
  max(0, 1 - MARGIN x (1 - the test split's statistic))                  for coverage ('>='),
rounded outward to 4 decimals, MARGIN = 1.5. The chance level is the check's own sampling
bound at the test split's size and level 0.5 (what chance alone reaches half the time):
the test split's statistic is mostly that noise (finance corr:max 0.115 of which ~0.11 is
chance at 1,001 rows), and a run's threshold adds the sampling bound at the run's own size
anyway, so counting the test split's noise again as tolerance would blunt the gate (it let
3 of 10 500-record runs with loan_amount shuffled through; see reports/benchmarks/gate_rates.md).
Floors (distribution.FLOORS, SDMetrics' "good" level for KS/TVD) are the smallest tolerances.
A run's threshold is tolerance + sampling bound at the run's size and the check's Bonferroni
level (distribution.py).

Holdout resampling: the bounds are analytic because the per-check level alpha / K (~1e-4
for finance's 97 checks) lies far beyond any tail that resampling 2,000 real rows could
estimate. What resampling can do, it does: the real holdout (test + val) is subsampled
without replacement at sizes up to its own, and every subsample is gated like a run; the
share refused is recorded (`calibration.holdout_resampling`) and must stay at or below alpha.

Privacy: near_copy_dcr = NEAR_COPY_FACTOR (0.5) x the 1st percentile of the test split's
DCR to train.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace

import numpy as np
import polars as pl

from factory import __version__
from factory.files import atomic_write_text
from factory.checks.base import GateConfig
from factory.checks.distribution import FLOORS, Reference, distribution_checks

MARGIN = 1.5
NEAR_COPY_FACTOR = 0.5
REFERENCE = "test"


def _up(x: float) -> float:
    return math.ceil(x * 1e4 - 1e-9) / 1e4


def _down(x: float) -> float:
    return math.floor(x * 1e4 + 1e-9) / 1e4


def calibrate(domain, cfg: GateConfig | None = None, margin: float = MARGIN,
              near_copy_factor: float = NEAR_COPY_FACTOR) -> dict:
    """The domain's gates block: settings of `cfg`, calibrated thresholds, and the test
    split's own statistics (for the record)."""
    from factory.checks.distance import dcr

    cfg = cfg or GateConfig()
    train, test = domain.load_split("train"), domain.load_split(REFERENCE)
    # no tolerances + level 0.5: each check's threshold is then its chance level at the test split's size
    checks = distribution_checks(test, train, domain.spec, replace(cfg, thresholds={}), level=0.5)
    thresholds, stats, chance = {}, {}, {}
    for c in checks:
        if c.name == "constant":  # no tolerance: a count of columns that must be 0
            continue
        if c.statistic is None:  # skipped (too few values): no calibration, the bound alone applies
            continue
        stats[c.name] = round(c.statistic, 6)
        if c.direction == ">=":
            thresholds[c.name] = max(0.0, _down(1 - margin * (1 - c.statistic)))
        else:
            chance[c.name] = round(c.threshold, 6)
            thresholds[c.name] = max(FLOORS.get(c.kind, 0.0), _up(margin * max(0.0, c.statistic - c.threshold)))
    d = dcr(train, test, domain.spec)
    p1 = float(np.quantile(d, 0.01)) if len(d) else 0.0
    near = float(f"{near_copy_factor * p1:.6g}")
    return {
        "alpha": cfg.alpha, "min_rows": cfg.min_rows, "min_values": cfg.min_values,
        "coverage_min_share": cfg.coverage_min_share, "ordinal": list(cfg.ordinal),
        "calibration": {
            "reference": REFERENCE, "n_reference": test.height, "n_train": train.height, "margin": margin,
            "floors": FLOORS, "near_copy_factor": near_copy_factor, "reference_dcr_p1": round(p1, 6),
            "reference_below_near_copy": int((d < near).sum()), "factory_version": __version__,
            "reference_statistics": stats,
            "reference_chance_levels": chance,
        },
        "thresholds": thresholds,
        "privacy": {"enabled": cfg.privacy, "near_copy_dcr": near},
    }


HOLDOUT_SIZES = (50, 100, 200, 500, 1000, 2000)


def holdout_resampling(domain, cfg: GateConfig, sizes=HOLDOUT_SIZES, draws: int = 40, seed: int = 0) -> dict:
    """Gate subsamples (without replacement) of the real holdout, test + val, at each size up
    to the holdout's own; returns {size: {"runs", "refused", "checks_failed"}}: real data
    refused by the gate is a false refusal."""
    train = domain.load_split("train")
    holdout = pl.concat([domain.load_split("test"), domain.load_split("val")])
    ref = Reference.build(train, domain.spec, cfg)
    rng = np.random.default_rng(seed)
    out = {}
    for n in sizes:
        if n > holdout.height:
            continue
        reps = 1 if n == holdout.height else draws
        refused, names = 0, {}
        for _ in range(reps):
            idx = np.sort(rng.choice(holdout.height, n, replace=False))
            checks = distribution_checks(holdout[idx], train, domain.spec, cfg, reference=ref)
            bad = [c.name for c in checks if c.status == "failed"]
            refused += bool(bad)
            for b in bad:
                names[b] = names.get(b, 0) + 1
        out[str(n)] = {"runs": reps, "refused": refused, "checks_failed": names}
    return out


def main(argv: list[str] | None = None) -> None:
    from factory.domain import load_domain

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--domain", required=True)
    ap.add_argument("--write", action="store_true", help="update the domain's config.json gates block")
    ap.add_argument("--margin", type=float, default=MARGIN, help=f"threshold = margin x test statistic ({MARGIN})")
    ap.add_argument("--resample", type=int, default=40, metavar="R",
                    help="gate R subsamples of the real holdout per size (0: skip)")
    args = ap.parse_args(argv)
    domain = load_domain(args.domain)
    existing = (domain.config or {}).get("gates", {})
    cfg = GateConfig.from_dict({k: v for k, v in existing.items() if k not in ("thresholds", "privacy")})
    gates = calibrate(domain, cfg, margin=args.margin)
    stats = gates["calibration"]["reference_statistics"]
    for name, thr in gates["thresholds"].items():
        print(f"{name:40s} test {stats.get(name, float('nan')):<10.4g} tolerance {thr:.4g}")
    if args.resample:
        settings = {k: v for k, v in gates.items() if k not in ("calibration", "privacy")}
        res = holdout_resampling(domain, GateConfig.from_dict(settings), draws=args.resample)
        gates["calibration"]["holdout_resampling"] = {"method": "subsamples of test + val without replacement, "
                                                      "gated like a run", "sizes": res}
        for n, r in res.items():
            print(f"holdout subsamples of {n:>5}: {r['refused']} of {r['runs']} refused {r['checks_failed'] or ''}")
    print(f"near_copy_dcr {gates['privacy']['near_copy_dcr']} (test DCR p1 {gates['calibration']['reference_dcr_p1']})")
    if args.write and (domain.root / "domain.toml").is_file() and not (domain.root / "domain.py").is_file():
        from factory.domain_file import update_settings  # a declarative domain keeps its settings there

        print(f"wrote {update_settings(domain.root, 'gates', gates)}")
    elif args.write:
        path = domain.root / "config.json"
        config = json.loads(path.read_text()) if path.exists() else {}
        config["gates"] = gates
        atomic_write_text(path, json.dumps(config, indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
