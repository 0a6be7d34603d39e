"""The disk layout for a partition image. BIOS: an msdos label with one bootable root
partition sized to the image, starting at 1 MiB (the alignment every current tool uses).
UEFI: a GPT label with an EFI system partition (FAT32, 64 MiB) at 1 MiB, then the root
partition sized to the image.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from labmetal.agent.disk import MIB, partition_node, wait_for_node
from labmetal.agent.tools import run

START = MIB
ESP_SIZE = 64 * MIB  # FAT32 with 512-byte clusters: room for shim, GRUB and spare


@dataclass(frozen=True)
class EspPartition:
    node: str
    start: int
    size: int


@dataclass(frozen=True)
class RootPartition:
    node: str  # its block device, e.g. /dev/sda1 or /dev/loop0p1
    start: int  # bytes from the start of the disk
    size: int
    partuuid: str  # msdos: <disk signature>-<number>, as the kernel reads root=PARTUUID=


@dataclass(frozen=True)
class Layout:
    """What a partition image's write left on the disk, for the boot loader that follows
    (in another command: the disk is attached again, and may get other device nodes)."""
    boot_mode: str  # bios | uefi
    esp: EspPartition | None
    root: RootPartition

    @property
    def root_number(self) -> int:
        return 2 if self.esp is not None else 1

    def on(self, device: str) -> tuple[EspPartition | None, RootPartition]:
        """The partitions again, with their nodes on ``device`` as attached now."""
        root = RootPartition(node=partition_node(device, self.root_number),
                             start=self.root.start, size=self.root.size,
                             partuuid=self.root.partuuid)
        wait_for_node(root.node)
        if self.esp is None:
            return None, root
        esp = EspPartition(node=partition_node(device, 1), start=self.esp.start,
                           size=self.esp.size)
        wait_for_node(esp.node)
        return esp, root


def disk_needed(image_size: int, boot_mode: str = "bios") -> int:
    esp = ESP_SIZE if boot_mode == "uefi" else 0
    return START + esp + _align(image_size) + (MIB if boot_mode == "uefi" else 0)  # GPT backup


def make_uefi_layout(device: str, image_size: int) -> tuple[EspPartition, RootPartition]:
    """GPT: partition 1 the EFI system partition (formatted here), 2 the root partition,
    whose PARTUUID (a GPT partition's own GUID) the kernel resolves without an initramfs."""
    size = _align(image_size)
    root_start = START + ESP_SIZE
    run(["parted", "--script", "--align", "none", device, "unit", "B", "mklabel", "gpt",
         "mkpart", "ESP", "fat32", f"{START}B", f"{root_start - 1}B", "set", "1", "esp", "on",
         "mkpart", "root", "ext4", f"{root_start}B", f"{root_start + size - 1}B"])
    esp, root = partition_node(device, 1), partition_node(device, 2)
    for node in (esp, root):
        wait_for_node(node)
    run(["mkfs.fat", "-F", "32", "-s", "1", "-n", "EFI", esp])
    partuuid = run(["blkid", "--probe", "--output", "value", "--match-tag", "PART_ENTRY_UUID",
                    root]).strip()
    return (EspPartition(node=esp, start=START, size=ESP_SIZE),
            RootPartition(node=root, start=root_start, size=size, partuuid=partuuid))


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
