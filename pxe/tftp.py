"""TFTP for the small boot files (iPXE binaries, per-MAC configs), with tftpy.

tftpy opens files itself, following symlinks out of its root, and anything it did not
expect (a directory, a permission error, an undecodable packet, an option it cannot read, a
send the kernel refuses) kills its ``listen()``, and with it every transfer in progress. The
seats send whatever they like (students are root there, DESIGN.md §11), so:

- tftpy gets an empty private root and finds nothing there: every read goes through
  :meth:`TftpService.open_for_client`, which refuses ``..``, directories and symlinks that
  leave the real root, and asks ``render`` for files made per request;
- tftpy never parses a client's packet: each transfer's packets go through
  :class:`_CheckedPackets` (a request is checked against RFCs 1350, 2347-2349 and 7440 by
  :func:`parse_request`, and refused with an ERROR packet), and a send that fails is a lost
  packet of that transfer, not an exception in the server loop (:class:`_TransferSocket`);
- the listener runs under a supervisor that starts it again if it dies anyway.

Uploads are refused (tftpy allows them by default).

    python -m labmetal.pxe.tftp --root DIR --listen IP:PORT   # e.g. inside a room's netns
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import BinaryIO, Callable

import tftpy
from tftpy.TftpPacketTypes import (TftpPacketACK, TftpPacketERR, TftpPacketInitial,
                                   TftpPacketRRQ, TftpPacketWRQ)
from tftpy.TftpShared import TftpException

from labmetal.config import split_host_port

LOG = logging.getLogger(__name__)

IPXE_DIR = Path("/usr/lib/ipxe")
IPXE_BINARIES = ("undionly.kpxe", "ipxe.efi", "snponly.efi")
# The Secure Boot chain (Debian packages shim-signed, grub-efi-amd64-signed) under the names
# it is loaded by: the PC's firmware loads shimx64.efi, which loads grubx64.efi from the
# same folder.
SECURE_BOOT_LOADERS = {
    "shimx64.efi": Path("/usr/lib/shim/shimx64.efi.signed"),
    "grubx64.efi": Path("/usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed"),
}
# tftpy's default is 5 s, a long stall per lost packet on a LAN; tftpd-hpa starts at 1 s.
RETRANSMIT_TIMEOUT = 1.0
RETRIES = 5  # consecutive timeouts before a transfer is dropped (a client that went away)
RESTART_DELAY = 0.2
READ_BUFFER = 1 << 20  # one read() per 128 blocks of 8 KiB instead of one per block
# A request from a seat is checked before tftpy reads it.
MAX_FILENAME = 255  # bytes: as much as DHCP's boot file name (option 67) can hold
MODES = ("octet", "netascii")  # tftpy sends netascii as it is, like most PXE servers
# Options (RFC 2348 blksize, 2349 timeout and tsize, 7440 windowsize) and the values a
# client may ask for; a value outside is refused. tftpy negotiates blksize and tsize; the
# others are left out of its answer, which the client takes as "not supported".
OPTION_RANGES = {"blksize": (8, 65464), "tsize": (0, 2 ** 64 - 1), "timeout": (1, 255),
                 "windowsize": (1, 65535)}
NEGOTIATED = ("blksize", "tsize")
# Each transfer holds a socket, a file and its read buffer: a flood of requests must not take
# the file descriptors and memory of the process (the conductor) that serves TFTP.
MAX_TRANSFERS = 128
SHOWN = 40  # bytes of a client's value quoted in an error message or a log line

RRQ, WRQ, ACK, ERROR = 1, 2, 4, 5
# Error codes (RFC 1350, 2347)
NOT_DEFINED, FILE_NOT_FOUND, ILLEGAL_OPERATION, OPTION_REFUSED = 0, 1, 4, 8

# render(path, client_ip) -> the file's bytes, or a file to serve, or None if it is not a
# rendered file.
Render = Callable[[str, str], bytes | Path | None]


def install_ipxe_binaries(root: Path, source: Path = IPXE_DIR,
                          names: tuple[str, ...] = IPXE_BINARIES) -> list[Path]:
    """Copy the iPXE binaries PXE ROMs chain-load (Debian package ``ipxe``) into ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in names:
        target = root / name
        shutil.copyfile(source / name, target)
        copied.append(target)
    return copied


def install_secure_boot_loaders(root: Path,
                                loaders: dict[str, Path] = SECURE_BOOT_LOADERS) -> list[str]:
    """Copy Debian's signed shim and network GRUB into ``root``; returns the names of those
    missing on this machine (UEFI PCs with Secure Boot on cannot boot without them)."""
    root.mkdir(parents=True, exist_ok=True)
    missing = []
    for name, source in loaders.items():
        if source.is_file():
            shutil.copyfile(source, root / name)
        else:
            missing.append(f"{name} ({source})")
    return missing


def requested_path(filename: str) -> str | None:
    """The path below the root a client asked for, or None if it tries to leave the root.
    Leading slashes are dropped: PXE ROMs ask for ``/undionly.kpxe`` as often as not."""
    parts = [part for part in filename.replace("\\", "/").split("/") if part not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def _memory_file(data: bytes) -> BinaryIO:
    """A real file (tftpy locks and names what it serves; BytesIO makes it crash)."""
    fd = os.memfd_create("labmetal-tftp", 0)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return os.fdopen(fd, "rb")


class BadRequest(ValueError):
    """A request refused before tftpy sees it; ``code`` is the TFTP error code to answer."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


def shown(value: bytes) -> str:
    """A client's bytes for an error message or a log line: bounded, escaped, ASCII."""
    text = value[:SHOWN].decode("latin-1").encode("unicode_escape").decode("ascii")
    return f"'{text}'..." if len(value) > SHOWN else f"'{text}'"


def parse_request(packet: bytes) -> TftpPacketInitial:
    """The read (or write) request in ``packet``, checked, as tftpy's packet object, or
    :class:`BadRequest`. Only the options tftpy negotiates are passed on, with values it
    can read; options nobody knows are ignored (RFC 2347)."""
    opcode = int.from_bytes(packet[:2], "big") if len(packet) >= 2 else None
    if opcode not in (RRQ, WRQ):
        raise BadRequest(ILLEGAL_OPERATION, f"not a request (opcode {opcode})")
    *fields, unterminated = packet[2:].split(b"\0")
    if len(fields) < 2 or unterminated:
        raise BadRequest(ILLEGAL_OPERATION, "malformed request: a field without its NUL")
    raw_name, raw_mode, *options = fields
    while options and not options[-1]:  # some PXE ROMs pad their request with NULs
        options.pop()
    if len(options) % 2:
        raise BadRequest(ILLEGAL_OPERATION, "malformed request: an option without a value")
    if not raw_name or len(raw_name) > MAX_FILENAME:
        raise BadRequest(FILE_NOT_FOUND, f"file name of {len(raw_name)} bytes (1 to "
                                         f"{MAX_FILENAME})")
    name = raw_name.decode("ascii", "replace")
    if not name.isascii() or not name.isprintable():
        raise BadRequest(FILE_NOT_FOUND, f"file name {shown(raw_name)} is not printable ASCII")
    mode = raw_mode.decode("ascii", "replace").lower()
    if mode not in MODES:
        raise BadRequest(ILLEGAL_OPERATION, f"mode {shown(raw_mode)} (not octet or netascii)")
    negotiated = {}
    for raw_option, raw_value in zip(options[::2], options[1::2]):
        option = raw_option.decode("ascii", "replace").lower()
        if option not in OPTION_RANGES:
            continue
        low, high = OPTION_RANGES[option]
        # isdigit() first: int() also reads " 8", "+8", "8_0" and costs more than linear
        # time for long numbers.
        if not (raw_value.isdigit() and len(raw_value) <= 20 and low <= int(raw_value) <= high):
            raise BadRequest(OPTION_REFUSED, f"{option} {shown(raw_value)} is not "
                                             f"{low}..{high}")
        if option in NEGOTIATED:
            negotiated[option] = str(int(raw_value))
    request = TftpPacketRRQ() if opcode == RRQ else TftpPacketWRQ()
    request.buffer = packet
    request.filename, request.mode, request.options = name, mode, negotiated
    return request


def parse_reply(packet: bytes) -> TftpPacketACK | TftpPacketERR:
    """A client's packet after its request: an ACK, or an ERROR that ends its transfer.
    Anything else ends the transfer too (uploads are refused, so no DATA is expected)."""
    opcode = int.from_bytes(packet[:2], "big") if len(packet) >= 4 else None
    if opcode == ACK:  # longer ACKs are read as their first four bytes, as tftpy does
        ack = TftpPacketACK()
        ack.buffer, ack.blocknumber = packet, int.from_bytes(packet[2:4], "big")
        return ack
    if opcode == ERROR:
        error = TftpPacketERR()
        error.buffer, error.errorcode = packet, int.from_bytes(packet[2:4], "big")
        error.errmsg = shown(packet[4:].split(b"\0", 1)[0])
        return error
    raise TftpException(f"unexpected packet of {len(packet)} bytes (opcode {opcode})")


def error_packet(code: int, message: str) -> bytes:
    return struct.pack("!HH", ERROR, code) + message.encode("ascii", "replace") + b"\0"


class _Stray:
    """A packet to a transfer's port from another address or port than its client's. RFC
    1350: such a packet is "discarded as erroneously sent from somewhere else", "while not
    disturbing the transfer"; tftpy handled it as the client's (an ERROR from anyone ended
    the transfer). tftpy's states discard a packet of a type they do not know (it still
    counts as traffic for tftpy's timeout of the transfer)."""

    def __init__(self, sender: tuple[str, int] | None):
        self.sender = sender

    def __str__(self) -> str:
        return f"a stray packet from {self.sender}"


class _CheckedPackets:
    """A transfer's packet parser, in place of tftpy's (``context.factory``): tftpy's lets
    UnicodeDecodeError, struct.error and int()'s ValueError out of its server loop. The
    first packet is the request: a bad one is answered with an ERROR packet and ends its
    own transfer (tftpy logs the reason); the transfers in progress go on. Later packets
    from the client are ACKs or an ERROR (:func:`parse_reply`); those from anyone else are
    strays (:class:`_Stray`)."""

    def __init__(self, sock: _TransferSocket, client: tuple[str, int], transfers: _Transfers):
        self.sock, self.client, self.transfers = sock, client, transfers
        self.requested = False

    def parse(self, packet: bytes) -> tftpy.TftpPacketTypes.TftpPacket | _Stray:
        if self.requested:
            if self.sock.sender != self.client:
                return _Stray(self.sock.sender)
            return parse_reply(packet)
        self.requested = True
        if self.client[1] == 0:  # no answer can reach it
            raise TftpException("ignored a request from port 0")
        try:
            if len(self.transfers) > MAX_TRANSFERS:
                raise BadRequest(NOT_DEFINED, f"busy: {MAX_TRANSFERS} transfers in progress")
            return parse_request(packet)
        except BadRequest as bad:
            self.sock.sendto(error_packet(bad.code, bad.reason), self.client)
            raise TftpException(f"refused a request: {bad.reason}") from None


class _TransferSocket:
    """A transfer's socket whose sends do not raise, and which keeps who sent the packet
    it received last (for :class:`_CheckedPackets`: tftpy parses a packet without its
    sender). tftpy lets an error of ``sendto()`` out of its server loop, and a seat can
    make one at will: a request from source port 0 (EINVAL) or from a broadcast address
    (EACCES). A send that fails is a lost packet: the transfer retransmits and times out on
    its own."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self.sender: tuple[str, int] | None = None

    def recvfrom(self, size: int) -> tuple[bytes, tuple[str, int]]:
        packet, self.sender = self._sock.recvfrom(size)
        return packet, self.sender

    def sendto(self, data: bytes, address: tuple[str, int]) -> int:
        try:
            return self._sock.sendto(data, address)
        except OSError as error:
            LOG.debug("sending to %s failed: %s", address, error)
            return 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)  # fileno() for select(), close()


class _Metrics(tftpy.TftpContexts.TftpMetrics):
    """tftpy's metrics of a transfer, counting resent and duplicate packets without raising
    at the 20th of one packet: tftpy counts while it resends after a timeout, outside its
    server loop's error handling, so that exception ended every transfer (a transfer with
    ``retries`` of 20 or more did it, or a long one whose block numbers wrap). A transfer
    whose client stopped answering ends after ``retries`` timeouts anyway."""

    def add_dup(self, pkt: object) -> None:
        key = str(pkt)
        self.dups[key] = self.dups.get(key, 0) + 1


class _Transfers(dict):
    """tftpy's table of transfers in progress (``TftpServer.sessions``), where each new
    transfer is set up before tftpy reads its request:

    - its socket is blocking: tftpy gives it a timeout, which makes CPython poll() before
      every send and receive: two more system calls per block, and ~1.4x less throughput.
      Blocking is safe: tftpy's server reads a transfer's socket only when select() said a
      packet is waiting, and times transfers out itself;
    - its sends cannot fail (:class:`_TransferSocket`), its packets are checked
      (:class:`_CheckedPackets`), and its duplicates are counted without raising
      (:class:`_Metrics`)."""

    def __setitem__(self, key: str, context: tftpy.TftpContexts.TftpContextServer) -> None:
        context.sock.setblocking(True)
        context.sock = _TransferSocket(context.sock)
        context.factory = _CheckedPackets(context.sock, (context.host, context.port), self)
        context.metrics = _Metrics()
        super().__setitem__(key, context)


class _Server(tftpy.TftpServer):
    def __init__(self, *args: object, **kwargs: object):
        super().__init__(*args, **kwargs)
        self.sessions = _Transfers()


class TftpService:
    """Serves ``root`` (and what ``render`` makes) read-only on ``address:port``."""

    def __init__(self, root: Path, render: Render | None = None, address: str = "0.0.0.0",
                 port: int = 69, retransmit_timeout: float = RETRANSMIT_TIMEOUT,
                 retries: int = RETRIES):
        self.root = Path(root).resolve()
        self.render = render
        self.address = address
        self.port = port
        self.retransmit_timeout = retransmit_timeout
        self.retries = retries
        self.restarts = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._start_error: BaseException | None = None
        self._empty_root: str | None = None

    def open_for_client(self, filename: str, raddress: str = "", rport: int = 0,
                        **_: object) -> BinaryIO | None:
        """tftpy's ``dyn_file_func``: a regular file inside the root (symlinks allowed if
        they stay inside), else what ``render`` makes of the path, else None (not found)."""
        path = requested_path(filename)
        if path is None:
            LOG.warning("refused %r from %s: outside the TFTP root", filename, raddress)
            return None
        try:
            real = (self.root / path).resolve()
            if not real.is_relative_to(self.root):
                LOG.warning("refused %r from %s: a link out of the TFTP root", filename,
                            raddress)
                return None
            if real.is_file():
                return open(real, "rb", buffering=READ_BUFFER)
            if real.exists():  # a directory, a device
                return None
            data = self.render(path, raddress) if self.render else None
            if isinstance(data, Path):
                return open(data, "rb", buffering=READ_BUFFER)
            return None if data is None else _memory_file(data)
        except Exception:  # a failing render or file must not reach tftpy's loop
            LOG.exception("serving %r to %s failed", filename, raddress)
            return None

    @property
    def listening(self) -> bool:
        server = self._server
        return server is not None and server.is_running.is_set()

    @property
    def transfers(self) -> int:
        """Transfers in progress, including those waiting for a client that went away."""
        server = self._server
        return len(server.sessions) if server is not None else 0

    @staticmethod
    def _refuse_upload(path: str, context: object) -> None:
        LOG.warning("refused an upload to %s", path)
        return None

    def start(self) -> TftpService:
        """Listen in a background thread; returns once the socket is bound (``port`` 0
        becomes the port actually bound) or raises what binding raised."""
        logging.getLogger("tftpy").setLevel(logging.WARNING)  # INFO is per session
        self._empty_root = tempfile.mkdtemp(prefix="labmetal-tftp-empty-")
        self._thread = threading.Thread(target=self._supervise, name="tftp", daemon=True)
        self._thread.start()
        while not self.listening:
            if not self._thread.is_alive():
                self._remove_empty_root()
                raise self._start_error or RuntimeError("the TFTP server did not start")
            time.sleep(0.01)
        assert self._server is not None  # listening
        self.port = self._server.listenport
        return self

    def _supervise(self) -> None:
        first = True
        while not self._stopping.is_set():
            server = _Server(self._empty_root, dyn_file_func=self.open_for_client,
                             upload_open=self._refuse_upload)
            self._server = server
            try:
                server.listen(self.address, self.port, timeout=self.retransmit_timeout,
                              retries=self.retries)
            except Exception as error:
                if first and server.listenport is None:
                    self._start_error = error  # could not bind: start() raises it
                    return
                LOG.exception("the TFTP server died; starting it again")
                self.restarts += 1
                _close_server(server)
                time.sleep(RESTART_DELAY)
            if server.listenport:
                self.port = server.listenport  # the same port again after a restart
            first = False

    def stop(self) -> None:
        """Drop the transfers in progress and stop listening (within the retransmit
        timeout: tftpy looks at its stop flag between packets and timeouts)."""
        self._stopping.set()
        if self._server is not None:
            self._server.stop(now=True)
        if self._thread is not None:
            self._thread.join(timeout=self.retransmit_timeout + 5)
        self._remove_empty_root()

    def _remove_empty_root(self) -> None:
        if self._empty_root:
            shutil.rmtree(self._empty_root, ignore_errors=True)
            self._empty_root = None

    def __enter__(self) -> TftpService:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _close_server(server: _Server) -> None:
    """What a dead listen() leaves open: its socket and its sessions' sockets and files."""
    for context in list(server.sessions.values()):
        try:
            context.end()
        except Exception:
            LOG.debug("closing a session of the dead TFTP server failed", exc_info=True)
    server.sessions.clear()
    if server.sock is not None:
        server.sock.close()
    server.is_running.clear()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labmetal.pxe.tftp",
                                     description="Serve a directory read-only over TFTP.")
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--listen", default="0.0.0.0:69", help="IP:PORT (default 0.0.0.0:69)")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s tftp %(message)s")
    address, port = split_host_port(args.listen)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    service = TftpService(args.root, address=address, port=port).start()
    print(f"serving {service.root} over TFTP on {address}:{service.port}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        service.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
