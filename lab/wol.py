"""A Wake-on-LAN listener: receives magic packets (UDP) and wakes the machine with that MAC."""
from __future__ import annotations

import logging
import socket
from typing import Callable

LOG = logging.getLogger(__name__)


def parse_magic_packet(data: bytes) -> str | None:
    """The MAC a magic packet wakes (6 x 0xff, then the MAC 16 times), or None."""
    start = data.find(b"\xff" * 6)
    if start < 0:
        return None
    body = data[start + 6:start + 6 + 96]
    if len(body) < 96:
        return None
    mac = body[:6]
    if body != mac * 16:
        return None
    return ":".join(f"{byte:02x}" for byte in mac)


class WolListener:
    def __init__(self, address: str, port: int, on_wake: Callable[[str], None]):
        self.on_wake = on_wake
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        self.sock.bind((address, port))
        self.port = self.sock.getsockname()[1]

    def serve_forever(self) -> None:
        while True:
            data, sender = self.sock.recvfrom(2048)
            mac = parse_magic_packet(data)
            if mac is None:
                LOG.warning("ignored a packet from %s that is not a magic packet", sender[0])
                continue
            self.on_wake(mac)
