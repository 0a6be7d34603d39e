"""A room of the simulated lab in network namespaces: a bridge as the room's switch, one
link per seat, optionally shaped like a teaching room's network.

Nothing touches the host's own network: the room and every seat are namespaces, veth pairs
are created directly inside them. Namespace names carry the creating process's PID
(``lmt-<pid>-<room>[-<seat>]``) so that :func:`remove_leftovers` can tell a crashed run's
namespaces from those of a run still going on the same machine.
"""
from __future__ import annotations

import ipaddress
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Sequence

PREFIX = "lmt-"
BRIDGE = "lmt-br"
SEAT_INTERFACE = "eth0"  # inside the seat's own namespace, as on a real PC
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,10}$")  # "lmt-" + name fits IFNAMSIZ (15)
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_RATE = re.compile(r"^\d+(\.\d+)?(bit|kbit|mbit|gbit|tbit|bps|kbps|mbps|gbps)$")
_OWNED = re.compile(rf"^{PREFIX}(\d+)-")


@dataclass(frozen=True)
class Room:
    """The room's switch (a bridge in the room's namespace) and the server's side of it:
    processes that serve the room (dnsmasq, TFTP, HTTP) run in ``namespace``."""
    name: str
    namespace: str
    bridge: str
    server: ipaddress.IPv4Interface
    server6: ipaddress.IPv6Interface | None = None

    @property
    def server_ip(self) -> str:
        return str(self.server.ip)

    @property
    def network(self) -> ipaddress.IPv4Network:
        return self.server.network


@dataclass(frozen=True)
class Seat:
    """A PC of the room: its own namespace whose ``interface`` (MAC ``mac``) is cabled to
    ``switch_port`` on the room's bridge."""
    name: str
    room: Room
    namespace: str
    interface: str
    switch_port: str
    mac: str


def in_namespace(namespace: str, argv: Sequence[str]) -> list[str]:
    """The command line that runs ``argv`` inside ``namespace`` (``ip netns exec`` execs it,
    so the PID seen by the caller is the command's own)."""
    return ["ip", "netns", "exec", namespace, *argv]


def run_in(namespace: str, argv: Sequence[str], timeout: float = 60,
           check: bool = True) -> subprocess.CompletedProcess:
    """Run a short command inside ``namespace`` and collect its output."""
    return subprocess.run(in_namespace(namespace, argv), capture_output=True, text=True,
                          timeout=timeout, check=check)


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def shape(namespace: str, device: str, rate: str) -> None:
    """Limit what ``device`` sends to ``rate`` (tc syntax: ``100mbit``) with one HTB class."""
    if not _RATE.match(rate):
        raise ValueError(f"rate must look like 100mbit, not {rate!r}")
    for command in (["qdisc", "replace", "dev", device, "root", "handle", "1:", "htb",
                     "default", "1"],
                    ["class", "replace", "dev", device, "parent", "1:", "classid", "1:1", "htb",
                     "rate", rate, "ceil", rate]):
        result = subprocess.run(["tc", "-n", namespace, *command], capture_output=True, text=True,
                                timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"tc {' '.join(command)}: {result.stderr.strip()}")


def namespaces() -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30,
                             check=True).stdout
    return [line.split()[0] for line in listing.splitlines() if line.strip()]


def remove_namespace(namespace: str) -> None:
    """Kill what still runs inside, then delete the namespace (its interfaces, and the far
    ends of its veth pairs, go with it)."""
    pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True,
                          timeout=30).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while pids and time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") and
                                                      not _is_zombie(p) for p in pids):
        time.sleep(0.05)
    subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)


def _is_zombie(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def remove_leftovers(prefix: str = PREFIX) -> list[str]:
    """Remove the namespaces a crashed run left behind: those named ``<prefix><pid>-...``
    whose creating process is gone. Namespaces of live runs are left alone."""
    removed = []
    for namespace in namespaces():
        owned = _OWNED.match(namespace) if namespace.startswith(prefix) else None
        if owned is None or _alive(int(owned.group(1))):
            continue
        remove_namespace(namespace)
        removed.append(namespace)
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                           timeout=30).stdout
    for link, owner in re.findall(r"^\d+: (lmu(\d+)x\d+)[@:]", links, re.M):
        if not _alive(int(owner)):  # an uplink whose room went with a crashed run
            subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=30)
            removed.append(link)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(str(pid))


@dataclass
class Lab:
    """The namespaces made for one test, demo or benchmark; :meth:`close` (or leaving the
    ``with`` block) removes all of them, and whatever still runs inside."""
    owner: int = field(default_factory=os.getpid)
    made: list[str] = field(default_factory=list)
    uplinks: list[str] = field(default_factory=list)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _namespace(self, name: str) -> str:
        namespace = f"{PREFIX}{self.owner}-{name}"
        _ip("netns", "add", namespace)
        self.made.append(namespace)
        _ip("-n", namespace, "link", "set", "lo", "up")
        return namespace

    def add_room(self, name: str, server: str = "10.99.1.1/24", server6: str | None = None,
                 uplink_rate: str | None = None) -> Room:
        """A room whose switch carries ``server`` (and ``server6``, for router
        advertisements); ``uplink_rate`` shapes what the server sends into the room."""
        _check_name(name)
        address = ipaddress.IPv4Interface(server)
        address6 = ipaddress.IPv6Interface(server6) if server6 else None
        namespace = self._namespace(name)
        _ip("-n", namespace, "link", "add", BRIDGE, "type", "bridge")
        _ip("-n", namespace, "addr", "add", str(address), "brd", "+", "dev", BRIDGE)
        if address6 is not None:
            _ip("-n", namespace, "addr", "add", str(address6), "dev", BRIDGE, "nodad")
        _ip("-n", namespace, "link", "set", BRIDGE, "up")
        if uplink_rate:
            shape(namespace, BRIDGE, uplink_rate)
        return Room(name, namespace, BRIDGE, address, address6)

    def add_seat(self, room: Room, name: str, mac: str, address: str | None = None,
                 rate: str | None = None) -> Seat:
        """A seat cabled to the room's switch. Without ``address`` its interface is up but
        unconfigured, as a PC before DHCP. ``rate`` shapes the link both ways."""
        _check_name(name)
        mac = mac.lower()
        if not _MAC.match(mac):
            raise ValueError(f"not a MAC address: {mac!r}")
        namespace = self._namespace(f"{room.name}-{name}")
        port = f"{PREFIX}{name}"
        _ip("-n", room.namespace, "link", "add", port, "type", "veth", "peer", "name",
            SEAT_INTERFACE, "address", mac, "netns", namespace)
        _ip("-n", room.namespace, "link", "set", port, "master", room.bridge, "up")
        _ip("-n", namespace, "link", "set", SEAT_INTERFACE, "up")
        if address:
            _ip("-n", namespace, "addr", "add", str(ipaddress.IPv4Interface(address)),
                "brd", "+", "dev", SEAT_INTERFACE)
        if rate:
            shape(room.namespace, port, rate)
            shape(namespace, SEAT_INTERFACE, rate)
        return Seat(name, room, namespace, SEAT_INTERFACE, port, mac)

    def add_uplink(self, room: Room, address: str, rate: str | None = None) -> str:
        """Cable this host into the room's switch with ``address`` (in the room's network),
        for servers that run outside the room's namespace (labmetal's API and conductor).
        The veth pair goes away with the room's namespace. ``rate`` shapes the uplink."""
        interface = f"lmu{self.owner % 100000}x{len(self.made)}"
        peer = f"{PREFIX}up{len(self.made)}"
        _ip("link", "add", interface, "type", "veth", "peer", "name", peer, "netns",
            room.namespace)
        _ip("-n", room.namespace, "link", "set", peer, "master", room.bridge, "up")
        self.uplinks.append(interface)
        _ip("addr", "add", str(ipaddress.IPv4Interface(address)), "brd", "+", "dev",
            interface)
        _ip("link", "set", interface, "up")
        if rate:
            subprocess.run(["tc", "qdisc", "replace", "dev", interface, "root", "handle", "1:",
                            "htb", "default", "1"], check=True, capture_output=True)
            subprocess.run(["tc", "class", "replace", "dev", interface, "parent", "1:",
                            "classid", "1:1", "htb", "rate", rate, "ceil", rate], check=True,
                           capture_output=True)
        return interface

    def add_tap(self, room: Room, name: str, rate: str | None = None) -> str:
        """A tap on the room's switch for a QEMU seat (``-netdev tap,ifname=<tap>``); QEMU
        runs in ``room.namespace``, where the tap is. ``rate`` shapes what the seat gets."""
        _check_name(name)
        tap = f"{PREFIX}{name}"
        _ip("-n", room.namespace, "tuntap", "add", "dev", tap, "mode", "tap")
        _ip("-n", room.namespace, "link", "set", tap, "master", room.bridge, "up")
        if rate:
            shape(room.namespace, tap, rate)
        return tap

    def close(self) -> None:
        for interface in self.uplinks:  # the kernel would drop them with the room, later
            subprocess.run(["ip", "link", "del", interface], capture_output=True, timeout=30)
        self.uplinks.clear()
        for namespace in reversed(self.made):
            remove_namespace(namespace)
        self.made.clear()


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"room and seat names are 1-11 of a-z, 0-9 and '-': {name!r}")


LOSS_TABLE = "labmetal_loss"
UDP_LOSS_TABLE = "labmetal_udp_loss"


def _drop_rule(percent: float) -> str:
    """nftables: drop ``percent`` % of packets at random, each packet its own draw."""
    if not 0 <= percent <= 100:
        raise ValueError(f"loss is a percentage, not {percent!r}")
    return f"numgen random mod 10000 < {round(percent * 100)} drop"


def _load_table(namespace: str, family: str, table: str, chains: str) -> None:
    """(Re)place an nftables table in ``namespace``."""
    _delete_table(namespace, family, table)
    rules = f"table {family} {table} {{\n{chains}}}\n"
    result = subprocess.run(in_namespace(namespace, ["nft", "-f", "-"]), input=rules,
                            capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"nft: {result.stderr.strip()} (apt-get install nftables)")


def _delete_table(namespace: str, family: str, table: str) -> None:
    subprocess.run(in_namespace(namespace, ["nft", "delete", "table", family, table]),
                   capture_output=True, timeout=30)


def add_loss(namespace: str, percent: float) -> None:
    """Drop ``percent`` % of the frames the room's switch forwards, at random and
    independently per frame and per port (a multicast frame flooded to 40 seats is 40
    draws): an nftables ``bridge`` table in ``namespace``. Replaces an earlier setting."""
    rule = _drop_rule(percent)
    _load_table(namespace, "bridge", LOSS_TABLE,
                f"  chain forward {{ type filter hook forward priority 0; policy accept; "
                f"{rule}; }}\n")


def remove_loss(namespace: str) -> None:
    _delete_table(namespace, "bridge", LOSS_TABLE)


def add_udp_loss(namespace: str, percent: float) -> None:
    """Drop ``percent`` % of the UDP datagrams that reach the namespace's own sockets and,
    independently, of those they send: a lossy network each way in front of the servers
    that run there (virtual BMCs), as an nftables ``inet`` table. Replaces an earlier
    setting; :func:`remove_udp_loss` heals the network."""
    rule = f"meta l4proto udp {_drop_rule(percent)}"
    _load_table(namespace, "inet", UDP_LOSS_TABLE,
                f"  chain arriving {{ type filter hook input priority 0; policy accept; "
                f"{rule}; }}\n"
                f"  chain leaving {{ type filter hook output priority 0; policy accept; "
                f"{rule}; }}\n")


def remove_udp_loss(namespace: str) -> None:
    _delete_table(namespace, "inet", UDP_LOSS_TABLE)
