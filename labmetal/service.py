"""Assemble and run the processes: all-in-one (api + conductor), api only, conductor only."""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from flask import Flask
from waitress.server import create_server

from labmetal import logs
from labmetal.api.app import Services, create_app
from labmetal.conductor.drivers import load_drivers
from labmetal.conductor.registry import ConductorRegistry
from labmetal.conductor.rpcapi import ConductorAPI
from labmetal.conductor.service import ConductorService
from labmetal.config import FrontSettings, Settings, is_loopback
from labmetal.db import Database
from labmetal.front import Nginx, nginx_binary
from labmetal.front import plan as front_plan
from labmetal.images.store import ImageStore
from labmetal.policy import Policy
from labmetal.rundir import tighten
from labmetal.secrets import SecretBox
from labmetal.users import list_users

LOG = logging.getLogger(__name__)


def run(settings: Settings, api: bool = True, conductor: bool = True) -> None:
    # Everything this process and its children (qemu-img, tgtd, dnsmasq...) make is
    # private: the database, keys, images, overlays, exports, logs. Seats get files over
    # HTTP and TFTP from this process, never from the disk directly.
    os.umask(0o077)
    role = "+".join(part for part, on in (("api", api), ("conductor", conductor)) if on)
    if api:
        check_noauth(settings)  # before anything starts
        if settings.front == "nginx":
            nginx_binary()  # installed, with its modules; else say which package
    logs.setup(settings.log_level, settings.log_file, name=f"{role}[{settings.hostname}]")
    # A wrong policy file or LDAP setting stops the start, before anything runs.
    policy = Policy.load(settings.policy_file) if api else Policy.defaults()
    directory = None
    if api and settings.ldap_url:
        from labmetal.directory import Directory
        directory = Directory.from_settings(settings.directory)
    db = Database(settings.database_url)
    for done in tighten_state(settings, db):
        LOG.warning("state: %s", done)
    db.upgrade()
    if api and settings.auth == "noauth":
        accounts = len(list_users(db))
        LOG.warning("authentication is OFF (auth = noauth): every caller of the API at %s "
                    "is an admin%s", settings.listen,
                    f"; the {accounts} account(s) in the database are not asked for"
                    if accounts else "")
    box = SecretBox.from_file(settings.service.secret_key_path)
    drivers = load_drivers(settings.power)
    store = ImageStore(settings.image_path, settings.max_image_size)
    engine = ConductorService(settings, db, drivers, box, store) if conductor else None
    registry = engine.registry if engine else ConductorRegistry(db, settings.conductor_dead_after)
    stop = threading.Event()

    def leave(signum, _frame):
        stop.set()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, leave)
    front = None
    try:
        if engine:
            engine.start()
        if api:
            services = Services(settings, db, registry,
                                ConductorAPI(db, registry, settings.conductor, local=engine),
                                drivers, box, policy, directory)
            app = create_app(services)
            if settings.front == "nginx":
                server, front = serve_behind_front(app, settings.front_end, role)
            else:
                server = serve_directly(app, settings.front_end, role)
            server.run()
        else:
            print(f"labmetal conductor {settings.hostname} running", flush=True)
            stop.wait()
    except SystemExit:
        pass
    finally:
        if front:
            front.stop()  # first: nothing new comes in while the rest stops
        if engine:
            engine.stop()
        db.dispose()


# Image uploads are bounded by the image size limit (checked by the API, with a clear
# error), not by waitress's 1 GiB default.
def _body_limit(front: FrontSettings) -> int:
    return front.max_image_size + 2 ** 26


def serve_directly(app: Flask, front: FrontSettings, role: str) -> Any:
    """front = none: waitress on ``listen`` itself, plain HTTP, at most 100 connections,
    every body read before the application sees it. For a machine of its own."""
    host, port = front.listen_host_port
    server = create_server(app, host=host, port=port, threads=16, ident="labmetal",
                           max_request_body_size=_body_limit(front))
    print(f"labmetal {role} listening on http://{host}:{server.effective_port}", flush=True)
    return server


def serve_behind_front(app: Flask, settings: FrontSettings, role: str) -> tuple[Any, Nginx]:
    """front = nginx (labmetal/front.py): waitress on a unix socket in the front's private
    run directory, nginx on ``listen`` (HTTP) and ``tls_listen`` (HTTPS). Only the front
    reaches the socket, so waitress takes the client's address and scheme from the
    headers it sets (``X-Forwarded-For``, ``X-Forwarded-Proto``): ``request.remote_addr``
    is the seat's address. The "listening" lines are printed once nginx answers."""
    config, renew = front_plan(settings)
    perms = "660" if config.socket_group is not None else "600"
    server = create_server(app, unix_socket=str(config.upstream), unix_socket_perms=perms,
                           threads=16, ident="labmetal",
                           max_request_body_size=_body_limit(settings),
                           # nginx holds the slow and idle clients; what reaches waitress
                           # is requests in flight, up to 64 per client address.
                           connection_limit=1000, asyncore_use_poll=True,
                           trusted_proxy="localhost",  # waitress's name for a unix peer
                           trusted_proxy_count=1,
                           trusted_proxy_headers={"x-forwarded-for", "x-forwarded-proto"},
                           clear_untrusted_proxy_headers=True)
    if config.socket_group is not None:  # nginx's workers reach it through their group
        os.chown(config.upstream, os.geteuid(), config.socket_group)
    front = Nginx(config, renew)
    try:
        front.start()
    except BaseException:
        front.stop()
        server.close()
        raise
    host, port = config.listen
    tls_host, tls_port = config.tls_listen
    print(f"labmetal {role} listening on http://{host}:{port}", flush=True)
    ca = (f"labmetal's CA {config.tls.ca_cert}, SHA-256 {config.tls.fingerprint}"
          if config.tls.ca_cert else f"certificate {config.tls.cert}")
    print(f"labmetal {role} listening on https://{tls_host}:{tls_port} ({ca})", flush=True)
    return server, front


def check_noauth(settings: Settings) -> None:
    """noauth makes every caller an admin. Seats (students are root there) reach any
    address the API listens on outside loopback: refuse unless told so explicitly."""
    if settings.auth != "noauth" or settings.allow_noauth:
        return
    host, _ = settings.front_end.listen_host_port
    if not is_loopback(host):
        raise ValueError(f"refusing to serve the API on {settings.listen} without "
                         "authentication (auth = noauth): anyone who reaches it, a seat "
                         "too, would be an admin. Use --auth http_basic (the default) "
                         "with `labmetal user set`, listen on 127.0.0.1, or, for a closed "
                         "test network only, add --insecure-noauth "
                         "(LABMETAL_ALLOW_NOAUTH=true)")


def tighten_state(settings: Settings, db: Database) -> list[str]:
    """Existing state readable by others (made by an older labmetal, or under a umask of
    022) is fixed rather than only reported: these are this service's own files, and
    nothing else needs to read them. Returns what was changed, for the log."""
    paths = [settings.state_dir, settings.service.secret_key_path, settings.image_path,
             settings.session_store.overlay_path, settings.boot.dhcp_dir, settings.tls_dir]
    if db.sqlite_path:
        paths += [db.sqlite_path.with_name(db.sqlite_path.name + suffix)
                  for suffix in ("", "-wal", "-shm")]
    return [done for done in map(tighten, paths) if done]
