"""Delta re-imaging: which of an image's chunks a disk already holds, so that only the others
cross the network and get written (the usual case between two classes: the seat still has
last week's copy of the image, with a few chunks changed by the students).

A chunk matches when the disk's bytes at its offset have the manifest's sha256, or, for a
zero chunk, are all zeros (a memcmp, much cheaper than a hash). On a sparse file the holes
are found with SEEK_DATA/SEEK_HOLE and never read: a chunk inside a hole reads as zeros.
A block device's zeros have to be read. The rest is read in order with one pread per chunk
and hashed by a pool of two threads (pread and hashlib let go of the GIL), so one chunk is
read while the one before is hashed. Chunks past the disk's end do not match.

The same set serves every transport: the HTTP writer fetches only what is missing, the
multicast receiver takes it as the chunks it already has.
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from labmetal.agent.manifest import Chunk, Manifest

if TYPE_CHECKING:
    from labmetal.agent.writer import Progress

READERS = 2  # measured: 2 overlaps read and hash; more only adds contention on 2 cores
AHEAD = 4  # chunks read ahead of the one being decided (4 MiB each)


@dataclass(frozen=True)
class Scan:
    matching: frozenset[int]  # chunks whose bytes on the disk are the image's
    holes: frozenset[int]  # of those, zero chunks in a hole of a sparse file: nothing to read


def matching_chunks(target: str, manifest: Manifest, progress: Progress | None = None,
                    base: int = 0) -> frozenset[int]:
    """The indexes of the chunks whose bytes on ``target`` (from its byte ``base``) already
    equal the image's. ``progress`` counts the bytes examined (a hole or a chunk past the
    end counts too)."""
    return scan(target, manifest, progress, base).matching


def scan(target: str, manifest: Manifest, progress: Progress | None = None,
         base: int = 0) -> Scan:
    """matching_chunks, and which of them are holes (the writer's whole-image hash takes
    zeros for those instead of reading them again)."""
    if progress is not None:
        progress.done, progress.total = 0, manifest.raw_size
    fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END) - base  # a block device's size too
        data = _data_extents(fd, min(size, manifest.raw_size), base) \
            if stat.S_ISREG(os.fstat(fd).st_mode) else None
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        matching: set[int] = set()
        holes: set[int] = set()
        zeros = bytes(manifest.chunk_size)
        with ThreadPoolExecutor(READERS, "delta-scan") as pool:
            pending: deque[tuple[Chunk, Future[bool] | bool]] = deque()
            for chunk in manifest.chunks:
                if chunk.offset + chunk.length > size:
                    verdict: Future[bool] | bool = False
                elif data is not None and not data.overlaps(chunk.offset, chunk.length):
                    verdict = chunk.zero  # a hole reads as zeros
                    if chunk.zero:
                        holes.add(chunk.index)
                else:
                    verdict = pool.submit(_holds, fd, chunk, zeros, base)
                pending.append((chunk, verdict))
                while len(pending) > AHEAD or (pending and not isinstance(pending[0][1], Future)):
                    _decide(*pending.popleft(), matching, progress)
            while pending:
                _decide(*pending.popleft(), matching, progress)
        return Scan(frozenset(matching), frozenset(holes))
    finally:
        os.close(fd)


def _decide(chunk: Chunk, verdict: Future[bool] | bool, matching: set[int],
            progress: Progress | None) -> None:
    if verdict if isinstance(verdict, bool) else verdict.result():
        matching.add(chunk.index)
    if progress is not None:
        progress.done += chunk.length


def _holds(fd: int, chunk: Chunk, zeros: bytes, base: int = 0) -> bool:
    data = read_exactly(fd, base + chunk.offset, chunk.length)
    if chunk.zero:
        return data == (zeros if len(data) == len(zeros) else bytes(len(data)))
    return hashlib.sha256(data).hexdigest() == chunk.sha256


def read_exactly(fd: int, offset: int, length: int) -> bytes:
    data = os.pread(fd, length, offset)
    while len(data) < length:  # a short read is rare, but allowed
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            raise OSError(errno.EIO, f"the disk ends at {offset + len(data)}, inside a chunk")
        data += more
    return data


class _DataExtents:
    """Where a sparse file holds data, below ``end``; asked in increasing offsets."""

    def __init__(self, extents: list[tuple[int, int]]) -> None:
        self.extents = extents
        self.next = 0

    def overlaps(self, offset: int, length: int) -> bool:
        while self.next < len(self.extents) and self.extents[self.next][1] <= offset:
            self.next += 1
        return self.next < len(self.extents) and self.extents[self.next][0] < offset + length


def _data_extents(fd: int, end: int, base: int = 0) -> _DataExtents:
    """The data extents in [base, base + end) of the file, from ``base``."""
    extents: list[tuple[int, int]] = []
    position = base
    end += base
    while position < end:
        try:
            start = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:  # only a hole from here on
                break
            if error.errno == errno.EINVAL:  # no SEEK_DATA here: all of it is data
                return _DataExtents(_shifted(extents + [(position, end)], base))
            raise
        if start >= end:
            break
        stop = os.lseek(fd, start, os.SEEK_HOLE)
        extents.append((start, min(stop, end)))
        position = stop
    return _DataExtents(_shifted(extents, base))


def _shifted(extents: list[tuple[int, int]], base: int) -> list[tuple[int, int]]:
    return [(start - base, stop - base) for start, stop in extents]
