"""The lab's UEFI test OS images: a UEFI seat, with Secure Boot on or off, boots them and says
on its serial port which image it is and its MAC address.

Secure Boot is OVMF's secboot build with Microsoft's keys enrolled (as on a room PC bought
with Windows): it starts only what Microsoft's UEFI CA signed, here Debian's shim, which
then starts only what Debian signed (GRUB, the kernel); the kernel, locked down, loads only
signed modules. So a MAC on the marker line also proves that the NIC's module loaded.

The images are built once per module, in LABMETAL_OSIMAGE_CACHE if set (kept across runs),
else in a temporary cache removed afterwards. Seats boot copies, never the cache's files.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from labmetal.agent.partition import START
from labmetal.lab import osimage
from labmetal.lab.osimage import (MissingToolError, PartitionImage, WholeDiskImage,
                                  build_partition, build_whole_disk, marker_line)
from tests.test_osimage import boot_console
from tests.test_osimage import cache  # noqa: F401  (the same module-wide cache fixture)

MAC = "52:54:00:aa:bb:cd"
WHOLE_DISK_NAME, PARTITION_NAME = "lab-uefi-whole", "lab-uefi-part"
OVMF = Path("/usr/share/OVMF")
SECURE_BOOT = ["-machine", "q35,smm=on", "-global", "driver=cfi.pflash01,property=secure,value=on"]
ROOT_GUID = "0a1b2c3d-4e5f-4a6b-8c7d-8e9fa0b1c2d3"  # the agent-like layout's partition 2
ESP_SIZE = 32 * osimage.MIB


@pytest.fixture(scope="module")
def whole_disk(cache: Path) -> WholeDiskImage:
    return build_whole_disk(WHOLE_DISK_NAME, cache, firmware="uefi")


@pytest.fixture(scope="module")
def partition(cache: Path) -> PartitionImage:
    return build_partition(PARTITION_NAME, cache, firmware="uefi")


@pytest.fixture
def scratch() -> Iterator[Path]:
    """Seat disks, firmware variables and serial logs, removed after the test."""
    with tempfile.TemporaryDirectory(prefix="labmetal-osimage-uefi-") as directory:
        yield Path(directory)


def firmware(scratch: Path, secure_boot: bool) -> list[str]:
    """OVMF's code (read-only) and a copy of its variables: the seat's own NVRAM. With
    Secure Boot, the secboot build (it needs SMM) and variables with Microsoft's keys."""
    code, variables = (("OVMF_CODE_4M.secboot.fd", "OVMF_VARS_4M.ms.fd") if secure_boot
                       else ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"))
    if not (OVMF / code).exists():
        pytest.fail(f"no {OVMF / code}: apt-get install ovmf")
    shutil.copyfile(OVMF / variables, scratch / "OVMF_VARS.fd")
    return [*(SECURE_BOOT if secure_boot else ["-machine", "q35"]),
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF / code}",
            "-drive", f"if=pflash,format=raw,unit=1,file={scratch / 'OVMF_VARS.fd'}"]


def nvme(disk: Path) -> list[str]:
    return ["-drive", f"file={disk},if=none,id=d0,format=raw",
            "-device", "nvme,serial=lm0,drive=d0,bootindex=0"]


def ahci(disk: Path) -> list[str]:
    return ["-drive", f"file={disk},if=none,id=d0,format=raw", "-device", "ahci,id=ahci",
            "-device", "ide-hd,drive=d0,bus=ahci.0,bootindex=0"]


def boot(scratch: Path, nic: str, *qemu_args: str) -> tuple[str, str]:
    """A UEFI seat whose NIC has no option ROM (no PXE attempt: the disk is the only boot
    entry): its marker line and the console before it."""
    return boot_console(scratch, f"{nic},romfile=", *qemu_args, mac=MAC)


def test_a_secure_boot_seat_boots_the_uefi_whole_disk_image_from_nvme(whole_disk, scratch):
    """shim (Microsoft-signed) -> GRUB -> kernel (Debian-signed), locked down; e1000e, the
    room PCs' Intel NIC, is a module: the MAC on the line says it was loaded."""
    disk = scratch / "seat-disk.img"
    shutil.copyfile(whole_disk.path, disk)
    line, console = boot(scratch, "e1000e", *firmware(scratch, secure_boot=True), *nvme(disk))
    assert "EFI stub: UEFI Secure Boot is enabled." in console
    assert "secureboot: Secure boot enabled" in console
    assert "Kernel is locked down from EFI Secure Boot" in console
    assert line == marker_line(WHOLE_DISK_NAME, MAC)


def test_a_seat_without_secure_boot_boots_the_same_image_from_ahci(whole_disk, scratch):
    disk = scratch / "seat-disk.img"
    shutil.copyfile(whole_disk.path, disk)
    line, console = boot(scratch, "virtio-net-pci", *firmware(scratch, secure_boot=False),
                         *ahci(disk))
    assert "secureboot: Secure boot disabled" in console
    assert line == marker_line(WHOLE_DISK_NAME, MAC)


def test_the_uefi_whole_disk_image_is_a_gpt_disk_with_the_removable_boot_path(whole_disk,
                                                                             scratch):
    table = subprocess.run(["sgdisk", "--print", str(whole_disk.path)], check=True,
                           capture_output=True, text=True).stdout
    assert re.search(r"^\s+1\s+2048\s+63487\s+30\.0 MiB\s+EF00\s+EFI system partition$",
                     table, re.MULTILINE), table
    listing = subprocess.run(["mdir", "-/", "-b", "-i", f"{whole_disk.path}@@{START}", "::/"],
                             check=True, capture_output=True, text=True,
                             env={**os.environ, "MTOOLS_SKIP_CHECK": "1"}).stdout.split()
    assert sorted(listing) == ["::/EFI/", "::/EFI/BOOT/", "::/EFI/BOOT/BOOTX64.EFI",
                               "::/EFI/BOOT/grubx64.efi", "::/EFI/debian/",
                               "::/EFI/debian/grub.cfg", "::/initrd.img", "::/vmlinuz"]
    for inside, host in (("EFI/BOOT/BOOTX64.EFI", osimage.SHIM),
                         ("EFI/BOOT/grubx64.efi", osimage.GRUB)):
        copy = scratch / Path(inside).name
        subprocess.run(["mcopy", "-i", f"{whole_disk.path}@@{START}", f"::/{inside}",
                        str(copy)], check=True, env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
        assert copy.read_bytes() == host.read_bytes()


def test_the_uefi_partition_image_carries_debians_boot_files_where_the_agent_looks(
        partition, scratch):
    """The paths of a Debian system with shim-signed, grub-efi-amd64-signed and the signed
    kernel installed, read from the filesystem image itself."""
    kernel, initrd = (link_target(partition.rootfs, link) for link in ("vmlinuz", "initrd.img"))
    assert re.fullmatch(r"boot/vmlinuz-6\.\d+\.\d+-\d+-amd64", kernel)
    assert initrd == kernel.replace("vmlinuz", "initrd.img")
    expected = {osimage.ROOTFS_SHIM: osimage.SHIM.read_bytes(),
                osimage.ROOTFS_MOK_MANAGER: osimage.MOK_MANAGER.read_bytes(),
                osimage.ROOTFS_GRUB: osimage.GRUB.read_bytes(),
                kernel: partition.kernel.read_bytes(), initrd: partition.initrd.read_bytes()}
    for path, content in expected.items():
        assert read_from_rootfs(partition.rootfs, path, scratch) == content, path


def test_a_secure_boot_seat_boots_the_uefi_partition_image_installed_as_the_agent_would(
        partition, scratch):
    """What the agent will do, from the image's own files only: a GPT label, an EFI system
    partition with shim and GRUB taken from the root filesystem, the root filesystem in
    partition 2, and a grub.cfg that boots its /vmlinuz with root=PARTUUID=<its GUID>. The
    grub.cfg is beside GRUB, as the agent writes it: GRUB finds it through its $cmdpath
    fallback (the whole-disk image's is in GRUB's prefix, /EFI/debian)."""
    size = partition.rootfs.stat().st_size
    root_start = START + ESP_SIZE
    disk = scratch / "seat-disk.img"
    with open(disk, "wb") as stream:
        stream.truncate(root_start + size + osimage.MIB)
    subprocess.run(["sgdisk", "--clear", f"--new=1:{START // 512}:{root_start // 512 - 1}",
                    "--typecode=1:ef00", f"--new=2:{root_start // 512}:"
                    f"{(root_start + size) // 512 - 1}", "--typecode=2:8304",
                    f"--partition-guid=2:{ROOT_GUID}", str(disk)], check=True,
                   capture_output=True)
    esp = scratch / "esp"
    for path, inside in ((osimage.ROOTFS_SHIM, "EFI/BOOT/BOOTX64.EFI"),
                         (osimage.ROOTFS_GRUB, "EFI/BOOT/grubx64.efi"),
                         (osimage.ROOTFS_MOK_MANAGER, "EFI/BOOT/mmx64.efi")):
        (esp / inside).parent.mkdir(parents=True, exist_ok=True)
        (esp / inside).write_bytes(read_from_rootfs(partition.rootfs, path, scratch))
    filesystem = subprocess.run(["blkid", "-o", "value", "-s", "UUID", str(partition.rootfs)],
                                check=True, capture_output=True, text=True).stdout.strip()
    (esp / "EFI" / "BOOT" / "grub.cfg").write_text(
        f"search --no-floppy --fs-uuid --set=root {filesystem}\n"
        f"linux /vmlinuz root=PARTUUID={ROOT_GUID.upper()} ro console=ttyS0,115200n8\n"
        "initrd /initrd.img\nboot\n")
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    subprocess.run(["mkfs.fat", "--offset", str(START // 512), str(disk),
                    str(ESP_SIZE // 1024)], check=True, capture_output=True)
    subprocess.run(["mcopy", "-s", "-i", f"{disk}@@{START}", str(esp / "EFI"), "::/"],
                   check=True, env=env)
    with open(disk, "r+b") as stream, open(partition.rootfs, "rb") as rootfs:
        stream.seek(root_start)
        shutil.copyfileobj(rootfs, stream)
    line, console = boot(scratch, "e1000e", *firmware(scratch, secure_boot=True), *nvme(disk))
    assert "secureboot: Secure boot enabled" in console
    assert line == marker_line(PARTITION_NAME, MAC, root="/dev/nvme0n1p2")


def read_from_rootfs(rootfs: Path, path: str, scratch: Path) -> bytes:
    copy = scratch / "dumped"
    debugfs(rootfs, f"dump /{path} {copy}")
    content = copy.read_bytes()
    copy.unlink()
    return content


def link_target(rootfs: Path, path: str) -> str:
    found = re.search(r'^Fast link dest: "(.*)"$', debugfs(rootfs, f"stat /{path}"), re.MULTILINE)
    assert found, f"/{path} is not a symlink"
    return found.group(1)


def debugfs(rootfs: Path, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, str(rootfs)], check=True,
                          capture_output=True, text=True).stdout


def test_the_firmware_is_in_the_cache_key_and_bios_keys_mean_what_they_did(scratch):
    """Fast: no build. A BIOS image's key is still made of its kind, its name, the cloud
    kernel and the host packages of its tools (and the builder's source), so an entry put
    in the cache under that key is what build_whole_disk returns; the UEFI image's kind
    and kernel differ, so one name gives two entries."""
    cache = scratch / "cache"
    kinds = {"bios": ("whole-disk", "linux-image-cloud-amd64",
                      ["apt", "busybox-static", "dosfstools", "dpkg", "kmod", "mtools",
                       "parted", "syslinux", "syslinux-common"]),
             "uefi": ("whole-disk-uefi", "linux-image-amd64",
                      ["apt", "busybox-static", "dosfstools", "dpkg", "gdisk",
                       "grub-efi-amd64-signed", "kmod", "mtools", "shim-signed"])}
    entries = {}
    for firmware_name, (kind, metapackage, packages) in kinds.items():
        inputs = osimage._Inputs(kind, "keyed", osimage._kernel_package(metapackage),
                                 {package: osimage._installed_version(package)
                                  for package in packages}, {})
        entries[firmware_name] = cache / f"{kind}-keyed-{inputs.key()}"
        entries[firmware_name].mkdir(parents=True)
        (entries[firmware_name] / "build.json").write_text(json.dumps({"kind": kind}))
    messages: list[str] = []
    assert build_whole_disk("keyed", cache, messages.append).path.parent == entries["bios"]
    assert build_whole_disk("keyed", cache, messages.append,
                            firmware="uefi").path.parent == entries["uefi"]
    assert entries["bios"] != entries["uefi"]
    assert all(": reusing " in message for message in messages) and len(messages) == 2


def test_unknown_firmware_and_missing_uefi_tools_fail_before_building(monkeypatch, scratch):
    with pytest.raises(ValueError, match="firmware 'efi'"):
        build_whole_disk(WHOLE_DISK_NAME, scratch / "cache", firmware="efi")
    monkeypatch.setenv("PATH", str(scratch / "empty"))
    with pytest.raises(MissingToolError, match=r"apt-get install .*\bgdisk\b.*\bmtools\b"):
        build_whole_disk(WHOLE_DISK_NAME, scratch / "cache", firmware="uefi")
    with pytest.raises(MissingToolError, match=r"apt-get install .*\be2fsprogs\b"):
        build_partition(PARTITION_NAME, scratch / "cache", firmware="uefi")
    assert not (scratch / "cache").exists()
