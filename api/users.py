"""/v1/users: accounts, for admins; everybody may read themself and change their own password
(giving the old one). Password hashes never leave the database."""
from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, g

from labmetal import tokens
from labmetal.api.services import services
from labmetal.api.auth import authorize
from labmetal.api.common import isotime, links
from labmetal.api.errors import ApiError, bad_request, conflict, not_found
from labmetal.api.validation import Field, body, obj
from labmetal.models import User
from labmetal.users import (NAME_PATTERN, ROLES, SOURCES, AccountError, UserChange,
                            change_user, delete_user, find_user, list_users, password_matches,
                            set_user)

LOG = logging.getLogger(__name__)
blueprint = Blueprint("users", __name__)
CHANGED = ("role", "disabled", "password")  # what a change may change (old_password proves)
NEW_USER = obj(
    "a new user",
    Field("name", str, required=True, pattern=NAME_PATTERN.pattern, example="sue",
          description="1-64 of letters, digits, '.', '_', '@', '-' (a letter or digit first)",
          error="Invalid user name {value!r}: a user name is 1-64 of letters, digits, '.', "
                "'_', '@', '-'"),
    Field("role", str, enum=ROLES, default="student"),
    Field("password", str | None, description="a local account's; none for LDAP"),
    Field("source", str, enum=SOURCES, default="local",
          description="ldap: the directory checks the password"))
USER_CHANGE = obj(
    "a user's change",
    Field("role", str, enum=ROLES),
    Field("disabled", bool, description="a disabled user's sessions and tokens end"),
    Field("password", str, description="a local account's new password"),
    Field("old_password", str, description="the current password, to change one's own"))


def user_view(user: User) -> dict[str, Any]:
    return {"name": user.name, "role": user.role, "source": user.source,
            "disabled": user.disabled, "created_at": isotime(user.created_at),
            "last_login_at": isotime(user.last_login_at), "links": links("users", user.name)}


def _user(name: str) -> User:
    user = find_user(services().db, name)
    if user is None:
        raise not_found(f"User {name} could not be found.")
    return user


def _itself(name: str) -> str:
    return name


@blueprint.get("/v1/users")
@authorize("user:list")
def list_all():
    return {"users": [user_view(user) for user in list_users(services().db)]}


@blueprint.get("/v1/users/<name>")
@authorize("user:get", owner=_itself)
def show(name: str):
    return user_view(_user(name))


@blueprint.post("/v1/users")
@authorize("user:create")
@body(NEW_USER)
def create(body: dict[str, Any]):
    """A local account with its password, or ``"source": "ldap"`` and no password for an
    account the directory checks."""
    name, source, role = body["name"], body["source"], body["role"]
    if source == "ldap" and body.get("password"):
        raise bad_request("an LDAP account has no password here: the directory checks it")
    if find_user(services().db, name) is not None:
        raise conflict(f"A user with name {name} already exists (field: name).")
    try:
        set_user(services().db, name, body.get("password"), role, source)
    except AccountError as error:
        raise bad_request(str(error)) from None
    LOG.info("user %s (%s) created by %s", name, role, g.caller.name)
    view = user_view(_user(name))
    return view, 201, {"Location": view["links"][0]["href"]}


@blueprint.patch("/v1/users/<name>")
@authorize("user:update", owner=_itself)
@body(USER_CHANGE)
def update(name: str, body: dict[str, Any]):
    """The fields to change: ``role``, ``disabled``, ``password``. Changing one's own
    password needs ``old_password``; it ends one's other sessions and tokens."""
    caller = g.caller
    if g.as_owner and set(body) - {"password", "old_password"}:
        raise ApiError(403, f"Access was denied to this resource: as role {caller.role} you "
                            "may change only your own password")
    password = body.get("password")
    user = _user(name)
    if password is not None and user.source != "local":
        raise bad_request(f"User {name} is an LDAP account: its password is changed in the "
                          "directory, not here")
    itself = caller.name == name
    if password is not None and itself and not password_matches(
            str(body.get("old_password") or ""), user.password_hash):
        raise ApiError(403, "Access was denied to this resource: to change your own password, "
                            "give the current one as old_password")
    try:
        user = change_user(services().db, name, UserChange(
            role=body.get("role"), password=password, disabled=body.get("disabled")))
    except LookupError:  # deleted since it was read above
        raise not_found(f"User {name} could not be found.") from None
    except AccountError as error:
        raise bad_request(str(error)) from None
    if password is not None or body.get("disabled"):
        ended = tokens.revoke_all(services().db, user.id,
                                  keep=caller.token_uuid if itself else None)
        LOG.info("%d token(s) and session(s) of %s ended", ended, name)
    changed = ", ".join(key for key in CHANGED if key in body)
    LOG.info("user %s changed (%s) by %s", name, changed, caller.name)
    return user_view(user)


@blueprint.delete("/v1/users/<name>")
@authorize("user:delete")
def delete(name: str):
    try:
        delete_user(services().db, name)
    except LookupError:
        raise not_found(f"User {name} could not be found.") from None
    except AccountError as error:
        raise conflict(str(error)) from None
    LOG.info("user %s deleted by %s", name, g.caller.name)
    return "", 204
