"""Worker processes for CPU-heavy work on untrusted input (parsing uploaded files), with a time
limit that stops the work.

A thread cannot be stopped, and Python code in it holds the GIL; a worker process can be
killed. ``WorkerPool`` runs a function in one of a bounded number of processes (pebble's
``ProcessPool``: a task that overruns its time limit has its worker killed and replaced), so a
hostile file costs at most ``timeout`` seconds of one worker and never stalls the event loop.
Workers are started with ``spawn`` (no copy of the server's threads, models or sockets) and
warmed at start-up, so that no request pays for starting one.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

from pebble import ProcessPool

T = TypeVar("T")


class WorkTimedOut(Exception):
    """The work ran past its time limit; its worker was killed."""


def _nothing() -> None:
    return None


class WorkerPool:
    def __init__(self, workers: int, timeout: float) -> None:
        self.timeout = timeout
        self._pool = ProcessPool(max_workers=workers, context=multiprocessing.get_context("spawn"))

    async def warm(self) -> None:
        """Start the workers now (a spawned interpreter takes a moment)."""
        await asyncio.wrap_future(self._pool.schedule(_nothing))

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` in a worker; raises what it raises (pickled back), or
        ``WorkTimedOut`` after ``timeout`` seconds."""
        future = self._pool.schedule(fn, args=args, kwargs=kwargs, timeout=self.timeout)
        try:
            return await asyncio.wrap_future(future)
        except (TimeoutError, FutureTimeout):
            raise WorkTimedOut(f"the work took more than {self.timeout:g} s") from None
        except asyncio.CancelledError:
            future.cancel()  # the client left: the worker is stopped too
            raise

    def close(self) -> None:
        self._pool.stop()
        self._pool.join(timeout=10)
