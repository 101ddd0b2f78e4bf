"""Run one operation over many nodes: batched, each failure kept to its node.

``fan_out_batches(count, run_batch, ...)`` cuts items ``0..count-1`` into
batches (``batch`` items, then ``batch_wait`` seconds before the next batch:
on real racks, powering hundreds of nodes on at once trips breakers) and
hands each batch to ``run_batch``, the caller's engine for a whole batch (the
IPMI event loop of provision.ipmi, which runs every session of a batch in
one thread, with at most ``fanout`` in flight, a per-item timeout and
retries). A failing item never stops the others: every item gets an
``Outcome`` (ok or not, value, error and hint, seconds, attempts).

With ``processes=N`` each batch is split over N forked worker processes,
each with its share of the fan-out. Forked workers inherit the engine and
the items (nothing is pickled on the way in; outcomes come back pickled), so
engines may close over unpicklable state such as secrets. A library with
process-wide I/O state must reset it in the child (os.register_at_fork).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypedDict, TypeVar

from provision.errors import ProvisionError

T = TypeVar("T")

DEFAULT_FANOUT = 64


class Result(StrEnum):
    OK = "ok"
    FAILED = "failed"
    TIMEOUT = "timeout"


@dataclass(frozen=True)
class Outcome:
    """What happened to one item."""

    node: str
    result: Result
    value: Any = None
    error: str | None = None
    hint: str | None = None
    kind: str | None = None  # the error's class name, e.g. BmcAuthError
    seconds: float = 0.0
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.result == Result.OK

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "result": str(self.result),
            "value": self.value,
            "error": self.error,
            "hint": self.hint,
            "kind": self.kind,
            "seconds": round(self.seconds, 3),
            "attempts": self.attempts,
        }


@dataclass(frozen=True)
class FanoutOptions:
    fanout: int = DEFAULT_FANOUT
    batch: int | None = None
    batch_wait: float = 0.0
    timeout: float | None = 30.0
    retries: int = 0
    backoff: float = 1.0
    processes: int = 1
    retry_on: tuple[type[BaseException], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.fanout < 1:
            raise ProvisionError(f"--fanout: {self.fanout} must be at least 1", hint="use e.g. --fanout 64")
        if self.batch is not None and self.batch < 1:
            raise ProvisionError(f"--batch: {self.batch} must be at least 1", hint="use e.g. --batch 50")
        if self.batch_wait < 0:
            raise ProvisionError(f"--batch-wait: {self.batch_wait} must not be negative", hint="use e.g. 30s")
        if self.timeout is not None and self.timeout <= 0:
            raise ProvisionError(f"--timeout: {self.timeout} must be positive", hint="use e.g. 30s")
        if self.retries < 0:
            raise ProvisionError(f"--retries: {self.retries} must not be negative", hint="use e.g. 2")


class RunLimits(TypedDict):
    """What every protocol's runner takes from FanoutOptions for one batch."""

    fanout: int
    timeout: float | None
    retries: int
    backoff: float
    retry_on: tuple[type[BaseException], ...]


def run_limits(options: FanoutOptions, fanout: int) -> RunLimits:
    return RunLimits(
        fanout=fanout,
        timeout=options.timeout,
        retries=options.retries,
        backoff=options.backoff,
        retry_on=options.retry_on,
    )


# Runs the items at ``indexes`` with at most ``fanout`` in flight; calls
# ``report`` (when given) as each outcome is known; returns every outcome.
BatchRunner = Callable[[list[int], int, Callable[[Outcome], None] | None], list[tuple[int, Outcome]]]


class _Job:
    def __init__(self, run_batch: BatchRunner, name_of: Callable[[int], str], options: FanoutOptions) -> None:
        self.run_batch = run_batch
        self.name_of = name_of
        self.options = options


# The job forked workers run: set before forking, read in the child.
_FORKED_JOB: _Job | None = None


def batches(items: Sequence[T], size: int | None) -> Iterator[Sequence[T]]:
    if not size:
        yield items
        return
    for start in range(0, len(items), size):
        yield items[start : start + size]


def fan_out_batches(
    count: int,
    run_batch: BatchRunner,
    *,
    name_of: Callable[[int], str],
    options: FanoutOptions,
    on_outcome: Callable[[Outcome], None] | None = None,
    on_batch_wait: Callable[[int, float], None] | None = None,
) -> list[Outcome]:
    """Items ``0..count-1`` in batches, each batch run by ``run_batch`` (in worker processes if asked)."""
    opts = options
    job = _Job(run_batch, name_of, opts)
    outcomes: dict[int, Outcome] = {}
    all_batches = list(batches(range(count), opts.batch))
    for number, indexes in enumerate(all_batches):
        if number and opts.batch_wait:
            if on_batch_wait:
                on_batch_wait(number + 1, opts.batch_wait)
            time.sleep(opts.batch_wait)
        processes = min(opts.processes, math.ceil(len(indexes) / 8))
        if processes > 1:
            got = _run_processes(job, list(indexes), processes)
            for _, outcome in got:
                if on_outcome:
                    on_outcome(outcome)
        else:
            got = run_batch(list(indexes), opts.fanout, on_outcome)
        for index, outcome in got:
            outcomes[index] = outcome
    return [outcomes[i] for i in range(count)]


def failure_outcome(name: str, exc: BaseException, seconds: float, attempts: int) -> Outcome:
    """The Outcome of an item that raised ``exc``: message and hint of a ProvisionError."""
    if isinstance(exc, ProvisionError):
        message, hint = exc.message, exc.hint
    else:
        message, hint = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, None
    return Outcome(
        name, Result.FAILED, error=message, hint=hint, kind=type(exc).__name__, seconds=seconds, attempts=attempts
    )


def timeout_outcome(name: str, timeout: float, seconds: float) -> Outcome:
    """The Outcome of an item without a result after ``timeout`` seconds."""
    return Outcome(
        name,
        Result.TIMEOUT,
        error=f"{name}: no result after {timeout:g} s",
        hint="raise --timeout, or check the node's BMC",
        kind="Timeout",
        seconds=seconds,
    )


def _shard_worker(shard: list[int], conn: Any) -> None:
    job = _FORKED_JOB
    assert job is not None
    fanout = max(1, job.options.fanout // max(1, job.options.processes))
    try:
        conn.send(job.run_batch(shard, fanout, None))
    except BaseException as exc:  # report, never leave the parent waiting
        conn.send([(i, failure_outcome(job.name_of(i), exc, 0.0, 1)) for i in shard])
    finally:
        conn.close()
        os._exit(0)  # no atexit or inherited cleanup in a forked worker


def _run_processes(job: _Job, indexes: list[int], processes: int) -> list[tuple[int, Outcome]]:
    """One forked worker per shard; each runs its shard with its share of the fan-out."""
    global _FORKED_JOB
    shards = [indexes[i::processes] for i in range(processes)]
    ctx = multiprocessing.get_context("fork")
    _FORKED_JOB = job
    workers = []
    try:
        for shard in shards:
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_shard_worker, args=(shard, child), daemon=True)
            proc.start()
            child.close()
            workers.append((shard, proc, parent))
    finally:
        _FORKED_JOB = None
    results: list[tuple[int, Outcome]] = []
    for shard, proc, conn in workers:
        try:
            results.extend(conn.recv())
        except EOFError:
            lost = ProvisionError(f"worker process {proc.pid} died", hint="run with --debug and report the bug")
            results.extend((i, failure_outcome(job.name_of(i), lost, 0.0, 1)) for i in shard)
        finally:
            conn.close()
            proc.join()
    return results
