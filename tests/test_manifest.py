"""The chunk manifest: per-chunk hashes, zero chunks skipped, every chunk verifiable alone."""
import hashlib
import os

import pytest

from labmetal.agent.manifest import Manifest, build, unpack_chunk

pytestmark = pytest.mark.fast


def test_manifest_round_trip_and_verification(tmp_path):
    raw = tmp_path / "disk.raw"
    chunk = 64 * 1024
    content = (os.urandom(chunk) + bytes(chunk) * 3 + b"labmetal" * (chunk // 8)
               + os.urandom(1000))
    raw.write_bytes(content)
    manifest = build(raw, tmp_path / "disk.packed", chunk_size=chunk)
    assert manifest.raw_size == len(content)
    assert manifest.raw_sha256 == hashlib.sha256(content).hexdigest()
    assert [c.zero for c in manifest.chunks] == [False, True, True, True, False, False]
    assert manifest.chunks[-1].length == 1000
    assert manifest.packed_size < len(content) - 3 * chunk  # zeros cost nothing, text shrinks
    again = Manifest.from_json(manifest.to_json())
    assert again == manifest

    packed = (tmp_path / "disk.packed").read_bytes()
    rebuilt = b"".join(unpack_chunk(c, packed[c.packed_offset:c.packed_offset + c.packed_length])
                       for c in again.chunks)
    assert rebuilt == content

    first = again.chunks[0]
    damaged = bytearray(packed[first.packed_offset:first.packed_offset + first.packed_length])
    damaged[-1] ^= 0xFF
    with pytest.raises(ValueError, match="chunk 0"):
        unpack_chunk(first, bytes(damaged))
    with pytest.raises(ValueError, match="unknown manifest format"):
        Manifest.from_json('{"format": "other", "chunks": []}')
