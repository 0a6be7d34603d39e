"""The address a seat's request came from, and whether the seat may be given a secret there.

A seat's secrets (its agent token, its session's boot script) are given only to the address
labmetal's DHCP server leased to the seat's MAC (labmetal/leases.py; DESIGN §11). Where
labmetal hands out no leases (proxy-DHCP, no DHCP), ``leases_known`` is False and the caller
binds the secret to the first address that asks instead.
"""
from __future__ import annotations

import ipaddress
import time
from typing import Any, Iterable

from flask import request

from labmetal import seat_relay
from labmetal.api.services import services
from labmetal.config import BootSettings
from labmetal.leases import leased_to


def caller_address() -> str:
    """The peer's address as the server saw it (an IPv4-mapped IPv6 one as plain IPv4), or
    the seat's that a conductor's TFTP relayed with a valid proof."""
    relayed = request.headers.get(seat_relay.HEADER)
    seat = seat_relay.verify(services().box.derive(seat_relay.PURPOSE), relayed,
                             request.path, time.time()) if relayed else None
    raw = seat or request.remote_addr or ""
    try:
        ip = ipaddress.ip_address(raw)
    except ValueError:
        return raw
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def leases_known(boot: BootSettings) -> bool:
    """labmetal runs the room's DHCP server, so it knows every seat's lease."""
    return bool(boot.dhcp_interface) and boot.dhcp_mode == "server"


def holds_lease(session: Any, macs: Iterable[str], address: str) -> bool:
    return address in leased_to(session, macs)


def url_host(address: str) -> str:
    """``address`` as a URL's host (IPv6 in brackets)."""
    return f"[{address}]" if ":" in address else address
