"""The device-mapper persistent snapshot exception store ("COW store"), read and written
without the kernel: the agent uploads a student's changed chunks from it, and writes one that
holds a student's chunks when they resume on another seat. The seat's session initramfs then
assembles ``dmsetup create ... snapshot <origin> <cow> P <chunk>`` over it.

The format, as the kernel reads and writes it (drivers/md/dm-snap-persistent.c, with
dm-exception-store.c for the chunk size and dm-snap.c for the exception table):

- Everything is little-endian and counted in chunks of ``chunk_size`` 512-byte sectors.
  Chunk 0 is the header ``(u32 magic 0x70416e53 "SnAp", u32 valid, u32 version, u32
  chunk_size)``, the rest of the chunk zeros. A magic of 0 means a new store: the kernel then
  writes the header and zeros the first metadata chunk itself. Any other magic is refused.
- The version must be 1 (checked before ``valid``). ``valid == 0`` means the snapshot was
  invalidated (it overflowed or an I/O failed); the kernel loads it as invalid and never reads
  its exceptions again. Any non-zero ``valid`` counts as valid for the kernel, so here too.
- The header's chunk size wins over the one in the dmsetup table (the kernel only warns). The
  kernel wants a power of two and at most INT_MAX bytes; labmetal asks for 8..2048 sectors
  (4 KiB..1 MiB): a 4 KiB chunk is a multiple of every disk's logical block, and the cap
  bounds the memory a hostile header can make the reader take.
- Then come areas: ``exceptions_per_area = chunk_bytes // 16``; area i's metadata chunk is at
  ``1 + i * (exceptions_per_area + 1)``, followed by room for that many data chunks. A
  metadata chunk is an array of ``(u64 old_chunk, u64 new_chunk)``: the origin chunk and the
  COW chunk holding its data. ``new_chunk == 0`` ends the list (it would be the header); the
  rest of that metadata chunk is ignored. A full area goes on in the next one, so after a full
  last area the next metadata chunk must exist and read as zeros (the kernel zeroes it before
  it commits the entry that fills an area; a read past the device's end fails the load).
- The kernel checks nothing else while loading: a new_chunk pointing at a metadata chunk or
  past the end, or an old_chunk past the origin's end, is taken as is. It appends where the
  list ended (``current_committed`` = the index of the first zero entry of the last area) and
  allocates data chunks from the highest new_chunk + 1, skipping metadata chunks. So a store
  written here lays exception k's data at area (k // epa)'s data chunk (k % epa), as the kernel
  itself does when exceptions commit in order.
- Duplicates: the kernel never writes two exceptions for one origin chunk (it looks the chunk
  up before copying it, and a merge clears entries from the end of the list). On load, dm-snap.c
  keeps both, in a hash bucket sorted by origin chunk where runs of consecutive chunks are
  merged, and a read gets whichever it finds first: usually the earlier one, sometimes the
  later one. As that is not defined, ``read_store`` refuses a store with a duplicate;
  ``CowStore.changed`` lets the last one win for a store built by hand.
- Merging (the snapshot-merge target) copies chunks back into the origin and clears exceptions
  from the end of the list, rewriting the area; labmetal never merges, but a store in the
  middle of a merge still reads as a shorter, consistent list.

The input is hostile: a student is root in the session OS and can write the COW device. So
every index is checked against the store's size and the origin's size, the reader reads only
chunk-sized pieces inside ``size``, and it walks at most the areas that fit in ``size``.
"""
from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

SNAP_MAGIC = 0x70416E53  # "SnAp"
DISK_VERSION = 1
SECTOR = 512
MIN_CHUNK_SECTORS = 8  # 4 KiB
MAX_CHUNK_SECTORS = 2048  # 1 MiB
_HEADER = struct.Struct("<4I")  # magic, valid, version, chunk_size (sectors)
_EXCEPTION = struct.Struct("<QQ")  # old_chunk (origin), new_chunk (COW)


class Device(Protocol):
    """What the store is read from and written to: a file, or a region of a disk."""

    def seek(self, offset: int, whence: int = 0, /) -> int: ...

    def read(self, size: int = -1, /) -> bytes | None: ...

    def write(self, data: bytes | bytearray | memoryview, /) -> int | None: ...

    def flush(self) -> None: ...

    def fileno(self) -> int: ...


class CowError(Exception):
    """The COW store cannot be used; the message says why, for a person."""


@dataclass(frozen=True)
class CowStore:
    chunk_sectors: int
    exceptions: tuple[tuple[int, int], ...]  # (origin chunk, cow chunk), in store order

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_sectors * SECTOR

    def changed(self) -> list[tuple[int, int]]:
        """(origin chunk, cow chunk) for each changed origin chunk, sorted by origin chunk;
        for an origin chunk listed twice, the last one wins."""
        return sorted(dict(self.exceptions).items())


def capacity(size: int, chunk_sectors: int) -> int:
    """How many data chunks a store of ``size`` bytes holds, keeping room for the zeroed
    metadata chunk that must follow a full last area."""
    chunk_bytes = _check_chunk_sectors(chunk_sectors) * SECTOR
    per_area = chunk_bytes // _EXCEPTION.size
    after_first_area = size // chunk_bytes - 2  # header and area 0's metadata chunk
    if after_first_area <= 0:
        return 0
    full, rest = divmod(after_first_area, per_area + 1)
    # Each full area takes its data chunks and the next area's metadata chunk; a last area
    # with every data chunk but no room for the next metadata chunk loses one.
    return full * per_area + min(rest, per_area - 1)


def read_store(dev: Device, size: int, origin_size: int) -> CowStore | None:
    """The store on ``dev`` (seekable, ``size`` bytes long) for an origin of ``origin_size``
    bytes; None for a new store (header magic 0). Raises CowError if the store cannot be used."""
    if size < _HEADER.size:
        raise CowError(f"a store of {size} bytes is too small to hold a header")
    magic, valid, version, chunk_sectors = _HEADER.unpack(_read_exact(dev, 0, _HEADER.size))
    if magic == 0:
        return None
    if magic != SNAP_MAGIC:
        raise CowError(f"not a snapshot store (magic {magic:#010x})")
    if version != DISK_VERSION:
        raise CowError(f"snapshot store version {version}, only {DISK_VERSION} is known")
    if not valid:
        raise CowError("invalidated (the snapshot overflowed or failed)")
    chunk_bytes = _check_chunk_sectors(chunk_sectors) * SECTOR
    store_chunks = size // chunk_bytes
    if store_chunks < 2:
        raise CowError(f"a store of {size} bytes is smaller than its header and first "
                       f"metadata chunk ({2 * chunk_bytes} bytes)")
    origin_chunks = -(-origin_size // chunk_bytes)
    stride = chunk_bytes // _EXCEPTION.size + 1
    exceptions: list[tuple[int, int]] = []
    seen: dict[int, int] = {}  # origin chunk -> its exception's number
    area = 0
    while True:
        where = 1 + area * stride
        if where >= store_chunks:
            raise CowError(f"area {area - 1} is full but the next metadata chunk ({where}) is "
                           f"past the end of the store ({store_chunks} chunks)")
        metadata = _read_exact(dev, where * chunk_bytes, chunk_bytes)
        for old, new in _EXCEPTION.iter_unpack(metadata):
            if new == 0:
                return CowStore(chunk_sectors, tuple(exceptions))
            number = len(exceptions)
            if new >= store_chunks:
                raise CowError(f"exception {number} points outside the store (chunk {new} of "
                               f"{store_chunks})")
            if (new - 1) % stride == 0:
                raise CowError(f"exception {number} points at metadata chunk {new}")
            if old >= origin_chunks:
                raise CowError(f"exception {number} names origin chunk {old}, past the "
                               f"origin's end ({origin_chunks} chunks)")
            if old in seen:
                raise CowError(f"exceptions {seen[old]} and {number} both name origin chunk "
                               f"{old}")
            seen[old] = number
            exceptions.append((old, new))
        area += 1


def read_chunks(dev: Device, store: CowStore,
                changed: list[tuple[int, int]] | None = None) -> Iterator[tuple[int, bytes]]:
    """(origin byte offset, chunk data) for each of ``changed`` (default: store.changed()),
    in the order given (store.changed() is in origin order)."""
    chunk_bytes = store.chunk_bytes
    for old, new in store.changed() if changed is None else changed:
        yield old * chunk_bytes, _read_exact(dev, new * chunk_bytes, chunk_bytes)


def write_store(dev: Device, size: int, chunk_sectors: int,
                chunks: Iterable[tuple[int, bytes]]) -> int:
    """Write a valid store of ``size`` bytes holding ``chunks`` ((origin byte offset aligned
    to the chunk, chunk_bytes of data), in origin order). Returns the bytes written from the
    start of ``dev``. Raises CowError if they do not fit or are not chunks.

    The header is zeroed (a "new store" to the kernel, None to read_store) and flushed first,
    and written last, after the data and metadata are flushed: a store cut short by a crash
    never reads as an older store with some of its chunks overwritten."""
    chunk_bytes = _check_chunk_sectors(chunk_sectors) * SECTOR
    per_area = chunk_bytes // _EXCEPTION.size
    stride = per_area + 1
    fits = capacity(size, chunk_sectors)
    if size // chunk_bytes < 2:
        raise CowError(f"a store of {size} bytes cannot hold a header and a metadata chunk")
    zeros = bytes(chunk_bytes)
    _write_chunk(dev, 0, zeros, chunk_bytes)
    _sync(dev)
    metadata = bytearray(chunk_bytes)
    count = 0
    last_old = -1
    for offset, data in chunks:
        if offset % chunk_bytes or offset < 0:
            raise CowError(f"origin offset {offset} is not aligned to the {chunk_bytes}-byte "
                           f"chunk")
        if len(data) != chunk_bytes:
            raise CowError(f"chunk at origin offset {offset} holds {len(data)} bytes, not "
                           f"{chunk_bytes}")
        old = offset // chunk_bytes
        if old <= last_old:
            raise CowError(f"chunk at origin offset {offset} is not in origin order")
        if count >= fits:
            raise CowError(f"the chunks do not fit: a store of {size} bytes holds {fits} "
                           f"chunks of {chunk_bytes} bytes")
        area, index = divmod(count, per_area)
        new = 1 + area * stride + 1 + index
        _write_chunk(dev, new, data, chunk_bytes)
        _EXCEPTION.pack_into(metadata, index * _EXCEPTION.size, old, new)
        count += 1
        last_old = old
        if index == per_area - 1:  # the area is full: its metadata is final
            _write_chunk(dev, 1 + area * stride, metadata, chunk_bytes)
            metadata = bytearray(chunk_bytes)
    last_area, used = divmod(count, per_area)
    end = 1 + last_area * stride  # the metadata chunk of the area the list ends in
    if used:
        _write_chunk(dev, end, metadata, chunk_bytes)
        end += used  # its last data chunk
        following = 1 + (last_area + 1) * stride
        if following < size // chunk_bytes:
            # The kernel never reads it (the list ends in this area) and zeroes it itself
            # before it fills the area, but a zeroed one leaves nothing stale to find.
            end = following
            _write_chunk(dev, end, zeros, chunk_bytes)
    else:  # an empty area (area 0, or the one after a full area) ends the list
        _write_chunk(dev, end, zeros, chunk_bytes)
    _sync(dev)
    header = _HEADER.pack(SNAP_MAGIC, 1, DISK_VERSION, chunk_sectors)
    _write_chunk(dev, 0, header + zeros[len(header):], chunk_bytes)
    _sync(dev)
    return (end + 1) * chunk_bytes


def write_empty(dev: Device, chunk_sectors: int) -> None:
    """A valid, empty store (header and a zeroed first metadata chunk): the kernel loads it as
    an existing snapshot with no exceptions rather than initializing a new one."""
    write_store(dev, 2 * chunk_sectors * SECTOR, chunk_sectors, ())


def _check_chunk_sectors(chunk_sectors: int) -> int:
    if chunk_sectors <= 0 or chunk_sectors & (chunk_sectors - 1):
        raise CowError(f"chunk size {chunk_sectors} sectors is not a power of two")
    if not MIN_CHUNK_SECTORS <= chunk_sectors <= MAX_CHUNK_SECTORS:
        raise CowError(f"chunk size {chunk_sectors} sectors is outside "
                       f"{MIN_CHUNK_SECTORS}..{MAX_CHUNK_SECTORS}")
    return chunk_sectors


def _read_exact(dev: Device, offset: int, length: int) -> bytes:
    dev.seek(offset)
    parts = []
    left = length
    while left:
        part = dev.read(left)
        if not part:
            raise CowError(f"the store ends before byte {offset + length}")
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def _write_chunk(dev: Device, chunk: int, data: bytes | bytearray, chunk_bytes: int) -> None:
    dev.seek(chunk * chunk_bytes)
    view = memoryview(data)
    while view:
        written = dev.write(view)
        view = view[written:]


def _sync(dev: Device) -> None:
    dev.flush()
    try:
        fd = dev.fileno()
    except (AttributeError, io.UnsupportedOperation):  # an in-memory file: nothing to sync
        return
    os.fsync(fd)
