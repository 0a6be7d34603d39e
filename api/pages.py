"""The web pages: small server-rendered shells whose data comes from the /v1 API.

A page is HTML (Jinja), one CSS file and one small JavaScript module that calls the JSON API
with the login cookie and the CSRF token: no build step, no data in the HTML that the API
would not give the same caller. The shells themselves are public views that check the
caller: nobody logged in is sent to ``/login?next=...`` (a JSON 401 would be a dead end in a
browser), a role whose policy refuses the page's data gets a readable 403 page, and the nav
shows only the pages the policy allows the caller's role. The API still checks every call.

``/login`` is login.py's view; this module gives it the site's look (same form fields, same
POST) by wrapping that view, so there is one login page.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from flask import (Blueprint, Response, g, redirect, render_template, request,
                   send_from_directory)
from werkzeug.wrappers import Response as BaseResponse  # redirect()'s; flask's is one

from labmetal import states
from labmetal.api.services import services
from labmetal.api.auth import ANONYMOUS, CSRF_FIELD, csrf_token, public
from labmetal.api.login import local_target
from labmetal.api.validation import produces
from labmetal.policy import ACTIONS, Verdict

blueprint = Blueprint("pages", __name__, template_folder="templates")
STATIC_DIR = Path(__file__).parent / "static"
STATIC_MAX_AGE = 86400  # URLs carry the file's mtime, so a changed file is a new URL
UI = "/ui"


@dataclass(frozen=True)
class Page:
    name: str  # its URL under /ui/ and its template (and JS module) name
    title: str
    action: str  # the policy action its data needs: the page is shown to roles allowed it
    detail: str | None = None  # the template of /ui/<name>/<ident>, if any


PAGES = (
    Page("rooms", "Rooms", "room:get", detail="room"),
    Page("nodes", "Nodes", "node:get", detail="node"),
    Page("images", "Images", "image:get"),
    Page("users", "Users", "user:list"),
    Page("conductors", "Conductors", "conductor:get"),
    Page("sessions", "Sessions", "session:get"),
)
BY_NAME = {page.name: page for page in PAGES}


def _allowed(action: str, role: str) -> bool:
    return services().policy.verdict(action, role) is not Verdict.REFUSED


def _nav(role: str) -> list[Page]:
    return [page for page in PAGES if _allowed(page.action, role)]


def _logged_out() -> bool:
    return services().settings.access.auth != "noauth" and g.caller is ANONYMOUS


def _to_login() -> BaseResponse:
    target = request.full_path.rstrip("?")
    return redirect(f"/login?next={quote(target, safe='/')}", code=303)


def _render(template: str, page: Page | None, status: int = 200, **values) -> Response:
    caller = g.caller
    role = caller.role
    html = render_template(
        f"{template}.html", page=page, nav=_nav(role) if caller is not ANONYMOUS else [],
        user=caller.name, role=role, auth=services().settings.access.auth, csrf=csrf_token(),
        csrf_field=CSRF_FIELD, static=_static_url,
        can=" ".join(name for name in ACTIONS if _allowed(name, role)), **values)
    response = Response(html, status=status, mimetype="text/html")
    response.headers["Cache-Control"] = "no-store"  # it carries the session's CSRF token
    return response


def _static_url(name: str) -> str:
    try:
        version = int((STATIC_DIR / name).stat().st_mtime)
    except OSError:
        version = 0
    return f"/static/{name}?v={version}"


def _show(page: Page, template: str, **values) -> BaseResponse:
    if _logged_out():
        return _to_login()
    if not _allowed(page.action, g.caller.role):
        return _render("forbidden", page, 403)
    return _render(template, page, **values)


# -- pages -------------------------------------------------------------------------------
@blueprint.get(UI)
@blueprint.get(f"{UI}/")
@public("a page shell: sends nobody-logged-in to /login, then to the role's first page")
@produces("text/html")
def home():
    if _logged_out():
        return _to_login()
    nav = _nav(g.caller.role)
    return redirect(f"{UI}/{nav[0].name}" if nav else "/login", code=303)


@blueprint.get(f"{UI}/<name>")
@public("a page shell: checks the caller itself; its data comes from the authorized API")
@produces("text/html")
def page(name: str):
    found = BY_NAME.get(name)
    if found is None:
        return _not_found()
    return _show(found, found.name)


@blueprint.get(f"{UI}/<name>/<ident>")
@public("a page shell: checks the caller itself; its data comes from the authorized API")
@produces("text/html")
def detail(name: str, ident: str):
    found = BY_NAME.get(name)
    if found is None or found.detail is None:
        return _not_found()
    # The provision verbs per state, so the node page offers only what the API accepts.
    verbs = {state: states.allowed_verbs(state)
             for state in {s for (s, _) in states.PROVISION_VERBS}}
    return _show(found, found.detail, ident=ident, verbs=json.dumps(verbs))


def _not_found() -> BaseResponse:
    if _logged_out():
        return _to_login()
    return _render("not_found", None, 404)


@blueprint.get("/static/<path:filename>")
@public("the pages' CSS and JavaScript: the same for everybody, no data")
@produces("text/css", "text/javascript")
def static_file(filename: str):
    return send_from_directory(STATIC_DIR, filename, max_age=STATIC_MAX_AGE)


@blueprint.before_app_request
def browsers_start_at_the_pages() -> BaseResponse | None:
    """``GET /`` is Ironic's version document for clients (JSON, or ``*/*``); a browser,
    which prefers HTML, is sent to the pages instead."""
    if request.path == "/" and request.method == "GET" and request.accept_mimetypes.best_match(
            ["application/json", "text/html"]) == "text/html":
        return redirect(f"{UI}/", code=303)
    return None


# -- the login page, in the site's look ----------------------------------------------------
@blueprint.record_once
def _dress_the_login_form(state) -> None:
    """login.py's ``GET /login`` answers with a bare form; wrap it so browsers get the same
    form (fields, action, CSRF token) inside the site's layout, and a logged-in caller
    straight to ``next``. Runs when this blueprint is registered, so it must come after
    login's in create_app (checked here)."""
    app = state.app
    bare = app.view_functions.get("login.login_form")
    if bare is None:
        raise RuntimeError("register the pages blueprint after the login blueprint")

    def login_form():
        caller = g.caller
        target = local_target(request.args.get("next", ""))
        if caller.name or services().settings.access.auth == "noauth":
            if target and caller.name:
                return redirect(target, code=303)
            return _render("login", None, logged_in=True, target=f"{UI}/")
        return _render("login", None, logged_in=False, target=target or f"{UI}/")

    login_form.public_reason = bare.public_reason  # type: ignore[attr-defined]
    login_form.produces = bare.produces  # type: ignore[attr-defined]
    login_form.__doc__ = bare.__doc__
    app.view_functions["login.login_form"] = login_form
