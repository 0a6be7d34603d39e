"""dnsmasq as the room's DHCP server (or proxy-DHCP next to the room's own), and its
supervisor.

What a PC gets, by its DHCP architecture option (93) and its boot loader: a BIOS PXE ROM
gets ``undionly.kpxe`` over TFTP; a UEFI one (architecture 7 or 9) gets Debian's signed
``shimx64.efi`` (then GRUB: boots with Secure Boot on or off) or iPXE's ``snponly.efi``
(Secure Boot off), by ``uefi_loader`` or the PC's own ``loader`` (its node's
``driver_info/pxe_loader``, for odd firmware). Whether Secure Boot is on is not in the
request, hence shim as the default. iPXE itself (DHCP option 175, or user class ``iPXE``)
gets the URL of ``/boot.ipxe`` instead, otherwise it would load itself again forever. Enrolled PCs
are
listed in a hosts file (optionally with a fixed address and a name) that dnsmasq re-reads
on SIGHUP, so enrolling a PC never restarts DHCP for the room.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

from labmetal.pxe.ipxe import url
from labmetal.respawn import Respawner

LOG = logging.getLogger(__name__)

DNSMASQ = "/usr/sbin/dnsmasq"
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_INTERFACE = re.compile(r"^[A-Za-z0-9_.@-]{1,15}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9._/-]+$")
_LEASE_TIME = re.compile(r"^(\d+[smhdw]?|infinite)$")
# A UEFI PC's first file, by loader; tagged per host as loader-<name>.
LOADERS = {"shim": "shimx64.efi", "ipxe": "snponly.efi"}


@dataclass(frozen=True)
class DhcpHost:
    """An enrolled PC's port: dnsmasq tags it ``known``; ``ip`` pins its address (server
    mode only), ``hostname`` names it and ``loader`` overrides its UEFI first file."""
    mac: str
    ip: str | None = None
    hostname: str | None = None
    loader: str | None = None

    def __post_init__(self) -> None:
        if not _MAC.match(self.mac):
            raise ValueError(f"not a lower-case MAC address: {self.mac!r}")
        if self.ip is not None:
            ipaddress.IPv4Address(self.ip)
        if self.hostname is not None and not _HOSTNAME.match(self.hostname):
            raise ValueError(f"not a host name (a-z, 0-9, '-'): {self.hostname!r}")
        if self.loader is not None and self.loader not in LOADERS:
            raise ValueError(f"loader must be one of {', '.join(LOADERS)}: {self.loader!r}")

    def line(self) -> str:
        tag = f"set:loader-{self.loader}" if self.loader else None
        return ",".join(part for part in (self.mac, tag, self.ip, self.hostname) if part)


@dataclass(frozen=True)
class DhcpConfig:
    """One room's DHCP. ``mode`` ``server`` hands out addresses from ``pool`` (first, last);
    ``proxy`` leaves addresses to the room's own DHCP server and only tells PXE clients
    what to boot. ``enrolled_only`` ignores PCs that are not in the hosts file (needed on a
    shared network; self-registration needs unknown PCs answered)."""
    interface: str
    server_ip: str  # labmetal's address on the room: TFTP server for the PXE ROMs
    boot_script_url: str  # http://<server>/boot.ipxe, for iPXE
    network: str  # 10.99.1.0/24
    mode: Literal["server", "proxy"] = "server"
    pool: tuple[str, str] | None = None
    lease_time: str = "1h"
    enrolled_only: bool = False
    bios_boot_file: str = "undionly.kpxe"
    uefi_loader: Literal["shim", "ipxe"] = "shim"
    gateway: str | None = None  # server mode: the room's router, if any (none is sent)
    dns_servers: tuple[str, ...] = ()  # server mode
    # Server mode, when the room's interface has IPv6: iPXE waits ~13 s for IPv6
    # autoconfiguration where no router advertises. In proxy mode the room's own router
    # decides about IPv6: labmetal must not announce itself as one on a shared network.
    router_advertisements: bool = False

    def __post_init__(self) -> None:
        if not _INTERFACE.match(self.interface):
            raise ValueError(f"not an interface name: {self.interface!r}")
        network = ipaddress.IPv4Network(self.network)
        if ipaddress.IPv4Address(self.server_ip) not in network:
            raise ValueError(f"{self.server_ip} is not in {network}")
        url(self.boot_script_url, "boot script URL")
        if self.mode not in ("server", "proxy"):
            raise ValueError(f"mode must be server or proxy, not {self.mode!r}")
        if self.mode == "proxy" and self.router_advertisements:
            raise ValueError("proxy-DHCP leaves router advertisements to the room's router")
        if self.mode == "server":
            if self.pool is None:
                raise ValueError("a DHCP server needs an address pool (first, last)")
            if any(ipaddress.IPv4Address(address) not in network for address in self.pool):
                raise ValueError(f"the pool {self.pool} is not inside {network}")
        for address in (*([self.gateway] if self.gateway else []), *self.dns_servers):
            ipaddress.IPv4Address(address)
        if not _LEASE_TIME.match(self.lease_time):
            raise ValueError(f"not a lease time: {self.lease_time!r}")
        if not _FILE_NAME.match(self.bios_boot_file):
            raise ValueError(f"not a boot file name: {self.bios_boot_file!r}")
        if self.uefi_loader not in LOADERS:
            raise ValueError(f"uefi_loader must be one of {', '.join(LOADERS)}")

    def uefi_choices(self) -> list[tuple[str, str]]:
        """(dnsmasq tags, file) for UEFI PXE clients, mutually exclusive: a PC tagged with
        a loader gets that one's file, any other the default's."""
        untagged = ",".join(f"tag:!loader-{name}" for name in LOADERS)
        return [*((f"tag:loader-{name}", file) for name, file in LOADERS.items()),
                (untagged, LOADERS[self.uefi_loader])]


def render_config(config: DhcpConfig, hosts_file: Path, lease_file: Path) -> str:
    network = ipaddress.IPv4Network(config.network)
    lines = [
        "# written by labmetal: DHCP only, for PXE and iPXE",
        "port=0",  # no DNS
        "bind-interfaces",
        f"interface={config.interface}",
        "no-resolv",
        "no-hosts",
        "no-ping",  # else ~3 s per new client
        "log-dhcp",
        "log-facility=-",
        f"dhcp-leasefile={lease_file}",
        f"dhcp-hostsfile={hosts_file}",
        "dhcp-match=set:ipxe,175",
        "dhcp-userclass=set:ipxe,iPXE",
        "dhcp-match=set:efi,option:client-arch,7",
        "dhcp-match=set:efi,option:client-arch,9",
    ]
    if config.enrolled_only:
        lines.append("dhcp-ignore=tag:!known")
    if config.mode == "server":
        first, last = config.pool  # type: ignore[misc]
        lines += [
            f"dhcp-range={first},{last},{network.netmask},{config.lease_time}",
            # dnsmasq would name itself the router: only a real one is announced.
            f"dhcp-option=option:router{',' + config.gateway if config.gateway else ''}",
            f"dhcp-option=option:dns-server{''.join(',' + d for d in config.dns_servers)}",
            # iPXE need not wait for a proxy-DHCP offer: there is none.
            "dhcp-option=tag:ipxe,175,b0:01:01",
            f"dhcp-boot=tag:!ipxe,tag:!efi,{config.bios_boot_file},,{config.server_ip}",
            *(f"dhcp-boot=tag:!ipxe,tag:efi,{tags},{file},,{config.server_ip}"
              for tags, file in config.uefi_choices()),
            f"dhcp-boot=tag:ipxe,{config.boot_script_url}",
        ]
    else:
        lines += [
            f"dhcp-range={network.network_address},proxy,{network.netmask}",
            f'pxe-service=tag:!ipxe,x86PC,"labmetal",{config.bios_boot_file},{config.server_ip}',
            *(f'pxe-service=tag:!ipxe,{tags},{arch},"labmetal",{file},{config.server_ip}'
              for tags, file in config.uefi_choices() for arch in ("X86-64_EFI", "BC_EFI")),
            f"dhcp-boot=tag:ipxe,{config.boot_script_url}",
        ]
    if config.router_advertisements:
        lines += ["enable-ra", f"dhcp-range=::,constructor:{config.interface},ra-only,64"]
    return "\n".join(lines) + "\n"


def render_hosts(hosts: Iterable[DhcpHost]) -> str:
    by_mac: dict[str, DhcpHost] = {}
    for host in hosts:
        if by_mac.setdefault(host.mac, host) != host:
            raise ValueError(f"two different entries for {host.mac}")
    return "".join(f"{by_mac[mac].line()}\n" for mac in sorted(by_mac))


class Dnsmasq:
    """Runs dnsmasq for one room (inside ``namespace`` if given) with everything under
    ``run_dir``: ``dnsmasq.conf``, ``dhcp-hosts``, ``dnsmasq.leases``, ``dnsmasq.log``.
    Started again if it dies; :meth:`set_hosts` rewrites the hosts file and sends SIGHUP."""

    def __init__(self, config: DhcpConfig, run_dir: Path, namespace: str | None = None,
                 restart_delay: float = 1.0):
        self.config = config
        self.run_dir = Path(run_dir)
        self.namespace = namespace
        self.conf_file = self.run_dir / "dnsmasq.conf"
        self.hosts_file = self.run_dir / "dhcp-hosts"
        self.lease_file = self.run_dir / "dnsmasq.leases"
        self.log_file = self.run_dir / "dnsmasq.log"
        self._child = Respawner("dnsmasq", self._spawn, restart_delay)

    @property
    def argv(self) -> list[str]:
        # user=root: dnsmasq re-reads the hosts file after dropping privileges, and the
        # run dir of a labmetal process need not be readable by anyone else.
        command = [DNSMASQ, "--keep-in-foreground", f"--conf-file={self.conf_file}",
                   "--user=root", "--pid-file="]
        # ``ip netns exec`` execs dnsmasq, so the PID we keep is dnsmasq's own.
        return ["ip", "netns", "exec", self.namespace, *command] if self.namespace else command

    @property
    def pid(self) -> int | None:
        return self._child.pid

    @property
    def restarts(self) -> int:
        return self._child.restarts

    def start(self, hosts: Iterable[DhcpHost] = ()) -> Dnsmasq:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _write(self.hosts_file, render_hosts(hosts))
        _write(self.conf_file, render_config(self.config, self.hosts_file, self.lease_file))
        subprocess.run([DNSMASQ, "--test", f"--conf-file={self.conf_file}"], check=True,
                       capture_output=True, timeout=30)
        self._child.start()
        self._child.watch()
        return self

    def _spawn(self) -> subprocess.Popen:
        with open(self.log_file, "ab") as log:
            return subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def set_hosts(self, hosts: Iterable[DhcpHost]) -> None:
        """Replace the enrolled hosts; dnsmasq re-reads them without a restart."""
        _write(self.hosts_file, render_hosts(hosts))
        self._child.send(signal.SIGHUP)

    def stop(self, timeout: float = 10) -> None:
        self._child.stop(timeout)

    def __enter__(self) -> Dnsmasq:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _write(path: Path, text: str) -> None:
    """Write whole or not at all: dnsmasq may read the file at any moment (SIGHUP)."""
    partial = path.with_name(path.name + ".new")
    with open(partial, "w") as handle:
        handle.write(text)
    os.replace(partial, path)

