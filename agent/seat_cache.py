"""The seat's labmetal cache: a region near the end of the seat's disk that holds a copy of
a TP template version (the *origin*) and a student's overlay (a device-mapper persistent
snapshot store, agent/cow.py), so that a session runs from the seat's own disk and needs
nothing from the network while the student works (DESIGN §5, issue 16).

Why a region of the disk and not a filesystem with files in it: the session initramfs
(images/session_init.sh) maps the origin and the overlay with two ``dmsetup`` linear
targets and a snapshot target on top, with no loop device and no filesystem between the
OS and the disk, which is what keeps a session at local disk speed; and the agent reads
and writes it with plain positioned I/O, on a seat's block device or a light seat's file.

Where: the region ends 1 MiB before the disk's end (the last MiB is a GPT's backup header,
which the agent's metadata wipe zeroes) and is ``size`` bytes long, a multiple of 64 MiB,
so that the agent finds it again by looking at a few places (labmetal also tells it where
it last saw it). Room
images are written from the disk's start and partition images get partitions sized to the
image, so re-imaging the seat keeps the cache; an image that would reach into it is refused
(:func:`check_room_image`).

Layout inside the region (offsets from its start)::

    0          sector 0: MAGIC (16 bytes), the cache id (32 hex digits)
    4096       the state: a length (4 bytes LE), a sha256 of the JSON (32 bytes), the JSON
    512 KiB    save requests from inside the session OS (4096 bytes, REQUESTS_MAGIC)
    1 MiB      the origin: the template version's raw bytes, as the image store has them
    cow_offset the overlay (COW store), to the end of the region; cow_offset is the origin
               slot's end, 1 MiB aligned

The state says what the slots hold: ``origin`` (template name, version, the raw image's
sha256 and size, and whether its write finished and was read back) and ``overlay`` (the
session it belongs to, its origin's sha256, and whether labmetal verified its upload).
A seat whose overlay was not verified as uploaded holds the only copy of the end of that
session: nothing replaces it before it is uploaded.

What is evicted and when: the origin slot holds one template version, the one last used;
a session of another version replaces it (only the chunks that differ are fetched,
agent/delta.py). The overlay slot holds one session; it is reused once labmetal verified
its upload. The state is written after what it describes is on the disk (and fsynced),
so a power cut leaves it describing older, still true contents.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import struct
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from labmetal.agent.disk import size_of

MAGIC = b"LABMETAL-CACHE01"
MIB = 1024 * 1024
SECTOR = 512
END_GAP = MIB  # the disk's last MiB: a GPT backup header, zeroed by the metadata wipe
STATE_OFFSET = 4096
STATE_MAX = 64 * 1024
# Save points asked from inside the session OS (images/session_save.sh writes them: the OS
# has only sh and dd): a magic line, then one label per line, NULs after; parsed as hostile.
REQUESTS_OFFSET = 512 * 1024
REQUESTS_SIZE = 4096
REQUESTS_MAGIC = b"LABMETAL-SAVE01\n"
REQUESTS_MAX = 16
LABEL_MAX = 64
ORIGIN_OFFSET = MIB
SIZE_STEP = 64 * MIB  # a cache's size is a multiple of it
_ID = re.compile(r"[0-9a-f]{32}")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_SHA = re.compile(r"[0-9a-f]{64}")


class CacheError(Exception):
    """The cache cannot be made or used as asked; the message is for a person."""


@dataclass(frozen=True)
class Origin:
    """The template version in the origin slot."""
    template: str
    version: int
    sha256: str  # the raw image's
    size: int  # bytes
    complete: bool = False  # written and read back whole


@dataclass(frozen=True)
class Overlay:
    """The session whose overlay is in the COW slot."""
    session: str
    origin_sha256: str  # the template version it is an overlay of
    chunk_sectors: int
    uploaded: bool = True  # labmetal verified everything in it; False: the only copy


@dataclass(frozen=True)
class State:
    origin: Origin | None = None
    overlay: Overlay | None = None

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> State:
        try:
            raw = json.loads(data)
            origin = raw.get("origin")
            overlay = raw.get("overlay")
            state = cls(Origin(**origin) if origin else None,
                        Overlay(**overlay) if overlay else None)
        except (ValueError, TypeError, AttributeError, RecursionError) as error:
            raise CacheError(f"the cache's state cannot be read: {error}") from None
        _check_state(state)
        return state


def _check_state(state: State) -> None:
    """The state is on a disk that a student (root in the session OS) could write: every
    field is checked before it is believed."""
    if state.origin is not None:
        o = state.origin
        if not (isinstance(o.template, str) and len(o.template) <= 64
                and isinstance(o.version, int) and o.version > 0
                and isinstance(o.sha256, str) and _SHA.fullmatch(o.sha256)
                and isinstance(o.size, int) and o.size > 0 and isinstance(o.complete, bool)):
            raise CacheError("the cache's origin record is not valid")
    if state.overlay is not None:
        v = state.overlay
        if not (isinstance(v.session, str) and _UUID.fullmatch(v.session)
                and isinstance(v.origin_sha256, str) and _SHA.fullmatch(v.origin_sha256)
                and isinstance(v.chunk_sectors, int) and 8 <= v.chunk_sectors <= 2048
                and v.chunk_sectors & (v.chunk_sectors - 1) == 0
                and isinstance(v.uploaded, bool)):
            raise CacheError("the cache's overlay record is not valid")


@dataclass(frozen=True)
class Cache:
    """A seat's cache region: on ``disk`` from byte ``start``, ``size`` bytes."""
    disk: str
    start: int
    size: int
    cache_id: str
    state: State = field(default_factory=State)

    @property
    def end(self) -> int:
        return self.start + self.size

    def cow_offset(self, origin_size: int) -> int:
        """Where the overlay starts (from the region's start) for an origin of that size."""
        return ORIGIN_OFFSET + align(origin_size)

    def cow_size(self, origin_size: int) -> int:
        """The overlay slot's size; CacheError if the origin leaves it none (a state a
        student rewrote can claim any origin size)."""
        size = self.size - self.cow_offset(origin_size)
        if size < MIB:
            raise CacheError(f"an origin of {origin_size} bytes leaves this cache "
                             f"({self.size} bytes) no room for an overlay")
        return size

    def describe(self) -> dict[str, Any]:
        """What labmetal records of the seat's cache (agent → API)."""
        return {"cache_id": self.cache_id, "start": self.start, "size": self.size,
                "state": asdict(self.state)}


def align(size: int) -> int:
    return -(-size // MIB) * MIB


def last_byte(disk_size: int) -> int:
    """Where a cache on a disk of ``disk_size`` bytes ends (1 MiB aligned, before the gap)."""
    return (disk_size - END_GAP) // MIB * MIB


def place(disk_size: int, size: int) -> int:
    """The region's start on a disk of ``disk_size`` bytes."""
    start = last_byte(disk_size) - size
    if size < SIZE_STEP or size % SIZE_STEP or start < 64 * MIB:
        raise CacheError(f"a cache of {size} bytes does not fit on a disk of {disk_size} "
                         f"bytes (it must be a multiple of {SIZE_STEP // MIB} MiB and leave "
                         "the room images 64 MiB at least)")
    return start


def find(disk: str, hint: int | None = None) -> Cache | None:
    """The cache on ``disk``; None if it has none. ``hint``: where labmetal last saw it
    start (looked at first). Otherwise every start a cache whose size is a multiple of
    SIZE_STEP (up to 90 % of the disk) can have is looked at, from the smallest cache."""
    disk_size = size_of(disk)
    last = last_byte(disk_size)
    starts = [] if hint is None or hint % MIB or not 0 < hint < last else [hint]
    starts += range(last - SIZE_STEP, max(0, disk_size // 10) - 1, -SIZE_STEP)
    fd = os.open(disk, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for start in starts:
            head = os.pread(fd, 64, start)
            if head[:16] != MAGIC:
                continue
            cache_id = head[16:48].decode("ascii", "replace")
            if not _ID.fullmatch(cache_id):
                continue
            return Cache(disk, start, last - start, cache_id, _read_state(fd, start))
        return None
    finally:
        os.close(fd)


def _read_state(fd: int, start: int) -> State:
    head = os.pread(fd, 36, start + STATE_OFFSET)
    if len(head) < 36:
        raise CacheError("the cache's state is cut short")
    length = struct.unpack_from("<I", head)[0]
    if length == 0:
        return State()
    if length > STATE_MAX:
        raise CacheError(f"the cache's state claims {length} bytes")
    data = os.pread(fd, length, start + STATE_OFFSET + 36)
    if hashlib.sha256(data).digest() != head[4:36]:
        raise CacheError("the cache's state does not match its checksum")
    return State.from_json(data)


def create(disk: str, size: int) -> Cache:
    """A new, empty cache of ``size`` bytes on ``disk`` (what was there is forgotten)."""
    size = size // SIZE_STEP * SIZE_STEP
    start = place(size_of(disk), size)
    cache = Cache(disk, start, size, secrets.token_hex(16))
    fd = os.open(disk, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.pwrite(fd, bytes(STATE_OFFSET + 36), start)
        os.pwrite(fd, bytes(REQUESTS_SIZE), start + REQUESTS_OFFSET)
        os.fsync(fd)
        os.pwrite(fd, MAGIC + cache.cache_id.encode(), start)
        os.fsync(fd)
    finally:
        os.close(fd)
    return cache


def ensure(disk: str, size: int, hint: int | None = None) -> Cache:
    """The disk's cache, made if it has none. An existing one keeps its size and contents
    (it may hold the only copy of a session)."""
    return find(disk, hint) or create(disk, size)


def save_state(cache: Cache, state: State) -> Cache:
    """Record what the slots hold (after it is on the disk: the caller fsynced)."""
    _check_state(state)
    data = state.to_json()
    if len(data) > STATE_MAX:
        raise CacheError("the cache's state is too large")
    fd = os.open(cache.disk, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.pwrite(fd, struct.pack("<I", len(data)) + hashlib.sha256(data).digest() + data,
                  cache.start + STATE_OFFSET)
        os.fsync(fd)
    finally:
        os.close(fd)
    return replace(cache, state=state)


def save_requests(cache: Cache) -> list[str]:
    """The labels of the save points asked from inside the session OS, in order: at most
    REQUESTS_MAX, each 1 to LABEL_MAX printable characters; anything else is left out
    (the student is root and may have written anything there)."""
    fd = os.open(cache.disk, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.pread(fd, REQUESTS_SIZE, cache.start + REQUESTS_OFFSET)
    finally:
        os.close(fd)
    if not data.startswith(REQUESTS_MAGIC):
        return []
    labels = []
    for line in data[len(REQUESTS_MAGIC):].split(b"\0", 1)[0].split(b"\n"):
        try:
            label = line.decode("utf-8").strip()
        except UnicodeDecodeError:
            continue
        if 0 < len(label) <= LABEL_MAX and label.isprintable():
            labels.append(label)
    return labels[:REQUESTS_MAX]


def clear_save_requests(cache: Cache) -> None:
    """The requests were carried by a verified upload, or a new session starts here."""
    fd = os.open(cache.disk, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.pwrite(fd, bytes(REQUESTS_SIZE), cache.start + REQUESTS_OFFSET)
        os.fsync(fd)
    finally:
        os.close(fd)


def check_room_image(disk: str, needed: int) -> None:
    """Refuse a room image (or partition layout) of ``needed`` bytes from the disk's start
    that would reach into the cache."""
    cache = find(disk)
    if cache is not None and needed > cache.start:
        raise CacheError(f"the image needs {needed} bytes from the disk's start, and "
                         f"labmetal's cache starts at byte {cache.start}: it would "
                         "overwrite the cache (make the cache smaller, or use a larger disk)")


def kernel_args(cache: Cache, root_offset: int, root_size: int, fstype: str) -> list[str]:
    """The session initramfs's command line for this cache (images/session_init.sh): in
    512-byte sectors; the origin and overlay offsets from the region's start."""
    origin = cache.state.origin
    overlay = cache.state.overlay
    if origin is None or overlay is None or not origin.complete:
        raise CacheError("the cache holds no complete template and overlay to boot")
    cow = cache.cow_offset(origin.size)
    return [f"labmetal.cache={cache.cache_id}@{cache.start // SECTOR}",
            f"labmetal.origin={ORIGIN_OFFSET // SECTOR}+{origin.size // SECTOR}",
            f"labmetal.cow={cow // SECTOR}+{cache.cow_size(origin.size) // SECTOR}",
            f"labmetal.chunk={overlay.chunk_sectors}",
            f"labmetal.root={root_offset // SECTOR}+{root_size // SECTOR}",
            f"labmetal.fstype={fstype}"]
