"""Consistent hash ring: which live conductor owns a node.

Each conductor is placed at many points on a 128-bit circle (md5, as Ironic and tooz do);
a node belongs to the first conductor point at or after the node's own hash. Adding or
removing one conductor moves only about 1/N of the nodes.
"""
from __future__ import annotations

import bisect
import hashlib
from typing import Iterable

POINTS_PER_CONDUCTOR = 64


def _position(text: str) -> int:
    return int.from_bytes(hashlib.md5(text.encode()).digest(), "big")


class HashRing:
    def __init__(self, members: Iterable[str], points: int = POINTS_PER_CONDUCTOR):
        self.members = frozenset(members)
        ring = sorted((_position(f"{member}/{i}"), member)
                      for member in self.members for i in range(points))
        self._positions = [pos for pos, _ in ring]
        self._owners = [member for _, member in ring]

    def owner(self, key: str) -> str | None:
        if not self._owners:
            return None
        index = bisect.bisect(self._positions, _position(key)) % len(self._positions)
        return self._owners[index]

    def __len__(self) -> int:
        return len(self.members)
