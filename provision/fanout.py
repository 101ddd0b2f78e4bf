"""Run one operation over many nodes: bounded, batched, timed, retried.

``fan_out(items, task, ...)`` calls ``task(item)`` for every item with at most
``fanout`` calls in flight (64 by default, as FreeIPMI's tools), optionally in
batches (``batch`` items, then ``batch_wait`` seconds before the next batch:
on real racks, powering hundreds of nodes on at once trips breakers), with a
per-item timeout and retries with exponential backoff on the errors the
caller names. A failing item never stops the others: every item gets an
``Outcome`` (ok or not, value, error and hint, seconds, attempts).

Work runs on threads. With ``processes=N`` each batch is split over N forked
worker processes, each with its share of the threads: for libraries such as
pyghmi whose per-call cost is Python CPU time under one GIL, processes are
what scales (measured in bench/bmc_fanout.py). Forked workers inherit
``task`` and the items (nothing is pickled on the way in; outcomes come back
pickled), so tasks may close over unpicklable state such as secrets. A
library with process-wide I/O state must reset it in the child
(os.register_at_fork); provision.bmc does so for pyghmi.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Generic, TypeVar

from provision.errors import ProvisionError

log = logging.getLogger(__name__)

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


class _Job(Generic[T]):
    def __init__(
        self, items: Sequence[T], task: Callable[[T], Any], name: Callable[[T], str], options: FanoutOptions
    ) -> None:
        self.items = items
        self.task = task
        self.name = name
        self.options = options


# The job forked workers run: set before forking, read in the child.
_FORKED_JOB: _Job[Any] | None = None


def batches(items: Sequence[T], size: int | None) -> Iterator[Sequence[T]]:
    if not size:
        yield items
        return
    for start in range(0, len(items), size):
        yield items[start : start + size]


def fan_out(
    items: Sequence[T],
    task: Callable[[T], Any],
    *,
    name: Callable[[T], str] = str,
    options: FanoutOptions | None = None,
    on_outcome: Callable[[Outcome], None] | None = None,
    on_batch_wait: Callable[[int, float], None] | None = None,
) -> list[Outcome]:
    """``task(item)`` for every item; one Outcome per item, in item order."""
    opts = options or FanoutOptions()
    job = _Job(items, task, name, opts)
    outcomes: dict[int, Outcome] = {}
    all_batches = list(batches(range(len(items)), opts.batch))
    for number, indexes in enumerate(all_batches):
        if number and opts.batch_wait:
            if on_batch_wait:
                on_batch_wait(number + 1, opts.batch_wait)
            time.sleep(opts.batch_wait)
        processes = min(opts.processes, math.ceil(len(indexes) / 8))
        if processes > 1:
            got = _run_processes(job, list(indexes), processes)
        else:
            got = _run_threads(job, list(indexes), opts.fanout)
        for index, outcome in got:
            outcomes[index] = outcome
            if on_outcome:
                on_outcome(outcome)
    return [outcomes[i] for i in range(len(items))]


def _attempt(job: _Job[T], item: T, started: dict[int, float], index: int) -> Outcome:
    opts = job.options
    name = job.name(item)
    t0 = time.monotonic()
    started[index] = t0
    attempt = 0
    while True:
        attempt += 1
        try:
            value = job.task(item)
            return Outcome(name, Result.OK, value=value, seconds=time.monotonic() - t0, attempts=attempt)
        except Exception as exc:
            if opts.retry_on and isinstance(exc, opts.retry_on) and attempt <= opts.retries:
                delay = opts.backoff * 2 ** (attempt - 1)
                log.debug("%s: attempt %d failed (%s); retrying in %.1f s", name, attempt, exc, delay)
                time.sleep(delay)
                continue
            return _failure(name, exc, time.monotonic() - t0, attempt)


def _failure(name: str, exc: BaseException, seconds: float, attempts: int) -> Outcome:
    if isinstance(exc, ProvisionError):
        message, hint = exc.message, exc.hint
    else:
        message, hint = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, None
    return Outcome(
        name, Result.FAILED, error=message, hint=hint, kind=type(exc).__name__, seconds=seconds, attempts=attempts
    )


def _run_threads(job: _Job[Any], indexes: list[int], workers: int) -> list[tuple[int, Outcome]]:
    """Run ``indexes`` on at most ``workers`` threads; enforce the timeout."""
    timeout = job.options.timeout
    started: dict[int, float] = {}
    results: list[tuple[int, Outcome]] = []
    executor = ThreadPoolExecutor(max_workers=max(1, min(workers, len(indexes))), thread_name_prefix="fanout")
    futures: dict[Future[Outcome], int] = {executor.submit(_attempt, job, job.items[i], started, i): i for i in indexes}
    pending = set(futures)
    try:
        while pending:
            done, pending = wait(pending, timeout=0.05 if timeout else None, return_when=FIRST_COMPLETED)
            for fut in done:
                results.append((futures[fut], fut.result()))
            if timeout:
                now = time.monotonic()
                for fut in list(pending):
                    index = futures[fut]
                    begun = started.get(index)
                    if begun is not None and now - begun > timeout:
                        pending.discard(fut)
                        name = job.name(job.items[index])
                        results.append(
                            (
                                index,
                                Outcome(
                                    name,
                                    Result.TIMEOUT,
                                    error=f"{name}: no result after {timeout:g} s",
                                    hint="raise --timeout, or check the node's BMC",
                                    kind="Timeout",
                                    seconds=now - begun,
                                ),
                            )
                        )
    finally:
        # Threads stuck past their timeout are abandoned, not waited for.
        executor.shutdown(wait=False, cancel_futures=True)
    return results


def _shard_worker(shard: list[int], conn: Any) -> None:
    job = _FORKED_JOB
    assert job is not None
    threads = max(1, job.options.fanout // max(1, job.options.processes))
    try:
        conn.send(_run_threads(job, shard, threads))
    except BaseException as exc:  # report, never leave the parent waiting
        name = job.name
        conn.send([(i, _failure(name(job.items[i]), exc, 0.0, 1)) for i in shard])
    finally:
        conn.close()
        os._exit(0)  # no atexit or inherited cleanup in a forked worker


def _run_processes(job: _Job[Any], indexes: list[int], processes: int) -> list[tuple[int, Outcome]]:
    """One forked worker per shard; each runs its shard on threads."""
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
            name = job.name
            lost = ProvisionError(f"worker process {proc.pid} died", hint="run with --debug and report the bug")
            results.extend((i, _failure(name(job.items[i]), lost, 0.0, 1)) for i in shard)
        finally:
            conn.close()
            proc.join()
    return results


def default_processes(count: int) -> int:
    """Worker processes for ``count`` items: one per 100 items, up to 2 per core."""
    return max(1, min(2 * (os.cpu_count() or 1), math.ceil(count / 100)))
