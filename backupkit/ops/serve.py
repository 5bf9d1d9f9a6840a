"""serve: one backup's disks as a read-only NBD export, straight from the repository.

The NBD server is nbdkit (a maintained server: multi-conn, parallel requests,
Unix sockets); backupkit/nbdkit_plugin.py is its Python plugin and reads the
backup through DiskReader below.  Any backup is served on its own from its
index (no chain replay): a request reads only the slots it touches, each put
together by Repository.read_slot (its chunk, then its pieces), every chunk
hash-checked.  Put-together slots are kept in a bounded LRU cache.  A slot that
cannot be read (damaged or missing chunk, store error) fails that request with
EIO and the reason is logged; wrong data is never returned.

Export names: "" (the default) is the disk chosen with --disk (else the
backup's first disk); every disk of the backup is also exported under its own
name, so one server can back all disks of a live restore.

nbdkit runs the plugin in Debian's /usr/bin/python3; the project's venv is made
from that interpreter, so this process's sys.path is handed to the plugin
(``pythonpath=``) and it imports backupkit and its dependencies from there.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import backupkit
from backupkit.errors import NotFound, OperationFailed, UsageError
from backupkit.repo import Index, Manifest, Repository
from backupkit.repo.names import check_name

log = logging.getLogger("backupkit.serve")

#: Sockets, state and (for live restores and drills) overlays of running servers.  Not
#: /run/backupkit (host-wide locks): the units reset that one to 0700 at every start,
#: while QEMU's user must pass through this one (0711) to reach the sockets.
RUN_DIR = "/run/backupkit-exports"
#: Put-together slots kept in memory per disk (bytes), see DiskReader.
DEFAULT_CACHE_BYTES = 64 << 20
#: Slots read ahead in the background once a reader goes sequentially.
READ_AHEAD = 2
#: How long --background waits for the socket to answer.
READY_TIMEOUT = 30.0
PLUGIN = os.path.join(os.path.dirname(backupkit.__file__), "nbdkit_plugin.py")
NBD_MAGIC = b"NBDMAGIC"


class DiskReader:
    """Reads of one disk of one backup, from its index, through a bounded slot cache.

    Thread safe: several threads may read at once (the repository's chunk reads
    and hash checks release the GIL).  Holes read as zeros without touching the
    store.
    """

    def __init__(self, repo: Repository, index: Index,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.repo = repo
        self.index = index
        self.size = index.virtual_size
        self.chunk_size = index.chunk_size
        self._max_slots = max(2, cache_bytes // self.chunk_size)
        self._cache: collections.OrderedDict[int, bytearray] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._tls = threading.local()
        self._zeros = bytes(self.chunk_size)
        self._ahead: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._queued: set[int] = set()
        self._prefetcher: threading.Thread | None = None
        self._last = -2

    def _prefetch_loop(self) -> None:
        while True:
            i = self._ahead.get()
            try:
                self.slot(i)
            except Exception:  # the request that needs the slot reports the error
                pass
            finally:
                with self._lock:
                    self._queued.discard(i)

    def _read_ahead(self, i: int) -> None:
        """After slot i, have the next READ_AHEAD slots put together in the background
        (a sequential reader, such as a block pull, then finds them in the cache)."""
        with self._lock:
            if self._prefetcher is None:
                self._prefetcher = threading.Thread(target=self._prefetch_loop,
                                                    name="serve-readahead", daemon=True)
                self._prefetcher.start()
            for j in range(i + 1, min(i + 1 + READ_AHEAD, len(self.index))):
                if j not in self._cache and j not in self._queued:
                    self._queued.add(j)
                    self._ahead.put(j)

    def _scratch(self) -> bytearray:
        # A plain buffer (buffered reads, as restore does): chunk_buffer() may read with
        # O_DIRECT, which measured 3x slower here.
        buf: bytearray | None = getattr(self._tls, "buf", None)
        if buf is None:
            buf = self._tls.buf = bytearray(self.repo.chunk_max)
        return buf

    def slot(self, i: int) -> bytearray | None:
        """Slot i (never modified once returned), or None for a hole (no chunk, no pieces)."""
        digest = self.index[i]
        pieces = self.index.pieces(i)
        if digest is None and not pieces:
            return None
        with self._lock:
            data = self._cache.get(i)
            if data is not None:
                self._cache.move_to_end(i)
                return data
        data = bytearray(self.index.slot_length(i))
        self.repo.read_slot(digest, pieces, memoryview(data), self._scratch())
        with self._lock:
            self._cache[i] = data
            self._cache.move_to_end(i)
            while len(self._cache) > self._max_slots:
                self._cache.popitem(last=False)
        return data

    def read_into(self, buf: memoryview, offset: int) -> None:
        """Fill buf with the disk's bytes from offset (the range must lie inside the disk)."""
        n = len(buf)
        if offset < 0 or offset + n > self.size:
            raise ValueError(f"read of {n} bytes at {offset} outside a disk of {self.size}")
        cs = self.chunk_size
        pos = 0
        while pos < n:
            off = offset + pos
            i, inner = divmod(off, cs)
            take = min(n - pos, self.index.slot_length(i) - inner)
            if i != self._last and i == self._last + 1:
                self._read_ahead(i)
            self._last = i
            data = self.slot(i)
            if data is None:
                buf[pos:pos + take] = self._zeros[:take]
            else:
                buf[pos:pos + take] = data[inner:inner + take]
            pos += take

    def read(self, offset: int, n: int) -> bytes:
        out = bytearray(n)
        self.read_into(memoryview(out), offset)
        return bytes(out)

    def extents(self, offset: int, count: int) -> list[tuple[int, int, bool]]:
        """(offset, length, is_hole) runs covering [offset, offset+count), clipped to the disk."""
        cs = self.chunk_size
        end = min(self.size, offset + count)
        runs: list[tuple[int, int, bool]] = []
        pos = offset
        while pos < end:
            i = pos // cs
            slot_end = min(end, i * cs + self.index.slot_length(i))
            hole = self.index[i] is None and not self.index.pieces(i)
            if runs and runs[-1][2] == hole:
                start, _n, _h = runs[-1]
                runs[-1] = (start, slot_end - start, hole)
            else:
                runs.append((pos, slot_end - pos, hole))
            pos = slot_end
        return runs


def choose_disk(manifest: Manifest, disk: str | None) -> str:
    """The disk to export as the default export: --disk, else the backup's first disk."""
    if disk is not None:
        check_name("disk name", disk)
        if manifest.disk(disk) is None:
            have = ", ".join(d.name for d in manifest.disks) or "none"
            raise NotFound("disk", f"{manifest.domain}/{manifest.id}/{disk}",
                           f"the backup has: {have}")
        return disk
    if not manifest.disks:
        raise NotFound("disk", f"{manifest.domain}/{manifest.id}", "the backup has no disks")
    return manifest.disks[0].name


def nbd_url(socket_path: str, export: str = "") -> str:
    """The NBD URI of an export on a Unix socket (qemu-img, QEMU, nbdinfo)."""
    return f"nbd+unix:///{export}?socket={socket_path}"


def answers(socket_path: str, timeout: float = 1.0) -> bool:
    """Whether an NBD server answers on the socket (its greeting starts with NBDMAGIC)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(socket_path)
            got = b""
            while len(got) < len(NBD_MAGIC):
                more = s.recv(len(NBD_MAGIC) - len(got))
                if not more:
                    return False
                got += more
            return got == NBD_MAGIC
    except OSError:
        return False


def _pythonpath() -> str:
    """This interpreter's import path, for the plugin (backupkit and the venv's packages)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(backupkit.__file__)))
    paths = [here, *(p for p in sys.path if p and os.path.isdir(p))]
    return os.pathsep.join(dict.fromkeys(paths))


def nbdkit_command(repo_location: str, config_path: str | None, manifest: Manifest,
                   disk: str, socket_path: str, *, cache_bytes: int = DEFAULT_CACHE_BYTES,
                   threads: int = 8, log_path: str | None = None,
                   passphrase_file: str | None = None) -> list[str]:
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        raise NotFound("program", "nbdkit", "install nbdkit and nbdkit-plugin-python")
    cmd = [
        nbdkit, "--foreground", "--readonly", "--exit-with-parent", "--log=stderr",
        "--threads", str(threads), "--unix", socket_path,
        "python", PLUGIN,
        f"pythonpath={_pythonpath()}",
        f"pyversion={sys.version_info[0]}.{sys.version_info[1]}",
        f"repo={repo_location}",
        f"config={os.path.abspath(config_path) if config_path else ''}",
        f"domain={manifest.domain}",
        f"backup={manifest.id}",
        f"disk={disk}",
        f"cache={cache_bytes}",
    ]
    if log_path:
        cmd.append(f"log={log_path}")
    if passphrase_file:  # an encrypted repository's --passphrase-file (the path, not the secret)
        cmd.append(f"passphrase_file={os.path.abspath(passphrase_file)}")
    return cmd


class Server:
    """A running nbdkit serving one backup; stop() (or the context's end) ends it.

    proc is set when nbdkit is this process's child (foreground, dies with us);
    a detached server is nbdkit's own daemon, known by its pid only.
    """

    def __init__(self, pid: int, socket_path: str, log_path: str | None,
                 proc: subprocess.Popen[bytes] | None = None) -> None:
        self.proc = proc
        self.pid = pid
        self.socket = socket_path
        self.log_path = log_path

    def stop(self, timeout: float = 10.0) -> None:
        stop_pid(self.pid, timeout, self.proc)
        remove_socket(self.socket)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_pid(pid: int, timeout: float = 10.0,
             proc: subprocess.Popen[bytes] | None = None) -> None:
    """Terminate a server by pid (SIGTERM, then SIGKILL) and wait for it to go."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            if proc.poll() is not None:
                return
        elif not alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if proc is not None:
        proc.wait()


def remove_socket(path: str) -> None:
    """Remove a server's socket once it stopped (nbdkit leaves it behind)."""
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)


def alive(pid: int) -> bool:
    """Whether a process of that pid exists and is not a zombie (a zombie child is reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state == "Z":
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return True


def _read_pid(path: str) -> int:
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return 0
    return int(text) if text.strip().isdigit() and text.endswith("\n") else 0


def _private_umask() -> None:
    """In the child: nbdkit's socket is created 0700, nobody else connects before chmod."""
    os.umask(0o077)


def _tail(path: str | None, n: int = 20) -> str:
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            lines = f.read()[-8192:].decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def start(repo: Repository, repo_location: str, config_path: str | None, domain: str,
          backup: str, socket_path: str, *, disk: str | None = None,
          log_path: str | None = None, detach: bool = False,
          cache_bytes: int = DEFAULT_CACHE_BYTES, socket_mode: int = 0o600,
          socket_owner: tuple[int, int] | None = None, passphrase_file: str | None = None,
          timeout: float = READY_TIMEOUT) -> tuple[Server, dict[str, Any]]:
    """Start nbdkit serving backup (id or "latest") of domain; return once the socket answers.

    Everything is checked here first (manifest, disk, every index), so that a bad
    request fails with backupkit's exit codes, not an nbdkit message.  With detach
    the server is in its own session (it survives this process), its log goes to
    log_path; otherwise it dies with this process.
    """
    check_name("domain name", domain)
    manifest = repo.get_manifest(domain, backup)
    name = choose_disk(manifest, disk)
    for rec in manifest.disks:
        repo.load_index(manifest, rec.name)  # damage in an index fails here, exit 5
    socket_path = os.path.abspath(socket_path)
    if os.path.lexists(socket_path):
        if answers(socket_path):
            raise UsageError(f"{socket_path}: a server already answers on this socket")
        if not os.path.isdir(socket_path):
            os.unlink(socket_path)  # a stale socket of a server that died
    parent = os.path.dirname(socket_path)
    if not os.path.isdir(parent):
        raise NotFound("directory", parent, "the socket's directory must exist")
    pidfile = os.path.join(parent, f".{os.path.basename(socket_path)}.{os.getpid()}.pid")
    if "://" not in repo_location:
        repo_location = os.path.abspath(repo_location)  # nbdkit's daemon runs in /
    cmd = nbdkit_command(repo_location, config_path, manifest, name, socket_path,
                         cache_bytes=cache_bytes, log_path=log_path,
                         passphrase_file=passphrase_file)
    cmd[1:1] = ["--pidfile", pidfile]
    if detach:
        # nbdkit's own daemon mode: in --foreground it dies with its parent (it sets
        # PR_SET_PDEATHSIG), so a server that must outlive us has to fork itself.
        cmd.remove("--foreground")
        cmd.remove("--exit-with-parent")
    logf = open(log_path, "ab") if log_path else None  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=logf if logf is not None else None, start_new_session=detach,
            preexec_fn=_private_umask,
        )
    finally:
        if logf is not None:
            logf.close()
    # nbdkit writes its pid file once it accepts connections (no probe connection,
    # which nbdkit would log as an error).
    deadline = time.monotonic() + timeout
    pid = 0
    try:
        while not pid:
            pid = _read_pid(pidfile)
            if pid:
                break
            rc = proc.poll()
            if rc is not None and (rc != 0 or not detach):
                raise OperationFailed(f"nbdkit exited with status {rc} before serving "
                                      f"{domain}/{manifest.id}: "
                                      f"{_tail(log_path) or 'see its messages above'}")
            if time.monotonic() > deadline:
                stop_pid(proc.pid, proc=proc)
                raise OperationFailed(
                    f"nbdkit did not answer on {socket_path} within {timeout:.0f}s"
                    f"{': ' + _tail(log_path) if log_path else ''}")
            time.sleep(0.02)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pidfile)
    if detach:
        proc.wait()  # the parent nbdkit exits once its daemon runs
    server = Server(pid, socket_path, log_path, None if detach else proc)
    try:
        if socket_owner is not None:
            os.chown(socket_path, *socket_owner)
        os.chmod(socket_path, socket_mode)
    except OSError as e:
        server.stop()
        raise OperationFailed(f"cannot set the owner/mode of {socket_path}: {e}") from e
    served = manifest.disk(name)
    assert served is not None
    result: dict[str, Any] = {
        "domain": manifest.domain,
        "id": manifest.id,
        "disk": name,
        "disks": [d.name for d in manifest.disks],
        "virtual_size": served.virtual_size,
        "socket": socket_path,
        "url": nbd_url(socket_path),
        "pid": pid,
        "log": log_path,
    }
    log.info("Serving %s/%s disk %s on %s (pid %d)", manifest.domain, manifest.id, name,
             socket_path, pid)
    return server, result


def serve(repo: Repository, repo_location: str, config_path: str | None, domain: str,
          backup: str, socket_path: str, *, disk: str | None = None, background: bool = False,
          cache_bytes: int = DEFAULT_CACHE_BYTES, passphrase_file: str | None = None,
          on_ready: Callable[[dict[str, Any]], object] | None = None) -> dict[str, Any]:
    """The serve command: in the background return once the socket answers; in the
    foreground serve until interrupted (SIGINT, SIGTERM, SIGHUP: exit 0), then stop the
    server."""
    log_path = os.path.abspath(socket_path) + ".log" if background else None
    server, result = start(repo, repo_location, config_path, domain, backup, socket_path,
                           disk=disk, log_path=log_path, detach=background,
                           cache_bytes=cache_bytes, passphrase_file=passphrase_file)
    if background:
        result["background"] = True
        return result
    result["background"] = False
    if on_ready is not None:
        on_ready(result)
    proc = server.proc
    assert proc is not None
    try:
        rc = proc.wait()
    except KeyboardInterrupt:  # SIGINT, SIGTERM, SIGHUP (the CLI raises Interrupted)
        log.info("Stopping the server")
        server.stop()
        result["stopped"] = True
        return result
    finally:
        server.stop()
    if rc == 0:  # nbdkit stops cleanly only when told to (a Ctrl-C reaches it too)
        result["stopped"] = True
        return result
    raise OperationFailed(f"nbdkit exited with status {rc} on its own"
                          f"{': ' + _tail(server.log_path) if server.log_path else ''}")


def served_disks(manifest: Manifest, disks: Sequence[str]) -> list[str]:
    """The disks of manifest named in disks (all if empty), NotFound for an unknown one."""
    if not disks:
        return [d.name for d in manifest.disks]
    return [choose_disk(manifest, d) for d in dict.fromkeys(disks)]
