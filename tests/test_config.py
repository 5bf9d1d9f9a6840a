from __future__ import annotations

from pathlib import Path

import pytest

from backupkit import config
from backupkit.errors import ConfigError


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return str(p)


def test_example_config_loads() -> None:
    """The shipped example: every value it sets is the value read (and the default)."""
    path = str(Path(__file__).parent.parent / "config" / "backupkit.toml")
    cfg = config.load(path)
    assert (cfg.repository, cfg.connect, cfg.scratch_dir) == (
        "/var/lib/backupkit/repo", "qemu:///system", "/var/lib/backupkit/scratch")
    assert (cfg.scratch_min_free, cfg.lock_wait, cfg.chunk_size) == (512 << 20, 0, 1 << 20)
    assert cfg.backup == config.DomainSettings(
        repository=None, mode="auto", exclude_disks=(), quiesce=False, workers=2,
        compression_level=1)
    assert (cfg.keep_last, cfg.keep_hourly, cfg.keep_daily, cfg.keep_weekly,
            cfg.keep_monthly, cfg.keep_yearly) == (0, 0, 7, 4, 6, 0)
    assert cfg.verify_data is False and cfg.metrics_textfile is None
    assert cfg.for_domain("example-vm") == config.DomainSettings(
        repository="/var/lib/backupkit/repo", mode="auto", exclude_disks=("vdb",),
        quiesce="try", workers=2, compression_level=1)
    # The example documents the defaults: loading it changes nothing but its own
    # domain table and the repository.
    default = config.Config(path=path, repository="/var/lib/backupkit/repo",
                            domains=cfg.domains)
    assert cfg == default


def test_domain_overrides(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, """
repository = "/r"
[backup]
quiesce = true
[domains.web]
quiesce = "try"
exclude_disks = ["vdb"]
"""))
    assert cfg.for_domain("web").quiesce == "try"
    assert cfg.for_domain("web").exclude_disks == ("vdb",)
    assert cfg.for_domain("db").quiesce is True
    assert cfg.for_domain("db").repository == "/r"


@pytest.mark.parametrize(("text", "msg"), [
    ("bogus = 1", "unknown key 'bogus'"),
    ("[backup]\nmode = 'sometimes'", "backup.mode must be one of"),
    ("[backup]\nworkers = 'two'", "backup.workers must be int, not str"),
    ("[prune]\nkeep_daily = true", "prune.keep_daily must be int, not bool"),
    ("[nope]\nx = 1", "unknown table [nope]"),
    ("chunk_size = 1000", "power of two"),
    ("repository = ", "malformed TOML"),
    ("[domains.web]\nfoo = 1", "unknown key 'domains.web.foo'"),
])
def test_errors_name_file_and_key(tmp_path: Path, text: str, msg: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert msg in str(e.value)
    assert str(e.value).startswith(path)
    assert e.value.exit_code == 2


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        config.load(str(tmp_path / "missing.toml"))


def test_missing_default_file_is_fine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("BACKUPKIT_CONFIG", raising=False)
    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path / "none.toml"))
    assert config.load().connect == "qemu:///system"


def test_host_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$BACKUPKIT_HOST, else config host, else the machine's host name (all validated)."""
    import socket

    monkeypatch.delenv(config.HOST_ENV, raising=False)
    assert config.this_host(config.Config()) == socket.gethostname()
    cfg = config.load(write(tmp_path, 'host = "hv-01.example"'))
    assert cfg.host == "hv-01.example"
    assert config.this_host(cfg) == "hv-01.example"
    monkeypatch.setenv(config.HOST_ENV, "hv-02")
    assert config.this_host(cfg) == "hv-02"
    assert config.this_host() == "hv-02"
    for bad in ("a b", "../x", ".hidden", "x/y", "-x", "h" * 201):
        monkeypatch.setenv(config.HOST_ENV, bad)
        with pytest.raises(ConfigError, match=r"^\$BACKUPKIT_HOST: host: invalid name"):
            config.this_host(cfg)
        with pytest.raises(ConfigError, match="host: invalid name") as e:
            config.load(write(tmp_path, f"host = {bad!r}"))
        assert e.value.exit_code == 2
    monkeypatch.setenv(config.HOST_ENV, "")
    with pytest.raises(ConfigError, match="set but empty"):
        config.this_host(cfg)
    monkeypatch.delenv(config.HOST_ENV)
    monkeypatch.setattr(socket, "gethostname", lambda: "bad host")
    with pytest.raises(ConfigError, match="set host in the config or"):
        config.this_host(config.Config())
    with pytest.raises(ConfigError, match="host must be str"):
        config.load(write(tmp_path, "host = 3"))
