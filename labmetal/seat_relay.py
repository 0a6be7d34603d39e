"""A seat's address, relayed by a conductor's TFTP to the API (GRUB has no HTTP).

A Secure Boot seat's GRUB asks the conductor's TFTP for ``boot/<mac>.grub``, which the
conductor fetches from the API (conductor/tftp_files.py): the API then sees the conductor's
address, not the seat's. But a seat's secrets (its session's CHAP account) are bound to the
seat's own address (api/seat_address.py). So the conductor says whose request it relays,
signed with a key both derive from the shared secret key; the API believes the address
only with a valid, fresh proof for that path.
"""
from __future__ import annotations

import hashlib
import hmac

PURPOSE = "tftp relay"  # SecretBox.derive(PURPOSE): the signing key
HEADER = "X-Labmetal-Seat"  # "<address> <unix time> <hmac hex>"
FRESH_SECONDS = 60


def proof(key: bytes, address: str, path: str, when: int) -> str:
    return hmac.new(key, f"{address}\0{path}\0{when}".encode(), hashlib.sha256).hexdigest()


def header(key: bytes, address: str, path: str, when: int) -> str:
    return f"{address} {when} {proof(key, address, path, when)}"


def verify(key: bytes, value: str, path: str, now: float) -> str | None:
    """The relayed address if ``value`` is a fresh, valid header for ``path``; else None."""
    parts = value[:200].split()
    if len(parts) != 3 or not parts[1].isdigit() or len(parts[1]) > 12:
        return None
    address, when, given = parts
    if abs(now - int(when)) > FRESH_SECONDS:
        return None
    # as bytes: compare_digest refuses a str with non-ASCII characters (a seat sends any)
    if not hmac.compare_digest(given.encode("utf-8", "replace"),
                               proof(key, address, path, int(when)).encode()):
        return None
    return address
