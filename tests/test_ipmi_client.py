"""labmetal's RMCP+ client (conductor/power/rmcp.py) against a virtual BMC (pyghmi's server
side, real UDP on loopback), through a relay that reorders, holds or drops what the BMC
sends: the cases a lossy or slow network makes, each made to happen exactly once."""
from __future__ import annotations

import socket
import threading
import time
from typing import Callable

import pytest

from labmetal.conductor.power import rmcp
from labmetal.lab.harness import Processes, start_bmcs

RAKP2 = 0x13
RAKP4 = 0x15


class Relay:
    """Between the client and the BMC, one client at a time (a login's socket). ``hold``
    decides for each packet from the BMC: deliver now (None), drop (-1), hold it until
    the next packet from the BMC comes and deliver it just before that one (1), or send
    other bytes first, then it (bytes)."""

    def __init__(self, bmc_port: int, hold: Callable[[bytes, int], int | bytes | None]):
        self.bmc = ("127.0.0.1", bmc_port)
        self.hold = hold
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.port = self.front.getsockname()[1]
        self.opened = 0  # Open Session requests seen
        self._backs: dict[tuple, socket.socket] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import select
        held: list[tuple[bytes, tuple]] = []
        from_bmc = 0
        while not self._stop.is_set():
            sockets = [self.front, *self._backs.values()]
            ready, _, _ = select.select(sockets, [], [], 0.05)
            for sock in ready:
                if sock is self.front:
                    data, client = self.front.recvfrom(4096)
                    if len(data) > 5 and data[5] & 0x3F == 0x10:
                        self.opened += 1
                    if client not in self._backs:
                        back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                        back.connect(self.bmc)
                        self._backs[client] = back
                    self._backs[client].send(data)
                    continue
                client = next(c for c, s in self._backs.items() if s is sock)
                data = sock.recv(4096)
                from_bmc += 1
                verdict = self.hold(data, from_bmc)
                if isinstance(verdict, bytes):
                    self.front.sendto(verdict, client)
                    verdict = None
                if verdict == -1:
                    continue
                if verdict == 1:
                    held.append((data, client))
                    continue
                for late, to in held:  # overtaken by this one on the way
                    self.front.sendto(late, to)
                held.clear()
                self.front.sendto(data, client)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.front.close()
        for sock in self._backs.values():
            sock.close()


@pytest.fixture
def bmc(procs: Processes) -> int:
    return start_bmcs(procs, 1, password="s3cret")


def payload_type(data: bytes) -> int:
    return data[5] & 0x3F if len(data) > 5 else -1


def read_power(port: int, password: bytes = b"s3cret", deadline: float = 10,
               timing: rmcp.Timing | None = None) -> tuple[bool, rmcp.RmcpSession]:
    session = rmcp.RmcpSession("127.0.0.1", port, b"admin", password,
                               time.monotonic() + deadline, timing)
    try:
        session.open()
        return bool(session.command(0x00, 0x01)[0] & 1), session
    finally:
        session.close()


def read_through(bmc: int, hold: Callable[[bytes, int], int | bytes | None]
                 ) -> tuple[bool, rmcp.RmcpSession, Relay]:
    relay = Relay(bmc, hold)
    try:
        on, session = read_power(relay.port)
    finally:
        relay.close()
    return on, session, relay


def test_a_late_rakp2_is_not_taken_for_a_wrong_password(bmc: int) -> None:
    """The first RAKP2 comes after the client has sent RAKP1 again, just before the answer
    to that one: the BMC now holds the second RAKP1's numbers. pyghmi's client failed here
    with "Incorrect password provided"; this one sets the late answer aside for the answer
    to its newest RAKP1 and goes on, without starting the login over."""
    seen: list[int] = []

    def hold(data: bytes, _: int) -> int | None:
        if payload_type(data) == RAKP2:
            seen.append(1)
            return 1 if len(seen) == 1 else None
        return None

    on, session, relay = read_through(bmc, hold)
    assert on is False
    assert len(seen) == 2 and relay.opened == 1


def test_a_wrong_password_is_said_at_once_and_a_lost_rakp4_costs_one_more_login(
        bmc: int) -> None:
    with pytest.raises(rmcp.AuthRefused, match="Incorrect password provided"):
        read_power(bmc, password=b"not-it")
    lost: list[int] = []

    def drop_first_rakp4(data: bytes, _: int) -> int | None:
        if payload_type(data) == RAKP4 and not lost:
            lost.append(1)
            return -1
        return None

    on, session, relay = read_through(bmc, drop_first_rakp4)
    assert on is False and lost == [1]
    # RAKP3 was sent again, which a BMC that activated the session on the first one drops
    # (or answers "invalid session ID"): the login started over
    assert relay.opened == 2


def test_silence_and_a_lossy_network_are_told_apart(bmc: int) -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    quick = rmcp.Timing(first_wait=0.05, max_wait=0.2)
    try:
        with pytest.raises(rmcp.NoAnswer, match="did not answer any of") as hung:
            read_power(silent.getsockname()[1], deadline=1, timing=quick)
    finally:
        silent.close()
    assert hung.value.answered == 0 and hung.value.sent > 3

    relay = Relay(bmc, lambda data, _: -1 if payload_type(data) == RAKP4 else None)
    try:
        with pytest.raises(rmcp.NoAnswer, match="the network lost the rest") as lossy:
            read_power(relay.port, deadline=1, timing=quick)
    finally:
        relay.close()
    assert lossy.value.answered > 0


def test_malformed_answers_are_ignored_as_lost_packets(bmc: int) -> None:
    """Each answer of the BMC comes after a cut copy of itself (and of its header only): a
    client that trusted lengths would fail with an internal error."""
    def garble(data: bytes, _: int) -> bytes:
        return data[:len(data) // 2] if len(data) > 40 else data[:6]

    on, session, relay = read_through(bmc, garble)
    assert on is False and session.answered > session.sent  # every garbled copy was read
