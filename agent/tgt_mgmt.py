"""tgtd's management protocol, spoken directly: for the one request tgtadm cannot make
safely, a new CHAP account.

Why: tgtadm takes an account's password only as ``--password P`` on its command line, and
any local user reads any process's command line (``/proc/<pid>/cmdline``). tgtadm itself is
a thin client: it connects to tgtd's unix socket, sends one ``struct tgtadm_req`` followed
by a NUL-terminated text of ``name=value`` parameters, and reads back a ``struct
tgtadm_rsp`` and a text. Sent from here, the secret is in the socket's data only.

The layout is tgt 1.0.85's (Debian 12; ``usr/tgtadm.h``), checked against the bytes its
tgtadm sends (strace): 120 bytes in host byte order, no padding::

    mode u32, op u32, lld char[64], len u32 (header + text), tid i32, sid u64, lun u64,
    cid u32, host_no u32, device_type u32, ac_dir u32, pack u32, force u32

and the response ``err u32, len u32`` (header + text). Runs inside the deploy ramdisk too:
standard library only.
"""
from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from pathlib import Path

# enum tgtadm_mode and enum tgtadm_op
MODE_SYSTEM, MODE_TARGET, MODE_DEVICE, MODE_PORTAL, MODE_LLD = range(5)
MODE_SESSION, MODE_CONNECTION, MODE_ACCOUNT = range(5, 8)
OP_NEW, OP_DELETE, OP_SHOW, OP_BIND, OP_UNBIND, OP_UPDATE = range(6)

_REQUEST = struct.Struct("=II64sIiQQIIIIII")
_RESPONSE = struct.Struct("=II")
assert _REQUEST.size == 120 and _RESPONSE.size == 8
_NO_LUN = 2**64 - 1  # what tgtadm sends when no --lun is given
_MAX_ANSWER = 16 * 1024 * 1024  # a "show" of many targets; more is not tgtd talking

# enum tgtadm_errno, as tgtadm words them (codes checked against tgtd 1.0.85's answers)
_ERRORS = {
    1: "unknown error", 2: "out of memory", 3: "can't find the driver",
    4: "can't find the target", 5: "can't find the logical unit",
    6: "can't find the session", 7: "can't find the connection",
    8: "can't find the binding", 9: "this target already exists",
    10: "this binding already exists", 11: "this logical unit number already exists",
    12: "this access control rule already exists",
    13: "this access control rule does not exist", 14: "this account already exists",
    15: "can't find the account", 16: "too many accounts", 17: "invalid request",
    18: "this target already has an outgoing account", 19: "this target is still active",
    20: "this logical unit is still active",
}


class TgtMgmtError(Exception):
    """tgtd refused the request, or could not be asked; ``code`` is tgtd's error number
    (None when it did not answer). The message never holds the request's parameters."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Request:
    """One management request: what tgtadm builds from its options."""
    mode: int
    op: int
    params: str = ""  # "name=value,name=value": tgtd's modules parse it
    lld: str = "iscsi"
    tid: int = -1
    sid: int = 0
    lun: int = _NO_LUN
    cid: int = 0
    force: bool = False

    def encode(self) -> bytes:
        text = self.params.encode() + b"\0"
        lld = self.lld.encode()
        if len(lld) >= 64:
            raise ValueError(f"driver name {self.lld!r} is too long")
        header = _REQUEST.pack(self.mode, self.op, lld, _REQUEST.size + len(text), self.tid,
                               self.sid, self.lun, self.cid, 0, 0, 0, 0, int(self.force))
        return header + text


def call(socket_path: str | Path, request: Request, timeout: float) -> str:
    """Send ``request`` to the tgtd listening on ``socket_path`` (``<TGT_IPC_SOCKET>.<control
    port>``); returns its text answer, raises TgtMgmtError if it refuses or is away."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(str(socket_path))
            conn.sendall(request.encode())
            err, length = _RESPONSE.unpack(_read(conn, _RESPONSE.size))
            if err:
                raise TgtMgmtError(f"tgtd: {_ERRORS.get(err, f'error {err}')}", err)
            if not _RESPONSE.size <= length <= _MAX_ANSWER:
                raise TgtMgmtError(f"tgtd answered a length of {length} bytes")
            text = _read(conn, length - _RESPONSE.size)
    except TimeoutError:
        raise TgtMgmtError(f"tgtd did not answer within {timeout} s") from None
    except OSError as error:
        raise TgtMgmtError(f"cannot reach tgtd at {socket_path}: {error.strerror or error}") \
            from None
    return text.rstrip(b"\0").decode(errors="replace")


def new_account(socket_path: str | Path, user: str, secret: str, timeout: float) -> None:
    """``tgtadm --mode account --op new --user USER --password SECRET``, the secret on no
    command line. tgtd takes the user up to the first comma and the password to the end."""
    if not user or "," in user or "\0" in user:
        raise ValueError(f"CHAP user {user!r} must be non-empty, without commas")
    if not secret or "\0" in secret:
        raise ValueError("a CHAP secret must be non-empty, without NUL characters")
    call(socket_path, Request(MODE_ACCOUNT, OP_NEW, f"user={user},password={secret}"),
         timeout)


def _read(conn: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        part = conn.recv(size - len(data))
        if not part:
            raise TgtMgmtError("tgtd closed the connection before its whole answer")
        data += part
    return bytes(data)
