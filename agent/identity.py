"""Who this seat is to labmetal: its node and the agent token of the current deploy.

Lookup fills it in; the command API checks every request against the token. Until lookup
has succeeded there is no token, and every command request is refused.
"""
from __future__ import annotations

import hmac
import threading
from dataclasses import dataclass, field


@dataclass
class Identity:
    node_uuid: str | None = None
    _token: str | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def token(self) -> str | None:
        return self._token

    def set(self, node_uuid: str, token: str) -> None:
        with self._lock:
            self.node_uuid, self._token = node_uuid, token

    def accepts(self, presented: str | None) -> bool:
        token = self._token
        if not token or not presented:
            return False
        return hmac.compare_digest(token.encode(), presented.encode())
