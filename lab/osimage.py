"""Test OS images for the simulated lab: what a seat boots after a deploy, to prove it worked.

Two kinds, as labmetal deploys them:

* a whole-disk image: an msdos label, one bootable FAT partition with syslinux, the kernel
  and a busybox initramfs whose /init prints a marker line with the image's name (baked in
  at build time) and the seat's MAC address;
* a partition image: an ext4 root filesystem, and its kernel and initrd as separate files.
  The agent writes the filesystem into partition 1, copies the kernel and initrd into its
  /boot and boots them with extlinux and ``root=PARTUUID=<disk signature>-01``. The initrd
  mounts that root and switches to its /sbin/init, which prints the marker with the name
  it reads from the filesystem and the device it was mounted from: the line proves the
  deployed filesystem is what runs.

Either stays up after the marker, like a real OS; a test kills QEMU once it has seen it.
The marker goes to ttyS0 (and to the console, if that is elsewhere).

Everything comes from Debian packages: the cloud kernel (``apt-get download``, unpacked
with ``dpkg-deb``; it boots in about 2 s under TCG) and the host's busybox-static. Nothing
is mounted: parted, mkfs.fat --offset, mcopy and syslinux --offset make the disk,
mkfs.ext4 -d the root filesystem. A build is named by a hash of its inputs (package
versions, the image's name, this file) and kept in a cache directory::

    <cache>/debs/<kernel package>_<version>/*.deb     the kernel package, as downloaded
    <cache>/whole-disk-<name>-<key>/disk.img, build.json
    <cache>/partition-<name>-<key>/rootfs.img, vmlinuz, initrd.img, build.json

Each entry is built in a temporary directory next to it and renamed into place whole.
Timestamps, the FAT volume id, the filesystem UUID and the disk signature are fixed
(derived from the key), so the same inputs give the same bytes; the one exception is the
time syslinux stamps on ldlinux.sys in the whole-disk image's FAT (mtools takes the clock).

UEFI variants (``firmware="uefi"``; "bios", the default, is all of the above) let the lab
prove deploys onto UEFI PCs, with Secure Boot on as well as off. They run Debian's generic
kernel (``linux-image-amd64``, whose image is signed by Debian and so trusted by shim; the
cloud kernel's is not) and its modules, which are signed too: the kernel's lockdown under
Secure Boot loads those and nothing else. shim and GRUB are the host's signed files from
Debian's shim-signed and grub-efi-amd64-signed (their versions go into the key).

* the whole-disk image: a GPT label, one EFI system partition (FAT) from 1 MiB to 1 MiB
  before the end of the 32 MiB disk, with the removable-media path every UEFI firmware
  boots when it has no boot entry for the disk::

      /EFI/BOOT/BOOTX64.EFI    shimx64.efi.signed (signed by Microsoft's UEFI CA)
      /EFI/BOOT/grubx64.efi    grubx64.efi.signed (signed by Debian); shim starts the
                               file of that name beside itself
      /EFI/debian/grub.cfg     ``linux /vmlinuz console=tty0 console=ttyS0,115200n8``,
                               ``initrd /initrd.img``, ``boot``
      /vmlinuz, /initrd.img    the signed kernel; the busybox initramfs printing the marker

  Debian's signed GRUB is one image with its modules built in, its prefix fixed at
  /EFI/debian on the partition it was loaded from, and an embedded config: if $prefix
  exists it sources $prefix/grub.cfg; if not, it first searches every disk for
  /.disk/info (a Debian installer's), sets prefix=($root)/boot/grub and falls back to
  $cmdpath/grub.cfg, the file beside grubx64.efi. Both work here; /EFI/debian/grub.cfg is
  found without the search (which prints two "no such device" errors and would let
  another disk's /.disk/info and /boot/grub/grub.cfg take over). $root stays the EFI
  system partition.
* the partition image: its root filesystem carries, at the paths a Debian system with
  shim-signed, grub-efi-amd64-signed and linux-image-amd64 installed has them, the files
  the agent installs into the seat's EFI system partition (it looks for exactly these)::

      /usr/lib/shim/shimx64.efi.signed                     shim, as /EFI/BOOT/BOOTX64.EFI
      /usr/lib/shim/mmx64.efi.signed                       MokManager, shim's fallback
      /usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed   GRUB, as grubx64.efi beside it
      /boot/vmlinuz-<version>, /boot/initrd.img-<version>  the signed kernel, its initrd
      /vmlinuz, /initrd.img                                symlinks to those, as Debian's

  GRUB reads ext4, so its grub.cfg can load /vmlinuz and /initrd.img from the root
  filesystem; the kernel and initrd are also given as separate files, like the BIOS
  image's. The initrd resolves ``root=PARTUUID=`` on a GPT label (the partition's unique
  GUID) as well as on an msdos one, and carries the drivers of the disks and NICs a UEFI
  seat has (NVMe, AHCI, virtio; e1000e, virtio-net) and ext4's.

Their cache entries are ``whole-disk-uefi-<name>-<key>`` and ``partition-uefi-<name>-<key>``
(the firmware is in the kind, which is in the key). The GPT's disk and partition GUIDs
are derived from the key, and the FAT's label gets a fixed date: their bytes are
reproducible with no exception.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from labmetal.agent.bootloader import MBR_CODE, write_mbr_code
from labmetal.images.host_binaries import MissingLibrary, with_libraries
from labmetal.images.ramdisk import (exclusive_lock, install_file, run_step, select_modules,
                                     write_initramfs)

KERNEL_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX = Path("/bin/busybox")
DEFAULT_CACHE = Path("/var/cache/labmetal/osimage")
RECORD = "build.json"
MIB = 1024 * 1024
PARTITION_START = MIB  # as the agent's partition.START
DISK_SIZE = 32 * MIB  # whole-disk image: kernel 13.5 MiB, initramfs 1 MiB, syslinux
ROOTFS_SIZE = 32 * MIB  # room for the kernel, initrd and extlinux the agent adds to /boot
EPOCH = 1735689600  # 2025-01-01: every timestamp in the images
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
MARKER_PREFIX = "labmetal-os:"

# Tool -> Debian package, per kind of image; the packages' versions go into the key.
COMMON_TOOLS = {"apt-get": "apt", "dpkg-deb": "dpkg", "depmod": "kmod",
                str(BUSYBOX): "busybox-static"}
WHOLE_DISK_TOOLS = {**COMMON_TOOLS, "parted": "parted", "mkfs.fat": "dosfstools",
                    "mcopy": "mtools", "syslinux": "syslinux", str(MBR_CODE): "syslinux-common"}
PARTITION_TOOLS = {**COMMON_TOOLS, "mkfs.ext4": "e2fsprogs", "debugfs": "e2fsprogs"}
# The TP session disk (students' sessions, booted diskless by iSCSI sanboot): the iSCSI
# initiator comes from Debian's open-iscsi, unpacked, not installed; it links against these
# host libraries (their packages' versions go into the key).
SESSION_DISK_TOOLS = {**WHOLE_DISK_TOOLS, "mkfs.ext4": "e2fsprogs", "ldd": "libc-bin",
                      "/usr/lib/x86_64-linux-gnu/libcrypto.so.3": "libssl3",
                      "/usr/lib/x86_64-linux-gnu/libkmod.so.2": "libkmod2",
                      "/usr/lib/x86_64-linux-gnu/libzstd.so.1": "libzstd1",
                      "/usr/lib/x86_64-linux-gnu/liblzma.so.5": "liblzma5",
                      "/usr/lib/x86_64-linux-gnu/libc.so.6": "libc6"}
SESSION_DISK_DOWNLOADS = ("open-iscsi", "libopeniscsiusr")
SESSION_DISK_SIZE = 64 * MIB
SESSION_ROOT_START = 33 * MIB  # partition 1 (FAT: syslinux, kernel, initrd) ends here
SESSION_ROOT_LABEL = "labmetal-tp"
SESSION_MARKER_PREFIX = "labmetal-tp:"
SESSION_MODULES = ("virtio_pci", "virtio_net", "sd_mod", "iscsi_tcp", "iscsi_ibft")
# The Secure Boot variant: Debian's generic kernel (signed), the NICs of UEFI seats, ext4.
SESSION_DISK_UEFI_TOOLS = {tool: package for tool, package in SESSION_DISK_TOOLS.items()
                           if package not in ("syslinux", "syslinux-common", "dosfstools",
                                              "mtools")}
SESSION_UEFI_MODULES = ("virtio_pci", "virtio_net", "e1000e", "e1000", "sd_mod", "iscsi_tcp",
                        "crc32c_generic", "ext4")
SESSION_UEFI_DISK_SIZE = 64 * MIB  # kernel 8 MiB, initrd, busybox: its root holds them all
# What the initramfs loads, if the kernel has it as a module: a NIC for the MAC; the root
# disk and its filesystem for the partition image.
WHOLE_DISK_MODULES = ("virtio_pci", "virtio_net")
PARTITION_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "ext4")

FIRMWARES = ("bios", "uefi")
# UEFI: Debian's generic kernel, signed (the cloud kernel is not), and the host's signed boot
# files. What the initramfs loads: the NICs of VMs and of room PCs (QEMU's e1000e is an
# Intel 82574L) for the MAC; for the partition image also the disks a UEFI seat boots from
# (NVMe, AHCI, virtio) and ext4 with crc32c, which ext4 asks the kernel for at mount time:
# that request runs /sbin/modprobe, which the initramfs does not have.
UEFI_KERNEL_PACKAGE = "linux-image-amd64"
SHIM = Path("/usr/lib/shim/shimx64.efi.signed")
MOK_MANAGER = Path("/usr/lib/shim/mmx64.efi.signed")
GRUB = Path("/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed")
UEFI_BOOT_FILES = {str(SHIM): "shim-signed", str(MOK_MANAGER): "shim-signed",
                   str(GRUB): "grub-efi-amd64-signed"}
UEFI_WHOLE_DISK_TOOLS = {**COMMON_TOOLS, "sgdisk": "gdisk", "mkfs.fat": "dosfstools",
                         "mmd": "mtools", "mcopy": "mtools", **UEFI_BOOT_FILES}
UEFI_PARTITION_TOOLS = {**PARTITION_TOOLS, **UEFI_BOOT_FILES}
UEFI_WHOLE_DISK_MODULES = ("virtio_pci", "virtio_net", "e1000e")
UEFI_PARTITION_MODULES = ("virtio_pci", "virtio_net", "e1000e", "virtio_blk", "nvme", "ahci",
                          "sd_mod", "crc32c_generic", "ext4")
UEFI_DISK_SIZE = 32 * MIB  # whole-disk image: kernel 8 MiB, GRUB 4 MiB, shim 1 MiB, initramfs
UEFI_ROOTFS_SIZE = 64 * MIB  # kernel 8 MiB, GRUB 4 MiB, shim, initrd: 17 MiB, and room for more
# The local TP template (a teacher's Debian install as labmetal's session initramfs boots
# it): the modules that initramfs loads from the template (device-mapper snapshot, ext4,
# the disks of room PCs and VMs) and NICs, so /lib/modules looks like a real one's.
LOCAL_TP_TOOLS = {**PARTITION_TOOLS, "parted": "parted"}
LOCAL_TP_MODULES = ("dm_mod", "dm_snapshot", "ext4", "crc32c_generic", "crc32c_intel",
                    "virtio_pci", "virtio_blk", "nvme", "ahci", "sd_mod", "usb_storage", "uas",
                    "virtio_net", "e1000e")
LOCAL_TP_DISK_SIZE = 64 * MIB  # kernel 8 MiB, its initrd, modules, busybox
EFI_DIR = "EFI/BOOT"  # the removable-media path: \EFI\BOOT\BOOTX64.EFI
GRUB_PREFIX = "EFI/debian"  # built into Debian's signed GRUB: where it reads grub.cfg
# Where the UEFI partition image's root filesystem carries its boot files (see above).
ROOTFS_SHIM = "usr/lib/shim/shimx64.efi.signed"
ROOTFS_MOK_MANAGER = "usr/lib/shim/mmx64.efi.signed"
ROOTFS_GRUB = "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed"
ROOTFS_KERNEL_LINK, ROOTFS_INITRD_LINK = "vmlinuz", "initrd.img"


class MissingToolError(RuntimeError):
    """A tool, package or package list the build needs is not on this machine."""


@dataclass(frozen=True)
class WholeDiskImage:
    path: Path  # raw disk image; copy it before booting, the cache is shared
    name: str
    marker: str  # the start of the marker line: "labmetal-os: image=<name> "


@dataclass(frozen=True)
class SessionDiskImage:
    path: Path  # raw disk image: a TP template's image
    name: str
    marker: str  # the start of the line the OS prints once its iSCSI root is mounted


@dataclass(frozen=True)
class PartitionImage:
    rootfs: Path  # raw ext4 image, for partition 1
    kernel: Path
    initrd: Path
    name: str
    marker: str


def marker_line(image_name: str, mac: str, root: str | None = None) -> str:
    """The exact line a seat prints once booted: ``root`` is the device the partition image's
    root filesystem was mounted from (e.g. /dev/vda1); the whole-disk image has none."""
    where = f" root={root}" if root else ""
    return f"{MARKER_PREFIX} image={image_name} mac={mac.lower()}{where} booted"


def build_whole_disk(name: str, cache_dir: Path | None = None,
                     progress: Callable[[str], None] = print,
                     firmware: str = "bios") -> WholeDiskImage:
    """The whole-disk image called ``name`` for a seat's ``firmware`` ("bios": msdos label
    and syslinux; "uefi": GPT, shim and GRUB, booting with Secure Boot on or off), from the
    cache or built there."""
    if _firmware(firmware) == "uefi":
        entry = _cached("whole-disk-uefi", name, UEFI_WHOLE_DISK_TOOLS, _build_uefi_whole_disk,
                        cache_dir, progress, kernel_package=UEFI_KERNEL_PACKAGE)
    else:
        entry = _cached("whole-disk", name, WHOLE_DISK_TOOLS, _build_whole_disk, cache_dir,
                        progress)
    return WholeDiskImage(entry / "disk.img", name, f"{MARKER_PREFIX} image={name} ")


def build_partition(name: str, cache_dir: Path | None = None,
                    progress: Callable[[str], None] = print,
                    firmware: str = "bios") -> PartitionImage:
    """The partition image called ``name`` for a seat's ``firmware``, from the cache or built
    there. The "uefi" one's root filesystem also carries the signed shim, GRUB and kernel
    the agent installs from (paths in the module's docstring)."""
    if _firmware(firmware) == "uefi":
        entry = _cached("partition-uefi", name, UEFI_PARTITION_TOOLS, _build_uefi_partition,
                        cache_dir, progress, kernel_package=UEFI_KERNEL_PACKAGE)
    else:
        entry = _cached("partition", name, PARTITION_TOOLS, _build_partition, cache_dir,
                        progress)
    return PartitionImage(entry / "rootfs.img", entry / "vmlinuz", entry / "initrd.img", name,
                          f"{MARKER_PREFIX} image={name} ")


def build_session_disk(name: str, cache_dir: Path | None = None,
                       progress: Callable[[str], None] = print,
                       firmware: str = "bios") -> SessionDiskImage:
    """The TP session disk called ``name``: a seat boots it with iPXE's ``sanboot`` from
    the session's iSCSI target; its initramfs logs in to that target again from the iBFT
    (open-iscsi's ``iscsistart``), mounts partition 2 as its root and the OS counts its
    boots in /var/lib/labmetal-tp/counter, on the student's own disk.

    The "uefi" one is for Secure Boot seats, which cannot sanboot: its one partition is
    its ext4 root, whose /boot holds Debian's signed kernel and an initrd that logs in to
    the target named on the kernel command line (the ``iscsi_*`` parameters of Debian's
    open-iscsi initramfs) and mounts ``root=UUID=...``; labmetal finds both there
    (images/boot_files.py) and GRUB boots them (pxe/grub.py)."""
    if _firmware(firmware) == "uefi":
        entry = _cached("session-disk-uefi", name, SESSION_DISK_UEFI_TOOLS,
                        _build_uefi_session_disk, cache_dir, progress,
                        downloads=SESSION_DISK_DOWNLOADS, kernel_package=UEFI_KERNEL_PACKAGE)
        return SessionDiskImage(entry / "disk.img", name,
                                f"{SESSION_MARKER_PREFIX} image={name} ")
    entry = _cached("session-disk", name, SESSION_DISK_TOOLS, _build_session_disk, cache_dir,
                    progress, downloads=SESSION_DISK_DOWNLOADS)
    return SessionDiskImage(entry / "disk.img", name, f"{SESSION_MARKER_PREFIX} image={name} ")


@dataclass(frozen=True)
class LocalTpImage:
    path: Path  # raw whole-disk image: a TP template as a teacher's Debian install looks
    name: str
    marker: str  # the start of the line its /sbin/init prints: "labmetal-tp: image=<name> "


def build_local_tp_disk(name: str, cache_dir: Path | None = None,
                        progress: Callable[[str], None] = print) -> LocalTpImage:
    """The TP template called ``name`` for local-first sessions (issue 16): an msdos label,
    one ext4 partition from 1 MiB (label labmetal-tp) laid out like an ordinary Debian
    install: Debian's signed generic kernel as /boot/vmlinuz-<v> with an initrd of its own
    beside it, a subset of its modules in /lib/modules/<v> with depmod's tables, busybox,
    and a /sbin/init that prints ``labmetal-tp: image=<name> root=<device> booted`` and
    keeps a shell on tty1 and ttyS0. labmetal's session initramfs boots it unchanged."""
    entry = _cached("local-tp", name, LOCAL_TP_TOOLS, _build_local_tp_disk, cache_dir,
                    progress, kernel_package=UEFI_KERNEL_PACKAGE)
    return LocalTpImage(entry / "disk.img", name, f"{SESSION_MARKER_PREFIX} image={name} ")


def local_tp_marker(image_name: str, root: str) -> str:
    """The exact line the local TP template prints once booted from ``root``."""
    return f"{SESSION_MARKER_PREFIX} image={image_name} root={root} booted"


def session_counter_line(image_name: str, mac: str, counter: int) -> str:
    """What the session OS prints after reading its counter (before adding one)."""
    return f"{SESSION_MARKER_PREFIX} image={image_name} mac={mac.lower()} counter={counter}"


def _firmware(firmware: str) -> str:
    if firmware not in FIRMWARES:
        raise ValueError(f"firmware {firmware!r}: one of {', '.join(FIRMWARES)}")
    return firmware


# ---------------------------------------------------------------- the cache

@dataclass(frozen=True)
class _Inputs:
    kind: str
    name: str
    kernel: tuple[str, str]  # the versioned image package the metapackage points to, version
    packages: dict[str, str]  # host package -> version
    downloads: dict[str, str]  # package unpacked into the image (not installed) -> version

    def key(self) -> str:
        digest = hashlib.sha256(json.dumps(
            [self.kind, self.name, self.kernel, self.packages, self.downloads],
            sort_keys=True).encode())
        digest.update(Path(__file__).read_bytes())
        return digest.hexdigest()[:16]


def _cached(kind: str, name: str, tools: dict[str, str],
            build: Callable[[_Inputs, str, Path, Path, Callable[[str], None]], None],
            cache_dir: Path | None, progress: Callable[[str], None],
            downloads: tuple[str, ...] = (), kernel_package: str = KERNEL_PACKAGE) -> Path:
    if not NAME.fullmatch(name):
        raise ValueError(f"image name {name!r}: use letters, digits, '.', '_' and '-' "
                         "(it goes into file names and the boot scripts)")
    missing = sorted({package for tool, package in tools.items()
                      if not (Path(tool).exists() if "/" in tool else shutil.which(tool))})
    if missing:
        raise MissingToolError(f"building the {kind} test image needs these Debian packages: "
                               f"apt-get install {' '.join(missing)}")
    packages = sorted(set(tools.values()))
    inputs = _Inputs(kind, name, _kernel_package(kernel_package),
                     {package: _installed_version(package) for package in packages},
                     {package: _candidate_version(package) for package in downloads})
    key = inputs.key()
    cache = Path(cache_dir or os.environ.get("LABMETAL_OSIMAGE_CACHE") or DEFAULT_CACHE)
    target = cache / f"{kind}-{name}-{key}"
    cache.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(cache / ".lock"):
        if (target / RECORD).is_file():
            progress(f"{kind} image {name} ({key}): reusing {target}")
            return target
        progress(f"{kind} image {name} ({key}): building in {cache}")
        started = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=f".build-{kind}-{name}-", dir=cache))
        try:
            out = work / "out"
            out.mkdir()
            build(inputs, key, work, out, progress)
            record = {"kind": kind, "name": name, "key": key, "kernel": "=".join(inputs.kernel),
                      "packages": inputs.packages,
                      "files": {path.name: {"size": path.stat().st_size,
                                            "sha256": _sha256(path)}
                                for path in sorted(out.iterdir())},
                      "build_seconds": round(time.monotonic() - started, 1)}
            (out / RECORD).write_text(json.dumps(record, indent=2) + "\n")
            out.chmod(0o755)
            out.rename(target)
        finally:
            shutil.rmtree(work)
    progress(f"{kind} image {name} ({key}): built in {record['build_seconds']} s")
    return target


def _kernel_package(metapackage: str) -> tuple[str, str]:
    """The versioned package the metapackage depends on (linux-image-6.1.0-NN-cloud-amd64)
    and its version, from the host's package lists: one apt-cache call, about 0.5 s here."""
    result = subprocess.run(["apt-cache", "show", "--no-all-versions", metapackage],
                            capture_output=True, text=True)
    found = re.search(r"^Depends: .*?(linux-image-\d\S*) \(= (\S+)\)", result.stdout,
                      re.MULTILINE)
    if not found:
        raise MissingToolError(f"apt knows no {metapackage} (run apt-get update): "
                               f"{result.stderr.strip()}")
    return found.group(1), found.group(2)


def _candidate_version(package: str) -> str:
    result = subprocess.run(["apt-cache", "policy", package], capture_output=True, text=True)
    found = re.search(r"^\s*Candidate: (\S+)", result.stdout, re.MULTILINE)
    if not found or found.group(1) == "(none)":
        raise MissingToolError(f"apt knows no {package} (run apt-get update)")
    return found.group(1)


def _installed_version(package: str) -> str:
    result = subprocess.run(["dpkg-query", "--show", "--showformat=${Version}", package],
                            capture_output=True, text=True)
    if result.returncode != 0 or not result.stdout:
        raise MissingToolError(f"Debian package {package} is not installed: "
                               f"apt-get install {package}")
    return result.stdout


# ---------------------------------------------------------------- the builds

def _build_whole_disk(inputs: _Inputs, key: str, work: Path, out: Path,
                      progress: Callable[[str], None]) -> None:
    kernel = _kernel(inputs, work, progress)
    files = work / "fat"
    shutil.copyfile(kernel, _new(files / "vmlinuz"))
    _initramfs(work, WHOLE_DISK_INIT.replace("@NAME@", inputs.name), WHOLE_DISK_MODULES,
               files / "initrd.img")
    (files / "syslinux.cfg").write_text(SYSLINUX_CFG)

    disk = out / "disk.img"
    with open(disk, "wb") as stream:
        stream.truncate(DISK_SIZE)
    run_step(["parted", "--script", "--align", "none", str(disk), "unit", "B", "mklabel", "msdos",
          "mkpart", "primary", "fat16", f"{PARTITION_START}B", f"{DISK_SIZE - 1}B",
          "set", "1", "boot", "on"], _env())
    _write_at(disk, 440, bytes.fromhex(key[:8]))  # parted's disk signature is random
    write_mbr_code(str(disk))
    sector, image = PARTITION_START // 512, f"{disk}@@{PARTITION_START}"
    run_step(["mkfs.fat", "--offset", str(sector), "-h", str(sector), "-n", "LABMETAL",
          "-i", key[8:16], str(disk), str((DISK_SIZE - PARTITION_START) // 1024)], _env())
    for path in files.iterdir():
        os.utime(path, (EPOCH, EPOCH))
    run_step(["mcopy", "-m", "-i", image, *sorted(str(path) for path in files.iterdir()), "::/"],
         _env())
    run_step(["syslinux", "--offset", str(PARTITION_START), "--install", str(disk)], _env())


def _build_partition(inputs: _Inputs, key: str, work: Path, out: Path,
                     progress: Callable[[str], None]) -> None:
    shutil.copyfile(_kernel(inputs, work, progress), out / "vmlinuz")
    _initramfs(work, PARTITION_INITRD_INIT, PARTITION_MODULES, out / "initrd.img")
    _mkfs_ext4(_rootfs_tree(work, inputs.name), key, work, out / "rootfs.img", ROOTFS_SIZE)


def _build_uefi_whole_disk(inputs: _Inputs, key: str, work: Path, out: Path,
                           progress: Callable[[str], None]) -> None:
    """A GPT disk whose EFI system partition has shim at the removable-media path, GRUB
    beside it with its grub.cfg, and the kernel and initramfs at its root (the layout is
    in the module's docstring)."""
    kernel = _kernel(inputs, work, progress)
    files = work / "esp"
    shutil.copyfile(kernel, _new(files / "vmlinuz"))
    _initramfs(work, WHOLE_DISK_INIT.replace("@NAME@", inputs.name), UEFI_WHOLE_DISK_MODULES,
               files / "initrd.img")
    shutil.copyfile(SHIM, _new(files / EFI_DIR / "BOOTX64.EFI"))
    shutil.copyfile(GRUB, files / EFI_DIR / "grubx64.efi")
    _new(files / GRUB_PREFIX / "grub.cfg").write_text(UEFI_GRUB_CFG)

    disk = out / "disk.img"
    with open(disk, "wb") as stream:
        stream.truncate(UEFI_DISK_SIZE)
    esp_end = UEFI_DISK_SIZE - MIB  # the backup GPT takes the last 33 sectors; keep 1 MiB aligned
    run_step(["sgdisk", "--clear", f"--disk-guid={_guid(key, 'disk')}",
              f"--new=1:{PARTITION_START // 512}:{esp_end // 512 - 1}", "--typecode=1:ef00",
              "--change-name=1:EFI system partition",
              f"--partition-guid=1:{_guid(key, 'esp')}", str(disk)], _env())
    sector, image = PARTITION_START // 512, f"{disk}@@{PARTITION_START}"
    # --invariant: the volume label's directory entry gets a fixed date, not the clock's
    # (-i, after it, still sets the volume id).
    run_step(["mkfs.fat", "--invariant", "--offset", str(sector), "-h", str(sector), "-n",
              "LABMETAL", "-i", key[8:16], str(disk), str((esp_end - PARTITION_START) // 1024)],
             _env())
    # One path at a time, parents first, in a fixed order: the FAT's directory entries and
    # clusters then come out the same at every build (mtools dates them SOURCE_DATE_EPOCH).
    for path in sorted(files.rglob("*")):
        inside = f"::/{path.relative_to(files).as_posix()}"
        if path.is_dir():
            run_step(["mmd", "-i", image, inside], _env())
        else:
            os.utime(path, (EPOCH, EPOCH))
            run_step(["mcopy", "-m", "-i", image, str(path), inside], _env())


def _build_uefi_partition(inputs: _Inputs, key: str, work: Path, out: Path,
                          progress: Callable[[str], None]) -> None:
    """The BIOS partition image's root filesystem plus the boot files a Debian system with
    shim-signed, grub-efi-amd64-signed and the signed kernel installed has, at its paths."""
    kernel = _kernel(inputs, work, progress)
    version = kernel.name.removeprefix("vmlinuz-")
    shutil.copyfile(kernel, out / "vmlinuz")
    _initramfs(work, UEFI_PARTITION_INITRD_INIT, UEFI_PARTITION_MODULES, out / "initrd.img")
    root = _rootfs_tree(work, inputs.name)
    for path, source in ((f"boot/vmlinuz-{version}", out / "vmlinuz"),
                         (f"boot/initrd.img-{version}", out / "initrd.img"),
                         (ROOTFS_SHIM, SHIM), (ROOTFS_MOK_MANAGER, MOK_MANAGER),
                         (ROOTFS_GRUB, GRUB)):
        install_file(root / path, source.read_bytes(), 0o644)
    (root / ROOTFS_KERNEL_LINK).symlink_to(f"boot/vmlinuz-{version}")
    (root / ROOTFS_INITRD_LINK).symlink_to(f"boot/initrd.img-{version}")
    _mkfs_ext4(root, key, work, out / "rootfs.img", UEFI_ROOTFS_SIZE)


def _rootfs_tree(work: Path, name: str) -> Path:
    """The partition image's root filesystem as a directory: busybox, the /sbin/init that
    prints the marker, and the image's name."""
    root = work / "rootfs"
    _busybox(root)
    install_file(root / "sbin" / "init", ROOTFS_INIT.encode(), 0o755)
    install_file(root / "etc" / "labmetal-os" / "name", f"{name}\n".encode(), 0o644)
    install_file(root / "etc" / "hostname", b"labmetal-os\n", 0o644)
    return root


def _mkfs_ext4(root: Path, key: str, work: Path, rootfs: Path, size: int) -> None:
    """``root`` as an ext4 image of ``size`` bytes, every timestamp and id fixed."""
    paths = [root, *sorted(root.rglob("*"))]
    for path in paths:
        os.utime(path, (EPOCH, EPOCH), follow_symlinks=False)
    fs_uuid = f"{key[:8]}-{key[8:12]}-4{key[13:16]}-8{key[1:4]}-{key[4:16]}"
    run_step(["mkfs.ext4", "-q", "-F", "-L", "labmetal-root", "-U", fs_uuid, "-E",
          f"hash_seed={fs_uuid},root_owner=0:0", "-d", str(root), str(rootfs),
          f"{size // 1024}k"], _env())
    # mkfs.ext4 -d copies each file's ctime, which no one can set: fix them afterwards.
    commands = work / "ctimes.debugfs"
    commands.write_text("".join(f"sif /{path.relative_to(root)} ctime @{EPOCH}\n"
                                for path in paths))
    run_step(["debugfs", "-w", "-f", str(commands), str(rootfs)], _env())


def _build_session_disk(inputs: _Inputs, key: str, work: Path, out: Path,
                        progress: Callable[[str], None]) -> None:
    kernel = _kernel(inputs, work, progress)
    files = work / "fat"
    shutil.copyfile(kernel, _new(files / "vmlinuz"))
    _initramfs(work, SESSION_INITRD_INIT, SESSION_MODULES, files / "initrd.img",
               extra=_iscsistart(inputs, work, progress))
    (files / "syslinux.cfg").write_text(SYSLINUX_CFG)

    rootfs = _session_rootfs(inputs, key, work, SESSION_DISK_SIZE - SESSION_ROOT_START)

    disk = out / "disk.img"
    with open(disk, "wb") as stream:
        stream.truncate(SESSION_DISK_SIZE)
    run_step(["parted", "--script", "--align", "none", str(disk), "unit", "B", "mklabel",
              "msdos", "mkpart", "primary", "fat16", f"{PARTITION_START}B",
              f"{SESSION_ROOT_START - 1}B", "set", "1", "boot", "on", "mkpart", "primary",
              "ext4", f"{SESSION_ROOT_START}B", f"{SESSION_DISK_SIZE - 1}B"], _env())
    _write_at(disk, 440, bytes.fromhex(key[:8]))
    write_mbr_code(str(disk))
    sector, image = PARTITION_START // 512, f"{disk}@@{PARTITION_START}"
    run_step(["mkfs.fat", "--offset", str(sector), "-h", str(sector), "-n", "LABMETAL",
              "-i", key[8:16], str(disk), str((SESSION_ROOT_START - PARTITION_START) // 1024)],
             _env())
    for path in files.iterdir():
        os.utime(path, (EPOCH, EPOCH))
    run_step(["mcopy", "-m", "-i", image, *sorted(str(path) for path in files.iterdir()),
              "::/"], _env())
    run_step(["syslinux", "--offset", str(PARTITION_START), "--install", str(disk)], _env())
    with open(rootfs, "rb") as source, open(disk, "r+b") as target:
        target.seek(SESSION_ROOT_START)
        shutil.copyfileobj(source, target, MIB)


def _build_uefi_session_disk(inputs: _Inputs, key: str, work: Path, out: Path,
                             progress: Callable[[str], None]) -> None:
    kernel = _kernel(inputs, work, progress)
    version = kernel.name.removeprefix("vmlinuz-")
    initrd = work / "initrd.img"
    _initramfs(work, SESSION_UEFI_INITRD_INIT, SESSION_UEFI_MODULES, initrd,
               extra={**_iscsistart(inputs, work, progress),
                      "/bin/udhcpc-script": UDHCPC_SCRIPT.encode()})
    def boot_files(root: Path) -> None:  # where Debian keeps them, and its links
        install_file(root / "boot" / f"vmlinuz-{version}", kernel.read_bytes(), 0o644)
        install_file(root / "boot" / f"initrd.img-{version}", initrd.read_bytes(), 0o644)
        (root / ROOTFS_KERNEL_LINK).symlink_to(f"boot/vmlinuz-{version}")
        (root / ROOTFS_INITRD_LINK).symlink_to(f"boot/initrd.img-{version}")

    rootfs = _session_rootfs(inputs, key, work, SESSION_UEFI_DISK_SIZE - PARTITION_START,
                             boot_files)
    _one_partition_disk(out / "disk.img", rootfs, SESSION_UEFI_DISK_SIZE, key)


def _build_local_tp_disk(inputs: _Inputs, key: str, work: Path, out: Path,
                         progress: Callable[[str], None]) -> None:
    kernel = _kernel(inputs, work, progress)
    version = kernel.name.removeprefix("vmlinuz-")
    initrd = work / "initrd.img"  # its own, as a Debian install has one: labmetal's replaces it
    _initramfs(work, UEFI_PARTITION_INITRD_INIT, UEFI_PARTITION_MODULES, initrd)
    root = work / "rootfs"
    _busybox(root)
    install_file(root / "sbin" / "init", LOCAL_TP_INIT.encode(), 0o755)
    install_file(root / "etc" / "labmetal-os" / "name", f"{inputs.name}\n".encode(), 0o644)
    install_file(root / "etc" / "hostname", b"labmetal-tp\n", 0o644)
    for directory in ("home", "run"):  # /run: where the session initramfs puts its tools
        (root / directory).mkdir(mode=0o755)
    install_file(root / "boot" / f"vmlinuz-{version}", kernel.read_bytes(), 0o644)
    install_file(root / "boot" / f"initrd.img-{version}", initrd.read_bytes(), 0o644)
    (root / ROOTFS_KERNEL_LINK).symlink_to(f"boot/vmlinuz-{version}")
    (root / ROOTFS_INITRD_LINK).symlink_to(f"boot/initrd.img-{version}")
    source = work / "kernel" / "lib" / "modules" / version
    modules = select_modules(source, LOCAL_TP_MODULES)
    target = root / "lib" / "modules" / version
    for name in (*modules.files, "modules.order", "modules.builtin", "modules.builtin.modinfo"):
        install_file(target / name, (source / name).read_bytes(), 0o644)
    run_step(["depmod", "--basedir", str(root), version], _env())
    for path in [root, *sorted(root.rglob("*"))]:
        os.utime(path, (EPOCH, EPOCH), follow_symlinks=False)
    fs_uuid = f"{key[:8]}-{key[8:12]}-4{key[13:16]}-8{key[1:4]}-{key[4:16]}"
    rootfs = work / "rootfs.img"
    run_step(["mkfs.ext4", "-q", "-F", "-L", SESSION_ROOT_LABEL, "-U", fs_uuid, "-E",
              f"hash_seed={fs_uuid},root_owner=0:0", "-d", str(root), str(rootfs),
              f"{(LOCAL_TP_DISK_SIZE - PARTITION_START) // 1024}k"], _env())
    commands = work / "ctimes.debugfs"  # mkfs.ext4 -d copies ctimes, which no one can set
    commands.write_text("".join(f"sif /{path.relative_to(root)} ctime @{EPOCH}\n"
                                for path in [root, *sorted(root.rglob("*"))]))
    run_step(["debugfs", "-w", "-f", str(commands), str(rootfs)], _env())
    _one_partition_disk(out / "disk.img", rootfs, LOCAL_TP_DISK_SIZE, key)


def _one_partition_disk(disk: Path, rootfs: Path, size: int, key: str) -> None:
    """A disk of ``size`` bytes, an msdos label (its signature from the key) and one ext4
    partition from 1 MiB to the end holding ``rootfs``."""
    with open(disk, "wb") as stream:
        stream.truncate(size)
    run_step(["parted", "--script", "--align", "none", str(disk), "unit", "B", "mklabel",
              "msdos", "mkpart", "primary", "ext4", f"{PARTITION_START}B",
              f"{size - 1}B"], _env())
    _write_at(disk, 440, bytes.fromhex(key[:8]))
    with open(rootfs, "rb") as source, open(disk, "r+b") as target:
        target.seek(PARTITION_START)
        shutil.copyfileobj(source, target, MIB)


def _session_rootfs(inputs: _Inputs, key: str, work: Path, size: int,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """The session OS's ext4 root filesystem (``size`` bytes, its UUID from the build's
    key): busybox, the init that counts boots, the counter at 0, and what ``extra`` adds."""
    root = work / "rootfs"
    _busybox(root)
    install_file(root / "sbin" / "init", SESSION_ROOTFS_INIT.encode(), 0o755)
    install_file(root / "etc" / "labmetal-os" / "name", f"{inputs.name}\n".encode(), 0o644)
    install_file(root / "var" / "lib" / "labmetal-tp" / "counter", b"0\n", 0o644)
    if extra is not None:
        extra(root)
    for path in [root, *sorted(root.rglob("*"))]:
        os.utime(path, (EPOCH, EPOCH), follow_symlinks=False)
    uuid = f"{key[:8]}-{key[8:12]}-4{key[13:16]}-8{key[1:4]}-{key[4:16]}"
    rootfs = work / "rootfs.img"
    run_step(["mkfs.ext4", "-q", "-F", "-L", SESSION_ROOT_LABEL, "-U", uuid, "-E",
              f"hash_seed={uuid},root_owner=0:0", "-d", str(root), str(rootfs),
              f"{size // 1024}k"], _env())
    return rootfs


def _iscsistart(inputs: _Inputs, work: Path, progress: Callable[[str], None]) -> dict[str, bytes]:
    """open-iscsi's iscsistart and the shared libraries it links (libopeniscsiusr from its
    own downloaded package, the rest from the host, same Debian release), by path."""
    unpacked = work / "open-iscsi"
    for package, version in sorted(inputs.downloads.items()):
        run_step(["dpkg-deb", "--extract", str(_download(package, version, work.parent,
                                                         progress)), str(unpacked)], _env())
    binary = unpacked / "sbin" / "iscsistart"
    libraries = sorted({str(path.parent) for path in unpacked.rglob("*.so*")})
    try:
        return with_libraries(binary, "/bin/iscsistart", libraries)
    except MissingLibrary as error:
        raise MissingToolError(str(error)) from None


def _kernel(inputs: _Inputs, work: Path, progress: Callable[[str], None]) -> Path:
    """Unpack the kernel package (kept in the cache, which holds ``work``) into ``work/kernel``,
    with a modules.dep made there; its vmlinuz."""
    package, version = inputs.kernel
    tree = work / "kernel"
    run_step(["dpkg-deb", "--extract", str(_download(package, version, work.parent, progress)),
          str(tree)], _env())
    (modules,) = (tree / "lib" / "modules").iterdir()
    run_step(["depmod", "--basedir", str(tree), modules.name], _env())
    return tree / "boot" / f"vmlinuz-{modules.name}"


def _download(package: str, version: str, cache: Path, progress: Callable[[str], None]) -> Path:
    folder = cache / "debs" / f"{package}_{version}"
    if not list(folder.glob("*.deb")):
        progress(f"downloading {package} {version}")
        folder.parent.mkdir(exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".download-", dir=folder.parent))
        try:
            run_step(["env", "--chdir", str(work), "apt-get", "-q", "-o", "APT::Sandbox::User=root",
                  "download", f"{package}={version}"], _env())
            work.chmod(0o755)
            work.rename(folder)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    (deb,) = folder.glob("*.deb")
    return deb


def _initramfs(work: Path, init: str, wanted: tuple[str, ...], target: Path,
               extra: dict[str, bytes] | None = None) -> None:
    """busybox, the kernel's ``wanted`` modules (with what they depend on, per modules.dep),
    ``init`` and ``extra`` executables (path in the image -> content), as a zstd cpio
    archive."""
    root = work / "initramfs"
    _busybox(root)
    for path, content in (extra or {}).items():
        install_file(root / path.lstrip("/"), content, 0o755)
    (source,) = (work / "kernel" / "lib" / "modules").iterdir()
    modules = select_modules(source, wanted)
    target_dir = root / "lib" / "modules" / source.name
    for name in (*modules.files, "modules.order", "modules.builtin", "modules.builtin.modinfo"):
        install_file(target_dir / name, (source / name).read_bytes(), 0o644)
    run_step(["depmod", "--basedir", str(root), source.name], _env())
    install_file(root / "etc" / "labmetal-os" / "modules",
             "".join(f"{name}\n" for name in modules.loadable).encode(), 0o644)
    (root / "newroot").mkdir(mode=0o755)
    install_file(root / "init", init.encode(), 0o755)
    with open(_new(target), "wb") as stream:
        write_initramfs(root, stream, EPOCH, 19)


def _busybox(root: Path) -> None:
    """/bin/busybox and a link for each of its applets, and the mount points."""
    install_file(root / "bin" / "busybox", BUSYBOX.read_bytes(), 0o755)
    applets = run_step([str(BUSYBOX), "--list"], _env()).split()
    for applet in applets:
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    for directory in ("dev", "proc", "sys", "etc", "tmp"):
        (root / directory).mkdir(mode=0o755, exist_ok=True)
    (root / "sbin").mkdir(mode=0o755, exist_ok=True)


def _new(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _guid(key: str, purpose: str) -> str:
    """A fixed GUID for a GPT's ``purpose`` ("disk", "esp"), derived from the build's key:
    sgdisk would pick random ones."""
    return str(uuid.UUID(bytes=hashlib.sha256(f"{key}:{purpose}".encode()).digest()[:16],
                         version=4))


def _write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as stream:
        stream.seek(offset)
        stream.write(data)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def _env() -> dict[str, str]:
    """Fixed timestamps for the tools that take them; mtools would refuse the FAT's
    geometry (a partition, not a floppy)."""
    return {**os.environ, "LC_ALL": "C", "SOURCE_DATE_EPOCH": str(EPOCH),
            "E2FSPROGS_FAKE_TIME": str(EPOCH), "MTOOLS_SKIP_CHECK": "1"}

# ---------------------------------------------------------------- what runs on the seat

SYSLINUX_CFG = """\
SERIAL 0 115200
DEFAULT labmetal
PROMPT 0
TIMEOUT 0
LABEL labmetal
  LINUX /vmlinuz
  INITRD /initrd.img
  APPEND console=tty0 console=ttyS0,115200n8
"""

# Shared by every init: PATH, the marker's output and the seat's MAC address.
_SHELL_COMMON = """\
export PATH=/bin
say() {  # on ttyS0, where tests read, and on the console if that is another device
    echo "$1" > /dev/ttyS0 2>/dev/null
    grep -q '^ttyS0 .*(.*C.*)' /proc/consoles || echo "$1"
}
first_mac() {  # of the first Ethernet NIC; it appears shortly after its driver loads
    for i in $(seq 50); do
        for nic in /sys/class/net/*; do
            [ "$(cat "$nic/type" 2>/dev/null)" = 1 ] && { cat "$nic/address"; return; }
        done
        sleep 0.1
    done
    echo none
}
"""

_INITRAMFS_START = """\
#!/bin/sh
{comment}
{common}
mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sys /sys
modprobe -a $(cat /etc/labmetal-os/modules)
"""

WHOLE_DISK_INIT = _INITRAMFS_START.format(
    comment="# labmetal test OS, whole-disk image: say it booted, then stay up like an OS.",
    common=_SHELL_COMMON) + """\
say "labmetal-os: image=@NAME@ mac=$(first_mac) booted"
while :; do sleep 3600; done
"""

_PARTITION_INITRD_FAIL = """\
fail() { say "labmetal-os: error: $1"; sleep 1; poweroff -f; }
"""

# resolve(): root= as a device node, PARTUUID= found by @MATCH@ (shell lines that print the
# partition's device and return when it is $want), anything else by findfs.
_RESOLVE = """\
resolve() {  # root= as a device node; PARTUUID= of @LABELS@
    case $1 in
    /dev/*) [ -b "$1" ] && echo "$1" ;;
    PARTUUID=*)
        want=$(echo "${1#PARTUUID=}" | tr A-F a-f)
        for part in /sys/class/block/*; do
            [ -e "$part/partition" ] || continue
            disk=$(basename "$(dirname "$(readlink -f "$part")")")
@MATCH@        done
        return 1 ;;
    *) findfs "$1" ;;
    esac
}
"""

_RESOLVE_MSDOS = _RESOLVE.replace("@LABELS@", "msdos partitions only (not GPT)").replace(
    "@MATCH@", """\
            signature=$(od -A n -t x1 -j 440 -N 4 "/dev/$disk" | awk '{print $4 $3 $2 $1}')
            number=$(printf %02x "$(cat "$part/partition")")
            [ "$signature-$number" = "$want" ] && { echo "/dev/${part##*/}"; return; }
""")

# A UEFI seat's disk has a GPT label: root=PARTUUID= names the partition's unique GUID,
# which this kernel (6.1) shows nowhere in sysfs, so it is read from the label itself:
# the header at LBA 1 ("EFI PART") gives where the entries are and their size; entry n-1
# holds partition n's GUID at byte 16, its first three fields little-endian. An msdos label
# is still resolved as the BIOS image does it.
_RESOLVE_GPT_OR_MSDOS = """\
partuuid() {  # of partition $2 of disk $1, as the kernel's root=PARTUUID= spells it
    local sector entries size signature
    sector=$(cat "/sys/block/$1/queue/logical_block_size")
    if [ "$(dd if="/dev/$1" bs=1 skip="$sector" count=8 2>/dev/null)" = "EFI PART" ]; then
        entries=$(od -A n -t u8 -j $((sector + 72)) -N 8 "/dev/$1")
        size=$(od -A n -t u4 -j $((sector + 84)) -N 4 "/dev/$1")
        od -A n -t x1 -j $(($entries * $sector + ($2 - 1) * $size + 16)) -N 16 "/dev/$1" |
            awk '{ print $4 $3 $2 $1 "-" $6 $5 "-" $8 $7 "-" $9 $10 "-" $11 $12 $13 $14 $15 $16 }'
    else
        signature=$(od -A n -t x1 -j 440 -N 4 "/dev/$1" | awk '{print $4 $3 $2 $1}')
        echo "$signature-$(printf %02x "$2")"
    fi
}
""" + _RESOLVE.replace("@LABELS@", "GPT or msdos partitions").replace("@MATCH@", """\
            [ "$(partuuid "$disk" "$(cat "$part/partition")")" = "$want" ] &&
                { echo "/dev/${part##*/}"; return; }
""")

_PARTITION_INITRD_MOUNT = """\
root= mode=ro
for arg in $(cat /proc/cmdline); do
    case $arg in root=*) root=${arg#root=} ;; ro|rw) mode=$arg ;; esac
done
[ -n "$root" ] || fail "no root= on the kernel command line"
device=
for i in $(seq 100); do device=$(resolve "$root") && [ -n "$device" ] && break; sleep 0.1; done
[ -n "$device" ] || fail "root $root not found"
mount -o "$mode" "$device" /newroot || fail "cannot mount $device"
[ -x /newroot/sbin/init ] || fail "$device has no /sbin/init"
for fs in dev proc sys; do mount --move "/$fs" "/newroot/$fs"; done
exec switch_root /newroot /sbin/init
"""

PARTITION_INITRD_INIT = _INITRAMFS_START.format(
    comment="# labmetal test OS, partition image's initrd: mount root= and switch to it.",
    common=_SHELL_COMMON) + _PARTITION_INITRD_FAIL + _RESOLVE_MSDOS + _PARTITION_INITRD_MOUNT

UEFI_PARTITION_INITRD_INIT = _INITRAMFS_START.format(
    comment="# labmetal test OS, UEFI partition image's initrd: mount root= and switch to it.",
    common=_SHELL_COMMON) + _PARTITION_INITRD_FAIL + _RESOLVE_GPT_OR_MSDOS \
    + _PARTITION_INITRD_MOUNT

# /EFI/debian/grub.cfg of the UEFI whole-disk image, where Debian's signed GRUB looks first
# (see the module's docstring); $root is the partition GRUB was loaded from. Commands, not
# a menu: nothing to wait for, and an error stays on the console above GRUB's prompt.
UEFI_GRUB_CFG = """\
# labmetal test OS, UEFI whole-disk image: the kernel and initramfs at this partition's root.
echo "labmetal: GRUB loads /vmlinuz from $root"
linux /vmlinuz console=tty0 console=ttyS0,115200n8
initrd /initrd.img
boot
"""

SESSION_INITRD_INIT = _INITRAMFS_START.format(
    comment="# labmetal TP session disk's initrd: attach the iSCSI root the firmware booted.",
    common=_SHELL_COMMON) + f"""\
fail() {{ say "{SESSION_MARKER_PREFIX} error: $1"; sleep 1; poweroff -f; }}
# iPXE's sanboot left an iBFT (target, CHAP, initiator name, the NIC's address) in memory.
for i in $(seq 50); do [ -d /sys/firmware/ibft/target0 ] && break; sleep 0.1; done
[ -d /sys/firmware/ibft/target0 ] || fail "no iBFT: this seat was not booted by iSCSI sanboot"
iscsistart -N > /tmp/iscsi.log 2>&1 || fail "network from the iBFT: $(tail -n 1 /tmp/iscsi.log)"
iscsistart -b >> /tmp/iscsi.log 2>&1 || fail "iSCSI login: $(tail -n 1 /tmp/iscsi.log)"
device=
for i in $(seq 150); do device=$(findfs LABEL={SESSION_ROOT_LABEL}) && break; sleep 0.1; done
[ -n "$device" ] || fail "no {SESSION_ROOT_LABEL} filesystem on the iSCSI disk"
mount -o rw "$device" /newroot || fail "cannot mount $device"
for fs in dev proc sys; do mount --move "/$fs" "/newroot/$fs"; done
exec switch_root /newroot /sbin/init
"""

UDHCPC_SCRIPT = """\
#!/bin/sh
# busybox udhcpc's event script: the leased address and the default route
case "$1" in
bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    ;;
esac
exit 0
"""

SESSION_UEFI_INITRD_INIT = _INITRAMFS_START.format(
    comment="# labmetal TP session disk's initrd, Secure Boot seats: attach the iSCSI root "
            "named on the kernel command line.",
    common=_SHELL_COMMON) + f"""\
fail() {{ say "{SESSION_MARKER_PREFIX} error: $1"; sleep 1; poweroff -f; }}
arg() {{  # the value of NAME= on the kernel command line
    for word in $(cat /proc/cmdline); do
        case $word in "$1"=*) echo "${{word#*=}}"; return ;; esac
    done
}}
target=$(arg iscsi_target_name)
[ -n "$target" ] || fail "no iscsi_target_name= on the kernel command line"
# the NIC the seat booted from (BOOTIF=01-aa-bb-...), else the first Ethernet one
want=$(arg BOOTIF | sed 's/^01-//; s/-/:/g')
first_mac > /dev/null
dev=
for nic in /sys/class/net/*; do
    [ "$(cat "$nic/type" 2>/dev/null)" = 1 ] || continue
    [ -z "$dev" ] && dev=${{nic##*/}}
    [ "$(cat "$nic/address")" = "$want" ] && {{ dev=${{nic##*/}}; break; }}
done
[ -n "$dev" ] || fail "no Ethernet interface"
ip link set lo up
ip link set "$dev" up
udhcpc -i "$dev" -q -n -t 20 -T 1 -s /bin/udhcpc-script > /tmp/dhcp.log 2>&1 \
    || fail "no DHCP answer on $dev"
iscsistart -i "$(arg iscsi_initiator)" -t "$target" -g 1 -a "$(arg iscsi_target_ip)" \
    -p "$(arg iscsi_target_port)" -u "$(arg iscsi_username)" -w "$(arg iscsi_password)" \
    > /tmp/iscsi.log 2>&1 || fail "iSCSI login: $(tail -n 1 /tmp/iscsi.log)"
root=$(arg root)
device=
for i in $(seq 150); do device=$(findfs "$root") && break; sleep 0.1; done
[ -n "$device" ] || fail "no $root filesystem on the iSCSI disk"
mount -o rw "$device" /newroot || fail "cannot mount $device"
for fs in dev proc sys; do mount --move "/$fs" "/newroot/$fs"; done
exec switch_root /newroot /sbin/init
"""

SESSION_ROOTFS_INIT = f"""\
#!/bin/sh
# labmetal TP session OS: its root is the student's own disk over iSCSI. Count the boots in
# a file of that disk, say so, then stay up like an OS (the seat is powered off to end it).
{_SHELL_COMMON}
counter=/var/lib/labmetal-tp/counter
name=$(cat /etc/labmetal-os/name)
count=$(cat $counter)
say "{SESSION_MARKER_PREFIX} image=$name mac=$(first_mac) counter=$count"
echo $((count + 1)) > $counter.new && sync && mv $counter.new $counter && sync
say "{SESSION_MARKER_PREFIX} counter=$(cat $counter) saved on $(awk '$2 == "/" {{ print $1 }}' /proc/mounts)"
while :; do sleep 3600; done
"""  # noqa: E501 (a shell line of the image: changing it would rebuild the cached test OS)

ROOTFS_INIT = f"""\
#!/bin/sh
# labmetal test OS, partition image: say which image booted from which root, then stay up.
{_SHELL_COMMON}
[ -e /proc/self ] || mount -t proc proc /proc
[ -d /sys/class ] || mount -t sysfs sys /sys
[ -e /dev/null ] || mount -t devtmpfs dev /dev
name=$(cat /etc/labmetal-os/name)
root=$(awk '$2 == "/" {{ device = $1 }} END {{ print device }}' /proc/mounts)
say "labmetal-os: image=$name mac=$(first_mac) root=$root booted"
while :; do sleep 3600; done
"""

# The local TP template's /sbin/init: what a teacher's OS would do, reduced to proving it
# runs from the root labmetal assembled, and a shell on the keyboard and the serial line.
LOCAL_TP_INIT = f"""\
#!/bin/sh
# labmetal local TP template: say which image booted from which root, then keep a shell on
# tty1 and ttyS0 (respawned), like a login on an ordinary install.
export PATH=/bin:/sbin HOME=/root
[ -e /proc/self ] || mount -t proc proc /proc
[ -d /sys/class ] || mount -t sysfs sys /sys
[ -e /dev/null ] || mount -t devtmpfs dev /dev
name=$(cat /etc/labmetal-os/name)
root=$(awk '$2 == "/" {{ device = $1 }} END {{ print device }}' /proc/mounts)
line="{SESSION_MARKER_PREFIX} image=$name root=$root booted"
for tty in ttyS0 tty1; do echo "$line" > /dev/$tty 2>/dev/null; done
shell() {{  # an interactive shell on /dev/$1, its controlling terminal, started again on exit
    [ -c "/dev/$1" ] || return
    while :; do setsid -c sh -i < "/dev/$1" > "/dev/$1" 2>&1; sleep 1; done
}}
shell tty1 &
shell ttyS0 &
while :; do sleep 3600; done
"""
