"""Benchmark: local-first sessions (issue 16), each figure beside a same-run baseline.

Each ratio divides a figure by a baseline measured in the same run, so that it holds on a
loaded machine.

1. Disk speed inside a session ÷ the seat's own disk. QEMU (TCG, a virtio disk with
   ``cache=none``: the host's page cache does not answer) boots the template's own kernel
   (a) as a local session: labmetal's session initramfs assembles the root with
   device-mapper from the seat disk's cache region (the origin, a copy of the template, and
   an empty persistent snapshot store); (b) plainly: the template's own initrd mounts
   ``root=/dev/vda1`` of a copy of the template disk. In each the template's shell times
   ``dd`` writing a file (``conv=fsync``) and reading it back after ``drop_caches``, three
   rounds, each session round right after a round of the plain guest (which runs all
   along: both see the same load); medians, and the median of the rounds' ratios. The
   template is lab/osimage's local TP disk grown to ``--template-mib`` (partition and
   ext4 grown offline: no mount). (a) runs for the default snapshot chunk (64 KiB) and,
   without ``--quick``, 4 KiB and 256 KiB.
2. Upload of a student's changes over a 100 Mbit/s seat link ÷ (changed bytes ÷ link
   rate): a real service (local store) in this host, the seat in its own network namespace
   behind a shaped veth (lab/network.py), running the agent's own code (agent/session_sync)
   on a sparse file as its disk. The session is started and prepared on the seat as labmetal
   does; then its overlay gets 200 MiB of 64 KiB chunks (half random, half hex text: zlib
   halves those) written the way the kernel writes them (agent/cow.py), the session is
   stopped and the seat's next boot uploads. Measured: from the first piece sent to
   labmetal's verified answer (and, beside it, until the last piece was taken).
3. A room of 40 sessions (``--seats``) ending at once, 20 MiB changed each (the 64 MiB
   template), each seat on its own 100 Mbit/s link, the room's uplink to labmetal shaped to
   10 seat links (1 Gbit/s): from the first piece any seat sends to the last verified answer ÷ (all
   changed bytes ÷ the uplink).

``--quick``: 64 MiB files, the 64 KiB chunk only, 50 MiB uploaded, 10 seats. The service
runs without its nginx front by default (``--front``): the front refuses a piece over 1 MiB,
and the agent sends pieces of up to 4 MiB.

The iSCSI mode's figures (a seat reading its session over iSCSI from tgtd) are
bench/sessions.py's; this prints where to find them.

    sudo .venv/bin/python -m bench.local_sessions [--quick] [--skip-disk] [--front none|nginx]
        [--template-mib 256]                   (from the checkout: bench/ is not installed)

Runs as root (namespaces, tc). Everything it makes (QEMU, seats, the service, namespaces,
files) is stopped and removed on every way out, Ctrl-C included.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Iterator

import requests

from labmetal.agent import cow, seat_cache, session_sync
from labmetal.agent.writer import Progress
from labmetal.db import Database
from labmetal.images.session_initramfs import SessionBoot, build
from labmetal.lab.harness import Processes, Service, error_text, free_port, start_service
from labmetal.lab.network import Lab, shape
from labmetal.lab.osimage import build_local_tp_disk
from labmetal.users import set_user

MIB = 1024 * 1024
SECTOR = 512
QEMU = "qemu-system-x86_64"
TEMPLATE_NAME = "tp-local"  # lab/osimage's build of it is shared with the tests
BOOT_TIMEOUT = 600  # TCG on 2 cores shared with other jobs
DEFAULT_CHUNK = 128  # sectors: labmetal's session_chunk_kib = 64
SEAT_RATE_MBIT = 100
UPLINK_RATE_MBIT = 10 * SEAT_RATE_MBIT
ROOM_NET = "10.99.91"  # a subnet no test of the suite uses (they use 10.99.1-80)
SERVER = f"{ROOM_NET}.2"
ROOM_CHANGED_MIB = 20
ROUNDS = 3  # dd rounds per session guest, each paired with one of the plain guest
WARM_UP_MIB = 16  # a round before them, not measured (TCG's translation of the code)


# -- the templates --------------------------------------------------------------------
def grown_template(small: Path, work: Path, size_mib: int) -> Path:
    """The template disk grown to ``size_mib``: its one partition (from 1 MiB) to the end,
    its ext4 resized in a file of its own (e2fsck, resize2fs), then put back. No mount."""
    disk = work / "tp-big.img"
    with open(small, "rb") as source, open(disk, "wb") as out:
        out.truncate(size_mib * MIB)
        out.write(source.read(MIB))  # the msdos label
    run(["parted", "-s", str(disk), "unit", "B", "resizepart", "1", f"{size_mib * MIB - 1}B"])
    rootfs = work / "rootfs.ext4"
    with open(small, "rb") as source, open(rootfs, "wb") as out:
        source.seek(MIB)
        shutil.copyfileobj(source, out, MIB)
        out.truncate((size_mib - 1) * MIB)  # the grown partition's length, whole MiBs
    checked = subprocess.run(["e2fsck", "-f", "-y", str(rootfs)], capture_output=True,
                             text=True)
    if checked.returncode not in (0, 1):
        raise SystemExit(f"e2fsck of the template's root: {checked.stdout[-500:]}")
    run(["resize2fs", str(rootfs)])
    with open(rootfs, "rb") as source, open(disk, "r+b") as out:
        out.seek(MIB)
        shutil.copyfileobj(source, out, MIB)
    rootfs.unlink()
    return disk


def template_initrd(disk: Path, boot: SessionBoot, work: Path) -> Path:
    """The template's own initrd (/boot/initrd.img-<v>: it mounts ``root=`` and switches)."""
    initrd = work / "template-initrd.img"
    run(["debugfs", "-R", f"dump /boot/initrd.img-{boot.version} {initrd}",
         f"{disk}?offset={boot.root_offset}"])
    if not initrd.is_file() or initrd.stat().st_size == 0:
        raise SystemExit(f"the template has no /boot/initrd.img-{boot.version}")
    return initrd


def run(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)}: {done.stderr.strip()[-500:]}")
    return done.stdout


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(MIB):
            digest.update(block)
    return digest.hexdigest()


# -- figure 1: QEMU guests -------------------------------------------------------------
class Guest:
    """QEMU booting a kernel directly, its serial line on a unix socket (QEMU waits for us
    to connect: nothing it prints is lost); everything read is kept. From
    tests/test_session_initramfs.py."""

    def __init__(self, work: Path, kernel: Path, initrd: Path, cmdline: str, disk: Path):
        self.socket_path = work / f"serial-{uuid.uuid4().hex[:8]}.sock"
        self.output = bytearray()
        self.lock = threading.Condition()
        self.process = subprocess.Popen(
            [QEMU, "-accel", "tcg", "-m", "1024", "-display", "none", "-monitor", "none",
             "-no-reboot", "-nodefaults", "-kernel", str(kernel), "-initrd", str(initrd),
             "-append", cmdline,
             "-drive", f"file={disk},format=raw,if=virtio,cache=none,aio=threads",
             "-chardev", f"socket,id=serial,path={self.socket_path},server=on,wait=on",
             "-serial", "chardev:serial"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.sock = socket.socket(socket.AF_UNIX)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.sock.connect(str(self.socket_path))
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.kill()
                    raise SystemExit("QEMU's serial socket never came") from None
                time.sleep(0.05)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                data = b""
            with self.lock:
                self.output += data or b"\n[serial closed]\n"
                self.lock.notify_all()
            if not data:
                return

    def wait_for(self, pattern: str, timeout: float = BOOT_TIMEOUT) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                found = re.search(pattern, self.output.decode(errors="replace"))
                if found:
                    return found
                if b"[serial closed]" in self.output[-20:] or time.monotonic() > deadline:
                    raise SystemExit(f"{pattern!r} never appeared on the guest's serial line:"
                                     f"\n{self.output.decode(errors='replace')[-2000:]}")
                self.lock.wait(0.5)

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\n")

    def shell(self) -> None:
        """Wait until the template's shell on ttyS0 answers."""
        for _ in range(60):
            self.send('echo shell-""ready')
            try:
                self.wait_for("shell-ready", 5)
                return
            except SystemExit:
                continue
        raise SystemExit("the template's shell never answered")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.sock.close()
        self.socket_path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Round:
    write: float  # MiB/s
    read: float


def dd_round(guest: Guest, file_mib: int, tag: str) -> Round:
    """Write a new file of ``file_mib`` (``conv=fsync``), read it back after drop_caches,
    remove it. Timed with the guest's own clock, printed on ttyS0 (busybox dd prints no
    rate, its date no nanoseconds: /proc/uptime's hundredths of a second; "end" marks the
    line's end, which may come in two reads)."""
    steps = {"write": f"dd if=/dev/zero of=/f bs=1M count={file_mib} conv=fsync",
             "read": "dd if=/f of=/dev/null bs=1M"}
    speeds = {}
    for name, command in steps.items():
        guest.send(f"sync; echo 3 > /proc/sys/vm/drop_caches; read a x < /proc/uptime; "
                   f"{command} 2>/dev/null; read b x < /proc/uptime; "
                   f"echo lm-\"\"dd {tag} {name} $a $b end")
        found = guest.wait_for(rf"lm-dd {tag} {name} ([\d.]+) ([\d.]+) end", BOOT_TIMEOUT)
        speeds[name] = file_mib / (float(found.group(2)) - float(found.group(1)))
    guest.send(f"rm /f; sync; echo lm-\"\"removed {tag}")
    guest.wait_for(f"lm-removed {tag}", BOOT_TIMEOUT)
    return Round(speeds["write"], speeds["read"])


@dataclass(frozen=True)
class Paired:
    """Rounds in a session and on the plain disk, each session round right after its plain
    one: the machine's load is about the same for both."""
    session: list[Round]
    plain: list[Round]

    def median(self, rounds: list[Round], kind: str) -> float:
        return statistics.median(getattr(r, kind) for r in rounds)

    def ratio(self, kind: str) -> float:
        return statistics.median(getattr(s, kind) / getattr(p, kind)
                                 for s, p in zip(self.session, self.plain))

    def __str__(self) -> str:
        return "; ".join(
            f"{kind} {self.median(self.session, kind):.1f} MiB/s (rounds "
            f"{', '.join(f'{getattr(r, kind):.0f}' for r in self.session)}; plain "
            f"{', '.join(f'{getattr(r, kind):.0f}' for r in self.plain)})"
            for kind in ("write", "read"))


def booted(guest: Guest) -> None:
    guest.wait_for(r"labmetal-tp: image=\S+ root=\S+ booted")
    guest.shell()


def plain_guest(stack: ExitStack, template: Path, boot: SessionBoot, initrd: Path,
                work: Path) -> Guest:
    """(b): the template's kernel and its own initrd, ``root=/dev/vda1`` of a copy."""
    disk = work / "plain.img"
    run(["cp", "--sparse=always", str(template), str(disk)])
    stack.callback(disk.unlink)
    guest = Guest(work, boot.kernel, initrd, "console=ttyS0 panic=-1 root=/dev/vda1 rw", disk)
    stack.callback(guest.kill)
    booted(guest)
    return guest


def session_guest(stack: ExitStack, template: Path, boot: SessionBoot, work: Path,
                  file_mib: int, chunk_sectors: int) -> Guest:
    """(a): the seat disk holds a cache region (origin + empty COW store); labmetal's
    session initramfs assembles the root from it."""
    size = template.stat().st_size
    cache_size = -(-(MIB + size + file_mib * MIB + 64 * MIB) // seat_cache.SIZE_STEP) \
        * seat_cache.SIZE_STEP
    disk = work / "seat.img"
    with open(disk, "wb") as out:
        out.truncate(64 * MIB + cache_size + seat_cache.END_GAP)
    stack.callback(disk.unlink)
    cache = seat_cache.create(str(disk), cache_size)
    with open(template, "rb") as source, open(disk, "r+b") as out:
        out.seek(cache.start + seat_cache.ORIGIN_OFFSET)
        shutil.copyfileobj(source, out, MIB)
        os.fsync(out.fileno())
    sha = sha256_of(template)
    with session_sync.overlay_region(cache, size, writable=True) as region:
        cow.write_empty(region, chunk_sectors)
    cache = seat_cache.save_state(cache, seat_cache.State(
        seat_cache.Origin(TEMPLATE_NAME, 1, sha, size, True),
        seat_cache.Overlay(str(uuid.uuid4()), sha, chunk_sectors, False)))
    args = seat_cache.kernel_args(cache, boot.root_offset, boot.root_size, boot.fstype)
    guest = Guest(work, boot.kernel, boot.initramfs,
                  " ".join(["console=ttyS0 panic=-1", *args]), disk)
    stack.callback(guest.kill)
    booted(guest)
    return guest


def disk_speeds(template: Path, boot: SessionBoot, initrd: Path, work: Path, file_mib: int,
                chunks: list[int]) -> dict[int, Paired]:
    """Per chunk size: a session guest's rounds, each right after a round of the plain
    guest, which runs all along. Each guest first runs an unmeasured round of
    ``WARM_UP_MIB``: TCG translates the code of dd, the file system and the drivers once
    per guest, which made a new guest's first round up to a third slower than its next."""
    found = {}
    with ExitStack() as stack:
        plain = plain_guest(stack, template, boot, initrd, work)
        dd_round(plain, WARM_UP_MIB, "warm-up")
        for chunk in chunks:
            with ExitStack() as inner:
                session = session_guest(inner, template, boot, work, file_mib, chunk)
                dd_round(session, WARM_UP_MIB, "warm-up")
                rounds: tuple[list[Round], list[Round]] = ([], [])
                for number in range(ROUNDS):
                    rounds[1].append(dd_round(plain, file_mib, f"{chunk}-{number}"))
                    rounds[0].append(dd_round(session, file_mib, f"{chunk}-{number}"))
            found[chunk] = Paired(*rounds)
            print(f"  local session, {chunk * SECTOR // 1024} KiB chunks: {found[chunk]}",
                  flush=True)
    return found


# -- figures 2 and 3: a service, a room, seats in namespaces -----------------------------
@dataclass
class Api:
    service: Service

    def __call__(self, method: str, path: str, body: Any = None, status: int = 200,
                 **kwargs: Any) -> Any:
        answer = requests.request(method, self.service.url + path, json=body, timeout=900,
                                  **kwargs)
        if answer.status_code != status:
            raise SystemExit(f"{method} {path}: {answer.status_code} "
                             f"{error_text(answer) if answer.content else ''}")
        return answer.json() if answer.content else None


@dataclass(frozen=True)
class BenchSeat:
    name: str
    namespace: str
    mac: str
    disk: Path


class TimedClient(session_sync.SeatClient):
    """The agent's client, noting when the first piece went, when the last was taken, and
    when the verified answer came (time.monotonic: one clock for every process of the
    machine), and the bytes sent."""
    first_piece: float | None = None
    last_piece: float | None = None
    verified: float | None = None
    wire: int = 0

    def upload(self, session: str, number: int, piece: bytes) -> None:
        if self.first_piece is None:
            self.first_piece = time.monotonic()
        super().upload(session, number, piece)
        self.last_piece = time.monotonic()
        self.wire += len(piece)

    def uploaded(self, session: str, digest: Any, saves: list[str] | None = None) -> None:
        super().uploaded(session, digest, saves)
        self.verified = time.monotonic()


def seat_boot(api_url: str, mac: str, disk: str) -> dict[str, Any]:
    """What labmetal's ramdisk does with the seat's cache at a boot (agent/session_sync.py
    run()'s steps): upload an overlay not yet uploaded, prepare the session to start.
    Runs in the seat's namespace (see :func:`boot_seats`)."""
    client = TimedClient(api_url)
    client.lookup([mac])
    plan = client.plan()
    cache = seat_cache.ensure(disk, plan.cache_size, plan.cache_hint)
    client.report(cache)
    held = cache.state.overlay
    said: list[str] = []
    cpu = 0.0
    if held is not None and not held.uploaded:
        before = os.times()
        cache = session_sync.upload(client, cache, held.session, said.append)
        after = os.times()
        cpu = after.user + after.system - before.user - before.system
        client.report(cache)
    if plan.prepare and plan.template is not None:
        cache = session_sync.prepare(client, cache, plan.prepare, plan.template,
                                     plan.chunk_sectors, Progress(), said.append)
        client.ready(plan.prepare, cache)
    return {"first_piece": client.first_piece, "last_piece": client.last_piece,
            "verified": client.verified, "wire": client.wire, "cpu": cpu}


REPO = Path(__file__).resolve().parents[1]  # bench/ is not installed: run from the checkout
SEAT_PROGRAM = ("import json, sys; from bench.local_sessions import seat_boot; "
                "print(json.dumps(seat_boot(*sys.argv[1:])))")


def boot_seats(seats: list[BenchSeat], api_url: str) -> list[dict[str, Any]]:
    """Each seat's boot at once, each a process in the seat's namespace."""
    running = [subprocess.Popen(["ip", "netns", "exec", seat.namespace, sys.executable, "-c",
                                 SEAT_PROGRAM, api_url, seat.mac, str(seat.disk)],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for seat in seats]
    results = []
    try:
        for seat, process in zip(seats, running):
            out, err = process.communicate(timeout=1800)
            if process.returncode != 0:
                raise SystemExit(f"seat {seat.name}'s boot failed: {err.strip()[-1500:]}")
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for process in running:
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


def changed_chunks(origin_size: int, changed: int, chunk: int,
                   seed: int) -> Iterator[tuple[int, bytes]]:
    """``changed`` bytes of whole chunks at random places of the origin, in origin order:
    every other one random (zlib cannot shrink it), the others hex text (zlib halves it)."""
    picker = random.Random(seed)
    places = sorted(picker.sample(range(origin_size // chunk), changed // chunk))
    for number, place in enumerate(places):
        data = os.urandom(chunk) if number % 2 else os.urandom(chunk // 2).hex().encode()
        yield place * chunk, data


def os_writes(disk: Path, changed: int, seed: int) -> None:
    """The session OS's changes, written into the seat's overlay as the kernel writes them."""
    cache = seat_cache.find(str(disk))
    assert cache is not None and cache.state.origin and cache.state.overlay
    origin, overlay = cache.state.origin, cache.state.overlay
    chunk = overlay.chunk_sectors * SECTOR
    with session_sync.overlay_region(cache, origin.size, writable=True) as region:
        cow.write_store(region, region.size, overlay.chunk_sectors,
                        changed_chunks(origin.size, changed, chunk, seed))


@dataclass
class Room:
    api: Api
    seats: list[BenchSeat]
    students: int = 0

    def start(self, template: str, seat: BenchSeat) -> str:
        self.students += 1
        ses = self.api("POST", "/v1/sessions", {"template": template,
                                                "student": f"st{self.students:03d}"},
                       status=201)
        started = self.api("POST", f"/v1/sessions/{ses['uuid']}/start",
                           {"seat": seat.name, "boot": False})
        if started["mode"] != "local":
            raise SystemExit(f"the session is {started['mode']}, not local")
        return ses["uuid"]

    def state(self, session: str) -> str:
        return self.api("GET", f"/v1/sessions/{session}")["state"]


def open_room(stack: ExitStack, procs: Processes, work: Path, seats: int, templates:
              dict[str, Path], cache_mib: int, front: str) -> Room:
    """Room ``ROOM_NET``: labmetal on this host at .2, behind an uplink whose seat-to-server
    direction is shaped to ``UPLINK_RATE_MBIT``; each seat's link shaped to
    ``SEAT_RATE_MBIT`` both ways; a real service (local store) with the templates made."""
    lab = stack.enter_context(Lab())
    room = lab.add_room("ls", server=f"{ROOM_NET}.1/24")
    uplink_port = f"lmt-up{len(lab.made)}"  # add_uplink's name for its end on the switch
    lab.add_uplink(room, f"{SERVER}/24")
    shape(room.namespace, uplink_port, f"{UPLINK_RATE_MBIT}mbit")  # what seats send up
    state_dir = work / "service-state"
    db = Database(f"sqlite:///{state_dir / 'labmetal.db'}")
    db.upgrade()
    for number in range(1, seats + 10):
        set_user(db, f"st{number:03d}", None, "student", source="ldap")
    db.dispose()
    run_dir = Path(tempfile.mkdtemp(prefix="lm-bls-"))
    stack.callback(shutil.rmtree, run_dir, True)
    stack.callback(procs.stop_all)
    service = start_service(procs, "bench-local", host=SERVER, state_dir=state_dir,
                            overlay_backend="local", overlay_run_dir=run_dir,
                            iscsi_portal=f"{SERVER}:{free_port()}", seat_cache_mib=cache_mib,
                            deploy_kernel="deploy-k", deploy_ramdisk="deploy-r", front=front)
    api = Api(service)
    for name, kind in (("deploy-k", "kernel"), ("deploy-r", "ramdisk")):
        api("POST", "/v1/images", {"name": name, "kind": kind}, status=201)
        api("PUT", f"/v1/images/{name}/data", data=b"boot file")
    for name, path in templates.items():
        api("POST", "/v1/images", {"name": name, "kind": "whole-disk", "disk_format": "raw"},
            status=201)
        with open(path, "rb") as data:
            api("PUT", f"/v1/images/{name}/data", data=data)
        made = api("POST", "/v1/templates", {"name": name, "image": name}, status=201)
        if not made["versions"][0]["local"]:
            raise SystemExit(f"template {name}: {made['versions'][0]['local_error']}")
    api("POST", "/v1/rooms", {"name": "tpr"}, status=201)
    bench_seats = []
    for number in range(1, seats + 1):
        name, mac = f"s{number}", f"52:54:00:77:00:{number:02x}"
        seat = lab.add_seat(room, name, mac, address=f"{ROOM_NET}.{10 + number}/24",
                            rate=f"{SEAT_RATE_MBIT}mbit")
        node = api("POST", "/v1/nodes", {"name": name, "driver": "wol"}, status=201)
        api("POST", "/v1/ports", {"address": mac, "node_uuid": node["uuid"]}, status=201)
        api("PUT", f"/v1/rooms/tpr/seats/{name.upper()}", {"node": name})
        disk = work / f"{name}.disk"
        with open(disk, "wb") as out:
            out.truncate(2 * cache_mib * MIB)
        bench_seats.append(BenchSeat(name, seat.namespace, mac, disk))
    return Room(api, bench_seats)


@dataclass(frozen=True)
class Upload:
    seconds: float  # from the first piece sent to the last verified answer
    sending: float  # from the first piece sent to the last piece taken
    wire: int  # bytes sent (pieces: zlib of the chunks)
    seats_cpu: float  # seconds of CPU the seats' uploads took
    service_cpu: float  # and labmetal's service (its process and the children it waited for)


def sessions_end(room: Room, template: str, seats: list[BenchSeat], changed: int) -> Upload:
    """Sessions started and prepared on ``seats``, ``changed`` bytes written in each, all
    stopped, then every seat's next boot at once."""
    sessions = [room.start(template, seat) for seat in seats]
    boot_seats(seats, room.api.service.url)  # prepare: the template and an empty overlay
    for number, (seat, session) in enumerate(zip(seats, sessions)):
        if room.state(session) != "running":
            raise SystemExit(f"session on {seat.name}: {room.state(session)}, not running")
        os_writes(seat.disk, changed, seed=number)
        room.api("POST", f"/v1/sessions/{session}/stop")
    service_cpu = process_cpu(room.api.service.proc.pid)
    results = boot_seats(seats, room.api.service.url)
    service_cpu = process_cpu(room.api.service.proc.pid) - service_cpu
    for seat, session in zip(seats, sessions):
        if room.state(session) != "stopped":
            raise SystemExit(f"session on {seat.name}: {room.state(session)} after upload")
    first = min(r["first_piece"] for r in results)
    return Upload(max(r["verified"] for r in results) - first,
                  max(r["last_piece"] for r in results) - first,
                  sum(r["wire"] for r in results), sum(r["cpu"] for r in results),
                  service_cpu)


def process_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and of its children it waited for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(tick) for tick in fields[11:15]) / os.sysconf("SC_CLK_TCK")


# -- the report --------------------------------------------------------------------------
def describe(upload: Upload) -> str:
    return (f"pieces sent in {upload.sending:.1f} s, {upload.wire / MIB:.0f} MiB on the wire; "
            f"labmetal's check and store write {upload.seconds - upload.sending:.1f} s; "
            f"CPU: seats {upload.seats_cpu:.1f} s, service {upload.service_cpu:.1f} s")


def line(label: str, measured: str, baseline: str, ratio: float, goal: str) -> str:
    return f"{label:<48} {measured:>12} {baseline:>12} {ratio:>6.2f}   {goal}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller: 64 MiB files, the 64 KiB chunk only, 50 MiB uploaded, "
                             "10 seats")
    parser.add_argument("--template-mib", type=int, default=256)
    parser.add_argument("--skip-disk", action="store_true",
                        help="figures 2 and 3 only (no QEMU)")
    parser.add_argument("--seats", type=int, default=40,
                        help="figure 3's room (default 40, the issue's room; 10 with --quick)")
    parser.add_argument("--front", choices=("none", "nginx"), default="nginx",
                        help="the service's front (default nginx, as installed)")
    args = parser.parse_args()
    file_mib = 64 if args.quick else 128
    chunks = [DEFAULT_CHUNK] if args.quick else [8, DEFAULT_CHUNK, 512]
    changed_mib = 50 if args.quick else 200
    seats = 10 if args.quick else args.seats
    if shutil.which(QEMU) is None:
        raise SystemExit(f"no {QEMU}")
    if changed_mib > args.template_mib - 16:
        parser.error("--template-mib must exceed the uploaded size")

    def interrupted(signum: int, _frame: Any) -> None:
        for ignored in (signal.SIGINT, signal.SIGTERM):  # the clean-up is not interrupted
            signal.signal(ignored, signal.SIG_IGN)
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    work = Path(tempfile.mkdtemp(prefix="labmetal-bench-local-", dir="/var/tmp"))
    rows = []
    try:
        small = build_local_tp_disk(TEMPLATE_NAME).path
        big = grown_template(small, work, args.template_mib)
        boot = build(big, work / "session-boot")
        initrd = template_initrd(big, boot, work)
        print(f"template: lab/osimage's local TP disk grown to {args.template_mib} MiB, "
              f"kernel {boot.version}; QEMU TCG, virtio disk cache=none; "
              f"{os.cpu_count()} cores", flush=True)

        speeds = {} if args.skip_disk else disk_speeds(big, boot, initrd, work, file_mib,
                                                       chunks)
        for chunk, paired in speeds.items():
            kib = chunk * SECTOR // 1024
            for kind in ("write", "read"):
                label = f"1. session disk {kind:<5} ({file_mib} MiB, {kib} KiB chunks)"
                rows.append(line(label, f"{paired.median(paired.session, kind):.1f} MiB/s",
                                 f"{paired.median(paired.plain, kind):.1f} MiB/s",
                                 paired.ratio(kind), "goal >= 0.9"))
        with ExitStack() as stack:
            procs = Processes(work)
            cache_mib = -(-(args.template_mib + changed_mib + 64) // 64) * 64
            room = open_room(stack, procs, work, seats + 1, {"tp-big": big, "tp-small": small},
                             cache_mib, args.front)
            print(f"service up on {SERVER}; {seats + 1} seats at {SEAT_RATE_MBIT} Mbit/s, "
                  f"uplink {UPLINK_RATE_MBIT} Mbit/s", flush=True)
            one = sessions_end(room, "tp-big", room.seats[:1], changed_mib * MIB)
            ideal = changed_mib * MIB * 8 / (SEAT_RATE_MBIT * 1e6)
            print(f"  one seat uploads {changed_mib} MiB: {one.seconds:.1f} s ({describe(one)})",
                  flush=True)
            rows.append(line(f"2. upload of {changed_mib} MiB over {SEAT_RATE_MBIT} Mbit/s",
                             f"{one.seconds:.1f} s", f"{ideal:.1f} s", one.seconds / ideal,
                             "goal: 1.0 (the link's rate); half the bytes compress"))
            room_all = sessions_end(room, "tp-small", room.seats[1:], ROOM_CHANGED_MIB * MIB)
            ideal = seats * ROOM_CHANGED_MIB * MIB * 8 / (UPLINK_RATE_MBIT * 1e6)
            print(f"  {seats} seats upload {ROOM_CHANGED_MIB} MiB each: "
                  f"{room_all.seconds:.1f} s ({describe(room_all)})", flush=True)
            rows.append(line(f"3. {seats} sessions end at once, {ROOM_CHANGED_MIB} MiB each",
                             f"{room_all.seconds:.1f} s", f"{ideal:.1f} s",
                             room_all.seconds / ideal,
                             f"goal: 1.0 (the {UPLINK_RATE_MBIT} Mbit/s uplink's rate)"))
        print()
        print(f"{date.today()}, {os.cpu_count()} cores, TCG; measured, baseline, ratio")
        print("\n".join(rows))
        print("4. iSCSI mode (the session's disk over iSCSI from tgtd): see bench/sessions.py "
              "and README's \"Sessions benchmark\" (1 seat reads 0.19 of a local reader)")
    except KeyboardInterrupt:
        print("interrupted: cleaning up", flush=True)
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
