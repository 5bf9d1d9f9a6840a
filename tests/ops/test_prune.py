"""prune: the retention plan on a synthetic calendar (hand-computed), and on a real repository."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from backupkit import errors
from backupkit.ops.prune import Policy, plan, prune
from backupkit.ops.restore import restore
from backupkit.ops.verify import verify
from backupkit.repo import Manifest, Repository
from tests.repo.helpers import CHUNK, MiB, make_backup, rand, write_image

# Newest last.  ISO weeks: 2025-12-30 is in 2026-W01; Jan 5-8 W02; Jan 12 W03; Feb 1 W05;
# Feb 2 W06.  No backup in W04.
CALENDAR = {
    1: "2025-12-30T10:00:00Z",
    2: "2026-01-05T10:00:00Z",
    3: "2026-01-05T22:00:00Z",
    4: "2026-01-06T09:00:00Z",
    5: "2026-01-08T09:00:00Z",
    6: "2026-01-12T09:00:00Z",
    7: "2026-02-01T09:00:00Z",
    8: "2026-02-01T15:00:00Z",
    9: "2026-02-02T01:00:00Z",
    10: "2026-02-02T01:30:00Z",
}
NOW = datetime(2026, 2, 2, 12, 0, tzinfo=UTC)


def manifest(n: int, created: str, domain: str = "vm1", host: str | None = None,
             uuid: str | None = None) -> Manifest:
    return Manifest(id=f"b{n:02d}", domain=domain, created=created, mode="full", reason="",
                    checkpoint=None, parent_checkpoint=None, parent_id=None, started=created,
                    finished=created, duration_seconds=1.0, quiesced=False,
                    freeze_seconds=None, domain_xml="", checkpoint_xml=None, disks=[],
                    host=host, domain_uuid=uuid)


def run(policy: Policy, domain: str = "vm1") -> dict[int, list[str]]:
    """{backup number: reasons} of the kept backups."""
    backups = [manifest(n, c, domain) for n, c in CALENDAR.items()]
    decisions = plan(list(reversed(backups)), policy, NOW)
    assert [d.manifest.id for d in decisions] == [m.id for m in backups]  # oldest first
    return {int(d.manifest.id[1:]): d.reasons for d in decisions if d.keep}


UTC_ = UTC


@pytest.mark.parametrize("policy, expected", [
    (Policy(last=2, daily=3, weekly=2, monthly=2, yearly=2, tz=UTC_), {
        10: ["keep-last", "keep-daily", "keep-weekly", "keep-monthly", "keep-yearly"],
        9: ["keep-last"],
        8: ["keep-daily", "keep-weekly"],
        6: ["keep-daily", "keep-monthly"],
        1: ["keep-yearly"],
    }),
    (Policy(hourly=3, tz=UTC_), {10: ["keep-hourly"], 8: ["keep-hourly"],
                                 7: ["keep-hourly"]}),
    # Week 4 has no backup and does not count: four weeks reach back to W02.
    (Policy(weekly=4, tz=UTC_), {10: ["keep-weekly"], 8: ["keep-weekly"],
                                 6: ["keep-weekly"], 5: ["keep-weekly"]}),
    (Policy(daily=2, tz=UTC_), {10: ["keep-daily"], 8: ["keep-daily"]}),
    # The same policy in UTC-5: Feb 2 01:30 UTC is still Feb 1 there.
    (Policy(daily=2, tz=timezone(timedelta(hours=-5))), {10: ["keep-daily"],
                                                         6: ["keep-daily"]}),
    (Policy(monthly=12, tz=UTC_), {10: ["keep-monthly"], 6: ["keep-monthly"],
                                   1: ["keep-monthly"]}),
    (Policy(last=30, tz=UTC_), {n: ["keep-last"] for n in CALENDAR}),
    (Policy(within=timedelta(days=1, hours=2), tz=UTC_),
     {10: ["keep-within"], 9: ["keep-within"], 8: ["keep-within"]}),
    # Nothing in the window: the newest backup is kept anyway.
    (Policy(within=timedelta(minutes=1), tz=UTC_), {10: ["newest"]}),
])
def test_plan_calendar(policy: Policy, expected: dict[int, list[str]]) -> None:
    assert run(policy) == expected


def test_plan_per_domain() -> None:
    backups = [manifest(n, c, "vm1") for n, c in CALENDAR.items()]
    backups += [manifest(n, c, "vm2") for n, c in list(CALENDAR.items())[:3]]
    kept = [(d.manifest.domain, d.manifest.id) for d in plan(backups, Policy(last=1), NOW)
            if d.keep]
    assert kept == [("vm1", "b10"), ("vm2", "b03")]


def test_plan_per_chain() -> None:
    """Two hosts' domains named vm1 (two UUIDs) keep their own retention: hostB's seven
    newer backups never push out hostA's, and each keeps its newest.  A domain that
    moved (hostA then hostC, one UUID) is one chain; a backup from before UUIDs were
    recorded joins its name's oldest chain."""
    u1, u2 = "1" * 32, "2" * 32
    items = list(CALENDAR.items())
    backups = [manifest(1, items[0][1], host=None)]
    backups += [manifest(n, c, host="hostA", uuid=u1) for n, c in items[1:3]]
    backups += [manifest(n, c, host="hostB", uuid=u2) for n, c in items[3:]]
    backups.append(manifest(11, "2026-02-02T02:00:00Z", host="hostC", uuid=u1))
    decisions = plan(backups, Policy(last=2), NOW)
    kept = sorted(d.manifest.id for d in decisions if d.keep)
    assert kept == ["b03", "b09", "b10", "b11"]
    assert {d.to_json()["host"] for d in decisions} == {None, "hostA", "hostB", "hostC"}
    kept = sorted(d.manifest.id for d in plan(backups[:3] + backups[3:-1], Policy(last=1),
                                               NOW) if d.keep)
    assert kept == ["b03", "b10"]


@pytest.mark.parametrize("policy", [Policy(), Policy(daily=-1), Policy(last=0, weekly=0)])
def test_policy_needs_a_rule(policy: Policy) -> None:
    with pytest.raises(errors.UsageError) as e:
        plan([], policy, NOW)
    assert e.value.exit_code == 2


def test_prune_repository(tmp_path: Path) -> None:
    repo = Repository.init(str(tmp_path / "repo"), chunk_size=CHUNK)
    img = write_image(tmp_path / "a.raw", MiB)
    other = write_image(tmp_path / "b.raw", MiB, [(0, rand(CHUNK, 99))])
    ids = {}
    for n, created in CALENDAR.items():
        write_image(img, MiB, [(n * CHUNK % MiB, rand(CHUNK, n))])
        ids[n] = make_backup(repo, "vm1", {"vda": img},
                             now=datetime.fromisoformat(created)).id
    make_backup(repo, "vm2", {"vda": other})
    policy = Policy(last=2, daily=3, weekly=2, monthly=2, yearly=2, tz=UTC)

    dry = prune(repo, "vm1", policy, dry_run=True, now=NOW)
    assert dry["dry_run"] and dry["removed"] == 5 and dry["kept"] == 5
    assert len(repo.list_backups()) == 11
    assert {d["id"]: d["action"] for d in dry["decisions"]}[ids[7]] == "remove"

    res = prune(repo, "vm1", policy, now=NOW)
    assert res == {**dry, "dry_run": False}
    kept = {ids[n] for n in (10, 9, 8, 6, 1)}
    assert {m.id for m in repo.list_backups("vm1")} == kept
    assert len(repo.list_backups("vm2")) == 1
    # Only manifests and indexes went: the backup directories are gone, chunks stay for gc.
    assert set(os.listdir(Path(repo.path, "backups", "vm1"))) == kept
    for n in (10, 1):
        verify(repo, "vm1", ids[n], data=True)
        restore(repo, "vm1", ids[n], str(tmp_path / f"out{n}"), fmt="raw")

    # All domains at once; a domain locked by a running backup is skipped, not waited on.
    with repo.lock_domain("vm2"), pytest.raises(errors.Partial) as e:
        prune(repo, None, Policy(last=1), now=NOW)
    assert e.value.exit_code == 6
    assert [s["domain"] for s in e.value.result["skipped"]] == ["vm2"]  # type: ignore[attr-defined]
    assert [m.id for m in repo.list_backups("vm1")] == [ids[10]]


@pytest.mark.parametrize(("text", "expected"), [
    ("7d", timedelta(days=7)), ("12h", timedelta(hours=12)), ("2w", timedelta(weeks=2)),
    ("1m", timedelta(days=31)), ("1y", timedelta(days=365)),
    ("1y6m", timedelta(days=365 + 6 * 31)), ("0d", None), ("", None), ("7", None),
    ("d", None), ("7x", None), ("-1d", None), ("7d ", None), ("1.5d", None)])
def test_keep_within_durations(text: str, expected: timedelta | None) -> None:
    from backupkit import config

    assert config.parse_duration(text) == expected


def test_keep_within_from_the_command_line_and_the_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """--keep-within DURATION keeps every backup newer than DURATION (borg, restic); the
    config's prune.keep_within does the same when no --keep-* option is given."""
    import json

    from backupkit import cli

    repo = Repository.init(str(tmp_path / "repo"), chunk_size=CHUNK)
    img = write_image(tmp_path / "a.raw", MiB)
    now = datetime.now(UTC)
    ages = {"1h": timedelta(hours=1), "2d": timedelta(days=2), "4d": timedelta(days=4),
            "10d": timedelta(days=10), "40d": timedelta(days=40)}
    ids = {name: make_backup(repo, "vm1", {"vda": img}, now=now - age).id
           for name, age in sorted(ages.items(), key=lambda kv: -kv[1])}
    cfg = tmp_path / "backupkit.toml"
    cfg.write_text("[prune]\nkeep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0\n"
                   'keep_within = "5d"\n')
    monkeypatch.setenv("BACKUPKIT_CONFIG", str(cfg))
    monkeypatch.delenv("BACKUPKIT_REPO", raising=False)

    def prune_cli(*argv: str) -> dict[str, str]:
        code = cli.main(["--json", "--repo", repo.path, "prune", "vm1", *argv])
        doc = json.loads(capsys.readouterr().out)
        assert code == 0, doc
        return {d["id"]: d["action"] for d in doc["decisions"]}

    # The command line wins over the config: 3 days keeps 1h and 2d.
    actions = prune_cli("--keep-within", "3d", "--dry-run")
    assert actions == {ids["1h"]: "keep", ids["2d"]: "keep", ids["4d"]: "remove",
                       ids["10d"]: "remove", ids["40d"]: "remove"}
    # The config's keep_within (5d) when no --keep-* option is given.
    assert prune_cli() == {ids["1h"]: "keep", ids["2d"]: "keep", ids["4d"]: "keep",
                           ids["10d"]: "remove", ids["40d"]: "remove"}
    assert {m.id for m in repo.list_backups("vm1")} == {ids["1h"], ids["2d"], ids["4d"]}

    # A bad duration is a usage error (exit 2), on the command line and in the config.
    assert cli.main(["--json", "--repo", repo.path, "prune", "--keep-within", "7x"]) == 2
    out = capsys.readouterr()
    assert "invalid duration '7x'" in out.err
    cfg.write_text('[prune]\nkeep_within = "soon"\n')
    assert cli.main(["--json", "--repo", repo.path, "prune"]) == 2
    doc = json.loads(capsys.readouterr().out)["error"]
    assert doc["kind"] == "config" and "prune.keep_within" in doc["message"]
