"""The process pool of an ingest run: ``workers - 1`` processes from a forkserver (this
process is the other worker), each of which exits when the ingest process is gone."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager

__all__ = ["worker_pool"]

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
