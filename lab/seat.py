"""Light seats: a PC of the simulated lab as a process in its own network namespace, with a
sparse file as its disk (lab/firmware.py is what it runs). Powered by a virtual BMC or a
Wake-on-LAN listener like any Machine."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from labmetal.lab.machine import SeatPower
from labmetal.lab.network import in_namespace
from labmetal.lab.qemu_seat import QemuSeat, QemuSeatSpec


@dataclass(frozen=True)
class LightSeatSpec:
    name: str
    namespace: str
    mac: str
    disk: str
    boot_url: str
    state_dir: str
    interface: str = "eth0"
    bmc_port: int | None = None
    dhcp: bool = False  # ask the room's DHCP server for an address at each network boot
    script_attempts: int = 30  # asks for its boot script before it gives up (and is off)
    post_seconds: float = 0.0  # from power-on to its network boot (a PC's POST)

    @staticmethod
    def load_all(path: Path) -> list[LightSeatSpec]:
        return [LightSeatSpec(**entry) for entry in json.loads(Path(path).read_text())]

    @staticmethod
    def save_all(path: Path, specs: list[LightSeatSpec]) -> None:
        Path(path).write_text(json.dumps([asdict(spec) for spec in specs], indent=1))


class LightSeat(SeatPower):
    """The state reported follows the firmware process (shutting down may take seconds:
    the agent stops its exports)."""

    def __init__(self, spec: LightSeatSpec):
        super().__init__(spec.name, spec.state_dir)
        self.spec = spec
        self._process: subprocess.Popen | None = None

    def is_on(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _start(self) -> None:
        with self._lock:
            if self.is_on():
                return
            device = "disk" if self.boot_device in ("hd", "disk") else "network"
            argv = in_namespace(self.spec.namespace, [
                sys.executable, "-m", "labmetal.lab.firmware", "--boot-url", self.spec.boot_url,
                "--mac", self.spec.mac, "--disk", self.spec.disk, "--interface",
                self.spec.interface, "--boot-device", device, "--state-dir", self.spec.state_dir,
                "--script-attempts", str(self.spec.script_attempts),
                "--post-seconds", str(self.spec.post_seconds),
                *(["--dhcp"] if self.spec.dhcp else [])])
            with open(self.console_log, "ab") as console:
                console.write(f"--- power on ({device})\n".encode())
                console.flush()
                self._process = subprocess.Popen(argv, stdout=console, stderr=subprocess.STDOUT,
                                                 start_new_session=True)

    def _stop(self) -> None:
        with self._lock:
            process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGTERM)  # the firmware stops the agent it started
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


SEAT_KINDS: dict[str, type] = {"light": LightSeatSpec, "qemu": QemuSeatSpec}
SeatSpec = LightSeatSpec | QemuSeatSpec


def load_seats(path: Path) -> list[SeatSpec]:
    """A seats file of either kind; entries without ``kind`` are light seats (older files)."""
    specs: list[SeatSpec] = []
    for entry in json.loads(Path(path).read_text()):
        kind = entry.pop("kind", "light")
        if kind not in SEAT_KINDS:
            raise ValueError(f"{path}: unknown seat kind {kind!r} (light or qemu)")
        specs.append(SEAT_KINDS[kind](**entry))
    return specs


def save_seats(path: Path, specs: list[SeatSpec]) -> None:
    Path(path).write_text(json.dumps([{"kind": seat_kind(spec), **asdict(spec)}
                                      for spec in specs], indent=1))


def seat_kind(spec: SeatSpec) -> str:
    return "qemu" if isinstance(spec, QemuSeatSpec) else "light"


def make_seat(spec: SeatSpec) -> LightSeat | QemuSeat:
    return QemuSeat(spec) if isinstance(spec, QemuSeatSpec) else LightSeat(spec)
