"""The disk layout for a partition image on BIOS: an msdos label with one bootable root partition
sized to the image, starting at 1 MiB (the alignment every current tool uses).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from labmetal.agent.disk import MIB, partition_node, wait_for_node
from labmetal.agent.tools import run

START = MIB


@dataclass(frozen=True)
class RootPartition:
    node: str  # its block device, e.g. /dev/sda1 or /dev/loop0p1
    start: int  # bytes from the start of the disk
    size: int
    partuuid: str  # msdos: <disk signature>-<number>, as the kernel reads root=PARTUUID=


def disk_needed(image_size: int) -> int:
    return START + _align(image_size)


def make_root_partition(device: str, image_size: int) -> RootPartition:
    size = _align(image_size)
    run(["parted", "--script", "--align", "none", device, "unit", "B", "mklabel", "msdos",
         "mkpart", "primary", f"{START}B", f"{START + size - 1}B", "set", "1", "boot", "on"])
    node = partition_node(device, 1)
    wait_for_node(node)
    return RootPartition(node=node, start=START, size=size,
                         partuuid=f"{_disk_signature(device):08x}-01")


def _disk_signature(device: str) -> int:
    """The 32-bit signature parted put at byte 440 of the MBR when it made the label."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return int.from_bytes(os.pread(fd, 4, 440), "little")
    finally:
        os.close(fd)


def _align(size: int) -> int:
    return -(-size // MIB) * MIB
