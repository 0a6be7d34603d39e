"""Local boot for a partition image: kernel and initrd in the root filesystem's /boot, then
* BIOS: extlinux installed in /boot/extlinux, syslinux's MBR code in the disk's first sector;
* UEFI: the EFI system partition's removable-media path ``EFI/BOOT/BOOTX64.EFI`` holds a
  signed shim, next to it the signed GRUB that shim loads (``grubx64.efi``) and the
  ``grub.cfg`` that GRUB reads, in its built-in prefix (``EFI/debian``) and beside it.
  The image's own copies are used when it carries them (a Debian image with shim-signed
  and grub-efi-amd64-signed installed: SIGNED_LOADERS), so the OS boots with Secure Boot
  on and keeps its own versions;
  otherwise the deploy ramdisk's (Debian's, the same packages). Under Secure Boot the
  kernel must be signed (Debian's are); without Secure Boot any kernel boots. No firmware
  boot entry is written: the PC's boot order stays network first, labmetal sends it to its
  disk, and firmware boots the disk through its removable-media path.

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
from labmetal.agent.partition import EspPartition, RootPartition

MBR_CODE = Path("/usr/lib/syslinux/mbr/mbr.bin")
# In the image, as Debian's packages install them; in the ramdisk, as its builder puts them.
SIGNED_LOADERS = {"shim": "usr/lib/shim/shimx64.efi.signed",
                  "grub": "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed"}
RAMDISK_LOADERS = {"shim": Path("/usr/lib/labmetal/efi/shimx64.efi"),
                   "grub": Path("/usr/lib/labmetal/efi/grubx64.efi")}
EFI_DIR = "EFI/BOOT"
DEBIAN_DIR = "EFI/debian"  # the prefix built into Debian's signed GRUB
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


def install_uefi(session: requests.Session, esp: EspPartition, root: RootPartition,
                 kernel_url: str, ramdisk_url: str, kernel_cmdline: str) -> dict:
    with mounted(root.node) as filesystem:
        _directory(filesystem, "boot")
        kernel_bytes = fetch.download(session, kernel_url, _replaceable(filesystem / KERNEL))
        initrd_bytes = fetch.download(session, ramdisk_url, _replaceable(filesystem / INITRD))
        loaders, source = _efi_loaders(filesystem)
    filesystem_uuid = run(["blkid", "--probe", "--output", "value", "--match-tag", "UUID",
                           root.node]).strip()
    config = grub_config(filesystem_uuid, root.partuuid, kernel_cmdline).encode()
    # mtools writes the FAT file system itself: no kernel FAT driver, no mount.
    with tempfile.TemporaryDirectory(prefix="labmetal-efi-") as staging:
        files = {"BOOTX64.EFI": loaders["shim"], "grubx64.efi": loaders["grub"],
                 "grub.cfg": config}
        for name, content in files.items():
            Path(staging, name).write_bytes(content)
        run(["mmd", "-i", esp.node, "::/EFI", f"::/{EFI_DIR}", f"::/{DEBIAN_DIR}"])
        run(["mcopy", "-o", "-i", esp.node, *(str(Path(staging, name)) for name in files),
             f"::/{EFI_DIR}/"])
        # Debian's signed GRUB reads its prefix (/EFI/debian) first; from the fallback next
        # to itself only after searching every disk for /.disk/info, where an installer
        # stick left in the PC would win.
        run(["mcopy", "-o", "-i", esp.node, str(Path(staging, "grub.cfg")),
             f"::/{DEBIAN_DIR}/"])
    return {"root": f"PARTUUID={root.partuuid}", "kernel_bytes": kernel_bytes,
            "initrd_bytes": initrd_bytes, "boot_loader": f"shim and GRUB from {source}"}


def _efi_loaders(filesystem: Path) -> tuple[dict[str, bytes], str]:
    """The image's own signed shim and GRUB if it has both (regular files: a symlink could
    point into the ramdisk), else the ramdisk's."""
    own = {name: filesystem / path for name, path in SIGNED_LOADERS.items()}
    if all(path.is_file() and not path.is_symlink() for path in own.values()):
        return {name: path.read_bytes() for name, path in own.items()}, "the image"
    if not all(path.is_file() for path in RAMDISK_LOADERS.values()):
        wanted = ", ".join(SIGNED_LOADERS.values())
        raise RuntimeError(f"the image carries no signed shim and GRUB ({wanted}) and this "
                           "ramdisk has none either")
    return ({name: path.read_bytes() for name, path in RAMDISK_LOADERS.items()},
            "the deploy ramdisk")


def grub_config(filesystem_uuid: str, partuuid: str, kernel_cmdline: str) -> str:
    """GRUB finds the root file system by its UUID (disk numbering differs between PCs),
    the kernel its root by PARTUUID, as on BIOS."""
    return (
        "# written by labmetal\n"
        "set timeout=0\n"
        f"search --no-floppy --fs-uuid --set=root {filesystem_uuid}\n"
        f"linux /{KERNEL} {_append(partuuid, kernel_cmdline)}\n"
        f"initrd /{INITRD}\n"
        "boot\n"
    )


def _append(partuuid: str, kernel_cmdline: str) -> str:
    """Consoles on screen and serial port, unless the given command line chooses its own."""
    consoles = "" if "console=" in kernel_cmdline else "console=tty0 console=ttyS0,115200n8"
    return " ".join(f"root=PARTUUID={partuuid} ro {consoles} {kernel_cmdline}".split())


def extlinux_config(partuuid: str, kernel_cmdline: str) -> str:
    return (
        "# written by labmetal\n"
        "SERIAL 0 115200\n"
        "DEFAULT labmetal\n"
        "PROMPT 0\n"
        "TIMEOUT 0\n"
        "LABEL labmetal\n"
        f"  LINUX /{KERNEL}\n"
        f"  INITRD /{INITRD}\n"
        f"  APPEND {_append(partuuid, kernel_cmdline)}\n"
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
