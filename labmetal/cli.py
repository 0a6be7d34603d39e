"""The `labmetal` command: run the service, manage the database and users, run lab parts."""
from __future__ import annotations

import argparse
import getpass
import json
import signal
import socket
import sys
import threading

from labmetal.client import add_ca_file_option, ca_bundle, unreachable
from labmetal.config import load_settings
from labmetal.images.cli import register as register_images
from labmetal.node_cli import register as register_nodes
from labmetal.room_cli import register as register_room
from labmetal.session_cli import register as register_sessions

SERVICE_OPTIONS = ("listen", "database", "auth", "allow_noauth", "state_dir", "hostname",
                   "secret_key_file", "public_url", "wake_listen", "log_file", "log_level",
                   "power_sync_interval", "heartbeat_interval", "conductor_dead_after",
                   "seat_url", "image_dir",
                   "tftp_listen", "dhcp_interface", "dhcp_network", "dhcp_pool", "dhcp_mode",
                   "dhcp_namespace", "uefi_loader", "policy_file", "front", "tls_listen",
                   "tls_cert", "tls_key", "client_timeout")


def _service_parser(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text)
    parser.add_argument("--config", help="TOML file with a [labmetal] section")
    parser.add_argument("--listen", help="HOST:PORT of the REST API, plain HTTP (default "
                                         "127.0.0.1:6385)")
    parser.add_argument("--front", choices=("nginx", "none"),
                        help="nginx (default): the front on --listen and --tls-listen (HTTPS), "
                             "bodies bounded, slow clients cut off; none: waitress alone on "
                             "--listen, plain HTTP (a machine of its own, not a lab network)")
    parser.add_argument("--tls-listen", help="HOST:PORT, or PORT on --listen's host, of the "
                                             "HTTPS listener (default: port 6443)")
    parser.add_argument("--tls-cert", help="your own certificate (PEM) instead of one from "
                                           "labmetal's CA; with --tls-key")
    parser.add_argument("--tls-key", help="the key of --tls-cert")
    parser.add_argument("--client-timeout", type=float,
                        help="seconds a client may take to send a request's head or the "
                             "next piece of its body before the front closes it (default 15)")
    parser.add_argument("--database", help="SQLAlchemy URL: sqlite:///PATH (default, under "
                                           "--state-dir) or postgresql+psycopg://...")
    parser.add_argument("--auth", choices=("http_basic", "noauth"),
                        help="http_basic (default): every request as one of labmetal's users; "
                             "noauth: every caller is an admin (loopback only, unless "
                             "--insecure-noauth)")
    parser.add_argument("--insecure-noauth", dest="allow_noauth", action="store_true",
                        default=None, help="allow --auth noauth on an address other hosts "
                                           "reach (LABMETAL_ALLOW_NOAUTH=true): anyone on "
                                           "the network, a seat too, is then an admin")
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
    parser.add_argument("--uefi-loader", choices=("shim", "ipxe"),
                        help="a UEFI PC's first file: shim (signed shim + GRUB, Secure Boot "
                             "on or off; default) or ipxe (snponly.efi, Secure Boot off)")
    parser.add_argument("--policy-file", help="JSON or TOML: action -> roles, over the "
                                              "defaults (`labmetal policy show`)")
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


def _user_db(args: argparse.Namespace):
    from labmetal.db import Database
    db = Database(_settings(args).database_url)
    db.upgrade()
    return db


def cmd_user_set(args: argparse.Namespace) -> int:
    from labmetal.users import set_user
    if args.ldap:
        password = None
    elif args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
    set_user(_user_db(args), args.name, password, args.role,
             source="ldap" if args.ldap else "local")
    print(f"user {args.name} ({args.role}{', LDAP' if args.ldap else ''}) saved")
    return 0


def cmd_user_list(args: argparse.Namespace) -> int:
    from labmetal.users import list_users
    rows = [{"name": u.name, "role": u.role, "source": u.source, "disabled": u.disabled,
             "last_login_at": u.last_login_at.isoformat() if u.last_login_at else None}
            for u in list_users(_user_db(args))]
    if args.json:
        print(json.dumps(rows, indent=1))
    for row in [] if args.json else rows:
        state = " disabled" if row["disabled"] else ""
        print(f"{row['name']:24} {row['role']:8} {row['source']:6}{state}")
    return 0


def cmd_user_delete(args: argparse.Namespace) -> int:
    from labmetal.users import delete_user
    try:
        delete_user(_user_db(args), args.name)
    except LookupError:
        raise ValueError(f"no user {args.name}") from None
    print(f"user {args.name} deleted (and its tokens and sessions)")
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    """Trade the password for an API token once; later commands send the token."""
    import requests

    from labmetal.profile import Profile, save_profile
    password = (sys.stdin.readline().rstrip("\n") if args.password_stdin
                else getpass.getpass(f"password for {args.user} at {args.url}: "))
    try:
        response = requests.post(args.url.rstrip("/") + "/v1/auth/tokens", timeout=30,
                                 auth=(args.user, password), verify=ca_bundle(),
                                 json={"description": f"labmetal login on "
                                                      f"{socket.gethostname()}"})
    except requests.RequestException as error:
        raise ValueError(unreachable(args.url, error)) from None
    if response.status_code != 201:
        from labmetal.client import server_message
        raise ValueError(f"login refused: {server_message(response)}")
    token = response.json()
    path = save_profile(Profile(args.url.rstrip("/"), args.user, token["token"],
                                token["uuid"], token["expires_at"]))
    print(f"logged in as {args.user}; token saved in {path} (expires {token['expires_at']})")
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    import requests

    from labmetal.profile import load_profile, remove_profile
    profile = load_profile()
    if profile is None:
        print("not logged in")
        return 0
    try:
        requests.delete(f"{profile.url}/v1/auth/tokens/{profile.token_uuid}", timeout=30,
                        headers={"X-Auth-Token": profile.token}, verify=ca_bundle())
    except requests.RequestException as error:
        print(f"labmetal: warning: could not revoke the token at {profile.url}: {error}",
              file=sys.stderr)
    remove_profile()
    print(f"logged out of {profile.url}")
    return 0


def cmd_policy_show(args: argparse.Namespace) -> int:
    from labmetal.policy import Policy
    print(json.dumps(Policy.load(_settings(args).policy_file).table(), indent=1))
    return 0


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
        raise ValueError("give --seats (with --kind) or --qemu/--light, not both")
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
    return down(Path(args.state_dir), timeout=args.timeout, out=_say)


def cmd_lab_status(args: argparse.Namespace) -> int:
    from pathlib import Path

    from labmetal.lab.room import format_status, status
    report = status(Path(args.state_dir))
    print(json.dumps(report, indent=1) if args.json else format_status(report))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from labmetal.lab.demo import DemoOptions, run
    if args.seats is not None:  # --seats N --kind K: a room of one kind
        args.qemu, args.light = (args.seats, 0) if args.kind == "qemu" else (0, args.seats)
    return run(DemoOptions(Path(args.state_dir), qemu=args.qemu, light=args.light,
                           power=args.power, subnet=args.subnet, port=args.port,
                           seat_rate=args.seat_rate, transport=args.transport,
                           profile=args.profile, keep_running=not args.once))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labmetal", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("serve", "run the API and a conductor in one process (embedded mode)"),
                       ("api", "run the REST API only"),
                       ("conductor", "run a conductor only")):
        _service_parser(sub, name, text).set_defaults(func=cmd_service)

    demo = sub.add_parser("demo", help="provision a simulated room end to end: QEMU seats "
                                       "that PXE-boot and light seats, deployed with an OS")
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
    user_set.add_argument("--ldap", action="store_true",
                          help="an LDAP account: no password here, the directory checks it")
    user_list = user_sub.add_parser("list", help="the users, their roles and sources")
    user_list.add_argument("--json", action="store_true")
    user_delete = user_sub.add_parser("delete", help="delete a user and its tokens")
    user_delete.add_argument("name")
    for command in (user_set, user_list, user_delete):
        command.add_argument("--config")
        command.add_argument("--database")
        command.add_argument("--state-dir")
    user_set.set_defaults(func=cmd_user_set)
    user_list.set_defaults(func=cmd_user_list)
    user_delete.set_defaults(func=cmd_user_delete)

    login = sub.add_parser("login", help="get an API token; `labmetal images` then uses it")
    login.add_argument("--url", required=True, help="the labmetal API")
    login.add_argument("--user", required=True)
    login.add_argument("--password-stdin", action="store_true",
                       help="read the password from the first line of standard input")
    login.set_defaults(func=cmd_login)
    logout = sub.add_parser("logout", help="revoke the saved token and forget it")
    logout.set_defaults(func=cmd_logout)
    for command in (login, logout):
        add_ca_file_option(command)

    policy = sub.add_parser("policy", help="who may do what")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    policy_show = policy_sub.add_parser("show", help="the rules in force, as a policy file")
    policy_show.add_argument("--config")
    policy_show.add_argument("--policy-file")
    policy_show.set_defaults(func=cmd_policy_show)

    lab = sub.add_parser("lab", help="parts of the simulated lab")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    bmc = lab_sub.add_parser("bmc", help="virtual BMCs speaking IPMI over UDP")
    bmc.add_argument("--port", type=int, default=0, help="UDP port of the first BMC")
    bmc.add_argument("--seats", help="JSON list of seats (lab/seat.py: light or qemu) with "
                                     "their bmc_port, instead of in-memory machines")
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
    wol.add_argument("--seats", help="JSON list of seats (light or qemu) to power on by MAC")
    wol.set_defaults(func=cmd_lab_wol)

    lab_up = lab_sub.add_parser("up", help="run a simulated room in the foreground")
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
    lab_up.set_defaults(func=cmd_lab_up)
    lab_down = lab_sub.add_parser("down", help="stop the room `lab up` runs (or clean up "
                                               "after one that crashed)")
    lab_down.add_argument("--state-dir", required=True)
    lab_down.add_argument("--timeout", type=float, default=90)
    lab_down.set_defaults(func=cmd_lab_down)
    lab_status = lab_sub.add_parser("status", help="the room's seats: power, BMC, console")
    lab_status.add_argument("--state-dir", required=True)
    lab_status.add_argument("--json", action="store_true")
    lab_status.set_defaults(func=cmd_lab_status)

    register_images(sub)
    register_room(sub)
    register_sessions(sub)
    register_nodes(sub)
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
