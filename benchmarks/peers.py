"""Peer benchmark on a domain (default finance): simple baselines and SDV 2.x synthesizers.

Every candidate is fitted on the real train split, samples `--n` rows of all columns,
and is scored by `factory.evaluate` against the real splits (finance: 29 columns):

- marginal:        each column (all 29) sampled independently from the train split's empirical marginal
- factory:         `factory.generate` with the domain's shipped DiffLM stack (the loop the CLI runs:
  rules, privacy filter; the gate is recorded, not enforced); its seconds are the whole call
- factory_baseline: `factory.generate(model="baseline")`: independent marginals of the generated
  columns, derived columns by formula, then the same loop (every row passes every rule)
- shuffled_train:  the real train split with every column permuted independently
- gaussian_copula, ctgan, tvae: SDV 2.x single-table synthesizers with hand-fixed metadata.
  They also generate the derived columns (grade, installment, paid_total, balance); their raw
  output is evaluated as is, so the loan-accounting rules show what they break.
- real_val:        the held-out real val split (999 rows): the ceiling for quality and MLE
- real_test:       the real test split itself: the ceiling for rule validity and the DCR
  reference (quality and MLE are not defined: it is what everything is compared against).

Needs:  pip install -e ".[eval,peers]"   (SDMetrics, XGBoost, SDV)
Usage:  nice -n 10 python -m benchmarks.peers            # full run (CTGAN/TVAE 300 epochs, 10,000 rows)
        python -m benchmarks.peers --quick                # smoke test (2 epochs, 1,000 rows)
        python -m benchmarks.peers --domain NAME          # any domain, e.g. one made by `factory init`
Writes reports/benchmarks/peers.json and peers.md (another domain: peers_NAME.json/.md; or --out DIR).
The table's rule columns are finance's three accounting rules, or another domain's first three rules;
its MLE columns follow the domain's mle_tasks.
"""
from __future__ import annotations

import os

# XGBoost and torch use OpenMP; on a shared machine spin-waiting threads make XGBoost ~15x
# slower (measured: 51 s vs 3 s for one MLE run at load 4.5 on 2 cores). Results are unchanged.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
import time
import warnings
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from factory import evaluate as ev  # noqa: E402
from factory.domain import load_domain  # noqa: E402
from factory.report import fmt_number as fmt  # noqa: E402
from schemas.columns import Categorical, Numeric, TableSpec  # noqa: E402

ACCOUNTING_RULES = ("installment_matches_amortization", "paid_total_is_sum", "grade_matches_sub_grade")
SDV_TABLE = "loans"
DOMAIN = None  # set by main (--domain)


def headline_rules(domain) -> tuple[str, ...]:
    """Rules whose pass rates get a column: finance's accounting rules, else the first three."""
    names = [r.name for r in domain.rules]
    if all(n in names for n in ACCOUNTING_RULES):
        return ACCOUNTING_RULES
    return tuple(names[:3])


def mle_columns(domain) -> list[tuple[str, str]]:
    """(header, ratio key) per MLE task metric of the domain."""
    try:
        tasks = ev.mle_tasks(domain)
    except KeyError:
        return []
    out = []
    for t in tasks:
        if t.kind == "regression":
            out.append((f"MLE {t.name} R²", f"{t.name}.r2"))
        else:
            out += [(f"MLE {t.name} acc", f"{t.name}.accuracy"), (f"MLE {t.name} F1", f"{t.name}.macro_f1")]
    return out


# ---------------------------------------------------------------- simple references

def sample_marginals(train: pl.DataFrame, n: int, seed: int) -> pl.DataFrame:
    """Each column drawn independently, with replacement, from its train values (nulls included)."""
    rng = np.random.default_rng(seed)
    return pl.DataFrame([train[c].gather(rng.integers(0, train.height, n)) for c in train.columns])


def shuffle_columns(frame: pl.DataFrame, seed: int) -> pl.DataFrame:
    """Every column permuted independently: marginals kept exactly, all dependence broken."""
    rng = np.random.default_rng(seed)
    return pl.DataFrame([frame[c].gather(rng.permutation(frame.height)) for c in frame.columns])


# ---------------------------------------------------------------- SDV

def sdv_metadata(spec: TableSpec):
    """SDV 2 metadata from the spec instead of auto-detection (which calls `state` a PII
    address and term/emp_length numerical): Numeric -> numerical with the spec's decimals,
    Categorical (strings and int codes such as term, emp_length) -> categorical."""
    from sdv.metadata import Metadata

    cols = {}
    for c in spec.columns:
        if isinstance(c, Numeric):
            cols[c.name] = {"sdtype": "numerical", "decimal_places": c.decimals}
        else:
            cols[c.name] = {"sdtype": "categorical"}
    md = Metadata.load_from_dict({"tables": {SDV_TABLE: {"columns": cols}}, "relationships": [],
                                  "METADATA_SPEC_VERSION": "V2"})
    md.validate()
    return md


def to_sdv(frame: pl.DataFrame, spec: TableSpec):
    """Polars -> pandas for SDV: int categoricals as strings (so no model treats them as numbers)."""
    return frame.with_columns([pl.col(c.name).cast(pl.String) for c in spec.columns
                               if isinstance(c, Categorical) and c.is_int]).to_pandas()


def from_sdv(pdf, spec: TableSpec) -> pl.DataFrame:
    """SDV's pandas output -> polars with the spec's dtypes (values untouched: SDV already rounds)."""
    df = pl.from_pandas(pdf, nan_to_null=True)
    exprs = []
    for c in spec.columns:
        e = pl.col(c.name)
        if isinstance(c, Categorical):
            e = e.cast(pl.String)
            if c.is_int:
                e = e.cast(pl.Float64, strict=False).cast(pl.Int64, strict=False)
        elif c.decimals == 0:
            e = e.cast(pl.Float64).round(0).cast(pl.Int64)
        else:
            e = e.cast(pl.Float64)
        exprs.append(e.alias(c.name))
    return df.select(exprs)


def make_sdv(kind: str, metadata, epochs: int):
    from sdv.single_table import CTGANSynthesizer, GaussianCopulaSynthesizer, TVAESynthesizer

    if kind == "gaussian_copula":
        return GaussianCopulaSynthesizer(metadata)
    if kind == "ctgan":
        return CTGANSynthesizer(metadata, epochs=epochs, enable_gpu=False)
    if kind == "tvae":
        return TVAESynthesizer(metadata, epochs=epochs, enable_gpu=False)
    raise ValueError(kind)


# ---------------------------------------------------------------- run

def machine() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "platform": platform.platform(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}


def preload():
    """Import every module the run uses (repo and peers) before the git state is recorded."""
    import sdmetrics.reports.single_table  # noqa: F401
    import sdv.single_table  # noqa: F401
    import torch  # noqa: F401
    import xgboost  # noqa: F401
    import factory.api  # noqa: F401


def git_commit() -> str:
    """HEAD, plus the uncommitted files (if any) among the repo modules this run imported."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    used = {str(Path(f).resolve().relative_to(ROOT)) for m in list(sys.modules.values())
            if (f := getattr(m, "__file__", None)) and Path(f).resolve().is_relative_to(ROOT)}
    dirty = sorted(p for line in status.splitlines() if (p := line[3:]) in used)
    return sha + (f" + uncommitted changes in {', '.join(dirty)}" if dirty else "")


def versions() -> dict:
    out = {}
    for p in ("sdv", "ctgan", "rdt", "sdmetrics", "xgboost", "torch", "polars", "pandas", "numpy"):
        try:
            out[p] = importlib_metadata.version(p)
        except importlib_metadata.PackageNotFoundError:
            out[p] = None
    return out


def run(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    train, val, test = (DOMAIN.load_split(s) for s in ("train", "val", "test"))
    spec = DOMAIN.spec
    print(f"train {train.height}, val {val.height}, test {test.height} rows; n={args.n}", flush=True)

    t0 = time.perf_counter()
    try:
        ev.mle_tasks(DOMAIN)
    except KeyError:
        real_mle = None  # a domain without MLE tasks: evaluate reports the other metrics
    else:
        real_mle = ev.mle(train, test, DOMAIN, n_estimators=args.n_estimators, seed=args.seed)
    print(f"real-train MLE reference ({time.perf_counter() - t0:.1f}s): {real_mle}", flush=True)

    results = {}

    def record(name: str, frame: pl.DataFrame, fit_s: float | None, sample_s: float | None, note: str,
               full: bool = True):
        t = time.perf_counter()
        if full:
            e = ev.evaluate(DOMAIN, frame, train, test, real_mle=real_mle, n_estimators=args.n_estimators,
                            seed=args.seed)
        else:  # real_test: only rules and privacy are meaningful
            e = {"domain": DOMAIN.name, "n_rows": frame.height,
                 "setup": ev.setup(DOMAIN, train, test, n_estimators=args.n_estimators, seed=args.seed),
                 "rule_validity": ev.rule_validity(DOMAIN, frame),
                 "quality": None, "mle": None, "privacy": ev.privacy(train, frame, spec, reference=test)}
        e["eval_seconds"] = round(time.perf_counter() - t, 2)
        results[name] = {"note": note, "fit_seconds": None if fit_s is None else round(fit_s, 2),
                         "sample_seconds": None if sample_s is None else round(sample_s, 2), **e}
        r = results[name]
        q = r["quality"] or {}
        print(f"[{name}] fit {fmt(r['fit_seconds'], 1)}s sample {fmt(r['sample_seconds'], 1)}s eval {r['eval_seconds']}s "
              f"valid {r['rule_validity']['valid_rate']:.3f} shapes {q.get('column_shapes')} "
              f"trends {q.get('column_pair_trends')} dcr_median {r['privacy']['dcr']['median']}", flush=True)

    for name in args.models:
        if name == "marginal":
            t = time.perf_counter()
            frame = sample_marginals(train, args.n, args.seed)
            record(name, frame, 0.0, time.perf_counter() - t,
                   "local: each column sampled independently from the train split's empirical marginal")
        elif name in ("factory", "factory_baseline"):
            import factory

            t = time.perf_counter()
            run = factory.generate(DOMAIN, args.n, seed=args.seed, allow_drift=True,
                                   model="baseline" if name == "factory_baseline" else None)
            sample_s = time.perf_counter() - t
            res = run.result
            record(name, run.records, None, sample_s,
                   f"factory.generate ({'baseline' if name == 'factory_baseline' else 'DiffLM stack'}): "
                   f"{res.attempted / res.accepted:.2f} attempts per record, gate {res.gate.status if res.gate else 'off'}")
            run.close()
        elif name == "shuffled_train":
            record(name, shuffle_columns(train, args.seed), None, None,
                   f"real train split ({train.height} rows), every column permuted independently")
        elif name in ("gaussian_copula", "ctgan", "tvae"):
            epochs = {"ctgan": args.ctgan_epochs, "tvae": args.tvae_epochs}.get(name)
            np.random.seed(args.seed)
            torch.manual_seed(args.seed)
            model = make_sdv(name, sdv_metadata(spec), epochs or 0)
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.fit({SDV_TABLE: to_sdv(train, spec)})  # SDV 2: {table: frame}
            fit_s = time.perf_counter() - t
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pdf = model.sample(num_rows=args.n)[SDV_TABLE]
            sample_s = time.perf_counter() - t
            note = "SDV " + type(model).__name__ + (f", {epochs} epochs" if epochs else "") + ", raw output"
            record(name, from_sdv(pdf, spec), fit_s, sample_s, note)
        elif name == "real_val":
            record(name, val, None, None, f"held-out real val split ({val.height} rows): ceiling for quality/MLE")
        elif name == "real_test":
            record(name, test, None, None,
                   f"the real test split ({test.height} rows) itself: rule ceiling, DCR reference", full=False)
        else:
            raise SystemExit(f"unknown model {name!r}")

    return {"real_mle": real_mle, "results": results,
            "rows": {"train": train.height, "val": val.height, "test": test.height}}


def markdown(report: dict) -> str:
    h = report["header"]
    setups = []  # factory.evaluate.setup of each candidate: one, unless something changed mid-run
    for r in report["results"].values():
        if r.get("setup") not in setups:
            setups.append(r.get("setup"))
    setup_line = ([] if not setups or setups == [None] else
                  ["- evaluation setup (`factory report --compare` checks it against the run's): "
                   + json.dumps(setups[0])] if len(setups) == 1 else
                  [f"- evaluation setups DIFFER between candidates: {json.dumps(setups)}"])
    rules = headline_rules(DOMAIN)
    mles = mle_columns(DOMAIN)
    ncols = len(DOMAIN.spec.names)
    lines = [
        f"# Peer benchmark: {DOMAIN.name} domain",
        "",
        f"- date: {h['date']}",
        f"- command: `{h['command']}`",
        f"- git commit: {h['git_commit']}"
        + (f" (at the end of the run: {h['git_commit_at_end']})" if h.get("git_commit_at_end") else ""),
        f"- machine: {h['machine']['nproc']} CPU ({h['machine']['cpu_model']}), CPU only, shared with other "
        f"jobs (1-min load average {h['machine']['loadavg_at_start'][0]} at start, "
        f"{h['machine']['loadavg_at_end'][0]} at end): timings are indicative",
        f"- versions: " + ", ".join(f"{k} {v}" for k, v in h["versions"].items()),
        f"- config: n={h['config']['n']} rows, CTGAN {h['config']['ctgan_epochs']} epochs, "
        f"TVAE {h['config']['tvae_epochs']} epochs, XGBoost {h['config']['n_estimators']} trees, seed {h['config']['seed']}"
        + (" (QUICK smoke run: not a result)" if h["config"]["quick"] else ""),
        f"- total runtime: {h['total_seconds']:.0f} s",
        *setup_line,
        "",
        f"Every candidate is fitted on the real train split ({h['rows']['train']:,} rows) and scored against the "
        f"real test split ({h['rows']['test']:,} rows). SDV models generate all {ncols} columns, including the "
        "derived ones; their raw output is evaluated as is.",
        "",
        "| candidate | rows | fit s | sample s | valid (all rules) | " + "".join(f"{r} | " for r in rules)
        + "shapes | pair trends | " + "".join(f"{m} | " for m, _ in mles) + "exact copies | DCR median |",
        "|---|" + "---:|" * (8 + len(rules) + len(mles)),
    ]
    res = report["results"]
    for name, r in res.items():
        rv = r["rule_validity"]
        q = r["quality"] or {}
        ratio = (r["mle"] or {}).get("ratio", {})
        lines.append("| " + " | ".join([
            name, fmt(r["n_rows"]), fmt(r["fit_seconds"], 1), fmt(r["sample_seconds"], 1), fmt(rv["valid_rate"]),
            *[fmt(rv["rules"][k]) for k in rules],
            fmt(q.get("column_shapes")), fmt(q.get("column_pair_trends")),
            *[fmt(ratio.get(k)) for _, k in mles],
            fmt(r["privacy"]["exact_copies"]), fmt(r["privacy"]["dcr"]["median"], 4),
        ]) + " |")
    rm = report["real_mle"] or {}
    ref = next(iter(res.values()))["privacy"]["dcr_reference"] if res else {}
    refs = ", ".join(f"{m.replace('MLE ', '')} {fmt(rm.get(k.split('.')[0], {}).get(k.split('.')[1]))}"
                     for m, k in mles)
    lines += [
        "",
        "Columns: *valid* = share of rows passing every schema check and rule; "
        + (f"{', '.join(f'*{r}*' for r in rules)} = pass rates of those rules; " if rules else "")
        + "*shapes*, *pair trends* = SDMetrics QualityReport properties against the real test split ("
        + ("some candidates subsampled, see the JSON" if any((r["quality"] or {}).get("subsampled") for r in res.values())
           else "no subsampling") + "); "
        "MLE = XGBoost score on the real test split when trained on the candidate, divided by the score when "
        f"trained on the real train split; *exact copies* = candidate rows identical to a train row on all {ncols} "
        "columns; *DCR* = distance to the closest train row (mean per-column distance: min-max scaled numerics, "
        "0/1 categoricals, null indicators).",
        "",
        (f"References: real-train MLE scores: {refs} (features: all columns except the target and each task's "
         "exclude list). " if mles else "")
        + f"DCR of the real test split to train: p1 {fmt(ref.get('p1'), 4)}, p5 {fmt(ref.get('p5'), 4)}, "
        f"median {fmt(ref.get('median'), 4)}.",
        "",
        "real_test is the reference itself: quality and MLE are not defined for it; real_val (held-out real "
        f"data, {h['rows']['val']:,} rows) is the ceiling for quality and MLE (its MLE is trained on those rows only).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10_000, help="rows sampled per model")
    p.add_argument("--ctgan-epochs", type=int, default=300)
    p.add_argument("--tvae-epochs", type=int, default=300)
    p.add_argument("--n-estimators", type=int, default=200, help="XGBoost trees for MLE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--models", nargs="+",
                   default=["factory", "marginal", "factory_baseline", "shuffled_train", "gaussian_copula", "ctgan", "tvae", "real_val", "real_test"])
    p.add_argument("--quick", action="store_true", help="smoke test: 2 epochs, 1,000 rows, 50 trees")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "benchmarks")
    p.add_argument("--domain", default="finance", help="domain to benchmark (default finance)")
    args = p.parse_args(argv)
    global DOMAIN
    DOMAIN = load_domain(args.domain)
    if args.quick:
        args.n, args.ctgan_epochs, args.tvae_epochs, args.n_estimators = 1_000, 2, 2, 50

    preload()  # so that the git state below covers every repo module the run will use
    t0 = time.perf_counter()
    header = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.peers " + " ".join(sys.argv[1:] if argv is None else argv),
        "git_commit": git_commit(),
        "machine": machine(),
        "versions": versions(),
        "config": {"n": args.n, "ctgan_epochs": args.ctgan_epochs, "tvae_epochs": args.tvae_epochs,
                   "n_estimators": args.n_estimators, "seed": args.seed, "quick": args.quick,
                   "models": args.models},
    }
    out = run(args)
    header["rows"] = out.pop("rows")
    header["domain"] = DOMAIN.name
    header["total_seconds"] = round(time.perf_counter() - t0, 1)
    end = git_commit()
    if end != header["git_commit"]:
        header["git_commit_at_end"] = end  # other work was committed in the checkout meanwhile
    header["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report = {"header": header, **out}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "peers" if DOMAIN.name == "finance" else f"peers_{DOMAIN.name}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(report))
    print(f"wrote {args.out / f'{stem}.json'} and {args.out / f'{stem}.md'} ({header['total_seconds']:.0f}s)")


if __name__ == "__main__":
    main()
