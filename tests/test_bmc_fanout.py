"""provision.fanout: batched, in worker processes if asked; failures stay per item."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable

import pytest

from provision.errors import BmcError, ProvisionError
from provision.fanout import FanoutOptions, Outcome, Result, failure_outcome, fan_out_batches

Report = Callable[[Outcome], None] | None


def ok(index: int, value: object) -> tuple[int, Outcome]:
    return index, Outcome(f"node{index}", Result.OK, value=value)


def test_failure_outcome_carries_message_hint_and_kind() -> None:
    refused = failure_outcome("node3", BmcError("node3: refused", hint="fix it"), 0.5, 2)
    assert (refused.result, refused.error, refused.hint, refused.kind, refused.attempts) == (
        Result.FAILED,
        "node3: refused",
        "fix it",
        "BmcError",
        2,
    )
    assert failure_outcome("node5", ValueError("boom"), 0.0, 1).error == "ValueError: boom"


def test_batches_run_in_turn_with_a_wait_between_and_outcomes_keep_item_order() -> None:
    started: list[tuple[list[int], float]] = []
    waits: list[tuple[int, float]] = []
    reported: list[str] = []

    def run_batch(indexes: list[int], fanout: int, report: Report) -> list[tuple[int, Outcome]]:
        started.append((indexes, time.monotonic()))
        got = [ok(i, i * 10) for i in reversed(indexes)]  # an engine answers in any order
        for _, outcome in got:
            assert report is not None
            report(outcome)
        return got

    opts = FanoutOptions(batch=2, batch_wait=0.2)
    outcomes = fan_out_batches(
        5,
        run_batch,
        name_of=lambda i: f"node{i}",
        options=opts,
        on_outcome=lambda o: reported.append(o.node),
        on_batch_wait=lambda n, w: waits.append((n, w)),
    )
    assert [indexes for indexes, _ in started] == [[0, 1], [2, 3], [4]]
    assert waits == [(2, 0.2), (3, 0.2)]
    assert all(b - a >= 0.2 for (_, a), (_, b) in itertools.pairwise(started))
    assert [o.value for o in outcomes] == [0, 10, 20, 30, 40]
    assert sorted(reported) == [f"node{i}" for i in range(5)]


def test_worker_processes_share_the_work() -> None:
    def run_batch(indexes: list[int], fanout: int, report: Report) -> list[tuple[int, Outcome]]:
        assert fanout == 2  # each worker gets its share of --fanout 8
        return [ok(i, os.getpid()) for i in indexes]

    outcomes = fan_out_batches(64, run_batch, name_of=str, options=FanoutOptions(processes=4, fanout=8))
    pids = {o.value for o in outcomes}
    assert all(o.ok for o in outcomes) and len(outcomes) == 64
    assert len(pids) == 4 and os.getpid() not in pids


def test_a_failing_worker_reports_each_of_its_items() -> None:
    def run_batch(indexes: list[int], fanout: int, report: Report) -> list[tuple[int, Outcome]]:
        raise BmcError("engine broke", hint="report it")

    outcomes = fan_out_batches(16, run_batch, name_of=lambda i: f"n{i}", options=FanoutOptions(processes=2))
    assert [o.node for o in outcomes] == [f"n{i}" for i in range(16)]
    assert {(o.result, o.error, o.hint) for o in outcomes} == {(Result.FAILED, "engine broke", "report it")}


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
