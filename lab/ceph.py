"""A single-node Ceph cluster for tests (DESIGN §7, §9): one monitor on 127.0.0.1, one OSD
keeping its data in RAM (memstore), pool size 1, cephx on, and every file it writes (config,
keyrings, mon store, OSD dir, sockets, logs, pid files) under one directory.

    with CephCluster(tmp_path / "ceph") as ceph:   # ~9 s from nothing to a writable pool
        ceph.conf_path, ceph.pool ...

The daemons run in the foreground (``-f``) as children of the test, so they are stopped
by PID: SIGTERM, then SIGKILL after a grace period. ``stop()`` is idempotent and runs on
every way out of the ``with`` block; the directory is removed with it unless ``keep``.
Whoever serves RBD images from this cluster (tgtd) must be stopped before it.

``osd client watch timeout`` is 5 s here (Ceph's default: 30 s): the tests kill RBD clients
on purpose, and each dead client's watch holds up the image's lock hand-over until then.
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

from labmetal.lab.harness import free_port

DAEMONS = ("ceph-mon", "ceph-osd", "ceph-authtool", "monmaptool", "ceph", "rbd")


def missing_tools() -> list[str]:
    return [tool for tool in DAEMONS if shutil.which(tool) is None]


class CephCluster:
    def __init__(self, root: Path, pool: str = "labmetal", memstore_bytes: int = 3 * 2**30,
                 keep: bool = False):
        self.root = Path(root)
        self.pool = pool
        self.memstore_bytes = memstore_bytes
        self.keep = keep
        self.fsid = str(uuid.uuid4())
        self.mon_port = free_port()
        self.conf_path = self.root / "ceph.conf"
        self.keyring_path = self.root / "keyring"
        self._processes: dict[str, subprocess.Popen] = {}
        self.startup_seconds = 0.0

    @property
    def mon_address(self) -> str:
        return f"127.0.0.1:{self.mon_port}"

    def __enter__(self) -> CephCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- life cycle --

    def start(self) -> None:
        started = time.monotonic()
        for sub in ("run", "log", "mon", "osd"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._write_conf()
        self._run("ceph-authtool", "--create-keyring", self.keyring_path, "--gen-key",
                  "-n", "mon.", "--cap", "mon", "allow *")
        self._run("ceph-authtool", self.keyring_path, "--gen-key", "-n", "client.admin",
                  "--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr",
                  "allow *")
        self._run("monmaptool", "--create", "--fsid", self.fsid, "--addv", "a",
                  f"[v1:{self.mon_address}]", self.root / "monmap")
        self._run("ceph-mon", "-c", self.conf_path, "--mkfs", "-i", "a", "--monmap",
                  self.root / "monmap", "--keyring", self.keyring_path)
        self._spawn("mon.a", "ceph-mon", "-f", "-c", self.conf_path, "-i", "a")
        osd_uuid = str(uuid.uuid4())
        osd_id = self.ceph("osd", "new", osd_uuid).strip()
        self._run("ceph-osd", "-c", self.conf_path, "-i", osd_id, "--mkfs", "--mkkey",
                  "--osd-uuid", osd_uuid, "--no-mon-config")
        self.ceph("auth", "add", f"osd.{osd_id}", "osd", "allow *", "mon",
                  "allow profile osd", "-i", str(self.root / "osd" / "keyring"))
        self._spawn(f"osd.{osd_id}", "ceph-osd", "-f", "-c", self.conf_path, "-i", osd_id)
        self.ceph("osd", "pool", "create", self.pool, "8", "8")
        self.ceph("osd", "pool", "set", self.pool, "size", "1", "--yes-i-really-mean-it")
        self.ceph("osd", "pool", "application", "enable", self.pool, "rbd")
        self._wait_writable()
        self.startup_seconds = time.monotonic() - started

    def stop(self) -> None:
        """Stop every daemon by PID (SIGTERM, then SIGKILL), then remove the directory."""
        for process in reversed(list(self._processes.values())):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
        self._processes.clear()
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def kill(self) -> None:
        """Ceph gone without warning (the daemons SIGKILLed); the files stay until stop()."""
        for process in self._processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes.values() if p.poll() is None]

    # -- commands --

    def ceph(self, *args: str, timeout: float = 30) -> str:
        return self._run("ceph", "-c", self.conf_path, "--connect-timeout", "10", *args,
                         timeout=timeout)

    def rbd(self, *args: str, timeout: float = 30) -> str:
        return self._run("rbd", "-c", self.conf_path, "-p", self.pool, *args, timeout=timeout)

    def log_tail(self, name: str, size: int = 3000) -> str:
        log = self.root / "log" / f"{name}.log"
        return log.read_text(errors="replace")[-size:] if log.exists() else ""

    # -- internals --

    def _write_conf(self) -> None:
        root = self.root
        self.conf_path.write_text(f"""[global]
fsid = {self.fsid}
mon host = v1:{self.mon_address}
ms bind msgr2 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = {self.keyring_path}
run dir = {root}/run
admin socket = {root}/run/$name.$pid.asok
log file = {root}/log/$name.log
pid file = {root}/run/$name.pid
mon data = {root}/mon/$name
osd data = {root}/osd
osd objectstore = memstore
memstore device bytes = {self.memstore_bytes}
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon allow pool delete = true
osd crush chooseleaf type = 0
mon warn on pool no redundancy = false
osd client watch timeout = 5
osd max object name len = 256
osd max object namespace len = 64
rbd default features = layering, exclusive-lock, object-map, fast-diff, deep-flatten

[osd]
keyring = {root}/osd/keyring
""")

    def _run(self, *argv: object, timeout: float = 60) -> str:
        args = [str(a) for a in argv]
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:4])} ... failed ({result.returncode}): "
                               f"{(result.stderr or result.stdout).strip()[-2000:]}")
        return result.stdout

    def _spawn(self, name: str, *argv: object) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        self._processes[name] = subprocess.Popen(
            [str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def _wait_writable(self, timeout: float = 60) -> None:
        """The pool takes writes once its PGs are active: write one object to find out."""
        deadline = time.monotonic() + timeout
        probe = self.root / "run" / "probe"
        probe.write_bytes(b"labmetal")
        while True:
            for name, process in self._processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited ({process.returncode}):\n"
                                       f"{self.log_tail(name)}")
            try:
                self._run("rados", "-c", self.conf_path, "-p", self.pool, "put", "probe",
                          probe, "--rados-osd-op-timeout", "2", timeout=10)
                self._run("rados", "-c", self.conf_path, "-p", self.pool, "rm", "probe",
                          timeout=10)
                return
            except (RuntimeError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the pool {self.pool} is not writable after "
                                       f"{timeout} s:\n{self.ceph('status')}") from None
                time.sleep(0.3)
