"""Many BMC operations at once, in one thread: the fan-out's IPMI engine.

``run_tasks`` starts a session per task, at most ``fanout`` at a time, and
returns one ``provision.fanout.Outcome`` per task, in task order. Each task
has a deadline (``timeout`` seconds from its start, retries included: past
it the outcome is ``timeout``, as the thread fan-out reports it); a session
that fails with one of ``retry_on`` (by default: the BMC did not answer) is
started again after ``backoff * 2**(attempt-1)`` seconds, up to ``retries``
times. ``answer_timeout`` and ``retransmit`` tune the sessions (see
provision.ipmi.session). Two tasks for the same BMC address and port run one after the other.
A BMC that does not answer costs the others nothing but its slot.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from provision.errors import ProvisionError
from provision.fanout import Outcome, Result, failure_outcome, timeout_outcome
from provision.ipmi.errors import UNREACHABLE_HINT, BmcUnreachableError
from provision.ipmi.session import ANSWER_TIMEOUT, RETRANSMIT, Operation, Session, Timer
from provision.ipmi.transport import Transport, peer_key, resolve

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    """One operation on one BMC. ``password`` is called when the session starts."""

    name: str
    host: str
    port: int
    user: str
    password: Callable[[], str] = field(repr=False)
    operation: Callable[[], Operation]
    privileged: bool = True  # Set Session Privilege Level (operator) first
    error: ProvisionError | None = None  # known before starting: the task fails with it


class _Job:
    __slots__ = (
        "attempts",
        "deadline",
        "index",
        "key",
        "outcome",
        "retry",
        "session",
        "sockaddr",
        "started",
        "task",
    )

    def __init__(self, index: int, task: Task) -> None:
        self.index = index
        self.task = task
        self.attempts = 0
        self.started = 0.0
        self.sockaddr: tuple[Any, ...] = ()
        self.key: tuple[str, int] = ("", 0)
        self.session: Session | None = None
        self.outcome: Outcome | None = None
        self.deadline: Timer | None = None
        self.retry: Timer | None = None


class Runner:
    def __init__(
        self,
        tasks: Sequence[Task],
        *,
        fanout: int = 64,
        timeout: float | None = 30.0,
        retries: int = 0,
        backoff: float = 1.0,
        retry_on: tuple[type[BaseException], ...] = (BmcUnreachableError,),
        on_outcome: Callable[[Outcome], None] | None = None,
        answer_timeout: float = ANSWER_TIMEOUT,
        retransmit: float = RETRANSMIT,
    ) -> None:
        self.jobs = [_Job(i, t) for i, t in enumerate(tasks)]
        self.fanout = max(1, fanout)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.retry_on = retry_on
        self.on_outcome = on_outcome
        self.answer_timeout = min(answer_timeout, timeout) if timeout else answer_timeout
        self.retransmit = retransmit
        self.transport = Transport(on_change=self._changed)
        self.pending: deque[_Job] = deque(self.jobs)
        self.active = 0
        self.busy: dict[tuple[str, int], _Job] = {}
        self.waiting: dict[tuple[str, int], deque[_Job]] = {}
        self.addresses: dict[tuple[str, int], tuple[Any, ...] | OSError] = {}

    def run(self) -> list[Outcome]:
        try:
            while True:
                now = time.monotonic()
                self._fill(now)
                if not self.active and not self.pending:
                    break
                timeout = self.transport.next_timeout(now)
                self.transport.poll(1.0 if timeout is None else timeout)
        finally:
            self.transport.close()
        return [job.outcome for job in self.jobs if job.outcome is not None]

    # -- starting
    def _fill(self, now: float) -> None:
        while self.pending and self.active < self.fanout:
            self._begin(self.pending.popleft(), now)

    def _begin(self, job: _Job, now: float) -> None:
        task = job.task
        if task.error is not None:
            self._report(job, failure_outcome(task.name, task.error, 0.0, 1))
            return
        address = self.addresses.get((task.host, task.port))
        if address is None:
            try:
                address = resolve(task.host, task.port)
            except OSError as exc:
                address = exc
            self.addresses[(task.host, task.port)] = address
        if isinstance(address, OSError):
            error = BmcUnreachableError(
                f"BMC {task.host}:{task.port}: cannot resolve {task.host} ({address.strerror or address})",
                hint=UNREACHABLE_HINT,
            )
            self._report(job, failure_outcome(task.name, error, 0.0, 1))
            return
        job.sockaddr = address
        job.key = peer_key(address)
        if job.key in self.busy:  # this BMC is busy with another task: after it
            self.waiting.setdefault(job.key, deque()).append(job)
            return
        self.busy[job.key] = job
        self.active += 1
        job.started = now
        if self.timeout:
            job.deadline = self.transport.call_at(now + self.timeout, functools.partial(self._expired, job))
        self._attempt(job, now)

    def _attempt(self, job: _Job, now: float) -> None:
        job.retry = None
        job.attempts += 1
        task = job.task
        try:
            session = Session(
                self.transport,
                job.sockaddr,
                task.user,
                task.password(),
                where=f"BMC {task.host}:{task.port}",
                privileged=task.privileged,
                answer_timeout=self.answer_timeout,
                retransmit=self.retransmit,
            )
        except Exception as exc:  # the password cannot be read, a name too long...
            self._report(job, failure_outcome(task.name, exc, now - job.started, job.attempts))
            self._release(job)
            return
        job.session = session
        self.transport.attach(session)
        session.start(now, task.operation())

    # -- progress
    def _changed(self, session: Session) -> None:
        job = self.busy.get(peer_key(session.sockaddr))
        if job is None or job.session is not session:
            return
        now = time.monotonic()
        if session.done and job.outcome is None and job.retry is None:
            error = session.error
            if error is None:
                self._report(
                    job,
                    Outcome(job.task.name, Result.OK, session.value, seconds=now - job.started, attempts=job.attempts),
                )
            elif isinstance(error, self.retry_on) and job.attempts <= self.retries:
                delay = self.backoff * 2 ** (job.attempts - 1)
                log.debug("%s: attempt %d failed (%s); retrying in %.1f s", job.task.name, job.attempts, error, delay)
                job.retry = self.transport.call_at(now + delay, functools.partial(self._attempt, job))
            else:
                self._report(job, failure_outcome(job.task.name, error, now - job.started, job.attempts))
        if session.finished:
            self.transport.detach(session)
            job.session = None
            if job.retry is None:
                self._release(job)

    def _expired(self, job: _Job, now: float) -> None:
        job.deadline = None
        if job.outcome is None:
            expired = timeout_outcome(job.task.name, self.timeout or math.inf, now - job.started)
            where = f"BMC {job.task.host}:{job.task.port}"
            self._report(
                job,
                replace(
                    expired,
                    error=f"{where}: no result within {self.timeout or math.inf:g} s",
                    hint=f"{UNREACHABLE_HINT}; or raise the timeout",
                ),
            )
        if job.retry is not None:
            job.retry.cancel()
            job.retry = None
        if job.session is not None:
            job.session.abort(now)  # -> _changed -> _release
        elif self.busy.get(job.key) is job:
            self._release(job)

    def _report(self, job: _Job, outcome: Outcome) -> None:
        job.outcome = outcome
        if self.on_outcome is not None:
            self.on_outcome(outcome)

    def _release(self, job: _Job) -> None:
        if job.deadline is not None:
            job.deadline.cancel()
            job.deadline = None
        if self.busy.get(job.key) is not job:
            return
        del self.busy[job.key]
        self.active -= 1
        queue = self.waiting.get(job.key)
        if queue:
            self.pending.appendleft(queue.popleft())
            if not queue:
                del self.waiting[job.key]


def run_tasks(tasks: Sequence[Task], **settings: Any) -> list[Outcome]:
    """One Outcome per task, in order (see the module doc for ``settings``)."""
    return Runner(tasks, **settings).run()
