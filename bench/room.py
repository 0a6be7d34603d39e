"""The room deploy benchmark (issue 6): one simulated room of N light seats, seat links shaped
to R and the uplink to 10 R, a 256 MiB OS image (ext4 holding a real Debian userland: the
deploy ramdisk's), and in the same run:

- labmetal multicast (conductor/multicast.py to agent/multicast.py), also with 5 % random
  loss on the switch and with 3 seats joining late;
- labmetal unicast: every seat pulls the image over HTTP from `labmetal serve` (the path a
  `direct` deploy takes, agent/writer.py);
- udpcast (Debian's udp-sender/udp-receiver, what FOG and Clonezilla use) sending the image
  as one zstd stream at the same R, each receiver piping it through `zstd -d` to its disk;
- delta re-imaging: a seat holding the image with 5 % of its chunks changed, unicast and
  multicast, against a full write.

Each time is divided by its physical limit: multicast and udpcast, bytes sent ÷ R;
unicast, N × bytes ÷ 10 R (bytes ÷ R for fewer than 10 seats). Seats start (and join) before the
clock starts: what is timed is
the transfer up to every seat's verified receipt (sha256 read back from its disk).

    python -m bench.room [--seats 40] [--rate-mbit 10] [--skip-unicast]

Seat disks live in /dev/shm (each seat has its own disk in a room, not one host disk).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from labmetal.conductor.multicast import MulticastConfig, MulticastSender
from labmetal.agent.manifest import Manifest
from labmetal.lab.network import Lab, Room, add_loss, in_namespace, remove_loss

MIB = 1024 * 1024
SUBNET = "10.99.142"
SERVER = f"{SUBNET}.254"
DISKS = Path(os.environ.get("BENCH_DISKS", "/dev/shm"))
RAMDISK_CACHE = Path(os.environ.get("LABMETAL_RAMDISK_CACHE", "/var/cache/labmetal/ramdisk"))
REPO = Path(__file__).resolve().parent.parent


# -- the image ---------------------------------------------------------------------------
def os_image(work: Path, size_mib: int) -> Path:
    """A partitioned disk whose ext4 root holds the deploy ramdisk's Debian userland."""
    from labmetal.images.ramdisk import build_ramdisk
    ramdisk = build_ramdisk(RAMDISK_CACHE, progress=lambda line: print(" ", line))
    root = work / "rootfs"
    root.mkdir()
    subprocess.run(f"zstd -dc {ramdisk.initramfs} | cpio -idm --quiet", shell=True,
                   cwd=root, check=True)
    disk = work / "os.img"
    with open(disk, "wb") as out:
        out.truncate(size_mib * MIB)
    subprocess.run(["parted", "-s", str(disk), "mklabel", "msdos", "mkpart", "primary", "ext4",
                    "1MiB", "100%"], check=True, capture_output=True)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(root), "-E",
                    f"offset={MIB}", str(disk), f"{size_mib - 1}M"], check=True)
    shutil.rmtree(root)
    return disk


@dataclass
class Image:
    raw: Path
    manifest: Manifest
    manifest_path: Path
    packed: Path
    stream: Path  # the whole image as one zstd stream, for udpcast

    @property
    def packed_size(self) -> int:
        return self.manifest.packed_size


def prepare(work: Path, size_mib: int) -> Image:
    from labmetal.agent.manifest import build
    raw = os_image(work, size_mib)
    manifest = build(raw, work / "packed")
    (work / "manifest.json").write_text(manifest.to_json())
    stream = work / "os.img.zst"
    subprocess.run(["zstd", "-q", "-3", "-f", str(raw), "-o", str(stream)], check=True)
    return Image(raw, manifest, work / "manifest.json", work / "packed", stream)


# -- the room ----------------------------------------------------------------------------
@dataclass
class BenchRoom:
    room: Room
    namespaces: list[str]
    uplink: str  # the host's interface into the room
    rate_mbit: float

    def disk(self, number: int) -> Path:
        return DISKS / f"labmetal-bench-seat{number}"

    def fresh_disks(self, size: int) -> None:
        for number in range(len(self.namespaces)):
            path = self.disk(number)
            path.unlink(missing_ok=True)
            with open(path, "wb") as disk:
                disk.truncate(size)


def open_bench_room(lab: Lab, seats: int, rate_mbit: float) -> BenchRoom:
    room = lab.add_room("bench", server=f"{SUBNET}.1/24")
    uplink = lab.add_uplink(room, f"{SERVER}/24", rate=f"{rate_mbit * 10}mbit")
    namespaces = [lab.add_seat(room, f"s{number}", f"02:00:00:00:02:{number:02x}",
                               f"{SUBNET}.{10 + number}/24", rate=f"{rate_mbit}mbit").namespace
                  for number in range(seats)]
    return BenchRoom(room, namespaces, uplink, rate_mbit)


def wait_all(procs: list[subprocess.Popen], what: str, timeout: float | None = None) -> None:
    deadline = time.monotonic() + timeout if timeout else None
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())
                                   if deadline else None))
        except subprocess.TimeoutExpired:
            for each in procs:
                each.kill()
            done = sum(1 for each in procs if each.wait() == 0)
            raise Stalled(f"{what}: {done} of {len(procs)} seats done after {timeout:.0f} s") \
                from None
    if any(codes):
        raise RuntimeError(f"{what}: {sum(1 for code in codes if code)} of {len(codes)} seats "
                           f"failed (exit codes {codes})")


class Stalled(RuntimeError):
    """A transfer that did not finish in its time (udpcast waits for every seat)."""


def seat_logs(work: Path, name: str, number: int) -> Path:
    return work / f"{name}-seat{number}.log"


# -- labmetal multicast --------------------------------------------------------------------
def multicast(work: Path, room: BenchRoom, image: Image, job: int, late: int = 0,
              have: dict[int, list[int]] | None = None) -> tuple[float, float]:
    """Seconds to every receipt, and the bytes the sender put on the wire."""
    config = MulticastConfig(group="239.255.77.9", port=47200, control_port=47201,
                             interface_ip=SERVER, rate_ceiling=int(room.rate_mbit * 1e6))
    procs: list[subprocess.Popen] = []

    def launch(number: int) -> None:
        argv = [sys.executable, "-m", "labmetal.agent.multicast", "--manifest",
                str(image.manifest_path), "--group", config.group, "--port", str(config.port),
                "--sender", f"{SERVER}:{config.control_port}", "--target",
                str(room.disk(number)), "--job", str(job), "--timeout", "60"]
        if have and have.get(number):
            argv += ["--have", ",".join(map(str, have[number]))]
        log = open(seat_logs(work, f"mc{job}", number), "wb")
        procs.append(subprocess.Popen(in_namespace(room.namespaces[number], argv), stdout=log,
                                      stderr=subprocess.STDOUT))

    seats = len(room.namespaces)
    for number in range(seats - late):
        launch(number)
    _wait_for_lines(work, f"mc{job}", range(seats - late), "listening on")
    sender = MulticastSender(image.manifest, image.packed, config, job)
    started = time.monotonic()
    sender.start()
    try:
        if late:  # three PCs that boot late: they join 10 % into the transfer
            limit = image.packed_size * 8 / (room.rate_mbit * 1e6)
            time.sleep(0.1 * limit)
            for number in range(seats - late, seats):
                launch(number)
        wait_all(procs, "multicast")
        seconds = time.monotonic() - started
        return seconds, sender.status().bytes_sent
    finally:
        sender.stop()


def _wait_for_lines(work: Path, name: str, numbers: range, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not all(text in seat_logs(work, name, n).read_text(errors="replace") for n in numbers):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: seats did not start")
        time.sleep(0.1)


# -- labmetal unicast --------------------------------------------------------------------
def unicast(work: Path, room: BenchRoom, base_url: str, seats: list[int], delta: bool) -> float:
    procs = []
    for number in seats:
        argv = [sys.executable, "-m", "bench.room", "seat-http", base_url,
                str(room.disk(number))] + (["--delta"] if delta else [])
        log = open(seat_logs(work, "http", number), "wb")
        procs.append(subprocess.Popen(in_namespace(room.namespaces[number], argv), stdout=log,
                                      stderr=subprocess.STDOUT, cwd=REPO,
                                      env={**os.environ, "BENCH_GO": str(work / "go")}))
    time.sleep(3.0)  # the interpreters are up, the manifest fetched, waiting for "go"
    started = time.monotonic()
    (work / "go").touch()
    wait_all(procs, "unicast")
    seconds = time.monotonic() - started
    (work / "go").unlink()
    return seconds


def seat_http(base_url: str, target: str, delta: bool) -> int:
    """One seat's unicast write (run inside the seat's namespace)."""
    from labmetal.agent.writer import Progress, write_image
    go = Path(os.environ["BENCH_GO"])
    session = requests.Session()
    manifest = Manifest.from_json(session.get(f"{base_url}/manifest", timeout=30).content)
    while not go.exists():
        time.sleep(0.01)
    result = write_image(session, manifest, f"{base_url}/packed", target, Progress(),
                         readback=True, delta=delta)
    print(json.dumps(result.__dict__))
    return 0


def serve_image(work: Path, image: Image) -> tuple[subprocess.Popen, str]:
    """`labmetal serve` on the uplink with the image uploaded; its files URL for the seats."""
    env = {**os.environ, "LABMETAL_STATE_DIR": str(work / "service"),
           "LABMETAL_LISTEN": f"{SERVER}:6385", "LABMETAL_LOG_FILE": str(work / "service.log")}
    proc = subprocess.Popen([str(REPO / ".venv/bin/labmetal"), "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://{SERVER}:6385"
    for _ in range(300):
        try:
            requests.get(api, timeout=1)
            break
        except requests.RequestException:
            time.sleep(0.1)
    headers = {"X-OpenStack-Ironic-API-Version": "latest"}
    created = requests.post(f"{api}/v1/images", json={"name": "os", "kind": "whole-disk"},
                            headers=headers, timeout=30)
    created.raise_for_status()
    with open(image.raw, "rb") as data:
        requests.put(f"{api}/v1/images/os/data", data=data, headers=headers,
                     timeout=600).raise_for_status()
    return proc, f"{api}/files/images/{created.json()['uuid']}"


# -- udpcast -----------------------------------------------------------------------------
def udpcast(work: Path, room: BenchRoom, image: Image, capped: bool = True,
            timeout: float = 600) -> float:
    """``capped``: udp-sender held at R (its best case here); without, udpcast's default
    (as FOG runs it unless a rate is configured): as fast as the uplink takes."""
    procs = []
    for number, namespace in enumerate(room.namespaces):
        argv = ["udp-receiver", "--nokbd", "--interface", "eth0", "--portbase", "9100",
                "--file", str(room.disk(number)), "--pipe", "zstd -dc"]
        log = open(seat_logs(work, "udpcast", number), "wb")
        procs.append(subprocess.Popen(in_namespace(namespace, argv), stdout=log,
                                      stderr=subprocess.STDOUT))
    time.sleep(2.0)
    started = time.monotonic()
    sender = subprocess.Popen(["udp-sender", "--nokbd", "--interface", room.uplink,
                               "--portbase", "9100", "--file", str(image.stream),
                               "--min-receivers", str(len(procs)), "--ttl", "1",
                               *(["--max-bitrate", f"{room.rate_mbit:g}m"] if capped else [])],
                              stdout=subprocess.DEVNULL, stderr=open(work / "udp-sender.log",
                                                                     "wb"))
    try:
        wait_all(procs, "udpcast", timeout)
    finally:
        sender.kill()
        sender.wait(timeout=60)
    return time.monotonic() - started


# -- checks ------------------------------------------------------------------------------
def verify(room: BenchRoom, image: Image, numbers: range) -> None:
    from labmetal.lab.light_room import sha256_of
    for number in numbers:
        digest = sha256_of(room.disk(number), image.manifest.raw_size)
        if digest != image.manifest.raw_sha256:
            raise RuntimeError(f"seat {number}: the disk does not hold the image")


def change_chunks(room: BenchRoom, image: Image, number: int, fraction: float,
                  rng: random.Random) -> list[int]:
    """Damage ``fraction`` of the image's data chunks on a seat's disk; returns the others."""
    data = [chunk for chunk in image.manifest.chunks if not chunk.zero]
    changed = rng.sample(data, max(1, round(fraction * len(image.manifest.chunks))))
    with open(room.disk(number), "r+b") as disk:
        for chunk in changed:
            disk.seek(chunk.offset + 4096)
            disk.write(os.urandom(64 * 1024))
    gone = {chunk.index for chunk in changed}
    return [chunk.index for chunk in image.manifest.chunks if chunk.index not in gone]


# -- the run -----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seats", type=int, default=40)
    parser.add_argument("--rate-mbit", type=float, default=10, help="seat link R; uplink 10 R")
    parser.add_argument("--image-mib", type=int, default=256)
    parser.add_argument("--late", type=int, default=3)
    parser.add_argument("--skip-unicast", action="store_true")
    parser.add_argument("--skip-udpcast", action="store_true")
    args = parser.parse_args(argv)
    if args.seats < 1 or args.seats > 200:
        parser.error("--seats: 1 to 200")
    rng = random.Random(7)
    with tempfile.TemporaryDirectory(prefix="labmetal-roombench-") as tmp, Lab() as lab:
        work = Path(tmp)
        image = prepare(work, args.image_mib)
        R = args.rate_mbit * 1e6 / 8  # bytes/s
        packed, stream = image.packed_size, image.stream.stat().st_size
        print(f"image {image.manifest.raw_size / MIB:.0f} MiB raw; labmetal's chunks "
              f"{packed / MIB:.1f} MiB packed; one zstd stream (udpcast) "
              f"{stream / MIB:.1f} MiB; {args.seats} seats at {args.rate_mbit:g} Mbit/s, "
              f"uplink {args.rate_mbit * 10:g} Mbit/s", flush=True)
        room = open_bench_room(lab, args.seats, args.rate_mbit)
        everyone = range(args.seats)
        results: dict[str, float] = {}

        def run_udpcast(name: str, capped: bool = True) -> None:
            limit = stream / R
            room.fresh_disks(image.manifest.raw_size)
            try:
                seconds = udpcast(work, room, image, capped, timeout=8 * limit + 30)
            except Stalled as stalled:
                print(f"{name:<34} stalled: {stalled}", flush=True)
                return
            verify(room, image, everyone)
            report(name, seconds, limit)

        def report(name: str, seconds: float, limit: float, extra: str = "") -> None:
            results[name] = seconds
            print(f"{name:<34} {seconds:7.1f} s = {seconds / limit:5.2f} x its limit "
                  f"({limit:.1f} s){extra}", flush=True)

        mc_limit = packed / R
        room.fresh_disks(image.manifest.raw_size)
        seconds, sent = multicast(work, room, image, job=1)
        verify(room, image, everyone)
        report("labmetal multicast", seconds, mc_limit, f"; sent {sent / packed:.2f} x packed")

        add_loss(room.room.namespace, 5)
        room.fresh_disks(image.manifest.raw_size)
        seconds, sent = multicast(work, room, image, job=2)
        verify(room, image, everyone)
        report("labmetal multicast, 5 % loss", seconds, mc_limit,
               f"; sent {sent / packed:.2f} x packed")
        if not args.skip_udpcast:
            run_udpcast("udpcast (held at R), 5 % loss")
        remove_loss(room.room.namespace)

        room.fresh_disks(image.manifest.raw_size)
        seconds, sent = multicast(work, room, image, job=3, late=args.late)
        verify(room, image, everyone)
        report(f"labmetal multicast, {args.late} late", seconds, mc_limit,
               f"; sent {sent / packed:.2f} x packed")

        if not args.skip_udpcast:
            run_udpcast("udpcast (held at R)")
            run_udpcast("udpcast (default rate)", capped=False)

        # delta: every seat holds the image with 5 % of its chunks changed (its own 5 %)
        have = {number: change_chunks(room, image, number, 0.05, rng) for number in everyone}
        seconds, sent = multicast(work, room, image, job=4, have=have)
        verify(room, image, everyone)
        report("labmetal multicast, delta 5 %", seconds, mc_limit,
               f"; sent {sent / packed:.2f} x packed")

        server, base_url = serve_image(work, image)
        try:
            room.fresh_disks(image.manifest.raw_size)
            seconds = unicast(work, room, base_url, [0], delta=False)
            verify(room, image, range(1))
            report("labmetal unicast, 1 seat", seconds, packed / R)
            change_chunks(room, image, 0, 0.05, rng)
            seconds = unicast(work, room, base_url, [0], delta=True)
            verify(room, image, range(1))
            report("labmetal unicast, 1 seat, delta 5 %", seconds, packed / R)
            if not args.skip_unicast:
                room.fresh_disks(image.manifest.raw_size)
                seconds = unicast(work, room, base_url, list(everyone), delta=False)
                verify(room, image, everyone)
                report("labmetal unicast", seconds, max(args.seats / 10, 1) * packed / R)
        finally:
            server.terminate()
            server.wait(timeout=30)
            for number in everyone:
                room.disk(number).unlink(missing_ok=True)

        print("ratios:")
        mc = results["labmetal multicast"]
        for name, ours in (("udpcast (held at R)", mc),
                           ("udpcast (held at R), 5 % loss",
                            results["labmetal multicast, 5 % loss"]),
                           ("udpcast (default rate)", mc)):
            theirs = results.get(name)
            print(f"  labmetal multicast ÷ {name}: "
                  f"{f'{ours / theirs:.2f}' if theirs else 'udpcast stalled'}")
        if "labmetal unicast" in results:
            print(f"  unicast ÷ multicast: {results['labmetal unicast'] / mc:.1f}")
        one_seat = "labmetal unicast, 1 seat"
        print(f"  delta 5 % ÷ full, unicast 1 seat: "
              f"{results['labmetal unicast, 1 seat, delta 5 %'] / results[one_seat]:.2f}; "
              f"multicast {args.seats} seats: {results['labmetal multicast, delta 5 %'] / mc:.2f}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "seat-http":
        seat = argparse.ArgumentParser()
        seat.add_argument("command")
        seat.add_argument("base_url")
        seat.add_argument("target")
        seat.add_argument("--delta", action="store_true")
        options = seat.parse_args()
        sys.exit(seat_http(options.base_url, options.target, options.delta))
    sys.exit(main())
