"""The Flask application factory: Ironic-compatible /v1 plus labmetal's own resources."""
from __future__ import annotations

import io
import logging
from typing import Any, BinaryIO

from flask import Flask, Response, g, request
from sqlalchemy import exc as sqlalchemy_exc
from flask.sessions import SecureCookieSessionInterface
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from labmetal.api import microversion
from labmetal.api.auth import (ANONYMOUS, NOBODY, SAFE_METHODS, Authenticator, Throttled,
                               Unauthenticated, cross_site_refusal, csrf_ok, csrf_refused,
                               throttled_response)
from labmetal.api.errors import (ApiError, database_away, database_unavailable,
                                 error_response, from_refusal)
from labmetal.api.services import SESSION_COOKIE, Services, services
from labmetal.api.validation import RequestJSON, body_limit, takes_form
from labmetal.errors import Refused
from labmetal.images.overlays.base import OverlayError

LOG = logging.getLogger(__name__)


class SessionCookies(SecureCookieSessionInterface):
    """Flask's signed session cookie, marked Secure when the request came over https."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return request.is_secure or services().settings.public_url.startswith("https:")


def create_app(svc: Services) -> Flask:
    from labmetal.api import (agent, boot, conductors, drivers, images, rooms,  # blueprints
                              login, node_states, nodes, pages, ports, root, sessions, users)
    from labmetal.api import front_check, room_tp, seat_login, seat_sessions, session_export

    app = Flask("labmetal.api", static_folder=None)  # every route is a view of ours
    app.extensions["labmetal"] = svc
    provider = RequestJSON(app)
    provider.sort_keys = False
    app.json = provider
    app.url_map.strict_slashes = False  # Ironic's client asks for /v1/nodes/?fields=...
    app.secret_key = svc.box.derive("web session cookies")
    app.session_interface = SessionCookies()
    app.config.update(SESSION_COOKIE_NAME=SESSION_COOKIE, SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Lax")
    authenticator = Authenticator(svc) if svc.settings.auth != "noauth" else None
    app.extensions["labmetal.auth"] = authenticator

    @app.before_request
    def bound_negotiate_and_authenticate() -> Response | None:
        """In this order, and nothing reads the body before the view: bound the body,
        negotiate the version, find the caller (401, or 429 while its password guesses are
        slowed), refuse what another site could have sent, check the login cookie's CSRF
        token."""
        view = app.view_functions.get(request.endpoint or "")
        too_large = bound_body(view)
        if too_large is not None:
            return too_large
        try:
            g.version = microversion.requested(request.headers.get(microversion.HEADER),
                                               request.headers.get("OpenStack-API-Version"))
        except microversion.VersionError as error:
            return error_response(error.status, str(error))
        g.caller = NOBODY
        is_public = hasattr(view, "public_reason")
        if authenticator is not None:
            try:
                caller = authenticator.identify(request)
            except Throttled as error:
                return throttled_response(error)
            except Unauthenticated as error:
                if not is_public:
                    return _challenge(str(error))
                caller = None
            g.caller = caller or ANONYMOUS
            if caller is None and not is_public:
                return _challenge("Authentication required: an API token (X-Auth-Token), "
                                  "HTTP basic credentials of a labmetal user, or a login "
                                  "session")
        if not is_public:
            refused = cross_site_refusal(request, g.caller, takes_form(view))
            if refused is not None:
                return error_response(refused.status, refused.message)
        if (g.caller.via == "session" and request.method not in SAFE_METHODS
                and not csrf_ok(request)):
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

    @app.errorhandler(Refused)
    @app.errorhandler(OverlayError)
    def refused(error: Refused | OverlayError) -> Response:
        api_error = from_refusal(error)
        return error_response(api_error.status, api_error.message)

    @app.errorhandler(RequestEntityTooLarge)
    def body_too_large(error: RequestEntityTooLarge) -> Response:
        """A body without Content-Length (chunked) found too long while it was read."""
        return _too_large(g.get("body_limit"))

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        return error_response(error.code or 500, error.description or error.name)

    @app.errorhandler(sqlalchemy_exc.OperationalError)
    @app.errorhandler(sqlalchemy_exc.InterfaceError)
    @app.errorhandler(sqlalchemy_exc.TimeoutError)
    def database_down(error: Exception) -> Response:
        """The database went away (a restart, an outage): 503 with Retry-After, logged
        once per request without a trace (it is not a bug). Other errors of these
        classes (a missing table) are bugs: 500."""
        if not database_away(error) and not isinstance(error, sqlalchemy_exc.TimeoutError):
            return unexpected(error)
        api_error = database_unavailable(error)
        LOG.warning("%s %s: the database is unavailable; answered 503: %s", request.method,
                    request.path, api_error.message)
        return error_response(api_error.status, api_error.message)

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
    app.register_blueprint(seat_sessions.blueprint)
    app.register_blueprint(room_tp.blueprint)
    app.register_blueprint(front_check.blueprint)
    return app


def bound_body(view) -> Response | None:
    """Bound the request's body before anything reads it: 413 at once for a Content-Length
    over the view's limit (the body is never read), and a body of unknown length (chunked)
    is stopped with 413 once it is longer than the limit (at most the limit and one byte
    are read). A view that streams its body (``@streams``) checks Content-Length itself,
    with its own message, and reads the byte past its limit itself to say so."""
    limit, streams = body_limit(view)
    g.body_limit = limit
    if not streams and (request.content_length or 0) > limit:
        return _too_large(limit)
    most = limit + 1 if streams else limit
    request.environ["wsgi.input"] = BoundedInput(request.environ["wsgi.input"], most)
    request.max_content_length = most + 1  # Werkzeug's own check of Content-Length
    return None


class BoundedInput(io.RawIOBase):
    """A request body that may not be longer than ``most`` bytes: a read past them raises
    413, after at most ``most`` + 1 bytes were taken from the client. (Werkzeug's own
    maximum cuts a body read whole at the maximum, silently.)"""

    def __init__(self, stream: BinaryIO, most: int):
        self.stream = stream
        self.most = most
        self.taken = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.stream.read(min(len(buffer), self.most + 1 - self.taken))
        self.taken += len(data)
        if self.taken > self.most:
            raise RequestEntityTooLarge()
        buffer[:len(data)] = data
        return len(data)


def _too_large(limit: int | None) -> Response:
    size = f"{limit} bytes" if limit is None or limit % 2**20 else f"{limit // 2**20} MiB"
    return error_response(413, f"The request body is larger than the {size} this request "
                               "may have")


def _challenge(message: str) -> Response:
    """401 with a Basic challenge, except to the web pages' own requests (marked with
    ``X-Requested-With``): a challenge would pop the browser's password dialog over the page,
    which sends the user to /login instead."""
    response = error_response(401, message)
    if request.headers.get("X-Requested-With") != "XMLHttpRequest":
        response.headers["WWW-Authenticate"] = 'Basic realm="labmetal"'
    return response
