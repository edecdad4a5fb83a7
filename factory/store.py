"""DuckDB store: runs, rejections and each domain's accepted records.

The static tables are in schemas/ddl.sql. A domain's `records` table is derived
from its TableSpec, so its columns are typed exactly as the spec says. All writes
of a batch (records, rejections, run counters) happen in one transaction: a
crash never leaves half a batch, and the counters always match the tables.
"""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import polars as pl

from factory import __version__
from factory.domain import Domain

SCHEMA_VERSION = "2"  # 2: checks table, runs.gate, gate_failed status, run-level rejections
DDL_PATH = Path(__file__).resolve().parent.parent / "schemas" / "ddl.sql"
RESERVED_SCHEMAS = {"main", "temp", "information_schema", "pg_catalog", "system", "memory"}
_IDENT = re.compile(r"[a-z_][a-z0-9_]*\Z")


class StoreError(RuntimeError):
    pass


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def domain_schema(domain: Domain) -> str:
    if not _IDENT.match(domain.name) or domain.name in RESERVED_SCHEMAS:
        raise StoreError(f"domain name {domain.name!r} cannot name a DuckDB schema "
                         f"(use lower-case letters, digits, _; not {sorted(RESERVED_SCHEMAS)})")
    return domain.name


def records_ddl(domain: Domain) -> list[str]:
    s = domain_schema(domain)
    cols = ",\n    ".join(f'"{c.name}" {c.sql_type}' + ("" if c.nullable else " NOT NULL") for c in domain.spec.columns)
    return [
        f'CREATE SCHEMA IF NOT EXISTS "{s}"',
        f'CREATE TABLE IF NOT EXISTS "{s}".records (\n    run_id VARCHAR NOT NULL,\n    record_id BIGINT NOT NULL,\n'
        f'    batch BIGINT NOT NULL,\n    {cols},\n    PRIMARY KEY (run_id, record_id)\n)',
        # "Which model produced this record?" — every record with its run's lineage.
        f'CREATE OR REPLACE VIEW "{s}".lineage AS SELECT r.run_id, r.record_id, r.batch, u.model_id, '
        f'u.model_version, u.seed, u.rule_set_hash, u.factory_version, u.started_at, '
        f'r.* EXCLUDE (run_id, record_id, batch) FROM "{s}".records r JOIN main.runs u USING (run_id)',
    ]


class Store:
    """A factory database file (or ":memory:"). Use as a context manager."""

    def __init__(self, path: str | Path = "factory.duckdb", read_only: bool = False):
        self.path = str(path)
        self.read_only = read_only
        in_memory = self.path == ":memory:"
        if not in_memory:
            p = Path(self.path)
            if p.is_dir():
                raise StoreError(f"--db {p} is a directory, not a database file")
            if read_only and not p.exists():
                raise StoreError(f"no database at {p}")
            if not p.parent.is_dir():
                raise StoreError(f"cannot create database {p}: directory {p.parent} does not exist")
        # Read-only sessions (`factory sql`) also get no file-system access: a query can
        # read the store, but not COPY it elsewhere, ATTACH another file or read local files.
        config = {"enable_external_access": False} if read_only else {}
        try:
            self.con = duckdb.connect(self.path, read_only=read_only, config=config)
        except duckdb.Error as e:
            raise StoreError(f"cannot open {self.path} as a DuckDB database: {_first_line(e)}") from None
        try:
            self._check_or_init()
        except BaseException:
            self.con.close()
            raise

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.con.close()

    # ---- schema ------------------------------------------------------------------------------
    def _tables(self) -> set[tuple[str, str]]:
        rows = self.con.execute(
            "SELECT table_schema, table_name FROM information_schema.tables WHERE table_catalog = current_database()"
        ).fetchall()
        return {(s, t) for s, t in rows}

    def _check_or_init(self) -> None:
        tables = self._tables()
        if ("main", "meta") in tables:
            rows = self.con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
            version = rows[0][0] if rows else None
            if version != SCHEMA_VERSION:
                raise StoreError(f"{self.path} has factory schema version {version}, this factory needs "
                                 f"{SCHEMA_VERSION}; use a new --db file")
            return
        if tables:
            raise StoreError(f"{self.path} is a DuckDB database but not a factory store (no meta table)")
        if self.read_only:
            raise StoreError(f"{self.path} is empty, not a factory store; run `factory generate` first")
        self.con.begin()
        self.con.execute(DDL_PATH.read_text())
        self.con.execute("INSERT INTO meta VALUES ('schema_version', ?), ('created_by', ?)",
                         [SCHEMA_VERSION, f"factory {__version__}"])
        self.con.commit()

    def ensure_domain(self, domain: Domain) -> None:
        """Create `<domain>.records`, or check that an existing one matches the spec."""
        s = domain_schema(domain)
        if (s, "records") in self._tables():
            have = self.con.execute(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = ? AND table_name = 'records' ORDER BY ordinal_position", [s]).fetchall()
            want = [("run_id", "VARCHAR"), ("record_id", "BIGINT"), ("batch", "BIGINT")] + [
                (c.name, c.sql_type) for c in domain.spec.columns]
            if [(n, t.upper()) for n, t in have] != want:
                raise StoreError(f"{self.path}: table {s}.records was made for a different {s} column spec; "
                                 f"use a new --db file")
            return
        if self.read_only:
            raise StoreError(f"{self.path} has no records for domain {s!r}")
        self.con.begin()
        for stmt in records_ddl(domain):
            self.con.execute(stmt)
        self.con.commit()

    # ---- runs --------------------------------------------------------------------------------
    def start_run(self, run_id: str, domain: Domain, model_id: str, model_version: str, seed: int,
                  requested_n: int, batch_size: int, settings: dict) -> None:
        self.ensure_domain(domain)
        self.con.execute(
            "INSERT INTO runs (run_id, domain, model_id, model_version, seed, requested_n, batch_size, rule_set_hash, "
            "factory_version, settings, started_at, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'running')",
            [run_id, domain.name, model_id, model_version, seed, requested_n, batch_size, domain.rule_set_hash,
             __version__, json.dumps(settings, sort_keys=True), _now()])

    def write_batch(self, run_id: str, domain: Domain, records: pl.DataFrame, rejections: pl.DataFrame,
                    counters: dict[str, int]) -> None:
        """Records (run_id, record_id, batch + spec columns), rejections and the run's new counters, atomically."""
        s = domain_schema(domain)
        self.con.begin()
        try:
            if records.height:
                self.con.register("_batch_records", records.to_arrow())
                self.con.execute(f'INSERT INTO "{s}".records BY NAME SELECT * FROM _batch_records')
            if rejections.height:
                self.con.register("_batch_rejections", rejections.to_arrow())
                self.con.execute("INSERT INTO rejections BY NAME SELECT * FROM _batch_rejections")
            self.con.execute("UPDATE runs SET attempted = ?, accepted = ?, rejected = ?, surplus = ? WHERE run_id = ?",
                             [counters["attempted"], counters["accepted"], counters["rejected"], counters["surplus"],
                              run_id])
            self.con.commit()
        except BaseException:
            self.con.rollback()
            raise
        finally:
            for view in ("_batch_records", "_batch_rejections"):
                self.con.unregister(view)

    def run_settings(self, run_id: str) -> dict:
        settings = self.run(run_id)["settings"]
        return json.loads(settings) if isinstance(settings, str) else (settings or {})

    def reopen_run(self, run_id: str) -> None:
        self.con.execute("UPDATE runs SET status = 'running', finished_at = NULL WHERE run_id = ?", [run_id])

    def batches_written(self, run_id: str, domain: Domain) -> int:
        """Batches committed so far (every batch leaves records or attempt-level rejections)."""
        s = domain_schema(domain)
        return self.con.execute(
            f"SELECT coalesce(max(b), -1) + 1 FROM (SELECT max(batch) b FROM {s}.records WHERE run_id = ? "
            "UNION ALL SELECT max(batch) FROM rejections WHERE run_id = ? AND attempt_id IS NOT NULL)",
            [run_id, run_id]).fetchone()[0]

    def finish_run(self, run_id: str, status: str) -> None:
        self.con.execute("UPDATE runs SET status = ?, finished_at = ? WHERE run_id = ?", [status, _now(), run_id])

    def write_gate(self, run_id: str, gate: str, checks: list[dict], rejections: list[dict]) -> None:
        """A run's gate outcome, its checks (replacing any earlier ones) and its run-level
        rejections (stage 'distribution', no attempt), atomically.
        `checks`: dicts with the columns of the checks table (check_name, column_names, ...);
        `rejections`: dicts with rule and message."""
        self.con.begin()
        try:
            self.con.execute("DELETE FROM checks WHERE run_id = ?", [run_id])
            self.con.execute("DELETE FROM rejections WHERE run_id = ? AND stage = 'distribution'", [run_id])
            if checks:
                self.con.executemany(
                    "INSERT INTO checks (run_id, check_name, column_names, statistic, threshold, direction, status, "
                    "passed, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [[run_id, c["check_name"], c["column_names"], c["statistic"], c["threshold"], c["direction"],
                      c["status"], c["passed"], c["detail"]] for c in checks])
            if rejections:
                self.con.executemany(
                    "INSERT INTO rejections (run_id, attempt_id, batch, stage, rule, message, raw_text) "
                    "VALUES (?, NULL, NULL, 'distribution', ?, ?, NULL)",
                    [[run_id, r["rule"], r["message"]] for r in rejections])
            self.con.execute("UPDATE runs SET gate = ? WHERE run_id = ?", [gate, run_id])
            self.con.commit()
        except BaseException:
            self.con.rollback()
            raise

    # ---- reads -------------------------------------------------------------------------------
    def frame(self, sql: str, params: list | None = None) -> pl.DataFrame:
        return self.con.sql(sql, params=params or None).pl()

    def run(self, run_id: str) -> dict:
        rows = self.frame("SELECT * FROM runs WHERE run_id = ?", [run_id]).to_dicts()
        if not rows:
            raise StoreError(f"no run {run_id!r} in {self.path}")
        return rows[0]

    def runs(self) -> pl.DataFrame:
        return self.frame("SELECT * FROM runs ORDER BY started_at, run_id")

    def records(self, domain: Domain, run_id: str) -> pl.DataFrame:
        """A run's accepted records in record_id order, spec columns only, with the spec's polars dtypes."""
        s = domain_schema(domain)
        if (s, "records") not in self._tables():
            return domain.spec.empty_frame()
        cols = ", ".join(f'"{n}"' for n in domain.spec.names)
        df = self.frame(f'SELECT {cols} FROM "{s}".records WHERE run_id = ? ORDER BY record_id', [run_id])
        return df.cast(domain.spec.polars_schema(), strict=True)

    def checks(self, run_id: str) -> pl.DataFrame:
        """A run's gate checks: failed first, then by name."""
        return self.frame("SELECT * EXCLUDE (run_id) FROM checks WHERE run_id = ? "
                          "ORDER BY status = 'failed' DESC, status = 'skipped', check_name", [run_id])

    def rejection_counts(self, run_id: str, limit: int | None = None) -> pl.DataFrame:
        """Failing attempts per (stage, rule), most frequent first."""
        sql = ("SELECT stage, rule, any_value(message) AS message, count(*) AS attempts FROM rejections "
               "WHERE run_id = ? GROUP BY stage, rule ORDER BY attempts DESC, stage, rule")
        return self.frame(sql + (f" LIMIT {int(limit)}" if limit else ""), [run_id])

    def query(self, sql: str) -> pl.DataFrame:
        """Run user SQL. Errors (syntax, or a write on a read-only store) become one-line StoreErrors."""
        try:
            result = self.con.sql(sql)
            return pl.DataFrame() if result is None else result.pl()  # None: a statement without a result set
        except duckdb.Error as e:
            raise StoreError(f"SQL error: {_first_line(e)}") from None
