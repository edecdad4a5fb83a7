"""Write a run's accepted records to .parquet or .csv, atomically, with a manifest.

The file appears complete or not at all: it is written to a temporary file in
the target directory, fsynced, then renamed over the target with os.replace.
Beside it, `<file>.manifest.json` says what the file is: run, lineage, settings, counts,
gate results and the file's sha256; it is renamed into place just before the file, so a
reader never sees a new file under an old manifest (see `export_run`, `verify_export`).
Only finished runs are exported; a run whose distribution gate failed only with
`allow_drift`. No export target may be a database (the --db file, its WAL, any DuckDB file).
"""
from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from factory import __version__, files
from factory.checks.gate import gate_status_for_export
from factory.domain import Domain
from factory.files import WriteError, fsync_dir, stale_temps, write_temp
from factory.store import ATTEMPT_KEY, Store

MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_VERSION = 1

FORMATS = (".parquet", ".csv")


class ExportError(WriteError):
    pass


DUCKDB_MAGIC = b"DUCK"  # bytes 8-11 of every DuckDB database file


def is_duckdb_file(path: str | Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(12)[8:12] == DUCKDB_MAGIC
    except OSError:
        return False


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def refuse_database_target(path: str | Path, db: str | Path | None) -> None:
    """An export must never overwrite a database: not the --db file (after resolving symlinks
    and relative paths), not its write-ahead log, not any other DuckDB file."""
    path = Path(path)
    if db is not None and str(db) != ":memory:":
        db = Path(db)
        for victim, what in ((db, "the database (--db)"), (db.with_name(db.name + ".wal"), "the database's WAL")):
            if _same_file(path, victim):
                raise ExportError(f"refusing to export to {path}: it is {what} {victim}; choose another --out")
    if is_duckdb_file(path):
        raise ExportError(f"refusing to export to {path}: it is a DuckDB database file; choose another --out")


def check_target(path: str | Path, force: bool = False, db: str | Path | None = None) -> Path:
    """Fail fast (before a long run) on a target that cannot or must not be written."""
    path = Path(path)
    refuse_database_target(path, db)
    if path.suffix.lower() not in FORMATS:
        raise ExportError(f"cannot export to {path}: unknown extension {path.suffix!r}; use one of {', '.join(FORMATS)}")
    if path.is_dir():
        raise ExportError(f"cannot export to {path}: it is a directory")
    if path.exists() and not force:
        raise ExportError(f"{path} already exists; pass --force to overwrite it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ExportError(f"cannot export to {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"cannot export to {path}: directory {parent} is not writable")
    return path


def manifest_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + MANIFEST_SUFFIX)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_temp(path: Path, write) -> Path:
    return write_temp(path, write, ExportError)


def atomic_write(path: Path, write) -> None:
    files.atomic_write(path, write, ExportError)


def write_frame(df: pl.DataFrame, path: str | Path, force: bool = False, db: str | Path | None = None) -> Path:
    path = check_target(path, force, db)
    atomic_write(path, _frame_writer(df, path))
    return path


def _frame_writer(df: pl.DataFrame, path: Path):
    return df.write_parquet if path.suffix.lower() == ".parquet" else df.write_csv


def _iso(t) -> str | None:
    return None if t is None else t.replace(tzinfo=timezone.utc).isoformat()


def build_manifest(store: Store, domain: Domain, run_id: str, path: Path, rows: int, gate: str | None,
                   sha256: str | None = None) -> dict:
    run = store.run(run_id)
    by_stage = store.frame(
        f"SELECT stage, count(DISTINCT {ATTEMPT_KEY}) AS attempts, count(*) AS rows FROM rejections WHERE run_id = ? "
        "GROUP BY stage ORDER BY stage", [run_id])
    by_rule = store.frame(
        f"SELECT stage, rule, count(DISTINCT {ATTEMPT_KEY}) AS attempts FROM rejections WHERE run_id = ? "
        "GROUP BY stage, rule ORDER BY attempts DESC, stage, rule", [run_id])
    checks = store.checks(run_id).to_dicts()
    return {
        "manifest_version": MANIFEST_VERSION,
        "file": path.name,
        "format": path.suffix.lower().lstrip("."),
        "rows": rows,
        "sha256": sha256 or sha256_file(path),
        "run_id": run_id,
        "domain": domain.name,
        "rule_set_hash": run["rule_set_hash"],
        "model": {"id": run["model_id"], "version": run["model_version"]},
        "seed": run["seed"],
        "n": run["requested_n"],
        "batch_size": run["batch_size"],
        "settings": json.loads(run["settings"]),
        # --where / --rebalance: the condition(s) every record meets (None: unconditioned)
        "condition": {k: v for k, v in json.loads(run["settings"]).items()
                      if k in ("where", "rebalance", "conditions")} or None,
        "run_status": run["status"],
        "started_at": _iso(run["started_at"]),
        "finished_at": _iso(run["finished_at"]),
        "counts": {k: run[k] for k in ("attempted", "accepted", "rejected", "surplus")},
        # attempts: distinct rejected attempts (a record breaking 3 rules is one attempt, 3 rows);
        # 'distribution' rows reject the run as a whole and have no attempt
        "rejections_by_stage": {r["stage"]: {"attempts": r["attempts"], "rows": r["rows"]}
                                for r in by_stage.iter_rows(named=True)},
        "rejections_by_rule": [r for r in by_rule.iter_rows(named=True)],
        "gate": {
            # passed | skipped | overridden (failed, exported with --allow-drift) | null (no gate ran)
            "status": gate,
            "overridden": gate == "overridden",
            "failed": [c["check_name"] for c in checks if c["status"] == "failed"],
            "checks": checks,
        },
        "factory_version": __version__,
        "created_at": datetime.now(timezone.utc).isoformat(),
    }


EXPORTABLE_STATUSES = ("succeeded", "gate_failed")


MONEY = ("decimal", "float")


def export_run(store: Store, domain: Domain, run_id: str, path: str | Path, force: bool = False,
               allow_drift: bool = False, money: str = "decimal", lineage: bool = False) -> int:
    """Write the run's records (record_id order, spec columns) and the manifest beside them.
    `money` "decimal" (default): numeric columns with decimals are exact decimals, as stored in
    DuckDB (Parquet DECIMAL(18, d); CSV with d decimals); "float": Float64. `lineage`: run_id, shard
    and record_id come first, so each exported row can be traced to its run and attempt. Only a finished run is exported: one still running, failed or never gated
    is an ExportError whatever `allow_drift` says; a run whose gate failed raises GateFailed
    unless `allow_drift`. Nothing is written in either case. Returns the row count.

    Data and manifest are committed as a pair: both are written to temp files first, the
    manifest (with the data's sha256) is renamed into place first, then the data. So a reader
    never sees a new file under an old manifest; between the two renames the manifest's sha256
    does not match the old file, which `verify_export` reports."""
    run = store.run(run_id)  # a clear error for an unknown run id
    if run["status"] not in EXPORTABLE_STATUSES:
        how = (f"; finish it with `factory generate --resume {run_id}`" if run["status"] in ("running", "failed")
               else "")
        raise ExportError(f"run {run_id} has status {run['status']!r} ({run['accepted']:,} of "
                          f"{run['requested_n']:,} records): only a finished run can be exported{how}")
    if run.get("gate") is None:
        raise ExportError(f"run {run_id} was never gated (runs.gate is empty): it cannot be exported")
    if money not in MONEY:
        raise ExportError(f"--money must be one of {', '.join(MONEY)}, got {money!r}")
    gate = gate_status_for_export(store, run_id, allow_drift)
    df = store.records(domain, run_id, decimal=money == "decimal", lineage=lineage)
    if df.height != run["requested_n"]:
        raise ExportError(f"run {run_id} stores {df.height:,} records but asked for {run['requested_n']:,}: "
                          "the database does not match its counters; it is not exported")
    path = check_target(path, force, store.path)
    for stale in stale_temps(path) + stale_temps(manifest_path(path)):
        stale.unlink(missing_ok=True)
    data_tmp = _write_temp(path, _frame_writer(df, path))
    manifest_tmp = None
    try:
        manifest = build_manifest(store, domain, run_id, path, df.height, gate, sha256_file(data_tmp))
        manifest["columns"] = [{"name": n, "type": str(t)} for n, t in df.schema.items()]  # what the file holds
        manifest["money"], manifest["lineage"] = money, lineage
        text = json.dumps(manifest, indent=1, default=str) + "\n"
        manifest_tmp = _write_temp(manifest_path(path), lambda f: f.write(text.encode()))
        try:
            os.replace(manifest_tmp, manifest_path(path))
            os.replace(data_tmp, path)
        except OSError as e:
            raise ExportError(f"cannot write {path}: {e.strerror or e}") from None
        fsync_dir(path.parent)
    finally:
        for tmp in (data_tmp, manifest_tmp):
            if tmp is not None:
                tmp.unlink(missing_ok=True)
    return df.height


def verify_export(path: str | Path) -> dict:
    """The manifest of an exported file, after checking that it describes this very file
    (name, sha256). Raises ExportError otherwise."""
    path = Path(path)
    mpath = manifest_path(path)
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: no readable manifest {mpath} ({e})") from None
    if not path.exists():
        raise ExportError(f"{path}: missing, but {mpath} describes it")
    if manifest.get("file") != path.name or manifest.get("sha256") != sha256_file(path):
        raise ExportError(f"{path} does not match its manifest {mpath} (sha256 differs): an export was "
                          "interrupted; export the run again with --force")
    return manifest
