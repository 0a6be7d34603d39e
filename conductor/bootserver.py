"""The conductor's PXE side: TFTP for the first files PXE firmware loads (iPXE; Debian's
signed shim and GRUB for Secure Boot) and for what GRUB reads, and dnsmasq for the room's
DHCP (or proxy-DHCP), its host list kept in step with the enrolled ports.

After iPXE everything goes over HTTP from the API (/boot.ipxe, kernels, images); GRUB has
no HTTP, so its configs, kernels and ramdisks come by TFTP (conductor/tftp_files.py).
Both are off unless configured (tftp_listen, dhcp_interface).
"""
from __future__ import annotations

import logging
import subprocess
import threading

from sqlalchemy import select

from labmetal.config import BootSettings, split_host_port
from labmetal.db import Database
from labmetal.conductor.tftp_files import TftpFiles
from labmetal.images.store import ImageStore
from labmetal.leases import LeaseFileWatcher
from labmetal.models import Node, Port
from labmetal.pxe.dnsmasq import LOADERS, DhcpConfig, DhcpHost, Dnsmasq
from labmetal.pxe.tftp import TftpService, install_ipxe_binaries, install_secure_boot_loaders
from labmetal.rundir import private_dir

LOG = logging.getLogger(__name__)


class BootServer:
    def __init__(self, boot: BootSettings, db: Database, store: ImageStore,
                 relay_key: bytes | None = None):
        self.boot = boot
        self.db = db
        self.files = TftpFiles(boot.seat_base_url, db, store, relay_key)
        self.tftp: TftpService | None = None
        self.dhcp: Dnsmasq | None = None
        self._hosts: list[DhcpHost] = []
        self.leases: LeaseFileWatcher | None = None
        self._stopping = threading.Event()
        self._lease_thread: threading.Thread | None = None

    def start(self) -> None:
        boot = self.boot
        if boot.tftp_listen:
            address, port = split_host_port(boot.tftp_listen)
            root = boot.tftp_root
            install_ipxe_binaries(root)
            missing = install_secure_boot_loaders(root)
            if missing:
                LOG.warning("no %s: UEFI PCs told to boot shim (Secure Boot) cannot boot; "
                            "install Debian's shim-signed and grub-efi-amd64-signed",
                            ", ".join(missing))
            self.tftp = TftpService(root, self.files.render, address=address,
                                    port=port).start()
            LOG.info("TFTP serving iPXE, shim and GRUB on %s:%d", address, self.tftp.port)
        if boot.dhcp_interface:
            pool = tuple(boot.dhcp_pool.split(",")) if boot.dhcp_pool else None
            config = DhcpConfig(
                interface=boot.dhcp_interface, server_ip=self.boot_server_ip,
                boot_script_url=f"{boot.seat_base_url}/boot.ipxe",
                network=boot.dhcp_network, mode=boot.dhcp_mode,  # type: ignore[arg-type]
                pool=pool, enrolled_only=not boot.self_registration,  # type: ignore[arg-type]
                uefi_loader=boot.uefi_loader,  # type: ignore[arg-type]
                router_advertisements=boot.dhcp_mode == "server" and has_global_ipv6(
                    boot.dhcp_interface, boot.dhcp_namespace))
            self._hosts = self._enrolled()
            # dnsmasq's config, hosts, leases and log: root-run, so a private directory
            self.dhcp = Dnsmasq(config, private_dir(boot.dhcp_dir),
                                namespace=boot.dhcp_namespace or None).start(self._hosts)
            if boot.dhcp_mode == "server":
                self._watch_leases(self.dhcp.lease_file)
            LOG.info("DHCP (%s) on %s%s for %s, %d enrolled port(s)", boot.dhcp_mode,
                     boot.dhcp_interface,
                     f" in namespace {boot.dhcp_namespace}" if boot.dhcp_namespace else "",
                     boot.dhcp_network, len(self._hosts))

    def _watch_leases(self, path) -> None:
        """The leases dnsmasq hands out, into the database within half a second: what the
        API binds a seat's secrets to (labmetal/leases.py)."""
        self.leases = LeaseFileWatcher(self.db, self.boot.hostname, path)
        self.leases.poll()

        def watch() -> None:
            while not self._stopping.wait(0.5):
                try:
                    self.leases.poll()  # type: ignore[union-attr]
                except Exception:  # the database may be away a moment; next poll
                    LOG.warning("could not copy the DHCP leases", exc_info=True)
        self._lease_thread = threading.Thread(target=watch, name="dhcp-leases", daemon=True)
        self._lease_thread.start()

    @property
    def boot_server_ip(self) -> str:
        """Where PXE ROMs fetch iPXE by TFTP: the TFTP address, or the seat URL's host."""
        if self.boot.tftp_listen:
            address, _ = split_host_port(self.boot.tftp_listen)
            if address not in ("0.0.0.0", ""):
                return address
        host = self.boot.seat_base_url.split("//", 1)[-1].split("/", 1)[0]
        return host.rsplit(":", 1)[0].strip("[]")

    def _enrolled(self) -> list[DhcpHost]:
        """Every PXE port, with its node's ``driver_info/pxe_loader`` (a UEFI PC's first
        file other than the ``uefi_loader`` setting's) when it names a known one."""
        with self.db.read() as session:
            rows = session.execute(select(Port.address, Node.driver_info)
                                   .join(Node, Node.id == Port.node_id)
                                   .where(Port.pxe_enabled.is_(True))
                                   .order_by(Port.address)).all()
        hosts = []
        for mac, info in rows:
            loader = (info or {}).get("pxe_loader")
            hosts.append(DhcpHost(mac, loader=loader if loader in LOADERS else None))
        return hosts

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
        self._stopping.set()
        if self._lease_thread is not None:
            self._lease_thread.join(timeout=10)
        if self.leases is not None:
            try:
                self.leases.forget()
            except Exception:
                LOG.warning("could not drop this conductor's DHCP leases", exc_info=True)
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
