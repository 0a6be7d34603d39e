"""A student's changed blocks travel between a seat and labmetal as pieces (agent/block_wire.py):
extents of the session disk, zlib, a sha256, and an end mark with the digest chain. Both sides
read what the other sent as hostile input, so the refusals are tested with pieces crafted byte
by byte (struct and json here, not the module's encoder)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import tracemalloc
import zlib
from typing import Any

import pytest

from labmetal.agent import block_wire
from labmetal.agent.block_wire import (
    EXTENTS_MAX,
    HEADER_MAX,
    PIECE_RAW_MAX,
    Digest,
    End,
    Piece,
    WireError,
    encode,
    encode_end,
    pieces,
)

pytestmark = pytest.mark.fast

CHUNK = 4096
DISK = 64 * 1024 * 1024


def block(number: int) -> bytes:
    return number.to_bytes(4, "little") * (CHUNK // 4)


def frame(header: dict[str, Any] | bytes, packed: bytes = b"") -> bytes:
    """A piece as a hostile peer could send it: the length, the header as given, the bytes."""
    data = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<I", len(data)) + data + packed


def honest(extents: list[list[int]], data: bytes, **changes: Any) -> bytes:
    """A well-formed piece, with some of its header's fields changed."""
    packed = zlib.compress(data)
    header = {"extents": extents, "raw": len(data), "sha256": hashlib.sha256(data).hexdigest(),
              "packed": len(packed)}
    header.update(changes)
    return frame(header, packed)


def read(data: bytes, disk: int = DISK) -> Piece | End | None:
    return block_wire.read(io.BytesIO(data), disk, CHUNK)


def refused(data: bytes, match: str, disk: int = DISK) -> None:
    with pytest.raises(WireError, match=match):
        read(data, disk)


class Trickle:
    """A socket that hands over a few bytes at a time."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def read(self, size: int = -1, /) -> bytes:
        size = min(3, len(self.data) - self.at if size < 0 else size)
        part = self.data[self.at:self.at + size]
        self.at += len(part)
        return part


# -- what an honest seat sends comes back as it was -------------------------------------------
def test_a_students_blocks_and_the_end_mark_come_back_as_they_were_sent() -> None:
    blocks = [(0, block(0)), (CHUNK, block(1)), (5 * CHUNK, block(5)), (9 * CHUNK, block(9))]
    sent = Digest()
    stream = b""
    for extents, raw in pieces(blocks, limit=2 * CHUNK):
        piece, sha = encode(extents, raw)
        stream += piece
        sent.add(sha)
    stream += encode_end(sent)

    source = Trickle(stream)
    received, checked = [], Digest()
    while True:
        item = block_wire.read(source, DISK, CHUNK)
        assert item is not None, "the stream ended before its end mark"
        if isinstance(item, End):
            break
        checked.add(item.sha256)
        for offset, data in item.blocks():
            received += [(offset + at, data[at:at + CHUNK]) for at in range(0, len(data), CHUNK)]
    assert received == blocks
    assert item == End(sent.pieces, sent.value)
    assert (checked.pieces, checked.value) == (2, sent.value)
    assert block_wire.read(source, DISK, CHUNK) is None  # a clean end: no byte after the mark


def test_adjacent_blocks_merge_into_one_extent_and_a_gap_starts_another() -> None:
    blocks = [(0, block(0)), (CHUNK, block(1)), (3 * CHUNK, block(3)), (4 * CHUNK, block(4))]
    assert list(pieces(blocks)) == [([(0, 2 * CHUNK), (3 * CHUNK, 2 * CHUNK)],
                                     b"".join(data for _, data in blocks))]


def test_blocks_are_cut_into_pieces_of_about_the_limit() -> None:
    blocks = [(n * CHUNK, block(n)) for n in range(7)]
    cut = list(pieces(blocks, limit=3 * CHUNK))
    assert [extents for extents, _ in cut] == [[(0, 3 * CHUNK)], [(3 * CHUNK, 3 * CHUNK)],
                                               [(6 * CHUNK, CHUNK)]]
    assert b"".join(raw for _, raw in cut) == b"".join(data for _, data in blocks)
    assert list(pieces([])) == []


def test_a_piece_never_holds_more_extents_than_a_reader_takes() -> None:
    scattered = [(2 * n * CHUNK, b"x") for n in range(EXTENTS_MAX + 1)]
    cut = list(pieces(scattered))
    assert [len(extents) for extents, _ in cut] == [EXTENTS_MAX, 1]


def test_bytes_that_do_not_compress_still_go_through() -> None:
    # A student's compressed archives: zlib makes them a little larger, not smaller.
    raw = os.urandom(4 * 1024 * 1024)
    piece, sha = encode([(0, len(raw))], raw)
    assert len(piece) > len(raw) + 1024
    got = read(piece)
    assert isinstance(got, Piece) and got.raw == raw and got.sha256 == sha


def test_encode_refuses_extents_that_do_not_add_up_to_the_bytes() -> None:
    with pytest.raises(ValueError):
        encode([(0, CHUNK)], block(0) + block(1))


def test_the_digest_chain_depends_on_the_order_of_the_pieces() -> None:
    a, b = hashlib.sha256(b"a").hexdigest(), hashlib.sha256(b"b").hexdigest()
    first, second, again = Digest(), Digest(), Digest()
    for digest, order in ((first, (a, b)), (second, (b, a)), (again, (a, b))):
        for sha in order:
            digest.add(sha)
    assert first.value != second.value
    assert (first.pieces, first.value) == (again.pieces, again.value) == (2, again.value)
    assert Digest().value != first.value and Digest().pieces == 0


# -- a hostile peer's headers -----------------------------------------------------------------
@pytest.mark.parametrize("length", [0, HEADER_MAX + 1, 0xFFFFFFFF])
def test_a_header_of_no_bytes_or_longer_than_allowed_is_refused(length: int) -> None:
    refused(struct.pack("<I", length) + b"{}", "a piece header of")


@pytest.mark.parametrize("header", [b"{not json", b"\xff\xfe", b"[" * 20_000 + b"]" * 20_000])
def test_a_header_that_is_not_json_is_refused(header: bytes) -> None:
    refused(frame(header), "not JSON")


@pytest.mark.parametrize("header", [b"[]", b"42", b'"extents"', b"null"])
def test_a_header_that_is_not_an_object_is_refused(header: bytes) -> None:
    refused(frame(header), "not an object")


@pytest.mark.parametrize("extents", [[[100, CHUNK]], [[0, 100]], [[0, 0]], [[0, -CHUNK]],
                                     [[CHUNK, CHUNK + 512]]])
def test_an_extent_that_is_not_whole_chunks_is_refused(extents: list[list[int]]) -> None:
    refused(honest(extents, bytes(CHUNK)), "not whole chunks")


@pytest.mark.parametrize("extents", [[[0, 2 * CHUNK], [CHUNK, CHUNK]],
                                     [[2 * CHUNK, CHUNK], [0, CHUNK]],
                                     [[0, CHUNK], [0, CHUNK]]])
def test_overlapping_or_unordered_extents_are_refused(extents: list[list[int]]) -> None:
    raw = bytes(sum(length for _, length in extents))
    refused(honest(extents, raw), "overlaps another")


@pytest.mark.parametrize("extents", [[[DISK - CHUNK, 2 * CHUNK]], [[DISK, CHUNK]],
                                     [[-CHUNK, CHUNK]]])
def test_an_extent_outside_the_disk_is_refused(extents: list[list[int]]) -> None:
    refused(honest(extents, bytes(2 * CHUNK)[:extents[0][1]]), "outside the disk")


def test_the_last_chunk_of_the_disk_is_taken() -> None:
    got = read(honest([[DISK - CHUNK, CHUNK]], block(7)))
    assert isinstance(got, Piece) and list(got.blocks()) == [(DISK - CHUNK, block(7))]


@pytest.mark.parametrize("extents", [[], "0+4096", None,
                                     [[0, CHUNK]] * (EXTENTS_MAX + 1)])
def test_a_piece_without_extents_or_with_too_many_is_refused(extents: Any) -> None:
    refused(frame({"extents": extents, "raw": CHUNK, "packed": 10, "sha256": "0" * 64}),
            "without extents, or with too many")


@pytest.mark.parametrize("extent", [[0], [0, CHUNK, 1], {"0": CHUNK}, [0.0, 4096.0],
                                    [True, CHUNK], ["0", CHUNK]])
def test_an_extent_that_is_not_a_pair_of_integers_is_refused(extent: Any) -> None:
    refused(frame({"extents": [extent], "raw": CHUNK, "packed": 10, "sha256": "0" * 64}),
            "is not \\[offset, length\\]")


@pytest.mark.parametrize("raw_size", [CHUNK - 1, 2 * CHUNK, 0, "4096", None, 4096.0])
def test_a_raw_size_other_than_the_extents_is_refused(raw_size: Any) -> None:
    refused(honest([[0, CHUNK]], block(0), raw=raw_size), "a piece of")


def test_a_piece_larger_than_allowed_is_refused_before_its_bytes_are_read() -> None:
    size = PIECE_RAW_MAX + CHUNK
    header = {"extents": [[0, size]], "raw": size, "packed": 100, "sha256": "0" * 64}
    refused(frame(header), "a piece of", disk=4 * PIECE_RAW_MAX)


@pytest.mark.parametrize("packed", [0, -1, CHUNK + CHUNK // 1024 + 1025, 2**40, "10", None])
def test_an_absurd_packed_size_is_refused_before_its_bytes_are_read(packed: Any) -> None:
    header = {"extents": [[0, CHUNK]], "raw": CHUNK, "packed": packed, "sha256": "0" * 64}
    refused(frame(header), "a piece packed as")


@pytest.mark.parametrize("sha", [None, "", "0" * 63, 12])
def test_a_piece_without_its_sha256_is_refused(sha: Any) -> None:
    refused(honest([[0, CHUNK]], block(0), sha256=sha), "without its sha256")


def test_a_piece_whose_bytes_do_not_match_its_hash_is_refused() -> None:
    refused(honest([[0, CHUNK]], block(0), sha256=hashlib.sha256(block(1)).hexdigest()),
            "do not match its sha256")


def test_a_zlib_bomb_is_refused_without_inflating_it_all() -> None:
    # Zeros pack about 1000 to 1: the most packed bytes a 4 KiB piece may carry inflate to
    # megabytes. The reader must stop at the 4 KiB the header announced.
    bomb = zlib.compress(bytes(16 * 1024 * 1024), 9)[:CHUNK + 1024]
    assert len(zlib.decompressobj().decompress(bomb)) > 4 * 1024 * 1024
    piece = frame({"extents": [[0, CHUNK]], "raw": CHUNK, "packed": len(bomb),
                   "sha256": hashlib.sha256(bytes(CHUNK)).hexdigest()}, bomb)
    tracemalloc.start()
    try:
        refused(piece, "not the length its header says")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, f"reading a 4 KiB piece took {peak} bytes"


def test_packed_bytes_that_inflate_to_less_than_announced_are_refused() -> None:
    packed = zlib.compress(bytes(CHUNK // 2))
    refused(frame({"extents": [[0, CHUNK]], "raw": CHUNK, "packed": len(packed),
                   "sha256": hashlib.sha256(bytes(CHUNK)).hexdigest()}, packed),
            "not the length its header says")


def test_packed_bytes_that_are_not_zlib_are_refused() -> None:
    refused(frame({"extents": [[0, CHUNK]], "raw": CHUNK, "packed": 64, "sha256": "0" * 64},
                  b"\x00garbage" * 8), "does not decompress")


@pytest.mark.parametrize("cut", [1, 3, 4, 20, -1, -100])
def test_a_stream_that_ends_inside_a_piece_is_refused(cut: int) -> None:
    piece, _ = encode([(0, CHUNK)], os.urandom(CHUNK))
    refused(piece[:cut], "ended inside a piece")


@pytest.mark.parametrize("mark", [{"end": True},
                                  {"end": True, "pieces": 3},
                                  {"end": True, "digest": "0" * 64},
                                  {"end": True, "pieces": -1, "digest": "0" * 64},
                                  {"end": True, "pieces": "3", "digest": "0" * 64},
                                  {"end": True, "pieces": 3, "digest": "0" * 63},
                                  {"end": True, "pieces": 3, "digest": 7}])
def test_an_end_mark_without_its_count_and_digest_is_refused(mark: dict[str, Any]) -> None:
    refused(frame(mark), "without its count and digest")


def test_an_end_mark_says_how_many_pieces_and_their_digest() -> None:
    digest = Digest()
    digest.add("1" * 64)
    assert read(encode_end(digest)) == End(1, digest.value)
    assert read(frame({"end": True, "pieces": 0, "digest": "a" * 64})) == End(0, "a" * 64)


# -- the store's chunk list -------------------------------------------------------------------
def test_the_stores_chunk_list_goes_through_whole() -> None:
    listed = [(0, hashlib.sha256(b"a").digest()), (5 * CHUNK, hashlib.sha256(b"b").digest())]
    assert block_wire.read_hashes(block_wire.encode_hashes(listed), DISK, CHUNK) == dict(listed)
    assert block_wire.read_hashes(b"", DISK, CHUNK) == {}


@pytest.mark.parametrize(("records", "why"), [
    ([(1, b"x" * 32)], "not a chunk of the disk"),
    ([(DISK, b"x" * 32)], "not a chunk of the disk"),
    ([(CHUNK, b"x" * 32), (0, b"y" * 32)], "out of order"),
    ([(CHUNK, b"x" * 32), (CHUNK, b"y" * 32)], "out of order"),
])
def test_a_chunk_list_naming_what_no_disk_has_is_refused(records, why: str) -> None:
    with pytest.raises(WireError, match=why):
        block_wire.read_hashes(block_wire.encode_hashes(records), DISK, CHUNK)


def test_a_chunk_list_of_broken_records_or_too_many_is_refused() -> None:
    with pytest.raises(WireError, match="not whole records"):
        block_wire.read_hashes(b"\0" * 41, DISK, CHUNK)
    many = block_wire.encode_hashes((n * CHUNK, b"x" * 32) for n in range(DISK // CHUNK + 1))
    with pytest.raises(WireError, match="more chunks than the disk"):
        block_wire.read_hashes(many, DISK, CHUNK)
