"""Several uvicorn workers on one port: each worker's own listening socket, and the shared
connection counts that close a connection on a worker holding more than its share."""

from __future__ import annotations

import multiprocessing
import os
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from cmr_search.api.workers import FIELDS, BalancedHttpProtocol, ConnectionShare, WorkerListener


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def share():
    """A two-worker share, joined by this process; the protocol's class-wide share reset after."""
    share = ConnectionShare(2)
    share.join()
    yield share
    BalancedHttpProtocol.share = None


def _sibling(share: ConnectionShare, pid: int, kept: int, warm: bool = False) -> None:
    """Pretend another worker (process ``pid``) keeps ``kept`` connections."""
    raw = share.slots.get_obj()
    raw[FIELDS], raw[FIELDS + 1], raw[FIELDS + 2] = pid, kept, int(warm)


def test_fair_share_is_the_mean_over_live_workers_rounded_up(share):
    share.publish(3)
    assert not share.over_share(3)  # alone: everything is its share
    _sibling(share, os.getppid(), 1)
    share.publish(3)
    assert share.over_share(3) and not share.over_share(2)  # (3 + 1) / 2 = 2
    _sibling(share, os.getppid(), 2)
    share.publish(3)
    assert not share.over_share(3)  # 5 / 2 rounds up to 3: an odd total cannot split evenly


def test_ready_counts_the_live_warm_workers(share):
    assert share.warm_workers() == 0
    share.mark_warm()
    assert share.warm_workers() == 1  # the sibling slot is still empty: not every worker is warm
    _sibling(share, os.getppid(), 0, warm=False)
    assert share.warm_workers() == 1
    _sibling(share, os.getppid(), 0, warm=True)
    assert share.warm_workers() == 2 == share.workers
    dead, _ = _in_worker(_join, ConnectionShare(1))  # a pid that has exited
    _sibling(share, dead, 0, warm=True)
    assert share.warm_workers() == 1  # a dead worker's flag does not count


def _join(share: ConnectionShare, answers) -> None:
    """A spawned worker process: join the share and say which slot it took."""
    try:
        share.join()
        answers.put((os.getpid(), share.slot))
    except RuntimeError as error:
        answers.put((os.getpid(), str(error)))


def _listen(sockets: list, answers) -> None:
    """A spawned worker process: receive the listening socket as uvicorn's workers do."""
    sock = sockets[0]
    answers.put((sock.getsockname(), BalancedHttpProtocol.share.slot))
    sock.close()


def _in_worker(target, *args):
    """Run ``target(*args, answers)`` in a spawned process, as uvicorn starts its workers."""
    spawn = multiprocessing.get_context("spawn")
    answers = spawn.Queue()
    worker = spawn.Process(target=target, args=(*args, answers))
    worker.start()
    answer = answers.get(timeout=60)
    worker.join(30)
    return worker.pid, answer


def test_a_dead_workers_slot_is_taken_by_its_replacement(share):
    first, (_, slot) = _in_worker(_join, share)
    assert slot == 1 and share.slots.get_obj()[FIELDS] == first  # that worker has exited since
    second, (_, slot) = _in_worker(_join, share)
    assert slot == 1 and share.slots.get_obj()[FIELDS] == second  # its replacement took the slot
    assert share.slots.get_obj()[FIELDS + 2] == 0  # and has not loaded anything yet
    _sibling(share, os.getppid(), 0)  # both slots live
    _, (_, error) = _in_worker(_join, share)
    assert "more uvicorn workers" in error


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="no SO_REUSEPORT on this platform")
def test_each_worker_gets_its_own_listening_socket_on_one_port():
    """What uvicorn's supervisor hands each spawned worker becomes that worker's own socket
    on the shared address (the kernel spreads connections over them), and joins the share."""
    port = _port()
    listener = WorkerListener("127.0.0.1", port, 16, ConnectionShare(2))
    _, (address, slot) = _in_worker(_listen, [listener])
    assert address == ("127.0.0.1", port) and slot == 0
    _, (address, slot) = _in_worker(_listen, [listener])
    assert address == ("127.0.0.1", port) and slot == 0  # the first worker has exited: its slot is free
    with socket.socket() as mine:  # another SO_REUSEPORT socket on the port binds beside the workers'
        mine.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        mine.bind(("127.0.0.1", port))


@pytest.fixture()
def balanced_server(share):
    """A real uvicorn server on this thread's share, speaking BalancedHttpProtocol."""
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict:
        return {"ok": True}

    port = _port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=BalancedHttpProtocol,
                                           log_level="warning", lifespan="off"))
    BalancedHttpProtocol.share = share
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def _kept(share: ConnectionShare) -> int:
    return share.slots.get_obj()[FIELDS * share.slot + 1]


def test_a_worker_over_its_share_closes_connections_until_even(share, balanced_server):
    _sibling(share, os.getppid(), 4)  # a live sibling worker with four connections
    clients = [httpx.Client(base_url=balanced_server, timeout=10) for _ in range(4)]
    try:
        for client in clients:
            assert client.get("/ping").headers.get("connection") != "close"  # 4 and 4: even
        assert _kept(share) == 4
        _sibling(share, os.getppid(), 2)  # 4 here, 2 there: the share is 3, so one is told to go
        closing = [c.get("/ping").headers.get("connection") == "close" for c in clients]
        assert closing == [True, False, False, False]
        time.sleep(0.2)
        assert _kept(share) == 3
        _sibling(share, os.getppid(), 6)  # the sibling holds more: nobody here is told to leave
        assert not any(c.get("/ping").headers.get("connection") == "close" for c in clients)
        assert _kept(share) == 4  # the closed client reconnected (here: this is the only server)
    finally:
        for client in clients:
            client.close()
    time.sleep(0.2)
    assert _kept(share) == 0
