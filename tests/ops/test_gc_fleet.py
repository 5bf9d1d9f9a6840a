"""Many writers and a gc that never stops them, with real processes, real domains and
real stores (a local directory; the Ceph S3 gateway for the interleavings marked BOTH;
kill -9 mid-gc on S3 is tests/faults/test_s3_faults.py): docs/format.md, "Locks and gc".

Processes freeze themselves at fault points (BACKUPKIT_FAULT_ACTION=stop) so that
another one runs at an exact point of the protocol, or die there (kill -9).  After
each interleaving: verify --data is clean and every committed backup restores equal
to the disk it was taken from.  The same interleavings, step by step on the
in-memory store: tests/repo/test_gc_protocol.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from backupkit import faults
from tests import rig
from tests.conftest import run_cli

pytestmark = pytest.mark.libvirt
MiB = rig.MiB
MakeDomain = Callable[..., rig.TestDomain]


@dataclass
class Fleet:
    """One repository (local or S3) used by several backupkit processes."""

    tmp: Path
    config: Path
    location: str
    refs: dict[str, tuple[str, Path]] = field(default_factory=dict)  # id -> (domain, ref)

    def run(self, *args: str, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        return run_cli("--config", str(self.config), *args, env=env, timeout=300)

    def json(self, *args: str, env: dict[str, str] | None = None) -> Any:
        cp = self.run("--json", *args, env=env)
        assert cp.returncode == 0, f"{args}: exit {cp.returncode}: {cp.stderr}"
        return json.loads(cp.stdout)

    def ref(self, td: rig.TestDomain) -> Path:
        """A copy of the disk as it is now, under a name never used before."""
        n = len(list(self.tmp.glob("ref-*")))
        return td.disks[0].snapshot_reference(self.tmp / f"ref-{n}")

    def backup(self, td: rig.TestDomain, env: dict[str, str] | None = None) -> str:
        ref = self.ref(td)
        bid: str = self.json("backup", td.name, env=env)["id"]
        self.refs[bid] = (td.name, ref)
        return bid

    def spawn(self, *args: str, env: dict[str, str]) -> subprocess.Popen[str]:
        full = {k: v for k, v in os.environ.items()
                if k not in ("BACKUPKIT_CONFIG", "BACKUPKIT_REPO", "JOURNAL_STREAM")}
        full.update(env)
        return subprocess.Popen([sys.executable, "-m", "backupkit", "--config",
                                 str(self.config), "--json", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=full)

    def stopped_at(self, point: str, *args: str, env: dict[str, str] | None = None
                   ) -> subprocess.Popen[str]:
        """Start the CLI; return once it has stopped itself at the fault point."""
        p = self.spawn(*args, env={faults.ENV_POINT: point, faults.ENV_ACTION: "stop",
                                   **(env or {})})
        return rig.wait_stopped(p, point, 120, what=f"{args} ")

    @staticmethod
    def resume(p: subprocess.Popen[str]) -> tuple[int, str, str]:
        os.kill(p.pid, signal.SIGCONT)
        out, err = p.communicate(timeout=300)
        return p.returncode, out, err

    def killed_at(self, point: str, *args: str) -> None:
        cp = self.run(*args, env={faults.ENV_POINT: point})
        assert cp.returncode == -signal.SIGKILL, (point, cp.returncode, cp.stderr)

    def all_sound(self) -> None:
        """verify --data is clean; every committed backup restores equal."""
        listed = {b["id"] for b in self.json("list")["backups"]}
        assert listed == set(self.refs), (listed, set(self.refs))
        self.json("verify", "--data")
        for bid, (domain, ref) in self.refs.items():
            target = self.tmp / f"restore-{bid}"
            self.json("restore", domain, bid, "--target", str(target), "--format", "raw")
            rig.compare(ref, target / "vda.raw", "raw")
            subprocess.run(["rm", "-rf", str(target)], check=True)

    def tick(self) -> None:
        """Let the store's clock pass a second: S3 keeps whole seconds, and gc's cutoff
        keeps what is not older than the oldest running writer."""
        if self.location.startswith("s3://"):
            time.sleep(1.1)

    def lock_objects(self) -> list[str]:
        from backupkit.repo.url import open_storage

        return [i.key for i in open_storage(self.location).list("locks/")]


#: The interleavings run on a local repository; those marked BOTH run on the S3 gateway
#: too: one per kind of step where the stores differ (whole-second mtimes against
#: gc's cutoff, conditional PUTs, batched deletes, listing), not every point twice.
BOTH = pytest.mark.parametrize("fleet", ["local", "s3"], indirect=True)


@pytest.fixture
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Fleet:
    location = str(tmp_path / "repo") if getattr(request, "param", "local") == "local" \
        else str(request.getfixturevalue("s3_url"))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    cfg = tmp_path / "backupkit.toml"
    cfg.write_text(f'repository = "{location}"\nscratch_dir = "{scratch}"\n'
                   "chunk_size = 262144\n")
    f = Fleet(tmp_path, cfg, location)
    f.json("init")
    return f


def twins(make_domain: MakeDomain) -> Iterator[rig.TestDomain]:
    """Shut-off domains whose disks hold the same data: their backups share chunks."""
    while True:
        td = make_domain([("qcow2", 8 * MiB)], running=False)
        for i, byte in enumerate((0x61, 0x62, 0x63)):
            td.write("vda", i * MiB, MiB, byte)
        yield td


def twin_of_a_deleted_backup(fleet: Fleet, make_domain: MakeDomain) -> rig.TestDomain:
    """Twin A is backed up and that backup deleted (its chunks become gc's candidates);
    the other twin, B, with the same data, is returned."""
    gen = twins(make_domain)
    a, b = next(gen), next(gen)
    a_id = fleet.backup(a)
    fleet.json("delete", a.name, a_id)
    del fleet.refs[a_id]
    fleet.tick()
    return b


GC_REMOVED = ("gc removed {n} chunks this backup reuses while it ran; nothing was "
              "committed; run the backup again")


def one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines()
             if " INFO " not in ln and " WARNING " not in ln and ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


# (1) a chunk a running backup reuses is never deleted under it ----------------------

@BOTH
@pytest.mark.parametrize("pruned", [True, False], ids=["source-deleted", "source-kept"])
def test_gc_between_start_and_commit_of_a_backup(fleet: Fleet, make_domain: MakeDomain,
                                                 pruned: bool) -> None:
    """B reuses every chunk of A's backup (same data).  B freezes before its commit;
    A's backup is deleted (or not) and gc runs to the end meanwhile.  B then commits
    with every chunk present, or fails with one line and commits nothing."""
    gen = twins(make_domain)
    a, b = next(gen), next(gen)
    a_id = fleet.backup(a)
    fleet.tick()
    p = fleet.stopped_at("before_commit", "backup", b.name)
    try:
        if pruned:
            fleet.json("delete", a.name, a_id)
            del fleet.refs[a_id]
        res = fleet.json("gc")  # never waits for the frozen backup
        assert res["chunks_removed"] == (3 if pruned else 0), res
    finally:
        rc, out, err = fleet.resume(p)
    if pruned:
        assert rc == 1, err
        assert one_line(err).endswith(GC_REMOVED.format(n=3)), err
        assert fleet.json("list", b.name)["backups"] == []
        fleet.all_sound()
        fleet.backup(b)  # the next run stores the data again
    else:
        assert rc == 0, err
        bid = json.loads(out)["id"]
        fleet.refs[bid] = (b.name, fleet.ref(b))
    fleet.all_sound()
    fleet.json("gc")
    assert fleet.lock_objects() == []


# (2) gc frozen after its mark (or before its sweep) while a backup commits -----------

def test_backup_commits_while_gc_is_frozen_after_the_mark(fleet: Fleet,
                                                         make_domain: MakeDomain) -> None:
    """A's backup is deleted: its chunks are gc's candidates.  gc freezes after the
    mark; B (same data) reuses them and commits; gc resumes and keeps them."""
    b = twin_of_a_deleted_backup(fleet, make_domain)
    g = fleet.stopped_at("gc_after_mark", "gc")
    try:
        fleet.backup(b)
    finally:
        rc, out, err = fleet.resume(g)
    assert rc == 0, err
    res = json.loads(out)
    assert res["chunks_rescued"] == 3 and res["chunks_removed"] == 0, res
    fleet.all_sound()


@BOTH
def test_backup_during_the_sweep_waits_and_checks(fleet: Fleet,
                                                 make_domain: MakeDomain) -> None:
    """gc freezes with the epoch saying "sweeping", before it deletes A's chunks.  B
    starts then, reuses them and freezes before its commit; the sweep deletes them (B
    was not committed when gc looked); B then fails with one line, commits nothing."""
    b = twin_of_a_deleted_backup(fleet, make_domain)
    g = fleet.stopped_at("gc_before_sweep", "gc")
    try:
        bp = fleet.stopped_at("before_commit", "backup", b.name)
    finally:
        rc, out, err = fleet.resume(g)
    assert rc == 0, err
    assert json.loads(out)["chunks_removed"] == 3
    rc, _out, err = fleet.resume(bp)
    assert rc == 1, err
    assert one_line(err).endswith(GC_REMOVED.format(n=3)), err
    fleet.all_sound()
    fleet.backup(b)
    fleet.all_sound()


# (3) two hosts ------------------------------------------------------------------------

def test_two_hosts_same_domain_busy_other_domains_beside_gc(fleet: Fleet,
                                                           make_domain: MakeDomain) -> None:
    gen = twins(make_domain)
    a, c = next(gen), next(gen)
    c.write("vda", 5 * MiB, MiB, 0x77)
    host_a, host_b = {"BACKUPKIT_HOST": "host-a"}, {"BACKUPKIT_HOST": "host-b"}
    pa = fleet.stopped_at("before_commit", "backup", a.name, env=host_a)
    try:
        # The same domain name from "another host": exit 3 naming the holder.
        cp = fleet.run("backup", a.name, env=host_b)
        assert cp.returncode == 3, cp.stderr
        assert f"domain {a.name} is locked by host host-a pid {pa.pid} (" \
            in one_line(cp.stderr), cp.stderr
        # Another domain from host B, while a gc is in the middle of its run.
        g = fleet.stopped_at("gc_after_mark", "gc", env=host_b)
        try:
            fleet.backup(c, env=host_b)
        finally:
            rc, _out, err = fleet.resume(g)
        assert rc == 0, err
    finally:
        rc, out, err = fleet.resume(pa)
    assert rc == 0, err
    fleet.refs[json.loads(out)["id"]] = (a.name, fleet.ref(a))
    fleet.json("gc")
    fleet.all_sound()


# (4) kill -9 of a lock holder ----------------------------------------------------------

@pytest.mark.parametrize("point", ["before_commit", "commit_after_epoch"])
def test_killed_writer_does_not_wedge_the_repository(fleet: Fleet, make_domain: MakeDomain,
                                                    point: str) -> None:
    """Its lock objects stay behind, but its pid is gone on this host: the next backup
    of that domain proceeds at once, and gc does not wait for its "committing"."""
    td = next(twins(make_domain))
    fleet.killed_at(point, "backup", td.name)
    assert len(fleet.lock_objects()) == 2  # writer and domain
    fleet.backup(td)
    fleet.json("gc")
    assert fleet.lock_objects() == []
    fleet.all_sound()


# (5) kill -9 mid-gc at every point ------------------------------------------------------

@pytest.mark.parametrize("point", faults.GC_POINTS)
def test_kill_9_mid_gc(fleet: Fleet, make_domain: MakeDomain, point: str) -> None:
    gen = twins(make_domain)
    a, b = next(gen), next(gen)
    a.write("vda", 4 * MiB, MiB, 0x5A)  # a chunk only A's first backup has
    a_id = fleet.backup(a)
    b.write("vda", 4 * MiB, MiB, 0x44)
    fleet.backup(b)
    a.write("vda", 4 * MiB, MiB, 0x55)
    fleet.backup(a)
    fleet.json("delete", a.name, a_id)  # its chunks that others lack are garbage now
    del fleet.refs[a_id]
    fleet.tick()
    assert fleet.json("gc", "--dry-run")["chunks_removed"] == 1
    fleet.killed_at(point, "gc")
    fleet.all_sound()  # nothing committed is lost
    # Writers go on: one left "sweeping" with no live gc makes them check their chunks.
    b.write("vda", 7 * MiB, MiB, 0x66)
    fleet.backup(b)
    res = fleet.json("gc")
    assert fleet.json("gc", "--dry-run")["chunks_removed"] == 0
    assert res["epoch"] >= 1
    assert fleet.lock_objects() == []
    fleet.all_sound()


# (6) two hosts back up while a third prunes and collects, all at once ---------------

@BOTH
def test_two_hosts_back_up_while_a_third_prunes_and_gcs(fleet: Fleet,
                                                        make_domain: MakeDomain) -> None:
    """Issue 18, section 5: host A and host B back up their domains again and again
    (new data each time) while host C runs prune and gc in a loop, with no freezing and
    no ordering between them.  Every backup and every gc succeeds (prune may find a
    domain busy: exit 3), and afterwards verify --data is clean and every backup left
    restores equal to its disk at that time."""
    import threading

    doms = {"host-a": make_domain([("qcow2", 8 * MiB)], running=False),
            "host-b": make_domain([("qcow2", 8 * MiB)], running=False)}
    # Both start from the same data: their backups share chunks, so gc's candidates
    # (a pruned backup's chunks) are often chunks the other host is about to reuse.
    for td in doms.values():
        for i in range(4):
            td.write("vda", i * MiB, MiB, 0x41 + i)
    refs: dict[str, tuple[str, Path]] = {}
    order: dict[str, list[str]] = {host: [] for host in doms}  # ids, oldest first
    failures: list[str] = []
    mx = threading.Lock()
    done = threading.Event()

    def backups(host: str, td: rig.TestDomain) -> None:
        for i in range(5):
            td.write("vda", (i % 4) * MiB + 4096 * i, 64 * 1024, 0x61 + i)
            with mx:
                ref = fleet.ref(td)
            # --wait: prune holds the domain's lock for a moment (a timer would set lock_wait).
            cp = fleet.run("--json", "backup", td.name, "--wait", "120",
                           env={"BACKUPKIT_HOST": host})
            if cp.returncode != 0:
                failures.append(f"{host} backup {i}: exit {cp.returncode}: {cp.stderr}")
                continue
            with mx:
                bid = json.loads(cp.stdout)["id"]
                refs[bid] = (td.name, ref)
                order[host].append(bid)

    def collect() -> None:
        for td in doms.values():
            cp = fleet.run("--json", "prune", td.name, "--keep-last", "2",
                           "--keep-hourly", "0", "--keep-daily", "0", "--keep-weekly",
                           "0", "--keep-monthly", "0", "--keep-yearly", "0",
                           env={"BACKUPKIT_HOST": "host-c"})
            if cp.returncode not in (0, 3):  # 3: that domain's backup is running
                failures.append(f"prune: exit {cp.returncode}: {cp.stderr}")
        cp = fleet.run("--json", "gc", env={"BACKUPKIT_HOST": "host-c"})
        if cp.returncode != 0:
            failures.append(f"gc: exit {cp.returncode}: {cp.stderr}")

    def collector() -> None:
        rounds = 0
        while not done.is_set() or rounds < 2:
            collect()
            rounds += 1

    threads = [threading.Thread(target=backups, args=item) for item in doms.items()]
    gc_thread = threading.Thread(target=collector)
    gc_thread.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    gc_thread.join()
    collect()  # once more after the last backup, nothing else running
    assert failures == []
    assert len(refs) == 10
    listed = {b["id"]: b for b in fleet.json("list")["backups"]}
    # Each domain keeps its two newest (the last prune ran after the last backup).
    for host, td in doms.items():
        kept = sorted(b for b in listed if listed[b]["domain"] == td.name)
        assert kept == sorted(order[host][-2:])
        assert {listed[b]["host"] for b in kept} == {host}
    fleet.refs = {bid: refs[bid] for bid in listed}
    fleet.all_sound()
    assert fleet.json("gc", "--dry-run")["chunks_removed"] == 0
