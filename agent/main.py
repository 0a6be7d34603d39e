"""The agent's entry point: options (command line, then the kernel command line the ramdisk was
booted with), the command API, then lookup and heartbeats."""
from __future__ import annotations

import argparse
import logging
import re
import shlex
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from labmetal.agent import heartbeat, inventory, seat_login, session_sync
from labmetal.agent.api import CommandServer
from labmetal.agent.commands import Commands, Seat
from labmetal.agent.identity import Identity

LOG = logging.getLogger("labmetal.agent")

# Every mode but login and session looks the seat up and heartbeats; the conductor decides
# what the seat does. Discovery enlists a seat no node has with its inventory. Login is a
# student's seat login (agent/seat_login.py): no token, no command API. Session puts a local
# session on the seat's disk or uploads one from it (agent/session_sync.py), then reboots.
MODES = ("deploy", "inspect", "clean", "discovery", "login", "session")
KERNEL_PARAMETERS = ("api", "mode", "disk", "listen", "advertise_address", "interface", "lang",
                     "poweroff_cmd", "reboot_cmd", "tls", "ca")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m labmetal.agent",
        description="labmetal's deploy agent. Every option can also come from the kernel command "
                    "line as labmetal.<option>=<value> (e.g. labmetal.api=http://10.0.0.1:6385, "
                    "labmetal.interface=eth0,eth1); the command line wins.")
    parser.add_argument("--api", help="labmetal API URL, e.g. http://10.0.0.1:6385")
    parser.add_argument("--mode", default="deploy", help="deploy (default), inspect or clean; "
                        "or discovery: enlist this machine with its inventory when no node has "
                        "its MACs")
    parser.add_argument("--disk", help="install target: a block device, or a plain file for a "
                        "test seat (default: the smallest fixed disk of 4 GiB or more)")
    parser.add_argument("--listen", default="0.0.0.0:9999", help="command API address")
    parser.add_argument("--advertise-address", help="address labmetal calls back (default: the "
                        "listen address, or this machine's address towards the API)")
    parser.add_argument("--interface", action="extend", nargs="+", metavar="NAME",
                        help="NICs whose MACs identify this machine (default: all but loopback)")
    parser.add_argument("--poweroff-cmd", default="poweroff -f")
    parser.add_argument("--reboot-cmd", default="reboot -f")
    login = parser.add_argument_group("login mode (a student's seat login)")
    login.add_argument("--tls", help="labmetal's HTTPS URL, where the password goes")
    login.add_argument("--ca", help="SHA-256 (hex) of labmetal's CA certificate, fetched from "
                       "the API URL and trusted only if it matches")
    login.add_argument("--mac", help="the seat's MAC (default: BOOTIF= on the kernel command "
                       "line, the NIC the seat booted from)")
    login.add_argument("--screen", action="append", metavar="TTY",
                       help="a terminal to log in on (default: /dev/tty1 and /dev/console)")
    login.add_argument("--idle", type=float, default=120,
                       help="seconds without typing before the seat goes back to its menu")
    return parser


def kernel_options(cmdline: str) -> dict[str, Any]:
    """The ``labmetal.<option>=<value>`` words of a kernel command line."""
    try:
        words = shlex.split(cmdline)
    except ValueError:  # an unbalanced quote: the kernel itself does not mind
        words = cmdline.split()
    options: dict[str, Any] = {}
    for word in words:
        key, has_value, value = word.partition("=")
        if not key.startswith("labmetal.") or not has_value:
            continue
        name = key.removeprefix("labmetal.").replace("-", "_")
        if name not in KERNEL_PARAMETERS:
            LOG.info("kernel parameter %s is not an agent option", key)
            continue
        options[name] = value.split(",") if name == "interface" else value
    return options


def options(argv: list[str] | None, cmdline: str) -> argparse.Namespace:
    command_line = parser()
    from_kernel = kernel_options(cmdline)
    interfaces = from_kernel.pop("interface", None)
    command_line.set_defaults(**from_kernel)
    args = command_line.parse_args(argv)
    args.interface = args.interface or interfaces
    args.mac = args.mac or booted_mac(cmdline)
    if not args.api:
        command_line.error("--api (or labmetal.api= on the kernel command line) is required")
    if args.mode not in MODES:
        command_line.error(f"--mode must be one of {', '.join(MODES)}, not {args.mode!r}")
    return args


def booted_mac(cmdline: str) -> str | None:
    """The MAC in ``BOOTIF=01-52-54-00-12-34-56`` (pxelinux's convention, which labmetal's
    boot scripts follow), as 52:54:00:12:34:56."""
    for word in cmdline.split():
        key, _, value = word.partition("=")
        if key == "BOOTIF" and re.fullmatch(r"01-([0-9a-fA-F]{2}-){5}[0-9a-fA-F]{2}", value):
            return value[3:].replace("-", ":").lower()
    return None


def local_address_towards(url: str) -> str:
    """The address this machine uses to reach ``url`` (no packet is sent)."""
    parts = urlsplit(url)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((parts.hostname or "127.0.0.1", parts.port or 80))
        return probe.getsockname()[0]


def seat_address(args: argparse.Namespace, listen_host: str) -> Callable[[], str]:
    """Where labmetal reaches this seat; asked each time, as DHCP may still be settling."""
    def address() -> str:
        return args.advertise_address or (listen_host if listen_host not in ("", "0.0.0.0")
                                          else local_address_towards(args.api))
    return address


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s labmetal-agent %(name)s: %(message)s")
    cmdline = Path("/proc/cmdline")
    args = options(argv, cmdline.read_text() if cmdline.exists() else "")
    if args.mode == "login":
        def local() -> int:  # a local session: onto this seat's disk, then into it
            machine = inventory.collect(args.disk, args.interface)
            return session_sync.run(args.api, machine.macs, machine.install_disk,
                                    shlex.split(args.reboot_cmd),
                                    shlex.split(args.poweroff_cmd), session_sync.console_say)
        sys.exit(seat_login.run(args.api, args.tls, args.ca, args.mac,
                                shlex.split(args.reboot_cmd),
                                args.screen or seat_login.SCREENS, args.idle, local=local))
    machine = inventory.collect(args.disk, args.interface)
    if args.mode == "session":
        sys.exit(session_sync.run(args.api, machine.macs, machine.install_disk,
                                  shlex.split(args.reboot_cmd), shlex.split(args.poweroff_cmd),
                                  session_sync.console_say))
    if machine.install_disk is None:
        LOG.warning("no install disk found (none of 4 GiB or more): disk commands will fail")
    host, _, port = args.listen.rpartition(":")
    address = seat_address(args, host)
    identity = Identity()
    commands = Commands(Seat(machine.install_disk, shlex.split(args.poweroff_cmd),
                             shlex.split(args.reboot_cmd), address), identity)
    server = CommandServer((host, int(port)), commands, identity, machine)
    threading.Thread(target=server.serve_forever, name="command-api", daemon=True).start()
    LOG.info("command API listening on http://%s:%s; install disk %s; mode %s", host, port,
             machine.install_disk, args.mode)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        heartbeat.run(heartbeat.LabmetalClient(args.api), args.mode, machine, identity,
                      lambda: f"http://{address()}:{port}")
    finally:
        commands.close()
        LOG.info("stopped")
