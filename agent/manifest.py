"""The chunk manifest of an image: how every transport (HTTP, multicast, iSCSI capture) and
every check (per chunk, whole image, delta re-imaging) sees an image.

A raw image is cut into fixed-size chunks. Each chunk has the sha256 of its raw bytes and an
all-zero flag; non-zero chunks are compressed one by one with zstd and stored back to back
in a "packed" file, so any chunk can be fetched, verified and written on its own, and zero
chunks cost nothing to send.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Iterator

import zstandard

CHUNK_SIZE = 4 * 1024 * 1024
FORMAT = "labmetal-chunks/1"
_ZERO = bytes(CHUNK_SIZE)


@dataclass(frozen=True)
class Chunk:
    index: int
    offset: int  # in the raw image
    length: int  # raw bytes (the last chunk may be short)
    sha256: str  # of the raw bytes
    zero: bool
    packed_offset: int = 0  # in the packed file; zero chunks are not stored
    packed_length: int = 0


@dataclass
class Manifest:
    raw_size: int
    raw_sha256: str
    chunk_size: int = CHUNK_SIZE
    compression: str = "zstd"
    format: str = FORMAT
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def packed_size(self) -> int:
        return sum(chunk.packed_length for chunk in self.chunks)

    @property
    def data_chunks(self) -> list[Chunk]:
        return [chunk for chunk in self.chunks if not chunk.zero]

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise ValueError(f"unknown manifest format {data.get('format')!r}")
        chunks = [Chunk(**chunk) for chunk in data.pop("chunks")]
        return cls(**data, chunks=chunks)


def is_zero(data: bytes) -> bool:
    return data == _ZERO[:len(data)]


_ZERO_DIGEST = hashlib.sha256(_ZERO).hexdigest()


def chunk_digest(data: bytes) -> str:
    if len(data) == CHUNK_SIZE and is_zero(data):  # most of a sparse image: hash it once
        return _ZERO_DIGEST
    return hashlib.sha256(data).hexdigest()


def read_chunks(stream: IO[bytes], chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    while True:
        data = stream.read(chunk_size)
        if not data:
            return
        while len(data) < chunk_size:  # pipes and sockets may return short reads
            more = stream.read(chunk_size - len(data))
            if not more:
                break
            data += more
        yield data


def build(raw_path: Path, packed_path: Path, level: int = 3,
          chunk_size: int = CHUNK_SIZE) -> Manifest:
    """Read a raw image once: hash it whole and per chunk, and write the packed file."""
    whole = hashlib.sha256()
    compressor = zstandard.ZstdCompressor(level=level)
    chunks: list[Chunk] = []
    offset = packed_offset = 0
    with open(raw_path, "rb") as raw, open(packed_path, "wb") as packed:
        for index, data in enumerate(read_chunks(raw, chunk_size)):
            whole.update(data)
            zero = is_zero(data)
            packed_length = 0
            if not zero:
                compressed = compressor.compress(data)
                packed.write(compressed)
                packed_length = len(compressed)
            chunks.append(Chunk(index, offset, len(data), chunk_digest(data), zero,
                                packed_offset if not zero else 0, packed_length))
            offset += len(data)
            packed_offset += packed_length
    return Manifest(raw_size=offset, raw_sha256=whole.hexdigest(), chunk_size=chunk_size,
                    chunks=chunks)


def unpack_chunk(chunk: Chunk, packed: bytes | memoryview) -> bytes:
    """Decompress and verify one chunk; raises ValueError naming the chunk if it is wrong."""
    if chunk.zero:
        return bytes(chunk.length)
    try:
        data = zstandard.ZstdDecompressor().decompress(packed, max_output_size=chunk.length)
    except zstandard.ZstdError as error:
        raise ValueError(f"chunk {chunk.index} does not decompress: {error}") from None
    if len(data) != chunk.length or chunk_digest(data) != chunk.sha256:
        raise ValueError(f"chunk {chunk.index} (offset {chunk.offset}) fails its sha256 check")
    return data
