"""Ray, the engine of the cluster paths (``cmr ingest --ray``, ``cmr embed --ray``): joining a
running cluster or starting one on this machine, and a clear error where neither works."""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from types import ModuleType

from cmr_search.core.exceptions import InputError

__all__ = ["ray_cluster"]

log = logging.getLogger(__name__)


@contextmanager
def ray_cluster(address: str | None, num_cpus: int | None = None) -> Iterator[ModuleType]:
    """Ray, ready: ``address`` "auto" joins the cluster running on this machine (or the one
    ``RAY_ADDRESS`` names), "host:port" or "ray://host:port" joins that one, None starts a
    local cluster of this machine (``num_cpus`` caps it) and stops it at the end. A cluster
    joined (or one this process had already joined) is left running. The nodes must have
    cmr-search installed, as the driver has. Raises InputError where Ray is missing or
    cannot start or join."""
    try:
        import ray
    except ImportError:
        raise InputError("the cluster paths need Ray: pip install 'ray[data]'") from None
    if ray.is_initialized():  # a caller (a test's cluster, a notebook) joined one already
        yield ray
        return
    options = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address not in (None, "auto"):
        _reachable(address)
    try:
        if address is None:
            ray.init(num_cpus=num_cpus, **options)
        else:
            ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as err:
        what = "start a local Ray cluster" if address is None else f"join the Ray cluster at {address!r}"
        hint = ("check that /tmp is writable and ports are free" if address is None else
                "start it with `ray start --head`, or give `local` to start one on this machine; a cluster "
                "with token authentication needs its token in $RAY_AUTH_TOKEN")
        raise InputError(f"cannot {what} ({type(err).__name__}: {str(err)[:200]}); {hint}") from None
    log.info("Ray: %s with %s CPUs, %s GPUs", "started" if address is None else f"joined {address}",
             ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0))
    try:
        # Ray prints its own notices (a task retried after its worker died) on stdout, which
        # is the JSON document's under --json: they go to stderr with the progress bars
        with redirect_stdout(sys.stderr):
            yield ray
    finally:
        ray.shutdown()


def _reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on an address nothing answers at: Ray itself keeps trying for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"the Ray address {address!r} is not host:port or ray://host:port; "
                         "give `local` to start a cluster on this machine or `auto` to join the running one")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise InputError(f"nothing answers at the Ray address {address!r} ({err.strerror or err}); start the "
                         "cluster with `ray start --head`, or give `local` to start one on this machine") from None
