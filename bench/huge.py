"""Scale scenarios of the benchmark (issue 21), each behind a flag of bench.run.

``--sparse 2T,8T``: huge sparse disks.  A running domain whose qcow2 disk of that
virtual size holds ``--sparse-data`` (default 1G) of random data in
``--sparse-extents`` (default 64) extents spread evenly over the disk.  Rows: nbdcopy
of the pull export to a sparse file (the copy limit), full backup, no-change
incremental (cold, then warm taking turns with the same on a 1 GiB disk: the ratio
says whether its cost follows the virtual size), incremental after 1 % of the data
was rewritten, restore to qcow2 and raw (time, and bytes on disk against the data)
against ``qemu-img convert``, verify and verify --data.  Peak RSS of every command.

``--many N``: N running domains of ``--many-size`` (default 1G, about half of it
data in the synthetic layout, a seed each), ``backup --jobs J`` of all of them for J
in ``--many-jobs`` (default 1,2,4) into fresh repositories, against the sum of N
single-domain runs.

``--real-data``: the main run on a disk built from real files instead of the
synthetic layout: an ext4 filesystem holding up to ``--real-fs`` (default 2G) of
this machine's /usr, random (already compressed) data, and never-written space.
``--compressors`` adds the zstd level table (negative levels too) on that data.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.run import Bench

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def _spread(size: int, data: int, extents: int) -> list[tuple[int, int]]:
    """(offset, length) of ``extents`` equal extents holding ``data`` bytes, spread
    evenly over the disk, each 1 MiB aligned."""
    length = max(MiB, data // extents // MiB * MiB)
    step = size // extents // MiB * MiB
    return [(k * step + (step - length) // 2 // MiB * MiB, length) for k in range(extents)]


def write_random(image: Path, fmt: str, extents: list[tuple[int, int]], seed: int,
                 tmp: Path) -> None:
    """Write distinct random data into each extent with qemu-io (the image not in use)."""
    rnd = random.Random(seed)
    src = tmp / "extent.bin"
    for off, length in extents:
        for pos in range(off, off + length, 64 * MiB):
            n = min(64 * MiB, off + length - pos)
            src.write_bytes(rnd.randbytes(n))
            subprocess.run(["qemu-io", "-f", fmt, "-c", f"write -q -s {src} {pos} {n}",
                            str(image)], check=True, capture_output=True)
    src.unlink(missing_ok=True)


def sparse_run(b: Bench, size_text: str) -> None:
    from bench.run import (
        BenchDomain,
        Row,
        domain_xml,
        drop_caches,
        du,
        human,
        log,
        parse_size,
        pull_export,
        run,
    )

    size = parse_size(size_text)
    data = parse_size(b.args.sparse_data)
    nextents = b.args.sparse_extents
    tag = f"sparse {size_text}"
    name = f"bkbench-sparse-{uuid.uuid4().hex[:8]}"
    image = b.work / f"{name}-vda.qcow2"
    t0 = time.monotonic()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(size)],
                   check=True)
    extents = _spread(size, data, nextents)
    write_random(image, "qcow2", extents, b.args.seed, b.work)
    b.conns.get().defineXML(domain_xml(name, image))
    d = BenchDomain(b.conns, name, image)
    b.domains.append(d)
    d.dom.create()
    (b.work / "scratch").mkdir(exist_ok=True)
    alloc = sum(n for _, n in extents)
    log(f"{tag}: domain {name}, {human(alloc)} in {nextents} extents, ready in "
        f"{time.monotonic() - t0:.1f}s")
    repo = b.work / f"repo-{size_text}"

    out = b.work / "sparse-nbdcopy.raw"
    copies: list[float] = []
    fulls: list[float] = []
    full_rss = 0
    for i in range(b.args.repeat):
        target = b.work / f"repo-{size_text}-{i}"
        with pull_export(d, b.work) as uri:
            drop_caches(b.cold)
            r = run(["nbdcopy", "--flush", uri, str(out)])
            copies.append(r.seconds)
            b.note_cpu(f"{tag} nbdcopy", r)
        out.unlink()
        b.cli(f"{tag} init", target, "init")
        f = b.cli(f"{tag} backup full", target, "backup", name, "--mode", "full")
        fulls.append(f.seconds)
        full_rss = max(full_rss, f.max_rss_kib)
        if i < b.args.repeat - 1:
            shutil.rmtree(target)
        else:
            target.rename(repo)
    copy_s, full_s = min(copies), min(fulls)
    b.add(Row(f"{tag}: nbdcopy export -> sparse file", copy_s, alloc,
              extra={"samples": [round(c, 2) for c in copies]}))
    b.add(Row(f"{tag}: full backup", full_s, alloc, "nbdcopy", copy_s, full_s / copy_s,
              "<= 1.5", full_s / copy_s <= 1.5,
              {"samples": [round(x, 2) for x in fulls], "rss_mib": round(full_rss / 1024, 1)}))
    index = next(repo.glob(f"backups/{name}/*/vda.index"))
    b.info.setdefault("sparse", {})[size_text] = {
        "virtual_size": size, "data_bytes": alloc, "extents": nextents,
        "index_bytes": index.stat().st_size}

    # The no-change incremental against the same on a small disk (1 GiB virtual, 64 MiB
    # of data), warm, taking turns: what the run costs beyond libvirt's and Python's
    # fixed share is what follows the virtual size ("holes cost nothing").
    small = _small_domain(b, name)
    small_repo = b.work / f"repo-{size_text}-small"
    b.cli(f"{tag} small init", small_repo, "init")
    b.cli(f"{tag} small backup full", small_repo, "backup", small.name)
    r = b.cli(f"{tag} backup no-change", repo, "backup", name, cold=True)
    assert r.json()["mode"] == "incremental", r.stdout
    nochange = [("cold", r)]
    warm: list[Any] = []
    small_runs: list[float] = []
    for _ in range(3):
        r = b.cli(f"{tag} backup no-change", repo, "backup", name, cold=False)
        warm.append(r)
        s = b.cli(f"{tag} small backup no-change", small_repo, "backup", small.name,
                  cold=False)
        assert s.json()["mode"] == "incremental", s.stdout
        small_runs.append(s.seconds)
    nochange.append(("warm", min(warm, key=lambda x: x.seconds)))
    for kind, r in nochange:
        b.add(Row(f"{tag}: no-change incremental ({kind} cache)",
                  r.seconds, 0, goal="<= 0.5 s, < 128 MiB",
                  ok=r.seconds <= 0.5 and r.max_rss_kib < 128 * 1024,
                  extra={"rss_mib": round(r.max_rss_kib / 1024, 1),
                         "cpu_seconds": round(r.cpu_seconds, 2),
                         "internal_seconds": r.json()["duration_seconds"]}))
    best = nochange[-1][1].seconds
    b.add(Row(f"{tag}: no-change incremental vs the same on a 1 GiB disk", best, 0,
              "no-change, 1 GiB disk", min(small_runs), best / min(small_runs),
              "<= 1.25 (flat)", best / min(small_runs) <= 1.25,
              {"samples": [round(x.seconds, 2) for x in warm],
               "small_samples": [round(x, 2) for x in small_runs]}))
    small.cleanup()
    b.domains.remove(small)
    shutil.rmtree(small_repo)

    # 1 % of the data rewritten by the guest, in 64 KiB..1 MiB writes inside the extents.
    rnd = random.Random(b.args.seed + 21)
    src = b.work / "write-source.bin"
    src.write_bytes(rnd.randbytes(MiB))
    dirty = 0
    while dirty < data // 100:
        off, length = extents[rnd.randrange(len(extents))]
        n = rnd.randrange(64 * KiB, MiB + 1, 4 * KiB)
        pos = off + rnd.randrange(0, length - n, 4 * KiB)
        d.guest_write(pos, n, src)
        dirty += n
    r = b.cli(f"{tag} backup inc 1%", repo, "backup", name)
    rj = r.json()
    b.add(Row(f"{tag}: incremental after 1 % of the data rewritten", r.seconds, dirty,
              extra={"read_bytes": rj["read_bytes"], "dirty_bytes": dirty,
                     "rss_mib": round(r.max_rss_kib / 1024, 1)}))

    for fmt in ("qcow2", "raw"):
        target = b.work / f"sparse-restore-{fmt}"
        r = b.cli(f"{tag} restore {fmt}", repo, "restore", name, "latest", "--target",
                  str(target), "--format", fmt)
        out_file = target / f"vda.{fmt}"
        _, on_disk = du(out_file)
        conv = b.work / f"sparse-convert.{fmt}"
        drop_caches(b.cold)
        t1 = time.monotonic()
        run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", fmt, str(image), str(conv)])
        conv_s = time.monotonic() - t1
        same = subprocess.run(["qemu-img", "compare", "-q", "-U", "-f", fmt, "-F", fmt,
                               str(conv), str(out_file)]).returncode == 0
        b.add(Row(f"{tag}: restore {fmt}", r.seconds, alloc, f"qemu-img convert -O {fmt}",
                  conv_s, r.seconds / conv_s, "sparse: on disk ~ data", same
                  and on_disk <= alloc * 1.1 + 16 * MiB,
                  {"on_disk_bytes": on_disk, "convert_on_disk_bytes": du(conv)[1],
                   "identical_to_convert": same, "rss_mib": round(r.max_rss_kib / 1024, 1)}))
        shutil.rmtree(target)
        conv.unlink()

    r = b.cli(f"{tag} verify", repo, "verify")
    b.add(Row(f"{tag}: verify (metadata)", r.seconds, 0,
              extra={"rss_mib": round(r.max_rss_kib / 1024, 1)}))
    r = b.cli(f"{tag} verify --data", repo, "verify", "--data")
    b.add(Row(f"{tag}: verify --data", r.seconds, json.loads(r.stdout)["bytes_read"],
              extra={"rss_mib": round(r.max_rss_kib / 1024, 1)}))
    d.cleanup()
    b.domains.remove(d)
    image.unlink()
    shutil.rmtree(repo)


def _small_domain(b: Bench, big: str) -> Any:
    """A running domain with a 1 GiB qcow2 disk holding 64 MiB of random data."""
    from bench.run import BenchDomain, domain_xml

    name = f"{big}-small"
    image = b.work / f"{name}-vda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1G"], check=True)
    write_random(image, "qcow2", _spread(GiB, 64 * MiB, 8), b.args.seed + 1, b.work)
    b.conns.get().defineXML(domain_xml(name, image))
    d = BenchDomain(b.conns, name, image)
    b.domains.append(d)
    d.dom.create()
    return d


# --- real-world data ----------------------------------------------------------------


def stage_usr(dest: Path, cap: int) -> int:
    """Hard links (or copies) of this machine's /usr files into dest, up to cap bytes."""
    total = 0
    for root, dirs, files in os.walk("/usr"):
        dirs.sort()
        for name in sorted(files):
            src = os.path.join(root, name)
            if not os.path.isfile(src) or os.path.islink(src):
                continue
            size = os.path.getsize(src)
            if total + size > cap:
                return total
            dst = dest / os.path.relpath(src, "/usr")
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                try:
                    shutil.copy2(src, dst)
                except OSError:
                    continue
            total += size
    return total


def real_image(image: Path, size: int, fs_bytes: int, seed: int, work: Path) -> dict[str, int]:
    """A qcow2 disk of ``size``: an ext4 filesystem holding up to ``fs_bytes`` of /usr at
    its start, random (already compressed) data in the middle, the rest never written."""
    stage = work / "usr-stage"
    stage.mkdir()
    files = stage_usr(stage, fs_bytes)
    raw = work / "real.raw"
    fs_size = min(size // 2, int(files * 1.25) + 256 * MiB) // MiB * MiB
    with open(raw, "wb") as f:
        f.truncate(size)
    fs = work / "fs.ext4"
    with open(fs, "wb") as f:
        f.truncate(fs_size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0", "-d", str(stage),
                    str(fs)], check=True)
    shutil.rmtree(stage)
    subprocess.run(["dd", f"if={fs}", f"of={raw}", "bs=4M", "conv=sparse,notrunc",
                    "status=none"], check=True)
    fs.unlink()
    rnd = random.Random(seed)
    rand_len = min(size // 8, 512 * MiB)
    rand_at = (size * 5 // 8) // MiB * MiB
    with open(raw, "r+b") as f:
        for pos in range(rand_at, rand_at + rand_len, 16 * MiB):
            f.seek(pos)
            f.write(rnd.randbytes(min(16 * MiB, rand_at + rand_len - pos)))
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
                    str(image)], check=True)
    raw.unlink()
    return {"real": files, "fs": fs_size, "random": rand_len, "text": 0,
            "zero": size - fs_size - rand_len}


def compressor_table(b: Bench, image: Path) -> None:
    """zstd levels (negative ones too) on the real-data disk's data, 1 MiB chunks, one
    core: ratio and speed, beside BLAKE3 hashing for scale."""
    import blake3
    import zstandard

    from bench.run import MB, log

    out = subprocess.run(["qemu-img", "map", "-f", "qcow2", "-U", "--output=json", str(image)],
                         check=True, capture_output=True).stdout
    data_ranges = [(e["start"], e["length"]) for e in json.loads(out) if e.get("data")]
    sample: list[bytes] = []
    limit = b.args.compressor_sample
    raw = b.work / "sample.raw"
    subprocess.run(["qemu-img", "convert", "-q", "-U", "-f", "qcow2", "-O", "raw", str(image),
                    str(raw)], check=True)
    with open(raw, "rb") as f:
        total = 0
        for start, length in data_ranges:
            f.seek(start)
            for pos in range(0, length, MiB):
                if total >= limit:
                    break
                chunk = f.read(min(MiB, length - pos))
                if chunk.count(0) == len(chunk):
                    continue
                sample.append(chunk)
                total += len(chunk)
    raw.unlink()
    nbytes = sum(len(c) for c in sample)
    rows: list[dict[str, Any]] = []
    t0 = time.process_time()
    for c in sample:
        blake3.blake3(c).digest()
    rows.append({"codec": "blake3 (hash, for scale)", "ratio": None,
                 "mbps": round(nbytes / MB / max(time.process_time() - t0, 1e-9))})
    for level in b.args.compressor_levels:
        cctx = zstandard.ZstdCompressor(level=level)
        t0 = time.process_time()
        out_bytes = sum(len(cctx.compress(c)) for c in sample)
        ct = time.process_time() - t0
        frames = [cctx.compress(c) for c in sample[:64]]
        dctx = zstandard.ZstdDecompressor()
        t0 = time.process_time()
        for _ in range(4):
            for fr in frames:
                dctx.decompress(fr)
        dt = (time.process_time() - t0) / 4
        dbytes = sum(len(c) for c in sample[:64])
        rows.append({"codec": f"zstd {level}", "ratio": round(nbytes / out_bytes, 3),
                     "stored_fraction": round(out_bytes / nbytes, 3),
                     "mbps": round(nbytes / MB / ct), "decompress_mbps":
                     round(dbytes / MB / max(dt, 1e-9))})
        log(f"compressor {rows[-1]}")
    b.info["compressors"] = {"sample_bytes": nbytes, "rows": rows}


def real_setup(b: Bench) -> None:
    """The main run's domain, on the real-data layout instead of the synthetic one."""
    from bench.run import BenchDomain, allocated_bytes, domain_xml, human, log, parse_size

    t0 = time.monotonic()
    name = f"bkbench-real-{uuid.uuid4().hex[:8]}"
    image = b.work / f"{name}-vda.qcow2"
    stats = real_image(image, b.size, parse_size(b.args.real_fs), b.args.seed, b.work)
    b.info["layout"] = stats
    b.info["allocated_bytes"] = allocated_bytes(image)
    b.conns.get().defineXML(domain_xml(name, image))
    d = BenchDomain(b.conns, name, image)
    b.domains.append(d)
    d.dom.create()
    (b.work / "scratch").mkdir(exist_ok=True)
    log(f"real-data domain {name}: {human(stats['real'])} of /usr files in a "
        f"{human(stats['fs'])} ext4, {human(stats['random'])} random, "
        f"{human(b.info['allocated_bytes'])} allocated, ready in "
        f"{time.monotonic() - t0:.1f}s")
    if b.args.compressors:
        compressor_table(b, image)


# --- many domains -----------------------------------------------------------------------


def many_run(b: Bench) -> None:
    """N running domains of --many-size; backup --jobs J of all of them into a fresh
    repository for each J, against the sum of N single-domain runs."""
    from bench.run import BenchDomain, Row, domain_xml, fill_image, log, parse_size, text_pool

    n = b.args.many
    size = parse_size(b.args.many_size)
    t0 = time.monotonic()
    names = []
    alloc = 0
    # One text pool for all (made once: it takes seconds); text runs start at random
    # offsets in it, so the domains share no chunk.
    pool = text_pool(random.Random(b.args.seed), 32 * MiB)
    for k in range(n):
        name = f"bkbench-many-{uuid.uuid4().hex[:6]}-{k:02d}"
        image = b.work / f"{name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(size)],
                       check=True)
        fill = b.work / "fill"
        fill.mkdir(exist_ok=True)
        stats = fill_image(image, size, b.args.seed + k, fill, pool)
        alloc += stats["text"] + stats["random"]
        b.conns.get().defineXML(domain_xml(name, image))
        d = BenchDomain(b.conns, name, image)
        b.domains.append(d)
        d.dom.create()
        names.append(name)
    (b.work / "scratch").mkdir(exist_ok=True)
    log(f"{n} domains of {size >> 20} MiB ({alloc >> 20} MiB of data in all) ready in "
        f"{time.monotonic() - t0:.1f}s")
    singles = 0.0
    single_cpu = 0.0
    for name in names:
        repo = b.work / "repo-single"
        b.cli("many init", repo, "init", cold=False)
        r = b.cli("many single", repo, "backup", name)
        singles += r.seconds
        single_cpu += r.cpu_seconds
        shutil.rmtree(repo)
    b.add(Row(f"{n} domains, one run each (sum)", singles, alloc,
              extra={"cpu_seconds": round(single_cpu, 1)}))
    for jobs in b.args.many_jobs:
        repo = b.work / f"repo-jobs-{jobs}"
        b.cli("many init", repo, "init", cold=False)
        r = b.cli(f"many jobs {jobs}", repo, "backup", "--jobs", str(jobs), *names)
        doc = r.json()
        assert len(doc["backups"]) == n and not doc["failed"], doc
        b.add(Row(f"{n} domains, backup --jobs {jobs}", r.seconds, alloc,
                  "sum of single runs", singles, r.seconds / singles,
                  extra={"cpu_seconds": round(r.cpu_seconds, 1),
                         "cpu_per_wall": round(r.cpu_seconds / r.seconds, 2),
                         "rss_mib": round(r.max_rss_kib / 1024, 1)}))
        shutil.rmtree(repo)
