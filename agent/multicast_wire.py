"""The multicast transport's wire format and block geometry, shared by the conductor's
sender and the agent's receiver. No I/O here.

Both ends hold the image's manifest, so packets carry no chunk metadata: a data chunk's
packed bytes are cut into blocks of ``BLOCK`` bytes (the last one zero-padded), the blocks
into groups of at most ``MAX_K``; group ``g`` of chunk ``c`` is erasure-coded (zfec) into
``M`` numbered blocks of which the first ``k`` are the data itself and any ``k`` distinct
ones rebuild it. A repair block therefore helps every seat that misses *any* block of its
group, which is why a loss of 5 % per seat costs about 10 % more traffic and not the 87 %
that resending the union of 40 seats' losses would.

Packets (big-endian; every one starts with magic, version, kind and the job's session id,
so traffic of another job on the same group and port is dropped on sight):

* DATA, sender -> group: ``seq`` (per sender, to measure loss), ``chunk``, ``group``,
  ``left`` (blocks of this group still queued after this one: 0 ends a burst, the cue for
  a seat that still lacks blocks to ask at once), ``index`` (how many blocks of this group
  the sender has sent before this one; the block number is ``index % M``), payload.
* REQUEST, seat -> sender's control port: seat id, flags, the seat's measured loss, the
  last DATA seq it received, then entries: WHOLE (every data chunk from ``chunk`` to
  ``last``) or GROUP (``need`` more blocks of ``chunk``/``group``, having seen the sender's
  blocks of it up to index ``seen``). The seq tells a request written before the chunk
  went by (late on the way: a seat's first requests wait in its ARP queue when the
  exchange is lost) from one written after it.
* DONE, seat -> sender: ok or failed, with a short reason.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from labmetal.agent.manifest import Chunk, Manifest

MAGIC = b"LM"
VERSION = 1
DATA, REQUEST, DONE = 1, 2, 3

MAX_UDP_PAYLOAD = 1472  # 1500 MTU - 20 (IPv4) - 8 (UDP): never fragmented
WIRE_OVERHEAD = 42  # Ethernet 14 + IPv4 20 + UDP 8, as a shaper counts a frame
MAX_K = 64  # data blocks per group
M = 256  # encoded blocks per group (zfec's limit): up to 192 repair blocks

PREFIX = struct.Struct("!2sBBI")  # magic, version, kind, session
DATA_HEADER = struct.Struct("!8sIIHHI")  # PREFIX as bytes, seq, chunk, group, left, index
BLOCK = MAX_UDP_PAYLOAD - DATA_HEADER.size  # 1448 bytes of payload per packet
REQUEST_HEADER = struct.Struct("!2sBBIIHHI")  # + seat, flags, loss (per 10 000), seq seen
ENTRY = struct.Struct("!BBHII")  # kind, need, group, chunk, seen | last chunk
MAX_ENTRIES = (MAX_UDP_PAYLOAD - REQUEST_HEADER.size) // ENTRY.size
DONE_HEADER = struct.Struct("!2sBBIIB")  # + seat, ok

WHOLE, GROUP = 1, 2  # request entry kinds
JOIN = 1  # request flag: the seat's first request

SEND_WIRE_BYTES = MAX_UDP_PAYLOAD + WIRE_OVERHEAD


def prefix(kind: int, session: int) -> bytes:
    """The first bytes of every packet of ``kind`` in a session, compared in one go."""
    return PREFIX.pack(MAGIC, VERSION, kind, session)


def session_id(job_id: int | str) -> int:
    """The 32-bit id carried by every packet: a small integer job id as it is, anything
    else hashed."""
    if isinstance(job_id, int) and 0 <= job_id < 2 ** 32:
        return job_id
    return zlib.crc32(str(job_id).encode())


@dataclass(frozen=True)
class Group:
    first_block: int  # within the chunk
    k: int


@dataclass(frozen=True)
class ChunkGeometry:
    chunk: Chunk
    blocks: int  # packed bytes cut in BLOCK-sized blocks
    groups: tuple[Group, ...]

    @property
    def padded_length(self) -> int:
        return self.blocks * BLOCK


def geometry(chunk: Chunk) -> ChunkGeometry:
    """Groups of near-equal size (never more than MAX_K blocks): a chunk of 65 blocks is
    two groups of 33 and 32, not 64 and 1, so every group gets the coding gain."""
    blocks = -(-chunk.packed_length // BLOCK)
    count = -(-blocks // MAX_K)
    base, extra = divmod(blocks, count)
    groups, first = [], 0
    for number in range(count):
        k = base + (1 if number < extra else 0)
        groups.append(Group(first, k))
        first += k
    return ChunkGeometry(chunk, blocks, tuple(groups))


def image_geometry(manifest: Manifest) -> dict[int, ChunkGeometry]:
    """Geometry of every data (non-zero) chunk, by chunk index."""
    return {chunk.index: geometry(chunk) for chunk in manifest.data_chunks}


def split_blocks(packed: bytes, geo: ChunkGeometry) -> list[tuple[bytes, ...]]:
    """A chunk's packed bytes as its groups' data blocks, the last one zero-padded."""
    padded = packed + bytes(geo.padded_length - len(packed))
    return [tuple(padded[(group.first_block + i) * BLOCK:(group.first_block + i + 1) * BLOCK]
                  for i in range(group.k)) for group in geo.groups]


def pack_request(session: int, seat: int, flags: int, loss: float, seq_seen: int,
                 entries: list[tuple[int, int, int, int, int]]) -> bytes:
    """``entries`` are (kind, need, group, chunk, seen-or-last) tuples, at most MAX_ENTRIES;
    ``seq_seen`` is the last DATA seq the seat had received (0: none yet)."""
    head = REQUEST_HEADER.pack(MAGIC, VERSION, REQUEST, session, seat, flags,
                               min(10000, int(loss * 10000)), seq_seen)
    return head + b"".join(ENTRY.pack(*entry) for entry in entries)


def unpack_request(packet: bytes) -> tuple[int, int, float, int, list[tuple[int, ...]]]:
    """(seat, flags, loss, seq_seen, entries) of a REQUEST whose prefix was checked."""
    _, _, _, _, seat, flags, loss, seq_seen = REQUEST_HEADER.unpack_from(packet)
    count = (len(packet) - REQUEST_HEADER.size) // ENTRY.size
    entries = [ENTRY.unpack_from(packet, REQUEST_HEADER.size + i * ENTRY.size)
               for i in range(count)]
    return seat, flags, loss / 10000, seq_seen, entries


def pack_done(session: int, seat: int, ok: bool, reason: str = "") -> bytes:
    return DONE_HEADER.pack(MAGIC, VERSION, DONE, session, seat, int(ok)) + \
        reason.encode()[:MAX_UDP_PAYLOAD - DONE_HEADER.size]


def unpack_done(packet: bytes) -> tuple[int, bool, str]:
    _, _, _, _, seat, ok = DONE_HEADER.unpack_from(packet)
    return seat, bool(ok), packet[DONE_HEADER.size:].decode(errors="replace")
