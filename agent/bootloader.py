"""Local BIOS boot for a partition image: kernel and initrd in the root filesystem's /boot,
extlinux installed in /boot/extlinux, syslinux's MBR code in the disk's first sector.

The kernel gets ``root=PARTUUID=<disk signature>-01``. The kernel resolves PARTUUID on its
own, without an initramfs, and it does not care what the disk is called on the booted
system (sda on SATA, vda on virtio, nvme0n1 on NVMe; the name in the deploy ramdisk may
differ again). ``root=/dev/sda1`` is right only on some PCs; ``root=UUID=`` (of the
filesystem) needs an initramfs to resolve it.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import requests

from labmetal.agent import fetch
from labmetal.agent.tools import run
from labmetal.agent.partition import RootPartition

MBR_CODE = Path("/usr/lib/syslinux/mbr/mbr.bin")
MBR_CODE_AREA = 440  # boot code; the disk signature and the partition table follow it
KERNEL, INITRD = "boot/vmlinuz", "boot/initrd.img"
CONFIG_DIR = "boot/extlinux"


def install(session: requests.Session, device: str, root: RootPartition, kernel_url: str,
            ramdisk_url: str, kernel_cmdline: str) -> dict:
    with mounted(root.node) as filesystem:
        config_dir = _directory(filesystem, CONFIG_DIR)
        kernel_bytes = fetch.download(session, kernel_url, _replaceable(filesystem / KERNEL))
        initrd_bytes = fetch.download(session, ramdisk_url, _replaceable(filesystem / INITRD))
        _replaceable(config_dir / "extlinux.conf").write_text(
            extlinux_config(root.partuuid, kernel_cmdline))
        run(["extlinux", "--install", str(config_dir)])
    write_mbr_code(device)
    return {"root": f"PARTUUID={root.partuuid}", "kernel_bytes": kernel_bytes,
            "initrd_bytes": initrd_bytes}


def extlinux_config(partuuid: str, kernel_cmdline: str) -> str:
    """Consoles on screen and serial port, unless the given command line chooses its own."""
    consoles = "" if "console=" in kernel_cmdline else "console=tty0 console=ttyS0,115200n8"
    append = f"root=PARTUUID={partuuid} ro {consoles} {kernel_cmdline}"
    return (
        "# written by labmetal\n"
        "SERIAL 0 115200\n"
        "DEFAULT labmetal\n"
        "PROMPT 0\n"
        "TIMEOUT 0\n"
        "LABEL labmetal\n"
        f"  LINUX /{KERNEL}\n"
        f"  INITRD /{INITRD}\n"
        f"  APPEND {' '.join(append.split())}\n"
    )


def write_mbr_code(device: str) -> None:
    code = MBR_CODE.read_bytes()
    if len(code) > MBR_CODE_AREA:
        raise RuntimeError(f"{MBR_CODE} is {len(code)} bytes, more than the MBR's code area")
    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, code, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def mounted(node: str) -> Iterator[Path]:
    mountpoint = Path(tempfile.mkdtemp(prefix="labmetal-root-"))
    try:
        run(["mount", node, str(mountpoint)])
        try:
            yield mountpoint
        finally:
            run(["umount", str(mountpoint)])
    finally:
        if not os.path.ismount(mountpoint):
            mountpoint.rmdir()


def _directory(filesystem: Path, relative: str) -> Path:
    """A directory inside the image; a symlink there could point into the ramdisk's own files."""
    path = filesystem
    for part in Path(relative).parts:
        path = path / part
        if path.is_symlink():
            raise RuntimeError(f"/{path.relative_to(filesystem)} is a symlink in the image")
        path.mkdir(exist_ok=True)
    return path


def _replaceable(path: Path) -> Path:
    """Remove what is there first: writing through an image's symlink would land elsewhere.
    (Its directory was checked by ``_directory``.)"""
    if path.is_symlink() or path.exists():
        path.unlink()
    return path
