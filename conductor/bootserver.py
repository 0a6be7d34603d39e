"""The conductor's PXE side: TFTP for the iPXE binaries that PXE ROMs load, and dnsmasq for
the room's DHCP (or proxy-DHCP), its host list kept in step with the enrolled ports.

Everything after iPXE goes over HTTP from the API (/boot.ipxe, kernels, images), so TFTP
serves static files only. Both are off unless configured (tftp_listen, dhcp_interface).
"""
from __future__ import annotations

import logging
import subprocess

from sqlalchemy import select

from labmetal.config import Settings, split_host_port
from labmetal.db import Database
from labmetal.models import Port
from labmetal.pxe.dnsmasq import DhcpConfig, DhcpHost, Dnsmasq
from labmetal.pxe.tftp import TftpService, install_ipxe_binaries

LOG = logging.getLogger(__name__)


class BootServer:
    def __init__(self, settings: Settings, db: Database):
        self.settings = settings
        self.db = db
        self.tftp: TftpService | None = None
        self.dhcp: Dnsmasq | None = None
        self._hosts: list[DhcpHost] = []

    def start(self) -> None:
        settings = self.settings
        if settings.tftp_listen:
            address, port = split_host_port(settings.tftp_listen)
            root = settings.state_dir / "tftp"
            install_ipxe_binaries(root)
            self.tftp = TftpService(root, address=address, port=port).start()
            LOG.info("TFTP serving iPXE binaries on %s:%d", address, self.tftp.port)
        if settings.dhcp_interface:
            pool = tuple(settings.dhcp_pool.split(",")) if settings.dhcp_pool else None
            config = DhcpConfig(
                interface=settings.dhcp_interface, server_ip=self.boot_server_ip,
                boot_script_url=f"{settings.seat_base_url}/boot.ipxe",
                network=settings.dhcp_network, mode=settings.dhcp_mode,  # type: ignore[arg-type]
                pool=pool, enrolled_only=not settings.self_registration,  # type: ignore[arg-type]
                router_advertisements=settings.dhcp_mode == "server" and has_global_ipv6(
                    settings.dhcp_interface, settings.dhcp_namespace))
            self._hosts = self._enrolled()
            self.dhcp = Dnsmasq(config, settings.state_dir / "dhcp",
                                namespace=settings.dhcp_namespace or None).start(self._hosts)
            LOG.info("DHCP (%s) on %s%s for %s, %d enrolled port(s)", settings.dhcp_mode,
                     settings.dhcp_interface,
                     f" in namespace {settings.dhcp_namespace}" if settings.dhcp_namespace else "",
                     settings.dhcp_network, len(self._hosts))

    @property
    def boot_server_ip(self) -> str:
        """Where PXE ROMs fetch iPXE by TFTP: the TFTP address, or the seat URL's host."""
        if self.settings.tftp_listen:
            address, _ = split_host_port(self.settings.tftp_listen)
            if address not in ("0.0.0.0", ""):
                return address
        host = self.settings.seat_base_url.split("//", 1)[-1].split("/", 1)[0]
        return host.rsplit(":", 1)[0].strip("[]")

    def _enrolled(self) -> list[DhcpHost]:
        with self.db.read() as session:
            macs = session.scalars(select(Port.address).where(Port.pxe_enabled.is_(True))
                                   .order_by(Port.address)).all()
        return [DhcpHost(mac) for mac in macs]

    def sync_hosts(self) -> None:
        """Called from the conductor's scan: a new or removed port reaches dnsmasq within
        seconds, without a restart."""
        if self.dhcp is None:
            return
        hosts = self._enrolled()
        if hosts != self._hosts:
            self.dhcp.set_hosts(hosts)
            self._hosts = hosts
            LOG.info("DHCP hosts updated: %d enrolled port(s)", len(hosts))

    def stop(self) -> None:
        if self.dhcp is not None:
            self.dhcp.stop()
        if self.tftp is not None:
            self.tftp.stop()


def has_global_ipv6(interface: str, namespace: str = "") -> bool:
    """iPXE waits ~16 s for IPv6 autoconfiguration on a network where no router advertises;
    a DHCP server whose interface has a global IPv6 address announces it (RA only, no
    routes), and iPXE goes on at once."""
    argv = ["ip", *(["-n", namespace] if namespace else []), "-o", "-6", "addr", "show",
            "dev", interface, "scope", "global"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    return result.returncode == 0 and bool(result.stdout.strip())
