"""Which backups belong together (backupkit.repo.chains): one chain per (name, UUID).

Pure tests on manifests; the same rules on real domains, hosts and repositories (local
and S3) are in tests/ops/test_hosts.py."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from backupkit.errors import CorruptRepository, NotFound, UsageError
from backupkit.repo import Manifest
from backupkit.repo.chains import chain_keys, chains, other_chains, pick_chain, same_domain

U1 = "11111111-1111-1111-1111-111111111111"
U2 = "22222222-2222-2222-2222-222222222222"
U3 = "33333333-3333-3333-3333-333333333333"


def m(n: int, host: str | None, uuid: str | None, *, xml: str = "<domain/>",
      domain: str = "web") -> Manifest:
    t = f"2026-01-{n:02d}T10:00:00Z"
    return Manifest(id=f"202601{n:02d}T100000Z-{n:06x}", domain=domain, created=t, mode="full",
                    reason="", checkpoint=None, parent_checkpoint=None, parent_id=None,
                    started=t, finished=t, duration_seconds=1.0, quiesced=False,
                    freeze_seconds=None, domain_xml=xml, checkpoint_xml=None, disks=[],
                    host=host, domain_uuid=uuid)


def const(v: str | None) -> Callable[[], str | None]:
    return lambda: v


def me(host: str) -> Callable[[], str]:
    return lambda: host


def never() -> str:
    raise AssertionError("not needed here")


def test_manifest_round_trip_and_older_manifests() -> None:
    new = m(1, "hostA", U1)
    doc = new.to_json()
    assert doc["host"] == "hostA" and doc["domain_uuid"] == U1
    assert Manifest.from_json(json.loads(json.dumps(doc))) == new
    # Older manifests have neither field: None, and the UUID comes from their domain XML.
    for k in ("host", "domain_uuid"):
        del doc[k]
    doc["domain_xml"] = f"<domain><name>web</name><uuid>{U2.upper()}</uuid></domain>"
    old = Manifest.from_json(doc)
    assert old.host is None and old.domain_uuid is None
    assert old.chain_uuid == U2
    assert m(1, None, None).chain_uuid is None  # no <uuid> anywhere: a legacy backup
    doc["host"] = 7
    with pytest.raises(CorruptRepository, match="'host' has the wrong type"):
        Manifest.from_json(doc)


def test_same_domain_is_the_same_uuid_from_any_host() -> None:
    assert same_domain(m(1, "hostA", U1), U1, "hostB")  # moved to hostB: continues
    assert not same_domain(m(1, "hostB", U2), U1, "hostB")  # same host, another domain
    xml = f"<domain><uuid>{U1}</uuid></domain>"
    assert same_domain(m(1, None, None, xml=xml), U1, "hostA")  # older manifest, its XML
    assert not same_domain(m(1, None, None, xml=xml), U2, "hostA")
    # No UUID at all: the same domain only from this host or from no named host.
    assert same_domain(m(1, None, None), U1, "hostA")
    assert same_domain(m(1, "hostA", None), U1, "hostA")
    assert not same_domain(m(1, "hostB", None), U1, "hostA")


def test_chain_keys_legacy_backups_join_the_oldest_chain_of_their_host() -> None:
    backups = [m(1, None, None), m(2, "hostB", None), m(3, "hostA", U1), m(4, "hostB", U2),
               m(5, "hostC", None), m(6, "hostA", U1, domain="db")]
    keys = chain_keys(backups)
    assert [keys[(b.domain, b.id)] for b in backups] == [U1, U2, U1, U2, None, U1]
    groups = chains([b for b in backups if b.domain == "web"])
    assert {k: [b.id[-2:] for b in v] for k, v in groups.items()} == {
        U1: ["01", "03"], U2: ["02", "04"], None: ["05"]}


def test_pick_one_chain_needs_nothing_more() -> None:
    one = [m(1, "hostA", U1), m(2, "hostB", U1)]  # a domain that moved from A to B
    assert pick_chain(one, "web", host=None, this_host=never, local_uuid=never) == one
    assert pick_chain(one, "web", host="hostA", this_host=never, local_uuid=never) == one
    assert pick_chain([], "web", host=None, this_host=never, local_uuid=never) == []
    with pytest.raises(NotFound, match=r"web from host hostC.*hostA, hostB"):
        pick_chain(one, "web", host="hostC", this_host=never, local_uuid=never)


def test_pick_among_chains() -> None:
    a = [m(1, "hostA", U1), m(4, "hostA", U1)]
    b = [m(2, "hostB", U2), m(3, "hostB", U2)]
    both = sorted(a + b, key=Manifest.sort_key)
    # The domain defined here under that name wins, whoever backed it up.
    assert pick_chain(both, "web", host=None, this_host=me("hostA"),
                      local_uuid=const(U2)) == b
    # Else this host's backups.
    assert pick_chain(both, "web", host=None, this_host=me("hostB"),
                      local_uuid=const(None)) == b
    # --host names the chain.
    assert pick_chain(both, "web", host="hostA", this_host=never,
                      local_uuid=const(U3)) == a
    # Neither: exit 2 naming the hosts, asking for --host.
    with pytest.raises(UsageError) as e:
        pick_chain(both, "web", host=None, this_host=me("hostC"),
                   local_uuid=const(U3))
    assert e.value.exit_code == 2
    assert "2 different domains" in str(e.value) and "hostA, hostB" in str(e.value)
    assert "--host" in str(e.value) and "\n" not in str(e.value)


def test_pick_several_chains_of_one_host_takes_the_local_then_the_newest() -> None:
    # hostA re-created its "web" (new UUID); the old chain stays in the repository.
    old = [m(1, "hostA", U1), m(2, "hostA", U1)]
    new = [m(3, "hostA", U2)]
    both = old + new
    assert pick_chain(both, "web", host=None, this_host=me("hostA"),
                      local_uuid=const(None)) == new
    assert pick_chain(both, "web", host="hostA", this_host=never,
                      local_uuid=const(U1)) == old


def test_other_chains_reason_names_the_hosts() -> None:
    assert other_chains([], U1, "hostB") is None
    why = other_chains([m(1, "hostA", U2), m(2, None, U3)], U1, "hostB")
    assert why is not None
    assert U1 in why and "hostA" in why and "unknown host" in why and "2 backup(s)" in why
