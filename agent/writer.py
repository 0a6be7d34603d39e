"""The image pipeline's last stages: each chunk unpacked and verified, written at its offset,
the whole image hashed as it goes by and checked against the manifest after an fsync. With
``readback`` the whole range is read back from the medium instead (slower: the disk is
read once more; it catches a disk that loses writes).

With ``delta`` (the default) the disk is scanned first (agent/delta.py) and only the chunks
it does not already hold are fetched and written. The whole-image hash still covers every
byte of the image range as the disk holds it afterwards: the chunks left alone are read
again, in order, and hashed with the rest (those the scan found in a file's holes are
taken as the zeros they read as). Trusting the scan's per-chunk verdicts alone would
leave the manifest's own consistency unchecked.

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
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from queue import Full, Queue
from typing import Any, Iterator, TypeVar

import requests

from labmetal.agent import fetch
from labmetal.agent.delta import Scan, read_exactly, scan as scan_disk
from labmetal.agent.disk import is_block_device, size_of
from labmetal.agent.manifest import Manifest, unpack_chunk

LOG = logging.getLogger(__name__)

BLKZEROOUT = 0x127F
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
BLOCK = 4 * 1024 * 1024
FETCH_AHEAD = 8  # chunks received ahead of the writes (compressed, 4 MiB at most each)
HASH_BEHIND = 8  # chunks the whole-image hash may lag behind the writes
_END = object()
T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


@dataclass
class Progress:
    """Bytes of the image done out of ``total``. A delta write goes through it twice: the
    scan (bytes examined), then the write (bytes settled: written, zeroed or kept)."""
    done: int = 0
    total: int = 0


@dataclass(frozen=True)
class WriteResult:
    raw_sha256: str
    bytes_written: int
    bytes_zeroed: int
    seconds: float
    chunks_total: int = 0
    chunks_written: int = 0  # written or zeroed; the others were already on the disk
    bytes_skipped: int = 0  # in the chunks already on the disk
    scan_seconds: float = 0.0


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


@contextmanager
def _ahead(items: Iterator[T], depth: int) -> Iterator[Iterator[T]]:
    """``items`` produced by a thread of their own, up to ``depth`` ahead of the consumer;
    the producer's exception is raised in the consumer. The generator is closed (its HTTP
    response with it) by the thread that runs it, also when the consumer stops early."""
    queue: Queue[tuple[Any, BaseException | None]] = Queue(depth)
    stop = threading.Event()

    def put(item: Any, error: BaseException | None = None) -> bool:
        while not stop.is_set():
            try:
                queue.put((item, error), timeout=0.2)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as error:  # handed to the consumer, who raises it
            put(_END, error)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    def consume() -> Iterator[T]:
        while True:
            item, error = queue.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item

    producer = threading.Thread(target=produce, name="fetch-ahead", daemon=True)
    producer.start()
    try:
        yield consume()
    finally:
        stop.set()
        producer.join(timeout=5)  # a stalled read ends on its own; the disk is not its


def check_fits(target: str, needed: int) -> None:
    size = size_of(target)
    if size < needed:
        raise ValueError(f"disk {target} is {size} bytes, the image needs {needed}")


def write_image(session: requests.Session, manifest: Manifest, packed_url: str, target: str,
                progress: Progress, readback: bool = False, delta: bool = True) -> WriteResult:
    """Stream an image onto ``target`` (disk, partition or file) from its start. With
    ``delta``, only the chunks the disk does not hold already are fetched and written.
    Three things overlap: the network (a thread receiving up to FETCH_AHEAD chunks ahead),
    the writes, and the whole image's hash (a thread of its own: hashlib lets go of the
    GIL, up to HASH_BEHIND chunks behind)."""
    check_fits(target, manifest.raw_size)
    started = time.monotonic()
    found = scan_disk(target, manifest, progress) if delta else Scan(frozenset(), frozenset())
    have = found.matching
    scanned = time.monotonic()
    needed = [chunk for chunk in manifest.chunks if chunk.index not in have]
    progress.done, progress.total = 0, manifest.raw_size
    written = zeroed = skipped = 0
    whole = hashlib.sha256()
    zeros = bytes(manifest.chunk_size)
    hashed: deque[Future] = deque()
    with DiskSink(target) as sink, ThreadPoolExecutor(1, "image-hash") as hasher, \
            _ahead(fetch.packed_chunks(session, packed_url, needed, manifest.packed_size),
                   FETCH_AHEAD) as fetched:
        for chunk in manifest.chunks:
            if chunk.index in found.holes:
                data = zeros[:chunk.length]
                skipped += chunk.length
            elif chunk.index in have:
                data = b"" if readback else read_exactly(sink.fd, chunk.offset, chunk.length)
                skipped += chunk.length
            else:
                fetched_chunk, packed = next(fetched)
                assert fetched_chunk is chunk, "packed_chunks yields the chunks in order"
                data = zeros[:chunk.length] if chunk.zero else unpack_chunk(chunk, packed)
                if chunk.zero:
                    sink.zero(chunk.offset, chunk.length)
                    zeroed += chunk.length
                else:
                    sink.write(chunk.offset, data)
                    written += chunk.length
            if not readback:  # one worker: the updates run in order
                hashed.append(hasher.submit(whole.update, data))
                while len(hashed) > HASH_BEHIND or hashed and hashed[0].done():
                    hashed.popleft().result()
            progress.done += chunk.length
        for pending in hashed:
            pending.result()
        sink.sync()
        digest = sink.sha256(0, manifest.raw_size) if readback else whole.hexdigest()
    if digest != manifest.raw_sha256:
        source = "reads back" if readback else "was written"
        raise ValueError(f"{target} {source} as sha256 {digest}, the image is "
                         f"{manifest.raw_sha256}")
    seconds = round(time.monotonic() - started, 2)
    LOG.info("wrote %d bytes (%d zeroed, %d already there in %d of %d chunks, scanned in "
             "%.1f s) to %s in %.1f s, verified%s", written, zeroed, skipped, len(have),
             len(manifest.chunks), scanned - started, target, seconds,
             " by reading back" if readback else "")
    return WriteResult(digest, written, zeroed, seconds, chunks_total=len(manifest.chunks),
                       chunks_written=len(needed), bytes_skipped=skipped,
                       scan_seconds=round(scanned - started, 2))
