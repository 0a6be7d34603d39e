"""`labmetal serve|api|conductor`, `labmetal db upgrade` and `labmetal policy show`: the
service itself, on its own machine. These are local commands: they run the service or read its
database and files directly, before (or instead of) any API.
"""
from __future__ import annotations

import argparse

from labmetal.cli.parsing import Group
from labmetal.config import Settings, load_settings

SERVICE_OPTIONS = ("listen", "database", "auth", "allow_noauth", "state_dir", "hostname",
                   "secret_key_file", "public_url", "wake_listen", "log_file", "log_level",
                   "power_sync_interval", "heartbeat_interval", "conductor_dead_after",
                   "seat_url", "image_dir",
                   "tftp_listen", "dhcp_interface", "dhcp_network", "dhcp_pool", "dhcp_mode",
                   "dhcp_namespace", "uefi_loader", "policy_file", "front", "tls_listen",
                   "tls_cert", "tls_key", "client_timeout")


def add_service_options(parser: argparse.ArgumentParser) -> None:
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


def settings(args: argparse.Namespace) -> Settings:
    return load_settings({name: getattr(args, name, None) for name in SERVICE_OPTIONS},
                         config_file=getattr(args, "config", None))


def cmd_service(args: argparse.Namespace) -> int:
    from labmetal.service import run
    run(settings(args), api=args.service_api, conductor=args.service_conductor)
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from labmetal.db import Database
    database_url = settings(args).database_url
    Database(database_url).upgrade()
    print(f"database at head: {database_url.split('@')[-1]}")
    return 0


def cmd_policy_show(args: argparse.Namespace) -> dict:
    from labmetal.policy import Policy
    return Policy.load(settings(args).policy_file).table()


def add_storage_options(parser: argparse.ArgumentParser) -> None:
    """Where the service keeps its database: for the commands that open it directly."""
    parser.add_argument("--config", help="TOML file with a [labmetal] section")
    parser.add_argument("--database", help="SQLAlchemy URL (default: under --state-dir)")
    parser.add_argument("--state-dir", help="the service's state directory")


def register(top: Group) -> None:
    for name, text, api, conductor in (
            ("serve", "run the API and a conductor in one process (embedded mode)", True, True),
            ("api", "run the REST API only", True, False),
            ("conductor", "run a conductor only", False, True)):
        parser = top.command(name, cmd_service, api=False, help=text)
        add_service_options(parser)
        parser.set_defaults(service_api=api, service_conductor=conductor)

    db = top.group("db", help="database schema", api=False)
    add_storage_options(db.command("upgrade", cmd_db_upgrade,
                                   help="migrate the schema to the newest version"))

    policy = top.group("policy", help="who may do what", api=False)
    show = policy.command("show", cmd_policy_show,
                          help="the rules in force, as a policy file")
    show.add_argument("--config")
    show.add_argument("--policy-file")
