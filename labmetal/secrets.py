"""Credentials in driver_info: sealed at rest with a key outside the database, masked in the API."""
from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken

SEALED_PREFIX = "sealed:v1:"
MASK = "******"


def is_secret_key(key: str) -> bool:
    """The same rule Ironic uses to hide values: anything that looks like a credential."""
    lowered = key.lower()
    return any(word in lowered for word in ("password", "secret", "token", "_kg", "key"))


class SecretBox:
    def __init__(self, key: bytes):
        self._fernet = Fernet(key)
        self._key = key

    def derive(self, purpose: str) -> bytes:
        """A key of its own for another use (e.g. signing web session cookies), so the
        sealing key itself is used for nothing else."""
        return hmac.new(self._key, f"labmetal {purpose}".encode(), hashlib.sha256).digest()

    @classmethod
    def from_file(cls, path: Path) -> SecretBox:
        """Load the key, creating it (mode 0600, in a 0700 directory if it makes one) the
        first time. An existing key readable by others is tightened at the service's
        start (labmetal/service.py)."""
        path = Path(path)
        if not path.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(Fernet.generate_key())
        return cls(path.read_bytes().strip())

    def seal(self, value: Any) -> str:
        return SEALED_PREFIX + self._fernet.encrypt(str(value).encode()).decode()

    def open(self, value: Any) -> Any:
        if not (isinstance(value, str) and value.startswith(SEALED_PREFIX)):
            return value
        try:
            return self._fernet.decrypt(value[len(SEALED_PREFIX):].encode()).decode()
        except InvalidToken:
            raise ValueError("a stored credential cannot be decrypted: is this the secret key "
                             "the credential was saved with?") from None

    def seal_changed(self, new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
        """Seal secret values that are new or changed; values carried over stay as stored."""
        return {key: (self.seal(value) if is_secret_key(key) and value != old.get(key)
                      and value is not None else value)
                for key, value in new.items()}

    def open_all(self, info: dict[str, Any]) -> dict[str, Any]:
        return {key: self.open(value) for key, value in info.items()}


def masked(info: dict[str, Any]) -> dict[str, Any]:
    return {key: (MASK if is_secret_key(key) and value not in (None, "") else value)
            for key, value in info.items()}
