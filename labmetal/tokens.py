"""Bearer secrets for a user: API tokens (kind "api", fixed lifetime) and web login sessions
(kind "web", ended by idleness or logout).

The secret is 256 random bits, handed out once; the database keeps its sha256 only. A fast
hash is enough for a random secret (nothing to guess), and it lets every request find its
row with one indexed lookup. Deleting the row revokes the secret everywhere at once.
"""
from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, or_, select, update

from labmetal.db import Database
from labmetal.models import AuthToken, User, utcnow

API, WEB = "api", "web"
PREFIX = "lmt_"  # recognisable in a leaked paste, as GitHub's ghp_ tokens are
TOUCH_EVERY = 60.0  # seconds between two writes of last_used_at


@dataclass(frozen=True)
class Issued:
    secret: str
    token: AuthToken


@dataclass(frozen=True)
class Holder:
    """Whose secret a request presented."""
    user: User
    token: AuthToken


class AccountGone(LookupError):
    """The user a secret was to be issued to was deleted or disabled meanwhile (between
    the password check and the issue)."""


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def issue(db: Database, user_id: int, kind: str, lifetime: float | None,
          description: str | None = None) -> Issued:
    """A new secret; expired ones of every user are swept on the way. AccountGone if the
    user no longer exists or is disabled, in the same transaction as the issue: a secret
    is never made for an account that is gone."""
    secret = PREFIX + secrets.token_urlsafe(32)
    now = utcnow()
    token = AuthToken(user_id=user_id, kind=kind, secret_hash=secret_hash(secret),
                      description=description, created_at=now, last_used_at=now,
                      expires_at=now + timedelta(seconds=lifetime) if lifetime else None)
    with db.write() as session:
        if session.scalar(select(User.id).where(User.id == user_id,
                                                User.disabled.is_(False))) is None:
            raise AccountGone("This account was deleted or disabled")
        session.execute(delete(AuthToken).where(AuthToken.expires_at < now))
        session.add(token)
    return Issued(secret, token)


def resolve(db: Database, secret: str, kind: str, idle_timeout: float | None = None,
            touch: bool = True) -> Holder | None:
    """The token and its (enabled) user, or None if unknown, expired, idle too long or the
    user is disabled. Expired and idle rows are deleted as they are found. ``touch=False``
    (a page's background refresh, not the user's doing) checks without counting as use, so
    the idle timer is not extended."""
    now = utcnow()
    with db.read() as session:
        found = session.execute(select(AuthToken, User).join(User).where(
            AuthToken.secret_hash == secret_hash(secret), AuthToken.kind == kind)).first()
    if found is None:
        return None
    token, user = found
    last_used = token.last_used_at or token.created_at
    if _over(token.expires_at, now) or (
            idle_timeout and last_used + timedelta(seconds=idle_timeout) < now):
        revoke(db, token.uuid)
        return None
    if user.disabled:
        return None
    every = min(TOUCH_EVERY, (idle_timeout or TOUCH_EVERY) / 4)
    if touch and (now - last_used).total_seconds() >= every:
        with db.write() as session:
            session.execute(update(AuthToken).where(AuthToken.id == token.id)
                            .values(last_used_at=now))
    return Holder(user, token)


def _over(expires_at: datetime | None, now: datetime) -> bool:
    return expires_at is not None and expires_at <= now


def list_tokens(db: Database, user_id: int, kind: str = API) -> list[AuthToken]:
    now = utcnow()
    with db.read() as session:
        return list(session.scalars(select(AuthToken).where(
            AuthToken.user_id == user_id, AuthToken.kind == kind,
            or_(AuthToken.expires_at.is_(None), AuthToken.expires_at > now))
            .order_by(AuthToken.id)))


def owner_of(db: Database, token_uuid: str) -> str | None:
    with db.read() as session:
        return session.scalar(select(User.name).join(AuthToken).where(
            AuthToken.uuid == token_uuid))


def revoke(db: Database, token_uuid: str) -> bool:
    with db.write() as session:
        return bool(session.execute(delete(AuthToken).where(AuthToken.uuid == token_uuid))  # type: ignore[attr-defined]
                    .rowcount)


def revoke_all(db: Database, user_id: int, keep: str | None = None) -> int:
    """End every token and session of a user (password changed, account disabled), but
    ``keep`` (the request's own session, so changing one's password does not log out)."""
    with db.write() as session:
        statement = delete(AuthToken).where(AuthToken.user_id == user_id)
        if keep is not None:
            statement = statement.where(AuthToken.uuid != keep)
        return session.execute(statement).rowcount  # type: ignore[attr-defined]  # a CursorResult
