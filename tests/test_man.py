"""Man pages: every option, key, exit code, variable and metric documented; clean rendering."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from backupkit import cli, config, errors, metrics
from tests.conftest import need_tool

ROOT = Path(__file__).resolve().parent.parent
MAN8 = ROOT / "man" / "backupkit.8"
MAN5 = ROOT / "man" / "backupkit.toml.5"
EXAMPLE = ROOT / "config" / "backupkit.toml"


def _plain(roff: str) -> str:
    """roff source as plain words: escapes for '-', fonts, quotes removed."""
    text = roff.replace("\\-", "-").replace("\\(dq", '"').replace("\\(aq", "'")
    text = re.sub(r"\\f[BIRP]", "", text)
    return text.replace("\\&", "").replace("\\c", "").replace("\\e", "\\")


def _sections(path: Path, macro: str) -> dict[str, str]:
    """Title -> plain text of each .SH or .SS section (up to the next one of its kind)."""
    out: dict[str, str] = {}
    title = ""
    stops = {".SH"} if macro == ".SH" else {".SH", ".SS"}
    for line in path.read_text().splitlines():
        head = line.split(" ", 1)
        if head[0] in stops:
            title = _plain(head[1].strip().strip('"')) if len(head) > 1 else ""
            if head[0] == macro:
                out[title] = ""
            else:
                title = ""
            continue
        if title:
            out[title] += _plain(line) + "\n"
    return out


def _mentions(text: str, word: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def _parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """(command path, parser) for the top level and every subcommand, nested."""
    out: list[tuple[str, argparse.ArgumentParser]] = []

    def walk(p: argparse.ArgumentParser, path: str) -> None:
        out.append((path, p))
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sp in a.choices.items():
                    walk(sp, f"{path} {name}".strip())

    walk(cli.build_parser(), "")
    return out


def _leaf_parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    return [(path, p) for path, p in _parsers()
            if not any(isinstance(a, argparse._SubParsersAction) for a in p._actions)]


def test_every_command_has_a_section() -> None:
    commands = _sections(MAN8, ".SS")
    for path, _ in _leaf_parsers():
        assert path in commands, f"backupkit.8 has no .SS \"{path}\" section"


@pytest.mark.parametrize("path", [path for path, _ in _parsers()] or [""])
def test_every_option_is_documented(path: str) -> None:
    """Every option string argparse knows appears in backupkit.8: global options under
    GLOBAL OPTIONS, each command's options, positionals and choices in its section."""
    parser = dict(_parsers())[path]
    whole = _plain(MAN8.read_text())
    section = (_sections(MAN8, ".SH")["GLOBAL OPTIONS"] if not path
               else _sections(MAN8, ".SS").get(path, ""))
    has_sub = any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)
    missing = []
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            continue
        for opt in a.option_strings:
            assert _mentions(whole, opt), f"{opt} ({path or 'global'}) not in backupkit.8"
            if opt in ("-h", "--help") and path:
                continue  # documented once, under GLOBAL OPTIONS
            if has_sub and path:
                continue
            if not _mentions(section, opt):
                missing.append(opt)
        if (not a.option_strings and a.metavar and not has_sub
                and not _mentions(section, str(a.metavar))):
            missing.append(str(a.metavar))
        for choice in a.choices or ():
            if not _mentions(section, str(choice)):
                missing.append(f"{'/'.join(a.option_strings)} {choice}")
    assert not missing, f"backupkit.8 section {path or 'GLOBAL OPTIONS'!r} lacks {missing}"


def test_exit_codes_environment_files_examples() -> None:
    sh = _sections(MAN8, ".SH")
    codes = {v for k, v in vars(errors).items() if k.startswith("EXIT_")}
    assert codes == set(range(8))
    for code in codes:
        assert re.search(rf"^\.B {code}$", MAN8.read_text(), re.M), code
        assert _mentions(sh["EXIT STATUS"], str(code))
    for var in ("BACKUPKIT_CONFIG", "BACKUPKIT_REPO", "JOURNAL_STREAM"):
        assert _mentions(sh["ENVIRONMENT"], var), var
    for f in ("/etc/backupkit/backupkit.toml", "/var/lib/backupkit/scratch"):
        assert f in sh["FILES"]
    examples = _sections(MAN8, ".SS")
    for title in ("Nightly backups from a timer", "Restore under pressure",
                  "Platform merge hook"):
        assert title in examples
    assert "systemctl enable" in examples["Nightly backups from a timer"]
    assert "backupkit restore" in examples["Restore under pressure"]
    hook = examples["Platform merge hook"]
    assert "--json hygiene pre-merge" in hook and "--json hygiene post-merge" in hook
    assert "Exit codes" in hook


def test_metrics_progress_and_units_documented() -> None:
    sh = _sections(MAN8, ".SH")
    for name in metrics.METRICS:
        assert _mentions(sh["METRICS"], name), name
    assert "tqdm" in sh["PROGRESS"] and "--json" in sh["PROGRESS"]
    for unit in sorted((ROOT / "systemd").iterdir()):
        assert unit.name in sh["SYSTEMD"], unit.name


def _key_entries() -> dict[tuple[str, str], str]:
    """(section, key) -> text of each `.TP` / `.B key` entry of backupkit.toml.5."""
    entries: dict[tuple[str, str], str] = {}
    section = key = ""
    lines = MAN5.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith(".SH "):
            section, key = line[4:].strip('"'), ""
        elif line == ".TP" and i + 1 < len(lines) and lines[i + 1].startswith(".B "):
            key = lines[i + 1][3:].strip()
            entries[(section, key)] = ""
        elif key and section:
            entries[(section, key)] += _plain(re.sub(r"^\.[A-Z]+ ?", "", line)) + "\n"
    return entries


@pytest.mark.parametrize("dotted", config.all_keys())
def test_every_config_key_in_toml5(dotted: str) -> None:
    *table, key = dotted.split(".")
    section = f"[{'.'.join(table)}]" if table else "TOP-LEVEL KEYS"
    entries = _key_entries()
    assert (section, key) in entries, f"backupkit.toml.5: no {key} under {section}"
    text = entries[(section, key)]
    for field in ("Type:", "Default:", "Example:"):
        assert field in text, f"backupkit.toml.5 {dotted}: no {field}"
    example = text.split("Example:", 1)[1]
    assert re.search(rf"^{re.escape(key)} = ", example.strip()), f"{dotted}: bad example"


def test_toml5_has_no_unknown_keys() -> None:
    known = set()
    for dotted in config.all_keys():
        *table, key = dotted.split(".")
        known.add((f"[{'.'.join(table)}]" if table else "TOP-LEVEL KEYS", key))
    assert set(_key_entries()) <= known


def test_toml5_examples_are_valid() -> None:
    """Each key's example line is valid TOML of the right type for that key."""
    for (section, _key), text in _key_entries().items():
        line = text.split("Example:", 1)[1].strip().splitlines()[0]
        table = section.strip("[]").replace("NAME", "vm1") if section.startswith("[") else ""
        doc = tomllib.loads(f"[{table}]\n{line}\n" if table else line + "\n")
        config.parse(doc, "example")


def _example_keys() -> set[str]:
    """Dotted keys set or shown commented out (`# key = value`) in config/backupkit.toml."""
    keys: set[str] = set()
    table = ""
    for line in EXAMPLE.read_text().splitlines():
        if m := re.match(r"^\[([^\]]+)\]", line):
            table = re.sub(r"^domains\.[^.]+$", "domains.NAME", m[1])
        elif m := re.match(r"^#?\s?([a-z_]+) = ", line):
            keys.add(f"{table}.{m[1]}" if table else m[1])
    return keys


def test_example_config_documents_every_key() -> None:
    missing = set(config.all_keys()) - _example_keys()
    assert not missing, f"config/backupkit.toml lacks {sorted(missing)}"
    assert _example_keys() <= set(config.all_keys())


def test_example_config_loads_also_with_comments_enabled(tmp_path: Path) -> None:
    config.load(str(EXAMPLE))
    enabled = re.sub(r"^# ?([a-z_]+ = )", r"\1", EXAMPLE.read_text(), flags=re.M)
    f = tmp_path / "all.toml"
    f.write_text(enabled)
    cfg = config.load(str(f))
    assert cfg.metrics_textfile


def _clean_env() -> dict[str, str]:
    return {**os.environ, "LC_ALL": "C.UTF-8", "MANWIDTH": "80", "MAN_KEEP_FORMATTING": ""}


@pytest.mark.parametrize("page", [MAN8, MAN5], ids=lambda p: p.name)
def test_renders_without_warnings(page: Path) -> None:
    need_tool("groff", "groff-base")
    cp = subprocess.run(["groff", "-ww", "-man", "-Tutf8", "-P-cbou", str(page)],
                        capture_output=True, text=True, env=_clean_env(), timeout=30, check=False)
    assert cp.returncode == 0 and cp.stderr == "", cp.stderr
    assert "NAME" in cp.stdout
    if shutil.which("man"):
        cp = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True,
                            text=True, env=_clean_env(), timeout=30, check=False)
        assert cp.returncode == 0 and cp.stderr == "", cp.stderr
