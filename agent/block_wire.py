"""The wire form of a student's blocks between a seat and labmetal (issue 16): a session's
changed chunks go up from the seat's overlay to the student's store, and down from the store
into the overlay of the seat where the student resumes.

A transfer is a series of *pieces*; each piece carries a few extents of the session disk
(byte offset, length), their bytes compressed with zlib, and the sha256 of those bytes
uncompressed, which the receiver checks before a byte is written. One piece::

    4 bytes   the header's length, little-endian (at most HEADER_MAX)
    header    JSON: {"extents": [[offset, length], ...], "raw": <total length>,
                     "sha256": <hex of the raw bytes>, "packed": <length of what follows>}
    packed    zlib of the raw bytes, ``packed`` bytes

A stream of pieces ends with a piece of no extents whose header also says ``"end": true``,
the number of pieces and their *digest*: the sha256 chain over every piece's sha256 in
order (:class:`Digest`). The same chain, recomputed by the receiver from what it checked,
is how an upload is verified as a whole before the seat may drop its copy.

Everything read here may come from a hostile peer (DESIGN §11): lengths are bounded before
anything is allocated, extents are checked against the disk's size and the chunk size, and
the decompressor is never asked for more than the header announced.
"""
from __future__ import annotations

import hashlib
import json
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

HEADER_MAX = 64 * 1024
PIECE_RAW_MAX = 8 * 1024 * 1024  # bytes of disk in one piece
EXTENTS_MAX = 4096
LEVEL = 1  # zlib: fast; a TP's changes are mostly text and binaries


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class WireError(Exception):
    """A piece that cannot be taken; the message says what was wrong with it."""


@dataclass(frozen=True)
class Piece:
    extents: tuple[tuple[int, int], ...]
    raw: bytes
    sha256: str

    def blocks(self) -> Iterator[tuple[int, bytes]]:
        """(offset, bytes) of each extent."""
        position = 0
        for offset, length in self.extents:
            yield offset, self.raw[position:position + length]
            position += length


@dataclass(frozen=True)
class End:
    pieces: int
    digest: str


class Digest:
    """The sha256 chain over the pieces' sha256s, in order."""

    def __init__(self) -> None:
        self.value = hashlib.sha256(b"labmetal blocks").hexdigest()
        self.pieces = 0

    def add(self, piece_sha256: str) -> None:
        self.value = hashlib.sha256(f"{self.value}{piece_sha256}".encode()).hexdigest()
        self.pieces += 1


def encode(extents: Iterable[tuple[int, int]], raw: bytes) -> tuple[bytes, str]:
    """A piece's bytes and its sha256."""
    extents = [(int(offset), int(length)) for offset, length in extents]
    if sum(length for _, length in extents) != len(raw):
        raise ValueError("the extents do not add up to the bytes given")
    digest = hashlib.sha256(raw).hexdigest()
    packed = zlib.compress(raw, LEVEL)
    header = json.dumps({"extents": extents, "raw": len(raw), "sha256": digest,
                         "packed": len(packed)}).encode()
    return struct.pack("<I", len(header)) + header + packed, digest


def encode_end(digest: Digest) -> bytes:
    header = json.dumps({"extents": [], "raw": 0, "packed": 0, "end": True,
                         "pieces": digest.pieces, "digest": digest.value}).encode()
    return struct.pack("<I", len(header)) + header


def read(stream: Readable, disk_size: int, chunk_bytes: int) -> Piece | End | None:
    """The next piece (or the end) from ``stream``, checked: extents aligned to
    ``chunk_bytes``, inside ``disk_size``, not overlapping, the bytes matching their sha256.
    None at a clean end of the stream (no byte)."""
    first = stream.read(4)
    if not first:
        return None
    length = struct.unpack("<I", _exactly(stream, 4, first))[0]
    if not 0 < length <= HEADER_MAX:
        raise WireError(f"a piece header of {length} bytes")
    try:
        header = json.loads(_exactly(stream, length))
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested past the stack
        raise WireError("a piece header that is not JSON") from None
    if not isinstance(header, dict):
        raise WireError("a piece header that is not an object")
    if header.get("end") is True:
        pieces, digest = header.get("pieces"), header.get("digest")
        if not (isinstance(pieces, int) and pieces >= 0 and isinstance(digest, str)
                and len(digest) == 64):
            raise WireError("an end of transfer without its count and digest")
        return End(pieces, digest)
    extents = _extents(header.get("extents"), disk_size, chunk_bytes)
    raw_size, packed_size = header.get("raw"), header.get("packed")
    sha = header.get("sha256")
    if not (isinstance(raw_size, int) and raw_size == sum(n for _, n in extents)
            and 0 < raw_size <= PIECE_RAW_MAX):
        raise WireError(f"a piece of {raw_size!r} bytes for extents of "
                        f"{sum(n for _, n in extents)}")
    # zlib stores incompressible data with 5 bytes per 16 KiB block (compressBound): a
    # 4 MiB piece of random bytes packs to 4 MiB + 1.3 KiB; raw/1024 leaves room for that.
    if not (isinstance(packed_size, int)
            and 0 < packed_size <= raw_size + raw_size // 1024 + 1024):
        raise WireError(f"a piece packed as {packed_size!r} bytes")
    if not (isinstance(sha, str) and len(sha) == 64):
        raise WireError("a piece without its sha256")
    packed = _exactly(stream, packed_size)
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(packed, raw_size)
    except zlib.error as error:
        raise WireError(f"a piece that does not decompress: {error}") from None
    if len(raw) != raw_size or inflater.unconsumed_tail or not inflater.eof:
        raise WireError("a piece whose bytes are not the length its header says")
    if hashlib.sha256(raw).hexdigest() != sha:
        raise WireError("a piece whose bytes do not match its sha256")
    return Piece(tuple(extents), raw, sha)


def _extents(value: object, disk_size: int, chunk_bytes: int) -> list[tuple[int, int]]:
    if not isinstance(value, list) or not 0 < len(value) <= EXTENTS_MAX:
        raise WireError("a piece without extents, or with too many")
    extents: list[tuple[int, int]] = []
    end = -1
    for item in value:
        if not (isinstance(item, list) and len(item) == 2
                and all(isinstance(n, int) and not isinstance(n, bool) for n in item)):
            raise WireError(f"an extent {item!r} is not [offset, length]")
        offset, length = item
        if offset % chunk_bytes or length % chunk_bytes or length <= 0:
            raise WireError(f"extent {offset}+{length} is not whole chunks of {chunk_bytes}")
        if offset < end or offset + length > disk_size:
            raise WireError(f"extent {offset}+{length} overlaps another or is outside the "
                            f"disk ({disk_size} bytes)")
        end = offset + length
        extents.append((offset, length))
    return extents


def _exactly(stream: Readable, length: int, have: bytes = b"") -> bytes:
    data = have
    while len(data) < length:
        more = stream.read(length - len(data))
        if not more:
            raise WireError("the transfer ended inside a piece")
        data += more
    return data


def pieces(blocks: Iterable[tuple[int, bytes]], limit: int = 4 * 1024 * 1024,
           ) -> Iterator[tuple[list[tuple[int, int]], bytes]]:
    """Group (offset, bytes) blocks, in increasing offsets, into pieces of about ``limit``
    bytes, merging adjacent blocks into one extent."""
    extents: list[tuple[int, int]] = []
    data: list[bytes] = []
    size = 0
    for offset, block in blocks:
        if extents and extents[-1][0] + extents[-1][1] == offset:
            extents[-1] = (extents[-1][0], extents[-1][1] + len(block))
        else:
            extents.append((offset, len(block)))
        data.append(block)
        size += len(block)
        if size >= limit or len(extents) >= EXTENTS_MAX:
            yield extents, b"".join(data)
            extents, data, size = [], [], 0
    if extents:
        yield extents, b"".join(data)


# -- what the student's store holds, chunk by chunk -----------------------------------------
# Sent down with the student's blocks' list: the seat uploads only the chunks whose bytes
# differ from the store's (a resumed session's unchanged chunks stay where they are). One
# record per chunk: its offset (8 bytes, big-endian) and the sha256 of its bytes.
HASH_RECORD = struct.Struct(">Q32s")


def encode_hashes(chunks: Iterable[tuple[int, bytes]]) -> bytes:
    """The records of (offset, sha256 digest) pairs, in offset order."""
    return b"".join(HASH_RECORD.pack(offset, digest) for offset, digest in chunks)


def read_hashes(data: bytes, disk_size: int, chunk_bytes: int) -> dict[int, bytes]:
    """offset -> sha256 digest of each chunk the store holds; every offset a chunk's start
    inside the disk, in strictly increasing order (anything else is refused)."""
    if len(data) % HASH_RECORD.size:
        raise WireError(f"a hash list of {len(data)} bytes is not whole records")
    if len(data) // HASH_RECORD.size > disk_size // max(chunk_bytes, 1):
        raise WireError("a hash list with more chunks than the disk holds")
    found: dict[int, bytes] = {}
    last = -1
    for offset, digest in HASH_RECORD.iter_unpack(data):
        if offset % chunk_bytes or offset + chunk_bytes > disk_size or offset <= last:
            raise WireError(f"a hash list names chunk offset {offset}: not a chunk of the "
                            "disk, or out of order")
        found[offset] = digest
        last = offset
    return found
