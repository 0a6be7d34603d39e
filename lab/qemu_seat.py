"""QEMU seats: a PC of the simulated lab as a QEMU guest (TCG) whose NIC is a tap on the
room's bridge, so a seat goes through a real DHCP, firmware and boot loader. Powered by a
virtual BMC or a Wake-on-LAN listener like any Machine.

Three firmware profiles, as the PCs of a teaching room have them (DESIGN §4, §9):

* ``bios``: SeaBIOS, a virtio NIC whose option ROM is iPXE, a virtio disk;
* ``uefi``: OVMF without Secure Boot on a q35 board, an Intel e1000e NIC (82574L; QEMU's
  iPXE EFI driver is its option ROM), an AHCI (SATA) disk;
* ``secureboot``: OVMF with Secure Boot on and Microsoft's keys enrolled (what a PC
  bought with Windows has), SMM, the firmware's own network driver and PXE client (no
  option ROM: only signed code runs), an NVMe disk.

A UEFI seat keeps its own copy of the firmware's variables (its NVRAM) in its state
directory, as a PC keeps its settings across power cycles.
"""
from __future__ import annotations

import json
import os
import shutil
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
PROFILES = ("bios", "uefi", "secureboot")
OVMF = Path("/usr/share/OVMF")
# (firmware code, the variables a new PC starts with) per UEFI profile
FIRMWARE = {"uefi": (OVMF / "OVMF_CODE_4M.fd", OVMF / "OVMF_VARS_4M.fd"),
            "secureboot": (OVMF / "OVMF_CODE_4M.secboot.fd", OVMF / "OVMF_VARS_4M.ms.fd")}
NVRAM = "OVMF_VARS.fd"  # in the seat's state dir


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
    profile: str = "bios"  # bios | uefi | secureboot

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {', '.join(PROFILES)}: {self.profile!r}")


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
        common = [QEMU, "-accel", "tcg", "-name", spec.name, "-m", str(spec.memory_mib),
                  "-nographic", "-nodefaults",
                  "-chardev", f"file,id=console,path={self.console_log},append=on",
                  "-serial", "chardev:console",
                  "-qmp", f"unix:{QMP_SOCKET},server=on,wait=off",
                  "-netdev", f"tap,id=nic,ifname={spec.tap},script=no,downscript=no"]
        if spec.profile == "bios":
            return in_namespace(spec.namespace, [
                *common, "-device", f"virtio-net-pci,netdev=nic,mac={spec.mac}",
                "-drive", f"file={spec.disk},format=raw,if=virtio", "-boot", f"order={order}"])
        # UEFI: the boot order is the devices' bootindex (OVMF reads it from fw_cfg).
        network_first = order.startswith("n")
        nic_index, disk_index = (1, 2) if network_first else (2, 1)
        code, _ = FIRMWARE[spec.profile]
        machine = ["-machine", "q35"]
        if spec.profile == "secureboot":
            machine = ["-machine", "q35,smm=on",
                       "-global", "driver=cfi.pflash01,property=secure,value=on"]
            nic = f"virtio-net-pci,netdev=nic,mac={spec.mac},romfile=,bootindex={nic_index}"
            disk = ["-device", f"nvme,serial={spec.name[:20]},drive=disk,bootindex={disk_index}"]
        else:
            nic = f"e1000e,netdev=nic,mac={spec.mac},bootindex={nic_index}"
            disk = ["-device", "ahci,id=ahci",
                    "-device", f"ide-hd,drive=disk,bus=ahci.0,bootindex={disk_index}"]
        return in_namespace(spec.namespace, [
            *common, *machine,
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
            "-drive", f"if=pflash,format=raw,unit=1,file={NVRAM}",
            "-device", nic,
            "-drive", f"file={spec.disk},format=raw,if=none,id=disk", *disk])

    def _nvram(self) -> None:
        """A UEFI seat's variables, made from the profile's template at its first power-on
        and kept (a PC keeps its firmware settings)."""
        if self.spec.profile in FIRMWARE:
            nvram = Path(self.spec.state_dir) / NVRAM
            if not nvram.exists():
                shutil.copyfile(FIRMWARE[self.spec.profile][1], nvram)

    def _wanted_order(self) -> str:
        return BOOT_ORDER.get(self.boot_device, "nc")

    def _start(self) -> None:
        with self._lock:
            if self.is_on():
                return
            order = self._wanted_order()
            state_dir = Path(self.spec.state_dir)
            (state_dir / QMP_SOCKET).unlink(missing_ok=True)
            self._nvram()
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
_SHIFTED = {"_": "minus", "@": "2", "!": "1", ":": "semicolon", ">": "dot", "<": "comma",
            "$": "4", "(": "9", ")": "0", "|": "backslash", "&": "7", "*": "8", "#": "3",
            "%": "5", "+": "equal", '"': "apostrophe"}


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
