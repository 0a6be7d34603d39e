"""What an uploaded disk image really is, decided before qemu-img is allowed to parse it.

qemu-img follows references stored inside an image: a qcow2 backing file or external data
file may name any file the service can read, and other formats (VMDK extents, ...) do the
same (CVE-2024-44082 in Ironic). So the header is read in Python first: every format but raw
and qcow2 is refused by name, a qcow2 that refers to another file is refused, and qemu-img
only ever runs with the detected format pinned (``-f``), its JSON checked a second time.
Every qemu-img call of the image store lives here, so none can forget the pin.
"""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

FORMATS = ("raw", "qcow2")

# qemu-img info/check on a hostile file: bounded like Nova and Ironic bound them.
_LIMITS = ["prlimit", f"--as={1024 ** 3}", "--cpu=30", "--"]
_INFO_TIMEOUT = 60.0

# Formats qemu can open that labmetal refuses: (offset, magic, name). Their headers can name
# other files, need secrets, or are simply not what a teaching lab uploads.
_REFUSED = (
    (0, b"KDMV", "VMDK"),
    (0, b"COWD", "VMDK (ESX COW)"),
    (0, b"# Disk DescriptorFile", "VMDK descriptor"),
    (0, b"vhdxfile", "VHDX"),
    (0, b"conectix", "VHD (vpc)"),
    (0x40, b"\x7f\x10\xda\xbe", "VDI"),
    (0, b"QED\x00", "QED"),
    (0, b"LUKS\xba\xbe", "LUKS"),
    (0, b"WithoutFreeSpace", "Parallels"),
    (0, b"WithouFreSpacExt", "Parallels"),
    (0, b"Bochs Virtual HD Image", "Bochs"),
    (0, b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop", "cloop"),
)
_PROBE_SIZE = 512

# qcow2 header (docs/interop/qcow2.txt in QEMU), big-endian.
_QCOW2_MAGIC = b"QFI\xfb"
_QCOW2_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # the 72 bytes every version has
_QCOW2_V3 = struct.Struct(">QQQII")  # incompatible/compatible/autoclear features, ..., length
_DATA_FILE_BIT, _CORRUPT_BIT = 1 << 2, 1 << 1
# dirty, corrupt, external data file, compression type, extended L2 entries
_KNOWN_INCOMPATIBLE = 0b11111
_EXT_HEADER = struct.Struct(">II")  # type, length; data padded to 8 bytes
_EXT_DATA_FILE = 0x44415441
_EXT_ENCRYPTION = 0x0537BE77


class ImageRejected(Exception):
    """The upload is not an image labmetal accepts; the message says why, for the user."""


@dataclass(frozen=True)
class ImageInfo:
    format: str  # raw | qcow2
    virtual_size: int  # bytes of the disk it describes


def inspect(path: Path, declared_format: str | None,
            max_virtual_size: int | None = None) -> ImageInfo:
    """Detect the format from the header, refuse what is unsafe, then confirm with qemu-img."""
    if declared_format is not None and declared_format not in FORMATS:
        raise ImageRejected(f"unknown disk format {declared_format!r}; use raw or qcow2")
    header = _read_header(path)
    if max_virtual_size is not None and header.virtual_size > max_virtual_size:
        raise ImageRejected(f"virtual size {header.virtual_size} bytes is over the limit of "
                            f"{max_virtual_size} bytes (max_image_size)")
    if declared_format is not None and declared_format != header.format:
        raise ImageRejected(f"declared {declared_format} but the file is {header.format}")
    info = _qemu_img_info(path, header)
    if info.format == "qcow2":
        _qemu_img_check(path)
    return info


def convert_to_raw(path: Path, image_format: str, raw_path: Path, max_size: int) -> None:
    """Write the sparse raw file of an image that ``inspect`` accepted. ``max_size`` (its
    virtual size, already checked against the limit) is also the kernel's bound on the
    file qemu-img writes (RLIMIT_FSIZE): past it, the write fails, not the disk."""
    if image_format not in FORMATS:
        raise ValueError(f"not an accepted format: {image_format}")
    result = subprocess.run(["prlimit", f"--fsize={max_size}", "--",
                             "qemu-img", "convert", "-q", "-f", image_format, "-O", "raw",
                             str(path), str(raw_path)], capture_output=True, text=True)
    if result.returncode == -signal.SIGXFSZ:
        raise ImageRejected(f"the raw form of the {image_format} image grows past its "
                            f"virtual size of {max_size} bytes: refused")
    if result.returncode != 0:
        raise ImageRejected(f"qemu-img cannot convert the {image_format} image: "
                            f"{_reason(result.stderr, path)}")


def _read_header(path: Path) -> ImageInfo:
    with open(path, "rb") as image:
        head = image.read(_PROBE_SIZE)
        for offset, magic, name in _REFUSED:
            if head[offset:offset + len(magic)] == magic:
                raise ImageRejected(f"the file is a {name} image; labmetal accepts raw and "
                                    "qcow2 only (convert it with qemu-img convert -O qcow2)")
        if head.startswith(_QCOW2_MAGIC):
            return _read_qcow2_header(image)
    return ImageInfo("raw", os.path.getsize(path))


def _read_qcow2_header(image: BinaryIO) -> ImageInfo:
    image.seek(0)
    head = image.read(_QCOW2_V2.size)
    if len(head) < _QCOW2_V2.size:
        raise ImageRejected("corrupt qcow2: the header is truncated")
    (_, version, backing_offset, backing_length, cluster_bits, virtual_size, crypt_method,
     *_rest) = _QCOW2_V2.unpack(head)
    if version not in (2, 3):
        raise ImageRejected(f"qcow2 version {version} is not supported (2 and 3 are)")
    if not 9 <= cluster_bits <= 21:
        raise ImageRejected(f"corrupt qcow2: cluster_bits {cluster_bits} is out of range")
    cluster = image.read((1 << cluster_bits) - _QCOW2_V2.size)  # header + extensions fit in it
    if backing_offset or backing_length:
        name = _string_at(image, backing_offset, min(backing_length, 1023))
        raise ImageRejected(f"qcow2 image has a backing file ({name}); labmetal accepts only "
                            "self-contained images (qemu-img convert -O qcow2 flattens it)")
    if crypt_method:
        raise ImageRejected("qcow2 image is encrypted; upload it decrypted")
    header_length = _QCOW2_V2.size
    if version == 3:
        if len(cluster) < _QCOW2_V3.size:
            raise ImageRejected("corrupt qcow2: the version 3 header is truncated")
        incompatible, _compatible, _autoclear, _refcount_order, header_length = (
            _QCOW2_V3.unpack_from(cluster))
        _check_incompatible(incompatible)
    _check_extensions(cluster, header_length - _QCOW2_V2.size)
    return ImageInfo("qcow2", virtual_size)


def _check_incompatible(features: int) -> None:
    if features & _DATA_FILE_BIT:
        raise ImageRejected("qcow2 image has an external data file; labmetal accepts only "
                            "self-contained images")
    if features & _CORRUPT_BIT:
        raise ImageRejected("corrupt qcow2: the image is marked corrupt")
    unknown = features & ~_KNOWN_INCOMPATIBLE
    if unknown:
        raise ImageRejected(f"qcow2 image uses unknown incompatible features ({unknown:#x})")


def _check_extensions(cluster: bytes, offset: int) -> None:
    """Header extensions follow the header inside the first cluster, ended by type 0."""
    if offset < 0:
        raise ImageRejected("corrupt qcow2: header length is too small")
    while offset + _EXT_HEADER.size <= len(cluster):
        kind, length = _EXT_HEADER.unpack_from(cluster, offset)
        if kind == 0:
            return
        if kind == _EXT_DATA_FILE:
            raise ImageRejected("qcow2 image names an external data file; labmetal accepts "
                                "only self-contained images")
        if kind == _EXT_ENCRYPTION:
            raise ImageRejected("qcow2 image is encrypted; upload it decrypted")
        offset += _EXT_HEADER.size + (length + 7) // 8 * 8
    raise ImageRejected("corrupt qcow2: header extensions run past the first cluster")


def _string_at(image: BinaryIO, offset: int, length: int) -> str:
    image.seek(offset)
    return repr(image.read(length).decode("utf-8", "replace"))


def _qemu_img_info(path: Path, header: ImageInfo) -> ImageInfo:
    """qemu-img's own reading of the file, with the format pinned: a second opinion."""
    result = _run_limited(["qemu-img", "info", "--output=json", "-f", header.format, str(path)])
    if result.returncode != 0:
        raise ImageRejected(f"qemu-img cannot read the {header.format} image: "
                            f"{_reason(result.stderr, path)}")
    info = json.loads(result.stdout)
    specific = (info.get("format-specific") or {}).get("data") or {}
    if info.get("format") != header.format:
        raise ImageRejected(f"qemu-img reads the file as {info.get('format')}, "
                            f"not {header.format}")
    if "backing-filename" in info or "full-backing-filename" in info:
        raise ImageRejected("qemu-img reports a backing file; labmetal accepts only "
                            "self-contained images")
    if "data-file" in specific:
        raise ImageRejected("qemu-img reports an external data file; labmetal accepts only "
                            "self-contained images")
    if info.get("encrypted"):
        raise ImageRejected("qemu-img reports an encrypted image; upload it decrypted")
    if specific.get("corrupt"):
        raise ImageRejected("corrupt qcow2: qemu-img reports the image marked corrupt")
    if info.get("virtual-size") != header.virtual_size:
        raise ImageRejected(f"corrupt image: qemu-img reads a virtual size of "
                            f"{info.get('virtual-size')} bytes, the header says "
                            f"{header.virtual_size}")
    return header


def _qemu_img_check(path: Path) -> None:
    """qemu-img convert reads past a damaged qcow2 without a word; its check does not."""
    result = _run_limited(["qemu-img", "check", "--output=json", "-f", "qcow2", str(path)])
    if result.returncode in (0, 3):  # 3: leaked clusters only, which lose no data
        return
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        raise ImageRejected(f"corrupt qcow2: qemu-img check fails: "
                            f"{_reason(result.stderr, path)}") from None
    raise ImageRejected(f"corrupt qcow2: qemu-img check finds {report.get('corruptions', 0)} "
                        f"corruption(s) and {report.get('check-errors', 0)} error(s)")


def _run_limited(argv: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([*_LIMITS, *argv], capture_output=True, text=True,
                              timeout=_INFO_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise ImageRejected(f"qemu-img {argv[1]} takes longer than {_INFO_TIMEOUT:.0f} s on "
                            "this image") from None


def _reason(stderr: str, path: Path) -> str:
    """qemu-img's last error line, without the store's internal path."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    text = lines[-1] if lines else "no error message"
    return text.replace(str(path), "<upload>").removeprefix("qemu-img: ")
