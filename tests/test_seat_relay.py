"""The seat address a conductor's TFTP relays to the API for GRUB (labmetal/seat_relay.py):
believed only with a fresh proof, for that path, made with the shared key. Fast: no root,
no network."""
from __future__ import annotations

import pytest

from labmetal import seat_relay

pytestmark = pytest.mark.fast

KEY = b"k" * 32
PATH = "/boot/52-54-00-12-34-56.grub"


def test_a_fresh_proof_for_the_path_gives_the_seats_address():
    value = seat_relay.header(KEY, "10.99.1.150", PATH, 1_800_000_000)
    assert seat_relay.verify(KEY, value, PATH, 1_800_000_030) == "10.99.1.150"


def test_anything_else_is_not_believed():
    value = seat_relay.header(KEY, "10.99.1.150", PATH, 1_800_000_000)
    address, when, proof = value.split()
    forged = [
        value.replace("10.99.1.150", "10.99.1.151"),  # another seat's address
        seat_relay.header(b"x" * 32, "10.99.1.150", PATH, 1_800_000_000),  # another key
        f"{address} {when} {'0' * 64}",
        f"{address} {int(when) + 1} {proof}",
        f"{address} {when}",
        "x" * 10_000,
        f"{address} {when} \u00e9t\u00e9",  # not ASCII: a TypeError for compare_digest on str
        "",
    ]
    for bad in forged:
        assert seat_relay.verify(KEY, bad, PATH, 1_800_000_000) is None, bad
    assert seat_relay.verify(KEY, value, "/boot/52-54-00-12-34-57.grub", 1_800_000_000) is None
    assert seat_relay.verify(KEY, value, PATH, 1_800_000_000 + 61) is None  # stale
    assert seat_relay.verify(KEY, value, PATH, 1_800_000_000 - 61) is None
