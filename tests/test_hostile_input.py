"""What a hostile seat sends (DESIGN.md §11: students are root on the seat network), against
the real services: TFTP requests tftpy cannot read, requests from addresses no answer can
reach, a flood of requests; and request paths long enough to stall a log filter that
backtracks (huge file names and words against the filters alone: tests/test_logs.py). Each
attack runs while a transfer or the API is in use, and the test then checks that the others
were not touched. Every wait is on an event (a packet, a thread's flag, an answer) with a
generous bound; nothing asserts a speed."""
from __future__ import annotations

import logging
import os
import resource
import selectors
import socket
import struct
from pathlib import Path

import pytest
import requests

from labmetal.logs import MAX_MESSAGE
from labmetal.pxe.tftp import MAX_TRANSFERS, TftpService
from labmetal.lab.harness import start_service

WAIT = 60  # seconds: the bound of every wait for an answer; a frozen service takes minutes
BLOCK = 512
# A client that stops between two blocks keeps its transfer for RETRIES x 1 s.
RETRIES = 60


@pytest.fixture
def tftp_root(tmp_path: Path) -> Path:
    root = tmp_path / "tftp"
    root.mkdir()
    (root / "big.bin").write_bytes(os.urandom(1024 * 1024))
    (root / "small.bin").write_bytes(os.urandom(3 * BLOCK + 100))
    return root


def request(name: bytes, *options: bytes, opcode: int = 1, mode: bytes = b"octet") -> bytes:
    return struct.pack("!H", opcode) + b"".join(part + b"\0" for part in (name, mode, *options))


class Reader:
    """A TFTP client on a plain UDP socket that fetches one block when asked to, so that a
    transfer stays in progress as long as the test wants."""

    def __init__(self, port: int, name: bytes):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(WAIT)
        self.sock.sendto(request(name), ("127.0.0.1", port))
        self.data = bytearray()
        self.block = 0
        self.server: tuple[str, int] | None = None  # the transfer's own port
        self.done = False

    def next_block(self) -> None:
        """Receives the next DATA block (copies resent meanwhile are skipped) and ACKs it."""
        while True:
            packet, sender = self.sock.recvfrom(65536)
            opcode, number = struct.unpack("!HH", packet[:4])
            assert opcode == 3, f"not DATA: {packet[:80]!r}"
            self.server = self.server or sender
            if number == (self.block + 1) % 65536 and sender == self.server:
                break
        self.block += 1
        self.data += packet[4:]
        self.done = len(packet) - 4 < BLOCK
        self.sock.sendto(struct.pack("!HH", 4, number), self.server)

    def read_all(self) -> bytes:
        while not self.done:
            self.next_block()
        return bytes(self.data)

    def close(self) -> None:
        self.sock.close()


def error_answer(port: int, packet: bytes) -> tuple[int, bytes]:
    """Sends ``packet`` from a new port; the ERROR it is answered with: (code, message)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(WAIT)
        client.sendto(packet, ("127.0.0.1", port))
        answer = client.recvfrom(65536)[0]
    opcode, code = struct.unpack("!HH", answer[:4])
    assert opcode == 5, f"not an ERROR: {answer[:80]!r}"
    assert len(answer) < 200 and answer.endswith(b"\0")
    return code, answer[4:-1]


HOSTILE_REQUESTS = {  # packet, the TFTP error code it gets
    "blksize=abc": (request(b"big.bin", b"blksize", b"abc"), 8),
    "blksize=65536": (request(b"big.bin", b"blksize", b"65536"), 8),
    "blksize=7": (request(b"big.bin", b"blksize", b"7"), 8),
    "a 5,000-digit blksize": (request(b"big.bin", b"blksize", b"9" * 5000), 8),
    "timeout=0": (request(b"big.bin", b"timeout", b"0"), 8),
    "windowsize=0": (request(b"big.bin", b"windowsize", b"0"), 8),
    "tsize=-1": (request(b"big.bin", b"tsize", b"-1"), 8),
    "a non-UTF-8 file name": (request(b"\xff\xfe.bin"), 1),
    "a file name with a newline": (request(b"big.bin\nERROR forged log line"), 1),
    "a 65,000-character file name": (request(b"a" * 65_000), 1),
    "an empty file name": (request(b""), 1),
    "mode mail": (request(b"big.bin", mode=b"mail"), 4),
    "a non-ASCII mode": (request(b"big.bin", mode=b"\xffoctet"), 4),
    "a truncated packet": (request(b"big.bin")[:-3], 4),
    "an option without its value": (request(b"big.bin", b"blksize"), 4),
    "a garbage opcode": (b"\x00\x63" + os.urandom(40), 4),
    "an ACK to the server's port": (struct.pack("!HH", 4, 1), 4),
    "one byte": (b"\x01", 4),
    "an upload with blksize=abc": (request(b"big.bin", b"blksize", b"abc", opcode=2), 8),
}


def test_hostile_tftp_requests_are_refused_and_a_transfer_in_progress_goes_on(tftp_root,
                                                                              caplog):
    caplog.set_level(logging.WARNING)
    with TftpService(tftp_root, address="127.0.0.1", port=0, retries=RETRIES) as tftp:
        reader = Reader(tftp.port, b"big.bin")
        try:
            reader.next_block()
            for what, (packet, code) in HOSTILE_REQUESTS.items():
                assert error_answer(tftp.port, packet)[0] == code, what
                reader.next_block()  # between two hostile requests, one more block
            assert reader.read_all() == (tftp_root / "big.bin").read_bytes()
        finally:
            reader.close()

        # Unknown options are ignored, valid ones (also those tftpy does not do) accepted.
        fresh = Reader(tftp.port, b"small.bin")
        try:
            assert fresh.read_all() == (tftp_root / "small.bin").read_bytes()
        finally:
            fresh.close()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(WAIT)
            client.sendto(request(b"/small.bin", b"BLKSIZE", b"1024", b"x-vendor", b"\xff",
                                  b"timeout", b"3", b"windowsize", b"4", b"tsize", b"0"),
                          ("127.0.0.1", tftp.port))
            oack = client.recvfrom(65536)[0]
        assert oack == b"\x00\x06blksize\x001024\x00tsize\x00" + str(3 * BLOCK + 100).encode() \
            + b"\x00"
        assert tftp.restarts == 0

    # The refusals are logged, each line bounded and on one line.
    logged = [record.getMessage() for record in caplog.records]
    assert any("refused a request: file name of 65000 bytes" in line for line in logged)
    assert all(len(line) < 500 and "\n" not in line for line in logged
               if "refused" in line), logged


def test_packets_to_a_transfer_from_anyone_but_its_client_are_discarded(tftp_root):
    with TftpService(tftp_root, address="127.0.0.1", port=0, retries=RETRIES) as tftp:
        reader = Reader(tftp.port, b"big.bin")
        try:
            reader.next_block()
            assert reader.server is not None
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
                for packet in (struct.pack("!HH", 5, 0) + b"stop\0", b"\xff" * 7,
                               struct.pack("!HH", 4, reader.block + 1), b"\x00\x04"):
                    stranger.sendto(packet, reader.server)
            # The transfer's socket reads in order: the next block but one is sent after
            # the strays were handled.
            reader.next_block()
            reader.next_block()
            assert reader.read_all() == (tftp_root / "big.bin").read_bytes()
        finally:
            reader.close()
        assert tftp.restarts == 0


def spoofed(source: str, source_port: int, port: int, payload: bytes) -> None:
    """Sends a UDP packet with a made-up source, as root on a seat can."""
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + len(payload), 0, 0, 64,
                         socket.IPPROTO_UDP, 0, socket.inet_aton(source),
                         socket.inet_aton("127.0.0.1"))
    udp = struct.pack("!HHHH", source_port, port, 8 + len(payload), 0)  # no checksum
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        raw.sendto(header + udp + payload, ("127.0.0.1", 0))


def test_tftp_requests_no_answer_can_reach_do_not_restart_the_server(tftp_root):
    with TftpService(tftp_root, address="127.0.0.1", port=0, retries=RETRIES) as tftp:
        reader = Reader(tftp.port, b"big.bin")
        try:
            reader.next_block()
            # The kernel refuses to send to port 0 (EINVAL) and to a broadcast address
            # (EACCES); tftpy let both errors out of its server loop.
            spoofed("127.0.0.1", 0, tftp.port, request(b"small.bin"))
            spoofed("127.255.255.255", 4000, tftp.port, request(b"small.bin"))
            spoofed("127.255.255.255", 4001, tftp.port, request(b"small.bin", b"blksize",
                                                                 b"abc"))
            # The server reads its requests in order: once this one is answered, the
            # spoofed ones were handled.
            assert error_answer(tftp.port, request(b"missing.bin"))[0] == 1
            assert tftp.restarts == 0
            assert reader.read_all() == (tftp_root / "big.bin").read_bytes()
        finally:
            reader.close()
        assert tftp.restarts == 0


def first_answers(clients: list[socket.socket], timeout: float) -> list[bytes]:
    """The first packet each client received, waiting ``timeout`` for them all."""
    answers: dict[socket.socket, bytes] = {}
    with selectors.DefaultSelector() as selector:
        for client in clients:
            selector.register(client, selectors.EVENT_READ)
        while len(answers) < len(clients):
            ready = selector.select(timeout)
            assert ready, f"{len(clients) - len(answers)} requests got no answer"
            for key, _ in ready:
                answers[key.fileobj] = key.fileobj.recv(65536)
                selector.unregister(key.fileobj)
    return [answers[client] for client in clients]


def test_a_flood_of_tftp_requests_is_refused_past_a_bound_and_takes_nothing_down(tftp_root):
    flood = 2 * MAX_TRANSFERS + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with TftpService(tftp_root, address="127.0.0.1", port=0, retries=RETRIES) as tftp:
        reader = Reader(tftp.port, b"big.bin")
        clients: list[socket.socket] = []
        try:
            reader.next_block()
            # Room for the flood's own sockets and MAX_TRANSFERS transfers (a socket and a
            # file each), not for a transfer per request: without a bound, the server runs
            # out of file descriptors, as a boot server with a smaller limit would.
            in_use = len(os.listdir("/proc/self/fd"))
            limit = in_use + flood + 2 * MAX_TRANSFERS + 64
            if limit > hard:
                pytest.skip(f"needs {limit} file descriptors")
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
            answers = []
            while len(clients) < flood:  # in bursts the server's socket buffer holds
                burst = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(32)]
                clients += burst
                for client in burst:
                    client.sendto(request(b"small.bin"), ("127.0.0.1", tftp.port))
                answers += first_answers(burst, WAIT)
            served = [answer for answer in answers if answer[:4] == b"\x00\x03\x00\x01"]
            refused = [answer for answer in answers if answer[:4] == b"\x00\x05\x00\x00"]
            assert len(served) + len(refused) == flood
            assert len(served) <= MAX_TRANSFERS - 1  # the reader's transfer is one
            assert b"busy" in refused[0]
            assert reader.read_all() == (tftp_root / "big.bin").read_bytes()
            assert tftp.restarts == 0
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            for client in clients:
                client.close()
            reader.close()


def test_a_huge_request_path_with_a_deep_body_leaves_the_api_answering(procs):
    """An agent endpoint is public: a seat sent this, the API logged the failing request's
    path, and the log filter held the GIL (API, conductor, TFTP) for minutes. Whichever
    part refuses it now (the front's URI limit, the body's nesting limit, the view), the
    API answers the next request and its log lines stay bounded."""
    service = start_service(procs, "hostile")
    nested = "[" * 50_000 + "]" * 50_000
    answer = requests.post(f"{service.url}/v1/heartbeat/{'a' * 24_000}", data=nested,
                           headers={"Content-Type": "application/json"}, timeout=WAIT)
    assert answer.status_code in (400, 404, 414, 431, 500), answer.text[:300]
    root = requests.get(f"{service.url}/v1", timeout=WAIT)
    assert root.status_code == 200 and root.json()["id"] == "v1"
    log = (procs.workdir / "hostile.service.log").read_text()
    assert all(len(line) < MAX_MESSAGE + 300 for line in log.splitlines())
