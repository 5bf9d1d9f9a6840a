"""Issue 9 end to end: a real Linux guest backed up through the real CLI with
``--quiesce``, each backup restored, the restores checked for a clean filesystem with
every completed file intact, and a restored domain booted.  Without an agent,
``--quiesce`` fails cleanly and ``quiesce = "try"`` backs up, recording that it did not
quiesce.

One guest (module scope) serves the first three tests, in file order: it keeps writing
checksummed files (``/data/f<N>``, listed in ``/data/MANIFEST``) while the backups run.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import pytest

from tests.conftest import run_cli, traversable
from tests.guest import bkguest

pytestmark = [pytest.mark.libvirt, pytest.mark.slow]

FREEZE_LIMIT = 1.0  # seconds (issue 9: "stays under one second")


def wait_manifest(guest: bkguest.Guest, at_least: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = guest.manifest_count()
        if n >= at_least or time.monotonic() > deadline:
            return n
        time.sleep(0.3)


def write_config(path: Path, work: Path, extra: str = "") -> Path:
    path.write_text(f'repository = "{work / "repo"}"\nscratch_dir = "{work / "scratch"}"\n'
                    + extra)
    return path


def cli(cfg: Path, *args: str) -> Any:
    """backupkit --config CFG --json ARGS: the JSON document; fails the test on exit != 0."""
    cp = run_cli("--config", str(cfg), "--json", *args)
    assert cp.returncode == 0, f"backupkit {' '.join(args)}: exit {cp.returncode}\n{cp.stderr}"
    return json.loads(cp.stdout)


def verified_files(console: str) -> int:
    """Files a strict verify boot found intact; asserts the verdict was PASS, fsck clean."""
    m = re.search(r"BKGUEST-VERIFY: PASS fsck_rc=0 files=(\d+) bad=0 partial=\d+", console)
    assert m, f"strict verify boot did not pass:\n{console[-3000:]}"
    return int(m.group(1))


def scratch_left(work: Path) -> list[str]:
    d = work / "scratch"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def job_active(dom: Any) -> bool:
    return bool(dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE)


@dataclass
class Run:
    """State the module's tests share, in file order."""

    guest: bkguest.Guest
    work: Path
    cfg: Path
    backups: list[dict[str, Any]] = field(default_factory=list)  # CLI backup results
    before: list[int] = field(default_factory=list)  # files complete before each backup
    after: list[int] = field(default_factory=list)  # files complete when it returned
    restored: list[Path] = field(default_factory=list)  # restored vda.qcow2 per backup
    defined: list[str] = field(default_factory=list)  # --define'd domains to remove


@pytest.fixture(scope="module")
def run(libvirt_conn: Any, guest_image: bkguest.GuestImage,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    work = tmp_path_factory.mktemp("e2e")
    traversable(work, tmp_path_factory.getbasetemp().parent)
    cfg = write_config(work / "backupkit.toml", work)
    state: Run | None = None
    names = [bkguest.new_name("bk-e2e")]
    try:
        guest = bkguest.start_guest(libvirt_conn, guest_image, work, name=names[0])
        state = Run(guest=guest, work=work, cfg=cfg)
        cli(cfg, "init", "--chunk-size", str(256 * 1024))
        yield state
    finally:
        # A fresh connection: the shared one is dead if libvirtd restarted meanwhile.
        with contextlib.closing(libvirt.open(bkguest.URI)) as conn:
            for name in [*(state.defined if state else []), *(names[:1])]:
                bkguest.destroy_domain(conn, name)
        shutil.rmtree(work, ignore_errors=True)


def need(run: Run, backups: int) -> None:
    if len(run.backups) < backups:
        pytest.fail(f"needs the {backups} backup(s) of the previous test, which failed",
                    pytrace=False)


def quiesced_backup(run: Run) -> dict[str, Any]:
    """backup --quiesce through the CLI while the writer runs.  Checks the freeze window
    and that the guest was thawed: the agent says so and the writer goes on."""
    g = run.guest
    before = g.manifest_count()
    res = cli(run.cfg, "backup", g.name, "--quiesce")
    after = g.manifest_count()
    assert res["quiesced"] is True, res
    freeze = res["freeze_seconds"]
    assert isinstance(freeze, float) and 0 < freeze < FREEZE_LIMIT, res
    assert freeze < res["duration_seconds"], res
    assert not res.get("warnings"), res
    assert g.agent("guest-fsfreeze-status") == "thawed"
    assert wait_manifest(g, after + 3, timeout=30) >= after + 3, "the guest stopped writing"
    print(f"{res['mode']} backup {res['id']}: freeze {freeze * 1000:.0f} ms, "
          f"duration {res['duration_seconds']:.1f}s, read {res['read_bytes']} B, "
          f"files before {before}, when done {after}")
    run.backups.append(res)
    run.before.append(before)
    run.after.append(after)
    return res


# --------------------------------------------------------------- with an agent


def test_guest_boots_mounts_and_writes(run: Run, record_property: Any) -> None:
    """The guest boots (TCG here) well under a minute, mounts its ext4 data disk and
    keeps completing checksummed files."""
    g = run.guest
    record_property("boot_seconds", round(g.boot_seconds, 1))
    print(f"guest {g.name} ({g.virt_type}) agent up {g.boot_seconds:.1f}s after start")
    assert g.boot_seconds < 60
    mounts = {fs["mountpoint"]: fs for fs in g.agent("guest-get-fsinfo")}
    assert mounts["/data"]["type"] == "ext4"
    n = wait_manifest(g, 5)
    assert n >= 5
    assert wait_manifest(g, n + 3) >= n + 3


def test_quiesced_full_then_incremental(run: Run, record_property: Any) -> None:
    """`backup --quiesce` (CLI, --json) freezes and thaws through the agent around
    checkpoint creation: manifest records quiesced=true and a freeze window < 1 s, shown
    by `show --json` too; the guest writes on after each backup.  The second backup,
    after more writes, is an incremental on the first."""
    g = run.guest
    full = quiesced_backup(run)
    assert full["mode"] == "full", full
    wait_manifest(g, run.after[0] + 10)
    inc = quiesced_backup(run)
    assert inc["mode"] == "incremental", inc
    assert inc["parent_id"] == full["id"]
    assert 0 < inc["read_bytes"] < full["read_bytes"]
    record_property("freeze_seconds", [b["freeze_seconds"] for b in run.backups])

    for res in (full, inc):
        shown = cli(run.cfg, "show", g.name, res["id"])
        assert shown["quiesced"] is True
        assert shown["freeze_seconds"] == res["freeze_seconds"]
    # Only the latest backup's checkpoint is left; no job, no scratch files.
    cps = [c.getName() for c in g.dom.listAllCheckpoints(0)]
    assert cps == [inc["checkpoint"]]
    assert not job_active(g.dom)
    assert scratch_left(run.work) == []


def test_restores_are_consistent_and_boot(
    run: Run, libvirt_conn: Any, guest_image: bkguest.GuestImage,
) -> None:
    """Each backup restored (qcow2): `e2fsck -n -f` clean with no journal recovery
    pending, and every file completed before that backup has its checksum, both on the
    host and in a strict verify boot.  The latest, `--define`d, boots: agent up, the
    data disk mounted, the writer resumes after the restored files."""
    need(run, 2)
    g = run.guest
    new = f"{g.name}-restored"
    for i, res in enumerate(run.backups):
        target = run.work / f"restore-{i}"
        extra = ["--define", new] if i == len(run.backups) - 1 else []
        if extra:
            run.defined.append(new)
        doc = cli(run.cfg, "restore", g.name, res["id"], "--target", str(target), *extra)
        if extra:
            assert doc["defined"] == new, doc
        disk = target / "vda.qcow2"
        assert disk.exists(), doc
        run.restored.append(disk)

        host = bkguest.check_disk_on_host(disk, replay=False)
        assert host.fsck_clean, host.detail
        assert host.ok, host.detail + "\n".join(host.bad)
        assert run.before[i] <= host.files <= run.after[i], (host.files, run.before, run.after)

        ok, console = bkguest.boot_verify(libvirt_conn, disk, 90, mode="strict",
                                          image=guest_image)
        assert ok, console[-3000:]
        assert verified_files(console) == host.files

    # The original is gone; the restored domain (XML from the backup: same kernel, initrd
    # and cmdline, the restored disk) boots.  It shares the original's console log path.
    g.destroy()
    dom = libvirt_conn.lookupByName(new)
    assert dom.listAllCheckpoints(0) == []
    dom.create()
    restored = bkguest.Guest(name=new, dom=dom, data_disk=run.restored[-1],
                             console_log=g.console_log, virt_type=g.virt_type,
                             conn=libvirt_conn)
    bkguest.wait_for_agent(dom, 90, g.console_log)
    mounts = {fs["mountpoint"]: fs for fs in restored.agent("guest-get-fsinfo")}
    assert mounts["/data"]["type"] == "ext4"
    count = restored.manifest_count()
    assert count >= run.before[-1]
    starts = re.findall(r"writer starts at f(\d+)", restored.console())
    assert starts and int(starts[-1]) >= run.before[-1], restored.console()[-2000:]
    assert wait_manifest(restored, count + 2, timeout=30) >= count + 2


# --------------------------------------------------------------- without an agent


@pytest.fixture
def agentless(linux_guest_factory: Callable[..., bkguest.Guest]) -> bkguest.Guest:
    """A running guest whose domain has no guest-agent channel (writer on)."""
    return linux_guest_factory(agent=False)


def test_quiesce_without_agent_fails_then_try_backs_up(
    agentless: bkguest.Guest, tmp_path: Path,
) -> None:
    """`--quiesce` without an agent: exit 1, one clear line on stderr, JSON error kind
    "quiesce", and nothing left behind (no checkpoint, job, scratch file or backup).
    With `quiesce = "try"` in the config ([domains.NAME], then [backup]) it backs up,
    and the result and manifest record quiesced=false and a warning."""
    g = agentless
    work = tmp_path / "w"
    work.mkdir()
    cfg = write_config(tmp_path / "strict.toml", work)
    cli(cfg, "init", "--chunk-size", str(256 * 1024))

    cp = run_cli("--config", str(cfg), "--json", "backup", g.name, "--quiesce")
    assert cp.returncode == 1, cp.stderr
    err = json.loads(cp.stdout)["error"]
    assert err["kind"] == "quiesce", err
    assert g.name in err["message"] and "agent" in err["message"], err
    errors = [line for line in cp.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in cp.stderr, cp.stderr
    assert f"{g.name}: backup failed: cannot quiesce: " in errors[0] \
        and "agent" in errors[0], errors[0]
    assert g.dom.listAllCheckpoints(0) == []
    assert not job_active(g.dom)
    assert scratch_left(work) == []
    assert cli(cfg, "list", g.name)["backups"] == []
    assert g.dom.isActive()

    for i, section in enumerate((f'[domains.{g.name}]\nquiesce = "try"\n',
                                 '[backup]\nquiesce = "try"\n')):
        try_cfg = write_config(tmp_path / f"try{i}.toml", work, section)
        res = cli(try_cfg, "backup", g.name)
        assert res["mode"] == ("full", "incremental")[i], res
        assert res["quiesced"] is False and res["freeze_seconds"] is None, res
        assert any("not quiesced" in w and "agent" in w for w in res.get("warnings", [])), res
        shown = cli(try_cfg, "show", g.name, res["id"])
        assert shown["quiesced"] is False and shown["freeze_seconds"] is None
        assert [c.getName() for c in g.dom.listAllCheckpoints(0)] == [res["checkpoint"]]
        assert not job_active(g.dom)
