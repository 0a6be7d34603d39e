"""The Flask application factory: Ironic-compatible /v1 plus labmetal's own resources."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from flask import Flask, Response, current_app, g, request
from werkzeug.exceptions import HTTPException

from labmetal.api import microversion
from labmetal.api.auth import NOBODY, BasicAuth
from labmetal.api.errors import ApiError, error_response
from labmetal.conductor.drivers import HardwareType
from labmetal.conductor.registry import ConductorRegistry
from labmetal.conductor.rpcapi import ConductorAPI
from labmetal.config import Settings
from labmetal.db import Database
from labmetal.secrets import SecretBox

LOG = logging.getLogger(__name__)
PUBLIC_PATHS = {"/", "/v1", "/v1/"}
# What seats reach without user credentials: files they boot and write, and the agent's
# endpoints (protected by the agent token instead).
PUBLIC_PREFIXES = ("/files/", "/boot", "/v1/lookup", "/v1/heartbeat/", "/v1/discovery")


@dataclass
class Services:
    settings: Settings
    db: Database
    registry: ConductorRegistry
    conductors: ConductorAPI
    drivers: dict[str, HardwareType]
    box: SecretBox


def services() -> Services:
    return current_app.extensions["labmetal"]


def create_app(svc: Services) -> Flask:
    from labmetal.api import (agent, boot, conductors, drivers, images,  # blueprints
                              node_states, nodes, ports, root)

    app = Flask("labmetal.api")
    app.extensions["labmetal"] = svc
    app.json.sort_keys = False
    app.url_map.strict_slashes = False  # Ironic's client asks for /v1/nodes/?fields=...
    basic = BasicAuth(svc.db) if svc.settings.auth == "http_basic" else None

    @app.before_request
    def negotiate_and_authenticate() -> Response | None:
        try:
            g.version = microversion.requested(request.headers.get(microversion.HEADER),
                                               request.headers.get("OpenStack-API-Version"))
        except microversion.VersionError as error:
            return error_response(error.status, str(error))
        g.caller = NOBODY
        if (basic is not None and request.path not in PUBLIC_PATHS
                and not request.path.startswith(PUBLIC_PREFIXES)):
            caller = basic.identify(request)
            if caller is None:
                response = error_response(401, "Authentication required: HTTP basic "
                                               "credentials of a labmetal user")
                response.headers["WWW-Authenticate"] = 'Basic realm="labmetal"'
                return response
            g.caller = caller
        return None

    @app.after_request
    def version_headers(response: Response) -> Response:
        response.headers[microversion.MIN_HEADER] = microversion.text(microversion.MIN_VERSION)
        response.headers[microversion.MAX_HEADER] = microversion.text(microversion.MAX_VERSION)
        response.headers[microversion.HEADER] = microversion.text(
            g.get("version", microversion.MIN_VERSION))
        response.headers["Vary"] = microversion.HEADER
        return response

    @app.errorhandler(ApiError)
    def api_error(error: ApiError) -> Response:
        return error_response(error.status, error.message)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        return error_response(error.code or 500, error.description or error.name)

    @app.errorhandler(Exception)
    def unexpected(error: Exception) -> Response:
        LOG.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, f"Internal error ({type(error).__name__}); see the API log")

    for blueprint in (root.blueprint, nodes.blueprint, node_states.blueprint, ports.blueprint,
                      drivers.blueprint, conductors.blueprint, images.blueprint,
                      agent.blueprint, boot.blueprint):
        app.register_blueprint(blueprint)
    return app
