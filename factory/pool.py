"""Shards on local worker processes: the local engine with `--workers W` > 1.

Each worker is a spawned, single-threaded process that loads the domain and its model once
(factory.ray_engine.ShardWorker, the same code a Ray actor runs) and generates whole shards;
finished shards come back to the main process, which stores each in one transaction
(factory.loop.store_batch), exactly like the Ray engine. One thread per worker: the decoder's
ops are small, and on shared cores a second intra-op thread costs more in wake-ups than it
computes, so W single-threaded processes use W cores far better than one W-threaded process.

A shard is a pure function of (plan, shard state), so which worker runs it, and in what
order shards finish, does not change a record. A killed run keeps its finished shards;
`--resume` redoes the others.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from factory.loop import AttemptBudgetExceeded, _budget_message, store_batch

THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
              "TOKENIZERS_PARALLELISM": "false"}

_worker = None  # this process's ShardWorker (set by _init in a worker process)
_init_error = None  # or why it could not load (a stack that is missing, corrupt, for other columns ...)
_batches = None  # queue to the main process: (shard, accepted, attempted) after each batch, for progress
PROGRESS_POLL_S = 0.5  # how often the main process reads that queue while shards run


class PoolError(RuntimeError):
    """A local worker process died (killed, out of memory)."""


def _init(spec, batches=None):
    os.environ.update(THREAD_ENV)  # before torch is imported in this process
    from factory.ray_engine import ShardWorker

    global _worker, _init_error, _batches
    _batches = batches
    try:
        _worker = ShardWorker(spec, kind="local")
    except Exception as e:  # kept for the driver: an initializer that raises only breaks the pool, mutely
        _init_error = e


def _loaded():
    if _init_error is not None:
        raise _init_error
    return _worker


def _ready():
    pass


def _identity():
    return _loaded().identity()


def _describe():
    return _loaded().describe()


def _report(state):
    if _batches is not None:
        _batches.put((state.shard, state.accepted, state.attempted))


def _run_shard(plan, state):
    return _loaded().run_shard(plan, state, on_batch=_report)


class WorkerGenerator:
    """The generator as the main process sees it while worker processes decode: the identity and
    settings a worker loaded, without a second copy of the model in this process (a loaded
    finance stack is ~0.5 GiB more RSS and a few CPU seconds that the workers need). A run whose
    last shard is done here (`--resume` of a run with one shard left) loads the model on its first
    `generate`, and checks that it is the one the workers loaded."""

    def __init__(self, spec, description: dict):
        self.spec = spec
        self.model_id, self.model_version = description["model_id"], description["model_version"]
        self.settings, self.conditional = description["settings"], description["conditional"]
        self._generator = None

    def generate(self, n: int, seed: int, **kwargs):
        if self._generator is None:
            _, g = self.spec.load()
            if (g.model_id, g.model_version) != (self.model_id, self.model_version):
                raise PoolError(f"this process loaded {g.model_id} {g.model_version}, the workers "
                                f"{self.model_id} {self.model_version}")
            self._generator = g
        return self._generator.generate(n, seed, **kwargs)


class WorkerPool:
    """W spawned worker processes; `start()` early so that they load while the main process does too."""

    def __init__(self, spec, workers: int):
        self.spec, self.workers, self.executor, self.batches = spec, workers, None, None

    def start(self) -> "WorkerPool":
        if self.executor is None:
            # spawn, not fork: a forked child inherits torch's thread pools and locks mid-state
            ctx = mp.get_context("spawn")
            self.batches = ctx.SimpleQueue()
            self.executor = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init,
                                                initargs=(self.spec, self.batches))
            # The executor spawns a process only for a task no idle process can take: W tasks now make
            # all W load the model at once (else the second starts loading only when the first is busy).
            for _ in range(self.workers):
                self.executor.submit(_ready)
        return self

    def generator(self) -> WorkerGenerator:
        """The generator a worker loaded, as seen from here (waits for one worker to load it). A
        stack that cannot load raises its own error (e.g. a ModelError), as loading it here would."""
        return WorkerGenerator(self.spec, self.start().executor.submit(_describe).result())

    def shutdown(self):
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None
            self.batches.close()

    def run(self, domain, generator, store, plan, todo, on_progress) -> None:
        self.start()
        want = (generator.model_id, generator.model_version, domain.rule_set_hash)
        try:
            who = self.executor.submit(_identity).result()
            if tuple(who) != want:
                raise PoolError(f"a worker loaded {who[0]} {who[1]} (rules {who[2]}), the main process "
                                f"{want[0]} {want[1]} (rules {want[2]})")
            start = {s.shard: (s.accepted, s.attempted) for s in todo}  # of the shards not stored yet
            in_flight: dict[int, tuple[int, int]] = {}  # shard -> (accepted, attempted) not stored yet

            def not_stored():
                return sum(a for a, _ in in_flight.values()), sum(t for _, t in in_flight.values())

            pending = {self.executor.submit(_run_shard, plan, s): s for s in todo}
            while pending:
                done, _ = wait(pending, timeout=PROGRESS_POLL_S, return_when=FIRST_COMPLETED)
                reported = False
                while not self.batches.empty():
                    shard, accepted, attempted = self.batches.get()
                    if shard in start:  # a report may arrive after its shard was stored: ignored
                        in_flight[shard] = (accepted - start[shard][0], attempted - start[shard][1])
                        reported = True
                for fut in done:  # stored below: counted by the store from now on
                    start.pop(pending[fut].shard)
                    in_flight.pop(pending[fut].shard, None)
                if reported and not done:
                    on_progress(not_stored(), stored_changed=False)
                for fut in sorted(done, key=lambda f: pending[f].shard):
                    state = pending.pop(fut)
                    result = fut.result()
                    store_batch(store, domain, plan, result.records, result.rejections, result.state,
                                result.complete, lambda: on_progress(not_stored()), result.worker)
                    if not result.complete:
                        raise AttemptBudgetExceeded(_budget_message(store, plan, result.state))
                    del state
        except BrokenProcessPool:
            raise PoolError(f"a local worker process died; finished shards are stored, continue with "
                            f"`factory generate --resume {plan.run_id}`") from None
        finally:
            self.shutdown()
