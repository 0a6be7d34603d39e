"""What the seat is made of: CPUs, memory, disks, NICs and boot mode, as sent to labmetal.

Field names follow Ironic's agent inventory where it has one. Disks come from pyudev,
whose udev properties (ID_MODEL, ID_SERIAL_SHORT, ID_WWN) exist only where udevd runs;
without it the sysfs attributes some drivers publish are used, and a field neither
source knows is null and named in the disk's ``unknown`` list, never guessed.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyudev

from labmetal.agent.disk import size_of

LOG = logging.getLogger(__name__)

ARPHRD_LOOPBACK = "772"
MIN_INSTALL_DISK = 4 * 1024 ** 3  # Ironic's default root device: the smallest disk above 4 GiB

# udev property first, then sysfs attributes (relative to the disk's sysfs directory).
_IDENTIFIERS = {
    "model": ("ID_MODEL", ("device/model",)),
    "serial": ("ID_SERIAL_SHORT", ("serial", "device/serial")),
    "wwn": ("ID_WWN", ("wwid", "device/wwid")),
}


@dataclass
class Cpu:
    count: int
    model_name: str | None
    architecture: str


@dataclass
class Memory:
    total: int  # bytes, as the kernel sees it (MemTotal)


@dataclass
class Disk:
    name: str  # device node, or the file's path for a file disk
    size: int
    kind: str  # "disk" or "file"
    rotational: bool | None = None
    removable: bool | None = None
    read_only: bool | None = None
    model: str | None = None
    serial: str | None = None
    wwn: str | None = None
    unknown: list[str] = field(default_factory=list)


@dataclass
class Interface:
    name: str
    mac_address: str
    ipv4_addresses: list[str] | None  # None: `ip` could not tell
    has_carrier: bool | None  # None: the link is down, the kernel cannot tell


@dataclass
class Inventory:
    cpu: Cpu
    memory: Memory
    disks: list[Disk]
    interfaces: list[Interface]
    boot: dict[str, str]
    install_disk: str | None  # the disk images are written to

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def macs(self) -> list[str]:
        return [interface.mac_address for interface in self.interfaces]


def collect(disk: str | None = None, interfaces: list[str] | None = None) -> Inventory:
    """``disk`` is the install target if given (a block device or a plain file)."""
    context = pyudev.Context()
    disks = block_disks(context, keep=disk)
    if disk is not None and os.path.realpath(disk) not in {os.path.realpath(d.name) for d in disks}:
        disks.append(file_disk(disk))
    return Inventory(cpu=cpu(), memory=memory(), disks=disks,
                     interfaces=network_interfaces(context, interfaces),
                     boot={"current_boot_mode": "uefi" if Path("/sys/firmware/efi").exists()
                           else "bios"},
                     install_disk=disk or pick_install_disk(disks))


def cpu() -> Cpu:
    model = None
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
            break
    return Cpu(count=os.cpu_count() or 0, model_name=model, architecture=platform.machine())


def memory() -> Memory:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return Memory(total=int(line.split()[1]) * 1024)
    raise RuntimeError("/proc/meminfo has no MemTotal")


def block_disks(context: pyudev.Context, keep: str | None = None) -> list[Disk]:
    """Physical disks: virtual block devices (loop, zram, ram, dm) are left out unless ``keep``
    names one, and so are empty ones."""
    keep = keep and os.path.realpath(keep)
    disks = []
    for device in context.list_devices(subsystem="block", DEVTYPE="disk"):
        size = int(_attribute(device, "size") or 0) * 512  # sysfs counts 512-byte sectors
        virtual = "/devices/virtual/" in device.sys_path and device.device_node != keep
        if virtual or not size or not device.device_node:
            continue
        disk = Disk(name=device.device_node, size=size, kind="disk",
                    rotational=_flag(device, "queue/rotational"),
                    removable=_flag(device, "removable"), read_only=_flag(device, "ro"))
        for name, (udev_property, sysfs_attributes) in _IDENTIFIERS.items():
            value = device.properties.get(udev_property) or next(
                filter(None, (_attribute(device, a) for a in sysfs_attributes)), None)
            setattr(disk, name, value)
        disk.unknown = [name for name in ("rotational", "removable", "read_only", *_IDENTIFIERS)
                        if getattr(disk, name) is None]
        disks.append(disk)
    return disks


def file_disk(path: str) -> Disk:
    """A test seat's disk file: only its size is known."""
    return Disk(name=path, size=size_of(path), kind="file",
                unknown=["rotational", "removable", "read_only", *_IDENTIFIERS])


def pick_install_disk(disks: list[Disk]) -> str | None:
    candidates = [d for d in disks if d.kind == "disk" and not d.removable and not d.read_only
                  and d.size >= MIN_INSTALL_DISK]
    return min(candidates, key=lambda d: d.size).name if candidates else None


def network_interfaces(context: pyudev.Context, names: list[str] | None) -> list[Interface]:
    """Every non-loopback interface, or only ``names``."""
    addresses = _ipv4_addresses()
    found = []
    for device in context.list_devices(subsystem="net"):
        if names and device.sys_name not in names:
            continue
        if not names and _attribute(device, "type") == ARPHRD_LOOPBACK:
            continue
        carrier = _attribute(device, "carrier")
        found.append(Interface(
            name=device.sys_name, mac_address=(_attribute(device, "address") or "").lower(),
            ipv4_addresses=None if addresses is None else addresses.get(device.sys_name, []),
            has_carrier=None if carrier is None else carrier == "1"))
    missing = set(names or ()) - {interface.name for interface in found}
    if missing:
        LOG.warning("no such network interface: %s", ", ".join(sorted(missing)))
    return found


def _ipv4_addresses() -> dict[str, list[str]] | None:
    try:
        listing = json.loads(subprocess.run(["ip", "-j", "-4", "address", "show"],
                                            capture_output=True, check=True, text=True).stdout)
    except (OSError, subprocess.CalledProcessError, ValueError) as error:
        LOG.warning("cannot list IPv4 addresses: %s", error)
        return None
    return {link["ifname"]: [a["local"] for a in link.get("addr_info", ())] for link in listing}


def _attribute(device: pyudev.Device, name: str) -> str | None:
    value = device.attributes.get(name)  # None when absent or unreadable
    text = value.decode(errors="replace").strip() if value is not None else ""
    return text or None


def _flag(device: pyudev.Device, name: str) -> bool | None:
    value = _attribute(device, name)
    return None if value is None else value == "1"
