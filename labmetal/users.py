"""User accounts: roles (admin, teacher, student), bcrypt password hashes, local or LDAP.

A local account has a bcrypt hash; an LDAP account (source "ldap") has none: its password is
checked by binding to the directory, and its local record only holds its role and state.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

import bcrypt
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError

from labmetal.db import Database
from labmetal.models import AuthToken, User, utcnow

ROLES = ("admin", "teacher", "student")
SOURCES = ("local", "ldap")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MAX_PASSWORD_BYTES = 72  # bcrypt reads no further; longer ones are refused, not cut
# Checked against when the user is unknown, so that the answer takes as long either way.
_DUMMY_HASH = bcrypt.hashpw(b"labmetal: no such user", bcrypt.gensalt()).decode()


class AccountError(ValueError):
    """A request about an account that cannot be done as asked; the message says why."""


@dataclass(frozen=True)
class UserChange:
    """What to change on an account; None leaves a field as it is."""
    role: str | None = None
    password: str | None = None
    disabled: bool | None = None


def check_role(role: str) -> None:
    if role not in ROLES:
        raise AccountError(f"role must be one of {', '.join(ROLES)}, not {role!r}")


def check_password_text(password: str) -> None:
    if not password:
        raise AccountError("the password must not be empty")
    if len(password.encode()) > MAX_PASSWORD_BYTES:
        raise AccountError(f"the password is longer than {MAX_PASSWORD_BYTES} bytes")


def hash_password(password: str) -> str:
    check_password_text(password)
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()


def password_matches(password: str, password_hash: str | None) -> bool:
    """Constant work whether or not there is a hash to check against."""
    try:
        matches = bcrypt.checkpw(password.encode(), (password_hash or _DUMMY_HASH).encode())
    except ValueError:  # a malformed hash, or a password bcrypt refuses (> 72 bytes)
        return False
    return matches and password_hash is not None


def set_user(db: Database, name: str, password: str | None, role: str = "admin",
             source: str = "local") -> None:
    """Create the user, or change the password, role and source of an existing one."""
    check_role(role)
    if source not in SOURCES:
        raise AccountError(f"source must be one of {', '.join(SOURCES)}")
    if not NAME_PATTERN.match(name or ""):
        raise AccountError("a user name is 1-64 of letters, digits, '.', '_', '@', '-'")
    if source == "local" and not password:
        raise AccountError("a local user needs a password")
    password_hash = hash_password(password) if source == "local" and password else None
    with db.write() as session:
        user = session.scalar(select(User).where(User.name == name))
        if user is None:
            session.add(User(name=name, password_hash=password_hash, role=role, source=source))
        else:
            user.password_hash, user.role, user.source = password_hash, role, source


def find_user(db: Database, name: str) -> User | None:
    with db.read() as session:
        return session.scalar(select(User).where(User.name == name))


def list_users(db: Database) -> list[User]:
    with db.read() as session:
        return list(session.scalars(select(User).order_by(User.name)))


def change_user(db: Database, name: str, change: UserChange) -> User:
    """Apply a change. Refused if it would leave no enabled admin."""
    if change.role is not None:
        check_role(change.role)
    with db.write() as session:
        user = session.scalar(select(User).where(User.name == name).with_for_update())
        if user is None:
            raise LookupError(name)
        if change.password is not None:
            if user.source != "local":
                raise AccountError(f"user {name} is an LDAP account: its password is the "
                                   "directory's")
            user.password_hash = hash_password(change.password)
        demoted = change.role not in (None, "admin") or change.disabled
        if demoted and user.role == "admin" and not user.disabled:
            _keep_an_admin(session, user)
        if change.role is not None:
            user.role = change.role
        if change.disabled is not None:
            user.disabled = change.disabled
        return user


def delete_user(db: Database, name: str) -> None:
    with db.write() as session:
        user = session.scalar(select(User).where(User.name == name).with_for_update())
        if user is None:
            raise LookupError(name)
        if user.role == "admin" and not user.disabled:
            _keep_an_admin(session, user)
        session.execute(delete(AuthToken).where(AuthToken.user_id == user.id))
        session.delete(user)


def _keep_an_admin(session, user: User) -> None:
    others = session.scalar(select(func.count(User.id)).where(
        User.role == "admin", User.disabled.is_(False), User.id != user.id))
    if not others:
        raise AccountError(f"{user.name} is the last enabled admin; make another admin first")


def record_login(db: Database, user_id: int) -> None:
    with db.write() as session:
        user = session.get(User, user_id)
        if user is not None:
            user.last_login_at = utcnow()


@dataclass(frozen=True)
class DirectoryAccount:
    """A directory accepted the password; ``role`` is what its attributes map to, or None
    when it says nothing about roles (the local record's role then stands)."""
    role: str | None


class PasswordChecker(Protocol):
    """An outside directory of accounts (labmetal.directory)."""
    default_role: str

    def check(self, name: str, password: str) -> DirectoryAccount | None: ...


def authenticate(db: Database, name: str, password: str,
                 directory: PasswordChecker | None = None) -> User | None:
    """The enabled user these credentials are, or None. A local account is checked against
    its hash; an LDAP account, or a name unknown here, against the directory, and a user the
    directory accepts gets (or keeps up to date) a local record with its role."""
    user = find_user(db, name)
    if user is not None and user.source == "local":
        matches = password_matches(password, user.password_hash)
        return user if matches and not user.disabled else None
    account = directory.check(name, password) if directory is not None else None
    if account is None:
        if directory is None:
            password_matches(password, None)  # as long as a wrong password takes
        return None
    assert directory is not None  # the account came from it
    try:
        with db.write() as session:
            user = session.scalar(select(User).where(User.name == name))
            if user is None:
                user = User(name=name, password_hash=None, source="ldap",
                            role=account.role or directory.default_role)
                session.add(user)
            elif account.role is not None:
                user.role = account.role
    except IntegrityError:  # created by a concurrent first login
        user = find_user(db, name)
    return user if user is not None and not user.disabled else None
