"""Write a run's accepted records to .parquet or .csv, atomically.

The file appears complete or not at all: it is written to a temporary file in
the target directory, fsynced, then renamed over the target with os.replace.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import polars as pl

from factory.domain import Domain
from factory.store import Store

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


def write_frame(df: pl.DataFrame, path: str | Path, force: bool = False) -> Path:
    path = check_target(path, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if path.suffix.lower() == ".parquet":
                df.write_parquet(f)
            else:
                df.write_csv(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise ExportError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def export_run(store: Store, domain: Domain, run_id: str, path: str | Path, force: bool = False) -> int:
    """Write the run's records (record_id order, spec columns, spec dtypes). Returns the row count."""
    store.run(run_id)  # a clear error for an unknown run id
    df = store.records(domain, run_id)
    write_frame(df, path, force)
    return df.height
