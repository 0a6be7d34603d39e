"""Assemble and run the processes: all-in-one (api + conductor), api only, conductor only."""
from __future__ import annotations

import logging
import signal
import threading

from waitress.server import create_server

from labmetal import logs
from labmetal.api.app import Services, create_app
from labmetal.conductor.drivers import load_drivers
from labmetal.conductor.registry import ConductorRegistry
from labmetal.conductor.rpcapi import ConductorAPI
from labmetal.conductor.service import ConductorService
from labmetal.config import Settings
from labmetal.db import Database
from labmetal.images.store import ImageStore
from labmetal.policy import Policy
from labmetal.secrets import SecretBox

LOG = logging.getLogger(__name__)


def run(settings: Settings, api: bool = True, conductor: bool = True) -> None:
    role = "+".join(part for part, on in (("api", api), ("conductor", conductor)) if on)
    logs.setup(settings.log_level, settings.log_file, name=f"{role}[{settings.hostname}]")
    # A wrong policy file or LDAP setting stops the start, before anything runs.
    policy = Policy.load(settings.policy_file) if api else None
    directory = None
    if api and settings.ldap_url:
        from labmetal.directory import Directory
        directory = Directory.from_settings(settings)
    db = Database(settings.database_url)
    db.upgrade()
    box = SecretBox.from_file(settings.secret_key_path)
    drivers = load_drivers(settings)
    store = ImageStore(settings.image_path, settings.max_image_size)
    engine = ConductorService(settings, db, drivers, box, store) if conductor else None
    registry = engine.registry if engine else ConductorRegistry(db, settings.conductor_dead_after)
    stop = threading.Event()

    def leave(signum, _frame):
        stop.set()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, leave)
    try:
        if engine:
            engine.start()
        if api:
            app = create_app(Services(settings, db, registry,
                                      ConductorAPI(db, registry, settings, local=engine),
                                      drivers, box, policy, directory))
            host, port = settings.listen_host_port
            # Image uploads are bounded by the image size limit (checked by the API, with a
            # clear error), not by waitress's 1 GiB default.
            server = create_server(app, host=host, port=port, threads=16, ident="labmetal",
                                   max_request_body_size=settings.max_image_size + 2 ** 26)
            print(f"labmetal {role} listening on http://{host}:{server.effective_port}",
                  flush=True)
            server.run()
        else:
            print(f"labmetal conductor {settings.hostname} running", flush=True)
            stop.wait()
    except SystemExit:
        pass
    finally:
        if engine:
            engine.stop()
        db.dispose()
