"""The generation loop: generate -> parse -> complete -> validate -> store, batch by batch.

Accounting, per run:
- a run is split into shards (one unless `shards=K`; shard s gets n // K records, the
  first n % K shards one more); each shard runs its own batches with its own seeds;
- every generated text gets an attempt id (its index within its shard);
- a text is *accepted* (a row of `<domain>.records`, key (run_id, shard, record_id), with
  record_id = attempt id) or *rejected* (one `rejections` row per failing rule), so
  attempted = accepted + rejected, per shard and per run;
- a record that passes every rule but copies (or nearly copies) a training row is
  rejected too, with stage 'privacy' (factory/checks/privacy.py), so the loop tops up;
- valid texts that arrive after the shard's last acceptance (in its last batch) are
  *surplus*: counted, not stored, and not attempts.

Seeds: batch b of a one-shard run uses SeedSequence(seed, spawn_key=(b,)); batch b of
shard s of a K-shard run (K > 1) uses SeedSequence(seed, spawn_key=(s, b)). Batch sizes
depend only on the shard's acceptance so far, so a run is deterministic for (seed,
generator, batch_size, shards), whichever engine runs the shards and in whatever order.

Engines run the shards: `LocalEngine` (here) one after another in this process, storing
every batch as it goes, or with `workers` > 1 on that many local worker processes
(factory.pool); `factory.ray_engine.RayEngine` on a Ray cluster. Both of the latter store
each finished shard in one transaction.

After all shards, the distribution gate (factory/checks/gate.py) compares the accepted
records with the train split; a failed gate leaves the run with status 'gate_failed'
unless `allow_drift`.
"""
from __future__ import annotations

import math
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from datetime import datetime, timezone
from typing import Callable, Protocol

import numpy as np
import polars as pl

from factory.checks.gate import GateResult, run_gate
from factory.checks.privacy import PrivacyFilter
from factory.conditions import Condition, gate_reference, parse_condition, rebalance_plan
from factory.domain import Domain
from factory.generators import Generator
from factory.progress import RunProgress
from factory.store import Store, is_interrupt

REJECTION_SCHEMA = {"run_id": pl.String, "shard": pl.Int64, "attempt_id": pl.Int64, "batch": pl.Int64,
                    "stage": pl.String, "rule": pl.String, "message": pl.String, "raw_text": pl.String}
END_MARGIN = 1.2  # near the end, ask for 20% more texts than the acceptance rate predicts we need
class AttemptBudgetExceeded(RuntimeError):
    pass


class ResumeError(ValueError):
    pass


@dataclass
class RunResult:
    run_id: str
    requested: int
    accepted: int
    attempted: int
    rejected: int
    surplus: int
    batches: int
    seconds: float
    top_rejections: list[tuple[str, str, int]] = field(default_factory=list)  # (stage, rule, attempts)
    gate: GateResult | None = None  # None when gates are off
    shards: int = 1

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.attempted if self.attempted else 0.0


@dataclass
class ShardState:
    """Where one shard stands: its target and counters (all that is needed to continue it)."""
    shard: int
    n: int
    accepted: int = 0
    rejected: int = 0
    surplus: int = 0
    batches: int = 0

    @property
    def attempted(self) -> int:
        return self.accepted + self.rejected

    @property
    def generated(self) -> int:
        return self.attempted + self.surplus

    def counters(self) -> dict[str, int]:
        return {"attempted": self.attempted, "accepted": self.accepted, "rejected": self.rejected,
                "surplus": self.surplus, "batches": self.batches}

    @classmethod
    def from_row(cls, row: dict) -> ShardState:
        return cls(row["shard"], row["requested_n"], row["accepted"], row["rejected"], row["surplus"], row["batches"])


@dataclass(frozen=True)
class RunPlan:
    """What every shard of a run shares; engines pass it to whoever generates a shard."""
    run_id: str
    seed: int
    n: int
    n_shards: int
    batch_size: int
    max_attempts: int
    gates: bool
    conditions: tuple = ()  # per shard: the SQL condition its records must meet, or None (--where/--rebalance)

    def condition(self, domain: Domain, shard: int) -> Condition | None:
        sql = self.conditions[shard] if self.conditions else None
        return parse_condition(domain, sql) if sql else None

    def shard_budget(self, shard_n: int) -> int:
        """A shard's share of the run's attempt budget."""
        return max(1, math.ceil(self.max_attempts * shard_n / self.n))


# a batch is done: (records, rejections, shard state after it, shard done?)
BatchSink = Callable[[pl.DataFrame, pl.DataFrame, ShardState, bool], None]


def default_max_attempts(n: int) -> int:
    # Give up below ~1% acceptance (the marginal baseline on finance sits near 2%).
    return 100 * n + 10_000


def batch_seed(seed: int, batch: int, shard: int | None = None) -> int:
    """Independent, reproducible seed for batch `batch` (of shard `shard` in a multi-shard run)."""
    key = (batch,) if shard is None else (shard, batch)
    return int(np.random.SeedSequence(seed, spawn_key=key).generate_state(1, np.uint64)[0] >> 1)


def shard_sizes(n: int, shards: int) -> list[int]:
    if shards <= 0 or shards > n:
        raise ValueError(f"shards must be between 1 and n={n}, got {shards}")
    return [n // shards + (1 if s < n % shards else 0) for s in range(shards)]


def next_batch_size(batch_size: int, remaining: int, valid: int, generated: int) -> int:
    if generated == 0:  # acceptance unknown: no more than could all be needed
        return min(batch_size, remaining)
    if valid == 0:
        return batch_size
    rate = valid / generated
    return max(1, min(batch_size, math.ceil(remaining / rate * END_MARGIN)))


def new_run_id(domain: Domain) -> str:
    return f"{domain.name}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


def generate_shard(domain: Domain, generator: Generator, plan: RunPlan, state: ShardState,
                   privacy: PrivacyFilter | None, sink: BatchSink) -> bool:
    """Generate batches for one shard until it has `state.n` records, handing each batch to
    `sink` (which stores it). Updates `state`. Returns False if the shard's attempt budget ran
    out first. Pure in (plan, state): the same inputs give the same batches anywhere."""
    gen_cols = domain.spec.generated_names
    budget = plan.shard_budget(state.n)
    shard_key = None if plan.n_shards == 1 else state.shard
    while state.accepted < state.n:
        if state.generated >= budget:
            return False
        k = min(next_batch_size(plan.batch_size, state.n - state.accepted, state.accepted + state.surplus,
                                state.generated), budget - state.generated)
        seed = batch_seed(plan.seed, state.batches, shard_key)
        condition = plan.condition(domain, state.shard)
        if condition is not None and getattr(generator, "conditional", False):
            texts = generator.generate(k, seed, condition=condition)
        else:  # unconditioned, or a generator that cannot condition: the judge's last check filters
            texts = generator.generate(k, seed)
        if len(texts) != k:
            raise RuntimeError(f"generator {generator.model_id} returned {len(texts)} texts, asked for {k}")
        records, rejections, n_valid, n_taken = _judge(domain, gen_cols, texts, plan.run_id, state.shard,
                                                       state.batches, state.generated, state.n - state.accepted,
                                                       privacy, condition)
        state.accepted += n_taken
        state.rejected += rejections["attempt_id"].n_unique() if rejections.height else 0
        state.surplus += n_valid - n_taken
        state.batches += 1
        sink(records, rejections, state, state.accepted >= state.n)
    return True


class Engine(Protocol):
    name: str

    def settings(self) -> dict:
        """What the run records about the engine (runs.settings)."""
        ...

    def run(self, domain: Domain, generator: Generator, store: Store, plan: RunPlan, todo: list[ShardState],
            on_progress: Callable[[], None]) -> None:
        """Bring every shard in `todo` to its n, storing its batches in `store`; call
        `on_progress()` after each store write (an engine whose workers report batches before their
        shard is stored may also call `on_progress((accepted, attempted), stored_changed=False)`
        with the not-yet-stored counts). Raise AttemptBudgetExceeded if a shard cannot."""
        ...


def store_batch(store: Store, domain: Domain, plan: RunPlan, records: pl.DataFrame, rejections: pl.DataFrame,
                state: ShardState, done: bool, on_progress: Callable[[], None], worker: str = "local") -> None:
    """Store a batch (or a whole finished shard) with the shard's counters in one transaction,
    report progress, then let go of the database file so that readers can open it while the
    next batch is generated. Every engine stores through here."""
    store.write_batch(plan.run_id, domain, records, rejections, state.shard, state.counters(), done, worker)
    on_progress()
    store.release()


class LocalEngine:
    """Shards on this machine. One worker (or one shard to do): one after another in this process;
    every batch is stored as soon as it is judged, and the database file is released between
    batches so that readers can open it. `workers` > 1: that many single-threaded worker
    processes (factory.pool; `spec` says how they load the generator) each generate whole shards,
    and this process stores each finished shard in one transaction, as with Ray."""
    name = "local"

    def __init__(self, workers: int = 1, spec=None):
        if workers <= 0:
            raise ValueError(f"workers must be positive, got {workers}")
        if workers > 1 and spec is None:
            raise ValueError("workers > 1 needs a GeneratorSpec to rebuild the generator in each worker")
        self.workers, self.spec, self.pool = workers, spec, None

    def settings(self) -> dict:
        return {"engine": self.name, "workers": self.workers}

    def start(self) -> "LocalEngine":
        """Start the worker processes now (they load the model while the caller does)."""
        if self.workers > 1 and self.pool is None:
            from factory.pool import WorkerPool

            self.pool = WorkerPool(self.spec, self.workers).start()
        return self

    def run(self, domain, generator, store, plan, todo, on_progress) -> None:
        store.release()
        if self.workers > 1 and len(todo) > 1:
            from factory.pool import WorkerPool

            pool, self.pool = self.pool or WorkerPool(self.spec, min(self.workers, len(todo))), None
            return pool.run(domain, generator, store, plan, todo, on_progress)
        if self.pool is not None:  # started, but one shard is better done here, batch by batch
            self.pool.shutdown()
            self.pool = None
        privacy = PrivacyFilter.for_domain(domain) if plan.gates else None

        def sink(records, rejections, state, done):
            store_batch(store, domain, plan, records, rejections, state, done, on_progress)

        for state in todo:
            if not generate_shard(domain, generator, plan, state, privacy, sink):
                raise AttemptBudgetExceeded(_budget_message(store, plan, state))


def run_generation(domain: Domain, generator: Generator, n: int, seed: int, store: Store, batch_size: int,
                   max_attempts: int | None = None, progress: bool = True, settings: dict | None = None,
                   run_id: str | None = None, gates: bool = True, allow_drift: bool = False, shards: int = 1,
                   engine: Engine | None = None, where: str | None = None,
                   rebalance: str | None = None) -> RunResult:
    """Generate until exactly n records pass every rule (and the privacy filter); record
    everything in `store`; then run the distribution gate. `gates=False` turns off both
    the privacy filter and the distribution gate (runs.gate stays NULL).

    `where`: a SQL condition every record meets (factory/conditions.py); `rebalance`:
    `COL[:value=share,...]`, one shard per category with its share of n (exact to 1/n).
    Both are checked before anything is stored (ConditionError) and recorded in the run's
    settings, so `resume_generation` reuses them."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    conditions, condition_settings = (), {}
    if rebalance is not None:
        if shards != 1:
            raise ValueError("rebalance makes one shard per category; it does not combine with shards")
        per_category = rebalance_plan(domain, rebalance, n, where)
        conditions, sizes = tuple(sql for sql, _ in per_category), [k for _, k in per_category]
        shards = len(sizes)
    else:
        sizes = shard_sizes(n, shards)
        if where is not None:
            conditions = (parse_condition(domain, where).sql,) * shards
    if conditions:
        condition_settings = {"where": where, "rebalance": rebalance, "shard_conditions": list(conditions),
                              "conditions": [parse_condition(domain, c).settings() for c in dict.fromkeys(conditions)]}
    engine = engine or LocalEngine()
    max_attempts = default_max_attempts(n) if max_attempts is None else max_attempts
    run_id = run_id or new_run_id(domain)
    store.start_run(run_id, domain, generator.model_id, generator.model_version, seed, n, batch_size,
                    {"max_attempts": max_attempts, "gates": gates, "shards": shards, **engine.settings(),
                     **condition_settings, **(settings or {})}, sizes)
    plan = RunPlan(run_id, seed, n, shards, batch_size, max_attempts, gates, conditions)
    return _drive(domain, generator, store, plan, progress, allow_drift, engine)


def resume_generation(domain: Domain, generator: Generator, store: Store, run_id: str, progress: bool = True,
                      allow_drift: bool = False, engine: Engine | None = None) -> RunResult:
    """Continue a run that was interrupted (killed, crashed) to exactly its requested n.

    Every batch (or, with Ray, every finished shard) was committed with its shard's counters
    in one transaction, so the stored counters are exact, and a shard's next batch depends
    only on (seed, shard, batch index) and the acceptance so far, which the counters give
    back. The resumed run therefore stores exactly what an uninterrupted run with the same
    seed would have stored, whichever engine resumes it.
    """
    run = store.run(run_id)
    if run["domain"] != domain.name:
        raise ResumeError(f"run {run_id} is a {run['domain']!r} run, not {domain.name!r}")
    if run["status"] not in ("running", "failed"):
        raise ResumeError(f"run {run_id} has status {run['status']!r}; only an interrupted run can be resumed")
    if (run["model_id"], run["model_version"]) != (generator.model_id, generator.model_version):
        raise ResumeError(f"run {run_id} was made by {run['model_id']} {run['model_version']}, but the model now "
                          f"loaded is {generator.model_id} {generator.model_version}")
    if run["rule_set_hash"] != domain.rule_set_hash:
        raise ResumeError(f"the {domain.name} rules changed since run {run_id} started "
                          f"({run['rule_set_hash']} -> {domain.rule_set_hash})")
    settings = store.run_settings(run_id)
    with RunLock(store, run_id):  # before anything is written: a live run is refused, not raced
        store.reopen_run(run_id)
        plan = RunPlan(run_id, run["seed"], run["requested_n"], settings.get("shards", 1), run["batch_size"],
                       settings["max_attempts"], settings.get("gates", True),
                       tuple(settings.get("shard_conditions", ())))
        return _drive_locked(domain, generator, store, plan, progress, allow_drift, engine or LocalEngine())


class RunLock:
    """Held (an exclusive flock on `.<db>.<run_id>.lock` beside the database) while a process
    generates a run. `--resume` of a run another process still generates is refused instead of
    racing it (a duplicate-key error mid-batch); a killed process releases it with its file
    descriptors, so a crashed run can be resumed at once."""

    def __init__(self, store: Store, run_id: str):
        self.path = None if store.path == ":memory:" else Path(store.path).with_name(
            f".{Path(store.path).name}.{run_id}.lock")
        self.fd = None
        self.run_id = run_id

    def __enter__(self):
        if self.path is None:
            return self
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise ResumeError(f"run {self.run_id} is being generated by another process right now "
                              f"(it holds {self.path}); wait for it to finish, or stop it before resuming") from None
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


def _drive(domain: Domain, generator: Generator, store: Store, plan: RunPlan, progress: bool, allow_drift: bool,
           engine: Engine) -> RunResult:
    with RunLock(store, plan.run_id):
        return _drive_locked(domain, generator, store, plan, progress, allow_drift, engine)


def _drive_locked(domain: Domain, generator: Generator, store: Store, plan: RunPlan, progress: bool,
                  allow_drift: bool, engine: Engine) -> RunResult:
    todo = [ShardState.from_row(r) for r in store.shards(plan.run_id) if r["status"] != "done"]
    gate = None
    started = time.perf_counter()
    try:
        run = store.run(plan.run_id)
        stored = [run["accepted"], run["attempted"]]
        with RunProgress(plan.n, run["accepted"], run["attempted"], enabled=progress) as bar:
            def on_progress(in_flight: tuple[int, int] = (0, 0), stored_changed: bool = True):
                """After a store write (re-read the run's counters), or with `stored_changed=False`
                as worker processes report batches not stored yet (`in_flight`: accepted, attempted)."""
                if bar.enabled:
                    if stored_changed:
                        r = store.run(plan.run_id)
                        stored[:] = r["accepted"], r["attempted"]
                    bar.update(stored[0] + in_flight[0], stored[1] + in_flight[1])
            engine.run(domain, generator, store, plan, todo, on_progress)
        if plan.gates:
            reference = gate_reference(domain, list(plan.conditions),
                                       [s["requested_n"] for s in store.shards(plan.run_id)]) if plan.conditions else None
            gate = run_gate(store, domain, plan.run_id, allow_drift, reference=reference)
        status = "gate_failed" if gate is not None and gate.blocks_export else "succeeded"
    except BaseException as e:
        try:  # best effort: the run stays 'running' if even this cannot be written (e.g. disk full)
            store.finish_run(plan.run_id, "failed")
        except Exception:
            pass
        if is_interrupt(e) and not isinstance(e, KeyboardInterrupt):  # Ctrl-C inside a DuckDB query
            raise KeyboardInterrupt from e
        raise
    store.finish_run(plan.run_id, status)
    run = store.run(plan.run_id)
    batches = sum(s["batches"] for s in store.shards(plan.run_id))
    top = [(r["stage"], r["rule"], r["attempts"]) for r in store.rejection_counts(plan.run_id, limit=5).to_dicts()]
    return RunResult(plan.run_id, plan.n, run["accepted"], run["attempted"], run["rejected"], run["surplus"],
                     batches, time.perf_counter() - started, top, gate, plan.n_shards)


def _judge(domain: Domain, gen_cols: list[str], texts: list[str], run_id: str, shard: int, batch: int,
           first_attempt: int, wanted: int, privacy: PrivacyFilter | None = None,
           condition: Condition | None = None) -> tuple[pl.DataFrame, pl.DataFrame, int, int]:
    """Parse, complete and validate one batch (vectorized); rule-valid records then go
    through the privacy filter, and last through the run's condition (stage 'condition').

    Returns (records to store, rejection rows, number of valid texts, number of records taken).
    """
    frame, ok_index, errors = domain.serializer.parse_many(texts, columns=gen_cols)
    parse_rows = pl.DataFrame(
        {"attempt_id": [first_attempt + i for i, _ in errors], "stage": ["parse"] * len(errors),
         "rule": ["parse"] * len(errors), "message": [e.reason for _, e in errors]},
        schema={"attempt_id": pl.Int64, "stage": pl.String, "rule": pl.String, "message": pl.String})
    attempt_ids = pl.Series("attempt_id", [first_attempt + i for i in ok_index], dtype=pl.Int64)
    full = domain.complete(frame)
    validation = domain.validator.validate(full)
    valid_rows = full.with_columns(attempt_ids).filter(validation.valid)
    privacy_rows = parse_rows.clear()
    if privacy is not None and valid_rows.height:
        bad = privacy.judge(valid_rows)
        if bad.height:
            privacy_rows = bad.select(valid_rows["attempt_id"].gather(bad["row"]).alias("attempt_id"),
                                      pl.lit("privacy").alias("stage"), "rule", "message")
            keep = np.ones(valid_rows.height, dtype=bool)
            keep[bad["row"].to_numpy()] = False
            valid_rows = valid_rows.filter(pl.Series(keep))
    condition_rows = parse_rows.clear()
    if condition is not None and valid_rows.height:
        meets = condition.holds(valid_rows)
        condition_rows = valid_rows.filter(~meets).select(
            "attempt_id", pl.lit("condition").alias("stage"), pl.lit("where").alias("rule"),
            pl.lit(f"does not meet the condition {condition.sql}").alias("message"))
        valid_rows = valid_rows.filter(meets)
    n_valid = valid_rows.height
    taken = valid_rows.head(wanted)
    records = taken.select(
        pl.lit(run_id).alias("run_id"), pl.lit(shard, pl.Int64).alias("shard"), pl.col("attempt_id").alias("record_id"),
        pl.lit(batch, pl.Int64).alias("batch"),
        *domain.spec.names)
    rule_rows = validation.failures.select(
        attempt_ids.gather(validation.failures["row"]).alias("attempt_id"), "stage", "rule", "message")
    rejections = pl.concat([parse_rows, rule_rows, privacy_rows, condition_rows]).sort("attempt_id",
                                                                                      maintain_order=True)
    raw = pl.Series("raw_text", texts, dtype=pl.String).gather(rejections["attempt_id"] - first_attempt)
    rejections = rejections.with_columns(
        raw, pl.lit(run_id).alias("run_id"), pl.lit(shard, pl.Int64).alias("shard"),
        pl.lit(batch, pl.Int64).alias("batch")).select(list(REJECTION_SCHEMA))
    return records, rejections, n_valid, taken.height


def _budget_message(store: Store, plan: RunPlan, state: ShardState) -> str:
    top = store.rejection_counts(plan.run_id, limit=5).to_dicts()
    reasons = "; ".join(f"{r['stage']}/{r['rule']}: {r['attempts']:,}" for r in top) or "none recorded"
    where = "" if plan.n_shards == 1 else f" in shard {state.shard} of {plan.n_shards}"
    return (f"attempt budget exhausted{where}: accepted {state.accepted:,} of {state.n:,} records after "
            f"{state.generated:,} attempts (max {plan.shard_budget(state.n):,}); top rejection reasons: {reasons}")
