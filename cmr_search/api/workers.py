"""Several uvicorn workers on one port, each with a fair share of the keep-alive connections.

The kernel spreads new connections over the workers' ``SO_REUSEPORT`` sockets by a hash
of the client's address, so 32 keep-alive clients land 20/12 or 22/10 as often as 16/16,
and they stay where they landed. Each worker has one core's worth of Python, so the one
holding 22 connections answers them a third slower than the one holding 10: in the
benchmark that skew was the neighbour p99 (docs/BENCHMARKS.md). Here each worker
publishes how many connections it keeps in shared memory, and a worker holding more than
its fair share (the total over the live workers, rounded up) answers the next request
with ``Connection: close``; the client reconnects and the kernel deals the new connection
again, until the shares are even. That is the whole protocol: plain HTTP/1.1, nothing a
client has to know.

The same shared memory says which workers have loaded the index and encoders, so that
``/readyz`` answers 200 only when every worker would answer a search (a worker warms in
the background, and the kernel deals it connections from its first moment).

``WorkerListener`` carries the listening socket and the shared counts into each worker
process (uvicorn's supervisor pickles its sockets into the spawned workers; unpickled,
this registers the worker and gives uvicorn its socket). ``BalancedHttpProtocol`` is
uvicorn's httptools protocol with the bookkeeping; ``cmr serve`` names it as the
``http`` implementation when it runs more than one worker.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import socket

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["BalancedHttpProtocol", "ConnectionShare", "WorkerListener", "current_share"]

FIELDS = 3  # per worker slot: pid, connections kept, warm (0/1)


class ConnectionShare:
    """Per worker process: (pid, connections kept, warm) in memory shared by all the workers."""

    def __init__(self, workers: int):
        # spawn: uvicorn starts its workers that way, and only a spawn-context array pickles into them
        self.slots = multiprocessing.get_context("spawn").Array("q", FIELDS * workers)
        self.workers = workers
        self.slot: int | None = None
        self.leaving = 0  # this process's connections already told to close

    def __getstate__(self):
        return {"slots": self.slots, "workers": self.workers}

    def __setstate__(self, state):
        self.slots, self.workers, self.slot, self.leaving = state["slots"], state["workers"], None, 0

    def join(self) -> None:
        """Take this process's slot: a free one, or one whose worker has died (a restart)."""
        with self.slots.get_lock():
            raw = self.slots.get_obj()
            for i in range(self.workers):
                if raw[FIELDS * i] == 0 or not _alive(raw[FIELDS * i]):
                    raw[FIELDS * i], raw[FIELDS * i + 1], raw[FIELDS * i + 2] = os.getpid(), 0, 0
                    self.slot = i
                    return
        raise RuntimeError("more uvicorn workers than connection slots")

    def publish(self, kept: int) -> None:
        """This worker now keeps ``kept`` connections (one writer per slot: no lock)."""
        if self.slot is not None:
            self.slots.get_obj()[FIELDS * self.slot + 1] = kept

    def over_share(self, kept: int) -> bool:
        """Whether a worker keeping ``kept`` connections holds more than its fair share."""
        raw = self.slots.get_obj()
        counts = [raw[FIELDS * i + 1] for i in range(self.workers) if raw[FIELDS * i]]
        return bool(counts) and kept > math.ceil(sum(counts) / len(counts))

    def mark_warm(self) -> None:
        """This worker has loaded the index and encoders."""
        if self.slot is not None:
            self.slots.get_obj()[FIELDS * self.slot + 2] = 1

    def warm_workers(self) -> int:
        """How many live workers have loaded the index and encoders (a restarted one has not yet)."""
        raw = self.slots.get_obj()
        return sum(1 for i in range(self.workers)
                   if raw[FIELDS * i] and raw[FIELDS * i + 2] and _alive(raw[FIELDS * i]))


def current_share() -> ConnectionShare | None:
    """This worker process's share, when ``cmr serve`` runs several workers (else None)."""
    return BalancedHttpProtocol.share


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class BalancedHttpProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol; a connection over the worker's fair share is closed
    after its current response (``Connection: close``), so the client reconnects."""

    share: ConnectionShare | None = None  # set in the worker by WorkerListener

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._leaving = False
        self._publish()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.share is not None and getattr(self, "_leaving", False):
            self.share.leaving -= 1
            self._leaving = False
        self._publish()

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        share, cycle = self.share, self.cycle
        if share is None or cycle is None or self._leaving or not cycle.keep_alive:
            return
        kept = len(self.connections) - share.leaving
        if share.over_share(kept):
            cycle.keep_alive = False  # the response says Connection: close; uvicorn then closes
            self._leaving = True
            share.leaving += 1
            self._publish()

    def _publish(self) -> None:
        if self.share is not None:
            self.share.publish(len(self.connections) - self.share.leaving)


class WorkerListener:
    """What uvicorn's supervisor hands each worker as its listening socket: unpickled in
    the worker, it joins the connection share and becomes the socket. With ``reuse_port``
    each worker binds its own ``SO_REUSEPORT`` socket on the address (the kernel deals
    connections to them); otherwise they all accept on ``sock``, bound by the supervisor."""

    def __init__(self, host: str, port: int, backlog: int, share: ConnectionShare, sock: socket.socket | None = None):
        self.host, self.port, self.backlog, self.share, self.sock = host, port, backlog, share, sock

    def __reduce__(self):
        return _worker_socket, (self.host, self.port, self.backlog, self.share, self.sock)


def _worker_socket(host: str, port: int, backlog: int, share: ConnectionShare,
                   sock: socket.socket | None) -> socket.socket:
    share.join()
    BalancedHttpProtocol.share = share
    if sock is not None:
        return sock
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock
