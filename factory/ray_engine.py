"""Run a generation's shards on a Ray cluster (`factory generate --engine ray`).

    driver (this process)                        Ray workers (one actor per worker)
    ---------------------                        ----------------------------------
    start run, shards 'pending' in DuckDB
    submit shard s to an idle worker  ------->   generate_shard(...) with the shard's own
                                                 seeds; parse, complete, validate, privacy
    ingest the finished shard          <-------  records + rejections + counters (Arrow)
      (one transaction, idempotent by shard)
    ... until every shard is done
    distribution gate, export as usual

Each worker is a Ray actor that loads the domain and its model once, then runs shard after
shard with exactly the code the local engine runs (factory.loop.generate_shard), so a shard
holds the same records whichever engine made it. A worker killed mid-shard is restarted by
Ray (the model is reloaded) and the shard is retried from its start; because the shard is
deterministic, the retry gives the same rows, and the driver stores a shard only once (a
shard already 'done' is not written again), so nothing is duplicated or lost.

Shard results travel back through Ray's object store rather than as files on disk: that
works on a multi-node cluster without a shared file system, and the DuckDB transaction that
ingests a shard is the commit point (a crash before it just means the shard is generated
again on resume).

Ray is an optional dependency: `pip install -e ".[ray]"`.
"""
from __future__ import annotations

import os
import socket
from collections import deque
from dataclasses import dataclass, field

import polars as pl

from factory.checks.privacy import PrivacyFilter
from factory.loop import (AttemptBudgetExceeded, RunPlan, ShardState, _budget_message, generate_shard,
                          store_batch)

WORKER_RESTARTS = 3  # per worker; a shard is retried as often


class EngineError(RuntimeError):
    """The Ray engine cannot run (not installed, cluster unreachable, workers disagree, a worker keeps dying)."""


@dataclass(frozen=True)
class GeneratorSpec:
    """How a worker rebuilds the driver's generator: the domain by name, the model by name and folder."""
    domain: str
    model: str | None = None
    model_dir: str | None = None
    options: dict = field(default_factory=dict)

    def load(self):
        """(domain, generator), as the driver loaded them."""
        from factory.domain import load_domain
        from factory.generators import load_generator

        domain = load_domain(self.domain)
        return domain, load_generator(domain, self.model, model_dir=self.model_dir, **self.options)


@dataclass
class ShardResult:
    state: ShardState
    complete: bool  # False: the shard's attempt budget ran out first
    records: pl.DataFrame
    rejections: pl.DataFrame
    worker: str


class ShardWorker:
    """A Ray actor (see RayEngine) or a local worker process (factory.pool): one domain stack,
    loaded once, running shard after shard."""

    def __init__(self, spec: GeneratorSpec, kind: str = "ray"):
        self.domain, self.generator = spec.load()
        self._privacy = None  # loaded with the first shard that needs it
        self.name = f"{kind}:{socket.gethostname()}:{os.getpid()}"

    def describe(self) -> dict:
        """What the driver records about the generator (factory.pool.WorkerGenerator)."""
        g = self.generator
        return {"model_id": g.model_id, "model_version": g.model_version, "rules": self.domain.rule_set_hash,
                "settings": dict(getattr(g, "settings", {})), "conditional": getattr(g, "conditional", False)}

    def identity(self) -> tuple[str, str, str]:
        d = self.describe()
        return d["model_id"], d["model_version"], d["rules"]

    def run_shard(self, plan: RunPlan, state: ShardState, on_batch=None) -> ShardResult:
        """The whole shard; `on_batch(state)` after each of its batches (progress, nothing stored)."""
        if plan.gates and self._privacy is None:
            self._privacy = PrivacyFilter.for_domain(self.domain)
        records, rejections = [], []

        def sink(recs, rejs, _state, _done):
            records.append(recs)
            rejections.append(rejs)
            if on_batch is not None:
                on_batch(_state)

        complete = generate_shard(self.domain, self.generator, plan, state, self._privacy if plan.gates else None,
                                  sink)
        return ShardResult(state, complete, pl.concat(records, how="vertical") if records else pl.DataFrame(),
                           pl.concat(rejections, how="vertical") if rejections else pl.DataFrame(), self.name)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise EngineError('--engine ray needs Ray: pip install -e ".[ray]"') from None
    return ray


class RayEngine:
    """Shards on Ray workers; each finished shard is stored in one transaction, exactly once.

    `address`: an existing cluster ("ray://host:10001", "host:6379" or "auto"); None starts a
    local cluster with `workers` CPUs for this run and stops it afterwards."""
    name = "ray"

    def __init__(self, spec: GeneratorSpec, address: str | None = None, workers: int = 2):
        if workers <= 0:
            raise EngineError(f"--workers must be positive, got {workers}")
        self.spec, self.address, self.workers = spec, address, workers

    def settings(self) -> dict:
        return {"engine": self.name, "workers": self.workers, "ray_address": self.address}

    def _env(self) -> dict[str, str]:
        env = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
        # workers do not start in the driver's directory: give them every folder the driver finds
        # domains in (FACTORY_DOMAINS_PATH and ./domains, where `factory init` writes), resolved
        from factory.domain import search_paths

        found = [str(p.resolve()) for p in search_paths() if p.is_dir()]
        if found:
            env["FACTORY_DOMAINS_PATH"] = os.pathsep.join(found)
        return env

    def _start(self, ray):
        if ray.is_initialized():
            return False
        kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                      runtime_env={"env_vars": self._env()})
        try:
            if self.address is None:
                ray.init(num_cpus=self.workers, **kwargs)
            else:
                ray.init(address=self.address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray cluster"
            raise EngineError(f"cannot start or reach {where}: {str(e).strip().splitlines()[0][:300]}") from None
        return True

    def run(self, domain, generator, store, plan: RunPlan, todo: list[ShardState], on_progress) -> None:
        ray = _import_ray()
        store.release()  # the workers start while readers may query
        started = self._start(ray)
        try:
            gpus = 1 if self.spec.options.get("device") == "cuda" else 0  # untested: no GPU on the dev machine
            actor_cls = ray.remote(num_cpus=1, num_gpus=gpus, max_restarts=WORKER_RESTARTS,
                                   max_task_retries=WORKER_RESTARTS)(ShardWorker)
            actors = [actor_cls.remote(self.spec) for _ in range(min(self.workers, max(1, len(todo))))]
            want = (generator.model_id, generator.model_version, domain.rule_set_hash)
            for who in ray.get([a.identity.remote() for a in actors]):
                if tuple(who) != want:
                    raise EngineError(f"a Ray worker loaded {who[0]} {who[1]} (rules {who[2]}), the driver "
                                      f"{want[0]} {want[1]} (rules {want[2]}); install the same model on every node")
            queue, idle, inflight = deque(todo), deque(actors), {}
            while queue or inflight:
                while queue and idle:
                    actor, state = idle.popleft(), queue.popleft()
                    inflight[actor.run_shard.remote(plan, state)] = (actor, state)
                (ref,), _ = ray.wait(list(inflight), num_returns=1)
                actor, state = inflight.pop(ref)
                try:
                    result: ShardResult = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    raise EngineError(f"shard {state.shard} failed: its Ray worker died {WORKER_RESTARTS + 1} times "
                                      f"({str(e).strip().splitlines()[0][:200]}); finished shards are stored, "
                                      f"continue with `factory generate --resume {plan.run_id}`") from None
                store_batch(store, domain, plan, result.records, result.rejections, result.state, result.complete,
                            on_progress, result.worker)
                if not result.complete:
                    raise AttemptBudgetExceeded(_budget_message(store, plan, result.state))
                idle.append(actor)
        finally:
            if started:
                ray.shutdown()
