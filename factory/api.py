"""The library entry point: what the CLI and the benchmarks call, and what a notebook user imports.

    import factory
    run = factory.generate("finance", 1000, seed=0)   # raises factory.GateFailed if the gate refuses
    run.records                                       # a polars DataFrame of the accepted records
    run.export("loans.parquet")                       # + loans.parquet.manifest.json
    factory.validate("finance", frame)                # which rows break which rule
    factory.domains()                                 # the domains this installation finds

`generate` runs the same loop as `factory generate`: every record passes every rule, copies of
training rows are rejected, the batch goes through the distribution gate, and everything is
recorded in a DuckDB store (`db`; default: an in-memory one that lives as long as the `Run`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from factory.checks.gate import GateFailed, GateResult, check_rows
from factory.domain import Domain, available_domains, load_domain
from factory.generators import default_model, load_generator
from factory.loop import LocalEngine, RunResult, new_run_id, run_generation
from factory.rules import Validation
from factory.store import Store, check_db_name

__all__ = ["Run", "GateFailed", "generate", "validate", "domains"]


@dataclass
class Run:
    """A finished run: its id, counters and gate, with its records read from its store."""

    run_id: str
    domain: Domain
    result: RunResult
    store: Store
    generator: object = field(default=None, repr=False)  # what made the records (model id, version)

    @property
    def gate(self) -> GateResult | None:
        """The distribution gate's verdict and checks (None when gates were off)."""
        return self.result.gate

    @property
    def records(self) -> pl.DataFrame:
        """The accepted records, in the domain's column order (what an export writes)."""
        return self.store.records(self.domain, self.run_id)

    def export(self, path: str | Path, *, force: bool = False, allow_drift: bool = False, money: str = "decimal",
               lineage: bool = False) -> Path:
        """Write the records to .parquet or .csv with `<path>.manifest.json` beside them; returns the path.
        `money`: "decimal" (exact, as stored) or "float"; `lineage`: run_id, shard, record_id first."""
        from factory.export import check_target, export_run

        path = check_target(path, force)
        export_run(self.store, self.domain, self.run_id, path, force, allow_drift=allow_drift, money=money,
                   lineage=lineage)
        return path

    def close(self) -> None:
        self.store.close()

    def __repr__(self) -> str:
        gate = self.gate.status if self.gate is not None else "off"
        return (f"Run({self.run_id!r}, accepted={self.result.accepted:,}, attempted={self.result.attempted:,}, "
                f"gate={gate!r})")


def _domain(domain: str | Domain) -> Domain:
    return domain if isinstance(domain, Domain) else load_domain(domain)


LOCAL_SHARDS, LOCAL_SHARDS_FROM = 8, 10_000


def default_workers() -> int:
    """Local worker processes by default: both cores of a 2-core machine, never more than the CPUs."""
    return max(1, min(2, os.cpu_count() or 1))


def default_shards(n: int, engine: str = "local", workers: int | None = None) -> int:
    """Shards of a run. Local: 8 from 10,000 records (enough to keep up to 8 workers busy), else 1;
    Ray: 4 per worker. The shard count, not the worker count, enters the seeds: locally 1, 2 or 8
    workers give the same records."""
    if engine == "ray":
        return min(n, 4 * (workers or 2))
    return min(n, LOCAL_SHARDS) if n >= LOCAL_SHARDS_FROM else 1


def make_engine(name: str, d: Domain, model, model_dir, address=None, workers: int | None = None,
                device: str = "cpu", shards: int | None = None, opts: dict | None = None):
    """The loop engine: `local` (this process, or `workers` worker processes) or `ray`."""
    from factory.ray_engine import GeneratorSpec, RayEngine

    spec = GeneratorSpec(d.name, model, str(Path(model_dir).resolve()) if model_dir else None,
                         {"device": device, **(opts or {})})
    if name == "local":
        engine = LocalEngine(workers or default_workers(), spec)
        return engine.start() if shards is None or shards > 1 else engine  # workers load while this process does
    return RayEngine(spec, address=address, workers=workers or 2)


def load_engine(name: str, d: Domain, model, model_dir, address=None, workers: int | None = None,
                device: str = "cpu", shards: int | None = None, opts: dict | None = None):
    """The loop engine and the generator the run records. With local worker processes the
    generator is the one a worker loaded (factory.pool.WorkerGenerator): this process keeps no
    second copy of the model while the workers decode."""
    engine = make_engine(name, d, model, model_dir, address, workers, device, shards, opts)
    pool = getattr(engine, "pool", None)
    if pool is None:
        return engine, load_generator(d, model, model_dir=model_dir, device=device, **(opts or {}))
    try:
        return engine, pool.generator()
    except BaseException:
        pool.shutdown()
        raise


def generate(domain: str | Domain, n: int, *, seed: int = 0, where: str | None = None,
             rebalance: str | None = None, model: str | None = None, model_dir: str | Path | None = None,
             db: str | Path | None = None, allow_drift: bool = False, batch_size: int | None = None,
             max_attempts: int | None = None, shards: int | None = None, engine: str = "local",
             workers: int | None = None, address: str | None = None, device: str = "cpu",
             precision: str = "auto", progress: bool = False, run_id: str | None = None,
             generator=None, generator_options: dict | None = None, on_start=None) -> Run:
    """Generate `n` records of `domain` that pass every rule (and `where`, if given), and gate them.

    The CLI's `factory generate` calls this: the same seed and options give the same records.
    `db`: a DuckDB file to record the run in (default: in memory). `where`: a SQL condition over the
    exported columns; `rebalance`: `COL` or `COL:value=share,...` (see README, Conditional
    generation). `engine`: local (default; `workers` processes, default min(2, CPUs)) or ray.
    `shards` (default: see `default_shards`) enter the seeds; workers do not. `generator` /
    `generator_options`: a ready generator, or options for the domain's (e.g. {"latent": "prior"}).
    A refused gate raises GateFailed (its `.run` is the stored Run, its `.failed` the failed checks)
    unless `allow_drift`. `on_start(run_id)`: called once the model is loaded, before the first batch.
    """
    d = _domain(domain)
    path = ":memory:" if db is None else db
    check_db_name(path, d)
    if shards is None:
        shards = 1 if rebalance is not None else default_shards(n, engine, workers)
    opts = dict(generator_options or {})
    if precision != "auto":
        opts["precision"] = precision
    if generator is None:
        loop_engine, generator = load_engine(engine, d, model, model_dir, address, workers, device, shards, opts)
    else:  # a generator object cannot be rebuilt in worker processes: this process runs every shard
        loop_engine = LocalEngine()
    size = batch_size or int(d.config.get("batch_size", 1000))
    run_id = run_id or new_run_id(d)
    store = Store(path)
    try:
        if on_start is not None:
            on_start(run_id)
        result = run_generation(d, generator, n, seed, store, size, max_attempts=max_attempts, progress=progress,
                                allow_drift=allow_drift, shards=shards, engine=loop_engine, run_id=run_id,
                                where=where, rebalance=rebalance,
                                settings={"model": model or default_model(d),
                                          "model_dir": str(model_dir) if model_dir else None,
                                          **getattr(generator, "settings", {})})
    except BaseException:
        store.close()
        raise
    run = Run(result.run_id, d, result, store, generator)
    if result.gate is not None and result.gate.blocks_export:
        error = GateFailed(result.run_id, check_rows(result.gate.failed))
        error.run = run
        raise error
    return run


def validate(domain: str | Domain, frame: pl.DataFrame) -> Validation:
    """Check a frame of records against the domain's schema and every rule.

    Returns the validation: `.valid` (a boolean Series, one per row), `.n_valid`, and `.failures`
    (row, stage, rule, message: one row per broken rule)."""
    return _domain(domain).validator.validate(frame)


def domains() -> list[str]:
    """The names of the domains found: built in, under ./domains, and on FACTORY_DOMAINS_PATH."""
    return sorted(available_domains())
