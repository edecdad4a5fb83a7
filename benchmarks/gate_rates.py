"""Benchmark: how often the distribution gate refuses good runs, and how often it catches bad ones.

    python benchmarks/gate_rates.py [--db /tmp/gate_rates.duckdb] [--seeds 10] [--sizes 500 1000 2000 5000 10000]

Method (generation is ~100-180 records/s on this machine, so batches are generated once and
cut into runs):
- **Pools.** The shipped finance stack generates `--seeds` runs of 10,000 records (seeds 0..S-1,
  batch size 2,000, the CLI's defaults: privacy filter on), stored in `--db`; runs already in
  `--db` with the same model, seed and n are reused (`factory generate -d finance -n 10000
  --seed S --db DB --allow-drift` makes the same ones). Bad generators get their own pools
  through the same loop (`run_generation`, stored in `--db` too): the marginal baseline (20,000 records),
  the stack with collapsed latents (every latent of a run equal to one diffusion sample;
  6 runs of 2,000), the stack with NaN injector weights (500) and the stack with its decoder
  weights perturbed (Gaussian noise of 0.5 x each tensor's std; 2 runs of 2,000).
- **Runs of size n** are disjoint consecutive slices of a pool run, in record order: a run of
  n records with seed s is itself a prefix of batches, and batches are seeded independently
  (SeedSequence(seed, spawn_key=(b,))), so disjoint slices are independent samples of the
  generator. n = 10,000 slices are the whole runs. False-refusal counts per n come from
  10,000 x S / n slices (500: 200 runs for S = 10).
- **Skewed batches** are made from slices of the shipped pool, as tests/test_gates.py makes
  them from real rows: 80% debt_consolidation (rows drawn without replacement from the pool),
  incomes x 1.4, loan_amount shuffled within the run (derived columns recomputed, rule-invalid
  rows dropped), 30% of the records repeated, and one column (state) constant.
- Every run is gated by `factory.checks.gate.evaluate_run`, the code `factory generate` uses.

Writes reports/benchmarks/gate_rates.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import torch  # noqa: E402

from benchmarks.machine import header, machine_info  # noqa: E402
from factory.baseline import MarginalBaseline  # noqa: E402
from factory.checks.gate import evaluate_run, gate_config  # noqa: E402
from factory.domain import load_domain  # noqa: E402
from factory.generators import load_generator  # noqa: E402
from factory.loop import run_generation  # noqa: E402
from factory.store import Store  # noqa: E402

REPORTS = Path(__file__).resolve().parent.parent / "reports" / "benchmarks"
POOL_N, BATCH = 10_000, 2_000
TARGET_FALSE = 1 / 50


def shipped_pool(d, db: Path, seeds: int) -> list[pl.DataFrame]:
    """The shipped stack's 10,000-record runs for seeds 0..seeds-1, generated if missing."""
    gen = None
    out = []
    for seed in range(seeds):
        with Store(db) as store:
            have = store.frame("SELECT run_id FROM runs WHERE domain = ? AND model_id = 'difflm' AND seed = ? AND "
                               "requested_n = ? AND batch_size = ? AND accepted = requested_n ORDER BY started_at",
                               [d.name, seed, POOL_N, BATCH])
            if have.height == 0:
                gen = gen or load_generator(d, "difflm")
                print(f"generating the shipped pool, seed {seed}", flush=True)
                run_id = run_generation(d, gen, POOL_N, seed, store, BATCH, progress=False, allow_drift=True,
                                        settings={"model": "difflm", **gen.settings}).run_id
            else:
                run_id = have["run_id"][0]
            out.append(store.records(d, run_id))
    return out


def loop_records(d, gen, n: int, seed: int, db: Path, max_attempts: int | None = None) -> pl.DataFrame:
    """n accepted records of `gen` through the real loop (privacy filter on), stored in `db` and
    reused from it on a later call (same model id, seed and n)."""
    with Store(db) as store:
        have = store.frame("SELECT run_id FROM runs WHERE domain = ? AND model_id = ? AND seed = ? AND requested_n = ? "
                           "AND accepted = requested_n ORDER BY started_at", [d.name, gen.model_id, seed, n])
        if have.height:
            return store.records(d, have["run_id"][0])
        result = run_generation(d, gen, n, seed, store, BATCH, progress=False, gates=True, allow_drift=True,
                                max_attempts=max_attempts)
        return store.records(d, result.run_id)


class Collapsed:
    """The shipped stack with every latent of a generate() call equal to one diffusion sample."""

    def __init__(self, gen):
        self.gen, self.model_id, self.model_version = gen, "difflm-collapsed", gen.model_version
        self._sample = gen.sample_latents
        gen.sample_latents = lambda n, g: self._sample(1, g).expand(n, -1).clone()

    def generate(self, n, seed):
        return self.gen.generate(n, seed)


class Renamed:
    """A generator under another model id (so that its pool is found again in the database)."""

    def __init__(self, gen, model_id):
        self.gen, self.model_id, self.model_version = gen, model_id, gen.model_version

    def generate(self, n, seed):
        return self.gen.generate(n, seed)


def bad_pools(d, db: Path) -> dict[str, list[pl.DataFrame]]:
    pools: dict[str, list[pl.DataFrame]] = {}
    t = time.time()
    pools["marginal baseline"] = [loop_records(d, MarginalBaseline.fit(d), 20_000, 0, db)]
    print(f"baseline pool {time.time() - t:.0f} s", flush=True)
    collapsed = Collapsed(load_generator(d, "difflm"))
    pools["collapsed latents"] = [loop_records(d, collapsed, 2_000, 100 + s, db) for s in range(6)]
    print(f"collapsed pool {time.time() - t:.0f} s", flush=True)
    nan = load_generator(d, "difflm")
    with torch.no_grad():
        for p in nan.inj.parameters():
            p.fill_(float("nan"))
    try:
        pools["NaN injector"] = [loop_records(d, Renamed(nan, "difflm-nan-injector"), 500, 200, db, 20_000)]
    except Exception as e:  # a stack whose records never pass the rules cannot reach the gate at all
        print(f"NaN stack: no run ({type(e).__name__}: {str(e)[:120]})")
    pert = load_generator(d, "difflm")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in pert.dec.parameters():
            if p.numel() > 1:
                p.add_(torch.randn_like(p) * p.std() * 0.5)
    pert = Renamed(pert, "difflm-perturbed-decoder")
    pools["perturbed decoder"] = [loop_records(d, pert, 2_000, 300 + s, db) for s in range(2)]
    print(f"bad pools done {time.time() - t:.0f} s", flush=True)
    return pools


def slices(pool: list[pl.DataFrame], n: int, limit: int | None = None) -> list[pl.DataFrame]:
    out = [df[i * n:(i + 1) * n] for df in pool for i in range(df.height // n)]
    return out[:limit] if limit else out


def skewed_runs(d, pool: list[pl.DataFrame], n: int, limit: int) -> dict[str, list[pl.DataFrame]]:
    allrec = pl.concat(pool)
    dc = allrec.filter(pl.col("loan_purpose") == "debt_consolidation")
    other = allrec.filter(pl.col("loan_purpose") != "debt_consolidation")
    k_dc = int(0.8 * n)
    purpose = [pl.concat([dc[i * k_dc:(i + 1) * k_dc], other[i * (n - k_dc):(i + 1) * (n - k_dc)]])
               for i in range(min(limit, dc.height // k_dc, other.height // (n - k_dc)))]
    base = slices(pool, n, limit)
    shuffled = []
    for i, s in enumerate(base):
        x = d.complete(d.to_generated(s).with_columns(pl.col("loan_amount").shuffle(seed=i)))
        shuffled.append(x.filter(d.validator.validate(x).valid))
    k = int(0.7 * n)
    return {
        "80% debt_consolidation": purpose,
        "incomes x 1.4": [s.with_columns(pl.col("annual_income", "annual_income_joint") * 14 // 10) for s in base],
        "loan_amount shuffled": shuffled,
        "30% repeated records": [pl.concat([s[:k], s[:n - k]]) for s in base],
        "constant state": [s.with_columns(pl.lit("CA").alias("state")) for s in base],
    }


def score(d, runs: list[pl.DataFrame]) -> dict:
    refused, names = 0, Counter()
    for r in runs:
        result = evaluate_run(d, r)
        bad = [c.name for c in result.failed]
        refused += bool(bad)
        names.update(bad)
    return {"runs": len(runs), "refused": refused, "rate": round(refused / len(runs), 4) if runs else None,
            "top_failed_checks": dict(names.most_common(4)), "mean_n": round(float(np.mean([r.height for r in runs])))
            if runs else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--domain", default="finance")
    ap.add_argument("--db", type=Path, default=Path("/tmp/gate_rates.duckdb"))
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 2000, 5000, 10000])
    ap.add_argument("--skewed-limit", type=int, default=10, help="skewed runs per case and n")
    ap.add_argument("--no-bad-pools", action="store_true", help="skip the bad generators (baseline, collapsed, ...)")
    args = ap.parse_args()
    info = machine_info()
    command = "python benchmarks/gate_rates.py " + " ".join(sys.argv[1:])
    d = load_domain(args.domain)
    cfg = gate_config(d)
    t0 = time.time()
    pool = shipped_pool(d, args.db, args.seeds)
    false = {n: score(d, slices(pool, n)) for n in args.sizes}
    for n, r in false.items():
        print(f"shipped stack n={n}: {r['refused']} of {r['runs']} refused {r['top_failed_checks']}", flush=True)
    detect: dict[str, dict[int, dict]] = {}
    if not args.no_bad_pools:
        for name, p in bad_pools(d, args.db).items():
            detect[name] = {n: score(d, slices(p, n)) for n in args.sizes if any(df.height >= n for df in p)}
    for n in args.sizes:
        for name, runs in skewed_runs(d, pool, n, args.skewed_limit).items():
            detect.setdefault(name, {})[n] = score(d, runs)
    for name, per_n in detect.items():
        print(name, {n: f"{r['refused']}/{r['runs']}" for n, r in per_n.items()}, flush=True)
    total_runs = sum(r["runs"] for r in false.values())
    total_refused = sum(r["refused"] for r in false.values())
    report = {"machine": info, "command": command, "domain": d.name, "seconds": round(time.time() - t0),
              "gate": {"alpha_family_wise": cfg.alpha, "correction": "Bonferroni", "min_rows": cfg.min_rows},
              "pool": {"seeds": args.seeds, "records_per_seed": POOL_N, "batch_size": BATCH},
              "false_refusals": {str(n): r for n, r in false.items()},
              "false_refusals_total": {"runs": total_runs, "refused": total_refused,
                                       "rate": round(total_refused / total_runs, 4), "target_rate": TARGET_FALSE},
              "detection": {name: {str(n): r for n, r in per_n.items()} for name, per_n in detect.items()}}
    REPORTS.mkdir(parents=True, exist_ok=True)
    (REPORTS / "gate_rates.json").write_text(json.dumps(report, indent=1) + "\n")
    md = [header("Distribution gate: false refusals and detection", command, info),
          f"Gate: tolerance + sampling bound at the run's n, Bonferroni over all checks at family-wise alpha "
          f"{cfg.alpha:g} (`factory/checks/distribution.py`). Method: see the docstring of "
          f"`benchmarks/gate_rates.py` (runs of size n are disjoint slices of {args.seeds} pool runs of "
          f"{POOL_N:,} records, seeds 0-{args.seeds - 1}). Took {report['seconds']} s.\n",
          "## False refusals of the shipped finance stack\n", "| n | runs | refused | rate | checks that failed |",
          "|---|---|---|---|---|"]
    for n, r in false.items():
        md.append(f"| {n:,} | {r['runs']} | {r['refused']} | {r['rate']:.1%} | "
                  f"{', '.join(f'{k} ({v})' for k, v in r['top_failed_checks'].items()) or '-'} |")
    md.append(f"| all | {total_runs} | {total_refused} | {total_refused / total_runs:.1%} | target <= "
              f"{TARGET_FALSE:.0%} (1 in 50) |\n")
    md += ["## Detection (share of bad runs refused)\n", "| batch | " + " | ".join(f"n={n:,}" for n in args.sizes)
           + " | checks that failed most |", "|---" * (len(args.sizes) + 2) + "|"]
    for name, per_n in detect.items():
        cells = [f"{per_n[n]['refused']}/{per_n[n]['runs']}" if n in per_n and per_n[n]["runs"] else "-"
                 for n in args.sizes]
        top = Counter()
        for r in per_n.values():
            top.update(r["top_failed_checks"])
        md.append(f"| {name} | " + " | ".join(cells) + f" | {', '.join(k for k, _ in top.most_common(3))} |")
    md.append("\n`-`: no run of that size (the pool is smaller).\n")
    (REPORTS / "gate_rates.md").write_text("\n".join(md))
    print(f"wrote {REPORTS / 'gate_rates.md'}")


if __name__ == "__main__":
    main()
