"""The seat's side of a local session (issue 16), in labmetal's ramdisk (mode ``session``):
put the student's session on the seat's disk before it boots, and bring it back to the
student's store when it ended.

labmetal's boot script sends a seat here when it has something to do with the seat's cache
(api/boot.py): a session to start on it, or an overlay the seat holds that labmetal has not
verified yet (the session ended, or the seat was switched off at the wall before it could
upload). The ramdisk looks the seat up with its MACs and gets a token for this boot (bound
to its address, like the deploy agent's), then asks for its *plan* and carries it out, in
this order, because an overlay not uploaded is the only copy of the end of a session:

1. upload: every chunk of the overlay (agent/cow.py reads the device-mapper snapshot store
   the session OS wrote), in pieces compressed and hashed (agent/block_wire.py); labmetal
   checks each piece and then the whole chain before it answers, and only then is the
   overlay marked uploaded here and its chunks zeroed (the next student on this seat must
   not find them on the disk);
2. prepare: the template version into the origin slot through the one write pipeline
   (agent/writer.py: only the chunks that differ are fetched, all of it read back and
   checked against the manifest, which also undoes anything a student wrote there), then
   the student's own chunks from their store into a new snapshot store in the overlay slot;
   the seat then tells labmetal it is ready and reboots into the session;
3. or fill: the room opened a TP, and its template goes into the origin slot before anyone
   logs in, from the room job's multicast group (agent/multicast.py) through the same
   pipeline, so that every seat of the room receives it once for all of them;
4. then: power off (the session ended) or reboot (its next boot script says what next).

Nothing here trusts the disk: the cache's state and the snapshot store are parsed as
hostile input (a student is root in the session OS), and the server checks what arrives.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import requests

from labmetal.agent import block_wire, cow, fetch, seat_cache, writer
from labmetal.agent.command_params import MulticastGroup
from labmetal.agent.seat_cache import Cache, Origin, Overlay
from labmetal.agent.writer import Progress

LOG = logging.getLogger(__name__)
TIMEOUT = 60
RETRY_SECONDS = 5
PROGRESS_SECONDS = 2.0  # how often the teacher's grid hears how far a seat is


class SyncError(Exception):
    """The plan could not be carried out; said to labmetal and on the seat's screen.
    ``status``: labmetal's HTTP answer, if it answered."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Region(io.RawIOBase):
    """``size`` bytes of a disk from byte ``base``, as a seekable file (the overlay slot
    for agent/cow.py)."""

    def __init__(self, disk: str, base: int, size: int, writable: bool) -> None:
        super().__init__()
        self.fd = os.open(disk, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        self.base, self.size, self.position = base, size, 0
        self._writable = writable

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return self._writable

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        start = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, start + offset)
        return self.position

    def tell(self) -> int:
        return self.position

    def read(self, size: int = -1) -> bytes:
        left = max(0, self.size - self.position)
        size = left if size is None or size < 0 else min(size, left)
        data = os.pread(self.fd, size, self.base + self.position)
        self.position += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def write(self, data: Any) -> int:
        data = bytes(data)
        if self.position + len(data) > self.size:
            raise OSError(f"a write past the end of the region ({self.size} bytes)")
        view = memoryview(data)
        while view:
            done = os.pwrite(self.fd, view, self.base + self.position)
            view = view[done:]
            self.position += done
        return len(data)

    def flush(self) -> None:
        if self._writable and not self.closed:
            os.fsync(self.fd)

    def close(self) -> None:
        if not self.closed:
            super().close()  # flushes first
            os.close(self.fd)


@dataclass(frozen=True)
class TemplatePlan:
    name: str
    version: int
    sha256: str
    size: int
    manifest_url: str
    packed_url: str


@dataclass(frozen=True)
class FillPlan:
    """The room opened a TP: its template into this seat's cache before anyone logs in,
    from the room job's multicast group when it has one (else over HTTP)."""
    template: TemplatePlan
    multicast: MulticastGroup | None


@dataclass(frozen=True)
class Plan:
    """What labmetal asks of this seat's cache, this boot."""
    cache_size: int
    cache_hint: int | None
    upload: str | None  # the session whose overlay to upload
    prepare: str | None  # the session to put on the seat
    template: TemplatePlan | None
    chunk_sectors: int
    then: str  # "reboot" | "poweroff"
    fill: FillPlan | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        template = data.get("template")
        fill = data.get("fill")
        return cls(int(data["cache_size"]), data.get("cache_hint"), data.get("upload"),
                   data.get("prepare"), TemplatePlan(**template) if template else None,
                   int(data.get("chunk_sectors") or 128), str(data.get("then") or "reboot"),
                   FillPlan(TemplatePlan(**fill["template"]),
                            MulticastGroup.from_dict(fill["multicast"])
                            if fill.get("multicast") else None) if fill else None)


class SeatClient:
    """``/v1/seat-sessions/...`` as the seat (its token for this boot)."""

    def __init__(self, api_url: str) -> None:
        self.api_url = api_url.rstrip("/")
        self.http = requests.Session()
        self.node = ""
        self.token = ""

    def _url(self, path: str) -> str:
        return f"{self.api_url}/v1/seat-sessions/{self.node}{path}"

    def _check(self, answer: requests.Response, what: str) -> requests.Response:
        if answer.status_code >= 400:
            try:
                import json
                said = json.loads(answer.json()["error_message"])["faultstring"]
            except (ValueError, KeyError, TypeError):
                said = answer.text[:300]
            raise SyncError(f"{what}: HTTP {answer.status_code}: {said}", answer.status_code)
        return answer

    def lookup(self, macs: list[str]) -> None:
        answer = self._check(self.http.get(f"{self.api_url}/v1/seat-sessions/lookup",
                                           params={"addresses": ",".join(macs)},
                                           timeout=TIMEOUT), "lookup")
        body = answer.json()
        self.node, self.token = body["node"], body["token"]
        self.http.headers["X-Labmetal-Seat-Token"] = self.token

    def plan(self) -> Plan:
        return Plan.from_dict(self._check(self.http.get(self._url("/plan"), timeout=TIMEOUT),
                                          "plan").json())

    def report(self, cache: Cache) -> None:
        self._check(self.http.put(self._url("/cache"), json=cache.describe(),
                                  timeout=TIMEOUT), "cache report")

    def download(self, session: str) -> requests.Response:
        return self._check(self.http.get(self._url(f"/sessions/{session}/blocks"),
                                         stream=True, timeout=TIMEOUT), "download")

    def hashes(self, session: str, disk_size: int, chunk_bytes: int) -> dict[int, bytes]:
        answer = self._check(self.http.get(self._url(f"/sessions/{session}/hashes"),
                                           timeout=TIMEOUT), "the store's chunk list")
        return block_wire.read_hashes(answer.content, disk_size, chunk_bytes)

    def upload(self, session: str, number: int, piece: bytes) -> None:
        self._check(self.http.post(self._url(f"/sessions/{session}/pieces/{number}"),
                                   data=piece, timeout=TIMEOUT), f"upload of piece {number}")

    def uploaded(self, session: str, digest: block_wire.Digest,
                 saves: list[str] | None = None) -> None:
        self._check(self.http.post(self._url(f"/sessions/{session}/uploaded"),
                                   json={"pieces": digest.pieces, "digest": digest.value,
                                         "saves": saves or []},
                                   timeout=TIMEOUT), "upload check")

    def ready(self, session: str, cache: Cache) -> None:
        self._check(self.http.post(self._url(f"/sessions/{session}/ready"),
                                   json=cache.describe(), timeout=TIMEOUT), "ready")

    def filled(self, cache: Cache) -> None:
        self._check(self.http.post(self._url("/filled"), json=cache.describe(),
                                   timeout=TIMEOUT), "template report")

    def progress(self, done: int, total: int) -> None:
        self._check(self.http.put(self._url("/progress"), json={"done": done, "total": total},
                                  timeout=TIMEOUT), "progress")

    def failed(self, message: str) -> None:
        try:
            self.http.post(self._url("/failed"), json={"message": message[:500]},
                           timeout=TIMEOUT)
        except requests.RequestException:
            pass


def overlay_region(cache: Cache, origin_size: int, writable: bool) -> Region:
    return Region(cache.disk, cache.start + cache.cow_offset(origin_size),
                  cache.cow_size(origin_size), writable)


def encoded_ahead(groups: Iterator[tuple[list[tuple[int, int]], bytes]],
                  depth: int = 2) -> Iterator[tuple[bytes, str, int]]:
    """(piece, its sha256, raw bytes) for each group, read and compressed in a thread of
    its own up to ``depth`` pieces ahead: the next piece is made while the one before is
    on the wire (zlib and the disk let go of the GIL). An error there is raised here."""
    ready: queue.Queue[tuple[bytes, str, int] | BaseException | None] = queue.Queue(depth)
    stop = threading.Event()

    def make() -> None:
        try:
            for extents, raw in groups:
                if stop.is_set():
                    return
                piece, sha = block_wire.encode(extents, raw)
                ready.put((piece, sha, len(raw)))
            ready.put(None)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            ready.put(error)

    maker = threading.Thread(target=make, name="encode-pieces", daemon=True)
    maker.start()
    try:
        while True:
            item = ready.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while maker.is_alive():  # unblock a maker waiting on a full queue
            try:
                ready.get(timeout=0.1)
            except queue.Empty:
                pass
        maker.join()


def upload(client: SeatClient, cache: Cache, session: str,
           say: Callable[[str], None] = LOG.info) -> Cache:
    """The overlay's chunks to the student's store, verified there; then the overlay is
    marked uploaded and its chunks zeroed."""
    origin, overlay = cache.state.origin, cache.state.overlay
    if origin is None or overlay is None or overlay.session != session:
        raise SyncError(f"this seat's cache holds no overlay of session {session}")
    digest = block_wire.Digest()
    sent = kept = 0
    with overlay_region(cache, origin.size, writable=False) as region:
        store = cow.read_store(region, region.size, origin.size)
        try:
            known = client.hashes(session, origin.size, store.chunk_bytes) if store else {}
        except block_wire.WireError as error:  # then every chunk goes: slower, still right
            say(f"labmetal: the store's chunk list is unusable ({error}); sending every chunk")
            known = {}

        def changed() -> Iterator[tuple[int, bytes]]:
            """The chunks whose bytes the student's store does not hold already."""
            nonlocal kept
            for offset, data in cow.read_chunks(region, store) if store else ():
                if known.get(offset) == hashlib.sha256(data).digest():
                    kept += 1
                else:
                    yield offset, data

        for piece, sha, raw_size in encoded_ahead(block_wire.pieces(changed())):
            client.upload(session, digest.pieces, piece)
            digest.add(sha)
            sent += raw_size
        base, size = region.base, region.size
    asked = seat_cache.save_requests(cache)  # from inside the session OS
    client.uploaded(session, digest, asked)
    say(f"labmetal: session uploaded ({sent / 2**20:.1f} MiB in {digest.pieces} pieces; "
        f"{kept} unchanged chunk(s) not sent), verified by labmetal"
        + (f"; save point(s) made: {', '.join(asked)}" if asked else ""))
    if asked:
        seat_cache.clear_save_requests(cache)
    cache = seat_cache.save_state(cache, replace(cache.state, overlay=replace(
        overlay, uploaded=True)))
    if store is not None:  # the next student on this seat must not find these chunks
        last = max((new for _, new in store.exceptions), default=1)
        with writer.DiskSink(cache.disk, base) as sink:
            sink.zero(0, min(size, (last + 2) * store.chunk_bytes))
            sink.sync()
    return cache


def prepare(client: SeatClient, cache: Cache, session: str, template: TemplatePlan,
            chunk_sectors: int, progress: Progress,
            say: Callable[[str], None] = LOG.info) -> Cache:
    """The template version in the origin slot, the student's chunks in a new overlay."""
    held = cache.state.overlay
    if held is not None and not held.uploaded:
        raise SyncError(f"this seat still holds session {held.session}'s overlay, not "
                        "uploaded yet")
    if cache.cow_size(template.size) < 64 * 2**20:
        raise SyncError(f"this seat's cache ({cache.size} bytes) cannot hold template "
                        f"{template.name} ({template.size} bytes) and an overlay")
    cache = template_into_origin(client, cache, template, None, progress, say)
    chunk_bytes = chunk_sectors * 512
    answer = client.download(session)
    digest = block_wire.Digest()
    end: block_wire.End | None = None

    def chunks() -> Iterator[tuple[int, bytes]]:
        nonlocal end
        stream: block_wire.Readable = answer.raw
        while True:
            piece = block_wire.read(stream, template.size, chunk_bytes)
            if piece is None:
                raise SyncError("the student's blocks ended without their end mark")
            if isinstance(piece, block_wire.End):
                end = piece
                return
            digest.add(piece.sha256)
            for offset, data in piece.blocks():
                for at in range(0, len(data), chunk_bytes):
                    yield offset + at, data[at:at + chunk_bytes]

    with overlay_region(cache, template.size, writable=True) as region:
        used = cow.write_store(region, region.size, chunk_sectors, chunks())
    answer.close()
    if end is None or end.pieces != digest.pieces or end.digest != digest.value:
        raise SyncError("the student's blocks did not arrive whole")
    # from here on the session OS writes it: the seat holds the newest copy
    seat_cache.clear_save_requests(cache)  # an earlier session's, carried or not
    overlay = Overlay(session, template.sha256, chunk_sectors, uploaded=False)
    cache = seat_cache.save_state(cache, replace(cache.state, overlay=overlay))
    say(f"labmetal: the student's {used / 2**20:.1f} MiB are on this seat")
    return cache


def template_into_origin(client: SeatClient, cache: Cache, template: TemplatePlan,
                         multicast: MulticastGroup | None, progress: Progress,
                         say: Callable[[str], None] = LOG.info) -> Cache:
    """The template version in the origin slot through the one write pipeline: the chunks
    already there are kept, the others come over HTTP or from the room's multicast group,
    and all of it is read back and checked against the manifest."""
    manifest = fetch.manifest(client.http, template.manifest_url)
    if manifest.raw_sha256 != template.sha256 or manifest.raw_size != template.size:
        raise SyncError("the template's manifest is not the one labmetal named")
    origin = Origin(template.name, template.version, template.sha256, template.size)
    cache = seat_cache.save_state(cache, seat_cache.State(origin, None))
    say(f"labmetal: template {template.name} v{template.version}: checking this seat's copy")
    source = writer.chunk_source(client.http, template.packed_url, multicast)
    result = writer.write(manifest, source, cache.disk, progress,
                          base=cache.start + seat_cache.ORIGIN_OFFSET)
    say(f"labmetal: template ready ({result.bytes_written / 2**20:.1f} MiB fetched"
        f"{' by multicast' if multicast else ''}, "
        f"{result.chunks_total - result.chunks_written} of {result.chunks_total} chunks "
        "were here already)")
    return seat_cache.save_state(cache, seat_cache.State(replace(origin, complete=True), None))


def fill(client: SeatClient, cache: Cache, plan: FillPlan,
         say: Callable[[str], None] = LOG.info) -> Cache:
    """The room's TP template into this seat's cache, its progress shown on the teacher's
    grid; then labmetal is told the seat holds it."""
    held = cache.state.overlay
    if held is not None and not held.uploaded:
        raise SyncError(f"this seat still holds session {held.session}'s overlay, not "
                        "uploaded yet")
    if cache.cow_size(plan.template.size) < 64 * 2**20:
        raise SyncError(f"this seat's cache ({cache.size} bytes) cannot hold template "
                        f"{plan.template.name} ({plan.template.size} bytes) and an overlay")
    progress = Progress()
    done = threading.Event()

    def report() -> None:
        while not done.wait(PROGRESS_SECONDS):
            if progress.total:
                try:
                    client.progress(progress.done, progress.total)
                except (SyncError, requests.RequestException) as error:
                    LOG.debug("progress not reported: %s", error)

    reporter = threading.Thread(target=report, name="progress", daemon=True)
    reporter.start()
    try:
        cache = template_into_origin(client, cache, plan.template, plan.multicast, progress,
                                     say)
    finally:
        done.set()
        reporter.join()
    client.filled(cache)
    return cache


def console_say(text: str) -> None:
    """On the seat's screens (the person at the seat sees what is happening) and the log."""
    LOG.info("%s", text)
    for path in ("/dev/tty1", "/dev/console"):
        try:
            with open(path, "w") as screen:
                screen.write(text + "\n")
        except OSError:
            pass


def run(api_url: str, macs: list[str], disk: str | None, reboot: list[str],
        poweroff: list[str], say: Callable[[str], None] = LOG.info) -> int:
    """Look up, carry out the plan, then reboot or power off. Errors are reported to
    labmetal and the seat reboots (its next boot script decides again)."""
    client = SeatClient(api_url)
    then = reboot
    try:
        while True:
            try:
                client.lookup(macs)
                break
            except SyncError as error:
                if error.status is not None and error.status < 500:
                    raise  # no work for this seat (any more), or not its address: reboot
                say(f"labmetal: {error}; asking again in {RETRY_SECONDS} s")
            except requests.RequestException as error:
                say(f"labmetal: {type(error).__name__}; asking again in {RETRY_SECONDS} s")
            time.sleep(RETRY_SECONDS)
        plan = client.plan()
        if disk is None:
            raise SyncError("this seat has no disk for labmetal's cache")
        cache = seat_cache.ensure(disk, plan.cache_size, plan.cache_hint)
        client.report(cache)
        held = cache.state.overlay
        if held is not None and not held.uploaded:
            say(f"labmetal: uploading the end of session {held.session} from this seat")
            cache = upload(client, cache, held.session, say)
            client.report(cache)
        if plan.prepare and plan.template is not None:
            cache = prepare(client, cache, plan.prepare, plan.template, plan.chunk_sectors,
                            Progress(), say)
            client.ready(plan.prepare, cache)
        elif plan.fill is not None:  # the room opened a TP: its template, then the login
            cache = fill(client, cache, plan.fill, say)
        elif plan.then == "poweroff":
            then = poweroff
    except (SyncError, seat_cache.CacheError, cow.CowError, block_wire.WireError,
            ValueError, OSError, requests.RequestException) as error:
        message = f"{type(error).__name__}: {error}" if not isinstance(error, SyncError) \
            else str(error)
        say(f"labmetal: {message}")
        if client.token:
            client.failed(message)
        time.sleep(RETRY_SECONDS)
        subprocess.run(reboot, check=False)
        return 1
    subprocess.run(then, check=False)
    return 0
