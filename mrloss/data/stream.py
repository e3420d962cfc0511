"""Bounded, ordered, multi-process map over a stream: the engine of `mrloss prepare`."""

from __future__ import annotations

import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor


def default_num_proc(limit: int = 8) -> int:
    """The CPUs this process may run on, at most ``limit``."""
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, limit))


def _start_worker(initializer: Callable, initargs: tuple) -> None:
    """Ctrl-C reaches the whole process group: the workers ignore it, the main process stops them (no
    traceback per worker); SIGTERM ends a worker at once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    initializer(*initargs)


def ordered_map(
    function: Callable,
    items: Iterable,
    *,
    num_proc: int,
    initializer: Callable,
    initargs: tuple = (),
    window: int | None = None,
) -> Iterator:
    """``function(item)`` for every item, in the items' order, computed in ``num_proc`` processes (each set up
    once by ``initializer(*initargs)``). At most ``window`` (default ``2 * num_proc``) items are in flight, and
    ``items`` is read only as results are taken, so memory does not grow with the stream's length.
    ``num_proc <= 1`` runs everything in this process. Worker processes tokenize single-threaded
    (``TOKENIZERS_PARALLELISM=false``): the processes are the parallelism."""
    if num_proc <= 1:
        initializer(*initargs)
        for item in items:
            yield function(item)
        return
    window = window or 2 * num_proc
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # inherited by the workers, read when they are forked
    pool = ProcessPoolExecutor(num_proc, initializer=_start_worker, initargs=(initializer, initargs))
    try:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
