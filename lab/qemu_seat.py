"""QEMU seats: a PC of the simulated lab as a QEMU guest (TCG) whose NIC is a tap on the
room's bridge and whose firmware is SeaBIOS + iPXE (the virtio NIC's option ROM), so a
seat goes through a real DHCP, iPXE and HTTP boot. Powered by a virtual BMC or a Wake-on-
LAN listener like any Machine."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from labmetal.lab.machine import SeatPower
from labmetal.lab.network import in_namespace

QEMU = "qemu-system-x86_64"
QMP_SOCKET = "qmp.sock"  # in the seat's state dir, QEMU's working directory
# iPXE exits to the next boot device when labmetal has nothing to do (or the node is
# active): network first, then the disk, as on a lab PC.
BOOT_ORDER = {"network": "nc", "pxe": "nc", "disk": "c", "hd": "c"}


@dataclass(frozen=True)
class QemuSeatSpec:
    name: str
    namespace: str  # the room's namespace: the tap is there, so QEMU runs there
    tap: str
    mac: str
    disk: str  # a raw (sparse) file: the PC's virtio disk
    state_dir: str  # console.log, qemu.log and the QMP socket
    memory_mib: int = 1024  # the deploy ramdisk (31 MiB zstd, python3 inside) needs room
    bmc_port: int | None = None


class QemuSeat(SeatPower):
    """The state reported follows the QEMU process: a guest that powers itself off ends
    the process, a guest reboot does not.

    Hard power off and reset go through QMP (``quit``, ``system_reset``); the boot device
    becomes QEMU's ``-boot order`` at the next power on, or at a reset (which then starts a
    new QEMU, as the order of a running QEMU is fixed)."""

    def __init__(self, spec: QemuSeatSpec):
        super().__init__(spec.name, spec.state_dir)
        self.spec = spec
        self._process: subprocess.Popen | None = None
        self._order = ""  # the boot order the running QEMU was started with

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def is_on(self) -> bool:
        return self.pid is not None

    def argv(self, order: str) -> list[str]:
        spec = self.spec
        return in_namespace(spec.namespace, [
            QEMU, "-accel", "tcg", "-name", spec.name, "-m", str(spec.memory_mib),
            "-nographic", "-nodefaults",
            "-chardev", f"file,id=console,path={self.console_log},append=on",
            "-serial", "chardev:console",
            "-qmp", f"unix:{QMP_SOCKET},server=on,wait=off",
            "-netdev", f"tap,id=nic,ifname={spec.tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=nic,mac={spec.mac}",
            "-drive", f"file={spec.disk},format=raw,if=virtio",
            "-boot", f"order={order}"])

    def _wanted_order(self) -> str:
        return BOOT_ORDER.get(self.boot_device, "nc")

    def _start(self) -> None:
        with self._lock:
            if self.is_on():
                return
            order = self._wanted_order()
            state_dir = Path(self.spec.state_dir)
            (state_dir / QMP_SOCKET).unlink(missing_ok=True)
            with open(state_dir / "qemu.log", "ab") as log:
                # QEMU keeps its own copy: the file may be closed here.
                self._process = subprocess.Popen(
                    self.argv(order), cwd=state_dir, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True)
            self._order = order

    def _stop(self) -> None:
        with self._lock:
            process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        try:
            qmp(process.pid, "quit")
            process.wait(timeout=10)
        except (OSError, ValueError, RuntimeError, subprocess.TimeoutExpired):
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def _reset(self) -> None:
        pid = self.pid
        if pid is not None and self._order == self._wanted_order():
            try:
                qmp(pid, "system_reset")
                return
            except (OSError, ValueError, RuntimeError):
                pass  # a QEMU that does not answer is switched off and on instead
        self._stop()
        self._start()


def qmp(pid: int, command: str, arguments: dict | None = None, timeout: float = 5.0) -> None:
    """One QMP command to the QEMU of ``pid``. The socket is reached through QEMU's working
    directory: a state dir deep in /tmp would not fit a socket address (107 bytes)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(f"/proc/{pid}/cwd/{QMP_SOCKET}")
        replies = sock.makefile("rb")
        json.loads(replies.readline())  # the greeting
        for execute, args in (("qmp_capabilities", None), (command, arguments)):
            message = {"execute": execute, **({"arguments": args} if args else {})}
            sock.sendall(json.dumps(message).encode() + b"\n")
            while True:
                line = replies.readline()
                if not line:
                    if execute == "quit":
                        return  # QEMU may close before it answers
                    raise RuntimeError(f"QEMU closed QMP during {execute}")
                reply = json.loads(line)
                if "event" not in reply:
                    break
            if "error" in reply:
                raise RuntimeError(f"QMP {execute}: {reply['error'].get('desc')}")


# What a person at the seat types: QMP send-key to the PC's PS/2 keyboard, which the BIOS
# (and iPXE's prompts and menus through it) reads.
_QCODES = {" ": "spc", "-": "minus", ".": "dot", "\n": "ret", "/": "slash", ",": "comma",
           "=": "equal", ";": "semicolon", "'": "apostrophe"}
_SHIFTED = {"_": "minus", "@": "2", "!": "1", ":": "semicolon"}


def seat_qemu_pid(state_dir: str | Path) -> int | None:
    """The running QEMU of the seat whose state dir (QEMU's working directory) this is."""
    wanted = Path(state_dir).resolve()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if proc.joinpath("cwd").resolve() == wanted and \
                    proc.joinpath("comm").read_text().startswith("qemu-system"):
                return int(proc.name)
        except OSError:
            continue
    return None


def type_text(state_dir: str | Path, text: str, pause: float = 0.15) -> None:
    """Type ``text`` on the seat's keyboard, one key (with shift if needed) at a time."""
    pid = seat_qemu_pid(state_dir)
    if pid is None:
        raise RuntimeError(f"no QEMU is running for {state_dir}")
    for char in text:
        if char.isalnum() and char.isascii():
            keys = ["shift", char.lower()] if char.isupper() else [char]
        elif char in _QCODES:
            keys = [_QCODES[char]]
        elif char in _SHIFTED:
            keys = ["shift", _SHIFTED[char]]
        else:
            raise ValueError(f"cannot type {char!r}")
        qmp(pid, "send-key", {"keys": [{"type": "qcode", "data": key} for key in keys]})
        time.sleep(pause)
