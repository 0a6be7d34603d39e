"""Who is calling, and may they: authentication of every request, the policy check of every
endpoint.

With ``auth = noauth`` every caller is an anonymous admin (the embedded and demo mode).
Otherwise a request names a labmetal user by, in this order: an API token (``X-Auth-Token``
or ``Authorization: Bearer``), HTTP basic credentials (local or LDAP), or the web login's
session cookie. A cookie is sent by the browser on its own, so a state-changing request that
relies on it must also carry the session's CSRF token; the others need none. A page's
timer-driven refresh says so (``X-Labmetal-Background: 1``): its session is checked but not
counted as used, so a page left open still ends after ``session_idle_timeout``.

Every view is marked either ``@authorize("action")`` or ``@public("why")``; the test over the
URL map fails for a view with neither.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from flask import Request, current_app, g, session

from labmetal import tokens
from labmetal.api.errors import ApiError
from labmetal.models import User
from labmetal.policy import ACTIONS, Verdict
from labmetal.users import authenticate, record_login

LOG = logging.getLogger(__name__)
CACHE_SECONDS = 60.0
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
# Sent by the pages on their timer-driven refreshes: checked like any request, but not
# counted as use, so a page left open does not keep its session alive forever.
BACKGROUND_HEADER = "X-Labmetal-Background"


@dataclass(frozen=True)
class Caller:
    name: str | None
    role: str
    user_id: int | None = None
    via: str = "noauth"  # noauth | token | basic | session | none
    token_uuid: str | None = None  # the API token or web session the request came with


NOBODY = Caller(None, "admin")
ANONYMOUS = Caller(None, "anonymous", via="none")


class Unauthenticated(Exception):
    """Credentials were given and are not (or no longer) good: 401 with this message."""


class Authenticator:
    """Finds the caller of a request. bcrypt (and an LDAP bind) cost ~0.2 s by design, so a
    verified basic (user, password) pair is remembered for a minute, keyed by a hash of
    both, never the password itself."""

    def __init__(self, svc: Any):
        self.svc = svc
        self._verified: dict[str, tuple[float, Caller]] = {}
        self._lock = threading.Lock()

    def identify(self, request: Request) -> Caller | None:
        secret = bearer_token(request)
        if secret:
            holder = tokens.resolve(self.svc.db, secret, tokens.API)
            if holder is None:
                raise Unauthenticated("The token is unknown, expired or revoked")
            return _caller(holder.user, "token", holder.token.uuid)
        credentials = request.authorization
        if credentials is not None and credentials.type == "basic":
            caller = self.check_basic(credentials.username or "", credentials.password or "")
            if caller is None:
                raise Unauthenticated("Wrong user name or password")
            return caller
        if session.get("sid"):
            holder = tokens.resolve(self.svc.db, session["sid"], tokens.WEB,
                                    idle_timeout=self.svc.settings.session_idle_timeout,
                                    touch=not is_background(request))
            if holder is None:
                session.pop("sid", None)
                raise Unauthenticated("Your session has ended (logged out or unused for too "
                                      "long); log in again")
            return _caller(holder.user, "session", holder.token.uuid)
        return None

    def check_basic(self, name: str, password: str) -> Caller | None:
        key = hashlib.sha256(f"{name}\0{password}".encode()).hexdigest()
        with self._lock:
            cached = self._verified.get(key)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        user = self.check_password(name, password)
        if user is None:
            return None
        caller = _caller(user, "basic")
        now = time.monotonic()
        with self._lock:
            if len(self._verified) > 1000:
                self._verified = {k: v for k, v in self._verified.items() if v[0] > now}
            self._verified[key] = (now + CACHE_SECONDS, caller)
        return caller

    def check_password(self, name: str, password: str) -> User | None:
        """The user (local or LDAP) or None; every outcome is logged, never the password."""
        user = authenticate(self.svc.db, name, password, self.svc.directory) if name else None
        if user is None:
            LOG.warning("failed authentication for user %r", name[:64])
            return None
        record_login(self.svc.db, user.id)
        LOG.info("user %s (%s, %s) authenticated", user.name, user.role, user.source)
        return user

    def forget(self, name: str) -> None:
        """Drop a user's remembered basic credentials (password, role or state changed)."""
        with self._lock:
            for key in [k for k, (_, c) in self._verified.items() if c.name == name]:
                del self._verified[key]


def _caller(user: User, via: str, token_uuid: str | None = None) -> Caller:
    return Caller(user.name, user.role, user.id, via, token_uuid)


def is_background(request: Request) -> bool:
    """A page's own periodic refresh (``X-Labmetal-Background: 1``), not something the user
    did: it must not extend the web session's idle timer."""
    return request.headers.get(BACKGROUND_HEADER, "").strip() == "1"


def bearer_token(request: Request) -> str | None:
    """``X-Auth-Token`` (what OpenStack clients send) or ``Authorization: Bearer``."""
    if request.headers.get("X-Auth-Token"):
        return request.headers["X-Auth-Token"].strip()
    credentials = request.authorization
    if credentials is not None and credentials.type == "bearer":
        return credentials.token
    return None


# -- CSRF --------------------------------------------------------------------------------
def csrf_token() -> str:
    """The session's CSRF token, made on first use (also before login, for the login form)."""
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


def csrf_ok(request: Request) -> bool:
    expected = session.get("csrf")
    given = request.headers.get(CSRF_HEADER)
    if given is None and request.mimetype in FORM_TYPES:
        given = request.form.get(CSRF_FIELD)
    return bool(expected and given and hmac.compare_digest(expected, given))


def csrf_refused() -> ApiError:
    return ApiError(403, f"CSRF token missing or wrong: a request authenticated by the login "
                         f"cookie must send the session's token (GET /v1/auth/session) in "
                         f"the {CSRF_HEADER} header or the {CSRF_FIELD} form field")


# -- the policy check --------------------------------------------------------------------
def authorize(action: str, owner: Callable[..., str | None] | None = None,
              lists_own: bool = False):
    """Refuse the view (403) unless the policy allows ``action`` to the caller's role. For a
    role allowed only on its own objects, ``owner`` (given the view's URL arguments) names
    the object's owner, or ``lists_own`` says the view is a collection that shows such a
    caller only its own; either way the view finds ``g.as_owner`` true."""
    if action not in ACTIONS:
        raise KeyError(f"no policy action {action!r} in labmetal.policy.ACTIONS")

    def wrap(view: Callable) -> Callable:
        @functools.wraps(view)
        def checked(*args: Any, **kwargs: Any) -> Any:
            caller: Caller = g.caller
            verdict = current_app.extensions["labmetal"].policy.verdict(action, caller.role)
            g.as_owner = verdict is Verdict.OWN_ONLY
            if verdict is Verdict.REFUSED or (g.as_owner and not lists_own and (
                    owner is None or caller.name is None or owner(**kwargs) != caller.name)):
                raise forbidden(action, caller)
            return view(*args, **kwargs)
        checked.policy_action = action  # type: ignore[attr-defined]
        return checked
    return wrap


def check_allowed(action: str) -> None:
    """The policy check of ``authorize`` for a second action one view may also carry out
    (a room job that powers the room off needs room:power as well as room:deploy)."""
    caller: Caller = g.caller
    if current_app.extensions["labmetal"].policy.verdict(action, caller.role) \
            is not Verdict.ALLOWED:
        raise forbidden(action, caller)


def public(reason: str) -> Callable[[Callable], Callable]:
    """A view anyone may call; ``reason`` says why (and what protects it instead)."""
    def mark(view: Callable) -> Callable:
        view.public_reason = reason  # type: ignore[attr-defined]
        return view
    return mark


def forbidden(action: str, caller: Caller) -> ApiError:
    who = f"user {caller.name}" if caller.name else "this caller"
    return ApiError(403, f"Access was denied to this resource: {action} is disallowed by "
                         f"policy for {who} (role {caller.role})")
