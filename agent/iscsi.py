"""Expose a seat's disk over iSCSI, so the conductor can write an image to it or capture it
(DESIGN §4, the `iscsi` deploy path).

Two exporters behind one interface: LIO through python-rtslib-fb where the kernel has it
(configfs + target_core_mod, the usual real server), a private tgtd otherwise (userspace, runs
anywhere). The disk is always LUN 1: tgt keeps LUN 0 for its controller, and iPXE's
`sanboot iscsi:<server>:::1:<iqn>` and the conductor both expect 1.

Runs inside the deploy ramdisk: standard library and subprocess only; rtslib-fb is imported
on the LIO path alone. CHAP secrets are never logged (`Chap` hides its secret from repr) and
never on a command line (any local user reads those): tgtd gets its accounts over its
management socket (agent/tgt_mgmt.py), not from tgtadm.
"""
from __future__ import annotations

import abc
import hashlib
import ipaddress
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from labmetal.agent import tgt_mgmt

LOG = logging.getLogger(__name__)

LUN = 1
CONFIGFS_TARGET = Path("/sys/kernel/config/target")
_UNIX_PATH_MAX = 107  # sun_path minus its terminating NUL


class ExportError(Exception):
    """An export could not be made or removed; the message says why, without secrets."""


class LioUnavailable(ExportError):
    pass


@dataclass(frozen=True)
class Chap:
    """One-way (incoming) CHAP: the initiator must log in as ``user`` with ``secret``."""
    user: str
    secret: str = field(repr=False)


@dataclass(frozen=True)
class Export:
    """What an initiator needs: ``portal`` is "IP:PORT" as listened on (0.0.0.0 = every
    address of the seat; the conductor dials the seat's own address)."""
    iqn: str
    portal: str
    lun: int


def format_portal(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def split_initiators(allowed: Iterable[str]) -> tuple[list[str], list[str]]:
    """(addresses or networks, initiator names) from a mixed list such as
    ["10.0.0.0/24", "iqn.2008-11.org.linux-kvm"]."""
    addresses, names = [], []
    for entry in allowed:
        try:
            ipaddress.ip_network(entry, strict=False)
            addresses.append(entry)
        except ValueError:
            if not re.fullmatch(r"(iqn|eui|naa)\.\S+", entry):
                raise ExportError(f"allowed initiator {entry!r} is neither an IP address or "
                                  "network nor an iSCSI name (iqn./eui./naa.)") from None
            names.append(entry)
    return addresses, names


def check_disk(disk_path: str | os.PathLike) -> Path:
    """The disk must be a block device or a non-empty regular file (a light seat's disk)."""
    path = Path(disk_path)
    try:
        mode = path.stat().st_mode
    except OSError as error:
        raise ExportError(f"cannot export {path}: {error.strerror}") from None
    if stat.S_ISBLK(mode):
        return path
    if not stat.S_ISREG(mode):
        raise ExportError(f"cannot export {path}: not a block device or a regular file")
    if path.stat().st_size == 0:
        raise ExportError(f"cannot export {path}: the file is empty")
    return path


def _split_portal(portal: str) -> tuple[str, int]:
    host, _, port = portal.rpartition(":")
    return host.strip("[]"), int(port)


def _check_bindable(portal: str) -> None:
    """Refuse a portal that is taken or not an address of this host before tgtd tries it
    (tgtd would fall back to every address at 3260)."""
    host, port = _split_portal(portal)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ExportError(f"cannot listen on {portal}: {error.strerror}") from None


def _check_iqn(iqn: str) -> None:
    if not re.fullmatch(r"iqn\.\d{4}-\d{2}\.[a-z0-9.-]+(:[^\s]+)?", iqn):
        raise ExportError(f"{iqn!r} is not an iSCSI qualified name "
                          "(iqn.YYYY-MM.reversed.domain[:name], lower case)")


class DiskExporter(abc.ABC):
    """Exports disks as iSCSI targets, one LUN each; ``close()`` removes every export."""
    name: str

    @abc.abstractmethod
    def export(self, disk_path: str | os.PathLike, iqn: str, portal_ip: str = "0.0.0.0",
               port: int = 3260, allowed_initiators: Iterable[str] | None = None,
               chap: Chap | None = None) -> Export:
        """Export ``disk_path`` as ``iqn``, LUN 1. ``allowed_initiators``: None lets any
        initiator in; otherwise addresses/networks and/or initiator names, an initiator
        matching any entry may log in (and must still pass CHAP when ``chap`` is set)."""

    @abc.abstractmethod
    def unexport(self, iqn: str) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> DiskExporter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass
class _TgtTarget:
    tid: int
    portal: str
    chap_user: str | None
    # what tgtd lets in: ("address", "10.0.0.5" or "ALL") and ("name", "iqn...") entries
    bindings: list[tuple[str, str]] = field(default_factory=list)


class TgtExporter(DiskExporter):
    """A private tgtd per exporter, with its own IPC socket (TGT_IPC_SOCKET) and portals, so
    several run side by side and closing one never touches another's targets.

    tgtd starts at the first export, listening only on that export's portal; a later export
    on another portal adds it (tgt's portals serve every target of the daemon).

    ``run_dir`` holds the control socket, pid file and log: it must be private to this
    process (the conductor's comes from labmetal/rundir.py's ``private_dir``); None makes a
    fresh one with mkdtemp, removed at ``close()``.
    """
    name = "tgtd"

    def __init__(self, run_dir: str | os.PathLike | None = None, control_port: int = 0,
                 start_timeout: float = 10.0, stop_timeout: float = 5.0,
                 nop_interval: int = 5, nop_count: int = 3):
        self._own_run_dir = run_dir is None
        self.run_dir = Path(run_dir or tempfile.mkdtemp(prefix="labmetal-tgtd-"))
        self.control_port = control_port
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        # tgtd pings each initiator (NOP-In) every nop_interval s and drops one that missed
        # nop_count: a seat switched off sends no FIN, its login would stay forever.
        self.nop_interval, self.nop_count = nop_interval, nop_count
        self.log_path = self.run_dir / "tgtd.log"
        self._socket_base = self.run_dir / "socket"
        self._process: subprocess.Popen | None = None
        self._portals: list[str] = []
        self._targets: dict[str, _TgtTarget] = {}
        self._accounts: dict[str, str] = {}  # CHAP user -> secret, global to the daemon

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def socket_path(self) -> Path:
        """tgtd appends ".<control port>" to TGT_IPC_SOCKET (and ".lock" for its lock)."""
        return Path(f"{self._socket_base}.{self.control_port}")

    def export(self, disk_path, iqn, portal_ip="0.0.0.0", port=3260, allowed_initiators=None,
               chap=None, bstype: str = "rdwr", bsopts: str | None = None) -> Export:
        """As ``DiskExporter.export``; ``bstype``/``bsopts`` choose tgt's backing store:
        ``rdwr`` (the default) serves a file or block device, checked here; another type
        (``rbd``: ``disk_path`` is ``pool/image``, ``bsopts`` ``conf=...;id=...``) is handed
        to tgtd as it is, which says what is wrong with it."""
        _check_iqn(iqn)
        disk = check_disk(disk_path) if bstype == "rdwr" else disk_path
        addresses, names = split_initiators(allowed_initiators or [])
        if iqn in self._targets:
            raise ExportError(f"{iqn} is already exported")
        if chap and self._accounts.get(chap.user, chap.secret) != chap.secret:
            raise ExportError(f"CHAP user {chap.user!r} already has another secret on this tgtd")
        portal = format_portal(portal_ip, port)
        self._listen(portal)
        tid = max((t.tid for t in self._targets.values()), default=0) + 1
        self._targets[iqn] = _TgtTarget(tid, portal, chap.user if chap else None)
        try:
            self._tgtadm("--lld", "iscsi", "--mode", "target", "--op", "new", "--tid", str(tid),
                         "--targetname", iqn)
            self._tgtadm("--lld", "iscsi", "--mode", "logicalunit", "--op", "new", "--tid",
                         str(tid), "--lun", str(LUN), "--backing-store", str(disk),
                         "--bstype", bstype, *(["--bsopts", bsopts] if bsopts else []))
            for address in addresses or ([] if names else ["ALL"]):
                self._bind(iqn, "address", address)
            for name in names:
                self._bind(iqn, "name", name)
            if chap:
                if chap.user not in self._accounts:
                    self._new_account(chap)
                    self._accounts[chap.user] = chap.secret
                self._tgtadm("--lld", "iscsi", "--mode", "account", "--op", "bind", "--tid",
                             str(tid), "--user", chap.user)
        except ExportError:
            try:
                self.unexport(iqn)
            except ExportError:  # the target was never made: nothing to remove in tgtd
                self._forget(iqn)
            raise
        LOG.info("exported %s as %s LUN %d on %s via tgtd (initiators: %s%s)", disk, iqn, LUN,
                 portal, ", ".join(addresses + names) or "any", f"; CHAP user {chap.user}"
                 if chap else "")
        return Export(iqn, portal, LUN)

    def connected(self) -> dict[str, list[str]]:
        """The initiators logged in to each of this daemon's targets, by target name."""
        if self._process is None:
            return {}
        shown = self._tgtadm("--lld", "iscsi", "--mode", "target", "--op", "show")
        found: dict[str, list[str]] = {}
        for block in re.split(r"^Target \d+: ", shown, flags=re.MULTILINE)[1:]:
            name, _, rest = block.partition("\n")
            found[name.strip()] = re.findall(r"^\s+Initiator: (\S+)", rest, re.MULTILINE)
        return found

    def admit_only(self, iqn: str, address: str) -> None:
        """From now on let in ``address`` alone (and CHAP, where the target has it): the
        target's other bindings go. tgtd lets in an initiator that matches any one of a
        target's bindings, address or name, so binding an address beside a name would let
        in either; and a name crosses the wire in clear at every login."""
        target = self._targets.get(iqn)
        if target is None:
            raise ExportError(f"{iqn} is not exported by this tgtd")
        try:
            address = str(ipaddress.ip_address(address))
        except ValueError:
            raise ExportError(f"{address!r} is not an IP address") from None
        if target.bindings == [("address", address)]:
            return
        if ("address", address) not in target.bindings:
            self._bind(iqn, "address", address)  # first: never a moment with no binding
        for kind, value in list(target.bindings):
            if (kind, value) != ("address", address):
                self._tgtadm("--lld", "iscsi", "--mode", "target", "--op", "unbind", "--tid",
                             str(target.tid), f"--initiator-{kind}", value)
                target.bindings.remove((kind, value))
        LOG.info("%s now lets in %s only", iqn, address)

    def _bind(self, iqn: str, kind: str, value: str) -> None:
        target = self._targets[iqn]
        self._tgtadm("--lld", "iscsi", "--mode", "target", "--op", "bind", "--tid",
                     str(target.tid), f"--initiator-{kind}", value)
        target.bindings.append((kind, value))

    def unexport(self, iqn: str) -> None:
        """Remove the target. The record goes only once tgtd has removed it: if tgtadm
        fails, the target may still serve, and a later unexport (or close) tries again."""
        target = self._targets.get(iqn)
        if target is None:
            raise ExportError(f"{iqn} is not exported by this tgtd")
        self._tgtadm("--lld", "iscsi", "--mode", "target", "--op", "delete", "--force",
                     "--tid", str(target.tid))
        self._forget(iqn)
        LOG.info("unexported %s", iqn)

    def _forget(self, iqn: str) -> None:
        """Drop the target's record, and its CHAP account once no other target uses it."""
        target = self._targets.pop(iqn, None)
        user = target.chap_user if target else None
        if user and all(t.chap_user != user for t in self._targets.values()):
            self._tgtadm("--lld", "iscsi", "--mode", "account", "--op", "delete", "--user", user,
                         check=False)
            self._accounts.pop(user, None)

    def close(self) -> None:
        """Stop tgtd for good. It ignores SIGTERM: go offline, drop the targets, ask it to
        exit, and kill it by PID if it does not answer or is still there after
        ``stop_timeout``."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            try:
                self._tgtadm("--mode", "sys", "--op", "update", "--name", "State", "--value",
                             "offline")
                for iqn in list(self._targets):
                    self.unexport(iqn)
                self._tgtadm("--mode", "system", "--op", "delete")
                process.wait(timeout=self.stop_timeout)
            except (ExportError, subprocess.TimeoutExpired) as error:
                LOG.warning("tgtd (pid %d) did not stop cleanly (%s); killing it", process.pid,
                            str(error).splitlines()[0])
                process.kill()
                process.wait(timeout=10)
        self._targets.clear()
        self._accounts.clear()
        self._portals.clear()
        for leftover in (self.socket_path, Path(f"{self.socket_path}.lock")):
            leftover.unlink(missing_ok=True)
        if self._own_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    # -- the daemon --

    def _env(self) -> dict[str, str]:
        return {**os.environ, "TGT_IPC_SOCKET": str(self._socket_base)}

    def _new_account(self, chap: Chap) -> None:
        """tgtadm would need the secret in its argv: ask tgtd over its socket instead."""
        try:
            tgt_mgmt.new_account(self.socket_path, chap.user, chap.secret, self.stop_timeout)
        except (tgt_mgmt.TgtMgmtError, ValueError) as error:
            raise ExportError(f"tgtd could not make CHAP account {chap.user!r}: {error}") \
                from None

    def _tgtadm(self, *args: str, check: bool = True) -> str:
        """tgtadm for everything but accounts' secrets (see ``_new_account``)."""
        argv = ["tgtadm", "--control-port", str(self.control_port), *args]
        shown = " ".join(argv)
        try:
            result = subprocess.run(argv, env=self._env(), capture_output=True, text=True,
                                    timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            raise ExportError(f"{shown}: tgtd did not answer within {self.stop_timeout} s") \
                from None
        if check and result.returncode != 0:
            raise ExportError(f"{shown} failed: {(result.stderr or result.stdout).strip()}")
        return result.stdout

    def _listen(self, portal: str) -> None:
        if portal in self._portals:
            return
        if self._process is None and self._stop_leftover():
            deadline = time.monotonic() + self.stop_timeout
            while time.monotonic() < deadline:  # its socket closes as its threads exit
                try:
                    _check_bindable(portal)
                    break
                except ExportError:
                    time.sleep(0.05)
        _check_bindable(portal)
        if self._process is None:
            self._start(portal)
            self._portals.append(portal)
            try:
                self._check_listening(portal)
            except ExportError:
                self.close()
                raise
            return
        self._tgtadm("--lld", "iscsi", "--mode", "portal", "--op", "new", "--param",
                     f"portal={portal}")
        self._portals.append(portal)
        try:
            self._check_listening(portal)
        except ExportError:
            self._portals.remove(portal)
            self._tgtadm("--lld", "iscsi", "--mode", "portal", "--op", "delete", "--param",
                         f"portal={portal}", check=False)
            raise

    def _start(self, portal: str) -> None:
        if len(str(self.socket_path)) + len(".lock") > _UNIX_PATH_MAX:
            raise ExportError(f"tgtd's socket path {self.socket_path} is too long for a "
                              "unix socket; use a shorter run_dir")
        if shutil.which("tgtd") is None:
            raise ExportError("tgtd is not installed (Debian package tgt)")
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                ["tgtd", "-f", "--control-port", str(self.control_port), "--iscsi",
                 f"portal={portal},nop_interval={self.nop_interval},"
                 f"nop_count={self.nop_count}"], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, env=self._env(), start_new_session=True)
        self._pid_file.write_text(f"{self._process.pid}\n")
        deadline = time.monotonic() + self.start_timeout
        try:
            while not self.socket_path.exists():
                self._wait_step(deadline, "create its control socket")
            while self._portal_shown() is None:
                self._wait_step(deadline, "answer tgtadm")
        except ExportError:
            self.close()
            raise
        LOG.info("tgtd running (pid %d, socket %s)", self._process.pid, self.socket_path)

    @property
    def _pid_file(self) -> Path:
        return self.run_dir / "tgtd.pid"

    def _stop_leftover(self) -> bool:
        """A tgtd of this run dir that outlived its owner (killed with SIGKILL) still holds
        the portal and serves targets nobody records: stop it first (True if there was
        one). Found by the pid file, and only if that process is a tgtd on this run dir's
        socket."""
        try:
            pid = int(self._pid_file.read_text())
            proc = Path(f"/proc/{pid}")
            mine = proc.joinpath("comm").read_text().strip() == "tgtd" and \
                str(self._socket_base).encode() in proc.joinpath("environ").read_bytes()
        except (OSError, ValueError):
            return False
        if mine:
            LOG.warning("stopping tgtd (pid %d) left running on %s by a process that was "
                        "killed; its targets were no longer recorded", pid, self.run_dir)
            os.kill(pid, signal.SIGKILL)  # it ignores SIGTERM, and serves no one we know
        return mine

    def _wait_step(self, deadline: float, what: str) -> None:
        assert self._process is not None
        if self._process.poll() is not None:
            raise ExportError(f"tgtd exited ({self._process.returncode}) before it could "
                              f"{what}\n{self._log_tail()}")
        if time.monotonic() > deadline:
            raise ExportError(f"tgtd did not {what} within {self.start_timeout} s\n"
                              f"{self._log_tail()}")
        time.sleep(0.05)

    def _portal_shown(self) -> list[str] | None:
        """The portals tgtd listens on, or None while it does not answer yet."""
        try:
            shown = self._tgtadm("--lld", "iscsi", "--mode", "portal", "--op", "show")
        except ExportError:
            return None
        return re.findall(r"^Portal: (\S+),\d+$", shown, re.MULTILINE)

    def _check_listening(self, portal: str) -> None:
        """tgtd that cannot bind a portal logs it and keeps running (at start, on every
        address at 3260 instead): check what it really listens on, then that the portal
        accepts connections."""
        shown = self._portal_shown() or []
        if sorted(shown) != sorted(self._portals):
            raise ExportError(f"tgtd could not listen on {portal}; it listens on "
                              f"{', '.join(shown) or 'nothing'}\n{self._log_tail()}")
        host, port = _split_portal(portal)
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                socket.create_connection((host, port), timeout=1).close()
                return
            except OSError:
                self._wait_step(deadline, f"accept connections on {portal}")

    def _log_tail(self) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-2000:]


class LioExporter(DiskExporter):
    """The kernel's own target (LIO) through python-rtslib-fb: a block (iblock) or fileio
    storage object, an iSCSI target with TPG 1, LUN 1, a portal, and either node ACLs by
    initiator name or demo mode (generated ACLs) when any initiator may log in.

    LIO restricts initiators by iSCSI name only; addresses are refused here rather than
    silently ignored. It cannot run on the development machine (no configfs); see
    `exporter_for_host()`.
    """
    name = "lio"

    def __init__(self) -> None:
        present, reason = lio_status()
        if not present:
            raise LioUnavailable(f"LIO is not available on this host: {reason}")
        import rtslib_fb
        self._rts = rtslib_fb
        try:
            rtslib_fb.RTSRoot()  # mounts configfs and loads target_core_mod if needed
        except rtslib_fb.RTSLibError as error:
            raise LioUnavailable(f"LIO is not available on this host: {error}") from None
        self._exports: dict[str, tuple[Any, Any]] = {}  # iqn -> (Target, StorageObject)

    def export(self, disk_path, iqn, portal_ip="0.0.0.0", port=3260, allowed_initiators=None,
               chap=None) -> Export:
        rts = self._rts
        _check_iqn(iqn)
        disk = check_disk(disk_path)
        addresses, names = split_initiators(allowed_initiators or [])
        if addresses:
            raise ExportError("LIO restricts initiators by iSCSI name only, not by address "
                              f"({', '.join(addresses)}); use initiator names or CHAP")
        if iqn in self._exports:
            raise ExportError(f"{iqn} is already exported")
        storage_name = "labmetal-" + hashlib.sha256(iqn.encode()).hexdigest()[:16]
        storage = target = None
        try:
            if stat.S_ISBLK(disk.stat().st_mode):
                storage = rts.BlockStorageObject(storage_name, dev=str(disk))
            else:
                storage = rts.FileIOStorageObject(storage_name, dev=str(disk),
                                                  size=disk.stat().st_size)
            target = rts.Target(rts.FabricModule("iscsi"), iqn, mode="create")
            tpg = rts.TPG(target, 1, mode="create")
            lun = rts.LUN(tpg, LUN, storage_object=storage)
            rts.NetworkPortal(tpg, portal_ip, port, mode="create")
            tpg.set_attribute("authentication", "1" if chap else "0")
            if names:
                tpg.set_attribute("generate_node_acls", "0")
                for name in names:
                    acl = rts.NodeACL(tpg, name, mode="create")
                    rts.MappedLUN(acl, LUN, tpg_lun=lun)
                    if chap:
                        acl.chap_userid, acl.chap_password = chap.user, chap.secret
            else:  # demo mode: any initiator, CHAP (if any) set on the TPG itself
                tpg.set_attribute("generate_node_acls", "1")
                tpg.set_attribute("cache_dynamic_acls", "1")
                tpg.set_attribute("demo_mode_write_protect", "0")
                if chap:
                    tpg.chap_userid, tpg.chap_password = chap.user, chap.secret
            tpg.enable = True
        except (rts.RTSLibError, OSError) as error:
            for node in (target, storage):
                if node is not None:
                    node.delete()
            raise ExportError(f"LIO could not export {disk} as {iqn}: {error}") from None
        self._exports[iqn] = (target, storage)
        LOG.info("exported %s as %s LUN %d on %s via LIO (initiators: %s%s)", disk, iqn, LUN,
                 format_portal(portal_ip, port), ", ".join(names) or "any",
                 f"; CHAP user {chap.user}" if chap else "")
        return Export(iqn, format_portal(portal_ip, port), LUN)

    def unexport(self, iqn: str) -> None:
        if iqn not in self._exports:
            raise ExportError(f"{iqn} is not exported by this exporter")
        target, storage = self._exports.pop(iqn)
        target.delete()  # TPG, LUN, portal and ACLs with it
        storage.delete()
        LOG.info("unexported %s", iqn)

    def close(self) -> None:
        for iqn in list(self._exports):
            self.unexport(iqn)


def lio_status(configfs_target: Path = CONFIGFS_TARGET) -> tuple[bool, str]:
    """Whether LIO can be used here, and why (for the log line)."""
    if not configfs_target.is_dir():
        return False, (f"{configfs_target} is missing (no configfs or target_core_mod in "
                       "this kernel)")
    try:
        import rtslib_fb  # noqa: F401
    except ImportError as error:
        return False, f"python-rtslib-fb cannot be imported ({error})"
    return True, f"{configfs_target} exists and rtslib-fb imports"


def exporter_for_host(run_dir: str | os.PathLike | None = None) -> DiskExporter:
    """LIO where the kernel has it, a private tgtd (keeping its socket and log in
    ``run_dir``) otherwise; says which, and why."""
    present, reason = lio_status()
    if present:
        LOG.info("iSCSI export via LIO: %s", reason)
        return LioExporter()
    LOG.info("iSCSI export via tgtd: %s", reason)
    return TgtExporter(run_dir)
