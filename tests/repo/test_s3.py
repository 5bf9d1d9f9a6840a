"""S3Storage behaviour beyond the common contract, on the real gateway, with faults put
into the real traffic by a small HTTP proxy between backupkit and the gateway."""

from __future__ import annotations

import http.server
import threading
import urllib.parse
from collections.abc import Callable, Iterator

import pytest

from backupkit import errors
from backupkit.repo import storage as storage_mod
from backupkit.repo.s3 import S3Settings, S3Storage
from backupkit.repo.storage import list_chunks
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
            code = b"SlowDown" if action == 503 else b"AccessDenied"
            msg = (b"<?xml version='1.0'?><Error><Code>" + code + b"</Code>"
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


def _chunk_dirs(st: S3Storage, n: int) -> list[str]:
    """n chunk directories of two chunks each; their prefixes."""
    for h in range(n):
        for i in range(2):
            assert st.put_if_absent(f"chunks/{h:02x}/{h:02x}{i:062x}", b"c")
    return [f"chunks/{h:02x}/" for h in range(n)]


def _listing_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("storage-list-")]


def _lists_of(path: str, prefix: str) -> bool:
    """path is a LIST request of the objects under prefix (under the test's root)."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
    return "list-type" in query and query.get("prefix", [""])[0].endswith("/" + prefix)


def _lists_seen(proxy: FaultProxy, prefix: str) -> int:
    return sum(1 for m, p, _a in proxy.seen if m == "GET" and _lists_of(p, prefix))


@pytest.fixture
def fan_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small test repositories list their chunks concurrently, as large ones do."""
    monkeypatch.setattr(storage_mod, "ONE_PAGE", 1)


def test_a_small_repository_lists_its_chunks_with_one_request(
        proxied: tuple[FaultProxy, Callable[..., S3Storage]]) -> None:
    """Fewer chunks than a listing page: one LIST, not one per chunk directory."""
    proxy, store = proxied
    st = store()
    _chunk_dirs(st, 24)
    proxy.seen.clear()
    assert len(list(list_chunks(st))) == 48
    assert sum(1 for m, p, _a in proxy.seen if m == "GET" and "list-type=2" in p) == 1


def test_chunk_listing_failing_in_one_prefix_fails_as_a_listing_does(
        proxied: tuple[FaultProxy, Callable[..., S3Storage]], fan_out: None) -> None:
    """gc's and verify's listing of the chunks runs a listing per chunk directory, 8 at
    once: one directory whose LIST keeps failing (503) fails the whole listing with the
    error, message and retries (botocore's, per request) of a plain listing of that
    directory, and every listing thread has ended when it is raised."""
    proxy, store = proxied
    st = store(max_attempts=3)
    dirs = _chunk_dirs(st, 24)
    bad = "chunks/11/"
    proxy.rule = lambda m, p: 503 if _lists_of(p, bad) else "pass"
    with pytest.raises(errors.OperationFailed) as plain:
        list(st.list(bad))
    attempts = _lists_seen(proxy, bad)
    assert attempts > 1  # botocore retried the 503
    proxy.seen.clear()
    with pytest.raises(errors.OperationFailed) as spread:
        list(list_chunks(st))
    assert str(spread.value) == str(plain.value)
    assert f"listing {bad}" in str(spread.value)
    assert _lists_seen(proxy, bad) == attempts  # the same retries, no more
    assert _listing_threads() == []
    assert len(dirs) == 24
    # The gateway answers again: the same store lists everything.
    proxy.rule = lambda _m, _p: "pass"
    assert len(list(list_chunks(st))) == 48


def test_chunk_listing_ends_when_the_gateway_stops_answering(
        proxied: tuple[FaultProxy, Callable[..., S3Storage]], fan_out: None) -> None:
    """The gateway stops answering in the middle of the concurrent listing (every
    request from the 6th chunk-directory LIST on is done but its answer lost): the
    listing fails with the store's one-line error once a request's retries are spent,
    instead of hanging, and no listing thread is left."""
    proxy, store = proxied
    st = store(max_attempts=2)
    _chunk_dirs(st, 24)
    lists = 0
    lock = threading.Lock()

    def rule(m: str, p: str) -> str:
        nonlocal lists
        if m == "GET" and "list-type=2" in p and "delimiter" not in p and "chunks%2F" in p:
            with lock:
                lists += 1
                if lists > 5:
                    return "lose"
        return "pass"

    proxy.rule = rule
    outcome: list[BaseException | int] = []

    def consume() -> None:
        try:
            outcome.append(sum(1 for _ in list_chunks(st)))
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    t.join(300)  # a hang, not a speed: two attempts take seconds
    assert outcome, "the listing hung after the gateway stopped answering"
    (err,) = outcome
    assert isinstance(err, errors.OperationFailed), err
    assert "listing chunks/" in str(err) and "\n" not in str(err)
    assert _listing_threads() == []
