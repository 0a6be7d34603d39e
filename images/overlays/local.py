"""The ``local`` session store (the embedded default, no Ceph): a qcow2 overlay per session
whose backing file is the template version's raw image, shown as a raw file by
qemu-storage-daemon's FUSE export and served by tgtd (rdwr backing store).

Layout::

    <root>/templates/<name>/v<version>.raw     frozen (read-only) copies of the raw images
    <root>/sessions/<id>/overlay.qcow2          the session: backing file = its template
    <root>/sessions/<id>/session.json           {template, version, created_at}
    <run_dir>/<id>.qmp, <id>.pid, <id>.disk,    a running qemu-storage-daemon: its QMP
    <run_dir>/<id>.log                          socket, PID, FUSE mount point and log

Save points are qcow2 **internal snapshots** of the overlay (``blockdev-snapshot-internal-
sync`` over QMP while the session is served, ``qemu-img snapshot -c`` otherwise). Why
internal: a save is one operation in one file, made by qcow2's own ordered metadata
updates: the snapshot's L1 table and refcount increases are written first, then a new
snapshot table into freshly allocated clusters, flushed, and only then does one 12-byte
write of the header (snapshot count + table offset, one sector) make the save exist. If the
daemon (or anything else) dies before that write, the header still points at the old table,
so every earlier save point is exactly as it was; the worst left behind is leaked clusters
(refcounts one too high), which ``qemu-img check -r leaks`` reclaims and which this module
runs after any daemon that did not stop cleanly. External snapshots would need a chain of
files and a separate journal naming the active one (two things to keep in step across a
crash); with internal ones there is nothing else to keep in step. Save points share every
unchanged cluster, so they cost only what changed since.

Before the snapshot the FUSE file is fsync'ed: tgtd writes through to the daemon, and the
fsync makes the daemon flush qcow2's cached metadata, so what the seat wrote is in the save.
A revert (``qemu-img snapshot -a``) is not atomic itself, but it only rewrites the active
layer: if it is interrupted the save points are untouched and the revert can be run again.

A copy to a file is ``qemu-img convert`` of the overlay (through its backing file, so the
copy stands alone), or of one internal snapshot (``-l``). It takes qemu's image lock like
any writer would, never ``-U``: the daemon, if one is left, is stopped first.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from labmetal.agent.iscsi import Chap, Export, ExportError
from labmetal.images.overlays.base import (BlockIO, OverlayBackend, OverlayError, Quota, Reason,
                                           SavePoint, SessionDisk, TemplateVersion,
                                           check_raw_image, parse_save_name)
from labmetal.images.overlays.tgt import SessionTargets, process_alive
from labmetal.rundir import private_dir

LOG = logging.getLogger(__name__)

TOOLS = {"qemu-img": "qemu-utils", "qemu-storage-daemon": "qemu-system-common",
         "tgtd": "tgt", "tgtadm": "tgt"}
NODE = "disk"  # the qcow2 node's name in qemu-storage-daemon


class LocalOverlays(OverlayBackend):
    name = "local"

    def __init__(self, root: str | os.PathLike, targets: SessionTargets,
                 run_dir: str | os.PathLike | None = None, quota: Quota | None = None,
                 daemon_timeout: float = 10.0):
        super().__init__(quota)
        self.root = Path(root)
        self.targets = targets
        self.daemon_timeout = daemon_timeout
        # Students' disks: the store is 0700 (what is in it need not be: nobody else can
        # reach it). The daemons' sockets, pid files and FUSE mounts go in a run directory
        # that must be private (labmetal/rundir.py), as root follows what is there.
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for sub in (self.root / "templates", self.root / "sessions"):
            sub.mkdir(mode=0o700, exist_ok=True)
        self.run_dir = private_dir(run_dir if run_dir else self.root / "run")

    def validate(self) -> None:
        missing = [f"{tool} ({package})" for tool, package in TOOLS.items()
                   if shutil.which(tool) is None]
        if missing:
            raise OverlayError(f"the local session store needs {', '.join(missing)}",
                               Reason.UNAVAILABLE)
        if not Path("/dev/fuse").exists():
            raise OverlayError("the local session store needs FUSE (/dev/fuse is missing)",
                               Reason.UNAVAILABLE)

    # -- templates --

    def _template_path(self, name: str, version: int) -> Path:
        return self.root / "templates" / name / f"v{version}.raw"

    def _make_template(self, name, version, raw_image_path) -> TemplateVersion:
        size = check_raw_image(raw_image_path)
        final = self._template_path(name, version)
        if final.exists():
            raise OverlayError(f"template {name} version {version} exists and is frozen; "
                               "make a new version", Reason.BUSY)
        final.parent.mkdir(parents=True, exist_ok=True)
        partial = final.with_name(f".{final.name}.{os.getpid()}.partial")
        try:
            _run(["cp", "--sparse=always", "--reflink=auto", str(raw_image_path),
                  str(partial)], "copy the template image")
            with open(partial, "rb+") as file:
                os.fsync(file.fileno())
            partial.chmod(0o400)  # frozen: read-only, and for this service alone
            os.link(partial, final)  # fails, rather than replaces, if a racer made it first
        except FileExistsError:
            raise OverlayError(f"template {name} version {version} exists and is frozen",
                               Reason.BUSY) from None
        finally:
            partial.unlink(missing_ok=True)
        _fsync_dir(final.parent)
        LOG.info("template %s version %d made from %s (%d bytes)", name, version,
                 raw_image_path, size)
        return TemplateVersion(name, version, size)

    def templates(self) -> list[TemplateVersion]:
        found = []
        for path in sorted((self.root / "templates").glob("*/v*.raw")):
            version = path.stem[1:]
            if version.isdigit():
                found.append(TemplateVersion(path.parent.name, int(version),
                                             path.stat().st_size))
        return found

    # -- sessions --

    def _session_dir(self, session_id: str) -> Path:
        return self.root / "sessions" / session_id

    def _overlay(self, session_id: str) -> Path:
        return self._session_dir(session_id) / "overlay.qcow2"

    def sessions(self) -> list[str]:
        return sorted(p.parent.name for p in (self.root / "sessions").glob("*/session.json"))

    def describe(self, session_id: str) -> SessionDisk:
        self._require_session(session_id)
        meta = json.loads((self._session_dir(session_id) / "session.json").read_text())
        size = self._template_path(meta["template"], meta["version"]).stat().st_size
        return SessionDisk(session_id, self.name, meta["template"], meta["version"], size,
                           self.used_bytes(session_id))

    def _create_session(self, session_id, template, version) -> SessionDisk:
        backing = self._template_path(template, version)
        if not backing.exists():
            raise OverlayError(f"no template {template} version {version}", Reason.NOT_FOUND)
        final = self._session_dir(session_id)
        if final.exists():
            raise OverlayError(f"session {session_id} exists already", Reason.BUSY)
        # Made aside, then put in place by one rename: a session is there whole or not at all.
        work = Path(tempfile.mkdtemp(prefix=f".new-{session_id}-", dir=final.parent))
        try:
            _make_overlay(work / "overlay.qcow2", backing)
            _write_json(work / "session.json", {
                "template": template, "version": version,
                "created_at": datetime.now(UTC).isoformat()})
            try:
                work.rename(final)
            except OSError:
                raise OverlayError(f"session {session_id} exists already", Reason.BUSY) \
                    from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
        _fsync_dir(final.parent)
        LOG.info("session %s created from template %s version %d", session_id, template,
                 version)
        return self.describe(session_id)

    def used_bytes(self, session_id: str) -> int:
        try:
            return self._overlay(session_id).stat().st_blocks * 512
        except FileNotFoundError:
            raise OverlayError(f"no session {session_id} in the local store",
                               Reason.NOT_FOUND) from None

    # -- serving --

    def is_exported(self, session_id: str) -> bool:
        return self.targets.is_exported(session_id)

    def connected(self) -> set[str]:
        return self.targets.connected()

    def _export(self, session_id, iqn, chap: Chap, allowed) -> Export:
        self._stop_daemon(session_id)  # a daemon left by a tgtd that died, or by a crash
        mountpoint = self._start_daemon(session_id)
        try:
            return self.targets.export_file(session_id, mountpoint, iqn, chap, allowed)
        except ExportError as error:
            self._stop_daemon(session_id)
            raise OverlayError(f"cannot export session {session_id}: {error}",
                               Reason.BUSY if "already exported" in str(error)
                               else Reason.FAILED) from None

    def _unexport(self, session_id) -> None:
        try:
            self.targets.unexport(session_id)  # first: tgtd holds the FUSE file open
        except ExportError as error:
            LOG.warning("removing session %s's target: %s", session_id, error)
        self._stop_daemon(session_id)

    def close(self) -> None:
        """tgtd first (it reads the FUSE files), then every qemu-storage-daemon."""
        self.targets.close()
        for pidfile in self.run_dir.glob("*.pid"):
            self._stop_daemon(pidfile.stem)

    # -- save points --

    def list_saves(self, session_id: str) -> list[SavePoint]:
        self._require_session(session_id)
        info = json.loads(_run(["qemu-img", "info", "-U", "--output=json", "-f", "qcow2",
                                str(self._overlay(session_id))], "read the session's overlay"))
        saves = []
        for snapshot in info.get("snapshots", []):
            parsed = parse_save_name(snapshot["name"])
            if parsed:
                created = datetime.fromtimestamp(snapshot["date-sec"], UTC)
                saves.append(SavePoint(session_id, snapshot["name"], parsed[1], created))
        return sorted(saves, key=lambda s: s.number)

    def _save(self, session_id, save_id) -> SavePoint:
        pid = self._daemon_pid(session_id)
        if pid is None:
            _run(["qemu-img", "snapshot", "-c", save_id, "--image-opts",
                  _image_opts(self._overlay(session_id))], f"save session {session_id}")
        else:
            mountpoint = self.run_dir / f"{session_id}.disk"
            fd = os.open(mountpoint, os.O_RDONLY)
            try:
                os.fsync(fd)  # the daemon flushes the qcow2 (data and cached metadata)
            finally:
                os.close(fd)
            with _Qmp(self.run_dir / f"{session_id}.qmp", self.daemon_timeout) as qmp:
                qmp.execute("blockdev-snapshot-internal-sync", device=NODE, name=save_id)
        for save in self.list_saves(session_id):
            if save.save_id == save_id:
                LOG.info("session %s saved as %s", session_id, save_id)
                return save
        raise OverlayError(f"saving session {session_id}: the snapshot {save_id} is missing "
                           "after it was made")

    def _revert(self, session_id, save_id) -> None:
        self._stop_daemon(session_id)
        _run(["qemu-img", "snapshot", "-a", save_id, "--image-opts",
              _image_opts(self._overlay(session_id))], f"revert session {session_id}")
        LOG.info("session %s reverted to %s", session_id, save_id)

    def _reset(self, session_id) -> SessionDisk:
        self._stop_daemon(session_id)
        disk = self.describe(session_id)
        overlay = self._overlay(session_id)
        fresh = overlay.with_name("overlay.qcow2.reset")
        _make_overlay(fresh, self._template_path(disk.template, disk.version))
        fresh.replace(overlay)  # one rename: the old overlay or the new, never neither
        _fsync_dir(overlay.parent)
        LOG.info("session %s reset to template %s version %d", session_id, disk.template,
                 disk.version)
        return self.describe(session_id)

    def _export_disk(self, session_id, dest, fmt, save_id, compress) -> None:
        self._stop_daemon(session_id)  # a daemon left by a dead tgtd holds the overlay's lock
        argv = ["qemu-img", "convert", "-f", "qcow2", "-O", fmt]
        if save_id is not None:
            argv += ["-l", f"snapshot.name={save_id}"]  # a save label has no ',' or '='
        if compress:
            argv.append("-c")
        _run([*argv, str(self._overlay(session_id)), str(dest.absolute())],
             f"copy session {session_id} to {dest}", timeout=None)
        LOG.info("session %s%s copied to %s (%s)", session_id,
                 f" at {save_id}" if save_id else "", dest, fmt)

    def _changed_extents(self, session_id: str) -> list[tuple[int, int]]:
        """The overlay's own clusters (depth 0 in ``qemu-img map``), data or zeroed: a
        zeroed cluster differs from its template too."""
        self._stop_daemon(session_id)
        mapped = json.loads(_run(["qemu-img", "map", "--output=json", "-f", "qcow2",
                                  str(self._overlay(session_id))],
                                 f"map session {session_id}"))
        extents: list[tuple[int, int]] = []
        for entry in mapped:
            if entry.get("depth") != 0 or not (entry.get("data") or entry.get("zero")):
                continue
            start, length = int(entry["start"]), int(entry["length"])
            if extents and extents[-1][0] + extents[-1][1] == start:
                extents[-1] = (extents[-1][0], extents[-1][1] + length)
            else:
                extents.append((start, length))
        return extents

    @contextmanager
    def _blocks(self, session_id: str) -> Iterator[BlockIO]:
        """Through the session's FUSE export (qemu-storage-daemon), stopped at the end: its
        quit flushes qcow2's metadata."""
        self._stop_daemon(session_id)
        mountpoint = self._start_daemon(session_id)
        try:
            with _FileBlocks(mountpoint) as io:
                yield io
        finally:
            self._stop_daemon(session_id)

    def _delete(self, session_id) -> None:
        self._stop_daemon(session_id)
        directory = self._session_dir(session_id)
        doomed = directory.with_name(f".deleted-{session_id}-{os.getpid()}")
        directory.rename(doomed)  # gone from sessions() at once, removed after
        shutil.rmtree(doomed)
        LOG.info("session %s deleted", session_id)

    # -- qemu-storage-daemon, one per served session --

    def _daemon_pid(self, session_id: str) -> int | None:
        """The PID of the session's running daemon (checked against its command line, so a
        recycled PID is not taken for it), else None."""
        pidfile = self.run_dir / f"{session_id}.pid"
        try:
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        overlay = str(self._overlay(session_id)).encode()
        if not cmdline or not cmdline[0].endswith(b"qemu-storage-daemon") or \
                not any(overlay in arg for arg in cmdline) or not process_alive(pid):
            return None
        return pid

    def _start_daemon(self, session_id: str) -> Path:
        overlay = self._overlay(session_id)
        qmp_path = self.run_dir / f"{session_id}.qmp"
        pidfile = self.run_dir / f"{session_id}.pid"
        mountpoint = self.run_dir / f"{session_id}.disk"
        if len(str(qmp_path)) > 107:
            raise OverlayError(f"the QMP socket path {qmp_path} is too long for a unix "
                               "socket; use a shorter run_dir")
        mountpoint.touch()
        blockdev = {"driver": "qcow2", "node-name": NODE, "discard": "unmap",
                    "file": {"driver": "file", "filename": str(overlay)}}
        export = {"type": "fuse", "id": "seat", "node-name": NODE,
                  "mountpoint": str(mountpoint), "writable": True}
        argv = ["qemu-storage-daemon", "--blockdev", json.dumps(blockdev),
                "--export", json.dumps(export),
                "--chardev", f"socket,id=qmp,path={qmp_path},server=on,wait=off",
                "--monitor", "chardev=qmp", "--pidfile", str(pidfile)]
        started = time.monotonic()
        with open(self.run_dir / f"{session_id}.log", "ab") as log:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        deadline = started + self.daemon_timeout
        while not (_is_mounted(mountpoint) and qmp_path.exists()):
            if process.poll() is not None:
                tail = (self.run_dir / f"{session_id}.log").read_text(errors="replace")[-1500:]
                raise OverlayError(f"qemu-storage-daemon for session {session_id} exited "
                                   f"({process.returncode}): {tail.strip()}")
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                self._cleanup_daemon_files(session_id)
                raise OverlayError(f"qemu-storage-daemon for session {session_id} did not "
                                   f"mount its FUSE export within {self.daemon_timeout} s")
            time.sleep(0.02)
        LOG.info("qemu-storage-daemon (pid %d) shows session %s as %s (%.2f s)", process.pid,
                 session_id, mountpoint, time.monotonic() - started)
        return mountpoint

    def _stop_daemon(self, session_id: str) -> None:
        """Quit over QMP (the daemon flushes and unmounts), SIGKILL by PID if it does not go;
        after an unclean end, unmount the dead FUSE mount and reclaim leaked clusters."""
        pid = self._daemon_pid(session_id)
        pidfile = self.run_dir / f"{session_id}.pid"
        clean = pid is None and not pidfile.exists()
        if pid is not None:
            try:
                with _Qmp(self.run_dir / f"{session_id}.qmp", self.daemon_timeout) as qmp:
                    qmp.execute("quit")
                clean = _wait_gone(pid, self.daemon_timeout)
            except OverlayError as error:
                LOG.warning("qemu-storage-daemon (pid %d) did not quit: %s", pid, error)
            if not clean:
                LOG.warning("killing qemu-storage-daemon (pid %d) of session %s", pid,
                            session_id)
                _kill(pid)
        self._cleanup_daemon_files(session_id)
        if not clean and self._overlay(session_id).exists():
            # check -r leaks only frees clusters nothing refers to; it never changes data
            result = subprocess.run(["qemu-img", "check", "-q", "-r", "leaks", "-f", "qcow2",
                                     str(self._overlay(session_id))], capture_output=True,
                                    text=True)
            if result.returncode not in (0, 3):  # 3: leaks found (and repaired)
                raise OverlayError(f"session {session_id}'s overlay is damaged after its "
                                   f"daemon died: {result.stderr.strip() or result.stdout}")

    def _cleanup_daemon_files(self, session_id: str) -> None:
        mountpoint = self.run_dir / f"{session_id}.disk"
        if _is_mounted(mountpoint):  # a daemon that was killed leaves a dead FUSE mount
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)
        for suffix in ("qmp", "pid", "disk"):
            (self.run_dir / f"{session_id}.{suffix}").unlink(missing_ok=True)


class _FileBlocks:
    """A raw file's bytes by offset (BlockIO)."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def read(self, offset: int, length: int) -> bytes:
        data = b""
        while len(data) < length:
            more = os.pread(self.fd, length - len(data), offset + len(data))
            if not more:
                raise OverlayError(f"the session disk ends at {offset + len(data)}")
            data += more
        return data

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            done = os.pwrite(self.fd, view, offset)
            view, offset = view[done:], offset + done

    def flush(self) -> None:
        os.fsync(self.fd)

    def __enter__(self) -> _FileBlocks:
        return self

    def __exit__(self, *exc_info: object) -> None:
        os.close(self.fd)


class _Qmp:
    """A QMP client just big enough for snapshot and quit."""

    def __init__(self, path: Path, timeout: float):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
            self.file = self.sock.makefile("rwb")
            self._read()  # the greeting
            self.execute("qmp_capabilities")
        except OSError as error:
            self.sock.close()
            raise OverlayError(f"cannot talk to qemu-storage-daemon at {path}: {error}") \
                from None

    def execute(self, command: str, **arguments: object) -> dict:
        self.file.write(json.dumps({"execute": command, "arguments": arguments}).encode()
                        + b"\n")
        self.file.flush()
        while True:
            reply = self._read()
            if "error" in reply:
                raise OverlayError(f"qemu-storage-daemon refused {command}: "
                                   f"{reply['error'].get('desc')}")
            if "return" in reply:
                return reply["return"]

    def _read(self) -> dict:
        try:
            line = self.file.readline()
        except OSError as error:
            raise OverlayError(f"no answer from qemu-storage-daemon at {self.path}: {error}") \
                from None
        if not line:
            raise OverlayError(f"qemu-storage-daemon at {self.path} closed the connection")
        return json.loads(line)

    def __enter__(self) -> _Qmp:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.file.close()
        self.sock.close()


def _image_opts(overlay: Path) -> str:
    """qemu-img snapshot has no -f: the format is pinned this way instead of probed."""
    return "driver=qcow2,file.driver=file,file.filename=" + str(overlay).replace(",", ",,")


def _make_overlay(path: Path, backing: Path) -> None:
    _run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", "-b",
          str(backing), "-F", "raw", str(path)], "create the session's overlay")
    with open(path, "rb+") as file:
        os.fsync(file.fileno())


def _run(argv: list[str], what: str, timeout: float | None = 600) -> str:
    """``timeout``: None for a copy, whose time follows the disk's size."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise OverlayError(f"cannot {what}: {argv[0]} is not installed",
                           Reason.UNAVAILABLE) from None
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        raise OverlayError(f"cannot {what}: {message[-1] if message else argv[0] + ' failed'}",
                           Reason.BUSY if "lock" in " ".join(message) else Reason.FAILED)
    return result.stdout


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as file:
        json.dump(data, file)
        file.flush()
        os.fsync(file.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_mounted(path: Path) -> bool:
    target = str(path).replace(" ", "\\040")
    with open("/proc/self/mountinfo") as mounts:
        return any(line.split()[4] == target for line in mounts)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if not process_alive(pid):
            return True
        time.sleep(0.02)
    return False


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    _wait_gone(pid, 10)


def _reap(pid: int) -> None:
    """Collect the exit of a daemon this process started (others are reaped by init)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
