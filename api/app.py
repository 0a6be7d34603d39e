"""The Flask application factory: Ironic-compatible /v1 plus labmetal's own resources."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flask import Flask, Response, current_app, g, request
from flask.sessions import SecureCookieSessionInterface
from werkzeug.exceptions import HTTPException

from labmetal.api import microversion
from labmetal.api.auth import (ANONYMOUS, NOBODY, SAFE_METHODS, Authenticator,
                               Unauthenticated, csrf_ok, csrf_refused)
from labmetal.api.errors import ApiError, error_response
from labmetal.conductor.drivers import HardwareType
from labmetal.conductor.registry import ConductorRegistry
from labmetal.conductor.rpcapi import ConductorAPI
from labmetal.config import Settings
from labmetal.db import Database
from labmetal.policy import Policy
from labmetal.secrets import SecretBox

if TYPE_CHECKING:  # ldap3 is loaded only where LDAP is set up
    from labmetal.directory import Directory

LOG = logging.getLogger(__name__)
SESSION_COOKIE = "labmetal_session"


@dataclass
class Services:
    settings: Settings
    db: Database
    registry: ConductorRegistry
    conductors: ConductorAPI
    drivers: dict[str, HardwareType]
    box: SecretBox
    policy: Policy = field(default_factory=Policy.defaults)
    directory: Directory | None = None  # LDAP, when ldap_url is set


def services() -> Services:
    return current_app.extensions["labmetal"]


class SessionCookies(SecureCookieSessionInterface):
    """Flask's signed session cookie, marked Secure when the request came over https."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return request.is_secure or services().settings.public_url.startswith("https:")


def create_app(svc: Services) -> Flask:
    from labmetal.api import (agent, boot, conductors, drivers, images, rooms,  # blueprints
                              login, node_states, nodes, pages, ports, root, sessions, users)
    from labmetal.api import room_tp, seat_login, session_export

    app = Flask("labmetal.api", static_folder=None)  # every route is a view of ours
    app.extensions["labmetal"] = svc
    app.json.sort_keys = False
    app.url_map.strict_slashes = False  # Ironic's client asks for /v1/nodes/?fields=...
    app.secret_key = svc.box.derive("web session cookies")
    app.session_interface = SessionCookies()
    app.config.update(SESSION_COOKIE_NAME=SESSION_COOKIE, SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Lax")
    authenticator = Authenticator(svc) if svc.settings.auth != "noauth" else None
    app.extensions["labmetal.auth"] = authenticator

    @app.before_request
    def negotiate_and_authenticate() -> Response | None:
        try:
            g.version = microversion.requested(request.headers.get(microversion.HEADER),
                                               request.headers.get("OpenStack-API-Version"))
        except microversion.VersionError as error:
            return error_response(error.status, str(error))
        g.caller = NOBODY
        if authenticator is None:
            return None
        view = app.view_functions.get(request.endpoint or "")
        is_public = hasattr(view, "public_reason")
        try:
            caller = authenticator.identify(request)
        except Unauthenticated as error:
            if not is_public:
                return _challenge(str(error))
            caller = None
        g.caller = caller or ANONYMOUS
        if caller is None and not is_public:
            return _challenge("Authentication required: an API token (X-Auth-Token), HTTP "
                              "basic credentials of a labmetal user, or a login session")
        if (caller is not None and caller.via == "session"
                and request.method not in SAFE_METHODS and not csrf_ok(request)):
            refused = csrf_refused()
            return error_response(refused.status, refused.message)
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
                      agent.blueprint, boot.blueprint, login.blueprint, users.blueprint,
                      pages.blueprint, rooms.blueprint, sessions.blueprint):
        app.register_blueprint(blueprint)
    app.register_blueprint(session_export.blueprint)
    app.register_blueprint(seat_login.blueprint)
    app.register_blueprint(room_tp.blueprint)
    return app


def _challenge(message: str) -> Response:
    """401 with a Basic challenge, except to the web pages' own requests (marked with
    ``X-Requested-With``): a challenge would pop the browser's password dialog over the page,
    which sends the user to /login instead."""
    response = error_response(401, message)
    if request.headers.get("X-Requested-With") != "XMLHttpRequest":
        response.headers["WWW-Authenticate"] = 'Basic realm="labmetal"'
    return response
