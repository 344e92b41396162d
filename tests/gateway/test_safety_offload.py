"""A long request's texts are scanned in a worker thread that lets the event loop run meanwhile.

Handing the work to a thread is not enough by itself: CPython gives the GIL to a waiting thread
on a timed request only if the holder has not released it in between, and numpy's small
operations release and retake it every few microseconds, so the event loop (and every other
request) waited for the whole batch. The loop's progress is counted, not timed."""

from __future__ import annotations

import asyncio

from gateway.safety import _run_until_blocked
from safety.base import ScanContext
from safety.policy import build_policy, default_policy

HISTORY = [f"Turn {i}: which capital is this, again? " * 2 for i in range(2_000)]


async def _loop_turns_during(work: asyncio.Future[object]) -> int:
    turns = 0
    while not work.done():
        await asyncio.sleep(0.001)  # one turn of the loop, as any other request would get
        turns += 1
    return turns


def test_the_event_loop_runs_while_a_long_history_is_scanned() -> None:
    spec = default_policy()
    # a stall of the loaded test machine (seen once in the full suite: one scan over the 250 ms
    # budget, failing closed after 11 messages) must not end the batch: this is about the loop
    generous = [s.model_copy(update={"budget_ms": 60_000.0}) for s in spec.scanners]
    policy = build_policy(spec.model_copy(update={"scanners": generous}))
    context = ScanContext("input", "k", role="user")
    scans = [(text, context, f"messages[{i}].content") for i, text in enumerate(HISTORY)]
    counted = []

    async def main() -> tuple[int, int]:
        work = asyncio.ensure_future(
            asyncio.to_thread(_run_until_blocked, policy, scans, counted.append, True)
        )
        turns = await _loop_turns_during(work)
        return turns, len(await work)

    turns, scanned = asyncio.run(main())
    assert scanned == len(HISTORY) == len(counted)  # every message scanned and counted
    # the batch lasts a couple of hundred of the loop's 1 ms sleeps, and the loop gets a turn
    # at least every few of them (measured: 107 and 131 turns); before the pauses it got 1 to
    # 19 turns in all, at the start and the end
    assert turns >= 50
