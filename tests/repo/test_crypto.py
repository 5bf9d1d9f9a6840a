"""Encrypted repositories at the repository level (real local store, no libvirt): keys,
passphrases, paper keys, escrow, what the stored files reveal, and the version rule."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import blake3
import pytest

from backupkit import errors
from backupkit.repo import Repository, crypto, repository
from tests.repo.helpers import CHUNK, MiB, make_backup, rand, text, write_image


def pp(tmp_path: Path, secret: str, name: str = "pass") -> crypto.Passphrase:
    f = tmp_path / name
    f.write_text(secret + "\n")
    return crypto.Passphrase(file=str(f))


@pytest.fixture
def enc(tmp_path: Path) -> Repository:
    return Repository.init(str(tmp_path / "repo"), chunk_size=CHUNK,
                           encryption=pp(tmp_path, "correct horse"))


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "locks" not in p.parts}


def test_round_trip_dedup_and_nothing_in_clear(enc: Repository, tmp_path: Path) -> None:
    marker = b"SECRET-PAYLOAD-" * 4096
    img = write_image(tmp_path / "a.raw", 1 * MiB, [(0, marker), (CHUNK * 3, rand(CHUNK, 1)),
                                                   (CHUNK * 5, text(CHUNK))])
    m = make_backup(enc, "secretdom", {"vda": img})
    again = Repository.open(enc.path, pp(tmp_path, "correct horse"))
    assert again.encrypted and again.config["version"] == 3
    index = again.load_index(again.get_manifest("secretdom", m.id), "vda")
    data = Path(img).read_bytes()
    buf = again.chunk_buffer()
    for slot, digest in index.data_slots():
        chunk = data[slot * CHUNK:(slot + 1) * CHUNK]
        assert bytes(again.read_chunk(digest, buf)) == chunk
        # Names are a keyed hash: they do not reveal the data (nor match its plain hash).
        assert digest != blake3.blake3(chunk).digest()
    # The same data again stores nothing new: dedup still works inside the repository.
    m2 = make_backup(again, "secretdom", {"vda": img})
    assert m2.disks[0].stored_bytes == 0
    # Neither the data, nor the manifest's contents, nor the domain XML appear in clear.
    for name, content in files(Path(enc.path)).items():
        if name.startswith("backups/") or name.startswith("chunks/"):
            assert b"SECRET-PAYLOAD" not in content, name
            assert b"domain_xml" not in content and b"<domain" not in content, name


def test_wrong_passphrase_is_exit_2_and_writes_nothing(enc: Repository, tmp_path: Path
                                                       ) -> None:
    before = files(Path(enc.path))
    with pytest.raises(errors.WrongKey) as ei:
        Repository.open(enc.path, pp(tmp_path, "wrong", "w"))
    assert ei.value.exit_code == 2
    assert files(Path(enc.path)) == before


def test_passphrase_places_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "f").write_text("from-file\r\n")
    (tmp_path / "c").write_text("from-config\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "backupkit-passphrase").write_text("from-credential")
    monkeypatch.setenv("BACKUPKIT_PASSPHRASE", "from-env")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    both = crypto.Passphrase(file=str(tmp_path / "f"), config_file=str(tmp_path / "c"))
    assert both.get() == b"from-file"
    cfg_only = crypto.Passphrase(config_file=str(tmp_path / "c"))
    assert cfg_only.get() == b"from-env"
    monkeypatch.delenv("BACKUPKIT_PASSPHRASE")
    assert cfg_only.get() == b"from-credential"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    assert cfg_only.get() == b"from-config"


def test_no_passphrase_anywhere_is_exit_2(enc: Repository, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    make_backup(enc, "d", {"vda": write_image(tmp_path / "a.raw", CHUNK, [(0, b"x")])})
    monkeypatch.delenv("BACKUPKIT_PASSPHRASE", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.setattr("sys.stdin", io.StringIO())  # no terminal to ask on
    with pytest.raises(errors.KeyRequired, match="BACKUPKIT_PASSPHRASE") as ei:
        Repository.open(enc.path).list_backups()
    assert ei.value.exit_code == 2


def test_older_backupkit_refuses_an_encrypted_repository(enc: Repository,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    # A build that knows version 2 at most (today's released code) runs this same check.
    monkeypatch.setattr(repository, "REPO_VERSION", 2)
    with pytest.raises(errors.UnsupportedFormat,
                       match=r"version 3 is newer than this backupkit supports \(2\); upgrade"):
        Repository.open(enc.path)


def test_unencrypted_repositories_stay_version_2(tmp_path: Path) -> None:
    r = Repository.init(str(tmp_path / "plain"), chunk_size=CHUNK)
    assert r.config["version"] == 2 and "encryption" not in r.config and not r.encrypted


def test_paper_key_round_trip_and_typos(enc: Repository, tmp_path: Path) -> None:
    paper = crypto.paper_key(enc.key)
    assert crypto.read_paper_key(paper, "blake3").secret == enc.key.secret
    lines = paper.splitlines()
    n = next(i for i, line in enumerate(lines) if line.startswith("4:"))
    typo = lines[n][:4] + ("0" if lines[n][4] != "0" else "1") + lines[n][5:]
    with pytest.raises(errors.UsageError, match="line 4: checksum does not match"):
        crypto.read_paper_key("\n".join([*lines[:n], typo, *lines[n + 1:]]), "blake3")
    with pytest.raises(errors.UsageError, match="line 4 is missing"):
        crypto.read_paper_key("\n".join([*lines[:n], *lines[n + 1:]]), "blake3")
    # Case and dashes do not matter when typing it back.
    loose = "\n".join(line.upper().replace(" ", "-", 2) if line[:1].isdigit() else line
                      for line in lines)
    assert crypto.read_paper_key(loose, "blake3").secret == enc.key.secret


def test_other_repository_key_is_refused(enc: Repository, tmp_path: Path) -> None:
    other = Repository.init(str(tmp_path / "other"), chunk_size=CHUNK,
                            encryption=pp(tmp_path, "x", "o"))
    with pytest.raises(errors.WrongKey, match="belongs to repository"):
        enc.adopt_key(other.key, "the paper key")


def test_escrow_x25519_made_with_openssl(tmp_path: Path) -> None:
    priv, pub = tmp_path / "master.pem", tmp_path / "master.pub"
    subprocess.run(["openssl", "genpkey", "-algorithm", "X25519", "-out", str(priv)],
                   check=True)
    subprocess.run(["openssl", "pkey", "-in", str(priv), "-pubout", "-out", str(pub)],
                   check=True)
    r = Repository.init(str(tmp_path / "r"), chunk_size=CHUNK,
                        encryption=pp(tmp_path, "p"), master_pubkey=("pub", pub.read_bytes()))
    escrow = Path(r.path, crypto.ESCROW_KEY).read_bytes()
    key = crypto.unseal_from_master(escrow, priv.read_bytes(), "m", "blake3", r.path)
    assert key.secret == r.key.secret
    # A public key where the private one belongs, or a key of another pair: exit 2.
    other = tmp_path / "other.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "X25519", "-out", str(other)],
                   check=True)
    with pytest.raises(errors.WrongKey, match="not the master key"):
        crypto.unseal_from_master(escrow, other.read_bytes(), "other.pem", "blake3", r.path)
    with pytest.raises(errors.UsageError, match="not an unencrypted PEM private key"):
        crypto.unseal_from_master(escrow, pub.read_bytes(), "master.pub", "blake3", r.path)


def test_bad_master_pubkey_writes_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pub"
    bad.write_text("not a key\n")
    with pytest.raises(errors.UsageError, match="not a PEM public key"):
        Repository.init(str(tmp_path / "r"), chunk_size=CHUNK, encryption=pp(tmp_path, "p"),
                        master_pubkey=(str(bad), bad.read_bytes()))
    assert not (tmp_path / "r" / "config.json").exists()


def test_init_without_a_passphrase_writes_nothing(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BACKUPKIT_PASSPHRASE", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.setattr("sys.stdin", io.StringIO())
    with pytest.raises(errors.KeyRequired):
        Repository.init(str(tmp_path / "r"), encryption=crypto.Passphrase())
    assert not (tmp_path / "r").exists()


def test_key_passwd_export_import(enc: Repository, tmp_path: Path) -> None:
    from backupkit.ops import key as keyop

    old, new = pp(tmp_path, "correct horse"), pp(tmp_path, "battery staple", "new")
    res = keyop.passwd(Repository.open(enc.path), old, new)
    assert Repository.open(enc.path).key_files() == [res["key_file"]]
    with pytest.raises(errors.WrongKey):
        Repository.open(enc.path, old)
    Repository.open(enc.path, new)
    # A copy of the key file comes back after every key file is gone, and must open
    # with the passphrase (a wrong one: exit 2, nothing stored).
    keyop.export(Repository.open(enc.path), new, str(tmp_path / "k.json"), paper=False)
    Path(enc.path, res["key_file"]).unlink()
    before = files(Path(enc.path))
    with pytest.raises(errors.WrongKey):
        keyop.import_key(Repository.open(enc.path), old, str(tmp_path / "k.json"), paper=False)
    assert files(Path(enc.path)) == before
    keyop.import_key(Repository.open(enc.path), new, str(tmp_path / "k.json"), paper=False)
    Repository.open(enc.path, new)
    # export never replaces a file.
    with pytest.raises(errors.UsageError, match="exists"):
        keyop.export(Repository.open(enc.path), new, str(tmp_path / "k.json"), paper=True)


def test_config_replaced_by_an_unencrypted_one_is_refused(enc: Repository, tmp_path: Path
                                                          ) -> None:
    """config.json is the one object nobody can authenticate.  Replaced by one saying
    "unencrypted" (version 2, no encryption), the repository used to open and take new
    chunks in the clear; the key files beside it now give the swap away (exit 5)."""
    import json

    cfg = Path(enc.path) / "config.json"
    doc = json.loads(cfg.read_bytes())
    del doc["encryption"]
    doc["version"] = 2
    cfg.write_text(json.dumps(doc))
    for who in (None, pp(tmp_path, "correct horse")):
        with pytest.raises(errors.CorruptRepository, match="holds key files") as e:
            Repository.open(enc.path, who)
        assert e.value.exit_code == 5


def test_passphrase_file_on_an_unencrypted_repository_is_refused(tmp_path: Path) -> None:
    plain = Repository.init(str(tmp_path / "plain"), chunk_size=CHUNK)
    with pytest.raises(errors.UsageError, match="not encrypted, but a passphrase file"):
        Repository.open(plain.path, pp(tmp_path, "anything"))
    assert not Repository.open(plain.path).encrypted  # without one: as always


def test_a_key_file_scrypt_refuses_is_skipped(enc: Repository, tmp_path: Path) -> None:
    """A key file whose scrypt parameters hashlib refuses (n not a power of two) used to
    end unlock with an internal error; it is skipped, and a good key file still opens."""
    import json

    keys = Path(enc.path) / "keys"
    good = next(keys.iterdir())
    doc = json.loads(good.read_bytes())
    doc["kdf"]["n"] = 3
    (keys / "0000bad.json").write_text(json.dumps(doc))
    again = Repository.open(enc.path)
    assert again.unlock(pp(tmp_path, "correct horse")) == f"keys/{good.name}"
