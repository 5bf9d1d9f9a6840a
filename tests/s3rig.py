"""The real S3 server of the tests: the Ceph RADOS Gateway that scripts/start-s3.sh starts.

Its environment (AWS_* variables and the test bucket) is in ENV_FILE.  Tests that need
it skip when it is not running on a developer machine and FAIL under CI=true.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import pytest

ENV_FILE = "/run/backupkit-test-s3/env"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def gateway_env() -> dict[str, str]:
    """The gateway's environment; skips (fails under CI) when it is not running."""
    why = ""
    env: dict[str, str] = {}
    try:
        with open(ENV_FILE) as f:
            for line in f:
                k, sep, v = line.strip().partition("=")
                if sep:
                    env[k] = v
    except OSError as e:
        why = f"{ENV_FILE}: {e.strerror} (run scripts/start-s3.sh)"
    if not why:
        import boto3
        import botocore.config
        import botocore.exceptions

        client = boto3.client(
            "s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name=env["AWS_DEFAULT_REGION"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            config=botocore.config.Config(connect_timeout=3, read_timeout=10,
                                          retries={"max_attempts": 1}))
        try:
            client.head_bucket(Bucket=env["BACKUPKIT_TEST_S3_BUCKET"])
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            why = f"the test gateway does not answer: {e} (run scripts/start-s3.sh)"
    if why:
        if IN_CI:
            pytest.fail(f"the S3 gateway is required in CI: {why}", pytrace=False)
        pytest.skip(why)
    return env


@contextlib.contextmanager
def s3_location(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """s3://BUCKET/PREFIX of a fresh prefix, with the AWS_* environment set (also for
    child processes); everything under it is deleted afterwards."""
    env = gateway_env()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    url = f"s3://{env['BACKUPKIT_TEST_S3_BUCKET']}/test-{secrets.token_hex(6)}"
    try:
        yield url
    finally:
        from backupkit.repo.url import open_storage

        st = open_storage(url)
        keys = [st.prefix + "/" + info.key for info in st.list("")]  # type: ignore[attr-defined]
        client = st._client  # type: ignore[attr-defined]
        for i in range(0, len(keys), 1000):  # one request per 1,000 keys
            client.delete_objects(Bucket=env["BACKUPKIT_TEST_S3_BUCKET"], Delete={
                "Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})

def ceph_conf(env: dict[str, str]) -> str:
    """The test cluster's ceph.conf (scripts/start-s3.sh)."""
    state = os.environ.get("BACKUPKIT_TEST_S3_STATE", "/var/lib/backupkit-test-s3")
    return env.get("BACKUPKIT_TEST_S3_CEPH_CONF") or os.path.join(state, "ceph.conf")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class OwnGateway:
    """A second radosgw of the test cluster (same mon, OSD, pools, users and buckets) on
    a port of its own, under its own client name: a test may kill and restart it while
    the shared gateway of scripts/start-s3.sh keeps serving everyone else.

    Only this process is ever signalled (by the Popen object that started it)."""

    def __init__(self, workdir: str) -> None:
        env = gateway_env()
        self.conf = ceph_conf(env)
        self.port = _free_port()
        self.name = f"client.rgw.bktest-{os.getpid()}-{secrets.token_hex(3)}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = os.path.join(workdir, "radosgw.log")
        self.run_dir = os.path.dirname(ENV_FILE)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it and wait until it answers HTTP (well under a second here)."""
        if shutil.which("radosgw") is None or not os.path.exists(self.conf):
            why = f"cannot start a second radosgw (radosgw, {self.conf})"
            if IN_CI:
                pytest.fail(why, pytrace=False)
            pytest.skip(why)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                ["radosgw", "-f", "-n", self.name, "-c", self.conf,
                 "--rgw-frontends", f"beast endpoint=127.0.0.1:{self.port} tcp_nodelay=1",
                 "--log-file", self.log,
                 "--admin-socket", os.path.join(self.run_dir, f"{self.name}.asok"),
                 "--pid-file", os.path.join(self.run_dir, f"{self.name}.pid")],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"radosgw {self.name} exited {self.proc.returncode} "
                                     f"(log: {self.log})")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/")
                conn.getresponse().read()
                conn.close()
                return
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise AssertionError(f"radosgw {self.name} did not answer within 90 s ({self.log})")

    def kill(self) -> None:
        """SIGKILL, like a crash; reaped at once (nothing of it answers afterwards)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        for suffix in (".asok", ".pid"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.run_dir, self.name + suffix))


@contextlib.contextmanager
def own_gateway(workdir: str) -> Iterator[OwnGateway]:
    gw = OwnGateway(workdir)
    gw.start()
    try:
        yield gw
    finally:
        gw.kill()


class ForwardingProxy:
    """An HTTP proxy in front of the gateway: ``handle`` gets each request (default:
    forward it and pass the answer back); subclasses put faults into the traffic with
    ``read_body``, ``forward`` and ``answer``."""

    timeout = 60

    def __init__(self, upstream: str) -> None:
        import http.server
        import threading

        u = urllib.parse.urlsplit(upstream)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                return None

            def _any(self) -> None:
                proxy.handle(self)

            do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        self.answer(h, *self.forward(h, self.read_body(h)))

    @staticmethod
    def read_body(h: http.server.BaseHTTPRequestHandler) -> bytes:
        n = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(n) if n else b""

    def forward(self, h: http.server.BaseHTTPRequestHandler, body: bytes
                ) -> tuple[http.client.HTTPResponse, bytes]:
        """Do the request on the gateway; its answer and body."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        conn.putrequest(h.command, h.path, skip_host=True, skip_accept_encoding=True)
        for k, v in h.headers.items():
            conn.putheader(k, v)
        conn.endheaders(body if body else None)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp, data

    @staticmethod
    def answer(h: http.server.BaseHTTPRequestHandler, resp: http.client.HTTPResponse,
               data: bytes) -> None:
        h.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class HoldingProxy(ForwardingProxy):
    """A proxy in front of the gateway that forwards every request and, for the
    first one ``hold(method, path)`` picks, holds the answer back: ``held`` is set
    once the gateway has done that request, and the client gets no answer until
    ``release`` is set (then its connection is dropped).  A test kills the client
    while it waits: a kill right after a known request took effect."""

    def __init__(self, upstream: str, hold: Callable[[str, str], bool]) -> None:
        import threading

        self.hold = hold
        self.held = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()
        super().__init__(upstream)

    def handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        resp, data = self.forward(h, self.read_body(h))
        with self.lock:
            mine = not self.held.is_set() and self.hold(h.command, h.path)
            if mine:
                self.held.set()
        if mine:
            self.release.wait()
            h.close_connection = True
            return
        self.answer(h, resp, data)

    def close(self) -> None:
        self.release.set()
        super().close()


# --- plain S3 access to the test gateway (what the tests look at behind backupkit) ---


def s3_client(endpoint: str | None = None) -> Any:
    """A plain boto3 client on the test gateway (the AWS_* environment s3_location set)."""
    import boto3
    import botocore.config

    return boto3.client(
        "s3", endpoint_url=endpoint or os.environ["AWS_ENDPOINT_URL_S3"],
        config=botocore.config.Config(s3={"addressing_style": "path"},
                                      request_checksum_calculation="when_required",
                                      response_checksum_validation="when_required"))


def split(url: str) -> tuple[str, str]:
    bucket, _, prefix = url[len("s3://"):].partition("/")
    return bucket, prefix


def objects(url: str) -> dict[str, str]:
    """Every object under the repository's prefix -> its ETag (relative keys)."""
    bucket, prefix = split(url)
    out: dict[str, str] = {}
    for page in s3_client().get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix + "/"):
        for o in page.get("Contents", ()):
            out[o["Key"][len(prefix) + 1:]] = o["ETag"]
    return out


def uploads(bucket: str, prefix: str) -> list[tuple[str, str]]:
    """Incomplete multipart uploads under prefix: (key, upload id)."""
    resp = s3_client().list_multipart_uploads(Bucket=bucket, Prefix=prefix)
    return [(u["Key"], u["UploadId"]) for u in resp.get("Uploads", ())]
