"""The agent's one write pipeline: chunk source -> decompress -> verify -> write, then the
whole image read back from the disk and checked. Every way an image reaches a seat's disk
through the agent goes through :func:`write` (Tinkerbell's image2disk has the same shape:
a stream through small stages).

Stages, in order:

1. Delta (agent/delta.py): the disk is asked first which chunks it already holds; those are
   left alone and never asked of the source. Off, nothing is kept.
2. A chunk source delivers the packed bytes of every other data chunk, once each, in any
   order: HTTP from the image store (``fetch.HttpChunks``) or a room job's multicast group
   (``multicast.MulticastChunks``). The source runs in the caller's thread; it hands each
   chunk to a :class:`Handoff`.
3. In a thread of its own (the network and the disk overlap), each chunk is decompressed and
   checked against its manifest sha256 (manifest.unpack_chunk) before a byte of it is
   written: a wrong chunk fails the write naming it, and never reaches the disk. Zero
   chunks never cross the network: whatever the disk held there must read back as zeros,
   so they are zeroed the cheapest way the target offers: a hole punched in a file,
   BLKZEROOUT on a block device (the kernel uses WRITE ZEROES or unmap where the device
   guarantees zeros), and plain zero writes where neither works.
4. One verification rule for every source, the stricter of the two the HTTP and multicast
   paths used to have: after an fsync, the whole image range is read back from the medium
   (past the page cache) and its sha256 must be the manifest's. This covers the chunks
   delta kept as well, and it catches a disk that loses writes. The conductor then asks for
   a receipt over random extents (agent/proof.py).

The iSCSI path is not a source here: there the conductor writes through the seat's exported
disk (conductor/iscsi_writer.py) and the agent only exports it (agent/iscsi.py).
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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import requests

from labmetal.agent import fetch
from labmetal.agent.delta import matching_chunks
from labmetal.agent.disk import is_block_device, size_of
from labmetal.agent.manifest import Chunk, Manifest, unpack_chunk

if TYPE_CHECKING:
    from labmetal.agent.command_params import MulticastGroup

LOG = logging.getLogger(__name__)

BLKZEROOUT = 0x127F
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
BLOCK = 4 * 1024 * 1024

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
    """Positioned writes, cheap zeroing and an uncached read-back on a file or block device;
    every offset is from ``base`` (a region of the disk: the seat cache's origin slot)."""

    def __init__(self, path: str, base: int = 0) -> None:
        self.path = path
        self.base = base
        self.block = is_block_device(path)
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self._cheap_zeroing = True

    def __enter__(self) -> DiskSink:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def write(self, offset: int, data: bytes) -> None:
        offset += self.base
        view = memoryview(data)
        while view:
            done = os.pwrite(self.fd, view, offset)
            view, offset = view[done:], offset + done

    def zero(self, offset: int, length: int) -> None:
        if self._cheap_zeroing:
            try:
                self._zero_cheaply(self.base + offset, length)
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
        offset += self.base
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


class Handoff:
    """Where a source hands the packed chunks it got. Decompressing, verifying and writing
    run in one thread of their own, in the order handed. ``put`` waits while ``depth``
    chunks are handed and not yet written; a source that must never wait (multicast keeps
    reading its socket) stays within ``depth`` itself by looking at ``pending``. ``error``
    is the first failure of these stages; ``put`` raises it too."""

    def __init__(self, sink: DiskSink, progress: Progress, depth: int) -> None:
        self.sink = sink
        self.progress = progress
        self.error: BaseException | None = None
        self.written = self.zeroed = self.chunks = 0
        self._handed = 0  # counted by the source's thread
        self._finished = 0  # counted by the writing thread
        self._room = threading.Semaphore(depth)
        self._pool = ThreadPoolExecutor(1, "image-write")
        self._last: Future | None = None
        self._cancelled = False

    def __enter__(self) -> Handoff:
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        self._cancelled = kind is not None  # what is still queued is not written
        self._pool.shutdown(wait=True)

    @property
    def pending(self) -> int:
        """Chunks handed and not yet written (or failed)."""
        return self._handed - self._finished

    def put(self, chunk: Chunk, packed: bytes | memoryview) -> None:
        if self.error is not None:
            raise self.error
        self._room.acquire()
        self._handed += 1
        self._last = self._pool.submit(self._write, chunk, packed)

    def zero(self, chunks: list[Chunk]) -> None:
        """Zero these chunks (before anything handed after this call)."""
        if chunks:
            self._last = self._pool.submit(self._zero, chunks)

    def drain(self) -> None:
        """Wait until everything handed is written; raise the first failure."""
        if self._last is not None:
            self._last.result()
        if self.error is not None:
            raise self.error

    def _write(self, chunk: Chunk, packed: bytes | memoryview) -> None:
        try:
            if self.error is None and not self._cancelled:
                data = unpack_chunk(chunk, packed)  # raises, naming the chunk, if wrong
                self.sink.write(chunk.offset, data)
                self.written += chunk.length
                self.chunks += 1
                self.progress.done += chunk.length
        except BaseException as error:  # the source's thread raises it
            if self.error is None:
                self.error = error
        finally:
            self._finished += 1
            self._room.release()

    def _zero(self, chunks: list[Chunk]) -> None:
        try:
            for chunk in chunks:
                if self.error is not None or self._cancelled:
                    return
                self.sink.zero(chunk.offset, chunk.length)
                self.zeroed += chunk.length
                self.chunks += 1
                self.progress.done += chunk.length
        except BaseException as error:
            if self.error is None:
                self.error = error


class ChunkSource(Protocol):
    """Where the packed bytes of an image's data chunks come from."""
    ahead: int  # chunks it may hand ahead of the writes (memory: 4 MiB at most each)

    def deliver(self, manifest: Manifest, wanted: list[Chunk], handoff: Handoff) -> None:
        """Hand each of ``wanted`` (data chunks, in manifest order) to ``handoff.put`` once,
        in any order, and return; raise if that cannot be done."""

    def finish(self, ok: bool, reason: str) -> None:
        """The write is over (every chunk written when ``ok``): release what it held."""


def check_fits(target: str, needed: int) -> None:
    size = size_of(target)
    if size < needed:
        raise ValueError(f"disk {target} is {size} bytes, the image needs {needed}")


def write(manifest: Manifest, source: ChunkSource, target: str, progress: Progress,
          have: frozenset[int] | None = None, base: int = 0) -> WriteResult:
    """The image onto ``target`` (disk, partition or file) from its byte ``base`` (default:
    its start), its chunks from ``source``. ``have``: the chunks the disk already holds
    (checked by the caller); None scans the disk for them (delta), an empty set writes
    everything."""
    check_fits(target, base + manifest.raw_size)
    started = time.monotonic()
    if have is None:
        have = matching_chunks(target, manifest, progress, base)
    scanned = time.monotonic()
    needed = [chunk for chunk in manifest.chunks if chunk.index not in have]
    progress.total = manifest.raw_size
    progress.done = manifest.raw_size - sum(chunk.length for chunk in needed)
    with DiskSink(target, base) as sink:
        with Handoff(sink, progress, source.ahead) as handoff:
            handoff.zero([chunk for chunk in needed if chunk.zero])
            try:
                source.deliver(manifest, [chunk for chunk in needed if not chunk.zero],
                               handoff)
                handoff.drain()
            except BaseException as error:
                source.finish(False, str(error) or type(error).__name__)
                raise
            source.finish(True, "")
        sink.sync()
        digest = sink.sha256(0, manifest.raw_size)
    if digest != manifest.raw_sha256:
        raise ValueError(f"{target} reads back as sha256 {digest}, the image is "
                         f"{manifest.raw_sha256}")
    seconds = round(time.monotonic() - started, 2)
    skipped = manifest.raw_size - handoff.written - handoff.zeroed
    LOG.info("wrote %d bytes (%d zeroed, %d already there in %d of %d chunks, scanned in "
             "%.1f s) to %s in %.1f s, verified by reading back", handoff.written,
             handoff.zeroed, skipped, len(manifest.chunks) - len(needed), len(manifest.chunks),
             scanned - started, target, seconds)
    return WriteResult(digest, handoff.written, handoff.zeroed, seconds,
                       chunks_total=len(manifest.chunks), chunks_written=handoff.chunks,
                       bytes_skipped=skipped, scan_seconds=round(scanned - started, 2))


def chunk_source(session: requests.Session, packed_url: str,
                 multicast: MulticastGroup | None) -> ChunkSource:
    """Where an image's chunks come from: its packed file over HTTP, or a room job's
    multicast group (a deploy's, or a room opening a TP)."""
    if multicast is None:
        return fetch.HttpChunks(session, packed_url)
    from labmetal.agent import multicast as receiver  # zfec is needed for multicast only
    return receiver.MulticastChunks(multicast.group, multicast.port, multicast.sender_address,
                                    multicast.job)


def write_image(session: requests.Session, manifest: Manifest, packed_url: str, target: str,
                progress: Progress, readback: bool = False, delta: bool = True) -> WriteResult:
    """:func:`write` with the chunks over HTTP (the benchmarks' entry). ``readback`` is
    ignored: every write is read back."""
    return write(manifest, fetch.HttpChunks(session, packed_url), target, progress,
                 None if delta else frozenset())
