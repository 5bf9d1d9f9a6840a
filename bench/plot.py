"""Curves of the chunk-count scaling (``--scale``) as an SVG image, for bench/RESULTS.md.

    python -m bench.plot bench-scale-*.json [-o bench/scale.svg]

Two panels, both axes logarithmic: CPU seconds (user + system of each command, which
the load of other work on the machine disturbs far less than wall time) and peak RSS,
against the number of chunks in the repository, one line per command and store.  A
straight line of slope 1 is linear growth; a flat line costs nothing per chunk.

Written by hand (about a hundred lines of SVG) rather than with matplotlib: the curves
are a few polylines, and the bench needs no plotting stack installed.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

W, H = 460, 340          # one panel
LEFT, RIGHT, TOP, BOTTOM = 62, 12, 30, 44
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf",
           "#7f7f7f"]
Series = dict[str, list[tuple[float, float]]]


def series(scale: list[dict[str, Any]], field: str) -> Series:
    """{"<step> (<store>)": [(chunks, value), ...]} from the JSON's ``scale`` list."""
    out: Series = {}
    for point in scale:
        for row in point["rows"]:
            v = row.get(field)
            if row.get("rc") or v is None or v <= 0:
                continue
            out.setdefault(f"{row['step']} ({point['store']})", []).append(
                (float(point["n"]), float(v)))
    return {k: sorted(v) for k, v in out.items()}


def _ticks(lo: float, hi: float) -> list[float]:
    """Powers of ten covering [lo, hi], with 2 and 5 between when there are few."""
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    for steps in ((1,), (1, 2, 5), (1, 2, 3, 4, 5, 6, 7, 8, 9)):
        out = [m * 10 ** e for e in range(a, b + 1) for m in steps if lo <= m * 10 ** e <= hi]
        if len(out) >= 4:
            break
    return out


def _label(v: float) -> str:
    for div, suffix in ((1e6, "M"), (1e3, "k")):
        if v >= div:
            return f"{v / div:g}{suffix}"
    return f"{v:g}"


def panel(title: str, ylabel: str, data: Series, x0: float) -> str:
    """One log-log chart as an SVG group, placed at x offset x0."""
    xs = [x for pts in data.values() for x, _ in pts]
    ys = [y for pts in data.values() for _, y in pts]
    xlo, xhi = min(xs) / 1.2, max(xs) * 1.2
    ylo, yhi = min(ys) / 1.5, max(ys) * 1.5
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def px(x: float) -> float:
        return x0 + LEFT + pw * (math.log(x / xlo) / math.log(xhi / xlo))

    def py(y: float) -> float:
        return TOP + ph * (1 - math.log(y / ylo) / math.log(yhi / ylo))

    out = [f'<text x="{x0 + W / 2}" y="18" text-anchor="middle" font-weight="bold">'
           f"{title}</text>",
           f'<rect x="{x0 + LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" '
           'stroke="#444"/>']
    for t in sorted(set(xs)):  # the measured sizes
        out.append(f'<line x1="{px(t):.1f}" y1="{TOP}" x2="{px(t):.1f}" y2="{TOP + ph}" '
                   'stroke="#ddd"/>')
        out.append(f'<text x="{px(t):.1f}" y="{TOP + ph + 16}" text-anchor="middle">'
                   f"{_label(t)}</text>")
    for t in _ticks(ylo, yhi):
        out.append(f'<line x1="{x0 + LEFT}" y1="{py(t):.1f}" x2="{x0 + LEFT + pw}" '
                   f'y2="{py(t):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{x0 + LEFT - 6}" y="{py(t) + 4:.1f}" text-anchor="end">'
                   f"{_label(t)}</text>")
    out.append(f'<text x="{x0 + LEFT + pw / 2}" y="{H - 8}" text-anchor="middle">'
               "chunks in the repository</text>")
    out.append(f'<text transform="translate({x0 + 14},{TOP + ph / 2}) rotate(-90)" '
               f'text-anchor="middle">{ylabel}</text>')
    for k, (name, pts) in enumerate(sorted(data.items())):
        colour = COLOURS[k % len(COLOURS)]
        dash = ' stroke-dasharray="5,3"' if "(s3)" in name else ""
        line = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{line}" fill="none" stroke="{colour}" '
                   f'stroke-width="2"{dash}/>')
        out.extend(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}"/>'
                   for x, y in pts)
    return "\n".join(out)


def legend(names: list[str], y0: float) -> str:
    out = []
    for k, name in enumerate(names):
        x, y = 20 + (k % 3) * 300, y0 + (k // 3) * 18
        colour = COLOURS[k % len(COLOURS)]
        dash = ' stroke-dasharray="5,3"' if "(s3)" in name else ""
        out.append(f'<line x1="{x}" y1="{y - 4}" x2="{x + 24}" y2="{y - 4}" '
                   f'stroke="{colour}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{x + 30}" y="{y}">{name}</text>')
    return "\n".join(out)


def scale_svg(scale: list[dict[str, Any]]) -> str:
    """The two panels (CPU seconds, peak RSS) and a shared legend."""
    cpu, rss = series(scale, "cpu_seconds"), series(scale, "rss_mib")
    names = sorted(set(cpu) | set(rss))
    # The same colour for a command in both panels: both sort the same names.
    cpu = {n: cpu.get(n, []) for n in names if cpu.get(n)}
    rss = {n: rss.get(n, []) for n in names if rss.get(n)}
    height = H + 12 + 18 * ((len(names) + 2) // 3)
    body = [panel("CPU seconds per command", "CPU seconds (user + system)", cpu, 0),
            panel("Peak memory per command", "peak RSS, MiB", rss, W),
            legend(names, H + 14)]
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * W}" height="{height}" '
            f'font-family="sans-serif" font-size="12">\n'
            f'<rect width="100%" height="100%" fill="white"/>\n' + "\n".join(body)
            + "\n</svg>\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", type=Path, help="bench-scale-*.json files")
    ap.add_argument("-o", "--output", type=Path, default=Path("scale.svg"))
    args = ap.parse_args(argv)
    scale: list[dict[str, Any]] = []
    for path in args.json:
        scale.extend(json.loads(path.read_text()).get("scale", []))
    if not scale:
        ap.error("no --scale results in those files")
    args.output.write_text(scale_svg(scale))
    print(args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
