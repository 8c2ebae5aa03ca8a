"""An S3-compatible server for the tests: moto's standalone server on a free loopback port,
a bucket made with boto3, the environment Lance/LanceDB and boto3 read to reach it, stopped
at the end. Its own module name, like `orthanc`: `conftest` is ambiguous across test folders.

moto[server] and boto3 are dev dependencies (pyproject's `dev` extra); where either is
missing, `moto_or_skip` says so and the tests that need it skip.

What each client reads (checked against moto 5.2, pylance 14, lancedb 0.40, boto3 1.44):

- Lance (Rust object_store, through lancedb too) reads ``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT``) and needs
  ``AWS_ALLOW_HTTP=true`` for a plain-http endpoint (without it every request fails with
  "Generic S3 error"). The region is optional for moto (``AWS_REGION`` or
  ``AWS_DEFAULT_REGION``). Path-style requests are its default; setting
  ``AWS_VIRTUAL_HOSTED_STYLE_REQUEST=true`` breaks a loopback endpoint.
  The same keys, lower-case, work as ``storage_options`` (``aws_access_key_id``,
  ``aws_secret_access_key``, ``aws_endpoint``, ``aws_region``, ``allow_http``).
- boto3 reads ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` /
  ``AWS_REGION`` and ``AWS_ENDPOINT_URL`` (not ``AWS_ENDPOINT``).
- ``pyarrow.fs.S3FileSystem()`` does NOT take the endpoint from the environment: pass
  ``endpoint_override`` and ``scheme="http"`` (``S3Server.arrow_fs``).

moto honours ``If-None-Match: *`` and ``If-Match: <etag>`` on PutObject (HTTP 412
otherwise), which is what Lance's commits on S3 rely on; `S3Server.conditional_put_works`
checks it, so a test can assert it before testing concurrent writers.

Use from a fixture::

    @pytest.fixture(scope="session")
    def s3():
        with s3_server() as server:
            yield server

    @pytest.fixture
    def s3_store(s3, monkeypatch, request):
        bucket = s3.new_bucket()                 # a fresh bucket per test: no cleanup needed
        s3.apply_env(monkeypatch)                # for Lance, LanceDB and boto3 in this process
        return s3.uri(bucket, "store")           # "s3://<bucket>/store"

A subprocess (the `cmr` command line, a Ray worker) gets ``{**os.environ, **server.env}``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from unittest import mock

import pytest

ACCESS_KEY = "cmr-test-access"
SECRET_KEY = "cmr-test-secret-5d1e8b"  # a distinctive value: leak tests can look for it
REGION = "us-east-1"


def moto_or_skip() -> None:
    """Skip the test where moto's server or boto3 is not installed."""
    for module, why in (("moto", "moto is not installed (pip install 'moto[server]'; the dev extra has it)"),
                        ("moto.server", "moto's standalone server is not installed (pip install 'moto[server]')"),
                        ("boto3", "boto3 is not installed (pip install boto3; the dev extra has it)")):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            pytest.skip(why)
    # the server needs flask and werkzeug, which the `server` extra of moto brings
    for module in ("flask", "werkzeug"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"moto's server needs {module} (pip install 'moto[server]')")


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class S3Server:
    """A running moto server: where it listens, the credentials it accepts, the buckets made."""

    endpoint: str
    bucket: str
    _stop: object = field(repr=False, default=None)
    buckets: list[str] = field(default_factory=list)

    # -- what clients need ---------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """Environment variables for Lance/LanceDB, boto3 and a subprocess (`cmr ...`)."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint,  # Lance and boto3 both read this one
            "AWS_ENDPOINT": self.endpoint,  # Lance's own spelling, for older object_store versions
            "AWS_ALLOW_HTTP": "true",  # the endpoint is plain http
            "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata probe (boto3) when a key is missing
        }

    @property
    def storage_options(self) -> dict[str, str]:
        """The same as Lance ``storage_options`` (``lancedb.connect(uri, storage_options=...)``,
        ``lance.dataset``, ``write_fragments``, ``LanceDataset.commit``)."""
        return {"aws_access_key_id": ACCESS_KEY, "aws_secret_access_key": SECRET_KEY, "aws_region": REGION,
                "aws_endpoint": self.endpoint, "allow_http": "true"}

    def apply_env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Set ``env`` for this test (undone by monkeypatch), dropping AWS settings of the
        machine's own (a profile, a session token) that would otherwise mix in."""
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_CONFIG_FILE",
                     "AWS_SHARED_CREDENTIALS_FILE", "AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "AWS_S3_EXPRESS"):
            monkeypatch.delenv(name, raising=False)
        for name, value in self.env.items():
            monkeypatch.setenv(name, value)

    def uri(self, bucket: str | None = None, prefix: str = "") -> str:
        """``s3://bucket/prefix`` (the default bucket when none is named)."""
        path = f"{bucket or self.bucket}/{prefix.strip('/')}".rstrip("/")
        return f"s3://{path}"

    # -- direct access (for assertions) -----------------------------------------------------
    def client(self):
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION)

    def arrow_fs(self):
        """A ``pyarrow.fs.S3FileSystem`` for this server (paths are ``bucket/key``)."""
        from pyarrow import fs

        return fs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY, region=REGION,
                               endpoint_override=self.endpoint.removeprefix("http://"), scheme="http")

    def new_bucket(self, name: str | None = None) -> str:
        """Make a bucket (a random name unless one is given); its name."""
        name = name or f"cmr-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        self.buckets.append(name)
        return name

    def keys(self, prefix: str = "", bucket: str | None = None) -> list[str]:
        """Every object key under ``prefix`` in ``bucket`` (the default one), sorted."""
        client, out, token = self.client(), [], None
        while True:
            kw = {"ContinuationToken": token} if token else {}
            page = client.list_objects_v2(Bucket=bucket or self.bucket, Prefix=prefix, **kw)
            out += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return sorted(out)
            token = page["NextContinuationToken"]

    def read(self, key: str, bucket: str | None = None) -> bytes:
        """One object's bytes."""
        return self.client().get_object(Bucket=bucket or self.bucket, Key=key)["Body"].read()

    def conditional_put_works(self, bucket: str | None = None) -> bool:
        """Whether the server refuses a second ``PutObject`` with ``If-None-Match: *`` (what
        Lance's commits on S3 depend on for concurrent writers; moto does)."""
        from botocore.exceptions import ClientError

        client, bucket = self.client(), bucket or self.bucket
        key = f".probe/conditional-put-{secrets.token_hex(4)}"
        client.put_object(Bucket=bucket, Key=key, Body=b"1", IfNoneMatch="*")
        try:
            client.put_object(Bucket=bucket, Key=key, Body=b"2", IfNoneMatch="*")
            refused = False
        except ClientError as error:
            refused = error.response["Error"]["Code"] in ("PreconditionFailed", "412")
        client.delete_object(Bucket=bucket, Key=key)
        return refused

    def reset(self) -> None:
        """Drop every bucket and object (moto's reset API); the default bucket is made again."""
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST"), timeout=10)
        self.buckets.clear()
        self.new_bucket(self.bucket)

    def stop(self) -> None:
        """Stop the server (its objects are lost)."""
        if self._stop is not None:
            self._stop()
            self._stop = None


def start_s3(bucket: str = "cmr-test", in_process: bool = False, timeout_s: float = 30.0) -> S3Server:
    """Start moto's server on a free loopback port and make ``bucket``.

    By default the server is its own process (``python -m moto.server``), so that its
    request handling does not share the test's GIL and its state is its own; it gets SIGTERM
    if the test process dies (util-linux's setpriv, where present). ``in_process`` uses
    ``moto.server.ThreadedMotoServer`` instead (faster start, but the buckets live in this
    process's moto backends, shared with every other in-process moto server and any
    ``mock_aws`` in the same process)."""
    moto_or_skip()
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    if in_process:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
        threaded = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        threaded.start()
        stop = threaded.stop
    else:
        setpriv = shutil.which("setpriv")
        prefix = [setpriv, "--pdeathsig", "TERM"] if setpriv else []
        process = subprocess.Popen([*prefix, sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def stop() -> None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    server = S3Server(endpoint, bucket, stop)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if not in_process and process.poll() is not None:
                raise RuntimeError(f"moto's server exited with code {process.returncode} at start") from None
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"moto's server did not listen on {endpoint} within {timeout_s:.0f} s") from None
            time.sleep(0.05)
    try:
        server.new_bucket(bucket)
    except Exception:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def s3_server(bucket: str = "cmr-test", in_process: bool = False) -> Iterator[S3Server]:
    """``start_s3`` as a context manager: the server, stopped on the way out (skips the test
    where moto is missing)."""
    server = start_s3(bucket, in_process=in_process)
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def s3_environment(server: S3Server) -> Iterator[dict[str, str]]:
    """``server.env`` set in ``os.environ`` for the block, the previous values put back
    after (for code outside a test function, where monkeypatch is not at hand)."""
    with mock.patch.dict(os.environ, server.env):
        yield server.env
