"""Logging in: the web login (session cookie + CSRF token) and API tokens for the CLIs.

``POST /login`` checks the password once and starts a web session: the cookie holds the
session's secret (signed by Flask), the database its hash and when it was last used, so
logout and an idle session end for real, not only in the browser.
"""
from __future__ import annotations

import html
import logging
from typing import Any

from flask import Blueprint, Response, current_app, g, redirect, request, session

from labmetal import tokens
from labmetal.api.services import services
from labmetal.api.auth import (ANONYMOUS, CSRF_FIELD, CSRF_HEADER, Throttled, authorize,
                               csrf_ok, csrf_refused, csrf_token, public, throttled_response)
from labmetal.api.common import isotime
from labmetal.api.errors import ApiError, bad_request, not_found
from labmetal.api.validation import Field, body, obj, produces
from labmetal.models import AuthToken

LOG = logging.getLogger(__name__)
blueprint = Blueprint("login", __name__)

LOGIN_FORM = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>labmetal: log in</title>
<meta name="csrf-token" content="{csrf}"></head>
<body><main>
<h1>labmetal</h1>
{body}
</main></body></html>
"""
FORM_BODY = """<form method="post" action="/login">
<p role="alert">{error}</p>
<p><label for="user">User name</label>
<input id="user" name="user" autocomplete="username" required autofocus></p>
<p><label for="password">Password</label>
<input id="password" name="password" type="password" autocomplete="current-password" required></p>
<input type="hidden" name="{field}" value="{csrf}">
<p><button type="submit">Log in</button></p>
</form>"""
LOGGED_IN_BODY = """<p>Logged in as <strong>{name}</strong> ({role}).</p>
<form method="post" action="/logout"><input type="hidden" name="{field}" value="{csrf}">
<button type="submit">Log out</button></form>"""


LOGIN = obj("a login",
            Field("user", str, required=True, description="the user name", example="ada"),
            Field("password", str, required=True),
            Field(CSRF_FIELD, str, description=f"the session's CSRF token, if not in the "
                                               f"{CSRF_HEADER} header"))
NEW_TOKEN = obj("a new token",
                Field("description", str | None, max_length=255,
                      description="what the token is for, shown in lists",
                      error="description must be a string of at most 255 characters"),
                Field("expires_in", float, minimum=1,
                      description="seconds, at most the token_lifetime setting (the default)",
                      error="expires_in must be a number of seconds from 1 to the "
                            "token_lifetime setting"))


def _page(body: str, status: int = 200) -> Response:
    csrf = html.escape(csrf_token())
    text = LOGIN_FORM.format(csrf=csrf, body=body.replace("{csrf}", csrf).replace(
        "{field}", CSRF_FIELD))
    response = Response(text, status=status, mimetype="text/html")
    response.headers["Cache-Control"] = "no-store"
    return response


def _form(error: str = "", status: int = 200) -> Response:
    return _page(FORM_BODY.replace("{error}", html.escape(error)), status)


def _noauth() -> ApiError:
    return bad_request("This service runs with auth = noauth: everybody is an admin, there is "
                       "nobody to log in as")


@blueprint.get("/login")
@public("the login form")
@produces("text/html")
def login_form():
    caller = g.caller
    if caller.name:
        return _page(LOGGED_IN_BODY.replace("{name}", html.escape(caller.name))
                     .replace("{role}", caller.role))
    return _form()


@blueprint.post("/login")
@public("checks the password itself")
@body(LOGIN, form=True)
def login(body: dict[str, Any]):
    """Form fields (or a JSON object) ``user`` and ``password``, with the CSRF token made for
    the anonymous session by ``GET /login`` or ``GET /v1/auth/session`` (form field or
    header): without it, another site could log a browser in as the attacker. A form gets
    a redirect (303) to ``next``, JSON the user, role and the new session's CSRF token."""
    svc = services()
    if svc.settings.access.auth == "noauth":
        raise _noauth()
    as_json = request.is_json
    if not csrf_ok(request):
        raise csrf_refused()
    name, password = body["user"], body["password"]
    try:
        user = current_app.extensions["labmetal.auth"].check_password(
            name, password, request.remote_addr or "")
    except Throttled as error:  # too many wrong passwords lately: no check at all
        if as_json:
            return throttled_response(error)
        response = _form(f"{error}.", 429)
        response.headers["Retry-After"] = str(error.retry_after)
        return response
    if user is None:
        if as_json:
            raise ApiError(401, "Wrong user name or password")
        return _form("Wrong user name or password.", 401)
    # Idleness ends it early; token_lifetime bounds it even if used all along.
    try:
        issued = tokens.issue(svc.db, user.id, tokens.WEB,
                              lifetime=svc.settings.access.token_lifetime,
                              description=(request.user_agent.string or "")[:200] or None)
    except tokens.AccountGone as error:
        raise ApiError(401, str(error)) from None
    session.clear()  # a new CSRF token with the new session
    session["sid"] = issued.secret
    LOG.info("user %s (%s) logged in; web session %s", user.name, user.role, issued.token.uuid)
    if as_json:
        return {"user": user.name, "role": user.role, "csrf_token": csrf_token()}
    return redirect(local_target(request.args.get("next", "")) or "/login", code=303)


def local_target(target: str) -> str | None:
    """``target`` if it is a path on this site, else None: a redirect elsewhere would help
    phishing. Only printable ASCII with no space (a browser drops tabs and newlines from a
    URL, so ``/<tab>/evil.example`` is ``//evil.example``; a newline would also end the
    Location header), one leading ``/`` (``//host`` is another site, and browsers read
    ``\\`` as ``/``), no backslash anywhere."""
    printable = all("!" <= char <= "~" for char in target)
    if (printable and target.startswith("/") and not target.startswith("//")
            and "\\" not in target):
        return target
    return None


@blueprint.post("/logout")
@public("ends the caller's own session, if any (its CSRF token is checked first)")
def logout():
    if session.get("sid"):
        holder = tokens.resolve(services().db, session["sid"], tokens.WEB)
        if holder is not None:
            tokens.revoke(services().db, holder.token.uuid)
            LOG.info("user %s logged out", holder.user.name)
    session.clear()
    if request.mimetype in ("application/x-www-form-urlencoded", "multipart/form-data"):
        return redirect("/login", code=303)
    return "", 204


@blueprint.get("/v1/auth/session")
@public("tells who is logged in, and gives the CSRF token the login form needs")
def session_info():
    caller = g.caller
    return {"user": caller.name, "role": None if caller is ANONYMOUS else caller.role,
            "via": caller.via, "auth": services().settings.access.auth,
            "csrf_token": csrf_token(),
            "idle_timeout": services().settings.access.session_idle_timeout}


# -- API tokens --------------------------------------------------------------------------
def token_view(token: AuthToken, user: str | None) -> dict:
    return {"uuid": token.uuid, "user": user, "description": token.description,
            "created_at": isotime(token.created_at), "expires_at": isotime(token.expires_at),
            "last_used_at": isotime(token.last_used_at)}


@blueprint.post("/v1/auth/tokens")
@authorize("token:create")
@body(NEW_TOKEN, optional=True)
def create_token(body: dict[str, Any]):
    """A new API token for the caller, shown once. Body (optional): ``description``,
    ``expires_in`` (seconds, at most the ``token_lifetime`` setting)."""
    svc = services()
    caller = g.caller
    if caller.user_id is None:
        raise _noauth()
    if caller.via == "token":
        raise ApiError(403, "An API token cannot create other tokens: use your password "
                            "(HTTP basic) or a login session")
    lifetime = svc.settings.access.token_lifetime
    expires_in = body.get("expires_in", lifetime)
    if expires_in > lifetime:
        raise bad_request(f"expires_in must be a number of seconds from 1 to {lifetime:g} "
                          "(the token_lifetime setting)")
    description = body.get("description")
    try:
        issued = tokens.issue(svc.db, caller.user_id, tokens.API, expires_in, description)
    except tokens.AccountGone as error:  # deleted or disabled since this request began
        raise ApiError(401, str(error)) from None
    LOG.info("API token %s issued to %s", issued.token.uuid, caller.name)
    view = token_view(issued.token, caller.name) | {"token": issued.secret}
    return view, 201, {"Cache-Control": "no-store"}


@blueprint.get("/v1/auth/tokens")
@authorize("token:list")
def list_tokens():
    caller = g.caller
    if caller.user_id is None:
        return {"tokens": []}
    return {"tokens": [token_view(token, caller.name)
                       for token in tokens.list_tokens(services().db, caller.user_id)]}


@blueprint.delete("/v1/auth/tokens/<token_uuid>")
@authorize("token:delete", owner=lambda token_uuid: tokens.owner_of(services().db, token_uuid))
def delete_token(token_uuid: str):
    if not tokens.revoke(services().db, token_uuid):
        raise not_found(f"Token {token_uuid} could not be found.")
    LOG.info("API token %s revoked by %s", token_uuid, g.caller.name or "an admin")
    return "", 204
