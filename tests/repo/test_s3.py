"""S3Storage behaviour beyond the common contract, on the real gateway, with faults put
into the real traffic by a small HTTP proxy between backupkit and the gateway."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable, Iterator

import pytest

from backupkit import errors
from backupkit.repo.s3 import S3Settings, S3Storage
from backupkit.repo.url import parse
from tests.s3rig import ForwardingProxy

# What the proxy does with one request: "pass", "lose" (forward it, then drop the
# connection before the answer) or an HTTP status to answer with instead of forwarding.
Rule = Callable[[str, str], "str | int"]


class FaultProxy(ForwardingProxy):
    """Forwards HTTP to the gateway, applying rule(method, path) to each request."""

    timeout = 30

    def __init__(self, upstream: str) -> None:
        self.rule: Rule = lambda _m, _p: "pass"
        self.seen: list[tuple[str, str, str | int]] = []
        super().__init__(upstream)

    def handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        body = self.read_body(h)
        action = self.rule(h.command, h.path)
        self.seen.append((h.command, h.path, action))
        if isinstance(action, int):
            msg = (b"<?xml version='1.0'?><Error><Code>AccessDenied</Code>"
                   b"<Message>injected</Message></Error>")
            h.send_response(action)
            h.send_header("Content-Length", str(len(msg)))
            h.end_headers()
            h.wfile.write(msg)
            return
        resp, data = self.forward(h, body)
        if action == "lose":
            h.close_connection = True  # the request was done; its answer is lost
            return
        self.answer(h, resp, data)


@pytest.fixture
def proxied(s3_url: str) -> Iterator[tuple[FaultProxy, Callable[..., S3Storage]]]:
    import os

    proxy = FaultProxy(os.environ["AWS_ENDPOINT_URL_S3"])
    _scheme, bucket, prefix = parse(s3_url)

    def store(**kw: int) -> S3Storage:
        return S3Storage(bucket, prefix, S3Settings(endpoint=proxy.url, **kw))

    try:
        yield proxy, store
    finally:
        proxy.close()


def once(method: str, suffix: str, action: str | int) -> Rule:
    """A rule applying action to the first request of method whose path ends with suffix."""
    done = threading.Event()

    def rule(m: str, path: str) -> str | int:
        if m == method and path.split("?")[0].endswith(suffix) and not done.is_set():
            done.set()
            return action
        return "pass"
    return rule


def test_lost_answer_to_our_own_create_is_ours(proxied: tuple[FaultProxy, Callable[..., S3Storage]]
                                                ) -> None:
    """The gateway stored the manifest but its answer was lost: botocore retries, the
    retry gets 412, and the stored bytes are ours: written (a commit succeeds)."""
    proxy, store = proxied
    st = store()
    proxy.rule = once("PUT", "/manifest.json", "lose")
    assert st.put_if_absent("backups/d/1/manifest.json", b"our manifest")
    puts = [s for s in proxy.seen if s[0] == "PUT"]
    assert [a for _m, _p, a in puts] == ["lose", "pass"]  # the retry was botocore's
    assert st.get("backups/d/1/manifest.json", 100) == b"our manifest"


def test_lost_answer_to_a_deferred_upload_does_not_wait_for_itself(
        proxied: tuple[FaultProxy, Callable[..., S3Storage]]) -> None:
    """A chunk handed to the upload threads is stored, its answer lost, the retry gets
    412 and reads the object back to see whose it is.  That read must not wait for
    the pending uploads, its own among them: it hung a backup after a gateway
    restart (found by tests/faults/test_s3_faults.py::test_gateway_killed_mid_backup)."""
    proxy, store = proxied
    st = store()
    proxy.rule = once("PUT", "/c1", "lose")
    done = threading.Event()

    def upload() -> None:
        assert st.put_if_absent("chunks/01/c1", b"chunk bytes", deferred=True)
        st.flush()
        done.set()

    t = threading.Thread(target=upload, daemon=True)
    t.start()
    t.join(120)  # a hang, not a speed: the retry takes well under a second
    assert done.is_set(), "the deferred upload waited for itself"
    assert [a for m, _p, a in proxy.seen if m == "PUT"] == ["lose", "pass"]
    assert st.get("chunks/01/c1", 100) == b"chunk bytes"


def test_lost_answer_when_a_competitor_was_first(
        proxied: tuple[FaultProxy, Callable[..., S3Storage]]) -> None:
    proxy, store = proxied
    st = store()
    assert st.put_if_absent("backups/d/1/manifest.json", b"the other writer's")
    proxy.rule = once("PUT", "/manifest.json", "lose")
    assert not st.put_if_absent("backups/d/1/manifest.json", b"ours")
    assert st.get("backups/d/1/manifest.json", 100) == b"the other writer's"


def test_failed_deferred_upload_is_raised_by_flush_until_discarded(
        proxied: tuple[FaultProxy, Callable[..., S3Storage]]) -> None:
    proxy, store = proxied
    st = store()
    proxy.rule = once("PUT", "/c3", 403)
    for i in range(6):
        st.put_if_absent(f"chunks/0{i}/c{i}", b"x" * 1000, deferred=True)
    with pytest.raises(errors.UsageError, match="access denied"):
        st.flush()
    with pytest.raises(errors.UsageError):  # still, until the batch is discarded
        st.flush()
    with pytest.raises(errors.UsageError):
        st.put_if_absent("chunks/09/c9", b"y", deferred=True)
    st.discard_pending()
    st.flush()
    assert not st.exists("chunks/03/c3")
    assert st.put_if_absent("chunks/03/c3", b"again", deferred=True)
    st.flush()
    assert st.get("chunks/03/c3", 10) == b"again"


def test_deferred_uploads_keep_memory_bounded(
        proxied: tuple[FaultProxy, Callable[..., S3Storage]]) -> None:
    _proxy, store = proxied
    st = store(concurrency=4)
    st.max_inflight = 200_000
    peak = 0
    real = st._upload

    def upload(key: str, body: bytes) -> None:
        nonlocal peak
        peak = max(peak, st._inflight)
        real(key, body)

    st._upload = upload  # type: ignore[method-assign]
    for i in range(40):
        st.put_if_absent(f"chunks/{i:02x}/m{i}", bytes([i]) * 50_000, deferred=True)
    st.flush()
    assert 0 < peak <= 200_000
    assert len(list(st.list("chunks/"))) == 40


def test_cli_errors_on_s3(s3_url: str) -> None:
    """Missing bucket (init: exit 4), a prefix that is not a repository (exit 4), one
    that holds something else (init: exit 2), wrong credentials (exit 2): one line each."""
    from tests.conftest import run_cli

    bucket = parse(s3_url)[1]
    # The bucket's root is not empty: our prefix holds a repository by then.
    cases = [
        (("--repo", "s3://no-such-bucket-bk/x", "init"), {}, 4, "bucket not found"),
        (("--repo", s3_url, "list"), {}, 4, "not a backupkit repository"),
        (("--repo", s3_url, "init"), {}, 0, ""),
        (("--repo", s3_url, "init"), {}, 2, "already a backupkit repository"),
        (("--repo", f"s3://{bucket}", "init"), {}, 2, "not empty"),
        (("--repo", s3_url, "list"), {"AWS_SECRET_ACCESS_KEY": "wrong"}, 2, "access denied"),
    ]
    for args, env, code, text in cases:
        cp = run_cli(*args, env=env)
        assert cp.returncode == code, (args, cp.stderr)
        if code:
            assert text in cp.stderr and len(cp.stderr.strip().splitlines()) == 1, cp.stderr


def test_locks_of_an_s3_repository_are_objects_in_the_bucket(s3_url: str) -> None:
    """Locks live in the bucket under locks/, so they exclude across hosts (the rules:
    tests/repo/test_locks.py, which runs on S3 too)."""
    from backupkit.repo import Repository

    Repository.init(s3_url)
    a, b = Repository.open(s3_url), Repository.open(s3_url)
    with a.lock_domain("vm1"):
        (info,) = a.storage.list("locks/")
        assert info.key.startswith("locks/domain-") and info.key.endswith(".json")
    with a.lock_exclusive(), pytest.raises(errors.Busy, match="pid"):
        b.lock_shared().__enter__()
    with a.lock_domain("vm1"), pytest.raises(errors.Busy):
        b.lock_domain("vm1").__enter__()
    with b.lock_shared(), a.lock_shared():
        pass
