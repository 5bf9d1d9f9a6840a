"""Human-readable rendering of result documents (the JSON form is the contract)."""

from __future__ import annotations

from typing import Any


def size(n: int | float | None) -> str:
    if n is None:
        return "-"
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 or unit == "TiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return str(n)


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    for r in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)


def render(doc: Any) -> str:
    if isinstance(doc, dict) and "backups" in doc and isinstance(doc["backups"], list) \
            and all("id" in b for b in doc["backups"]) and "failed" not in doc:
        rows = [[b.get("domain", ""), b.get("host") or "-", b["id"], b.get("created", ""),
                 b.get("mode", ""),
                 ",".join(b.get("disks", []) if isinstance(b.get("disks"), list)
                          and all(isinstance(x, str) for x in b.get("disks", [])) else []),
                 size(b.get("logical_size")), size(b.get("stored_size"))]
                for b in doc["backups"]]
        return table(rows, ["DOMAIN", "HOST", "ID", "CREATED", "MODE", "DISKS", "LOGICAL",
                            "STORED"])
    if _is_backup_summary(doc):
        return backup_summary(doc)
    return _yaml(doc)


def _is_backup_summary(doc: Any) -> bool:
    """The result of ``backup`` with several domains: {"backups": [...], "failed": [...]}."""
    return (isinstance(doc, dict) and isinstance(doc.get("backups"), list)
            and isinstance(doc.get("failed"), list)
            and all(isinstance(b, dict) and "domain" in b for b in doc["backups"])
            and all(isinstance(f, dict) and "domain" in f for f in doc["failed"]))


def backup_summary(doc: dict[str, Any]) -> str:
    """One row per domain, in the order backed up, failures last: the outcome of --all."""
    rows = []
    for b in doc["backups"]:
        dur = b.get("duration_seconds")
        rows.append([b["domain"], "ok", str(b.get("mode", "")), size(b.get("read_bytes")),
                     size(b.get("stored_bytes")),
                     f"{dur:.1f}s" if isinstance(dur, (int, float)) else "-",
                     str(b.get("reason", ""))])
    for f in doc["failed"]:
        rows.append([f["domain"], "FAILED", "-", "-", "-", "-",
                     " ".join(str(f.get("message", "")).split())])
    return table(rows, ["DOMAIN", "RESULT", "MODE", "READ", "STORED", "DURATION",
                        "REASON"])


def _yaml(doc: Any, indent: int = 0) -> str:
    pad = "  " * indent
    if isinstance(doc, dict):
        out = []
        for k, v in doc.items():
            if k in ("domain_xml", "checkpoint_xml"):
                continue
            if isinstance(v, (dict, list)) and v:
                out.append(f"{pad}{k}:")
                out.append(_yaml(v, indent + 1))
            else:
                out.append(f"{pad}{k}: {_scalar(v)}")
        return "\n".join(out)
    if isinstance(doc, list):
        out = []
        for item in doc:
            if isinstance(item, dict):
                body = _yaml(item, indent + 1).lstrip()
                out.append(f"{pad}- {body}")
            else:
                out.append(f"{pad}- {_scalar(item)}")
        return "\n".join(out)
    return f"{pad}{_scalar(doc)}"


def _scalar(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, dict)):
        return "[]" if isinstance(v, list) else "{}"
    return str(v)
