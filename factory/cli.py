"""`factory`: generate validated synthetic records, and inspect everything in DuckDB.

User mistakes (unknown domain, bad file, bad --db, ...) end in one red line and
exit code 2. A run refused by the distribution gate ends in one red line naming each
failed check, and exit code 3. Only the project's own error classes are caught: anything else is a
bug and keeps its traceback.
"""
from __future__ import annotations

import contextlib
import functools
import json
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Optional

import polars as pl
import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from factory.checks.base import GateError
from factory.checks.gate import EXIT_CODE as GATE_EXIT_CODE
from factory.checks.gate import GateFailed, check_rows
from factory.conditions import ConditionError, parse_condition, rebalance_plan
from factory.domain import MAX_BATCH, DomainError, available_domains, load_domain, search_paths
from factory.export import ExportError, check_target, export_run, manifest_path
from factory.files import WriteError, atomic_write_text
from factory.generators import GENERATORS, GeneratorError, default_model
from factory.inputs import InputError, read_table
from factory.loop import AttemptBudgetExceeded, ResumeError, new_run_id, resume_generation
from factory.pool import PoolError
from factory.ray_engine import EngineError
from factory.store import Store, StoreError, check_db_name, is_interrupt

STARTED = time.perf_counter()  # the command's start, for the wall time its summary reports
app = typer.Typer(name="factory", help=__doc__.split("\n")[0], no_args_is_help=True, add_completion=False,
                  pretty_exceptions_show_locals=False)
# Piped output is not squeezed into 80 columns: tables stay readable in files and CI logs.
_PIPED_WIDTH = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160
out = Console(width=_PIPED_WIDTH)
err = Console(stderr=True, width=_PIPED_WIDTH)

USER_ERRORS = (DomainError, StoreError, ExportError, WriteError, GeneratorError, InputError, GateError, EngineError,
               ConditionError, PoolError)
ENGINES = ("local", "ray")
INT64_MAX = 2**63 - 1
MAX_RECORDS = 10**12  # -n: far beyond any run, and 100 x n attempts still fit a DuckDB BIGINT
VALIDATE_CHUNK = 100_000
ALLOW_DRIFT = typer.Option(False, "--allow-drift",
                           help="export even if the distribution gate failed (the manifest records the override)")
DB_OPTION = typer.Option(Path("factory.duckdb"), "--db", help="DuckDB file holding runs, records and rejections")
MONEY_OPTION = typer.Option("decimal", "--money", metavar="[decimal|float]",
                            help="export: columns with decimals as exact decimals (as stored; Parquet DECIMAL) "
                            "or as floats")
LINEAGE_OPTION = typer.Option(False, "--lineage", help="export: add run_id, shard and record_id columns first")
FORMATS = ("table", "csv", "json")
def _check_format(value: str) -> str:
    if value not in FORMATS:
        fail(f"--format must be one of {', '.join(FORMATS)}, got {value!r}")
    return value


FORMAT_OPTION = typer.Option("table", "--format", metavar="[table|csv|json]", callback=_check_format,
                             help="table: for reading; csv or json (one object per row): for scripts")


def _version(value: bool):
    if value:
        from factory import __version__

        out.print(f"factory {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="print the version and exit")):
    """Generate validated synthetic records, and inspect everything in DuckDB."""


def fail(message: str, code: int = 2):
    line = " ".join(str(message).split())  # always one line
    err.print(Text("error: ", style="bold red") + Text(line, style="red"), soft_wrap=True)
    raise typer.Exit(code)


def user_errors(fn):
    """Turn the project's own errors into a one-line message and exit code 2 (3 for a gate refusal)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            fail(str(e))
        except GateFailed as e:
            fail(str(e), code=GATE_EXIT_CODE)
        except (KeyboardInterrupt, RuntimeError) as e:  # Ctrl-C, also inside a DuckDB query
            if not is_interrupt(e):
                raise
            fail("interrupted", code=130)

    return wrapper


def print_frame(df: pl.DataFrame, title: str | None = None, max_rows: int | None = None,
                no_wrap: tuple[str, ...] = (), fmt: str = "table") -> None:
    """Print a frame as a rich table, or (fmt csv/json) as machine-readable text on stdout: all rows
    up to `max_rows`, no title, numbers unformatted."""
    if fmt != "table":
        shown = df if max_rows is None else df.head(max_rows)
        text = shown.write_csv() if fmt == "csv" else shown.write_ndjson()
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    table = Table(title=title, box=box.SIMPLE_HEAD)
    for name in df.columns:
        table.add_column(name, overflow="fold", no_wrap=name in no_wrap)
    shown = df if max_rows is None else df.head(max_rows)
    for row in shown.iter_rows():
        table.add_row(*("" if v is None else f"{v:,}" if isinstance(v, int) else str(v) for v in row))
    out.print(table)
    if max_rows is not None and df.height > max_rows:
        out.print(f"... {df.height - max_rows:,} more rows not shown")


# ---- commands --------------------------------------------------------------------------------
@app.command()
@user_errors
def domains():
    """List the domains, their columns and their rules."""
    for name in available_domains():
        d = load_domain(name)
        n_derived = sum(c.derived for c in d.spec.columns)
        latent = f", {len(d.spec.latent)} latent" if d.spec.latent else ""
        out.print(Text(name, style="bold") + Text(f"  {d.description}"))
        out.print(f"  {len(d.spec.columns)} columns ({n_derived} derived{latent}), {len(d.rules)} rules, "
                  f"default model: {default_model(d)}, folder: {d.root}", soft_wrap=True)
        for rule in d.rules:
            out.print(Text(f"  - {rule.name}: ", style="cyan") + Text(rule.message), soft_wrap=True)
        out.print()


@app.command()
@user_errors
def validate(file: Path = typer.Argument(..., help="CSV or Parquet file with the domain's columns"),
             domain: str = typer.Option(..., "--domain", "-d", help="domain whose rules apply")):
    """Check a CSV/Parquet file against a domain's schema and rules. Exit 1 if any row fails."""
    d = load_domain(domain)
    df = read_table(file, d.spec)
    if df.height == 0:
        fail(f"{file}: the file has a header but no rows; there is nothing to validate")
    # Validate in chunks and keep only counts: memory stays bounded by one chunk's failures,
    # however many of a million rows break a rule (each failure is a row in pandera's report).
    parts, n_bad = [], 0
    for start in range(0, df.height, VALIDATE_CHUNK):
        result = d.validator.validate(df.slice(start, VALIDATE_CHUNK))
        chunk_bad = result.failures["row"].n_unique() if result.failures.height else 0
        n_bad += chunk_bad
        if chunk_bad:
            parts.append(result.failures.group_by("stage", "rule", "message").agg(pl.col("row").n_unique().alias("rows")))
        del result
    if not n_bad:
        out.print(f"[green]{file}: all {df.height:,} rows pass every {domain} rule[/]")
        return
    counts = (pl.concat(parts).group_by("stage", "rule", "message").agg(pl.col("rows").sum())
              .sort(["rows", "stage", "rule"], descending=[True, False, False]))
    print_frame(counts, title=f"{file}: {n_bad:,} of {df.height:,} rows violate a rule")
    raise typer.Exit(1)


@app.command()
@user_errors
def generate(
    domain: Optional[str] = typer.Option(None, "--domain", "-d", help="domain to generate"),
    n: Optional[int] = typer.Option(None, "-n", "--n", "--rows", help="number of valid records to produce"),
    seed: int = typer.Option(0, "--seed", help="run seed; same seed, model and batch size give the same records"),
    model: Optional[str] = typer.Option(None, "--model", metavar=f"[{'|'.join(GENERATORS)}]",
                                        help="the generator; default: the domain's"),
    db: Path = DB_OPTION,
    out_path: Optional[Path] = typer.Option(None, "--out", help="export accepted records to .parquet or .csv"),
    force: bool = typer.Option(False, "--force", help="overwrite --out if it exists"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="texts per batch; default: the domain's"),
    max_attempts: Optional[int] = typer.Option(None, "--max-attempts", help="give up after this many texts"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    model_dir: Optional[Path] = typer.Option(None, "--model-dir", help="difflm: a trained stack folder (default: the domain's shipped model/)"),
    allow_drift: bool = ALLOW_DRIFT,
    money: str = MONEY_OPTION,
    lineage: bool = LINEAGE_OPTION,
    resume: Optional[str] = typer.Option(None, "--resume", help="continue an interrupted run (its settings are reused)"),
    shards: Optional[int] = typer.Option(None, "--shards", help="split the run into this many shards, each with "
                                         "its own seeds; same seed and shards give the same records on any engine "
                                         "(default: local 8 from 10,000 records, else 1; ray 4 per worker)"),
    engine: str = typer.Option("local", "--engine", metavar=f"[{'|'.join(ENGINES)}]", help="local: this process; ray: a Ray cluster (pip install "
                               "'factory\\[ray]')"),
    address: Optional[str] = typer.Option(None, "--address", help="ray: an existing cluster (e.g. ray://head:10001 "
                                          "or auto); default: start a local cluster for this run"),
    workers: Optional[int] = typer.Option(None, "--workers", help="worker processes, one CPU and one model each "
                                          "(default: local min(2, CPUs), ray 2); records do not depend on it, "
                                          "only on --shards"),
    device: str = typer.Option("cpu", "--device", metavar="[cpu|cuda|auto]",
                               help="difflm: cpu, cuda or auto (cuda if torch sees a GPU); "
                               "records depend on the device, so the run records it"),
    precision: str = typer.Option("auto", "--precision", metavar="[auto|float32|bfloat16]",
                                  help="difflm: auto (bfloat16 on CPUs with bf16 units, "
                                  "else float32), float32 or bfloat16; records depend on it, so the run records it"),
    where: Optional[str] = typer.Option(None, "--where", help="SQL condition every record meets, over the exported "
                                        "columns, e.g. \"grade IN ('E','F','G') AND annual_income > 100000\"; the "
                                        "gate compares with the real train rows that meet it"),
    rebalance: Optional[str] = typer.Option(None, "--rebalance", help="COL or COL:value=share,...: each category of "
                                            "COL gets its share of -n (equal by default), one shard per category"),
):
    """Generate N records that pass every rule, record the run in DuckDB, optionally export them.

    Records that copy a training row are rejected (stage 'privacy') and replaced. After the
    run, the distribution gate compares the records with the train split; if a check fails,
    nothing is exported and the exit code is 3, unless --allow-drift."""
    if engine not in ENGINES:
        fail(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    _check_money(money)
    if engine != "ray" and address is not None:
        fail("--address applies to --engine ray only")
    if workers is None:
        from factory.api import default_workers

        workers = default_workers() if engine == "local" else 2
    if workers <= 0:
        fail(f"--workers must be positive, got {workers}")
    if engine == "local" and workers > (os.cpu_count() or 1):
        err.print(f"warning: --workers {workers} is more than this machine's {os.cpu_count()} CPUs; "
                  "extra workers only share them", soft_wrap=True)
    if resume is not None:
        if any(v is not None for v in (domain, n, model, model_dir, batch_size, shards, where, rebalance)) \
                or device != "cpu" or precision != "auto":
            fail("--resume reuses the run's own domain, n, seed, model, device, precision, batch size, shards and "
                 "condition (--where/--rebalance); do not pass them")
        return _resume(resume, db, out_path, force, quiet, allow_drift, engine, address, workers, money, lineage)
    if domain is None or n is None:
        fail("generate needs --domain and -n (or --resume RUN_ID)")
    if n <= 0:
        fail(f"-n must be a positive number of records, got {n}")
    if n > MAX_RECORDS:
        fail(f"-n must be at most {MAX_RECORDS:,}, got {n:,}")
    if seed < 0:
        fail(f"--seed must be >= 0, got {seed}")
    if batch_size is not None and batch_size <= 0:
        fail(f"--batch-size must be positive, got {batch_size}")
    if max_attempts is not None and max_attempts <= 0:
        fail(f"--max-attempts must be positive, got {max_attempts}")
    for flag, v in (("-n", n), ("--seed", seed), ("--batch-size", batch_size), ("--max-attempts", max_attempts)):
        if v is not None and v > INT64_MAX:  # stored as DuckDB BIGINT
            fail(f"{flag} must be at most {INT64_MAX:,}, got {v:,}")
    if batch_size is not None and batch_size > MAX_BATCH:  # one batch must fit in memory
        fail(f"--batch-size must be at most {MAX_BATCH:,}, got {batch_size:,}")
    if rebalance is not None and shards is not None:
        fail("--rebalance makes one shard per category; do not pass --shards")
    if shards is None:
        from factory.api import default_shards

        shards = 1 if rebalance is not None else default_shards(n, engine, workers)
    if not 1 <= shards <= n:
        fail(f"--shards must be between 1 and n ({n:,}), got {shards}")
    d = load_domain(domain)
    check_db_name(db, d)
    _check_conditions(d, where, rebalance, n)
    if out_path is not None:
        check_target(out_path, force, db)  # before the run, not after it
    from factory import api

    run_id = new_run_id(d)
    with _interruptible(run_id, db, quiet, announce=False):
        try:
            run = api.generate(d, n, seed=seed, where=where, rebalance=rebalance, model=model, model_dir=model_dir,
                               db=db, allow_drift=allow_drift, batch_size=batch_size, max_attempts=max_attempts,
                               shards=shards, engine=engine, workers=workers, address=address, device=device,
                               precision=precision, progress=not quiet, run_id=run_id,
                               on_start=lambda rid: _announce(rid, db, quiet))
        except AttemptBudgetExceeded as e:
            fail(str(e), code=1)
        except GateFailed as e:  # stored, refused: the summary says so, then exit 3
            run = e.run
        try:
            _finish(run.store, d, run.generator, run.result, n, out_path, force, allow_drift, db, money, lineage)
        finally:
            run.close()


@contextlib.contextmanager
def _interruptible(run_id: str, db: Path, quiet: bool, announce: bool = True):
    """Say which run this is before it starts (`announce`; else the caller does, via `_announce`), and how
    to continue it if Ctrl-C stops it: every batch stored before the interruption is kept, and `--resume`
    ends with exactly what an uninterrupted run stores."""
    if announce:
        _announce(run_id, db, quiet)
    try:
        yield
    except KeyboardInterrupt:
        fail(f"interrupted: run {run_id} keeps every batch stored so far; continue it with "
             f"`factory generate --resume {run_id} --db {db}`", code=130)


def _check_money(money: str) -> None:
    from factory.export import MONEY

    if money not in MONEY:
        fail(f"--money must be one of {', '.join(MONEY)}, got {money!r}")


def _announce(run_id: str, db: Path, quiet: bool) -> None:
    if not quiet:
        err.print(f"run {run_id} (database {db})", soft_wrap=True, highlight=False)


def _check_conditions(d, where: Optional[str], rebalance: Optional[str], n: int) -> None:
    """Fail (one line, exit 2) on a bad condition before anything is loaded or stored; warn on low support."""
    conditions = [parse_condition(d, where)] if where is not None else []
    if rebalance is not None:
        conditions = [parse_condition(d, sql) for sql, _ in rebalance_plan(d, rebalance, n, where)]
    for c in conditions:
        if c.low_support:
            err.print(Text(f"warning: few real rows meet {c.describe()}; the records follow those few rows",
                           style="yellow"), soft_wrap=True)


def _resume(run_id: str, db: Path, out_path: Optional[Path], force: bool, quiet: bool, allow_drift: bool,
            engine: str, address: Optional[str], workers: int, money: str = "decimal", lineage: bool = False):
    """Continue run_id; `workers` only decides how fast (the run's own shards give its records)."""
    if not Path(db).exists():
        fail(f"no database at {db}")
    if out_path is not None:
        check_target(out_path, force, db)
    from factory.api import load_engine

    with Store(db) as store, _interruptible(run_id, db, quiet):
        run = store.run(run_id)
        d = load_domain(run["domain"])
        settings = store.run_settings(run_id)
        device = settings.get("device", "cpu")  # the device that made the run's first batches
        opts = {"precision": settings["precision"]} if "precision" in settings else {}  # and its precision
        if "diffusion_steps" in settings:  # and its latent sampler (runs that recorded no solver used heun)
            opts.update(steps=settings["diffusion_steps"], solver=settings.get("diffusion_solver", "heun"))
            # and how it met its condition (runs that recorded none forced drawn values)
            opts.update(conditioning=settings.get("conditioning", "force"), particles=settings.get("particles", 1))
        loop_engine, generator = load_engine(engine, d, settings.get("model"), settings.get("model_dir"), address,
                                             workers, device, settings.get("shards", 1), opts)
        try:
            result = resume_generation(d, generator, store, run_id, progress=not quiet, allow_drift=allow_drift,
                                       engine=loop_engine)
        except ResumeError as e:
            fail(str(e))
        except AttemptBudgetExceeded as e:
            fail(str(e), code=1)
        _finish(store, d, generator, result, run["requested_n"], out_path, force, allow_drift, db, money, lineage)


def _finish(store, d, generator, result, n, out_path, force, allow_drift, db, money="decimal", lineage=False):
    refused = result.gate is not None and result.gate.blocks_export
    if out_path is not None and not refused:
        try:
            export_run(store, d, result.run_id, out_path, force, allow_drift=allow_drift, money=money,
                       lineage=lineage)
        except ExportError as e:
            fail(f"{e} (the run {result.run_id} is stored; re-export with `factory export {result.run_id}`)")
    gate = result.gate
    gate_line = "off" if gate is None else gate.status + (
        f" ({len(gate.failed)} of {len(gate.checks)} checks failed)" if gate.failed else
        f" ({len(gate.checks)} checks)")
    lines = [
        ("run", result.run_id),
        ("model", f"{generator.model_id} {generator.model_version}"),
        ("accepted", f"{result.accepted:,} of {n:,}"),
        ("attempted", f"{result.attempted:,}"),
        ("rejected", f"{result.rejected:,}"),
        ("acceptance", f"{result.acceptance_rate:.2%}"),
        ("surplus", f"{result.surplus:,}"),
        ("shards", f"{result.shards:,}"),
        ("gate", gate_line),
        ("wall time", f"{time.perf_counter() - STARTED:.1f} s (the whole command)"),
        ("database", str(db)),
    ] + ([("exported", str(out_path))] if out_path is not None and not refused else [])
    table = Table(show_header=False, box=None)
    for k, v in lines:
        table.add_row(Text(k, style="bold"), v)
    out.print(table)
    if result.top_rejections:
        out.print("top rejection reasons (attempts):")
        for stage, rule, count in result.top_rejections:
            out.print(f"  {stage}/{rule}: {count:,}")
    if refused:
        raise GateFailed(result.run_id, check_rows(gate.failed))


def _run_records(store: Store, run_id: str, minimum: int = 50):
    """A stored run, its domain and its records, for the commands that score a run."""
    run = store.run(run_id)
    d = load_domain(run["domain"])
    records = store.records(d, run_id)
    if records.height < minimum:
        fail(f"run {run_id} has {records.height} records; scoring a run needs at least {minimum}")
    return run, d, records


@app.command("evaluate")
@user_errors
def evaluate_cmd(run_id: str = typer.Argument(..., help="run id (see `factory runs`)"),
                 db: Path = DB_OPTION,
                 out_path: Optional[Path] = typer.Option(None, "--out", help="write every metric as JSON here"),
                 force: bool = typer.Option(False, "--force", help="overwrite --out if it exists")):
    """Score a run's records against the domain's held-out real test split: SDMetrics quality,
    machine-learning efficiency (XGBoost, synthetic- vs real-trained), privacy (exact copies, DCR), rules."""
    from factory import evaluate as ev

    if out_path is not None:
        if out_path.suffix != ".json":
            fail(f"--out {out_path}: the metrics are JSON; use a .json file")
        if not out_path.parent.is_dir():
            fail(f"--out {out_path}: directory {out_path.parent} does not exist")
        if out_path.exists() and not force:
            fail(f"--out {out_path} exists; pass --force to overwrite it")
    with Store(db, read_only=True) as store:
        run, d, records = _run_records(store, run_id)
    result = {"run_id": run_id, "model": f"{run['model_id']} {run['model_version']}",
              **ev.evaluate(d, records, d.load_split("train"), d.load_split("test"))}
    q, m, p, r = result["quality"], result["mle"], result["privacy"], result["rule_validity"]
    rows = [("records", f"{records.height:,}"), ("pass every rule", f"{r['valid_rate']:.2%}"),
            ("column shapes", f"{q['column_shapes']:.3f}"), ("pair trends", f"{q['column_pair_trends']:.3f}")]
    rows += [(f"MLE ratio {k}", f"{v:.3f}") for k, v in (m["ratio"] if m else {}).items() if v is not None]
    rows += [("exact copies of training rows", f"{p['exact_copies']:,}"),
             ("DCR median (run / real test)", f"{p['dcr']['median']:.4f} / {p['dcr_reference']['median']:.4f}")]
    table = Table(show_header=False, box=None, title=f"{run_id} vs the real {d.name} test split")
    for k, v in rows:
        table.add_row(Text(k, style="bold"), v)
    out.print(table)
    if out_path is not None:
        atomic_write_text(out_path, json.dumps(result, indent=1, default=str))
        out.print(f"metrics written to {out_path}")


@app.command("report")
@user_errors
def report_cmd(run_id: str = typer.Argument(..., help="run id (see `factory runs`)"),
               db: Path = DB_OPTION,
               out_dir: Optional[Path] = typer.Option(None, "--out", help="folder for report.html + metrics.json "
                                                      "(default: reports/runs/<run id>/)"),
               compare: Optional[Path] = typer.Option(
                   None, "--compare", help="peer metrics JSON written by benchmarks/peers.py (e.g. "
                   "reports/benchmarks/peers.json): adds a side-by-side table and chart of the run vs every peer, "
                   "flagging peers scored on a different split, rule set, metric code, settings or n")):
    """Write a self-contained HTML report of a run (metrics, gate checks, rejections, plots) and its metrics JSON.
    Without --compare the report says the side-by-side comparison was not included."""
    from factory.report import build_report

    out_dir = out_dir or Path("reports") / "runs" / run_id
    with Store(db, read_only=True) as store:
        _, d, records = _run_records(store, run_id)
        try:
            page = build_report(store, d, run_id, records, out_dir, compare=compare)
        except OSError as e:
            fail(f"cannot write the report to {out_dir}: {e.strerror}")
    out.print(f"report: {page} ({page.stat().st_size / 1024:.0f} KB); metrics: {out_dir / 'metrics.json'}")


@app.command("export")
@user_errors
def export_cmd(run_id: str = typer.Argument(..., help="run id (see `factory runs`)"),
               out_path: Path = typer.Option(..., "--out", help=".parquet or .csv"),
               force: bool = typer.Option(False, "--force", help="overwrite --out if it exists"),
               db: Path = DB_OPTION,
               allow_drift: bool = ALLOW_DRIFT, money: str = MONEY_OPTION, lineage: bool = LINEAGE_OPTION):
    """Export a stored run's accepted records, with <out>.manifest.json beside them (exit 3 if its gate failed)."""
    _check_money(money)
    check_target(out_path, force, db)
    with Store(db, read_only=True) as store:
        d = load_domain(store.run(run_id)["domain"])
        count = export_run(store, d, run_id, out_path, force, allow_drift=allow_drift, money=money, lineage=lineage)
    out.print(f"wrote {count:,} records to {out_path} (manifest: {manifest_path(out_path)})")


@app.command()
@user_errors
def checks(run_id: str = typer.Argument(..., help="run id (see `factory runs`)"),
           db: Path = DB_OPTION, fmt: str = FORMAT_OPTION):
    """A run's distribution-gate checks: statistic, threshold, outcome (failed first)."""
    with Store(db, read_only=True) as store:
        run = store.run(run_id)
        df = store.checks(run_id)
    if fmt != "table":
        print_frame(df, fmt=fmt)
        return
    out.print(f"run {run_id}: gate {run['gate'] or 'not run'}, status {run['status']}")
    if not df.height:
        return
    g = lambda v: None if v is None else f"{v:.4g}"  # noqa: E731
    df = df.with_columns(pl.col("statistic").map_elements(g, return_dtype=pl.String),
                         pl.col("threshold").map_elements(g, return_dtype=pl.String))
    print_frame(df.select(pl.col("check_name").alias("check"), pl.col("column_names").alias("columns"),
                          "statistic", pl.col("direction").alias("must be"), "threshold", "status", "detail"),
                no_wrap=("check",))


@app.command()
@user_errors
def runs(db: Path = DB_OPTION, fmt: str = FORMAT_OPTION):
    """List the runs in a database."""
    with Store(db, read_only=True) as store:
        df = store.runs()
    if fmt != "table":
        print_frame(df, fmt=fmt)
        return
    if not df.height:
        out.print(f"no runs in {db}")
        return
    df = df.select(
        "run_id", pl.col("model_id").alias("model"), "seed",
        pl.col("requested_n").alias("n"), "accepted", "attempted",
        (pl.col("accepted") / pl.col("attempted")).map_elements(lambda r: f"{r:.2%}", return_dtype=pl.String)
        .alias("acceptance"), "status", "gate",
        ((pl.col("finished_at") - pl.col("started_at")).dt.total_milliseconds() / 1000).round(1).alias("seconds"))
    print_frame(df, title=f"runs in {db} (all times UTC; see `factory sql` for more)", no_wrap=("run_id",))


@app.command()
@user_errors
def rejections(run_id: str = typer.Argument(..., help="run id (see `factory runs`)"),
               db: Path = DB_OPTION,
               examples: int = typer.Option(3, "--examples", help="example raw texts to show"),
               fmt: str = FORMAT_OPTION):
    """Why a run's attempts were rejected: counts by stage and rule, with example texts
    (csv/json: the counts only)."""
    if not 0 <= examples <= 10_000:
        fail(f"--examples must be between 0 and 10,000, got {examples:,}")
    with Store(db, read_only=True) as store:
        run = store.run(run_id)
        counts = store.rejection_counts(run_id)
        samples = store.frame(
            "SELECT stage, rule, shard, attempt_id, raw_text FROM rejections WHERE run_id = ? AND attempt_id IS NOT NULL "
            "AND rule IN (SELECT rule FROM rejections WHERE run_id = ? AND attempt_id IS NOT NULL "
            "GROUP BY rule ORDER BY count(*) DESC, rule LIMIT ?) "
            "QUALIFY row_number() OVER (PARTITION BY rule ORDER BY shard, attempt_id) = 1 ORDER BY shard, attempt_id",
            [run_id, run_id, examples])
    if fmt != "table":
        print_frame(counts, fmt=fmt)
        return
    out.print(f"run {run_id}: {run['rejected']:,} of {run['attempted']:,} attempts rejected "
              f"(a rejected attempt can break several rules)")
    if counts.height:
        print_frame(counts.select("stage", "rule", "attempts", "message"), title="rejections by rule")
    for r in samples.iter_rows(named=True):
        where = f"attempt {r['attempt_id']}" + (f" of shard {r['shard']}" if r["shard"] else "")
        out.print(Text(f"{r['stage']}/{r['rule']} {where}: ", style="bold")
                  + Text(r["raw_text"][:1000] + ("..." if len(r["raw_text"]) > 1000 else "")), soft_wrap=True)


@app.command()
@user_errors
def sql(query: str = typer.Argument(..., help="SQL to run (read-only)"),
        db: Path = DB_OPTION,
        max_rows: int = typer.Option(100, "--max-rows", help="rows to print"),
        fmt: str = FORMAT_OPTION):
    """Run a read-only SQL query on the database and print the result."""
    if not 0 <= max_rows <= INT64_MAX:
        fail(f"--max-rows must be between 0 and {INT64_MAX:,}, got {max_rows:,}")
    with Store(db, read_only=True) as store:
        df = store.query(query)
    print_frame(df, max_rows=max_rows, fmt=fmt)


@app.command("init")
@user_errors
def init_cmd(name: str = typer.Argument(..., help="name of the new domain (letters, digits, _)"),
             source: Path = typer.Option(..., "--from", help="the real table: a .csv or .parquet file"),
             folder: Optional[Path] = typer.Option(None, "--dir", help="domain folder to write "
                                                   "(default: ./domains/NAME, which the CLI finds)"),
             target: list[str] = typer.Option([], "--target", help="a column to predict in the MLE evaluation "
                                              "(repeatable)"),
             force: bool = typer.Option(False, "--force", help="replace an existing domain folder"),
             max_minutes: float = typer.Option(20.0, "--max-minutes", help="training budget written to the "
                                               "domain's settings (factory train keeps to it)")):
    """Make a domain from a CSV or Parquet table: inferred columns, mined rules, real splits,
    calibrated gates, all in an editable domain.toml (see README, "Bring your own table")."""
    from factory.init import InitError, init_domain

    if max_minutes <= 0:
        fail(f"--max-minutes must be positive, got {max_minutes:g}")
    try:
        r = init_domain(name, source, folder, tuple(target), force, budget_minutes=max_minutes,
                        log=lambda m: err.print(Text(m, style="yellow" if m.startswith("warning") else "")))
    except InitError as e:
        fail(str(e))
    out.print(f"wrote domain {name!r} to {r.path} in {r.seconds:.1f} s: {r.columns} columns "
              f"({len(r.derived)} derived: {', '.join(r.derived) or 'none'}), {len(r.excluded)} excluded, "
              f"{r.rules} rules ({r.decode} enforced while decoding, {r.dropped} dropped: broken on val/test)",
              soft_wrap=True)
    on_path = any(r.path.parent.resolve() == p.resolve() for p in search_paths() if p.exists())
    hint = "" if on_path else f" (first add {r.path.parent} to FACTORY_DOMAINS_PATH)"
    out.print(f"review {r.path / 'domain.toml'} and {r.path / 'RULES.md'}, then: "
              f"factory train --domain {name}{hint}", soft_wrap=True)


# `factory train` lives in its own module (it needs torch); register it when present.
# find_spec, not try/except ImportError, so that a broken train module fails loudly.
if importlib.util.find_spec("factory.train_cli") is not None:
    from factory.train_cli import register

    register(app, fail, user_errors)


if __name__ == "__main__":
    app()
