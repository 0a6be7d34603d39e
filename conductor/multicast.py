"""The conductor's side of a multicast room deploy (in the spirit of Emulab's Frisbee): one
image, sent once to a multicast group, whatever the number of seats.

The sender is driven by the seats. It sends nothing until a seat asks; a seat's first
request lists every chunk it lacks (a seat that already holds part of the image, or all of
it, asks for less, or nothing), later ones say, per group of blocks, how many more it needs
(see agent/multicast_wire.py). Requests are merged: a group is owed the *largest* number
any seat asked for, and the sender answers with blocks of that group it has not sent
before, so one repair block serves every seat that lacks any block of the group. A seat that
joins late asks for what it missed and gets it after the chunks in flight; a seat that goes
silent for ``silence_timeout`` is dropped from the active set and nothing is sent for it
alone any more.

Rate: a token bucket never lets the sender exceed ``rate_ceiling`` (counted as frames on
the wire, as a switch or a shaper counts them). Seats report the loss they measure; when
the worst of them goes over ``loss_threshold`` (random loss on a room's links is a few
percent, congestion shows as more) the rate is cut by a quarter, and it grows back by a
twentieth of the ceiling every half second without such reports (AIMD).
"""
from __future__ import annotations

import bisect
import logging
import os
import select
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import zfec

from labmetal.agent import multicast_wire as wire
from labmetal.agent.command_params import MulticastGroup
from labmetal.agent.manifest import Manifest

LOG = logging.getLogger(__name__)

HOLD = 0.1  # blocks sent this recently may still be on their way to a seat that asks
SETTLE = 0.3  # a new seat that has received nothing: its requests older than this may be stale
HOUSEKEEPING = 0.25
BURST = 0.05  # seconds of sending the token bucket may hold: a late wake-up catches up
RATE_PERIOD = 0.5
CACHED_CHUNKS = 8  # chunks whose blocks are kept in memory (the ones being sent)
ACTIVE, COMPLETE, FAILED, DROPPED = "active", "complete", "failed", "dropped"


@dataclass(frozen=True)
class MulticastConfig:
    group: str = "239.192.77.1"
    port: int = 47000
    interface_ip: str | None = None  # IP_MULTICAST_IF and the control address; None: routing
    control_port: int = 47001  # where seats send requests (UDP)
    ttl: int = 1
    rate_ceiling: int = 100_000_000  # bit/s on the wire
    min_rate: int = 1_000_000
    silence_timeout: float = 5.0
    loss_threshold: float = 0.10

    @classmethod
    def for_group(cls, group: MulticastGroup, rate_ceiling: int, ttl: int) -> MulticastConfig:
        """The sender's side of the group a room job chose (the seats get the same group in
        their write_image)."""
        return cls(group=group.group, port=group.port, control_port=group.sender_port,
                   interface_ip=group.interface, rate_ceiling=rate_ceiling, ttl=ttl)


@dataclass(frozen=True)
class SeatStatus:
    address: str  # ip:port of the seat's requests
    state: str  # active, complete, failed, dropped
    reason: str = ""


@dataclass(frozen=True)
class SenderStatus:
    receivers_known: int
    receivers_active: int
    receivers_complete: int
    receivers_failed: int
    packets_sent: int
    bytes_sent: int  # UDP payload bytes
    repair_packets: int  # blocks beyond each group's data blocks (erasure-coded)
    chunks_sent: int  # distinct chunks of which at least one block went out
    rate: int  # current bit/s
    seats: tuple[SeatStatus, ...] = ()


@dataclass
class _Seat:
    seat_id: int
    last_heard: float
    first_heard: float
    state: str = ACTIVE
    reason: str = ""


@dataclass
class _Chunk:
    """Send state of one data chunk, per group: blocks sent so far, blocks owed, when the
    last one went out, and a recent mark (index and time) to tell in-flight blocks from
    old ones when a seat's request arrives."""
    geo: wire.ChunkGeometry
    sent: list[int]
    owed: list[int]
    last_at: list[float]
    mark_index: list[int]
    mark_at: list[float]
    cursor: int = 0
    last_seq: int = 0  # of the chunk's last block sent
    wanters: set = field(default_factory=set)

    @classmethod
    def of(cls, geo: wire.ChunkGeometry) -> _Chunk:
        count = len(geo.groups)
        return cls(geo, [0] * count, [0] * count, [-1e9] * count, [0] * count, [-1e9] * count)


class MulticastSender:
    def __init__(self, manifest: Manifest, packed_path: str | Path, config: MulticastConfig,
                 job_id: int | str) -> None:
        self.manifest = manifest
        self.packed_path = Path(packed_path)
        self.config = config
        self.session = wire.session_id(job_id)
        self._prefix = wire.prefix(wire.DATA, self.session)
        self._geometry = wire.image_geometry(manifest)
        self._data_indices = sorted(self._geometry)
        self._chunks: dict[int, _Chunk] = {}
        self._urgent: OrderedDict[int, None] = OrderedDict()  # repairs: chunks seats hold in part
        self._fresh: OrderedDict[int, None] = OrderedDict()  # whole chunks
        self._blocks: OrderedDict[int, list[tuple[bytes, ...]]] = OrderedDict()
        self._encoders: dict[int, zfec.Encoder] = {}
        self._seats: dict[tuple[str, int], _Seat] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._packed_fd = -1
        self._rate = float(config.rate_ceiling)
        self._worst_loss = 0.0
        self._reports = 0
        self._rate_at = 0.0
        self._seq = 0
        self._packets = self._bytes = self._repairs = 0
        self._chunks_sent: set[int] = set()
        self.error: BaseException | None = None

    # lifecycle

    def start(self) -> None:
        config = self.config
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            _big_buffer(sock, socket.SO_RCVBUF, 4 << 20)
            _big_buffer(sock, socket.SO_SNDBUF, 1 << 20)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, config.ttl)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
            if config.interface_ip:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                                socket.inet_aton(config.interface_ip))
            sock.bind((config.interface_ip or "", config.control_port))
            self._packed_fd = os.open(self.packed_path, os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._thread = threading.Thread(target=self._run, name=f"multicast-{self.session}",
                                        daemon=True)
        self._thread.start()
        LOG.info("multicast sender for job %s on %s:%d (requests on port %d), ceiling %d bit/s",
                 self.session, config.group, config.port, config.control_port,
                 config.rate_ceiling)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._packed_fd >= 0:
            os.close(self._packed_fd)
            self._packed_fd = -1

    def __enter__(self) -> MulticastSender:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def status(self) -> SenderStatus:
        with self._lock:
            seats = tuple(SeatStatus(f"{ip}:{port}", seat.state, seat.reason)
                          for (ip, port), seat in self._seats.items())
        states = [seat.state for seat in seats]
        return SenderStatus(len(seats), states.count(ACTIVE), states.count(COMPLETE),
                            states.count(FAILED), self._packets, self._bytes, self._repairs,
                            len(self._chunks_sent), int(self._rate), seats)

    # the sending thread

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as error:  # a dead sender must say why
            LOG.exception("multicast sender for job %s failed", self.session)
            self.error = error

    def _loop(self) -> None:
        sock = self._sock
        assert sock is not None
        destination = (self.config.group, self.config.port)
        tokens = 0.0
        last = next_housekeeping = time.monotonic()
        while not self._stop.is_set():
            self._read_requests()
            now = time.monotonic()
            if now >= next_housekeeping:
                self._housekeeping(now)
                next_housekeeping = now + HOUSEKEEPING
            burst = max(16 * wire.SEND_WIRE_BYTES, self._rate / 8 * BURST)
            tokens = min(burst, tokens + (now - last) * self._rate / 8)
            last = now
            while tokens >= wire.SEND_WIRE_BYTES:
                packet = self._next_packet(now)
                if packet is None:
                    break
                sock.sendto(packet, destination)
                tokens -= len(packet) + wire.WIRE_OVERHEAD
            if self._urgent or self._fresh:
                wait = max(0.002, (wire.SEND_WIRE_BYTES - tokens) * 8 / self._rate)
            else:
                wait = HOUSEKEEPING
            select.select([sock], [], [], wait)

    def _next_packet(self, now: float) -> bytes | None:
        while self._urgent or self._fresh:
            queue = self._urgent if self._urgent else self._fresh
            index = next(iter(queue))
            chunk = self._chunks[index]
            owed, groups = chunk.owed, len(chunk.owed)
            group = chunk.cursor
            for _ in range(groups):  # round robin over the chunk's groups: a burst of
                if owed[group] > 0:  # losses is spread over many of them
                    break
                group = (group + 1) % groups
            else:
                del queue[index]
                chunk.wanters.clear()
                continue
            chunk.cursor = (group + 1) % groups
            return self._packet(index, chunk, group, now)
        return None

    def _packet(self, index: int, chunk: _Chunk, group: int, now: float) -> bytes:
        sent = chunk.sent[group]
        number = sent % wire.M
        k = chunk.geo.groups[group].k
        blocks = self._group_blocks(index)[group]
        if number < k:
            payload = blocks[number]
        else:
            encoder = self._encoders.get(k)
            if encoder is None:
                encoder = self._encoders[k] = zfec.Encoder(k, wire.M)
            payload = encoder.encode(blocks, (number,))[0]
            self._repairs += 1
        chunk.sent[group] = sent + 1
        chunk.owed[group] -= 1
        chunk.last_at[group] = now
        if now - chunk.mark_at[group] > HOLD:
            chunk.mark_at[group], chunk.mark_index[group] = now, sent
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        chunk.last_seq = self._seq
        self._packets += 1
        self._bytes += wire.DATA_HEADER.size + len(payload)
        if sent == 0:
            self._chunks_sent.add(index)
        return wire.DATA_HEADER.pack(self._prefix, self._seq, index, group,
                                     min(chunk.owed[group], 0xFFFF), sent) + payload

    def _group_blocks(self, index: int) -> list[tuple[bytes, ...]]:
        blocks = self._blocks.get(index)
        if blocks is None:
            geo = self._geometry[index]
            chunk = geo.chunk
            packed = os.pread(self._packed_fd, chunk.packed_length, chunk.packed_offset)
            if len(packed) != chunk.packed_length:
                raise OSError(f"{self.packed_path} ends inside chunk {index}")
            blocks = self._blocks[index] = wire.split_blocks(packed, geo)
            while len(self._blocks) > CACHED_CHUNKS:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(index)
        return blocks

    # requests from the seats

    def _read_requests(self) -> None:
        sock = self._sock
        assert sock is not None
        while True:
            try:
                packet, address = sock.recvfrom(2048, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ICMP errors surface here; nothing to do about them
                continue
            if len(packet) < wire.PREFIX.size:
                continue
            magic, version, kind, session = wire.PREFIX.unpack_from(packet)
            if magic != wire.MAGIC or version != wire.VERSION or session != self.session:
                continue
            try:
                with self._lock:
                    if kind == wire.REQUEST:
                        self._on_request(address, packet, time.monotonic())
                    elif kind == wire.DONE:
                        self._on_done(address, packet)
            except Exception:  # a malformed packet must not stop the room's deploy
                LOG.warning("bad multicast request from %s:%d", *address, exc_info=True)

    def _seat(self, address: tuple[str, int], seat_id: int, now: float) -> _Seat:
        seat = self._seats.get(address)
        if seat is None or seat.seat_id != seat_id:
            seat = self._seats[address] = _Seat(seat_id, now, now)
            LOG.info("seat %s:%d joined job %s", *address, self.session)
        elif seat.state == DROPPED:
            LOG.info("seat %s:%d speaks again", *address)
            seat.state = ACTIVE
        seat.last_heard = now
        return seat

    def _on_request(self, address: tuple[str, int], packet: bytes, now: float) -> None:
        seat_id, _, loss, seq_seen, entries = wire.unpack_request(packet)
        seat = self._seat(address, seat_id, now)
        if seat.state != ACTIVE:
            return
        # a seat that has received nothing yet: believe it lacks chunks already sent once it
        # asked for a while (its first requests may have waited for ARP since before)
        settled = seq_seen > 0 or now - seat.first_heard > SETTLE
        self._reports += 1
        self._worst_loss = max(self._worst_loss, loss)
        for kind, need, group, index, other in entries:
            if kind == wire.WHOLE:  # every data chunk from index to other
                first = bisect.bisect_left(self._data_indices, index)
                last = bisect.bisect_right(self._data_indices, other)
                for whole in self._data_indices[first:last]:
                    self._want_whole(whole, address, now, seq_seen, settled)
            elif (kind == wire.GROUP and index in self._geometry
                  and group < len(self._geometry[index].groups)):
                self._want(index, group, need, other, address, now)

    def _chunk(self, index: int) -> _Chunk:
        chunk = self._chunks.get(index)
        if chunk is None:
            chunk = self._chunks[index] = _Chunk.of(self._geometry[index])
        return chunk

    def _want_whole(self, index: int, address: tuple[str, int], now: float, seq_seen: int,
                    settled: bool) -> None:
        chunk = self._chunk(index)
        if index in self._fresh and not any(chunk.sent):  # queued, untouched: the usual case
            chunk.wanters.add(address)
            return
        if chunk.last_seq and (seq_seen < chunk.last_seq if seq_seen else not settled):
            return  # written before the chunk went by: the seat will ask again if need be
        for group, spec in enumerate(chunk.geo.groups):
            self._want(index, group, spec.k, 0, address, now, urgent=False)

    def _want(self, index: int, group: int, need: int, seen: int, address: tuple[str, int],
              now: float, urgent: bool = True) -> None:
        """Owe the group ``need`` blocks, less those sent so recently that they may still be
        on their way to the seat that asks (it has seen blocks up to ``seen``)."""
        chunk = self._chunk(index)
        credit = 0
        if now - chunk.last_at[group] < HOLD:
            credit = max(0, chunk.sent[group] - max(seen, chunk.mark_index[group]))
        owed = min(need, chunk.geo.groups[group].k) - credit
        chunk.wanters.add(address)
        if owed <= chunk.owed[group]:
            return
        chunk.owed[group] = owed
        if index not in self._urgent and index not in self._fresh:
            (self._urgent if urgent else self._fresh)[index] = None

    def _on_done(self, address: tuple[str, int], packet: bytes) -> None:
        seat_id, ok, reason = wire.unpack_done(packet)
        seat = self._seat(address, seat_id, time.monotonic())
        if seat.state in (COMPLETE, FAILED):
            return
        seat.state, seat.reason = (COMPLETE, "") if ok else (FAILED, reason)
        if ok:
            LOG.info("seat %s:%d holds the whole image of job %s", *address, self.session)
        else:
            LOG.warning("seat %s:%d gave up on job %s: %s", *address, self.session, reason)

    def _housekeeping(self, now: float) -> None:
        with self._lock:
            for address, seat in self._seats.items():
                if seat.state == ACTIVE and now - seat.last_heard > self.config.silence_timeout:
                    seat.state, seat.reason = DROPPED, "silent"
                    LOG.warning("seat %s:%d silent for %.0f s: dropped from job %s", *address,
                                self.config.silence_timeout, self.session)
            active = {address for address, seat in self._seats.items() if seat.state == ACTIVE}
            for queue in (self._urgent, self._fresh):
                for index in [i for i in queue if not self._chunks[i].wanters & active]:
                    chunk = self._chunks[index]  # nobody alive wants it any more
                    chunk.owed = [0] * len(chunk.owed)
                    chunk.wanters.clear()
                    del queue[index]
            if now - self._rate_at >= RATE_PERIOD:
                self._rate_at = now
                self._adjust_rate()

    def _adjust_rate(self) -> None:
        config = self.config
        if self._worst_loss > config.loss_threshold:
            rate = max(config.min_rate, self._rate * 0.75)
            if rate < self._rate:
                LOG.info("job %s: worst seat loses %.0f %%, rate down to %.1f Mbit/s",
                         self.session, self._worst_loss * 100, rate / 1e6)
            self._rate = rate
        elif self._reports:
            self._rate = min(float(config.rate_ceiling), self._rate + config.rate_ceiling / 20)
        self._worst_loss, self._reports = 0.0, 0


def _big_buffer(sock: socket.socket, option: int, size: int) -> None:
    """As root, SO_*BUFFORCE passes the net.core.*mem_max limits."""
    force = {socket.SO_RCVBUF: 33, socket.SO_SNDBUF: 32}[option]  # SO_RCVBUFFORCE, SO_SNDBUFFORCE
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, option, size)
