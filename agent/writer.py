"""The image pipeline's last stages: each chunk unpacked and verified, written at its offset,
the whole image hashed as it goes by and checked against the manifest after an fsync. With
``readback`` the whole range is read back from the medium instead (slower: the disk is
read once more; it catches a disk that loses writes).

Zero chunks never cross the network, but whatever the disk held there must read back as
zeros, so they are zeroed the cheapest way the target offers: a hole punched in a file,
BLKZEROOUT on a block device (the kernel uses WRITE ZEROES or unmap where the device
guarantees zeros), and plain zero writes where neither works.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import struct
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import requests

from labmetal.agent import fetch
from labmetal.agent.disk import is_block_device, size_of
from labmetal.images.manifest import Manifest, unpack_chunk

LOG = logging.getLogger(__name__)

BLKZEROOUT = 0x127F
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
BLOCK = 4 * 1024 * 1024

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


@dataclass
class Progress:
    done: int = 0
    total: int = 0


@dataclass(frozen=True)
class WriteResult:
    raw_sha256: str
    bytes_written: int
    bytes_zeroed: int
    seconds: float


class DiskSink:
    """Positioned writes, cheap zeroing and an uncached read-back on a file or block device."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.block = is_block_device(path)
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self._cheap_zeroing = True

    def __enter__(self) -> DiskSink:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            done = os.pwrite(self.fd, view, offset)
            view, offset = view[done:], offset + done

    def zero(self, offset: int, length: int) -> None:
        if self._cheap_zeroing:
            try:
                self._zero_cheaply(offset, length)
                return
            except OSError as error:
                if error.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                    raise
                LOG.info("%s cannot zero cheaply (%s); writing zeros", self.path, error.strerror)
                self._cheap_zeroing = False
        zeros = bytes(min(length, BLOCK))
        for start in range(offset, offset + length, BLOCK):
            self.write(start, zeros[:min(BLOCK, offset + length - start)])

    def _zero_cheaply(self, offset: int, length: int) -> None:
        if self.block:
            fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, length))
        elif _libc.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                             offset, length) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    def sync(self) -> None:
        os.fsync(self.fd)

    def sha256(self, offset: int, length: int) -> str:
        """Read from the medium, not the page cache the writes just filled (call after sync)."""
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)
        digest = hashlib.sha256()
        end = offset + length
        while offset < end:
            data = os.pread(self.fd, min(BLOCK, end - offset), offset)
            if not data:
                raise OSError(f"{self.path} ends at {offset}, before the image does ({end})")
            digest.update(data)
            offset += len(data)
        return digest.hexdigest()


def check_fits(target: str, needed: int) -> None:
    size = size_of(target)
    if size < needed:
        raise ValueError(f"disk {target} is {size} bytes, the image needs {needed}")


def write_image(session: requests.Session, manifest: Manifest, packed_url: str, target: str,
                progress: Progress, readback: bool = False) -> WriteResult:
    """Stream an image onto ``target`` (disk, partition or file) from its start. The whole
    image's hash is computed in a second thread (hashlib lets go of the GIL), next to the
    writes, one chunk behind at most."""
    check_fits(target, manifest.raw_size)
    started = time.monotonic()
    progress.done, progress.total = 0, manifest.raw_size
    written = zeroed = 0
    whole = hashlib.sha256()
    zeros = bytes(manifest.chunk_size)
    with DiskSink(target) as sink, ThreadPoolExecutor(1, "image-hash") as hasher:
        hashed: Future | None = None
        for chunk, packed in fetch.packed_chunks(session, packed_url, manifest.chunks):
            data = zeros[:chunk.length] if chunk.zero else unpack_chunk(chunk, packed)
            if hashed is not None:
                hashed.result()
            hashed = hasher.submit(whole.update, data)
            if chunk.zero:
                sink.zero(chunk.offset, chunk.length)
                zeroed += chunk.length
            else:
                sink.write(chunk.offset, data)
                written += chunk.length
            progress.done += chunk.length
        if hashed is not None:
            hashed.result()
        sink.sync()
        digest = sink.sha256(0, manifest.raw_size) if readback else whole.hexdigest()
    if digest != manifest.raw_sha256:
        source = "reads back" if readback else "was written"
        raise ValueError(f"{target} {source} as sha256 {digest}, the image is "
                         f"{manifest.raw_sha256}")
    seconds = round(time.monotonic() - started, 2)
    LOG.info("wrote %d bytes (%d zeroed) to %s in %.1f s, verified%s", written, zeroed, target,
             seconds, " by reading back" if readback else "")
    return WriteResult(digest, written, zeroed, seconds)
