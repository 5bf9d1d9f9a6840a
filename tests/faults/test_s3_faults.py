"""Faults and bad input on an S3 repository (issue 18, section 5), on the real Ceph
gateway of scripts/start-s3.sh, through the real CLI and real libvirt domains.

The same three promises as on a local repository (docs/reliability.md): one clear
line and the documented exit code; nothing committed is lost (``verify --data``
clean, every committed backup restores equal to its reference); the next run and
``gc`` need no manual repair and leave nothing behind.

Gateway outages use a radosgw of their own (``tests.s3rig.OwnGateway``: same cluster,
another port), never the shared gateway; the OSD is never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import rig
from tests.conftest import run_cli, traversable
from tests.faults.conftest import (
    CHUNK,
    MakeDomain,
    MiB,
    S3Bk,
    one_line_error,
    write_random,
)
from tests.s3rig import HoldingProxy, objects, own_gateway, s3_client, s3_location, split, uploads

pytestmark = pytest.mark.libvirt


def resume(p: subprocess.Popen[str]) -> None:
    os.kill(p.pid, signal.SIGCONT)


# --- kill -9 mid-backup and mid-gc ---------------------------------------------


def _deleting(method: str, path: str) -> bool:
    """A request that deletes: DELETE of an object, or a batch delete (POST ?delete)."""
    query = path.partition("?")[2]
    return method == "DELETE" or (method == "POST" and "delete" in query.split("&"))


def test_kill_9_mid_gc_on_s3(make_domain: MakeDomain, s3bk: S3Bk, libvirt_conn: object,
                             tmp_path: Path) -> None:
    """kill -9 of gc right after one of its deletions took effect on the gateway
    (a proxy holds the answer to its second deleting request): the committed backup is
    intact, the next backup works, the next gc removes the rest.

    Independent of how gc works inside: it only has to delete through S3 requests and
    have more than one thing to delete."""
    td = make_domain([("qcow2", 16 * MiB)], running=False)
    write_random(td, "vda", 0, 512 * 1024, 10, tmp_path)
    old = s3bk.backup(td)
    write_random(td, "vda", 0, 512 * 1024, 11, tmp_path)  # old's chunks: unreferenced later
    kept = s3bk.backup(td)
    write_random(td, "vda", 4 * MiB, 512 * 1024, 12, tmp_path)
    s3bk.killed_at("after_index", "backup", td.name)  # chunks and an index, no manifest
    s3bk.json("prune", td.name, "--keep-last", "1")
    del s3bk.refs[old["id"]]
    plan = s3bk.json("gc", "--dry-run")
    assert plan["chunks_removed"] >= 8 and plan["incomplete_backups_removed"], plan

    count = {"n": 0}

    def hold(method: str, path: str) -> bool:
        if _deleting(method, path):
            count["n"] += 1
            return count["n"] == 2
        return False

    proxy = HoldingProxy(os.environ["AWS_ENDPOINT_URL_S3"], hold)
    try:
        p = s3bk.spawn("gc", env={"AWS_ENDPOINT_URL_S3": proxy.url})
        while not proxy.held.wait(0.1):
            if p.poll() is not None:
                _o, err = p.communicate()
                raise AssertionError(f"gc ended (exit {p.returncode}) before its second "
                                     f"deleting request: {err}")
        p.kill()
        p.communicate()
        assert p.returncode == -signal.SIGKILL
    finally:
        proxy.close()

    partial = s3bk.json("gc", "--dry-run")
    assert 0 < partial["bytes_freed"] < plan["bytes_freed"], (plan, partial)
    assert [b["id"] for b in s3bk.json("list", td.name)["backups"]] == [kept["id"]]
    s3bk.survivors(td)
    write_random(td, "vda", 8 * MiB, 256 * 1024, 13, tmp_path)
    s3bk.next_run(td, libvirt_conn)


# --- the gateway killed and restarted mid-backup --------------------------------


@pytest.mark.parametrize("outage", ["short", "long"])
def test_gateway_killed_mid_backup(outage: str, make_domain: MakeDomain, s3bk: S3Bk,
                                   libvirt_conn: object, tmp_path: Path) -> None:
    """The radosgw the run talks to is killed (SIGKILL) while the run is frozen at
    mid_data, the run resumes against a dead gateway.  short: the gateway is back a
    second later and botocore's retries ride it out (exit 0, the backup restores equal);
    long: it stays down until the run gives up: one line, exit 1, nothing committed
    lost, and once the gateway is back the next backup is incremental and fine."""
    with own_gateway(str(tmp_path)) as gw:
        s3bk.env["AWS_ENDPOINT_URL_S3"] = gw.url
        td = make_domain([("qcow2", 32 * MiB)], running=True)
        write_random(td, "vda", 0, 1 * MiB, 20, tmp_path)
        first = s3bk.backup(td)
        assert first["mode"] == "full"

        # 2 MiB of new data: 32 chunks, most of them stored after the resume.
        write_random(td, "vda", 4 * MiB, 2 * MiB, 21, tmp_path)
        ref = {d.target: d.snapshot_reference(tmp_path / f"ref-outage-{d.target}")
               for d in td.disks}
        p = s3bk.stopped_at("mid_data", "--json", "backup", td.name)
        gw.kill()
        resume(p)
        if outage == "short":
            time.sleep(0.5)  # the run meets the dead gateway and backs off meanwhile
            gw.start()
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
            res = json.loads(out)
            assert res["mode"] == "incremental", res
            s3bk.refs[res["id"]] = ref
        else:
            out, err = p.communicate(timeout=600)
            assert p.returncode == 1, err
            line = one_line_error(subprocess.CompletedProcess(p.args, 1, out, err))
            assert "Could not connect" in line and "stopped answering" in line, line
            assert json.loads(out)["error"]["exit_code"] == 1
            gw.start()

        s3bk.survivors(td)
        write_random(td, "vda", 12 * MiB, 256 * 1024, 22, tmp_path)
        s3bk.next_run(td, libvirt_conn)


def test_parallel_requests_each_keep_their_attempts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nine requests at once meet a gateway that went away after answering: each
    makes all its attempts.  botocore's standard mode shares one retry quota (about
    35 retries) among a client's threads; with one client for all of them, the
    uploads of a backup used it up within half a second of a gateway restart and the
    run failed (S3Storage now gives each thread its own client)."""
    import socket
    import threading

    from backupkit import errors
    from backupkit.repo.s3 import S3Settings, S3Storage

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "5")  # 9 x 4 retries x 14 > the quota of 500
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    made: dict[int, int] = {}  # thread -> attempts
    lock = threading.Lock()

    class Counting(S3Storage):
        def _first_contact(self, response: Any = None, caught_exception: Any = None,
                           attempts: int = 0, **kw: Any) -> None:
            with lock:
                made[threading.get_ident()] = attempts
            return super()._first_contact(response, caught_exception, attempts, **kw)

    st = Counting("bucket", "p", S3Settings(endpoint=dead))
    st._answered = True  # as in the middle of a run
    failed: list[BaseException] = []

    def get(i: int) -> None:
        try:
            st.get(f"k{i}", 100)
        except errors.OperationFailed as e:
            failed.append(e)

    threads = [threading.Thread(target=get, args=(i,)) for i in range(9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(failed) == 9 and all("stopped answering" in str(e) for e in failed)
    assert sorted(made.values()) == [5] * 9, made


# --- a template repository on S3 for damage and bad input -------------------------


@dataclass
class Template:
    url: str
    td: rig.TestDomain
    ids: list[str]  # [full, incremental]
    refs: dict[str, Path]  # backup id -> reference of vda
    inc_only_chunks: list[str]  # chunk keys the incremental references and the full not
    base: Path


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Template]:
    """A shut-off domain with a full and an incremental backup in an S3 repository."""
    import libvirt

    base = tmp_path_factory.mktemp("s3-faults")
    traversable(base, tmp_path_factory.getbasetemp().parent)
    with pytest.MonkeyPatch.context() as mp, s3_location(mp) as url:
        try:
            conn = libvirt.open(rig.URI)
        except libvirt.libvirtError as e:
            pytest.fail(f"libvirt is required: {e}")
        td = rig.create_domain(conn, base / "images", [("qcow2", 16 * MiB)], running=False)
        try:
            scratch = base / "scratch"
            scratch.mkdir()
            cfg = base / "bk.toml"
            cfg.write_text(f'scratch_dir = "{scratch}"\n')
            common = ["--config", str(cfg), "--repo", url]
            run_cli(*common, "init", "--chunk-size", str(CHUNK), check=True)
            ids, refs, chunks = [], {}, []
            for i in range(2):
                write_random(td, "vda", i * 4 * MiB, 512 * 1024, 100 + i, base)
                ref = td.disk("vda").snapshot_reference(base / f"ref{i}.raw")
                cp = run_cli(*common, "--json", "backup", td.name, check=True)
                bid = json.loads(cp.stdout)["id"]
                ids.append(bid)
                refs[bid] = ref
                chunks.append({k for k in objects(url) if k.startswith("chunks/")})
            yield Template(url, td, ids, refs, sorted(chunks[1] - chunks[0]), base)
        finally:
            td.cleanup()
            conn.close()


class Case:
    """A private copy of the template repository (server-side copies) and the CLI."""

    def __init__(self, t: Template, url: str, tmp: Path) -> None:
        self.t = t
        self.url = url
        self.tmp = tmp
        self.dom = t.td.name
        self.cfg = tmp / "bk.toml"
        self.cfg.write_text(f'scratch_dir = "{tmp / "scratch"}"\n')
        self.bucket, self.prefix = split(url)
        client = s3_client()
        tb, tp = split(t.url)
        for key in objects(t.url):
            client.copy_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}",
                               CopySource={"Bucket": tb, "Key": f"{tp}/{key}"})

    def cli(self, *args: str, env: dict[str, str] | None = None,
            repo: str | None = None) -> subprocess.CompletedProcess[str]:
        return run_cli("--config", str(self.cfg), "--repo", repo or self.url, *args,
                       env=env, timeout=300)

    def fails(self, rc: int, *args: str, match: str = "", env: dict[str, str] | None = None,
              repo: str | None = None) -> str:
        """A command that must fail with rc and one line, changing nothing stored nor
        on the domain (--json too)."""
        before = objects(self.url)
        cps = self.checkpoints()
        cp = self.cli(*args, env=env, repo=repo)
        assert cp.returncode == rc, f"{args}: exit {cp.returncode} (want {rc}): {cp.stderr}"
        line = one_line_error(cp)
        assert match in line, line
        jcp = self.cli("--json", *args, env=env, repo=repo)
        assert jcp.returncode == rc, jcp.stderr
        assert json.loads(jcp.stdout)["error"]["exit_code"] == rc
        assert objects(self.url) == before, f"{args} changed the repository"
        assert self.checkpoints() == cps, f"{args} changed the domain's checkpoints"
        return line

    def ok(self, *args: str) -> Any:
        cp = self.cli("--json", *args)
        assert cp.returncode == 0, f"{args}: exit {cp.returncode}: {cp.stderr}"
        return json.loads(cp.stdout)

    def restores(self, bid: str) -> None:
        target = self.tmp / f"restore-{bid}-{secrets.token_hex(2)}"
        self.ok("restore", self.dom, bid, "--target", str(target), "--format", "raw")
        rig.compare(self.t.refs[bid], target / "vda.raw", "raw")

    def checkpoints(self) -> list[str]:
        return sorted(c.getName() for c in self.t.td.dom.listAllCheckpoints())

    def put(self, key: str, data: bytes) -> None:
        s3_client().put_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}", Body=data)


@pytest.fixture
def case(template: Template, s3_url: str, tmp_path: Path) -> Case:
    return Case(template, s3_url, tmp_path)


GARBAGE = bytes(range(256)) * 8


# --- an object replaced with garbage ------------------------------------------------


def test_chunk_replaced_with_garbage(case: Case) -> None:
    full, inc = case.t.ids
    victim = case.t.inc_only_chunks[len(case.t.inc_only_chunks) // 2]
    case.put(victim, GARBAGE)
    cp = case.cli("--json", "verify", "--data")
    assert cp.returncode == 5, cp.stderr
    line = one_line_error(case.cli("verify", "--data"))
    assert inc in line and full not in line, line
    report = json.loads(cp.stdout)["error"]["report"]
    assert report["chunks_damaged"] == 1
    assert [d["id"] for d in report["damaged"]] == [inc]
    (moved,) = report["chunks_quarantined"]
    assert moved["chunk"] == victim.rsplit("/", 1)[1]
    case.fails(5, "restore", case.dom, inc, "--target", str(case.tmp / "t-inc"),
               match=moved["chunk"])
    assert not (case.tmp / "t-inc" / "vda.qcow2").exists()
    case.ok("verify", case.dom, full, "--data")
    case.restores(full)


@pytest.mark.parametrize("what", ["index", "manifest"])
def test_index_or_manifest_replaced_with_garbage(case: Case, what: str) -> None:
    full, inc = case.t.ids
    name = "vda.index" if what == "index" else "manifest.json"
    case.put(f"backups/{case.dom}/{full}/{name}", GARBAGE)
    line = case.fails(5, "verify", match=full)
    assert inc not in line
    case.fails(5, "verify", "--data", match=full)
    case.fails(5, "restore", case.dom, full, "--target", str(case.tmp / "t"), match=full)
    case.fails(5, "gc", match="refuses")  # it cannot know what the damaged backup needs
    listing = case.ok("list", case.dom)
    if what == "manifest":
        assert [b["id"] for b in listing["backups"]] == [inc]
        assert [d["id"] for d in listing["damaged"]] == [full], listing
    case.ok("verify", case.dom, inc, "--data")
    case.restores(inc)


def test_config_replaced_with_garbage(case: Case) -> None:
    """Every command refuses with 5 naming config.json, and writes nothing (a backup
    too: the domain keeps its checkpoints); with config.json back, all is there."""
    original = s3_client().get_object(Bucket=case.bucket,
                                      Key=f"{case.prefix}/config.json")["Body"].read()
    case.put("config.json", GARBAGE)
    for args in (("list",), ("verify", "--data"), ("gc",), ("backup", case.dom),
                 ("restore", case.dom, "latest", "--target", str(case.tmp / "t"))):
        case.fails(5, *args, match="config.json")
    case.put("config.json", original)
    case.ok("verify", "--data")
    for bid in case.t.ids:
        case.restores(bid)


# --- bad input: credentials, bucket, endpoint, not a repository, URL ----------------


def test_wrong_credentials(case: Case) -> None:
    for args in (("list",), ("backup", case.dom), ("verify",)):
        case.fails(2, *args, env={"AWS_SECRET_ACCESS_KEY": "wrong"}, match="access denied")
    case.fails(2, "list", env={"AWS_ACCESS_KEY_ID": "NOSUCHKEY0000000000"},
               match="access denied")
    case.ok("verify", "--data")


def test_missing_bucket(case: Case) -> None:
    missing = f"s3://bk-no-such-bucket-{secrets.token_hex(4)}/x"
    for args in (("init",), ("list",), ("backup", case.dom), ("verify",)):
        case.fails(4, *args, repo=missing, match="bucket not found")


def test_unreachable_endpoint_fails_within_a_few_attempts(case: Case) -> None:
    """Connection refused: exit 1, one line naming the endpoint; botocore is stopped
    after FIRST_CONTACT_ATTEMPTS attempts (counted below), not the whole budget."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    for args in (("init",), ("list",), ("backup", case.dom)):
        line = case.fails(1, *args, env={"AWS_ENDPOINT_URL_S3": dead}, match=dead)
        assert "has not answered yet" in line, line

    from backupkit import errors
    from backupkit.repo.s3 import FIRST_CONTACT_ATTEMPTS, S3Settings, S3Storage

    st = S3Storage(case.bucket, case.prefix, S3Settings(endpoint=dead))
    attempts: list[str] = []
    st._client.meta.events.register("before-send.s3", lambda **kw: attempts.append("x"))
    with pytest.raises(errors.OperationFailed, match="Could not connect"):
        st.get("config.json", 1 << 20)
    assert len(attempts) == FIRST_CONTACT_ATTEMPTS


def test_prefix_that_is_not_a_repository(case: Case) -> None:
    """A prefix holding other objects: 4 like a local directory without config.json
    ("not a backupkit repository"); init refuses it with 2 (not empty); nothing of it
    is touched."""
    other = f"{case.url}-other"
    bucket, prefix = split(other)
    client = s3_client()
    for key in ("photos/cat.jpg", "notes.txt"):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=b"not backupkit's")
    try:
        for args in (("list",), ("verify",), ("backup", case.dom), ("gc",),
                     ("restore", case.dom, "latest", "--target", str(case.tmp / "t"))):
            case.fails(4, *args, repo=other, match="not a backupkit repository")
        case.fails(2, "init", repo=other, match="not empty")
        assert sorted(objects(other)) == ["notes.txt", "photos/cat.jpg"]
        local = case.tmp / "not-a-repo"
        local.mkdir()
        (local / "notes.txt").write_text("not backupkit's")
        case.fails(4, "list", repo=str(local), match="not a backupkit repository")
        case.fails(2, "init", repo=str(local))
    finally:
        for key in objects(other):
            client.delete_object(Bucket=bucket, Key=f"{prefix}/{key}")


@pytest.mark.parametrize("location", ["ftp://host/backups", "s3://", "s3:///prefix", "s3:x",
                                      "S3://Bad_Bucket/x"])
def test_bad_repository_url(case: Case, location: str, tmp_path: Path) -> None:
    """2 before anything: no local directory named after the scheme, nothing on the domain."""
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for args in (("init",), ("list",), ("backup", case.dom)):
            case.fails(2, *args, repo=location, match="invalid repository location")
        assert not [p for p in tmp_path.iterdir() if ":" in p.name]
    finally:
        os.chdir(cwd)


# --- incomplete multipart uploads -----------------------------------------------------


def test_gc_aborts_incomplete_multipart_uploads(case: Case) -> None:
    """backupkit never starts one, but another tool (or another version) may leave one
    under the prefix; gc aborts it (dry run: counts it), one beside the prefix stays."""
    client = s3_client()
    mine, beside = [], f"{case.prefix}-beside/upload"
    for key in ("chunks/ab/" + "ab" * 32, "elsewhere/big.img",
                f"backups/{case.dom}/{case.t.ids[0]}/vda.index"):
        up = client.create_multipart_upload(Bucket=case.bucket, Key=f"{case.prefix}/{key}")
        client.upload_part(Bucket=case.bucket, Key=f"{case.prefix}/{key}", PartNumber=1,
                           UploadId=up["UploadId"], Body=b"x" * 1000)
        mine.append(key)
    up = client.create_multipart_upload(Bucket=case.bucket, Key=beside)
    try:
        plan = case.ok("gc", "--dry-run")
        assert plan["tmp_files_removed"] == 3 and plan["tmp_bytes_freed"] == 3000, plan
        assert len(uploads(case.bucket, case.prefix + "/")) == 3
        done = case.ok("gc")
        assert done["tmp_files_removed"] == 3, done
        assert uploads(case.bucket, case.prefix + "/") == []
        assert uploads(case.bucket, beside) == [(beside, up["UploadId"])]
        again = case.ok("gc", "--dry-run")
        assert again["bytes_freed"] == 0, again
        case.ok("verify", "--data")
        for bid in case.t.ids:
            case.restores(bid)
    finally:
        with contextlib.suppress(Exception):
            client.abort_multipart_upload(Bucket=case.bucket, Key=beside,
                                          UploadId=up["UploadId"])
        for key, uid in uploads(case.bucket, case.prefix + "/"):
            client.abort_multipart_upload(Bucket=case.bucket, Key=key, UploadId=uid)

