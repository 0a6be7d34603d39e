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

Browsers on the lab network are attackers too (DESIGN §11). A browser resends remembered
basic credentials with a request another site makes it send, so a state-changing request
must be one no other site can make without the browser asking first (a CORS preflight):
not a form's or a "simple" request's body type, not marked cross-site by the browser. And
password guessing is slowed per user name and per client address (``LoginThrottle``)
before any bcrypt runs.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

from flask import Request, Response, current_app, g, session

from labmetal import tokens
from labmetal.api.errors import ApiError, error_response
from labmetal.models import User
from labmetal.policy import ACTIONS, Verdict
from labmetal.users import authenticate, find_user, record_login

LOG = logging.getLogger(__name__)
CACHE_SECONDS = 60.0
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
# What another site's page can make a browser send without asking (no CORS preflight): a
# form's body types, and text/plain (a form's third, and a "simple" fetch's).
SIMPLE_TYPES = ("text/plain", *FORM_TYPES)
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
    both and of the user's password hash as the database has it now, never the password
    itself: the user's row is read at every request (one indexed lookup), so a new
    password, a disabled or deleted account and a new role count at once, in every API
    process. (An LDAP account's password is the directory's: a change there counts after
    the minute.)"""

    def __init__(self, svc: Any, throttle: LoginThrottle | None = None):
        self.svc = svc
        self.throttle = throttle or LoginThrottle()
        self._verified: dict[str, float] = {}  # key -> until when (monotonic)
        self._lock = threading.Lock()

    def identify(self, request: Request) -> Caller | None:
        """The caller, None without credentials; Unauthenticated for wrong ones, Throttled
        when too many wrong passwords came for the user name or from the address."""
        secret = bearer_token(request)
        if secret:
            holder = tokens.resolve(self.svc.db, secret, tokens.API)
            if holder is None:
                raise Unauthenticated("The token is unknown, expired or revoked")
            return _caller(holder.user, "token", holder.token.uuid)
        credentials = request.authorization
        if credentials is not None and credentials.type == "basic":
            caller = self.check_basic(credentials.username or "", credentials.password or "",
                                      request.remote_addr or "")
            if caller is None:
                raise Unauthenticated("Wrong user name or password")
            return caller
        if session.get("sid"):
            holder = tokens.resolve(self.svc.db, session["sid"], tokens.WEB,
                                    idle_timeout=self.svc.settings.access.session_idle_timeout,
                                    touch=not is_background(request))
            if holder is None:
                session.pop("sid", None)
                raise Unauthenticated("Your session has ended (logged out or unused for too "
                                      "long); log in again")
            return _caller(holder.user, "session", holder.token.uuid)
        return None

    def check_basic(self, name: str, password: str, address: str) -> Caller | None:
        """The caller these basic credentials name, or None. A user name or address being
        slowed down is refused (Throttled) before the cache too: else a guess that hits the
        remembered pair would be told apart from one that does not, at no cost."""
        self.throttle.check(name, address)
        current = find_user(self.svc.db, name) if name else None
        if current is not None and not current.disabled:
            key = _verified_key(name, password, current)
            with self._lock:
                until = self._verified.get(key, 0.0)
            if until > time.monotonic():
                self.throttle.passed(name)
                return _caller(current, "basic")
        user = self.check_password(name, password, address)
        if user is None:
            return None
        now = time.monotonic()
        with self._lock:
            if len(self._verified) > 1000:
                self._verified = {k: t for k, t in self._verified.items() if t > now}
            self._verified[_verified_key(name, password, user)] = now + CACHE_SECONDS
        return _caller(user, "basic")

    def check_password(self, name: str, password: str, address: str) -> User | None:
        """The user (local or LDAP) or None; Throttled when the name or the address has
        failed too often lately. Every outcome is logged, never the password."""
        self.throttle.admit(name, address)
        user, failed = None, None  # failed stays None if the check itself broke (LDAP down)
        try:
            user = authenticate(self.svc.db, name, password, self.svc.directory) \
                if name else None
            failed = user is None
        finally:
            self.throttle.finish(name, address, failed)
        if user is None:
            LOG.warning("failed authentication for user %r from %s", name[:64], address)
            return None
        record_login(self.svc.db, user.id)
        LOG.info("user %s (%s, %s) authenticated", user.name, user.role, user.source)
        return user


def _verified_key(name: str, password: str, user: User) -> str:
    """What a remembered basic login stands for: these credentials against this account's
    password as it is now (a new password, a deleted and re-made account: another key)."""
    return hashlib.sha256(f"{user.id}\0{user.password_hash or user.source}\0{name}\0"
                          f"{password}".encode()).hexdigest()


# -- slowing down password guessing ------------------------------------------------------
class Throttled(Exception):
    """Too many wrong passwords lately for this user name or from this address: 429, with
    Retry-After."""

    def __init__(self, retry_after: float, why: str):
        self.retry_after = max(1, math.ceil(retry_after))
        super().__init__(f"Too many failed logins {why}: try again in {self.retry_after} s")


def throttled_response(error: Throttled) -> Response:
    response = error_response(429, str(error))
    response.headers["Retry-After"] = str(error.retry_after)
    return response


@dataclass(frozen=True)
class Backoff:
    """How one kind of key is slowed: ``free`` failures cost nothing, then each failure
    makes the next try wait ``first`` seconds, doubled at each further one up to
    ``longest``. A key with no failure for ``forget`` seconds starts afresh."""
    free: int
    first: float = 1.0
    longest: float = 300.0
    forget: float = 3600.0

    def wait(self, failures: int) -> float:
        if failures < self.free:
            return 0.0
        return min(self.longest, self.first * 2 ** min(failures - self.free, 32))


@dataclass
class Strikes:
    """The recent failed logins of one user name or one client address."""
    failures: int = 0
    last: float = 0.0  # when the latest failed
    until: float = 0.0  # no try before then
    checking: int = 0  # password checks running now


class LoginThrottle:
    """Failed password checks, per user name and per client address, kept in memory.

    Before a password is checked (a bcrypt, or an LDAP bind), both keys must be free: a key
    that failed ``free`` times waits, longer after each further failure; while it waits,
    every try is refused with no check at all, right password included. Checks running at
    once count too (a burst of guesses sent in parallel is not let through before the
    first of them has failed), and a key past its free failures gets one check at a time.
    A success ends the user name's wait and count; an address keeps its count (one
    account's right password must not buy more guesses at the others), which ends after
    ``forget`` seconds without failures.

    Each kind holds at most ``capacity`` keys, the least recently failed dropped first:
    a guesser cycling through user names is bounded by its address, and cannot grow the
    memory. A name whose record was dropped starts afresh, which only a guesser spread over
    many addresses can cause. ``clock`` is for the tests."""

    def __init__(self, per_user: Backoff = Backoff(free=5), per_address: Backoff = Backoff(free=20),
                 capacity: int = 10_000, clock: Callable[[], float] = time.monotonic):
        self.backoff = {"user": per_user, "address": per_address}
        self.capacity = capacity
        self.clock = clock
        self._strikes: dict[str, OrderedDict[str, Strikes]] = {"user": OrderedDict(),
                                                               "address": OrderedDict()}
        self._lock = threading.Lock()

    def check(self, name: str, address: str) -> None:
        """Throttled if either key must wait now."""
        with self._lock:
            self._refuse_if_waiting(self.clock(), self._keys(name, address))

    def admit(self, name: str, address: str) -> None:
        """Throttled, or a password check may run now: ``finish`` must follow."""
        with self._lock:
            now = self.clock()
            keys = self._keys(name, address)
            self._refuse_if_waiting(now, keys)
            for kind, key, why in keys:
                strikes = self._get(kind, key, now)
                free = self.backoff[kind].free
                room = free - strikes.failures if strikes.failures < free else 1
                if strikes.checking >= room:
                    raise Throttled(1, why)
            for kind, key, _ in keys:
                self._get(kind, key, now).checking += 1

    def finish(self, name: str, address: str, failed: bool | None) -> None:
        """A check ended: ``failed`` True (wrong password), False (right), None (nobody
        could tell: the directory did not answer)."""
        with self._lock:
            now = self.clock()
            for kind, key, why in self._keys(name, address):
                strikes = self._get(kind, key, now)
                strikes.checking = max(0, strikes.checking - 1)
                if failed:
                    strikes.failures += 1
                    strikes.last = now
                    wait = self.backoff[kind].wait(strikes.failures)
                    strikes.until = now + wait
                    self._strikes[kind].move_to_end(key)
                    if wait:
                        LOG.warning("%d failed logins %s: the next try waits %.0f s",
                                    strikes.failures, why, wait)
            if failed is False:
                self._start_again(name)

    def passed(self, name: str) -> None:
        """The user name's right password was given (a remembered one): its count starts
        again."""
        with self._lock:
            self._start_again(name)

    def _start_again(self, name: str) -> None:
        strikes = self._strikes["user"].get(_user_key(name))
        if strikes is not None:
            strikes.failures, strikes.until = 0, 0.0

    def _keys(self, name: str, address: str) -> tuple[tuple[str, str, str], ...]:
        return (("user", _user_key(name), f"for user {name[:64]!r}"),
                ("address", address, f"from {address}"))

    def _refuse_if_waiting(self, now: float, keys: tuple[tuple[str, str, str], ...]) -> None:
        for kind, key, why in keys:
            strikes = self._strikes[kind].get(key)
            if strikes is not None and strikes.until > now:
                raise Throttled(strikes.until - now, why)

    def _get(self, kind: str, key: str, now: float) -> Strikes:
        """The key's record, made if need be (dropping the least recently failed key past
        ``capacity``), started afresh if it has been quiet for ``forget`` seconds."""
        table = self._strikes[kind]
        strikes = table.get(key)
        if strikes is None:
            strikes = table[key] = Strikes()
            while len(table) > self.capacity:
                table.popitem(last=False)
        elif (not strikes.checking and strikes.until <= now
              and now - strikes.last > self.backoff[kind].forget):
            strikes.failures = 0
        return strikes


def _user_key(name: str) -> str:
    """One key per name however it is spelled (a directory may ignore case), bounded."""
    return name.casefold()[:255]


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
    # as bytes: compare_digest refuses str with non-ASCII characters (a forged header or form)
    return bool(expected and given and hmac.compare_digest(expected.encode(), given.encode()))


def csrf_refused() -> ApiError:
    return ApiError(403, f"CSRF token missing or wrong: a request authenticated by the login "
                         f"cookie must send the session's token (GET /v1/auth/session) in "
                         f"the {CSRF_HEADER} header or the {CSRF_FIELD} form field")


def cross_site_refusal(request: Request, caller: Caller, takes_form: bool) -> ApiError | None:
    """Why a state-changing request to a checked view is refused as one another site could
    have made, or None. A browser sends remembered basic credentials with any request to
    this site, including a form another site submits, or a ``fetch`` it makes with a
    "simple" body type: those reach here with no CORS preflight to stop them. So:

    - a form's or a simple request's body type is refused (415), except on a view that
      takes a form, called with the login cookie: its CSRF token is checked next;
    - a request made with basic credentials that the browser marks as sent by another site
      (``Sec-Fetch-Site``, or an ``Origin`` that is not this site) is refused (403): it
      covers a body-less POST, which needs no type.

    API tokens are never sent by a browser on its own; the login cookie carries the CSRF
    token check."""
    if request.method in SAFE_METHODS:
        return None
    if request.mimetype in SIMPLE_TYPES and not (takes_form and caller.via == "session"):
        return ApiError(415, f"A {request.mimetype} body is not taken here (another site's "
                             "page could send one with your browser's credentials): send "
                             "JSON (Content-Type: application/json), or the type this "
                             "request documents")
    if caller.via == "basic" and _from_another_site(request):
        return ApiError(403, "This request was sent by another site's page (Sec-Fetch-Site "
                             "or Origin says so) with your browser's remembered password; "
                             "it is refused")
    return None


def _from_another_site(request: Request) -> bool:
    """What the browser says about who made the request. ``Sec-Fetch-Site`` is set by the
    browser itself; older browsers only send ``Origin``, compared with the Host asked
    for. Clients that are not browsers send neither."""
    fetch_site = request.headers.get("Sec-Fetch-Site", "").lower()
    if fetch_site:
        return fetch_site not in ("same-origin", "none")
    origin = request.headers.get("Origin")
    if origin is None:
        return False
    return origin == "null" or urlsplit(origin).netloc.lower() != request.host.lower()


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
