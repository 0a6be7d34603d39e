"""The multicast wire format and block geometry (agent/multicast_wire.py), without a network:
packets round-trip, fit one unfragmented datagram, and a chunk's groups are near-equal
(the protocol on real namespaces: tests/test_multicast.py)."""
from __future__ import annotations

import pytest

from labmetal.agent import multicast_wire as wire
from labmetal.agent.manifest import Chunk

pytestmark = pytest.mark.fast


def chunk(packed_length: int) -> Chunk:
    return Chunk(index=3, offset=0, length=1 << 20, sha256="0" * 64, zero=False,
                 packed_offset=0, packed_length=packed_length)


def test_requests_and_dones_round_trip_and_fit_one_datagram():
    entries = [(wire.WHOLE, 0, 0, 5, 9), (wire.GROUP, 7, 1, 12, 300)]
    packet = wire.pack_request(0xDEADBEEF, 17, wire.JOIN, 0.0512, 4242, entries)
    assert packet.startswith(wire.prefix(wire.REQUEST, 0xDEADBEEF))
    assert wire.unpack_request(packet) == (17, wire.JOIN, 0.0512, 4242, entries)
    full = wire.pack_request(1, 2, 0, 2.0, 0, [(wire.WHOLE, 0, 0, 0, 0)] * wire.MAX_ENTRIES)
    assert len(full) <= wire.MAX_UDP_PAYLOAD
    assert wire.unpack_request(full)[2] == 1.0  # a loss is at most 100 %

    done = wire.pack_done(9, 17, False, "checksum of chunk 4 " + "x" * 3000)
    assert len(done) <= wire.MAX_UDP_PAYLOAD
    seat, ok, reason = wire.unpack_done(done)
    assert (seat, ok) == (17, False) and reason.startswith("checksum of chunk 4 ")
    assert wire.unpack_done(wire.pack_done(9, 3, True)) == (3, True, "")


def test_sessions_differ_by_kind_and_job():
    assert wire.prefix(wire.DATA, 5) != wire.prefix(wire.REQUEST, 5)
    assert wire.prefix(wire.DATA, 5) != wire.prefix(wire.DATA, 6)
    assert wire.session_id(42) == 42
    assert wire.session_id("job-42") == wire.session_id("job-42") != wire.session_id("job-43")
    assert 0 <= wire.session_id(-1) < 2 ** 32 and 0 <= wire.session_id(2 ** 40) < 2 ** 32
    assert wire.DATA_HEADER.size + wire.BLOCK == wire.MAX_UDP_PAYLOAD


def test_a_chunk_is_cut_in_near_equal_groups_of_at_most_max_k_blocks():
    geo = wire.geometry(chunk(65 * wire.BLOCK))
    assert geo.blocks == 65 and [g.k for g in geo.groups] == [33, 32]
    assert [g.first_block for g in geo.groups] == [0, 33]
    one = wire.geometry(chunk(10))
    assert one.blocks == 1 and [g.k for g in one.groups] == [1]
    for length in (1, wire.BLOCK, wire.BLOCK + 1, 64 * wire.BLOCK, 200 * wire.BLOCK + 7):
        geo = wire.geometry(chunk(length))
        sizes = [g.k for g in geo.groups]
        assert sum(sizes) == geo.blocks and max(sizes) <= wire.MAX_K
        assert max(sizes) - min(sizes) <= 1


def test_split_blocks_pads_the_last_block_and_loses_nothing():
    packed = bytes(range(256)) * 20  # 5120 bytes: 4 blocks, the last one short
    geo = wire.geometry(chunk(len(packed)))
    groups = wire.split_blocks(packed, geo)
    blocks = [block for group in groups for block in group]
    assert all(len(block) == wire.BLOCK for block in blocks)
    joined = b"".join(blocks)
    assert joined[:len(packed)] == packed and joined[len(packed):] == bytes(len(joined)
                                                                             - len(packed))
