"""Real Ray clusters for the cluster-path tests: one node with 2 CPUs, or two nodes on this
machine (``ray.cluster_utils.Cluster``, Ray's own way to test multi-node code). A test that
cannot start Ray skips with the reason."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

OPTIONS = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}

# the test clusters listen on this machine only; without token authentication a driver in
# a subprocess (the command line) joins them as a user's would join theirs
os.environ["RAY_AUTH_MODE"] = "disabled"


@contextmanager
def one_node(num_cpus: int = 2) -> Iterator[object]:
    """``ray.init`` of a local cluster with ``num_cpus``; shut down afterwards."""
    ray = pytest.importorskip("ray", reason="Ray is not installed")
    try:
        ray.init(num_cpus=num_cpus, **OPTIONS)
    except Exception as err:  # noqa: BLE001 - whatever stops Ray here is the reason to skip
        pytest.skip(f"Ray cannot start here: {type(err).__name__}: {err}")
    try:
        yield ray
    finally:
        ray.shutdown()


@contextmanager
def two_nodes(cpus_per_node: int = 1) -> Iterator[object]:
    """A head and a worker node on this machine, joined by this process; torn down afterwards."""
    ray = pytest.importorskip("ray", reason="Ray is not installed")
    from ray.cluster_utils import Cluster

    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus_per_node, "include_dashboard": False})
        cluster.add_node(num_cpus=cpus_per_node)
        ray.init(address=cluster.address, **OPTIONS)
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"a two-node Ray cluster cannot start here: {type(err).__name__}: {err}")
    try:
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def kill_a_worker(task_name: str) -> bool:
    """SIGKILL one worker process running a task (or an actor method) named ``task_name``;
    whether one was. Ray titles a busy worker process ``ray::<name>`` (``ray::IDLE`` when
    idle), which is how it is found without the dashboard's state API."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fp:
                title = fp.read().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::") and task_name in title:
            os.kill(int(pid), signal.SIGKILL)
            return True
    return False
