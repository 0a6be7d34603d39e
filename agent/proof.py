"""A deploy's receipt: proof that the seat's disk holds the image, not just a claim.

The image's sha256 is public (its manifest says it), so "I wrote sha256 X" proves nothing:
a fake agent could send it without writing a byte. Once the write is done the conductor
picks a fresh random nonce and random extents of the image, and the agent answers with an
HMAC keyed by the nonce over those extents as read back from its disk (not the page cache).
The conductor computes the same over its own copy: a match says the disk held those bytes
at the moment it was asked. Both sides call :func:`digest`, so they cannot drift apart.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass

EXTENT = 64 * 1024
EXTENTS = 32
MAX_EXTENTS = 256
MAX_EXTENT = 1024 * 1024
NONCE_BYTES = 32


@dataclass(frozen=True)
class Challenge:
    nonce: str  # hex
    extents: tuple[tuple[int, int], ...]  # (offset, length) in the image

    def params(self) -> dict[str, object]:
        return {"nonce": self.nonce, "extents": [list(extent) for extent in self.extents]}

    @classmethod
    def from_params(cls, params: dict[str, object]) -> Challenge:
        """A challenge as the conductor sent it, checked: the agent reads only what the
        bounds allow."""
        nonce, extents = params.get("nonce"), params.get("extents")
        if not (isinstance(nonce, str) and 32 <= len(nonce) <= 128):
            raise ValueError("nonce must be 32 to 128 hex digits")
        bytes.fromhex(nonce)
        if not (isinstance(extents, list) and 0 < len(extents) <= MAX_EXTENTS):
            raise ValueError(f"extents must be a list of 1 to {MAX_EXTENTS} [offset, length]")
        checked = []
        for extent in extents:
            if not (isinstance(extent, list) and len(extent) == 2
                    and all(isinstance(n, int) and not isinstance(n, bool) for n in extent)
                    and extent[0] >= 0 and 0 < extent[1] <= MAX_EXTENT):
                raise ValueError(f"bad extent {extent!r}: [offset >= 0, 0 < length <= "
                                 f"{MAX_EXTENT}]")
            checked.append((extent[0], extent[1]))
        return cls(nonce, tuple(checked))


def challenge(image_size: int, count: int = EXTENTS, length: int = EXTENT) -> Challenge:
    """Random 4 KiB-aligned extents over the whole image (the last one may be short)."""
    if image_size <= 0:
        raise ValueError("an empty image has nothing to prove")
    pick = secrets.SystemRandom()
    extents = []
    for _ in range(count):
        offset = pick.randrange(0, image_size, 4096) if image_size > 4096 else 0
        extents.append((offset, min(length, image_size - offset)))
    return Challenge(secrets.token_hex(NONCE_BYTES), tuple(sorted(extents)))


def digest(path: str, base: int, proof: Challenge) -> str:
    """HMAC-SHA256 keyed by the nonce over the extents of ``path``, each at ``base`` +
    its offset, read past the page cache where the kernel allows it."""
    mac = hmac.new(bytes.fromhex(proof.nonce), digestmod=hashlib.sha256)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for offset, length in proof.extents:
            start = base + offset
            try:
                os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
            data = os.pread(fd, length, start)
            if len(data) != length:
                raise OSError(f"{path} ends before {start + length}")
            mac.update(offset.to_bytes(8, "big") + data)
    finally:
        os.close(fd)
    return mac.hexdigest()
