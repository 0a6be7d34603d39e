"""A TP template's own boot files, for seats under Secure Boot (issue 13, DESIGN §4).

Under Secure Boot nothing unsigned runs before Linux, so a diskless session cannot
``sanboot`` its iSCSI disk as iPXE does: Debian's signed GRUB loads the template's own
kernel (signed by its distribution, so shim lets it run) and the template's own initramfs,
which logs in to the session's target from the kernel command line (Debian's open-iscsi
reads ``iscsi_initiator=``, ``iscsi_target_name=``, ``iscsi_target_ip=``,
``iscsi_target_port=``, ``iscsi_username=``, ``iscsi_password=``: its initramfs script
local-top/iscsi) and mounts the root filesystem named by ``root=UUID=...``. Its own
initramfs, not labmetal's: its modules match its kernel.

They are read from the frozen template image without mounting it (no loop device, no
kernel filesystem code on a file that came from a user): the partition table (MBR or GPT)
here, the files with e2fsprogs' debugfs on ``image?offset=N``. A template without them
(no ext2/3/4 root with /boot/vmlinuz-*) boots diskless only where iPXE runs.
"""
from __future__ import annotations

import logging
import re
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from labmetal.db import Database
from labmetal.images.inspect import ImageRejected
from labmetal.images.registry import QUEUED, ingest
from labmetal.images.store import ImageStore
from labmetal.models import Image

LOG = logging.getLogger(__name__)

SECTOR = 512
GPT_SIGNATURE = b"EFI PART"
MBR_PROTECTIVE = 0xEE
EXT_MAGIC_OFFSET = 1024 + 56  # the superblock's s_magic
EXT_MAGIC = b"\x53\xef"
_VERSION = re.compile(r"^vmlinuz-(\S+)$")


class BootFilesError(Exception):
    """The image's partition table or filesystem cannot be read as it says."""


@dataclass(frozen=True)
class Partition:
    number: int
    offset: int  # bytes from the image's start
    size: int


@dataclass(frozen=True)
class BootFiles:
    kernel: Path
    initrd: Path
    root_uuid: str
    version: str  # the kernel's, from its file name


def partitions(image: Path) -> list[Partition]:
    """The image's partitions, from its GPT (behind a protective MBR) or its MBR; a bare
    ext filesystem is partition 0."""
    with open(image, "rb") as disk:
        mbr = disk.read(SECTOR)
        if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
            # no partition table: a filesystem image (a partition image) is one partition
            size = disk.seek(0, 2)
            whole = Partition(0, 0, size)
            return [whole] if size > EXT_MAGIC_OFFSET and _is_ext(image, whole) else []
        entries = [struct.unpack_from("<B3xB3xII", mbr, 446 + 16 * n) for n in range(4)]
        if any(kind == MBR_PROTECTIVE for _, kind, _, _ in entries):
            return _gpt(disk)
        return [Partition(n + 1, start * SECTOR, count * SECTOR)
                for n, (_, kind, start, count) in enumerate(entries) if kind and count]


def _gpt(disk) -> list[Partition]:
    disk.seek(SECTOR)
    header = disk.read(92)
    if header[:8] != GPT_SIGNATURE:
        raise BootFilesError("a protective MBR without a GPT header")
    entries_lba, count, size = struct.unpack_from("<QII", header, 72)
    if not 0 < count <= 1024 or not 128 <= size <= 4096:
        raise BootFilesError(f"a GPT with {count} entries of {size} bytes")
    disk.seek(entries_lba * SECTOR)
    found = []
    for number in range(1, count + 1):
        entry = disk.read(size)
        if len(entry) < 48 or entry[:16] == bytes(16):
            continue
        first, last = struct.unpack_from("<QQ", entry, 32)
        if last >= first:
            found.append(Partition(number, first * SECTOR, (last - first + 1) * SECTOR))
    return found


def _is_ext(image: Path, partition: Partition) -> bool:
    with open(image, "rb") as disk:
        disk.seek(partition.offset + EXT_MAGIC_OFFSET)
        return disk.read(2) == EXT_MAGIC


def _debugfs(image: Path, partition: Partition, request: str) -> str:
    done = subprocess.run(["debugfs", "-R", request, f"{image}?offset={partition.offset}"],
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise BootFilesError(f"debugfs {request!r}: {done.stderr.strip()[-300:]}")
    return done.stdout


def newest_kernel(listing: str) -> str | None:
    """The version of the newest ``vmlinuz-<version>`` that has its ``initrd.img-<version>``
    in a ``debugfs -R "ls -p /boot"`` listing; None if none has."""
    names = {line.split("/")[5] for line in listing.splitlines()
             if line.count("/") >= 6 and line.split("/")[5]}
    versions = sorted((m.group(1) for m in map(_VERSION.match, names) if m),
                      key=_version_key)
    versions = [v for v in versions if f"initrd.img-{v}" in names]
    return versions[-1] if versions else None


def find(image: Path, into: Path) -> BootFiles | None:
    """The newest kernel in /boot of the image's first ext2/3/4 filesystem that has one,
    with its initrd (``initrd.img-<version>``), copied into ``into``; None if none has."""
    for partition in partitions(image):
        if not _is_ext(image, partition):
            continue
        version = newest_kernel(_debugfs(image, partition, "ls -p /boot"))
        if version is None:
            continue
        into.mkdir(parents=True, exist_ok=True)
        kernel, initrd = into / f"vmlinuz-{version}", into / f"initrd.img-{version}"
        for name, target in ((f"vmlinuz-{version}", kernel),
                             (f"initrd.img-{version}", initrd)):
            _debugfs(image, partition, f"dump -p /boot/{name} {target}")
            if not target.is_file() or target.stat().st_size == 0:
                raise BootFilesError(f"/boot/{name} could not be read from partition "
                                     f"{partition.number}")
        stats = _debugfs(image, partition, "stats")
        uuid = re.search(r"^Filesystem UUID:\s+(\S+)", stats, re.MULTILINE)
        if uuid is None:
            raise BootFilesError(f"partition {partition.number} has no filesystem UUID")
        return BootFiles(kernel, initrd, uuid.group(1), version)
    return None


def _version_key(version: str) -> list[tuple[int, str]]:
    return [(int(part), "") if part.isdigit() else (-1, part)
            for part in re.split(r"[.+~-]", version)]


@dataclass(frozen=True)
class Registered:
    """A template version's boot files in the image store: UUIDs of a ``kernel`` and a
    ``ramdisk`` image (served over TFTP to GRUB like labmetal's own), and the root's UUID."""
    kernel: str
    initrd: str
    root_uuid: str


def register(db: Database, store: ImageStore, raw: Path, name: str) -> Registered | None:
    """Find the boot files in the raw template image and add them to the image store as
    ``<name>-kernel`` and ``<name>-initrd``; None (logged) if the image has none or they
    cannot be read: its sessions then boot diskless under iPXE only."""
    with tempfile.TemporaryDirectory(prefix="labmetal-boot-files-") as work:
        try:
            found = find(raw, Path(work))
        except (BootFilesError, OSError, subprocess.TimeoutExpired) as error:
            LOG.warning("%s: no boot files for Secure Boot seats: %s", name, error)
            return None
        if found is None:
            LOG.info("%s: no /boot/vmlinuz-* on an ext filesystem: its sessions boot "
                     "diskless under iPXE only (not on Secure Boot seats)", name)
            return None
        uuids = []
        for kind, path, suffix in (("kernel", found.kernel, "kernel"),
                                   ("ramdisk", found.initrd, "initrd")):
            with db.write() as session:
                made = Image(name=f"{name}-{suffix}", kind=kind, status=QUEUED,
                             description=f"{path.name} of {name}: its sessions' boot on "
                                         "Secure Boot seats")
                session.add(made)
                session.flush()
                image_id = made.id
            with db.read() as session:
                image = session.get(Image, image_id)
            if image is None:  # deleted in between by an admin
                return None
            try:
                with open(path, "rb") as stream:
                    uuids.append(ingest(db, store, image, stream).uuid)
            except ImageRejected as error:
                LOG.warning("%s: its %s was refused: %s", name, suffix, error)
                return None
    LOG.info("%s: kernel %s and its initrd kept for Secure Boot seats (root %s)", name,
             found.version, found.root_uuid)
    return Registered(uuids[0], uuids[1], found.root_uuid)
