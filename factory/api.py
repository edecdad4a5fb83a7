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

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from factory.checks.gate import GateFailed, GateResult, check_rows
from factory.domain import Domain, available_domains, load_domain
from factory.generators import default_model, load_generator
from factory.loop import LocalEngine, RunResult, run_generation
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

    @property
    def gate(self) -> GateResult | None:
        """The distribution gate's verdict and checks (None when gates were off)."""
        return self.result.gate

    @property
    def records(self) -> pl.DataFrame:
        """The accepted records, in the domain's column order (what an export writes)."""
        return self.store.records(self.domain, self.run_id)

    def export(self, path: str | Path, *, force: bool = False, allow_drift: bool = False) -> Path:
        """Write the records to .parquet or .csv with `<path>.manifest.json` beside them; returns the path."""
        from factory.export import check_target, export_run

        path = check_target(path, force)
        export_run(self.store, self.domain, self.run_id, path, force, allow_drift=allow_drift)
        return path

    def close(self) -> None:
        self.store.close()

    def __repr__(self) -> str:
        gate = self.gate.status if self.gate is not None else "off"
        return (f"Run({self.run_id!r}, accepted={self.result.accepted:,}, attempted={self.result.attempted:,}, "
                f"gate={gate!r})")


def _domain(domain: str | Domain) -> Domain:
    return domain if isinstance(domain, Domain) else load_domain(domain)


def generate(domain: str | Domain, n: int, *, seed: int = 0, model: str | None = None,
             model_dir: str | Path | None = None, db: str | Path | None = None, allow_drift: bool = False,
             batch_size: int | None = None, max_attempts: int | None = None, shards: int = 1,
             engine=None, device: str = "cpu", progress: bool = False, run_id: str | None = None,
             generator=None, generator_options: dict | None = None) -> Run:
    """Generate `n` records of `domain` that pass every rule, and gate them.

    Same seed, model, batch size and shards give the same records as `factory generate` with the same
    flags. `db`: a DuckDB file to record the run in (default: in memory). `engine`: a loop engine
    (default: this process). `generator` / `generator_options`: a ready generator, or options for the
    domain's (e.g. {"latent": "prior"} for DiffLM's N(0, I) ablation). A refused gate raises GateFailed
    (its `.run` is the stored Run, its `.failed` the failed checks) unless `allow_drift`.
    """
    d = _domain(domain)
    path = ":memory:" if db is None else db
    check_db_name(path, d)
    if generator is None:
        generator = load_generator(d, model, model_dir=model_dir, device=device, **(generator_options or {}))
    size = batch_size or int(d.config.get("batch_size", 1000))
    store = Store(path)
    try:
        result = run_generation(d, generator, n, seed, store, size, max_attempts=max_attempts, progress=progress,
                                allow_drift=allow_drift, shards=shards, engine=engine or LocalEngine(),
                                run_id=run_id,
                                settings={"model": model or default_model(d),
                                          "model_dir": str(model_dir) if model_dir else None,
                                          **getattr(generator, "settings", {})})
    except BaseException:
        store.close()
        raise
    run = Run(result.run_id, d, result, store)
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
