"""qemu-img: pure parsing of its JSON plus thin calls through an injectable runner."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from backupkit import proc
from backupkit.errors import CommandFailed, NotFound

QEMU_IMG = "qemu-img"


@dataclass(frozen=True)
class Bitmap:
    name: str
    granularity: int
    recording: bool  # flag "auto": enabled, tracks writes
    in_use: bool  # flag "in-use": not stored cleanly (inconsistent after a crash)

    @property
    def valid(self) -> bool:
        return not self.in_use


@dataclass(frozen=True)
class ImageInfo:
    filename: str
    format: str
    virtual_size: int
    actual_size: int
    backing_filename: str | None = None
    bitmaps: tuple[Bitmap, ...] = field(default_factory=tuple)
    corrupt: bool = False

    def bitmap(self, name: str) -> Bitmap | None:
        for b in self.bitmaps:
            if b.name == name:
                return b
        return None


def parse_bitmaps(format_specific: dict[str, Any] | None) -> tuple[Bitmap, ...]:
    if not format_specific or format_specific.get("type") != "qcow2":
        return ()
    data = format_specific.get("data", {})
    result = []
    for b in data.get("bitmaps", []):
        flags = b.get("flags", [])
        result.append(
            Bitmap(
                name=b["name"],
                granularity=int(b["granularity"]),
                recording="auto" in flags,
                in_use="in-use" in flags,
            )
        )
    return tuple(result)


def parse_info(doc: dict[str, Any]) -> ImageInfo:
    fs = doc.get("format-specific")
    corrupt = bool(fs and fs.get("data", {}).get("corrupt", False))
    return ImageInfo(
        filename=doc["filename"],
        format=doc["format"],
        virtual_size=int(doc["virtual-size"]),
        actual_size=int(doc.get("actual-size", 0)),
        backing_filename=doc.get("full-backing-filename") or doc.get("backing-filename"),
        bitmaps=parse_bitmaps(fs),
        corrupt=corrupt,
    )


def _run(cmd: list[str], runner: proc.Runner | None) -> bytes:
    try:
        return (runner or proc.run)(cmd)
    except CommandFailed as e:
        if "No such file or directory" in e.stderr:
            raise NotFound("image", cmd[-1], e.stderr) from e
        raise


def info(path: str, *, force_share: bool = True, runner: proc.Runner | None = None) -> ImageInfo:
    """qemu-img info of one image (not its chain); -U by default: safe on open images."""
    cmd = [QEMU_IMG, "info", "--output=json"]
    if force_share:
        cmd.append("-U")
    cmd.append(path)
    return parse_info(json.loads(_run(cmd, runner)))


def chain(path: str, *, force_share: bool = True, runner: proc.Runner | None = None
          ) -> list[ImageInfo]:
    """The backing chain from path (the active layer) down to the base."""
    cmd = [QEMU_IMG, "info", "--output=json", "--backing-chain"]
    if force_share:
        cmd.append("-U")
    cmd.append(path)
    docs = json.loads(_run(cmd, runner))
    return [parse_info(d) for d in docs]


def create(path: str, fmt: str, size: int | None = None, *, backing: str | None = None,
           backing_fmt: str | None = None, options: dict[str, str] | None = None,
           runner: proc.Runner | None = None) -> None:
    cmd = [QEMU_IMG, "create", "-q", "-f", fmt]
    if backing:
        cmd += ["-b", backing, "-F", backing_fmt or "qcow2"]
    if options:
        cmd += ["-o", ",".join(f"{k}={v}" for k, v in options.items())]
    cmd.append(path)
    if size is not None:
        cmd.append(str(size))
    _run(cmd, runner)


def bitmap_add(path: str, name: str, *, granularity: int | None = None, disabled: bool = False,
               runner: proc.Runner | None = None) -> None:
    cmd = [QEMU_IMG, "bitmap", "--add"]
    if granularity:
        cmd += ["-g", str(granularity)]
    if disabled:
        cmd.append("--disable")
    _run([*cmd, path, name], runner)


def bitmap_remove(path: str, name: str, *, runner: proc.Runner | None = None) -> None:
    _run([QEMU_IMG, "bitmap", "--remove", path, name], runner)


def bitmap_merge(path: str, target: str, source: str, *, source_file: str | None = None,
                 source_fmt: str = "qcow2", runner: proc.Runner | None = None) -> None:
    cmd = [QEMU_IMG, "bitmap", "--merge", source]
    if source_file:
        cmd += ["-b", source_file, "-F", source_fmt]
    _run([*cmd, path, target], runner)


def check(path: str, fmt: str = "qcow2", *, runner: proc.Runner | None = None) -> None:
    """qemu-img check: the image's metadata only (refcounts, L1/L2 tables), not its data.

    CommandFailed naming the image when it finds corruption (exit 2) or leaked
    clusters (exit 3), or cannot read the image (exit 1).
    """
    try:
        _run([QEMU_IMG, "check", "-f", fmt, path], runner)
    except CommandFailed as e:
        what = {2: "corruption", 3: "leaked clusters"}.get(e.rc, "an error")
        first = e.stderr.strip().splitlines()[0] if e.stderr.strip() else ""
        raise CommandFailed(f"qemu-img check {path}", e.rc,
                            f"found {what}{': ' + first if first else ''}") from e
