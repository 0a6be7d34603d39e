"""IPMI v2.0 over LAN (RMCP+, cipher suite 3), the client side a conductor needs.

Why labmetal speaks it itself rather than through pyghmi's client (pyghmi still serves the
lab's virtual BMCs, lab/bmc.py): on a lossy network pyghmi's retries fail the way issue 17
measured. A login that loses one packet starts over with the same session id and message
tag, so a late RAKP2 from the first try passes its checks and fails the HMAC on the new
random numbers: "Incorrect password provided" with the right password. Its calls share
process-wide session tables and one I/O thread, so one timed-out call leaves a session
that the next call to that BMC joins (hence a half-minute refusal), and a call cannot be
bounded except by a thread left behind.

Here a call is one session of its own, on its own UDP socket, run by the calling thread:
- every packet is resent on its own with backoff (``first_wait`` doubling up to
  ``max_wait``) until the call's deadline; nothing waits longer than the deadline;
- every RAKP1 sent carries a new tag and random number, so a stale answer is recognised
  as stale, and an HMAC that does not match is a wrong password and nothing else;
- a step that cannot be resent safely (a BMC that saw two RAKP1s keeps the second) starts
  the login over on a new socket;
- what was sent and what was answered is counted, so a BMC that answered nothing (hung,
  or gone) is told apart from a network that lost too much (:class:`NoAnswer`).
Retransmitted commands are the same request (same sequence number), as ipmitool and
pyghmi resend them; chassis control is idempotent except reset, which a BMC that saw it
twice carries out twice.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import select
import socket
import struct
import time
from dataclasses import dataclass
from typing import Callable, Container, TypeVar

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

T = TypeVar("T")

RMCP_HEADER = b"\x06\x00\xff\x07"  # RMCP v1.0, no ack, class IPMI
AUTH_RMCP_PLUS = 0x06
OPEN_SESSION, OPEN_SESSION_ANSWER = 0x10, 0x11
RAKP1, RAKP2, RAKP3, RAKP4 = 0x12, 0x13, 0x14, 0x15
IPMI_PAYLOAD = 0x00
ENCRYPTED, AUTHENTICATED = 0x80, 0x40
BMC_ADDRESS, CONSOLE_ADDRESS = 0x20, 0x81
APP, SET_SESSION_PRIVILEGE, CLOSE_SESSION = 0x06, 0x3B, 0x3C
ADMINISTRATOR, OPERATOR = 4, 3
NAME_ONLY_LOOKUP = 0x10
# Open Session proposal, cipher suite 3: RAKP-HMAC-SHA1, HMAC-SHA1-96, AES-CBC-128.
SUITE_3 = bytes([0, 0, 0, 8, 1, 0, 0, 0, 1, 0, 0, 8, 1, 0, 0, 0, 2, 0, 0, 8, 1, 0, 0, 0])

# RMCP+ status codes (IPMI v2.0 table 13-15) a login can meet
INVALID_SESSION_ID = 0x02
INVALID_ROLE = 0x09
UNAUTHORIZED_ROLE = 0x0A
UNAUTHORIZED_NAME = 0x0D
NO_MATCHING_AUTH = 0x11
NO_MATCHING_INTEGRITY = 0x12
STATUS_TEXT = {
    0x01: "insufficient resources to create a session", 0x02: "invalid session ID",
    0x03: "invalid payload type", 0x04: "invalid authentication algorithm",
    0x05: "invalid integrity algorithm", 0x06: "no matching authentication payload",
    0x07: "no matching integrity payload", 0x08: "inactive session ID",
    0x09: "invalid role", 0x0A: "unauthorized role or privilege level requested",
    0x0B: "insufficient resources to create a session at the requested role",
    0x0C: "invalid name length", 0x0D: "unauthorized name", 0x0E: "unauthorized GUID",
    0x0F: "invalid integrity check value", 0x10: "invalid confidentiality algorithm",
    0x11: "no cipher suite match with proposed security algorithms",
    0x12: "illegal or unrecognized parameter"}


class RmcpError(Exception):
    """An IPMI call failed; the message is for a node's last_error as is."""


class NoAnswer(RmcpError):
    """The deadline passed. ``answered`` counts the packets the BMC answered in this call:
    0 means it answered nothing (hung, off the network, or not there), more means it is
    there and the network lost what was missing."""

    def __init__(self, message: str, sent: int, answered: int):
        super().__init__(message)
        self.sent, self.answered = sent, answered


class AuthRefused(RmcpError):
    """The BMC does not know the user, or the password is not the one it holds."""


class Refused(RmcpError):
    """The BMC answered, and said no (a completion code, or an RMCP+ status)."""


class _StartOver(Exception):
    """This login cannot go on (a step that may not be resent was lost or overtaken)."""


@dataclass
class Timing:
    """How long to wait for one answer before sending again: ``first_wait``, doubling up to
    ``max_wait``. A LAN answers in milliseconds; a busy BMC in tens of them."""
    first_wait: float = 0.25
    max_wait: float = 2.0
    resends_before_start_over: int = 2  # RAKP3 sends: a BMC that activated on the first drops more


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha1).digest()


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


class RmcpSession:
    """One RMCP+ session to one BMC, from :meth:`open` to :meth:`close`, under ``deadline``
    (a time.monotonic() value). Not shared between threads."""

    def __init__(self, host: str, port: int, user: bytes, password: bytes, deadline: float,
                 timing: Timing | None = None):
        self.host, self.port, self.deadline = host, port, deadline
        self.user, self.password = user, password
        self.timing = timing or Timing()
        self.sent = self.answered = 0
        self._sock: socket.socket | None = None
        self._role = ADMINISTRATOR
        self._console_sid = b""
        self._managed_sid = b""
        self._k1 = self._aes = b""
        self._sequence = 0
        self._rq_seq = 0
        self._first_wait = self.timing.first_wait
        self._rtt: float | None = None
        self._address = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)[0]

    # -- the session ------------------------------------------------------------------------
    def open(self) -> None:
        """Log in (Open Session, RAKP 1-4) and take the role; starts over on a new socket
        when a step that cannot be resent is lost, until the deadline."""
        while True:
            self._new_socket()
            try:
                self._login()
                return
            except _StartOver:
                continue

    def command(self, netfn: int, command: int, data: bytes = b"") -> bytes:
        """One IPMI request in the session; the response's data after a completion code 0."""
        rq_seq, message = self._request(netfn, command, data)

        def accept(packet: bytes) -> bytes | None:
            payload = self._session_payload(packet)
            if payload is None or len(payload) < 8:
                return None
            if (payload[1] >> 2 != netfn + 1 or payload[4] >> 2 != rq_seq
                    or payload[5] != command):
                return None  # an answer to an earlier request, resent
            code = payload[6]
            if code != 0:
                raise Refused(f"completion code 0x{code:02x} to command 0x{command:02x}")
            return payload[7:-1]

        return self._exchange(lambda: self._session_packet(message), accept,
                              f"command 0x{netfn:02x}/0x{command:02x}")

    def close(self) -> None:
        """Close Session, sent once and not waited for: the call has its answer, and a BMC
        that misses this expires the session itself."""
        try:
            if self._sock is not None and self._k1:
                _, message = self._request(APP, CLOSE_SESSION, self._managed_sid)
                self._send(self._session_packet(message))
        except OSError:
            pass
        finally:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    # -- login ------------------------------------------------------------------------------
    def _login(self) -> None:
        self._k1 = self._aes = b""
        self._sequence = 0
        sent: list[bytes] = []  # each send its own console session id (and tag)

        def build() -> bytes:
            sent.append(os.urandom(4))
            return self._pre_session_packet(
                OPEN_SESSION, bytes([len(sent) % 256, 0, 0, 0]) + sent[-1] + SUITE_3)

        def opened(packet: bytes) -> tuple[bytes, bytes] | None:
            payload = self._pre_session_payload(packet, OPEN_SESSION_ANSWER)
            if payload is None or len(payload) < 12 or payload[4:8] not in sent:
                return None
            if payload[1] != 0:
                raise Refused(f"the BMC refused the session: {self._status(payload[1])}"
                              + (" (labmetal speaks cipher suite 3)"
                                 if payload[1] in (NO_MATCHING_AUTH, NO_MATCHING_INTEGRITY)
                                 else ""))
            return payload[4:8], payload[8:12]

        self._console_sid, self._managed_sid = self._exchange(
            build, opened, "Open Session", newest=lambda answer: answer[0] == sent[-1])
        rakp2 = self._rakp12()
        self._rakp34(*rakp2)
        self.command(APP, SET_SESSION_PRIVILEGE, bytes([self._role]))

    def _rakp12(self) -> tuple[bytes, bytes, bytes, bytes]:
        """RAKP1 and its answer: each send a new tag and random number, kept so that any
        RAKP2 is checked against the RAKP1 it answers."""
        sent: dict[int, bytes] = {}
        first_tag = os.urandom(1)[0]
        role = self._role | NAME_ONLY_LOOKUP

        def build() -> bytes:
            tag = (first_tag + len(sent)) % 256  # 256 sends would take hours of backoff
            sent[tag] = os.urandom(16)
            payload = (bytes([tag, 0, 0, 0]) + self._managed_sid + sent[tag]
                       + bytes([role, 0, 0, len(self.user)]) + self.user)
            return self._pre_session_packet(RAKP1, payload)

        def answered(packet: bytes) -> tuple[bytes, bytes, bytes, bytes] | None:
            payload = self._answer(packet, RAKP2, sent, 8)
            if payload is None:
                return None
            status = payload[1]
            if status in (UNAUTHORIZED_NAME, INVALID_ROLE, UNAUTHORIZED_ROLE):
                if status != UNAUTHORIZED_NAME and self._role == ADMINISTRATOR:
                    self._role = OPERATOR  # a user who may switch power but not administer
                    raise _StartOver()
                raise AuthRefused(f"{self._status(status)} (user "
                                  f"{self.user.decode(errors='replace')!r})")
            if status == INVALID_SESSION_ID:
                raise _StartOver()  # the BMC dropped the session we opened
            if status != 0:
                raise Refused(f"the BMC refused the login: {self._status(status)}")
            if len(payload) < 60:
                return None
            rm, rc, guid = sent[payload[0]], payload[8:24], payload[24:40]
            names = bytes([role, len(self.user)]) + self.user
            expected = _hmac(self.password, self._console_sid + self._managed_sid + rm + rc
                             + guid + names)
            if not hmac.compare_digest(expected, payload[40:60]):
                # this RAKP1's own answer (tag, random number and socket are this login's
                # alone): the BMC holds another password
                raise AuthRefused("Incorrect password provided")
            return rm, rc, guid, names

        return self._exchange(build, answered, "RAKP1",
                              newest=lambda answer: answer[0] == list(sent.values())[-1])

    def _rakp34(self, rm: bytes, rc: bytes, guid: bytes, names: bytes) -> None:
        tag = os.urandom(1)[0]
        auth = _hmac(self.password, rc + self._console_sid + names)
        request = bytes([tag, 0, 0, 0]) + self._managed_sid + auth
        sik = _hmac(self.password, rm + rc + names)

        def done(packet: bytes) -> bool | None:
            payload = self._answer(packet, RAKP4, (tag,), 8)
            if payload is None:
                return None
            if payload[1] != 0:
                raise _StartOver()  # e.g. a resent RAKP1 reached the BMC after its RAKP2
            if not hmac.compare_digest(_hmac(sik, rm + self._managed_sid + guid)[:12],
                                       payload[8:20]):
                raise _StartOver()
            return True

        self._exchange(lambda: self._pre_session_packet(RAKP3, request), done, "RAKP3",
                       limit=self.timing.resends_before_start_over)
        self._k1 = _hmac(sik, b"\x01" * 20)
        self._aes = _hmac(sik, b"\x02" * 20)[:16]
        self._sequence = 0

    # -- packets ----------------------------------------------------------------------------
    def _request(self, netfn: int, command: int, data: bytes) -> tuple[int, bytes]:
        """An IPMI request message with the session's next sequence number (6 bits)."""
        self._rq_seq = (self._rq_seq + 1) % 64
        header = bytes([BMC_ADDRESS, netfn << 2])
        body = bytes([CONSOLE_ADDRESS, self._rq_seq << 2, command]) + data
        return self._rq_seq, header + bytes([_checksum(header)]) + body + bytes([_checksum(body)])

    @staticmethod
    def _pre_session_packet(payload_type: int, payload: bytes) -> bytes:
        return (RMCP_HEADER + bytes([AUTH_RMCP_PLUS, payload_type]) + bytes(8)
                + struct.pack("<H", len(payload)) + payload)

    @staticmethod
    def _pre_session_payload(packet: bytes, payload_type: int) -> bytes | None:
        if len(packet) < 16 or packet[:4] != RMCP_HEADER or packet[4] != AUTH_RMCP_PLUS \
                or packet[5] & 0x3F != payload_type:
            return None
        length = struct.unpack("<H", packet[14:16])[0]
        return packet[16:16 + length]

    def _answer(self, packet: bytes, payload_type: int, tags: Container[int],
                minimum: int) -> bytes | None:
        """A login step's answer to one of ``tags``, for this console session; else None."""
        payload = self._pre_session_payload(packet, payload_type)
        if payload is None or len(payload) < minimum or payload[0] not in tags \
                or payload[4:8] != self._console_sid:
            return None
        return payload

    def _session_packet(self, message: bytes) -> bytes:
        self._sequence = (self._sequence + 1) & 0xFFFFFFFF or 1
        pad = 15 - len(message) % 16
        iv = os.urandom(16)
        clear = message + bytes(range(1, pad + 1)) + bytes([pad])
        encryptor = Cipher(algorithms.AES(self._aes), modes.CBC(iv)).encryptor()
        payload = iv + encryptor.update(clear) + encryptor.finalize()
        signed = (bytes([AUTH_RMCP_PLUS, ENCRYPTED | AUTHENTICATED | IPMI_PAYLOAD])
                  + self._managed_sid + struct.pack("<IH", self._sequence, len(payload))
                  + payload)
        integrity_pad = (4 - (len(signed) + 2) % 4) % 4
        signed += b"\xff" * integrity_pad + bytes([integrity_pad, 0x07])
        return RMCP_HEADER + signed + _hmac(self._k1, signed)[:12]

    def _session_payload(self, packet: bytes) -> bytes | None:
        if len(packet) < 32 or packet[:4] != RMCP_HEADER or packet[4] != AUTH_RMCP_PLUS \
                or packet[5] != ENCRYPTED | AUTHENTICATED | IPMI_PAYLOAD \
                or packet[6:10] != self._console_sid:
            return None
        signed, code = packet[4:-12], packet[-12:]
        if not hmac.compare_digest(_hmac(self._k1, signed)[:12], code):
            return None  # not from this session (or damaged): as if lost
        length = struct.unpack("<H", packet[14:16])[0]
        payload = packet[16:16 + length]
        if len(payload) < 32 or len(payload) % 16:
            return None
        decryptor = Cipher(algorithms.AES(self._aes), modes.CBC(payload[:16])).decryptor()
        clear = decryptor.update(payload[16:]) + decryptor.finalize()
        return clear[:len(clear) - 1 - clear[-1]]

    # -- the wire ---------------------------------------------------------------------------
    def _new_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
        family, kind, proto, _, address = self._address
        self._sock = socket.socket(family, kind, proto)
        self._sock.connect(address)  # only this BMC's answers; ICMP errors surface

    def _send(self, packet: bytes) -> None:
        assert self._sock is not None
        self.sent += 1
        try:
            self._sock.send(packet)
        except OSError:
            pass  # as a lost packet (no route yet, refused): the timer resends it

    def _exchange(self, build: Callable[[], bytes], accept: Callable[[bytes], T | None],
                  step: str, limit: int | None = None,
                  newest: Callable[[T], bool] | None = None) -> T:
        """Send what ``build`` makes, and again after each wait, until ``accept`` takes an
        answer (it returns None for packets that are not the answer).

        Where each send is a new request (``newest`` says whether an answer is to the last
        one), an answer to an earlier send is kept until the wait ends: a slow BMC that got
        both holds the state of the last, so its answer is taken if it comes; if it does not,
        the last send was lost and the earlier answer is the BMC's state."""
        assert self._sock is not None
        wait, sends = self._first_wait, 0
        while True:
            now = time.monotonic()
            if now >= self.deadline:
                raise self._no_answer(step)
            if limit is not None and sends >= limit:
                raise _StartOver()
            self._send(build())
            sends += 1
            sent_at = now
            resend_at = min(now + wait, self.deadline)
            wait = min(wait * 2, self.timing.max_wait)
            earlier: list[T] = []
            while True:
                left = resend_at - time.monotonic()
                if left <= 0:
                    break
                ready, _, _ = select.select([self._sock], [], [], left)
                if not ready:
                    break
                try:
                    packet = self._sock.recv(2048)
                except OSError:  # ICMP port unreachable for an earlier send: nothing there
                    continue
                self.answered += 1
                try:
                    value = accept(packet)
                except (IndexError, ValueError, struct.error):
                    continue  # malformed: as if lost (answers are checked, not trusted)
                if value is None:
                    continue
                if newest is not None and not newest(value):
                    earlier.append(value)
                    continue
                if sends == 1:  # an unambiguous round trip (Karn): the timer follows it
                    self._learn(time.monotonic() - sent_at)
                return value
            if earlier:
                return earlier[0]

    def _learn(self, round_trip: float) -> None:
        """The first wait is 4 smoothed round trips, within the timing's bounds: a BMC
        that answers in 300 ms on a busy day is not sent everything twice."""
        self._rtt = round_trip if self._rtt is None else 0.75 * self._rtt + 0.25 * round_trip
        self._first_wait = min(max(self.timing.first_wait, 4 * self._rtt), self.timing.max_wait)

    def _no_answer(self, step: str) -> NoAnswer:
        where = f"{self.host}:{self.port}"
        if self.answered == 0:
            return NoAnswer(f"BMC {where} did not answer any of {self.sent} packet(s): hung, "
                            "or not on the network", self.sent, self.answered)
        return NoAnswer(f"BMC {where} did not answer in time: it answered {self.answered} of "
                        f"{self.sent} packet(s), the network lost the rest ({step})",
                        self.sent, self.answered)

    @staticmethod
    def _status(code: int) -> str:
        return STATUS_TEXT.get(code, f"status 0x{code:02x}")


def call(host: str, port: int, user: bytes, password: bytes, deadline: float,
         operation: Callable[[RmcpSession], T], timing: Timing | None = None) -> T:
    """Open a session, run ``operation`` in it, close it."""
    session = RmcpSession(host, port, user, password, deadline, timing)
    try:
        session.open()
        return operation(session)
    finally:
        session.close()
