"""The `labmetal` command: run the service, manage the database and users, run lab parts."""
from __future__ import annotations

import argparse
import getpass
import json
import signal
import sys
import threading

from labmetal.config import load_settings
from labmetal.images.cli import register as register_images

SERVICE_OPTIONS = ("listen", "database", "auth", "state_dir", "hostname", "secret_key_file",
                   "public_url", "wake_listen", "log_file", "log_level", "power_sync_interval",
                   "heartbeat_interval", "conductor_dead_after", "seat_url", "image_dir",
                   "tftp_listen", "dhcp_interface", "dhcp_network", "dhcp_pool", "dhcp_mode",
                   "dhcp_namespace")


def _service_parser(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text)
    parser.add_argument("--config", help="TOML file with a [labmetal] section")
    parser.add_argument("--listen", help="HOST:PORT of the REST API (default 127.0.0.1:6385)")
    parser.add_argument("--database", help="SQLAlchemy URL: sqlite:///PATH (default, under "
                                           "--state-dir) or postgresql+psycopg://...")
    parser.add_argument("--auth", choices=("noauth", "http_basic"))
    parser.add_argument("--state-dir", help="where the SQLite file and the secret key live")
    parser.add_argument("--hostname", help="this conductor's name in the ring (default: host name)")
    parser.add_argument("--secret-key-file", help="key that seals BMC passwords at rest; every "
                                                  "process of one deployment needs the same file")
    parser.add_argument("--public-url", help="base URL the API uses in links")
    parser.add_argument("--wake-listen", help="HOST:PORT of the conductor's wake-up endpoint")
    parser.add_argument("--log-file")
    parser.add_argument("--log-level")
    parser.add_argument("--power-sync-interval", type=float)
    parser.add_argument("--heartbeat-interval", type=float)
    parser.add_argument("--conductor-dead-after", type=float)
    parser.add_argument("--seat-url", help="base URL seats reach labmetal at (boot scripts, "
                                           "images, the agent API)")
    parser.add_argument("--image-dir", help="the image store (default: STATE_DIR/images)")
    parser.add_argument("--tftp-listen", help="HOST:PORT serving iPXE to PXE ROMs (off if unset)")
    parser.add_argument("--dhcp-interface", help="run dnsmasq for PXE on this interface")
    parser.add_argument("--dhcp-network", help="the room's network, e.g. 10.99.1.0/24")
    parser.add_argument("--dhcp-pool", help="FIRST,LAST addresses to hand out (server mode)")
    parser.add_argument("--dhcp-mode", choices=("server", "proxy"),
                        help="proxy: the room already has a DHCP server")
    parser.add_argument("--dhcp-namespace", help="run dnsmasq in this network namespace")
    return parser


def _settings(args: argparse.Namespace):
    return load_settings({name: getattr(args, name, None) for name in SERVICE_OPTIONS},
                         config_file=getattr(args, "config", None))


def cmd_service(args: argparse.Namespace) -> int:
    from labmetal.service import run
    run(_settings(args), api=args.command in ("serve", "api"),
        conductor=args.command in ("serve", "conductor"))
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from labmetal.db import Database
    settings = _settings(args)
    Database(settings.database_url).upgrade()
    print(f"database at head: {settings.database_url.split('@')[-1]}")
    return 0


def cmd_user_set(args: argparse.Namespace) -> int:
    from labmetal.db import Database
    from labmetal.users import set_user
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
    settings = _settings(args)
    db = Database(settings.database_url)
    db.upgrade()
    set_user(db, args.name, password, args.role)
    print(f"user {args.name} ({args.role}) saved")
    return 0


def _light_seats(path: str | None):
    from pathlib import Path

    from labmetal.lab.seat import LightSeat, LightSeatSpec
    return [LightSeat(spec) for spec in LightSeatSpec.load_all(Path(path))] if path else []


def cmd_lab_bmc(args: argparse.Namespace) -> int:
    from labmetal import logs
    from labmetal.lab.bmc import VirtualBmc, serve_forever
    from labmetal.lab.machine import MemoryMachine
    logs.setup("INFO", name="lab-bmc")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so the seats are powered off
    seats = _light_seats(args.seats)
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
    seats = {seat.spec.mac: seat for seat in _light_seats(args.seats)}

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


def cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from labmetal.lab.demo import run
    return run(args.seats, args.listen, Path(args.state_dir), keep_running=not args.once)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labmetal", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("serve", "run the API and a conductor in one process (embedded mode)"),
                       ("api", "run the REST API only"),
                       ("conductor", "run a conductor only")):
        _service_parser(sub, name, text).set_defaults(func=cmd_service)

    demo = sub.add_parser("demo", help="bring a simulated room under labmetal's control")
    demo.add_argument("--seats", type=int, default=8)
    demo.add_argument("--listen", default="127.0.0.1:6385")
    demo.add_argument("--state-dir", default="var/demo")
    demo.add_argument("--once", action="store_true", help="stop when the room is ready")
    demo.set_defaults(func=cmd_demo)

    db = sub.add_parser("db", help="database schema")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_sub.add_parser("upgrade", help="migrate the schema to the newest version")
    upgrade.add_argument("--config")
    upgrade.add_argument("--database")
    upgrade.add_argument("--state-dir")
    upgrade.set_defaults(func=cmd_db_upgrade)

    user = sub.add_parser("user", help="user accounts")
    user_sub = user.add_subparsers(dest="user_command", required=True)
    user_set = user_sub.add_parser("set", help="create a user or change its password and role")
    user_set.add_argument("name")
    user_set.add_argument("--role", default="admin", choices=("admin", "teacher", "student"))
    user_set.add_argument("--password-stdin", action="store_true",
                          help="read the password from the first line of standard input")
    user_set.add_argument("--config")
    user_set.add_argument("--database")
    user_set.add_argument("--state-dir")
    user_set.set_defaults(func=cmd_user_set)

    lab = sub.add_parser("lab", help="parts of the simulated lab")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    bmc = lab_sub.add_parser("bmc", help="virtual BMCs speaking IPMI over UDP")
    bmc.add_argument("--port", type=int, default=0, help="UDP port of the first BMC")
    bmc.add_argument("--seats", help="JSON list of light seats (lab/seat.py) with their "
                                     "bmc_port, instead of in-memory machines")
    bmc.add_argument("--count", type=int, default=1, help="BMCs on consecutive ports")
    bmc.add_argument("--address", default="127.0.0.1")
    bmc.add_argument("--user", required=True)
    bmc.add_argument("--password", required=True)
    bmc.add_argument("--power-delay", type=float, default=0.0,
                     help="seconds before a power change takes effect")
    bmc.set_defaults(func=cmd_lab_bmc)
    wol = lab_sub.add_parser("wol", help="listen for Wake-on-LAN magic packets")
    wol.add_argument("--port", type=int, default=9)
    wol.add_argument("--address", default="0.0.0.0")
    wol.add_argument("--seats", help="JSON list of light seats to power on by their MAC")
    wol.set_defaults(func=cmd_lab_wol)

    register_images(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as error:
        print(f"labmetal: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
