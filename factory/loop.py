"""The generation loop: generate -> parse -> complete -> validate -> store, batch by batch.

Accounting, per run:
- every generated text gets an attempt id (its index within the run);
- a text is *accepted* (a row of `<domain>.records`, record_id = attempt id) or
  *rejected* (one `rejections` row per failing rule) — attempted = accepted + rejected;
- a record that passes every rule but copies (or nearly copies) a training row is
  rejected too, with stage 'privacy' (factory/checks/privacy.py), so the loop tops up;
- valid texts that arrive after the n-th acceptance (in the last batch) are
  *surplus*: counted, not stored, and not attempts.
A run is deterministic for (seed, generator, batch_size): batch b is generated
with a seed derived from (seed, b), and batch sizes depend only on acceptance so far.

After the loop, the distribution gate (factory/checks/gate.py) compares the accepted
records with the train split; a failed gate leaves the run with status 'gate_failed'
unless `allow_drift`.
"""
from __future__ import annotations

import math
import secrets
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import polars as pl
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from factory.checks.gate import GateResult, run_gate
from factory.checks.privacy import PrivacyFilter
from factory.domain import Domain
from factory.generators import Generator
from factory.store import Store

REJECTION_SCHEMA = {"run_id": pl.String, "attempt_id": pl.Int64, "batch": pl.Int64, "stage": pl.String,
                    "rule": pl.String, "message": pl.String, "raw_text": pl.String}
END_MARGIN = 1.2  # near the end, ask for 20% more texts than the acceptance rate predicts we need


class AttemptBudgetExceeded(RuntimeError):
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

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.attempted if self.attempted else 0.0


def default_max_attempts(n: int) -> int:
    # Give up below ~1% acceptance (the marginal baseline on finance sits near 2%).
    return 100 * n + 10_000


def batch_seed(seed: int, batch: int) -> int:
    """Independent, reproducible seed for batch `batch` of a run seeded with `seed`."""
    return int(np.random.SeedSequence(seed, spawn_key=(batch,)).generate_state(1, np.uint64)[0] >> 1)


def next_batch_size(batch_size: int, remaining: int, valid: int, generated: int) -> int:
    if generated == 0:  # acceptance unknown: no more than could all be needed
        return min(batch_size, remaining)
    if valid == 0:
        return batch_size
    rate = valid / generated
    return max(1, min(batch_size, math.ceil(remaining / rate * END_MARGIN)))


def new_run_id(domain: Domain) -> str:
    return f"{domain.name}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


def _progress(enabled: bool) -> Progress:
    console = Console(file=sys.stderr)
    return Progress(
        TextColumn("[bold]generating"), BarColumn(), MofNCompleteColumn(),
        TextColumn("attempted {task.fields[attempted]:,}  acceptance {task.fields[rate]:.1%}"),
        TimeElapsedColumn(), console=console, disable=not (enabled and console.is_terminal), transient=False)


def run_generation(domain: Domain, generator: Generator, n: int, seed: int, store: Store, batch_size: int,
                   max_attempts: int | None = None, progress: bool = True, settings: dict | None = None,
                   run_id: str | None = None, gates: bool = True, allow_drift: bool = False) -> RunResult:
    """Generate until exactly n records pass every rule (and the privacy filter); record
    everything in `store`; then run the distribution gate. `gates=False` turns off both
    the privacy filter and the distribution gate (runs.gate stays NULL)."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    max_attempts = default_max_attempts(n) if max_attempts is None else max_attempts
    run_id = run_id or new_run_id(domain)
    store.start_run(run_id, domain, generator.model_id, generator.model_version, seed, n, batch_size,
                    {"max_attempts": max_attempts, "gates": gates, **(settings or {})})
    return _drive(domain, generator, store, run_id, n, seed, batch_size, max_attempts, progress, gates, allow_drift,
                  accepted=0, rejected=0, surplus=0, batch=0)


class ResumeError(ValueError):
    pass


def resume_generation(domain: Domain, generator: Generator, store: Store, run_id: str, progress: bool = True,
                      allow_drift: bool = False) -> RunResult:
    """Continue a run that was interrupted (killed, crashed) to exactly its requested n.

    Every batch was committed with the run's counters in one transaction, so the stored
    counters are exact, and batch b's texts depend only on (seed, b) and the acceptance
    seen so far, which the counters give back (valid texts = accepted + surplus,
    generated = attempted + surplus). The resumed run therefore stores exactly what an
    uninterrupted run with the same seed would have stored.
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
    store.reopen_run(run_id)
    return _drive(domain, generator, store, run_id, run["requested_n"], run["seed"], run["batch_size"],
                  settings["max_attempts"], progress, settings.get("gates", True), allow_drift,
                  accepted=run["accepted"] or 0, rejected=run["rejected"] or 0, surplus=run["surplus"] or 0,
                  batch=store.batches_written(run_id, domain))


def _drive(domain: Domain, generator: Generator, store: Store, run_id: str, n: int, seed: int, batch_size: int,
           max_attempts: int, progress: bool, gates: bool, allow_drift: bool, *, accepted: int, rejected: int,
           surplus: int, batch: int) -> RunResult:
    gen_cols = domain.spec.generated_names
    privacy = PrivacyFilter.for_domain(domain) if gates else None
    gate = None
    generated, valid_seen = accepted + rejected + surplus, accepted + surplus
    started = time.perf_counter()
    status = "failed"
    try:
        with _progress(progress) as bar:
            task = bar.add_task("generate", total=n, completed=accepted, attempted=accepted + rejected,
                                rate=accepted / max(1, accepted + rejected))
            while accepted < n:
                if generated >= max_attempts:
                    raise AttemptBudgetExceeded(_budget_message(store, run_id, n, accepted, generated, max_attempts))
                k = min(next_batch_size(batch_size, n - accepted, valid_seen, generated), max_attempts - generated)
                texts = generator.generate(k, batch_seed(seed, batch))
                if len(texts) != k:
                    raise RuntimeError(f"generator {generator.model_id} returned {len(texts)} texts, asked for {k}")
                records, rejections, n_valid, n_taken = _judge(domain, gen_cols, texts, run_id, batch, generated,
                                                               n - accepted, privacy)
                n_rejected = rejections["attempt_id"].n_unique() if rejections.height else 0
                accepted += n_taken
                rejected += n_rejected
                surplus += n_valid - n_taken
                valid_seen += n_valid
                generated += k
                store.write_batch(run_id, domain, records, rejections,
                                  {"attempted": accepted + rejected, "accepted": accepted, "rejected": rejected,
                                   "surplus": surplus})
                batch += 1
                bar.update(task, completed=accepted, attempted=accepted + rejected,
                           rate=accepted / max(1, accepted + rejected))
        if gates:
            gate = run_gate(store, domain, run_id, allow_drift)
        status = "gate_failed" if gate is not None and gate.blocks_export else "succeeded"
    finally:
        store.finish_run(run_id, status)
    top = [(r["stage"], r["rule"], r["attempts"]) for r in store.rejection_counts(run_id, limit=5).to_dicts()]
    return RunResult(run_id, n, accepted, accepted + rejected, rejected, surplus, batch,
                     time.perf_counter() - started, top, gate)


def _judge(domain: Domain, gen_cols: list[str], texts: list[str], run_id: str, batch: int, first_attempt: int,
           wanted: int, privacy: PrivacyFilter | None = None) -> tuple[pl.DataFrame, pl.DataFrame, int, int]:
    """Parse, complete and validate one batch (vectorized); rule-valid records then go
    through the privacy filter.

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
    n_valid = valid_rows.height
    taken = valid_rows.head(wanted)
    records = taken.select(
        pl.lit(run_id).alias("run_id"), pl.col("attempt_id").alias("record_id"), pl.lit(batch, pl.Int64).alias("batch"),
        *domain.spec.names)
    rule_rows = validation.failures.select(
        attempt_ids.gather(validation.failures["row"]).alias("attempt_id"), "stage", "rule", "message")
    rejections = pl.concat([parse_rows, rule_rows, privacy_rows]).sort("attempt_id", maintain_order=True)
    raw = pl.Series("raw_text", texts, dtype=pl.String).gather(rejections["attempt_id"] - first_attempt)
    rejections = rejections.with_columns(
        raw, pl.lit(run_id).alias("run_id"), pl.lit(batch, pl.Int64).alias("batch")).select(list(REJECTION_SCHEMA))
    return records, rejections, n_valid, taken.height


def _budget_message(store: Store, run_id: str, n: int, accepted: int, generated: int, max_attempts: int) -> str:
    top = store.rejection_counts(run_id, limit=5).to_dicts()
    reasons = "; ".join(f"{r['stage']}/{r['rule']}: {r['attempts']:,}" for r in top) or "none recorded"
    return (f"attempt budget exhausted: accepted {accepted:,} of {n:,} records after {generated:,} attempts "
            f"(max {max_attempts:,}); top rejection reasons: {reasons}")
