"""provision.fanout: bounded, batched, timed, retried; failures stay per item."""

from __future__ import annotations

import os
import threading
import time

import pytest

from provision.errors import BmcError, ProvisionError
from provision.fanout import FanoutOptions, Result, fan_out


class Flaky(BmcError):
    pass


def test_every_item_gets_an_outcome_in_order_and_failures_do_not_stop_others() -> None:
    def task(i: int) -> int:
        if i == 3:
            raise BmcError(f"node{i}: refused", hint="fix it")
        if i == 5:
            raise ValueError("boom")
        return i * 10

    outcomes = fan_out(list(range(8)), task, name=lambda i: f"node{i}", options=FanoutOptions(fanout=3))
    assert [o.node for o in outcomes] == [f"node{i}" for i in range(8)]
    assert [o.value for o in outcomes if o.ok] == [0, 10, 20, 40, 60, 70]
    assert (outcomes[3].result, outcomes[3].error, outcomes[3].hint, outcomes[3].kind) == (
        Result.FAILED,
        "node3: refused",
        "fix it",
        "BmcError",
    )
    assert outcomes[5].error == "ValueError: boom"


def test_concurrency_is_bounded_by_fanout() -> None:
    lock = threading.Lock()
    running = peak = 0

    def task(_: int) -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.02)
        with lock:
            running -= 1

    fan_out(list(range(40)), task, options=FanoutOptions(fanout=5))
    assert peak == 5


def test_timeout_reports_the_slow_item_and_does_not_wait_for_it() -> None:
    release = threading.Event()

    def task(i: int) -> int:
        if i == 1:
            release.wait(10)
        return i

    started = time.monotonic()
    outcomes = fan_out([0, 1, 2], task, options=FanoutOptions(timeout=0.3))
    elapsed = time.monotonic() - started
    release.set()
    assert [o.result for o in outcomes] == [Result.OK, Result.TIMEOUT, Result.OK]
    assert "no result after 0.3 s" in (outcomes[1].error or "")
    assert elapsed < 3


def test_retries_with_backoff_only_for_named_errors() -> None:
    calls: dict[int, list[float]] = {0: [], 1: []}

    def task(i: int) -> str:
        calls[i].append(time.monotonic())
        if i == 0 and len(calls[0]) < 3:
            raise Flaky("not yet")
        if i == 1:
            raise BmcError("auth")
        return "done"

    opts = FanoutOptions(retries=2, backoff=0.05, retry_on=(Flaky,))
    outcomes = fan_out([0, 1], task, options=opts)
    assert (outcomes[0].result, outcomes[0].attempts) == (Result.OK, 3)
    gaps = [b - a for a, b in zip(calls[0], calls[0][1:], strict=False)]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1  # exponential
    assert (outcomes[1].result, outcomes[1].attempts) == (Result.FAILED, 1)  # not retried


def test_batches_run_in_turn_with_a_wait_between() -> None:
    starts: dict[int, float] = {}
    waits: list[tuple[int, float]] = []

    def task(i: int) -> None:
        starts[i] = time.monotonic()

    opts = FanoutOptions(batch=2, batch_wait=0.2)
    fan_out(list(range(5)), task, options=opts, on_batch_wait=lambda n, w: waits.append((n, w)))
    assert waits == [(2, 0.2), (3, 0.2)]
    assert starts[2] - max(starts[0], starts[1]) >= 0.2
    assert starts[4] - max(starts[2], starts[3]) >= 0.2


def test_worker_processes_share_the_work() -> None:
    outcomes = fan_out(list(range(64)), lambda i: os.getpid(), options=FanoutOptions(processes=4, fanout=8))
    pids = {o.value for o in outcomes}
    assert all(o.ok for o in outcomes)
    assert len(pids) == 4 and os.getpid() not in pids


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("fanout", 0, "--fanout"),
        ("batch", 0, "--batch"),
        ("batch_wait", -1.0, "--batch-wait"),
        ("timeout", 0.0, "--timeout"),
        ("retries", -1, "--retries"),
    ],
)
def test_bad_options_name_the_option(field: str, value: float, message: str) -> None:
    with pytest.raises(ProvisionError) as info:
        FanoutOptions(**{field: value})  # type: ignore[arg-type]
    assert info.value.message.startswith(message)
    assert info.value.hint
