"""systemd units: systemd-analyze verify, ExecStart lines parse with our CLI, install script.

`systemd-analyze verify` checks that the first ExecStart= binary exists.  The units
run plain "backupkit", which systemd resolves in its fixed search path
(/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin), so verification runs with
--root on a scratch root: the host's unit directory (for timers.target, sysinit.target
...), a stub /usr/local/bin/backupkit, our units in /etc/systemd/system, and the
template instantiated as backupkit-backup@vm\\x2d1.* (domain "vm-1").  The
Documentation=man: pages are checked through MANPATH pointing at our man pages.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from datetime import date
from pathlib import Path

import pytest

from backupkit import cli
from tests.conftest import need_tool

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
SERVICES = sorted(UNITS.glob("*.service"))
TIMERS = sorted(UNITS.glob("*.timer"))
HOST_UNITS = Path("/usr/lib/systemd/system")
SEARCH_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin")
DOMAIN = "vm-1"
ESCAPED = "vm\\x2d1"  # systemd-escape vm-1


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values (keys may repeat); continuation lines joined."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_unit_set() -> None:
    names = {p.name for p in UNITS.iterdir()}
    assert names == {f"backupkit-{n}.{t}" for n in ("backup@", "backup-all", "prune", "verify",
                                                    "drill@")
                     for t in ("service", "timer")}
    for timer in TIMERS:
        assert (UNITS / timer.name.replace(".timer", ".service")).exists()


@pytest.fixture(scope="module")
def unit_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("root")
    if HOST_UNITS.is_dir():
        shutil.copytree(HOST_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    bindir = root / "usr/local/bin"
    bindir.mkdir(parents=True)
    stub = bindir / "backupkit"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    for unit in UNITS.iterdir():
        shutil.copy(unit, etc / unit.name)
        if "@." in unit.name:
            shutil.copy(unit, etc / unit.name.replace("@.", f"@{ESCAPED}."))
    man = root / "man"
    for page in (ROOT / "man").iterdir():
        section = man / f"man{page.suffix[1:]}"
        section.mkdir(parents=True, exist_ok=True)
        shutil.copy(page, section / page.name)
    return root


def _verify(root: Path, *names: str) -> subprocess.CompletedProcess[str]:
    etc = root / "etc/systemd/system"
    env = {**os.environ, "MANPATH": str(root / "man"), "SYSTEMD_LOG_COLOR": "0"}
    return subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", "--man=yes",
         *[str(etc / n) for n in names]],
        capture_output=True, text=True, env=env, timeout=60, check=False)


def _verifiable_units() -> list[str]:
    return [p.name.replace("@.", f"@{ESCAPED}.") for p in [*SERVICES, *TIMERS]]


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze missing")
@pytest.mark.parametrize("name", _verifiable_units())
def test_systemd_analyze_verify(unit_root: Path, name: str) -> None:
    """No errors and no warnings at all (unknown keys are only warnings, rc 0)."""
    if not HOST_UNITS.is_dir():
        pytest.skip("no /usr/lib/systemd/system to verify against")
    cp = _verify(unit_root, name)
    assert cp.returncode == 0 and cp.stderr.strip() == "", cp.stderr
    assert cp.stdout.strip() == "", cp.stdout


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze missing")
def test_verify_fails_without_the_binary(unit_root: Path, tmp_path: Path) -> None:
    """The check is real: with no backupkit in systemd's search path, verify fails."""
    if not HOST_UNITS.is_dir():
        pytest.skip("no /usr/lib/systemd/system to verify against")
    root = tmp_path / "root"
    shutil.copytree(unit_root, root, symlinks=True)
    (root / "usr/local/bin/backupkit").unlink()
    cp = _verify(root, "backupkit-verify.service")
    assert cp.returncode != 0 and "backupkit" in cp.stderr


def _unescape(instance: str) -> str:
    if shutil.which("systemd-escape"):
        return subprocess.run(["systemd-escape", "--unescape", "--", instance], capture_output=True,
                              text=True, check=True).stdout.rstrip("\n")
    return re.sub(r"\\x([0-9a-f]{2})", lambda m: chr(int(m[1], 16)),
                  instance.replace("-", "/"))


def _exec_argv(unit: Path, instance: str) -> list[list[str]]:
    """Each ExecStart= as argv, %I/%i substituted as systemd does for INSTANCE."""
    out = []
    for line in parse_unit(unit)["Service"]["ExecStart"]:
        assert line and line[0] not in "-@:+!|", f"{unit.name}: prefix in {line!r}"
        argv = [w.replace("%I", _unescape(instance)).replace("%i", instance)
                for w in shlex.split(line)]
        assert not any(re.search(r"%[a-zA-Z]", w) for w in argv), argv
        out.append(argv)
    return out


@pytest.mark.parametrize("unit", SERVICES, ids=lambda p: p.name)
def test_execstart_parses_with_our_cli(unit: Path) -> None:
    for argv in _exec_argv(unit, ESCAPED):
        assert argv[0] == "backupkit", "run by name: systemd resolves it in its search path"
        args = cli.build_parser().parse_args(argv[1:])
        assert callable(args.func)
        assert not args.json and args.quiet == 0


def test_execstart_commands() -> None:
    argvs = {u.name: _exec_argv(u, ESCAPED) for u in SERVICES}
    (one,) = argvs["backupkit-backup@.service"]
    args = cli.build_parser().parse_args(one[1:])
    assert args.command == "backup" and args.domains == [DOMAIN] and not args.all
    (every,) = argvs["backupkit-backup-all.service"]
    args = cli.build_parser().parse_args(every[1:])
    assert args.command == "backup" and args.all and not args.domains
    assert args.jobs is None, "the config key jobs decides how many domains run at once"
    prune, gc = argvs["backupkit-prune.service"]
    args = cli.build_parser().parse_args(prune[1:])
    assert args.command == "prune" and args.domain is None and not args.dry_run
    assert all(getattr(args, f"keep_{k}") is None for k in
               ("last", "hourly", "daily", "weekly", "monthly", "yearly")), \
        "prune must use the config's [prune] policy"
    assert cli.build_parser().parse_args(gc[1:]).command == "gc"
    (verify,) = argvs["backupkit-verify.service"]
    args = cli.build_parser().parse_args(verify[1:])
    assert args.command == "verify" and args.data is None, "[verify] data decides"
    (drill,) = argvs["backupkit-drill@.service"]
    args = cli.build_parser().parse_args(drill[1:])
    assert args.command == "drill" and args.domain == DOMAIN and args.backup == "latest"


@pytest.mark.parametrize("name", ["vm-1", "web.example.com", "a b", "-dash"])
def test_instance_escaping_round_trip(name: str) -> None:
    need_tool("systemd-escape", "systemd")
    escaped = subprocess.run(["systemd-escape", "--", name], capture_output=True, text=True,
                             check=True).stdout.strip()
    (argv,) = _exec_argv(UNITS / "backupkit-backup@.service", escaped)
    assert cli.build_parser().parse_args(argv[1:]).domains == [name]


@pytest.mark.parametrize("unit", SERVICES, ids=lambda p: p.name)
def test_service_semantics(unit: Path) -> None:
    u = parse_unit(unit)
    svc = u["Service"]
    assert svc["Type"] == ["oneshot"]
    # Only 7 ("interrupted": stopped cleanly) counts as success; every other non-zero
    # exit fails the unit.
    assert svc["SuccessExitStatus"] == ["7"]
    assert "KillSignal" not in svc, "SIGTERM, the default, makes backupkit clean up"
    assert svc["StateDirectoryMode"] == ["0711"], "QEMU's user must pass into the scratch dir"
    assert "RemainAfterExit" not in svc
    assert "Install" not in u, "services are started by their timers"
    assert u["Unit"]["Documentation"][0].startswith("man:backupkit(8)")
    for directive in ("ProtectSystem", "ProtectHome", "PrivateTmp", "NoNewPrivileges"):
        assert directive in svc, directive
    assert svc["ProtectSystem"] == ["strict"]
    assert svc["NoNewPrivileges"] == ["yes"] and svc["PrivateTmp"] == ["yes"]
    assert "backupkit" in " ".join(svc["StateDirectory"])
    after = " ".join(u["Unit"].get("After", []))
    if "backup" in unit.name.split("-")[1]:
        for dep in ("libvirtd.service", "virtqemud.socket"):
            assert dep in after.split(), dep
        rw = " ".join(svc["ReadWritePaths"]).split()
        assert "-/var/lib/libvirt/images" in rw, "cold backups change bitmaps in the images"
        assert "backupkit/scratch" in " ".join(svc["StateDirectory"])
        # host-wide domain locks under /run (read-only under ProtectSystem=strict)
        assert svc["RuntimeDirectory"] == ["backupkit"]
        assert svc["RuntimeDirectoryPreserve"] == ["yes"], "another unit may hold a lock"
        for directive in ("PrivateDevices", "DeviceAllow", "DevicePolicy", "ProtectClock"):
            # ProtectClock= implies DeviceAllow=char-rtc, which closes the device policy
            assert directive not in svc, f"{directive}: block-device disks must stay reachable"
        assert "AF_UNIX" in " ".join(svc["RestrictAddressFamilies"])
        assert not any(p.startswith("/run") for p in svc.get("InaccessiblePaths", []))


@pytest.mark.parametrize("timer", TIMERS, ids=lambda p: p.name)
def test_timer_semantics(timer: Path) -> None:
    u = parse_unit(timer)
    t = u["Timer"]
    assert t["Persistent"] == ["true"]
    assert t["RandomizedDelaySec"] and t["OnCalendar"]
    assert u["Install"]["WantedBy"] == ["timers.target"]
    if "verify" in timer.name or "drill" in timer.name:
        assert t["OnCalendar"][0].split()[0] in ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat",
                                                 "Sun", "weekly")
    else:
        assert re.fullmatch(r"\*-\*-\* \d\d:\d\d:\d\d|daily", t["OnCalendar"][0])


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze missing")
def test_calendars_are_nightly_and_weekly() -> None:
    for timer in TIMERS:
        cal = parse_unit(timer)["Timer"]["OnCalendar"][0]
        cp = subprocess.run(["systemd-analyze", "calendar", "--iterations=3", cal],
                            capture_output=True, text=True, timeout=30, check=True)
        runs = re.findall(r"(\d{4}-\d\d-\d\d) ", cp.stdout)
        assert len(runs) >= 3, cp.stdout
        days = [date.fromisoformat(d) for d in runs[-3:]]
        gap = (days[1] - days[0]).days
        weekly = "verify" in timer.name or "drill" in timer.name
        assert gap == (7 if weekly else 1), (timer.name, cp.stdout)


def _install(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(ROOT / "scripts/install.sh")], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=60, check=False)


def test_install_script(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    cp = _install(tmp_path, DESTDIR=str(dest))
    assert cp.returncode == 0, cp.stderr
    unitdir = dest / "usr/local/lib/systemd/system"
    assert sorted(p.name for p in unitdir.iterdir()) == sorted(p.name for p in UNITS.iterdir())
    assert (dest / "usr/local/share/man/man8/backupkit.8").read_bytes() == \
        (ROOT / "man/backupkit.8").read_bytes()
    assert (dest / "usr/local/share/man/man5/backupkit.toml.5").exists()
    conf = dest / "etc/backupkit/backupkit.toml"
    assert conf.read_bytes() == (ROOT / "config/backupkit.toml").read_bytes()
    assert (dest / "usr/local/share/doc/backupkit/backupkit.toml.example").exists()
    assert oct(conf.stat().st_mode & 0o777) == "0o644"

    # Never overwrite an existing config; units and pages are updated.
    conf.write_text("repository = '/mine'\n")
    (unitdir / "backupkit-prune.timer").write_text("old")
    cp = _install(tmp_path, DESTDIR=str(dest))
    assert cp.returncode == 0, cp.stderr
    assert conf.read_text() == "repository = '/mine'\n"
    assert "kept existing" in cp.stdout
    assert (unitdir / "backupkit-prune.timer").read_bytes() == \
        (UNITS / "backupkit-prune.timer").read_bytes()


def test_install_script_prefix(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    cp = _install(tmp_path, DESTDIR=str(dest), PREFIX="/usr", SYSCONFDIR="/etc")
    assert cp.returncode == 0, cp.stderr
    assert (dest / "usr/lib/systemd/system/backupkit-backup@.service").exists()
    assert (dest / "usr/share/man/man8/backupkit.8").exists()
    assert (dest / "etc/backupkit/backupkit.toml").exists()
