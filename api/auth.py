"""Who is calling: nobody in particular (noauth) or a user checked by HTTP basic auth.

bcrypt costs ~0.2 s by design; a verified (user, password) pair is remembered for a minute
(keyed by a hash, never the password) so a busy CLI does not pay it on every call.
"""
from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass

from flask import Request

from labmetal.db import Database
from labmetal.users import find_user, password_matches

CACHE_SECONDS = 60.0


@dataclass(frozen=True)
class Caller:
    name: str | None
    role: str


NOBODY = Caller(None, "admin")


class BasicAuth:
    def __init__(self, db: Database):
        self.db = db
        self._verified: dict[str, tuple[float, Caller]] = {}
        self._lock = threading.Lock()

    def identify(self, request: Request) -> Caller | None:
        credentials = request.authorization
        if credentials is None or credentials.type != "basic" or not credentials.username:
            return None
        name, password = credentials.username, credentials.password or ""
        key = hashlib.sha256(f"{name}\0{password}".encode()).hexdigest()
        with self._lock:
            cached = self._verified.get(key)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        user = find_user(self.db, name)
        if user is None or not password_matches(password, user.password_hash):
            return None
        caller = Caller(user.name, user.role)
        with self._lock:
            self._verified[key] = (time.monotonic() + CACHE_SECONDS, caller)
        return caller
