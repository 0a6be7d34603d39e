"""The seat's side of a multicast room deploy, as a chunk source of the agent's one write
pipeline (agent/writer.py): join the job's group, ask the conductor's sender for the chunks
this disk lacks, rebuild each chunk from any ``k`` blocks of each of its groups
(agent/multicast_wire.py) and hand it to the pipeline, which verifies it, writes it, and
reads the whole image range back from the disk, as for every other source.

The seat asks at once for a group it still lacks blocks of when the sender says the group's
burst is over, every 0.1 s for groups that got nothing for a while, and every half second
for everything it lacks (which is also how the sender knows the seat is alive). Packets
are read in batches from a large socket buffer and chunks are unpacked and written in the
pipeline's own thread, so that the receiving loop does little per packet: at a seat's
20 Mbit/s that is 1700 packets a second, times 40 seats on a lab machine. At most
``MAX_OPEN`` chunks are held in memory; blocks of further chunks are dropped and asked for
again later.

Run as ``python -m labmetal.agent.multicast --manifest ... --group ... --port ... --sender
host:port --target ... --job ...``: it prints the WriteResult as one JSON line.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import select
import socket
import sys
import time
from dataclasses import asdict

import zfec

from labmetal.agent import multicast_wire as wire
from labmetal.agent import writer
from labmetal.agent.manifest import Chunk, Manifest
from labmetal.agent.writer import Handoff, Progress, WriteResult

LOG = logging.getLogger(__name__)

MAX_OPEN = 16  # chunks held in memory: being received or waiting to be written
STATUS_PERIOD = 0.5  # the full status (also the seat's heartbeat)
CHECK_PERIOD = 0.1  # how often stale groups are looked for
STALE = 0.15  # a group with no block for this long is asked for again
QUIET = 0.1  # no data for this long while something is missing: ask for all of it
NACK_DELAY = 0.01
BATCH_SLEEP = 0.01  # after draining the socket: fewer wake-ups, bigger batches
MAX_WHOLE_CHUNKS = 64  # untouched chunks named in one status (all of them at join)
RECEIVE_BUFFER = 8 << 20
LOSS_WINDOW = 500  # packets the sender sent, at least, before the seat's loss is measured


class MulticastError(RuntimeError):
    """The transfer cannot complete: the sender is silent or a chunk is wrong."""


class _Open:
    """A chunk being received: its padded packed bytes, and per group a bitmask of the
    block numbers received, their count, the highest sender index seen (+1), the repair
    blocks kept for decoding, and when the last block arrived."""
    __slots__ = ("geo", "ks", "firsts", "buffer", "view", "masks", "counts", "seen", "repairs",
                 "touched", "missing")

    def __init__(self, geo: wire.ChunkGeometry, now: float) -> None:
        groups = len(geo.groups)
        self.geo = geo
        self.ks = [group.k for group in geo.groups]
        self.firsts = [group.first_block * wire.BLOCK for group in geo.groups]
        self.buffer = bytearray(geo.padded_length)
        self.view = memoryview(self.buffer)
        self.masks = [0] * groups
        self.counts = [0] * groups
        self.seen = [0] * groups
        self.repairs: list[dict[int, bytes] | None] = [None] * groups
        self.touched = [now] * groups
        self.missing = groups


class _Receiver:
    def __init__(self, manifest: Manifest, group: str, port: int, sender: tuple[str, int],
                 session: int, wanted: list[int], interface_ip: str | None,
                 timeout: float) -> None:
        self.manifest = manifest
        self.geometry = wire.image_geometry(manifest)
        self.order = {index: position for position, index in enumerate(sorted(self.geometry))}
        self.session = session
        self.sender = sender
        self.timeout = timeout
        self.seat_id = random.getrandbits(32)
        self.waiting = set(wanted)  # not yet received in full
        self.open: dict[int, _Open] = {}
        self.decoders: dict[int, zfec.Decoder] = {}
        self.nacks: list[tuple[int, int, int, int, int]] = []
        if interface_ip is None:  # the address the route to the sender leaves from
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect(sender)
                interface_ip = probe.getsockname()[0]
        # Not connected: a connected socket would lose every other request to the ICMP
        # errors of a sender that is not up yet.
        self.control = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.control.bind((interface_ip, 0))
        self.data = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.data.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.data.setsockopt(socket.SOL_SOCKET, 33, RECEIVE_BUFFER)  # SO_RCVBUFFORCE
        except OSError:
            self.data.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        self.data.bind((group, port))
        self.data.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                             socket.inet_aton(group) + socket.inet_aton(interface_ip))
        self.data.setblocking(False)
        LOG.info("listening on %s:%d (job %s) through %s, asking %s:%d for %d chunks", group,
                 port, session, interface_ip, *sender, len(wanted))
        self.received = self.strays = 0
        self.window_first = self.window_top = -1  # sender's seq: the seat's loss is measured
        self.window_count = 0
        self.loss = 0.0

    def close(self) -> None:
        self.data.close()
        self.control.close()

    # requests to the sender

    def _send(self, packet: bytes) -> None:
        try:
            self.control.sendto(packet, self.sender)
        except OSError:  # refused while the sender is not up yet: the next status retries
            pass

    def _request(self, entries: list, flags: int = 0) -> None:
        for start in range(0, max(1, len(entries)), wire.MAX_ENTRIES):
            self._send(wire.pack_request(self.session, self.seat_id, flags, self.loss,
                                         max(0, self.window_top),
                                         entries[start:start + wire.MAX_ENTRIES]))

    def done(self, ok: bool, reason: str = "") -> None:
        packet = wire.pack_done(self.session, self.seat_id, ok, reason)
        for _ in range(3):  # no answer comes back: say it thrice
            self._send(packet)
            time.sleep(0.005)

    def status(self, now: float, everything: bool, whole: bool) -> None:
        """Ask for what is missing: groups of open chunks that got nothing for a while (all
        of them if ``everything``) and, if ``whole``, untouched chunks as ranges. Sends
        nothing if there is nothing to ask and no ``whole`` (heartbeat) is due."""
        entries = []
        for index, chunk in self.open.items():
            for group, spec in enumerate(chunk.geo.groups):
                count = chunk.counts[group]
                if count < spec.k and (everything or now - chunk.touched[group] > STALE):
                    entries.append((wire.GROUP, spec.k - count, group, index,
                                    chunk.seen[group]))
        if whole:
            untouched = sorted(self.waiting.difference(self.open))
            if self.received:
                untouched = untouched[:MAX_WHOLE_CHUNKS]
            first: int | None = None
            previous = 0
            for index in untouched:
                if first is None:
                    first = previous = index
                elif self.order[index] == self.order[previous] + 1:
                    previous = index
                else:
                    entries.append((wire.WHOLE, 0, 0, first, previous))
                    first = previous = index
            if first is not None:
                entries.append((wire.WHOLE, 0, 0, first, previous))
            expected = self.window_top - self.window_first + 1
            if self.window_first >= 0 and expected >= LOSS_WINDOW:
                self.loss = max(0.0, 1 - self.window_count / expected)
                self.window_first, self.window_count = -1, 0
        elif not entries:
            return
        self._request(entries, 0 if self.received else wire.JOIN)

    # receiving

    def run(self, handoff: Handoff) -> None:
        """Receive until every wanted chunk is handed to ``handoff`` and written; raise on
        silence or when the writing side failed. Never waits on the handoff: a chunk is
        opened only while fewer than MAX_OPEN are open or waiting to be written."""
        started = last_data = time.monotonic()
        self.status(started, True, True)
        next_status, next_check = started + STATUS_PERIOD, started + CHECK_PERIOD
        next_nack = None
        buffer = bytearray(2048)
        payload = memoryview(buffer)[wire.DATA_HEADER.size:wire.DATA_HEADER.size + wire.BLOCK]
        unpack = wire.DATA_HEADER.unpack_from
        size = wire.DATA_HEADER.size + wire.BLOCK
        expected = wire.prefix(wire.DATA, self.session)
        block = wire.BLOCK
        opened, waiting, nacks = self.open, self.waiting, self.nacks
        sock, recv_into = self.data, self.data.recv_into
        while waiting or handoff.pending:
            if handoff.error is not None:
                raise handoff.error
            select.select([sock], [], [], 0.05)
            now = time.monotonic()
            batch = got = 0
            while True:  # the hot loop: one pass per packet
                try:
                    length = recv_into(buffer)
                except BlockingIOError:
                    break
                batch += 1
                if length != size:
                    self.strays += 1
                    continue
                prefix, seq, index, group, left, sent = unpack(buffer)
                if prefix != expected:
                    self.strays += 1
                    continue
                if got == 0 and self.window_first < 0:
                    self.window_first = seq
                got += 1
                last_seq = seq
                chunk = opened.get(index)
                if chunk is None:
                    if index not in waiting or len(opened) + handoff.pending >= MAX_OPEN:
                        continue
                    chunk = opened[index] = _Open(self.geometry[index], now)
                number = sent & 0xFF
                bit = 1 << number
                try:
                    mask = chunk.masks[group]
                except IndexError:
                    continue
                k = chunk.ks[group]
                count = chunk.counts[group]
                if mask & bit or count >= k:
                    continue
                chunk.masks[group] = mask | bit
                chunk.counts[group] = count = count + 1
                chunk.touched[group] = now
                if sent >= chunk.seen[group]:
                    chunk.seen[group] = sent + 1
                if number < k:
                    start = chunk.firsts[group] + number * block
                    chunk.view[start:start + block] = payload
                else:
                    repairs = chunk.repairs[group]
                    if repairs is None:
                        repairs = chunk.repairs[group] = {}
                    repairs[number] = bytes(payload)
                if count == k:
                    self._rebuild(chunk, group)
                    chunk.missing -= 1
                    if chunk.missing == 0:
                        del opened[index]
                        waiting.discard(index)
                        handoff.put(chunk.geo.chunk, chunk.view[:chunk.geo.chunk.packed_length])
                elif left == 0:
                    nacks.append((wire.GROUP, k - count, group, index, chunk.seen[group]))
                    if next_nack is None:
                        next_nack = now + NACK_DELAY
            if got:
                if not self.received:
                    LOG.info("first data from the sender after %.2f s", now - started)
                last_data = now
                self.received += got
                self.window_count += got
                self.window_top = last_seq
            if next_nack is not None and (now >= next_nack or len(nacks) >= wire.MAX_ENTRIES):
                self._request(nacks)
                nacks.clear()
                next_nack = None
            if not waiting:
                continue
            if now >= next_check:
                quiet = now - last_data > QUIET  # the sender went quiet: ask for everything
                whole = quiet or now >= next_status
                self.status(now, quiet, whole)
                next_check = now + CHECK_PERIOD
                if whole:
                    next_status = now + STATUS_PERIOD
            if now - last_data > self.timeout:
                raise MulticastError(f"no data from the multicast sender {self.sender[0]}:"
                                     f"{self.sender[1]} for {self.timeout:.0f} s "
                                     f"({len(waiting)} chunks still missing)")
            if batch < 8:
                time.sleep(BATCH_SLEEP)

    def _rebuild(self, chunk: _Open, group: int) -> None:
        """The group has k distinct blocks: decode the data blocks that came as repairs."""
        repairs = chunk.repairs[group]
        if not repairs:
            return
        spec = chunk.geo.groups[group]
        k, mask = spec.k, chunk.masks[group]
        missing = [number for number in range(k) if not mask >> number & 1]
        if missing:
            blocks: list[bytes | memoryview] = []
            numbers: list[int] = []
            spare = iter(repairs.items())
            for number in range(k):
                if mask >> number & 1:
                    start = (spec.first_block + number) * wire.BLOCK
                    blocks.append(chunk.view[start:start + wire.BLOCK])
                    numbers.append(number)
                else:
                    repair_number, repair = next(spare)
                    blocks.append(repair)
                    numbers.append(repair_number)
            decoder = self.decoders.get(k)
            if decoder is None:
                decoder = self.decoders[k] = zfec.Decoder(k, wire.M)
            rebuilt = decoder.decode(tuple(blocks), tuple(numbers))
            for number in missing:
                start = (spec.first_block + number) * wire.BLOCK
                chunk.view[start:start + wire.BLOCK] = rebuilt[number]
        chunk.repairs[group] = None


class MulticastChunks:
    """A chunk source: the room job's multicast group, asked through the sender at
    ``sender`` (host, port) for the wanted chunks; ``job_id`` is the job's session. The
    sender is told at the end whether this seat has everything (or gave up, and why)."""
    ahead = MAX_OPEN

    def __init__(self, group: str, port: int, sender: tuple[str, int], job_id: int | str,
                 interface_ip: str | None = None, timeout: float = 60.0) -> None:
        self.group, self.port, self.sender = group, port, sender
        self.session = wire.session_id(job_id)
        self.interface_ip = interface_ip
        self.timeout = timeout
        self.receiver: _Receiver | None = None

    def deliver(self, manifest: Manifest, wanted: list[Chunk], handoff: Handoff) -> None:
        self.receiver = _Receiver(manifest, self.group, self.port, self.sender, self.session,
                                  [chunk.index for chunk in wanted], self.interface_ip,
                                  self.timeout)
        self.receiver.run(handoff)

    def finish(self, ok: bool, reason: str) -> None:
        receiver = self.receiver
        if receiver is None:
            return
        try:
            receiver.done(ok, reason)  # when ok, the sender may forget this seat
        finally:
            receiver.close()
        LOG.info("multicast: %d packets received (%d from other jobs or malformed)%s",
                 receiver.received, receiver.strays, "" if ok else f"; gave up: {reason}")


def receive_image(manifest: Manifest, group: str, port: int, sender_addr: tuple[str, int],
                  target: str, progress: Progress, job_id: int | str,
                  have: frozenset[int] = frozenset(), interface_ip: str | None = None,
                  timeout: float = 60.0) -> WriteResult:
    """Write the image onto ``target`` from the job's multicast group, skipping the chunks
    in ``have`` (already on the disk, verified by the caller), through the write pipeline
    (agent/writer.py). Raises MulticastError if the sender stays silent for ``timeout``
    seconds and ValueError if a chunk or the whole image is wrong; either way the sender is
    told that this seat gave up."""
    source = MulticastChunks(group, port, sender_addr, job_id, interface_ip, timeout)
    return writer.write(manifest, source, target, progress, have)


def _load_manifest(source: str) -> Manifest:
    if source.startswith(("http://", "https://")):
        import requests
        response = requests.get(source, timeout=60)
        response.raise_for_status()
        return Manifest.from_json(response.content)
    with open(source, "rb") as text:
        return Manifest.from_json(text.read())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", required=True, help="manifest file or URL")
    parser.add_argument("--group", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sender", required=True, help="host:port of the sender's requests")
    parser.add_argument("--target", required=True)
    parser.add_argument("--job", required=True)
    parser.add_argument("--have", default="", help="chunk indexes already on the disk: 1,2,5")
    parser.add_argument("--interface-ip")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    host, _, port = args.sender.rpartition(":")
    job: int | str = int(args.job) if args.job.isdigit() else args.job
    have = frozenset(int(index) for index in args.have.split(",") if index)
    try:
        result = receive_image(_load_manifest(args.manifest), args.group, args.port,
                               (host, int(port)), args.target, Progress(), job, have,
                               args.interface_ip, args.timeout)
    except (MulticastError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
