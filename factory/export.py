"""Write a run's accepted records to .parquet or .csv, atomically, with a manifest.

The file appears complete or not at all: it is written to a temporary file in
the target directory, fsynced, then renamed over the target with os.replace.
Beside it, `<file>.manifest.json` (written the same way, after the file) says what the
file is: run, lineage, settings, counts, gate results and the file's sha256.
A run whose distribution gate failed is not exported unless `allow_drift`.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from factory import __version__
from factory.checks.gate import gate_status_for_export
from factory.domain import Domain
from factory.store import ATTEMPT_KEY, Store

MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_VERSION = 1

FORMATS = (".parquet", ".csv")


class ExportError(ValueError):
    pass


def check_target(path: str | Path, force: bool = False) -> Path:
    """Fail fast (before a long run) on a target that cannot or must not be written."""
    path = Path(path)
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


def _atomic_write(path: Path, write) -> None:
    """Call write(binary file) on a temp file beside `path`, fsync, rename over `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise ExportError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_frame(df: pl.DataFrame, path: str | Path, force: bool = False) -> Path:
    path = check_target(path, force)
    _atomic_write(path, df.write_parquet if path.suffix.lower() == ".parquet" else df.write_csv)
    return path


def _iso(t) -> str | None:
    return None if t is None else t.replace(tzinfo=timezone.utc).isoformat()


def build_manifest(store: Store, domain: Domain, run_id: str, path: Path, rows: int, gate: str | None) -> dict:
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
        "sha256": sha256_file(path),
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


def export_run(store: Store, domain: Domain, run_id: str, path: str | Path, force: bool = False,
               allow_drift: bool = False) -> int:
    """Write the run's records (record_id order, spec columns, spec dtypes) and the manifest
    beside them. Raises GateFailed (nothing written) if the run's gate failed and not
    `allow_drift`. Returns the row count."""
    store.run(run_id)  # a clear error for an unknown run id
    gate = gate_status_for_export(store, run_id, allow_drift)
    df = store.records(domain, run_id)
    path = write_frame(df, path, force)
    manifest = build_manifest(store, domain, run_id, path, df.height, gate)
    text = json.dumps(manifest, indent=1, default=str) + "\n"
    _atomic_write(manifest_path(path), lambda f: f.write(text.encode()))
    return df.height
