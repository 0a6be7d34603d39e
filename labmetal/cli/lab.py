"""`labmetal lab ...` and `labmetal demo`: the simulated lab, run on this machine (local
commands: they start processes, namespaces and QEMU here, not through the API).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any

from labmetal.cli.parsing import Group, UsageError, add_json_option


def _seats(path: str | None):
    from pathlib import Path

    from labmetal.lab.seat import load_seats, make_seat
    return [make_seat(spec) for spec in load_seats(Path(path))] if path else []


def cmd_lab_bmc(args: argparse.Namespace) -> int:
    from labmetal import logs
    from labmetal.lab.bmc import VirtualBmc, serve_forever
    from labmetal.lab.machine import MemoryMachine
    logs.setup("INFO", name="lab-bmc")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so the seats are powered off
    seats = _seats(args.seats)
    if seats:
        bmcs = [VirtualBmc(seat, args.user, args.password, seat.spec.bmc_port,
                           address=args.address) for seat in seats if seat.spec.bmc_port]
    else:
        bmcs = [VirtualBmc(MemoryMachine(f"machine-{args.port + i}",
                                         power_delay=args.power_delay),
                           args.user, args.password, args.port + i, address=args.address)
                for i in range(args.count)]
    ports = sorted(bmc.port for bmc in bmcs)
    print(f"{len(bmcs)} virtual BMC(s) on {args.address}:{ports[0]}-{ports[-1]}", flush=True)
    try:
        serve_forever(bmcs)
    finally:
        for seat in seats:
            seat.shutdown()
    return 0


def cmd_lab_wol(args: argparse.Namespace) -> int:
    from labmetal.lab.wol import WolListener
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so the seats are powered off
    seats = {seat.spec.mac: seat for seat in _seats(args.seats)}

    def woke(mac: str) -> None:
        print(json.dumps({"woke": mac}), flush=True)
        if mac in seats:
            seats[mac].power_on()

    listener = WolListener(args.address, args.port, woke)
    print(f"listening for magic packets on {args.address}:{listener.port}", flush=True)
    threading.Thread(target=listener.serve_forever, daemon=True).start()
    try:
        threading.Event().wait()
    finally:
        for seat in seats.values():
            seat.shutdown()
    return 0


def _say(line: str) -> None:
    print(line, flush=True)


def cmd_lab_up(args: argparse.Namespace) -> int:
    from pathlib import Path

    from labmetal.lab.room import RoomPlan, up
    if args.seats is not None and (args.qemu is not None or args.light is not None):
        raise UsageError("give --seats (with --kind) or --qemu/--light, not both")
    if args.seats is not None:
        qemu, light = (args.seats, 0) if args.kind == "qemu" else (0, args.seats)
    else:
        qemu, light = args.qemu or 0, args.light or 0
    password = {"bmc_password": args.bmc_password} if args.bmc_password else {}
    plan = RoomPlan(name=args.name, state_dir=Path(args.state_dir), qemu_seats=qemu,
                    light_seats=light, power=args.power, subnet=args.subnet,
                    seat_rate=None if args.seat_rate == "off" else args.seat_rate,
                    uplink_rate=args.uplink_rate, labmetal_port=args.port,
                    disk_mib=args.disk_mib, memory_mib=args.memory, profile=args.profile,
                    keep_disks=args.keep_disks,
                    bmc_user=args.bmc_user, **password)
    return up(plan, api=args.api, deploy_kernel=args.deploy_kernel,
              deploy_ramdisk=args.deploy_ramdisk, api_wait=args.api_wait, out=_say)


def cmd_lab_down(args: argparse.Namespace) -> int:
    from pathlib import Path

    from labmetal.lab.room import down
    try:
        return down(Path(args.state_dir), timeout=args.timeout, out=_say)
    except FileNotFoundError as error:  # no room there: the state dir given is wrong
        raise UsageError(str(error)) from None


def cmd_lab_status(args: argparse.Namespace) -> dict[str, Any]:
    from pathlib import Path

    from labmetal.lab.room import status
    try:
        return status(Path(args.state_dir))
    except FileNotFoundError as error:  # no room there: the state dir given is wrong
        raise UsageError(str(error)) from None


def cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from labmetal.lab.demo import DemoOptions, run
    if args.seats is not None:  # --seats N --kind K: a room of one kind
        args.qemu, args.light = (args.seats, 0) if args.kind == "qemu" else (0, args.seats)
    return run(DemoOptions(Path(args.state_dir), qemu=args.qemu, light=args.light,
                           power=args.power, subnet=args.subnet, port=args.port,
                           seat_rate=args.seat_rate, transport=args.transport,
                           profile=args.profile, keep_running=not args.once))


def show_status(report: dict[str, Any]) -> None:
    from labmetal.lab.room import format_status
    print(format_status(report))


def register(top: Group) -> None:
    demo = top.command("demo", cmd_demo, api=False,
                       help="provision a simulated room end to end: QEMU seats that PXE-boot "
                            "and light seats, deployed with an OS")
    demo.add_argument("--qemu", type=int, default=2, help="QEMU seats (default 2)")
    demo.add_argument("--light", type=int, default=2, help="light seats (default 2)")
    demo.add_argument("--seats", type=int, help="instead of --qemu/--light: N seats of --kind")
    demo.add_argument("--kind", choices=("qemu", "light"), default="light",
                      help="the kind of the --seats (default light)")
    demo.add_argument("--power", choices=("ipmi", "wol"), default="ipmi")
    demo.add_argument("--subnet", default="10.99.200.0/24", help="the room's network; "
                      "labmetal listens on its .2")
    demo.add_argument("--port", type=int, default=6385)
    demo.add_argument("--seat-rate", default="100mbit", help="each seat's link (uplink: 10x)")
    demo.add_argument("--transport", choices=("multicast", "unicast", "auto"),
                      default="multicast", help="how the room job sends the OS to the seats "
                      "(default multicast; auto: multicast from multicast_min_seats seats)")
    demo.add_argument("--profile", choices=("bios", "uefi", "secureboot"),
                      default="secureboot", help="the QEMU seats' firmware, as `lab up "
                      "--profile` (default secureboot: UEFI with Secure Boot on)")
    demo.add_argument("--state-dir", default="var/demo")
    demo.add_argument("--once", action="store_true",
                      help="stop once every seat is deployed (exit 1 if one failed)")

    lab = top.group("lab", help="parts of the simulated lab", api=False)
    bmc = lab.command("bmc", cmd_lab_bmc, help="virtual BMCs speaking IPMI over UDP")
    bmc.add_argument("--port", type=int, default=0, help="UDP port of the first BMC")
    bmc.add_argument("--seats", help="JSON list of seats (lab/seat.py: light or qemu) with "
                                     "their bmc_port, instead of in-memory machines")
    bmc.add_argument("--count", type=int, default=1, help="BMCs on consecutive ports")
    bmc.add_argument("--address", default="127.0.0.1")
    bmc.add_argument("--user", required=True)
    bmc.add_argument("--password", required=True)
    bmc.add_argument("--power-delay", type=float, default=0.0,
                     help="seconds before a power change takes effect")
    wol = lab.command("wol", cmd_lab_wol, help="listen for Wake-on-LAN magic packets")
    wol.add_argument("--port", type=int, default=9)
    wol.add_argument("--address", default="0.0.0.0")
    wol.add_argument("--seats", help="JSON list of seats (light or qemu) to power on by MAC")

    lab_up = lab.command("up", cmd_lab_up, help="run a simulated room in the foreground")
    lab_up.add_argument("--name", required=True, help="the room's name (1-11 of a-z, 0-9, -)")
    lab_up.add_argument("--state-dir", required=True, help="where the room's state file, "
                                                           "seat disks and consoles go")
    lab_up.add_argument("--seats", type=int, help="number of seats, all of --kind")
    lab_up.add_argument("--kind", choices=("qemu", "light"), default="qemu")
    lab_up.add_argument("--qemu", type=int, help="QEMU seats, for a mixed room")
    lab_up.add_argument("--light", type=int, help="light seats, for a mixed room")
    lab_up.add_argument("--power", choices=("ipmi", "wol"), default="ipmi")
    lab_up.add_argument("--subnet", default="10.99.1.0/24",
                        help="the room's network: .1 the room, .2 this host (labmetal)")
    lab_up.add_argument("--seat-rate", default="100mbit", help="tc rate of each seat's link "
                                                               "(off: not shaped)")
    lab_up.add_argument("--uplink-rate", help="tc rate of the uplink (default: 10 x seat rate)")
    lab_up.add_argument("--port", type=int, default=6385,
                        help="labmetal's port in the printed settings")
    lab_up.add_argument("--disk-mib", type=int, default=8192, help="size of each sparse disk "
                        "(the agent installs to disks of 4 GiB or more)")
    lab_up.add_argument("--memory", type=int, default=1024, help="MiB per QEMU seat")
    lab_up.add_argument("--profile", choices=("bios", "uefi", "secureboot"), default="bios",
                        help="the QEMU seats' firmware: bios (SeaBIOS, iPXE ROM, virtio), "
                             "uefi (OVMF, q35, e1000e, AHCI) or secureboot (OVMF with Secure "
                             "Boot and Microsoft's keys, NVMe)")
    lab_up.add_argument("--keep-disks", action="store_true",
                        help="leave the seat disks in the state dir when the room stops")
    lab_up.add_argument("--bmc-user", default="admin")
    lab_up.add_argument("--bmc-password", help="default: a random one, in the state file")
    lab_up.add_argument("--api", help="labmetal's URL: enroll the seats there")
    lab_up.add_argument("--api-wait", type=float, default=300,
                        help="seconds to wait for --api to answer")
    lab_up.add_argument("--deploy-kernel", help="image name for the nodes' driver_info")
    lab_up.add_argument("--deploy-ramdisk", help="image name for the nodes' driver_info")
    lab_down = lab.command("down", cmd_lab_down, help="stop the room `lab up` runs (or clean "
                                                      "up after one that crashed)")
    lab_down.add_argument("--state-dir", required=True)
    lab_down.add_argument("--timeout", type=float, default=90)
    lab_status = lab.command("status", cmd_lab_status, human=show_status,
                             help="the room's seats: power, BMC, console")
    lab_status.add_argument("--state-dir", required=True)
    add_json_option(lab_status)

