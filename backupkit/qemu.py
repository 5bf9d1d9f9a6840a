"""qemu-img: pure parsing of its JSON plus thin calls through an injectable runner.

Every call names the image's format (``-f``): probing it from the contents
lets a raw disk whose guest data starts with a qcow2 header be opened as a
qcow2, and a bitmap written into it lands in the guest's data.  The format
comes from the chain's metadata (libvirt's domain XML, the backing format a
qcow2 records for its backing file) or, for an image named on the command
line that must be a qcow2 (a merge's TOP), is qcow2 by requirement.
``chain`` refuses a layer whose backing format is not recorded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from backupkit import proc
from backupkit.errors import CommandFailed, NotFound, OperationFailed, UsageError

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
    backing_format: str | None = None  # as recorded in this image's header
    compat: str | None = None  # qcow2 "0.10" (version 2) or "1.1" (version 3)
    cluster_size: int = 65536

    @property
    def stores_bitmaps(self) -> bool:
        """Whether the image can hold persistent bitmaps (qcow2 version 3 only)."""
        return self.format == "qcow2" and self.compat != "0.10"

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
    compat = fs.get("data", {}).get("compat") if fs and fs.get("type") == "qcow2" else None
    return ImageInfo(
        filename=doc["filename"],
        format=doc["format"],
        virtual_size=int(doc["virtual-size"]),
        actual_size=int(doc.get("actual-size", 0)),
        backing_filename=doc.get("full-backing-filename") or doc.get("backing-filename"),
        bitmaps=parse_bitmaps(fs),
        corrupt=corrupt,
        backing_format=doc.get("backing-filename-format"),
        compat=compat,
        cluster_size=int(doc.get("cluster-size", 65536)),
    )


_MISSING = re.compile(r"Could not open '([^']*)': No such file or directory")


def _run(cmd: list[str], runner: proc.Runner | None) -> bytes:
    try:
        return (runner or proc.run)(cmd)
    except CommandFailed as e:
        if "No such file or directory" in e.stderr:
            # Name the file that is missing (a backing file, not the image asked for).
            found = _MISSING.findall(e.stderr)
            missing = found[-1] if found else cmd[-1]
            detail = e.stderr if missing == cmd[-1] else f"backing file of {cmd[-1]}"
            raise NotFound("image", missing, detail) from e
        if "is not in" in e.stderr and "format" in e.stderr:
            raise UsageError(f"{cmd[-1]}: {e.stderr.strip()}") from e
        raise


def info(path: str, *, fmt: str, force_share: bool = True,
         runner: proc.Runner | None = None) -> ImageInfo:
    """qemu-img info of one image (not its chain); -U by default: safe on open images."""
    cmd = [QEMU_IMG, "info", "--output=json", "-f", fmt]
    if force_share:
        cmd.append("-U")
    cmd.append(path)
    return parse_info(json.loads(_run(cmd, runner)))


def parse_chain(docs: list[dict[str, Any]]) -> list[ImageInfo]:
    """The layers of ``qemu-img info --backing-chain``; refuses a probed backing format.

    QEMU opens a backing file whose format the layer above does not record by
    probing its contents; such a chain is refused rather than trusted.
    """
    layers = [parse_info(d) for d in docs]
    for layer in layers:
        if layer.backing_filename and not layer.backing_format:
            raise UsageError(
                f"{layer.filename} records no format for its backing file "
                f"{layer.backing_filename}; refusing to guess it from the contents "
                f"(record it: qemu-img rebase -u -b {layer.backing_filename} -F FORMAT "
                f"-f {layer.format} {layer.filename})")
    return layers


def chain(path: str, *, fmt: str, force_share: bool = True,
          runner: proc.Runner | None = None) -> list[ImageInfo]:
    """The backing chain from path (the active layer, of format ``fmt``) down to the base.

    Each backing layer is opened with the format its upper layer records.
    """
    cmd = [QEMU_IMG, "info", "--output=json", "--backing-chain", "-f", fmt]
    if force_share:
        cmd.append("-U")
    cmd.append(path)
    return parse_chain(json.loads(_run(cmd, runner)))


def image_end(path: str, *, fmt: str, force_share: bool,
              runner: proc.Runner | None = None) -> int:
    """Where the qcow2's highest allocated cluster ends (qemu-img check, read-only).

    Exit codes 0-3 all carry the JSON (2 and 3: errors or leaks found).
    """
    cmd = [QEMU_IMG, "check", "--output=json", "-f", fmt]
    if force_share:
        cmd.append("-U")
    stderr = ""
    try:
        out = (runner or proc.run)([*cmd, path])
    except CommandFailed as e:
        out, stderr = e.stdout, e.stderr
    try:
        doc = json.loads(out or b"{}")
    except ValueError:
        doc = {}
    if "image-end-offset" not in doc:
        raise OperationFailed(f"{path}: cannot read the image end offset: {stderr.strip()}")
    return int(doc["image-end-offset"])


def create(path: str, fmt: str, size: int | None = None, *, backing: str | None = None,
           backing_fmt: str | None = None, options: dict[str, str] | None = None,
           runner: proc.Runner | None = None) -> None:
    cmd = [QEMU_IMG, "create", "-q", "-f", fmt]
    if backing:
        if not backing_fmt:
            raise ValueError("a backing file needs its format")
        cmd += ["-b", backing, "-F", backing_fmt]
    if options:
        cmd += ["-o", ",".join(f"{k}={v}" for k, v in options.items())]
    cmd.append(path)
    if size is not None:
        cmd.append(str(size))
    _run(cmd, runner)


def bitmap_add(path: str, name: str, *, fmt: str, granularity: int | None = None,
               disabled: bool = False, merge_from: str | None = None,
               source_file: str | None = None, source_fmt: str | None = None,
               runner: proc.Runner | None = None) -> None:
    """Add bitmap ``name``; with ``merge_from``, merge that bitmap's bits into it in the same run.

    One qemu-img run opens the image once and stores the new bitmap only when
    it closes it, after the merge: no state exists on disk in which the name
    is present but its bits are not (a kill in between stores nothing).
    ``source_file`` (with ``source_fmt``) names the image holding ``merge_from``;
    without it the source is in the same image.
    """
    cmd = [QEMU_IMG, "bitmap", "-f", fmt, "--add"]
    if granularity:
        cmd += ["-g", str(granularity)]
    if merge_from is not None:
        cmd += ["--merge", merge_from]
        if source_file:
            if not source_fmt:
                raise ValueError("a merge source file needs its format")
            cmd += ["-b", source_file, "-F", source_fmt]
    if disabled:
        cmd.append("--disable")
    _run([*cmd, path, name], runner)


def bitmap_remove(path: str, name: str, *, fmt: str, runner: proc.Runner | None = None) -> None:
    _run([QEMU_IMG, "bitmap", "-f", fmt, "--remove", path, name], runner)


def bitmap_merge(path: str, target: str, source: str, *, fmt: str,
                 source_file: str | None = None, source_fmt: str | None = None,
                 runner: proc.Runner | None = None) -> None:
    cmd = [QEMU_IMG, "bitmap", "-f", fmt, "--merge", source]
    if source_file:
        if not source_fmt:
            raise ValueError("a merge source file needs its format")
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
