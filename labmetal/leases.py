"""Which seat holds which address: the DHCP leases of labmetal's dnsmasq, kept in the
database so every API process can check them.

A seat's secrets (its deploy agent's token, its session's boot script) go only to the
address the room's DHCP server leased to the seat's MAC (DESIGN §11): another seat on the
same network asking with that MAC gets nothing. Where labmetal hands out no addresses
(proxy-DHCP next to the room's own server, or no DHCP at all) it cannot know the lease, so
a deploy's token is bound to the first address that asks for it instead, and a second
lookup fails the deploy, loudly (api/agent.py).
"""
from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from sqlalchemy import delete, select

from labmetal.db import Database
from labmetal.models import DhcpLease, utcnow

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lease:
    mac: str
    address: str
    expires_at: datetime | None  # None: an infinite lease


def parse_dnsmasq(text: str) -> list[Lease]:
    """dnsmasq's lease file: ``<expiry epoch> <mac> <ip> <hostname> <client id>`` per IPv4
    lease (``duid`` and IPv6 lines are skipped: seats boot over IPv4). A line that does not
    parse is skipped, never fatal: the file is dnsmasq's, read while it may be rewritten."""
    leases = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 3 or fields[0] == "duid":
            continue
        expiry, mac, address = fields[:3]
        try:
            ip = ipaddress.ip_address(address)
            seconds = int(expiry)
        except ValueError:
            continue
        if ip.version != 4 or len(mac) != 17 or mac.count(":") != 5:
            continue
        expires = None if seconds == 0 else \
            datetime.fromtimestamp(seconds, timezone.utc).replace(tzinfo=None)
        leases.append(Lease(mac.lower(), str(ip), expires))
    return leases


def replace(db: Database, conductor: str, leases: Iterable[Lease]) -> None:
    """The leases of the dnsmasq ``conductor`` runs are now exactly ``leases``."""
    unique = {(lease.mac, lease.address): lease for lease in leases}
    with db.write() as session:
        session.execute(delete(DhcpLease).where(DhcpLease.conductor == conductor))
        for lease in unique.values():
            session.execute(delete(DhcpLease).where(DhcpLease.mac == lease.mac,
                                                    DhcpLease.address == lease.address))
            session.add(DhcpLease(mac=lease.mac, address=lease.address,
                                  expires_at=lease.expires_at, conductor=conductor))


def leased_to(session, macs: Iterable[str]) -> set[str]:
    """The addresses currently leased to any of ``macs``."""
    now = utcnow()
    rows = session.execute(select(DhcpLease.address, DhcpLease.expires_at)
                           .where(DhcpLease.mac.in_(list(macs)))).all()
    return {address for address, expires in rows if expires is None or expires > now}


class LeaseFileWatcher:
    """Copies a dnsmasq lease file into the database whenever it changes (dnsmasq rewrites
    it at each lease). Polled: a seat's next request comes seconds after its lease."""

    def __init__(self, db: Database, conductor: str, path: Path):
        self.db = db
        self.conductor = conductor
        self.path = Path(path)
        self._seen: tuple[int, int] | None = None

    def poll(self) -> bool:
        """True when the file changed and was copied."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            stat = None
        seen = (stat.st_mtime_ns, stat.st_size) if stat else (0, 0)
        if seen == self._seen:
            return False
        text = self.path.read_text(errors="replace") if stat else ""
        leases = parse_dnsmasq(text)
        replace(self.db, self.conductor, leases)
        self._seen = seen
        LOG.debug("%d DHCP lease(s) from %s", len(leases), self.path)
        return True

    def forget(self) -> None:
        """This conductor no longer serves DHCP: its leases are no one's."""
        replace(self.db, self.conductor, ())
