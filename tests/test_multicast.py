"""A room imaged by multicast: the conductor's sender runs here, in the host's namespace,
cabled into the room's switch by an uplink; each seat's agent receives in its own
namespace into a disk file. The switch can drop frames at random (nftables), seats can
join late or die, and another job can share the group: every seat that finishes must hold
exactly the image, and the sender must stop as soon as no live seat needs anything.
Light seats stand in for 40 PCs; three QEMU seats receiving with the agent of the built
ramdisk: tests/test_firmware_boots.py."""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from labmetal.conductor.multicast import MulticastConfig, MulticastSender
from labmetal.agent import multicast_wire as wire
from labmetal.agent.manifest import Manifest, build
from labmetal.lab.network import Lab, Room, Seat, add_loss, in_namespace, remove_loss
from labmetal.lab.light_room import sha256_of
from labmetal.lab.harness import Proc, Processes, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

MIB = 1024 * 1024
SUBNET = "10.99.140"
UPLINK = f"{SUBNET}.254"
SEATS = 12
RATE_MBIT = 40
_ports = itertools.count(47200, 3)


@dataclass
class Image:
    raw: Path
    packed: Path
    manifest: Manifest
    manifest_path: Path


def mixed_image(work: Path, name: str, size_mib: int = 16) -> Image:
    """A disk-like raw image cut in 1 MiB chunks: binaries from /usr/lib, zeros, random
    data, and its manifest and packed file."""
    files = sorted(p for p in Path("/usr/lib/x86_64-linux-gnu").glob("*.so*") if p.is_file())
    feed = (path.read_bytes() for path in files)
    raw = work / f"{name}.raw"
    with open(raw, "wb") as out:
        for block in range(size_mib):
            if block % 4 == 2:
                out.write(bytes(MIB))
            elif block % 8 == 5:
                out.write(os.urandom(MIB))
            else:
                data = b""
                while len(data) < MIB:
                    data += next(feed, os.urandom(MIB))
                out.write(data[:MIB])
    manifest = build(raw, work / f"{name}.packed", chunk_size=MIB)
    manifest_path = work / f"{name}.manifest.json"
    manifest_path.write_text(manifest.to_json())
    return Image(raw, work / f"{name}.packed", manifest, manifest_path)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Image:
    return mixed_image(tmp_path_factory.mktemp("multicast-image"), "tp-reseaux")


@dataclass
class MulticastRoom:
    room: Room
    seats: list[Seat]


@pytest.fixture(scope="module")
def lab_room():
    with Lab() as lab:
        room = lab.add_room("mcast", server=f"{SUBNET}.1/24")
        lab.add_uplink(room, f"{UPLINK}/24")
        seats = [lab.add_seat(room, f"m{number}", f"02:00:00:00:8c:{number:02x}",
                              f"{SUBNET}.{10 + number}/24", rate=f"{RATE_MBIT}mbit")
                 for number in range(SEATS)]
        yield MulticastRoom(room, seats)


def new_config(**overrides) -> MulticastConfig:
    port = next(_ports)
    settings = dict(group="239.192.77.1", port=port, control_port=port + 1,
                    interface_ip=UPLINK, rate_ceiling=RATE_MBIT * 1_000_000,
                    silence_timeout=2.0)
    settings.update(overrides)
    return MulticastConfig(**settings)


def blank_disk(path: Path, size: int) -> Path:
    with open(path, "wb") as disk:
        disk.truncate(size)
    return path


def start_receiver(procs: Processes, seat: Seat, image: Image, config: MulticastConfig,
                   job: int, disk: Path, have: frozenset[int] = frozenset(),
                   timeout: float = 30) -> Proc:
    argv = [sys.executable, "-m", "labmetal.agent.multicast", "--manifest",
            str(image.manifest_path), "--group", config.group, "--port", str(config.port),
            "--sender", f"{UPLINK}:{config.control_port}", "--target", str(disk),
            "--job", str(job), "--have", ",".join(map(str, sorted(have))),
            "--timeout", str(timeout)]
    return procs.start(in_namespace(seat.namespace, argv), f"{seat.name}-job{job}")


def wait_listening(receivers: list[Proc]) -> None:
    for receiver in receivers:
        receiver.wait_for_output("listening on", timeout=60)


def finish(receiver: Proc, timeout: float = 60) -> dict:
    """The receiver's WriteResult, once it exited successfully."""
    assert receiver.popen is not None
    receiver.popen.wait(timeout=timeout)
    assert receiver.popen.returncode == 0, receiver.output()[-3000:]
    return json.loads(receiver.output().strip().splitlines()[-1])


def assert_holds_image(disk: Path, result: dict, image: Image) -> None:
    assert result["raw_sha256"] == image.manifest.raw_sha256
    assert sha256_of(disk, image.manifest.raw_size) == image.manifest.raw_sha256


def blocks_of(image: Image, indexes=None) -> int:
    return sum(wire.geometry(chunk).blocks for chunk in image.manifest.data_chunks
               if indexes is None or chunk.index in indexes)


def test_twelve_seats_on_a_lossy_switch_all_hold_the_image(lab_room, image, procs, tmp_path):
    add_loss(lab_room.room.namespace, 5)
    try:
        config, job = new_config(), 11
        disks = [blank_disk(tmp_path / f"disk{n}", image.manifest.raw_size)
                 for n in range(SEATS)]
        receivers = [start_receiver(procs, seat, image, config, job, disk)
                     for seat, disk in zip(lab_room.seats, disks)]
        wait_listening(receivers)
        with MulticastSender(image.manifest, image.packed, config, job) as sender:
            started = time.monotonic()
            results = [finish(receiver) for receiver in receivers]
            seconds = time.monotonic() - started
            wait_for(lambda: sender.status().receivers_complete == SEATS, 10, "all complete")
            status = sender.status()
        for disk, result in zip(disks, results):
            assert_holds_image(disk, result, image)
        assert status.receivers_failed == 0 and status.receivers_known == SEATS
        # 5 % loss on each of 12 links: erasure coding keeps the extra traffic small, where
        # resending every lost block would resend 1 - 0.95 ** 12 = 46 % of them
        blocks = blocks_of(image)
        assert blocks <= status.packets_sent < 1.3 * blocks, status
        wire_bits = status.packets_sent * wire.SEND_WIRE_BYTES * 8
        assert wire_bits / seconds <= config.rate_ceiling * 1.02
    finally:
        remove_loss(lab_room.room.namespace)


def test_two_seats_that_join_late_catch_up(lab_room, image, procs, tmp_path):
    config, job = new_config(rate_ceiling=RATE_MBIT * 1_000_000 // 2), 19
    disks = [blank_disk(tmp_path / f"disk{n}", image.manifest.raw_size) for n in range(6)]
    early = [start_receiver(procs, seat, image, config, job, disk)
             for seat, disk in zip(lab_room.seats[:4], disks)]
    wait_listening(early)
    with MulticastSender(image.manifest, image.packed, config, job) as sender:
        wait_for(lambda: sender.status().bytes_sent > image.manifest.packed_size / 3, 30,
                 "a third of the image on the wire")
        late = [start_receiver(procs, seat, image, config, job, disk)
                for seat, disk in zip(lab_room.seats[4:6], disks[4:])]
        for receiver, disk in zip(early + late, disks):
            assert_holds_image(disk, finish(receiver), image)
        wait_for(lambda: sender.status().receivers_complete == 6, 10, "all complete")
        status = sender.status()
    # what the late seats missed is sent once more, for both of them at once
    assert status.packets_sent < 2.2 * blocks_of(image), status


def test_a_seat_that_dies_is_dropped_and_the_others_finish_without_it(
        lab_room, image, procs, tmp_path):
    config, job = new_config(rate_ceiling=RATE_MBIT * 1_000_000 // 2), 12
    seats = lab_room.seats[:4]
    disks = [blank_disk(tmp_path / f"disk{n}", image.manifest.raw_size) for n in range(4)]
    receivers = [start_receiver(procs, seat, image, config, job, disk)
                 for seat, disk in zip(seats, disks)]
    wait_listening(receivers)
    with MulticastSender(image.manifest, image.packed, config, job) as sender:
        wait_for(lambda: sender.status().receivers_active == 4, 10, "four seats")
        wait_for(lambda: sender.status().bytes_sent > image.manifest.packed_size / 4, 30,
                 "a quarter of the image on the wire")
        receivers[0].kill()
        for receiver, disk in zip(receivers[1:], disks[1:]):
            assert_holds_image(disk, finish(receiver), image)
        wait_for(lambda: sender.status().receivers_complete == 3, 10, "three complete")
        dead = f"{SUBNET}.10:"
        wait_for(lambda: any(seat.address.startswith(dead) and seat.state == "dropped"
                             for seat in sender.status().seats), 10, "the dead seat dropped")
        sent = sender.status().packets_sent
        time.sleep(1)
        assert sender.status().packets_sent == sent  # nothing more for the dead seat alone
        assert sender.status().receivers_active == 0


def test_a_seat_that_holds_part_of_the_image_is_sent_only_the_rest(
        lab_room, image, procs, tmp_path):
    data = [chunk.index for chunk in image.manifest.data_chunks]
    missing = {data[1], data[-2]}
    disk = tmp_path / "disk"
    disk.write_bytes(image.raw.read_bytes())
    with open(disk, "r+b") as stale:  # the student changed these two chunks
        for index in missing:
            stale.seek(image.manifest.chunks[index].offset + 4096)
            stale.write(os.urandom(8192))
    have = frozenset(chunk.index for chunk in image.manifest.chunks) - missing
    config, job = new_config(), 13
    receiver = start_receiver(procs, lab_room.seats[0], image, config, job, disk, have)
    with MulticastSender(image.manifest, image.packed, config, job) as sender:
        result = finish(receiver)
        wait_for(lambda: sender.status().receivers_complete == 1, 10, "the seat complete")
        status = sender.status()
    assert_holds_image(disk, result, image)
    assert status.chunks_sent == len(missing)
    assert status.packets_sent <= 1.3 * blocks_of(image, missing)
    assert result["bytes_written"] == sum(image.manifest.chunks[i].length for i in missing)

    # a seat that holds everything costs nothing on the wire
    config, job = new_config(), 14
    everything = frozenset(chunk.index for chunk in image.manifest.chunks)
    receiver = start_receiver(procs, lab_room.seats[0], image, config, job, disk, everything)
    with MulticastSender(image.manifest, image.packed, config, job) as sender:
        assert_holds_image(disk, finish(receiver), image)
        wait_for(lambda: sender.status().receivers_complete == 1, 10, "the seat complete")
        assert sender.status().packets_sent == 0


def test_a_chunk_that_fails_its_check_is_an_error_and_never_reaches_the_disk(
        lab_room, image, procs, tmp_path):
    bad = image.manifest.data_chunks[2]
    packed = bytearray(image.packed.read_bytes())
    middle = bad.packed_offset + bad.packed_length // 2
    packed[middle:middle + 64] = bytes(64)  # as if the conductor's copy had rotted
    broken = tmp_path / "broken.packed"
    broken.write_bytes(packed)
    disk = blank_disk(tmp_path / "disk", image.manifest.raw_size)
    config, job = new_config(), 15
    receiver = start_receiver(procs, lab_room.seats[1], image, config, job, disk)
    with MulticastSender(image.manifest, broken, config, job) as sender:
        assert receiver.popen is not None
        assert receiver.popen.wait(timeout=60) == 1
        assert f"chunk {bad.index}" in receiver.output(), receiver.output()[-2000:]
        wait_for(lambda: sender.status().receivers_failed == 1, 10, "the seat's failure")
        assert f"chunk {bad.index}" in sender.status().seats[0].reason
    with open(disk, "rb") as written:
        written.seek(bad.offset)
        assert written.read(bad.length) == bytes(bad.length)


def test_packets_of_another_job_on_the_same_group_are_ignored(
        lab_room, image, procs, tmp_path):
    other = mixed_image(tmp_path, "other-course", size_mib=4)
    mine = new_config(rate_ceiling=30_000_000)
    theirs = dataclasses.replace(new_config(rate_ceiling=6_000_000), port=mine.port)
    disk = blank_disk(tmp_path / "disk", image.manifest.raw_size)
    their_disk = blank_disk(tmp_path / "their-disk", other.manifest.raw_size)
    their_receiver = start_receiver(procs, lab_room.seats[3], other, theirs, 17, their_disk)
    wait_listening([their_receiver])
    with MulticastSender(other.manifest, other.packed, theirs, 17):
        receiver = start_receiver(procs, lab_room.seats[2], image, mine, 16, disk)
        wait_listening([receiver])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as junk:
            junk.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(UPLINK))
            forged = wire.DATA_HEADER.pack(wire.prefix(wire.DATA, 999), 1, 0, 0, 0, 0)
            for _ in range(20):
                junk.sendto(forged + os.urandom(wire.BLOCK), (mine.group, mine.port))
                junk.sendto(os.urandom(300), (mine.group, mine.port))
        with MulticastSender(image.manifest, image.packed, mine, 16) as sender:
            result = finish(receiver)
            assert_holds_image(disk, result, image)
            wait_for(lambda: sender.status().receivers_complete == 1, 10, "my seat complete")
        their_result = finish(their_receiver)
    assert their_result["raw_sha256"] == other.manifest.raw_sha256
    strays = re.search(r"(\d+) from other jobs or malformed", receiver.output())
    assert strays is not None and int(strays.group(1)) >= 20


def test_a_seat_gives_up_clearly_when_the_sender_stays_silent(lab_room, image, procs,
                                                              tmp_path):
    disk = blank_disk(tmp_path / "disk", image.manifest.raw_size)
    receiver = start_receiver(procs, lab_room.seats[4], image, new_config(), 18, disk,
                              timeout=2)
    assert receiver.popen is not None
    assert receiver.popen.wait(timeout=30) == 1
    assert "no data from the multicast sender" in receiver.output()
