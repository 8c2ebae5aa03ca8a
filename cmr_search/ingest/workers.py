"""The process pool of an ingest run: ``workers - 1`` processes from a forkserver (this
process is the other worker), each of which exits when the ingest process is gone, and how
work is shared between the pool and this process."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager

__all__ = ["pool_map", "share_work", "worker_pool"]

#: what the forkserver imports once, so each worker is a cheap fork of it
PRELOAD = "cmr_search.ingest.pipeline"


@contextmanager
def worker_pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """One process pool for the whole run, of ``workers - 1`` processes: this process is the
    other worker (None: it is the only one)."""
    if workers <= 1:
        yield None
        return
    # forkserver: the parent holds Lance's native threads, which fork() would copy mid-lock.
    # Preloading the pipeline in the server makes each worker a cheap fork, not a fresh import.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([PRELOAD])
    with ProcessPoolExecutor(max_workers=workers - 1, mp_context=ctx, initializer=_watch_parent,
                             initargs=(os.getpid(),)) as pool:
        yield pool


def _watch_parent(pid: int, every_s: float = 1.0) -> None:
    """Pool worker initializer: exit once the ingest process is gone. A worker waits on a
    queue whose write end it holds itself, so a SIGKILL of the ingest would leave it (and,
    through the alive pipe the worker holds, the forkserver) running for good."""

    def watch() -> None:
        while True:
            time.sleep(every_s)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(1)

    threading.Thread(target=watch, name="cmr-watch-parent", daemon=True).start()


def pool_map(pool: ProcessPoolExecutor | None, fn: Callable, items: list, chunksize: int) -> Iterator:
    """``fn`` over ``items`` in the pool, in order (here, without a pool)."""
    return map(fn, items) if pool is None else pool.map(fn, items, chunksize=chunksize)


def share_work(pool: ProcessPoolExecutor | None, fn: Callable, items: list, depth: int) -> Iterator:
    """``fn`` over ``items`` (largest first) in the pool and in this process, results as they
    come. This process takes the small end: it works from the first second, while the pool's
    processes still start (a third of a second, 12 % of a 16-study run), and answers the
    pool's results between small items. ``depth`` items wait in the pool: enough that no
    pool process idles while this one works."""
    if pool is None:
        yield from map(fn, items)
        return
    todo = deque(items)
    in_flight: set[Future] = set()
    while todo or in_flight:
        while todo and len(in_flight) < depth:
            in_flight.add(pool.submit(fn, todo.popleft()))
        done = {f for f in in_flight if f.done()}
        in_flight -= done
        yield from (f.result() for f in done)
        if todo:
            yield fn(todo.pop())
        elif in_flight and not done:
            wait(in_flight, return_when=FIRST_COMPLETED)
