"""DuckDB store: runs, rejections and each domain's accepted records.

The static tables are in schemas/ddl.sql. A domain's `records` table is derived
from its TableSpec, so its columns are typed exactly as the spec says. All writes
of a batch (records, rejections, run counters) happen in one transaction: a
crash never leaves half a batch, and the counters always match the tables.

Concurrent readers: DuckDB lets one process write a file, or several read it, never
both at once. A writing Store therefore holds the file only while it touches it: the
generation loop calls `release()` after each batch, so between batches (while the
model generates) `factory sql` and other read-only Stores can open the file. Opening
waits while another process holds a conflicting lock (FACTORY_LOCK_TIMEOUT seconds,
default 120 for writers, 30 for readers) and then fails with a clear StoreError.
"""
from __future__ import annotations

import json
import os
import re
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import polars as pl

from factory import __version__
from factory.domain import Domain

SCHEMA_VERSION = "4"  # 2: checks table, runs.gate, gate_failed status, run-level rejections; 3: shards; 4: stage condition
DDL_PATH = Path(__file__).resolve().parent.parent / "schemas" / "ddl.sql"
RESERVED_SCHEMAS = {"main", "temp", "information_schema", "pg_catalog", "system", "memory"}
_IDENT = re.compile(r"[a-z_][a-z0-9_]*\Z")
WRITER_LOCK_TIMEOUT, READER_LOCK_TIMEOUT = 120.0, 30.0
# The storage format a new database file is written in. DuckDB 2.x writes format 69 by default, which
# the DuckDB CLI users install (duckdb-cli 1.5.x, the current stable) cannot read ("can only read
# versions between 64 and 68"). Files created with this setting open in both (tests/test_duckdb_cli.py).
STORAGE_COMPATIBILITY = "v1.5.0"
# An attempt is identified by (shard, attempt_id); run-level rows (stage 'distribution') have none.
# Use as count(DISTINCT ATTEMPT_KEY) to count attempts, not rejection rows.
ATTEMPT_KEY = "CASE WHEN attempt_id IS NOT NULL THEN (shard, attempt_id) END"


class StoreError(RuntimeError):
    pass


CORRUPT_HINT = "it was not changed; restore it from a backup, or use a new --db file"
HEADER_BYTES = 3 * 4096  # DuckDB's file header and two database headers, before the first block


def _expected_columns() -> dict[str, list[tuple[str, str]]]:
    """The static tables' columns, as schemas/ddl.sql creates them (read from a scratch database)."""
    con = duckdb.connect(":memory:")
    try:
        con.execute(DDL_PATH.read_text())
        rows = con.execute("SELECT table_name, column_name, data_type FROM information_schema.columns "
                           "WHERE table_schema = 'main' ORDER BY table_name, ordinal_position").fetchall()
    finally:
        con.close()
    out: dict[str, list[tuple[str, str]]] = {}
    for t, c, ty in rows:
        out.setdefault(t, []).append((c, ty))
    return out


def is_interrupt(e: BaseException) -> bool:
    """Whether `e` is Ctrl-C. DuckDB stops a query on SIGINT itself and raises RuntimeError('Query
    interrupted') (older releases: duckdb.InterruptException); it consumes the signal, so Python never
    raises the KeyboardInterrupt."""
    return (isinstance(e, (KeyboardInterrupt, duckdb.InterruptException))
            or (type(e) is RuntimeError and str(e) == "Query interrupted"))


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def domain_schema(domain: Domain) -> str:
    if not _IDENT.match(domain.name) or domain.name in RESERVED_SCHEMAS:
        raise StoreError(f"domain name {domain.name!r} cannot name a DuckDB schema "
                         f"(use lower-case letters, digits, _; not {sorted(RESERVED_SCHEMAS)})")
    return domain.name


def check_db_name(path: str | Path, domain: Domain) -> None:
    """DuckDB names a database after its file: `toy.duckdb` is catalog "toy", which makes the
    domain schema's `toy.records` ambiguous. Refuse such a name before anything is written."""
    if str(path) != ":memory:" and Path(path).stem == domain.name:
        raise StoreError(f"--db {path}: a database file named after the domain makes `{domain.name}.records` "
                         f"ambiguous in DuckDB; use another name, e.g. factory.duckdb")


def records_ddl(domain: Domain) -> list[str]:
    s = domain_schema(domain)
    cols = ",\n    ".join(f'"{c.name}" {c.sql_type}' + ("" if c.nullable else " NOT NULL") for c in domain.spec.columns)
    return [
        f'CREATE SCHEMA IF NOT EXISTS "{s}"',
        f'CREATE TABLE IF NOT EXISTS "{s}".records (\n    run_id VARCHAR NOT NULL,\n    shard BIGINT NOT NULL,\n'
        f'    record_id BIGINT NOT NULL,\n    batch BIGINT NOT NULL,\n    {cols},\n'
        f'    PRIMARY KEY (run_id, shard, record_id)\n)',
        # "Which model produced this record?" — every record with its run's lineage.
        f'CREATE OR REPLACE VIEW "{s}".lineage AS SELECT r.run_id, r.shard, r.record_id, r.batch, '
        f'u.model_id, u.model_version, u.seed, u.rule_set_hash, u.factory_version, u.started_at, '
        f'r.* EXCLUDE (run_id, shard, record_id, batch) FROM "{s}".records r JOIN main.runs u USING (run_id)',
    ]


class Store:
    """A factory database file (or ":memory:"). Use as a context manager."""

    def __init__(self, path: str | Path = "factory.duckdb", read_only: bool = False,
                 lock_timeout: float | None = None):
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
        self._config = {"enable_external_access": False} if read_only else {
            "storage_compatibility_version": STORAGE_COMPATIBILITY}
        default = READER_LOCK_TIMEOUT if read_only else WRITER_LOCK_TIMEOUT
        if lock_timeout is None:
            try:
                lock_timeout = float(os.environ.get("FACTORY_LOCK_TIMEOUT", default))
            except ValueError:
                raise StoreError(f"FACTORY_LOCK_TIMEOUT must be a number of seconds, got "
                                 f"{os.environ['FACTORY_LOCK_TIMEOUT']!r}") from None
        self.lock_timeout = lock_timeout
        self._con: duckdb.DuckDBPyConnection | None = None
        self._verified = False
        try:
            if not read_only and not in_memory and Path(self.path).exists() and Path(self.path).stat().st_size:
                self._verify_before_writing()
            self._check_or_init()
        except BaseException:
            self.close()
            raise

    def _connect(self) -> duckdb.DuckDBPyConnection:
        deadline = time.monotonic() + self.lock_timeout
        wait = 0.02
        while True:
            try:
                return duckdb.connect(self.path, read_only=self.read_only, config=self._config)
            except duckdb.Error as e:
                locked = isinstance(e, duckdb.IOException) and "conflicting lock" in str(e).lower()
                if not locked:
                    if "corrupt" in str(e).lower() or "could not read enough bytes" in str(e).lower():
                        raise self._corrupt(_first_line(e)) from None
                    raise StoreError(f"cannot open {self.path} as a DuckDB database: {_first_line(e)}") from None
                if time.monotonic() >= deadline:
                    raise StoreError(f"cannot open {self.path}: another process holds it ({_first_line(e)}); waited "
                                     f"{self.lock_timeout:g} s: close long-lived sessions on the file, or set "
                                     "FACTORY_LOCK_TIMEOUT") from None
            time.sleep(min(wait, max(0.0, deadline - time.monotonic())))
            wait = min(wait * 2, 0.5)

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        """The open connection; (re)opened on first use after `release()`."""
        if self._con is None:
            self._con = self._connect()
        return self._con

    def release(self) -> None:
        """Close the file so other processes can open it; the next use reopens it.
        A no-op for ":memory:" (closing would lose the database)."""
        if self.path != ":memory:":
            self.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    @contextmanager
    def _transaction(self, on_disk_error: str = ""):
        """One transaction: committed if the block ends normally, rolled back otherwise. A write
        the disk refuses (full, I/O error; the commit fails) becomes a StoreError naming the
        file, followed by `on_disk_error` (what to do next)."""
        self.con.begin()
        try:
            yield self.con
            self.con.commit()
        except (duckdb.IOException, duckdb.TransactionException) as e:
            self._rollback_quietly()
            raise StoreError(f"cannot write to {self.path}: {_first_line(e)}{on_disk_error}") from None
        except BaseException:
            self._rollback_quietly()
            raise

    def _rollback_quietly(self) -> None:
        """Roll back the open transaction, if DuckDB still has one (a failed commit ends it)."""
        try:
            self.con.rollback()
        except duckdb.Error:
            pass

    # ---- schema ------------------------------------------------------------------------------
    def _tables(self) -> set[tuple[str, str]]:
        rows = self.con.execute(
            "SELECT table_schema, table_name FROM information_schema.tables WHERE table_catalog = current_database()"
        ).fetchall()
        return {(s, t) for s, t in rows}

    def _verify_before_writing(self) -> None:
        """A writer checks an existing file through a read-only connection first, so that a
        corrupt file is never opened for writing (DuckDB may write on open or close)."""
        self.read_only = True
        try:
            self._check_or_init()
        except StoreError as e:
            if "is empty, not a factory store" in str(e):
                return  # an empty DuckDB file: the writer initialises it
            raise
        finally:
            self.close()
            self.read_only = False

    def _corrupt(self, what: str) -> StoreError:
        return StoreError(f"{self.path} is corrupt ({what}); {CORRUPT_HINT}")

    def _check_or_init(self) -> None:
        try:
            tables = self._tables()
            if ("main", "meta") in tables:
                rows = self.con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
                version = rows[0][0] if rows else None
                if version != SCHEMA_VERSION:
                    raise StoreError(f"{self.path} has factory schema version {version}, this factory needs "
                                     f"{SCHEMA_VERSION}; use a new --db file")
                if not self._verified:
                    self.verify(tables, full=True)
                    self._verified = True
                return
        except duckdb.Error as e:
            raise self._corrupt(_first_line(e)) from None
        self._init_schema(tables)

    def verify(self, tables: set[tuple[str, str]] | None = None, full: bool = True) -> None:
        """Refuse a damaged database before anything reads or writes it: a file shorter than
        its used blocks (truncated), the static tables' columns changed or missing, counters
        that disagree (runs vs shards vs stored records), unreadable settings JSON, and with
        `full` a read of every block of every table, so that DuckDB checks each block's
        checksum (a flipped byte) and reads every byte (a truncated file). Done once per Store
        (about 0.1 s per 100,000 finance records). Raises StoreError naming the file and what to do."""
        tables = self._tables() if tables is None else tables
        if self.path != ":memory:":
            size = self.con.execute("PRAGMA database_size").fetchone()
            block_size, used_blocks = int(size[2]), int(size[4])
            have = os.path.getsize(self.path)
            if have < HEADER_BYTES + block_size * used_blocks:  # a lower bound: used blocks may sit anywhere
                raise self._corrupt(f"truncated: {have:,} bytes, its {used_blocks} used blocks need at least "
                                    f"{HEADER_BYTES + block_size * used_blocks:,}")
        for table, columns in _expected_columns().items():
            if ("main", table) not in tables:
                raise self._corrupt(f"table {table} is missing")
            got = self.con.execute("SELECT column_name, data_type FROM information_schema.columns WHERE "
                                   "table_schema = 'main' AND table_name = ? AND table_catalog = current_database() "
                                   "ORDER BY ordinal_position", [table]).fetchall()
            if [tuple(r) for r in got] != columns:
                raise self._corrupt(f"table {table} does not have the columns schemas/ddl.sql gives it")
        if full:
            base = self.con.execute("SELECT table_schema, table_name FROM information_schema.tables WHERE "
                                    "table_catalog = current_database() AND table_type = 'BASE TABLE'").fetchall()
            for schema, table in sorted(base):
                self.con.execute(f'SELECT sum(hash(COLUMNS(*))) FROM "{schema}"."{table}"').fetchall()
        bad = self.con.execute(
            "SELECT r.run_id FROM runs r LEFT JOIN (SELECT run_id, sum(attempted) a, sum(accepted) acc, "
            "sum(rejected) rej, sum(surplus) sur FROM shards GROUP BY run_id) s USING (run_id) "
            "WHERE r.attempted IS DISTINCT FROM s.a OR r.accepted IS DISTINCT FROM s.acc "
            "OR r.rejected IS DISTINCT FROM s.rej OR r.surplus IS DISTINCT FROM s.sur "
            "OR r.attempted != r.accepted + r.rejected OR r.accepted > r.requested_n LIMIT 1").fetchall()
        if bad:
            raise self._corrupt(f"run {bad[0][0]}: its counters disagree with its shards")
        for schema, table in sorted(tables):
            if table != "records" or schema == "main":
                continue
            bad = self.con.execute(
                f'SELECT r.run_id FROM runs r LEFT JOIN (SELECT run_id, count(*) n FROM "{schema}".records '
                f"GROUP BY run_id) c USING (run_id) WHERE r.domain = ? AND r.accepted != coalesce(c.n, 0) LIMIT 1",
                [schema]).fetchall()
            if bad:
                raise self._corrupt(f"run {bad[0][0]}: runs.accepted differs from the records stored in "
                                    f"{schema}.records")
        for run_id, settings in self.con.execute("SELECT run_id, settings FROM runs").fetchall():
            try:
                if settings is not None and not isinstance(json.loads(settings), dict):
                    raise ValueError("not an object")
            except ValueError:
                raise self._corrupt(f"run {run_id}: its settings are not a JSON object") from None

    def _init_schema(self, tables: set[tuple[str, str]]) -> None:
        if tables:
            raise StoreError(f"{self.path} is a DuckDB database but not a factory store (no meta table)")
        if self.read_only:
            raise StoreError(f"{self.path} is empty, not a factory store; run `factory generate` first")
        with self._transaction() as con:
            con.execute(DDL_PATH.read_text())
            con.execute("INSERT INTO meta VALUES ('schema_version', ?), ('created_by', ?)",
                        [SCHEMA_VERSION, f"factory {__version__}"])

    def ensure_domain(self, domain: Domain) -> None:
        """Create `<domain>.records`, or check that an existing one matches the spec."""
        check_db_name(self.path, domain)
        s = domain_schema(domain)
        if (s, "records") in self._tables():
            have = self.con.execute(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = ? AND table_name = 'records' ORDER BY ordinal_position", [s]).fetchall()
            want = [("run_id", "VARCHAR"), ("shard", "BIGINT"), ("record_id", "BIGINT"), ("batch", "BIGINT")] + [
                (c.name, c.sql_type) for c in domain.spec.columns]
            if [(n, t.upper()) for n, t in have] != want:
                raise StoreError(f"{self.path}: table {s}.records was made for a different {s} column spec; "
                                 f"use a new --db file")
            return
        if self.read_only:
            raise StoreError(f"{self.path} has no records for domain {s!r}")
        with self._transaction() as con:
            for stmt in records_ddl(domain):
                con.execute(stmt)

    # ---- runs --------------------------------------------------------------------------------
    def start_run(self, run_id: str, domain: Domain, model_id: str, model_version: str, seed: int,
                  requested_n: int, batch_size: int, settings: dict, shard_sizes: list[int] | None = None) -> None:
        """A new run with status 'running' and its shards (one of requested_n unless `shard_sizes`)."""
        shard_sizes = shard_sizes or [requested_n]
        if sum(shard_sizes) != requested_n:
            raise ValueError(f"shard sizes {shard_sizes} do not add up to n={requested_n}")
        self.ensure_domain(domain)
        with self._transaction() as con:
            con.execute(
                "INSERT INTO runs (run_id, domain, model_id, model_version, seed, requested_n, batch_size, "
                "rule_set_hash, factory_version, settings, started_at, status) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'running')",
                [run_id, domain.name, model_id, model_version, seed, requested_n, batch_size, domain.rule_set_hash,
                 __version__, json.dumps(settings, sort_keys=True), _now()])
            con.executemany("INSERT INTO shards (run_id, shard, requested_n, status) VALUES (?, ?, ?, 'pending')",
                            [[run_id, i, k] for i, k in enumerate(shard_sizes)])

    def write_batch(self, run_id: str, domain: Domain, records: pl.DataFrame, rejections: pl.DataFrame,
                    shard: int, counters: dict[str, int], done: bool = False, worker: str = "local") -> None:
        """Records (run_id, shard, record_id, batch + spec columns), rejections, and the shard's
        new counters (attempted, accepted, rejected, surplus, batches), atomically; the run's
        counters become the sums over its shards. `done`: the shard has all its records.

        Idempotent per shard: writing to a shard that is already done is refused (returns
        without writing), so a shard delivered twice (a retried Ray task) is stored once."""
        s = domain_schema(domain)
        resume = (f"; every earlier batch is stored: make room, then continue with "
                  f"`factory generate --resume {run_id} --db {self.path}`")
        try:
            with self._transaction(resume) as con:
                rows = con.execute("SELECT status FROM shards WHERE run_id = ? AND shard = ?",
                                   [run_id, shard]).fetchall()
                if not rows:
                    raise StoreError(f"run {run_id} has no shard {shard}")
                if rows[0][0] == "done":
                    return  # nothing written: the transaction commits empty
                if records.height:
                    con.register("_batch_records", records.to_arrow())
                    con.execute(f'INSERT INTO "{s}".records BY NAME SELECT * FROM _batch_records')
                if rejections.height:
                    con.register("_batch_rejections", rejections.to_arrow())
                    con.execute("INSERT INTO rejections BY NAME SELECT * FROM _batch_rejections")
                con.execute(
                    "UPDATE shards SET attempted = ?, accepted = ?, rejected = ?, surplus = ?, batches = ?, "
                    "status = ?, worker = ?, finished_at = ? WHERE run_id = ? AND shard = ?",
                    [counters["attempted"], counters["accepted"], counters["rejected"], counters["surplus"],
                     counters["batches"], "done" if done else "running", worker, _now() if done else None, run_id,
                     shard])
                con.execute(
                    "UPDATE runs SET attempted = t.a, accepted = t.acc, rejected = t.r, surplus = t.s FROM ("
                    "SELECT sum(attempted) a, sum(accepted) acc, sum(rejected) r, sum(surplus) s FROM shards "
                    "WHERE run_id = ?) t WHERE run_id = ?", [run_id, run_id])
        finally:
            for view in ("_batch_records", "_batch_rejections"):
                self.con.unregister(view)

    def shards(self, run_id: str) -> list[dict]:
        """The run's shards in order, with their counters and status."""
        return self.frame("SELECT * EXCLUDE (run_id) FROM shards WHERE run_id = ? ORDER BY shard", [run_id]).to_dicts()

    def run_settings(self, run_id: str) -> dict:
        settings = self.run(run_id)["settings"]
        return json.loads(settings) if isinstance(settings, str) else (settings or {})

    def reopen_run(self, run_id: str) -> None:
        self.con.execute("UPDATE runs SET status = 'running', finished_at = NULL WHERE run_id = ?", [run_id])

    def finish_run(self, run_id: str, status: str) -> None:
        self.con.execute("UPDATE runs SET status = ?, finished_at = ? WHERE run_id = ?", [status, _now(), run_id])

    def write_gate(self, run_id: str, gate: str, checks: list[dict], rejections: list[dict]) -> None:
        """A run's gate outcome, its checks (replacing any earlier ones) and its run-level
        rejections (stage 'distribution', no attempt), atomically.
        `checks`: dicts with the columns of the checks table (check_name, column_names, ...);
        `rejections`: dicts with rule and message."""
        with self._transaction() as con:
            con.execute("DELETE FROM checks WHERE run_id = ?", [run_id])
            con.execute("DELETE FROM rejections WHERE run_id = ? AND stage = 'distribution'", [run_id])
            if checks:
                con.executemany(
                    "INSERT INTO checks (run_id, check_name, column_names, statistic, threshold, direction, status, "
                    "passed, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [[run_id, c["check_name"], c["column_names"], c["statistic"], c["threshold"], c["direction"],
                      c["status"], c["passed"], c["detail"]] for c in checks])
            if rejections:
                con.executemany(
                    "INSERT INTO rejections (run_id, attempt_id, batch, stage, rule, message, raw_text) "
                    "VALUES (?, NULL, NULL, 'distribution', ?, ?, NULL)",
                    [[run_id, r["rule"], r["message"]] for r in rejections])
            con.execute("UPDATE runs SET gate = ? WHERE run_id = ?", [gate, run_id])

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

    def records(self, domain: Domain, run_id: str, decimal: bool = False, lineage: bool = False) -> pl.DataFrame:
        """A run's accepted records in (shard, record_id) order, spec columns only, with the spec's polars dtypes.

        `decimal`: numeric columns with decimals stay exact decimals (polars Decimal(18, d), as stored)
        instead of Float64. `lineage`: run_id, shard and record_id come first."""
        s = domain_schema(domain)
        schema = domain.spec.polars_schema()
        if decimal:
            schema = {n: pl.Decimal(18, c.decimals) if getattr(c, "decimals", 0) else schema[n]
                      for n, c in ((n, domain.spec[n]) for n in schema)}
        keys = {"run_id": pl.String, "shard": pl.Int64, "record_id": pl.Int64} if lineage else {}
        if (s, "records") not in self._tables():
            return pl.DataFrame(schema=keys | schema)
        cols = ", ".join(f'"{n}"' for n in [*keys, *domain.spec.names])
        df = self.frame(f'SELECT {cols} FROM "{s}".records WHERE run_id = ? ORDER BY shard, record_id', [run_id])
        return df.cast(keys | schema, strict=True)

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
