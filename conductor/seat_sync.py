"""labmetal's side of a local session's trips between a seat and the student's store
(issue 16; the seat's side is agent/session_sync.py).

A seat gets here only from labmetal's ramdisk in ``session`` mode, which its boot script
sends it when there is work for its cache (:meth:`SeatSync.has_work`). The seat network is
hostile (DESIGN §11), so:

* the seat's token for this boot is handed to the address leased to the seat's MAC (where
  labmetal leases nothing: to the first address that asks, and to it alone afterwards),
  and every later call must carry it from that address;
* a seat uploads only into the session labmetal recorded on it (SeatCache), whatever its
  disk claims: a student who rewrote the cache's records cannot reach another student's
  store;
* an upload is spooled, each piece checked against its sha256 as it arrives
  (agent/block_wire.py), and nothing is written to the store until the whole chain of
  pieces matches what the seat says it sent; only then is the seat told it may drop its
  copy. A seat that dies mid-upload leaves the store as it was, and uploads again.

The student's blocks go down from a spool too, read from the store under its lock once and
streamed without it, so one slow seat does not hold up the others.
"""
from __future__ import annotations

import hashlib
import hmac
import io
from datetime import UTC
import logging
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from labmetal.agent import block_wire
from labmetal.agent.seat_cache import SECTOR, Cache, Origin, Overlay, State
from labmetal.agent import seat_cache
from labmetal.config import SessionStoreSettings
from labmetal.conductor.session_store import Storage, refresh_used
from labmetal.db import Database
from labmetal.errors import Conflict, Forbidden, InvalidRequest, NotFound
from labmetal.images.store import ImageStore
from labmetal.conductor.roomjobs import CACHE, sender_group
from labmetal.lifecycles import (JOB_RUNNING, SEAT_DONE, SEAT_FAILED, SEAT_FINISHED,
                                 SEAT_WRITING, SESSION_RUNNING, SESSION_STARTING,
                                 SESSION_STOPPED, SESSION_SYNCING)
from labmetal.images.overlays.base import OverlayError
from labmetal.models import (Image, Node, Port, RoomJob, RoomJobSeat, SeatCache, SessionSave,
                             StudentSession, TemplateVersion, User, utcnow)
from labmetal.secrets import SecretBox

LOG = logging.getLogger(__name__)
MiB = 2**20
PIECE_BODY_MAX = block_wire.PIECE_RAW_MAX + block_wire.HEADER_MAX + 2**20  # zlib's growth


@dataclass(frozen=True)
class LocalBoot:
    """What a seat boots for its local session: the template's kernel, labmetal's session
    initramfs made for it, and the command line naming the seat's cache."""
    kernel: str  # image UUIDs
    initramfs: str
    args: tuple[str, ...]


class SeatSync:
    def __init__(self, db: Database, box: SecretBox, store: Storage, images: ImageStore,
                 settings: SessionStoreSettings) -> None:
        self.db = db
        self.box = box
        self.store = store
        self.images = images
        self.settings = settings
        self.spool = settings.state_dir / "seat-sync"

    @property
    def chunk_sectors(self) -> int:
        return self.settings.session_chunk_kib * 1024 // SECTOR

    # -- what a seat boots -------------------------------------------------------------
    def has_work(self, session: Session, node: Node) -> bool:
        """The seat's cache has something to do: a local session starting on it, one that
        ended there (syncing), an overlay labmetal has not verified that is not the
        session running on it now, or the template of a TP its room opened (a room job
        filling the seats' caches) that its cache does not hold."""
        rows = session.execute(select(StudentSession.id, StudentSession.state).where(
            StudentSession.seat_node_id == node.id, StudentSession.mode == "local",
            StudentSession.state.in_((SESSION_STARTING, SESSION_RUNNING,
                                      SESSION_SYNCING)))).all()
        if any(state != SESSION_RUNNING for _, state in rows):
            return True
        cache = _cache(session, node.id)
        running = {ses_id for ses_id, _ in rows}
        if cache is not None and not cache.overlay_uploaded \
                and cache.overlay_session_id not in running:
            return True
        return not rows and _fill_job(session, node.id, cache) is not None

    def local_boot(self, session: Session, node: Node) -> LocalBoot | None:
        """The running local session's boot, if the seat's cache holds it ready."""
        ses = session.scalar(select(StudentSession).where(
            StudentSession.seat_node_id == node.id, StudentSession.mode == "local",
            StudentSession.state == SESSION_RUNNING))
        cache = _cache(session, node.id)
        if ses is None or cache is None or cache.overlay_session_id != ses.id \
                or cache.origin_version_id != ses.template_version_id \
                or not cache.origin_complete or cache.start is None or cache.size is None:
            return None
        version = ses.template_version
        if not (version.session_kernel and version.session_initramfs
                and version.root_offset is not None and version.root_size):
            return None
        image = session.get(Image, version.image_id) if version.image_id else None
        if image is None or not image.raw_sha256:
            return None
        seat = Cache("", cache.start, cache.size, cache.cache_id or "", State(
            Origin("t", version.version, image.raw_sha256, version.size, True),
            Overlay(ses.uuid, image.raw_sha256, cache.chunk_sectors or self.chunk_sectors,
                    False)))
        args = seat_cache.kernel_args(seat, version.root_offset, version.root_size,
                                      version.root_fstype or "ext4")
        return LocalBoot(version.session_kernel, version.session_initramfs, tuple(args))

    # -- the seat's token ----------------------------------------------------------------
    def lookup(self, macs: list[str], address: str, lease_holder: bool | None) -> dict:
        """A new token for the seat with these MACs, if its cache has work. ``lease_holder``:
        whether ``address`` holds the seat's DHCP lease (None: labmetal leases nothing)."""
        with self.db.write() as session:
            port = session.scalar(select(Port).where(Port.address.in_(macs)).order_by(Port.id))
            node = session.get(Node, port.node_id) if port is not None else None
            if node is None:
                raise NotFound(f"No node has the MAC address(es) {', '.join(macs)}")
            if not self.has_work(session, node):
                raise NotFound(f"Node {node.name or node.uuid} has no session work for its "
                               "cache")
            cache = _cache(session, node.id) or _new_cache(session, node.id)
            if lease_holder is False or (lease_holder is None and cache.token_address
                                         not in (None, address)):
                LOG.warning("seat session lookup of node %s from %s refused", node.uuid,
                            address)
                raise Forbidden(f"{address} is not seat {node.name or node.uuid}'s address")
            token = secrets.token_urlsafe(32)
            cache.token, cache.token_address = self.box.seal(token), address
            return {"node": node.uuid, "token": token}

    def check(self, session: Session, node_uuid: str, token: str | None,
              address: str) -> tuple[Node, SeatCache]:
        node = session.scalar(select(Node).where(Node.uuid == node_uuid))
        cache = _cache(session, node.id) if node is not None else None
        expected = self.box.open(cache.token) if cache is not None and cache.token else None
        if node is None or cache is None or not (
                isinstance(token, str) and expected
                and hmac.compare_digest(token.encode(), expected.encode())):
            raise Forbidden("Invalid or missing seat token")
        if cache.token_address != address:
            raise Forbidden(f"the seat token is bound to another address than {address}")
        return node, cache

    # -- the plan ------------------------------------------------------------------------
    def plan(self, node_uuid: str, token: str | None, address: str) -> dict[str, Any]:
        with self.db.read() as session:
            node, cache = self.check(session, node_uuid, token, address)
            ses = session.scalar(select(StudentSession).where(
                StudentSession.seat_node_id == node.id, StudentSession.mode == "local",
                StudentSession.state.in_((SESSION_STARTING, SESSION_RUNNING))))
            plan: dict[str, Any] = {
                "cache_size": self.settings.seat_cache_mib * MiB, "cache_hint": cache.start,
                "chunk_sectors": self.chunk_sectors, "prepare": None, "template": None,
                "then": "poweroff"}
            if ses is not None:
                version = ses.template_version
                image = session.get(Image, version.image_id) if version.image_id else None
                if image is None or not image.raw_sha256:
                    raise Conflict(f"template {version.template.name} v{version.version}'s "
                                   "image is gone")
                plan.update(prepare=ses.uuid, then="reboot",
                            template=self._template(version, image))
                return plan
            seat = _fill_job(session, node.id, cache)
            seat_id = seat.id if seat is not None else None
            if seat is not None:
                job = seat.job
                wanted = session.get(TemplateVersion, job.template_version_id)
                fetched = session.get(Image, job.image_id) if job.image_id else None
                if wanted is None or fetched is None or not fetched.raw_sha256:
                    raise Conflict("the TP's template version is gone")
                plan.update(then="reboot", fill={
                    "template": self._template(wanted, fetched),
                    "multicast": sender_group(job.multicast) or None
                    if job.chosen_transport == "multicast" else None})
        if seat_id is not None:  # the teacher's grid: this seat is fetching it
            with self.db.write() as session:
                session.execute(update(RoomJobSeat).where(
                    RoomJobSeat.id == seat_id, RoomJobSeat.state.not_in(SEAT_FINISHED))
                    .values(state=SEAT_WRITING, progress=0))
        return plan

    def _template(self, version: TemplateVersion, image: Image) -> dict[str, Any]:
        """Where a seat finds a template version's image (agent/session_sync.TemplatePlan)."""
        if version.size % (self.chunk_sectors * SECTOR):
            raise Conflict(f"template {version.template.name} v{version.version} is not a "
                           f"whole number of {self.settings.session_chunk_kib} KiB chunks")
        base = self.settings.seat_base_url
        return {"name": version.template.name, "version": version.version,
                "sha256": image.raw_sha256, "size": version.size,
                "manifest_url": f"{base}/files/images/{image.uuid}/manifest",
                "packed_url": f"{base}/files/images/{image.uuid}/packed"}

    def progress(self, node_uuid: str, token: str | None, address: str, done: int,
                 total: int) -> None:
        """How far the seat is in fetching its room's template, for the teacher's grid."""
        with self.db.write() as session:
            node, cache = self.check(session, node_uuid, token, address)
            seat = _fill_job(session, node.id, cache)
            if seat is not None and total > 0:
                seat.state = SEAT_WRITING
                seat.progress = max(0, min(99, done * 100 // total))

    def filled(self, node_uuid: str, token: str | None, address: str,
               report: dict[str, Any]) -> None:
        """The seat wrote its room's template into its cache and read it back against the
        manifest. What it says is believed for what it is: a seat that lies only misleads
        its own next start, which checks every chunk again."""
        self.record(node_uuid, token, address, report)
        with self.db.write() as session:
            node, cache = self.check(session, node_uuid, token, address)
            seat = _fill_job(session, node.id, cache)
            if seat is None:
                raise Conflict("this seat has no template to fetch")
            version = session.get(TemplateVersion, seat.job.template_version_id)
            image = session.get(Image, seat.job.image_id) if seat.job.image_id else None
            origin = (report.get("state") or {}).get("origin") or {}
            if version is None or image is None or origin.get("sha256") != image.raw_sha256 \
                    or origin.get("complete") is not True:
                raise Conflict("the seat's cache does not hold the TP's template")
            cache.origin_version_id, cache.origin_sha256 = version.id, image.raw_sha256
            cache.origin_complete = True
            if cache.overlay_uploaded:
                cache.overlay_session_id = None
            cache.token = None  # this boot's work is done
            seat.state, seat.progress, seat.error = SEAT_DONE, 100, None
            LOG.info("seat %s holds template %s v%d in its cache", node.name or node_uuid,
                     version.template.name, version.version)

    def record(self, node_uuid: str, token: str | None, address: str,
               report: dict[str, Any]) -> None:
        """What the seat's disk says of its cache: where it is. Its records of what the
        slots hold are believed only as far as labmetal's own (a student may have
        rewritten them)."""
        start, size, cache_id = report.get("start"), report.get("size"), report.get("cache_id")
        if not (isinstance(start, int) and isinstance(size, int) and start > 0 and size > 0
                and isinstance(cache_id, str) and len(cache_id) == 32):
            raise InvalidRequest("a cache report needs its start, size and cache_id")
        with self.db.write() as session:
            _, cache = self.check(session, node_uuid, token, address)
            if cache.cache_id != cache_id:  # a new cache: nothing of the old one is there
                cache.origin_version_id, cache.origin_complete = None, False
            cache.cache_id, cache.start, cache.size = cache_id, start, size
            cache.reported_at = utcnow()

    # -- down: the student's blocks into the seat's overlay ------------------------------------
    def blocks(self, node_uuid: str, token: str | None, address: str,
               session_uuid: str) -> Iterator[bytes]:
        """The student's own chunks (whole chunks, read from their store), as pieces."""
        with self.db.write() as session:
            node, cache = self.check(session, node_uuid, token, address)
            ses = self._session_on(session, node, session_uuid,
                                   (SESSION_STARTING, SESSION_RUNNING))
            if cache.overlay_session_id not in (None, ses.id) and not cache.overlay_uploaded:
                raise Conflict("this seat holds another session's overlay, not uploaded yet")
            cache.overlay_session_id, cache.overlay_uploaded = ses.id, True
            cache.chunk_sectors = self.chunk_sectors
            size = ses.template_version.size
        spool = self._spool(session_uuid) / "down"
        chunk = self.chunk_sectors * SECTOR
        hashes = []
        with self.store.backend() as backend:
            extents = backend.changed_extents(session_uuid)
            with backend.blocks(session_uuid) as io, open(spool, "wb") as out:
                digest = block_wire.Digest()
                for offset, data in _whole_chunks(io, extents, chunk, size):
                    hashes.append((offset, hashlib.sha256(data).digest()))
                    for piece_extents, raw in block_wire.pieces([(offset, data)]):
                        piece, sha = block_wire.encode(piece_extents, raw)
                        out.write(piece)
                        digest.add(sha)
                out.write(block_wire.encode_end(digest))
        # what the store holds now, chunk by chunk, until the seat's upload is stored: the
        # store does not change meanwhile (a busy session is neither reverted nor reset)
        listed = self._spool(session_uuid) / "hashes.partial"
        listed.write_bytes(block_wire.encode_hashes(hashes))
        listed.rename(listed.with_suffix(""))
        LOG.info("session %s: %d bytes of its own sent to seat %s", session_uuid,
                 spool.stat().st_size, node_uuid)
        return _stream(spool)

    def hashes(self, node_uuid: str, token: str | None, address: str,
               session_uuid: str) -> bytes:
        """The sha256 of each chunk of the student's store as it was sent to this seat
        (block_wire.read_hashes): the seat uploads only the chunks that differ. None known
        (an older download): an empty list, and the seat uploads every chunk."""
        with self.db.read() as session:
            node, cache = self.check(session, node_uuid, token, address)
            self._uploader(session, node, cache, session_uuid)
        listed = self.spool / session_uuid / "hashes"
        return listed.read_bytes() if listed.exists() else b""

    # -- up: the seat's overlay into the student's store ----------------------------------
    def receive(self, node_uuid: str, token: str | None, address: str, session_uuid: str,
                number: int, stream: block_wire.Readable) -> None:
        """One piece of an upload, checked and spooled (pieces come in order; piece 0
        starts the upload anew)."""
        with self.db.read() as session:
            node, cache = self.check(session, node_uuid, token, address)
            ses = self._uploader(session, node, cache, session_uuid)
            size = ses.template_version.size
        spool = self._spool(session_uuid) / "up"
        if number == 0:
            shutil.rmtree(spool, ignore_errors=True)
        spool.mkdir(parents=True, exist_ok=True)
        have = len(list(spool.glob("*.piece")))
        if number != have:
            raise Conflict(f"expected piece {have}, not {number}: upload again from piece 0")
        body = stream.read(PIECE_BODY_MAX + 1)
        if len(body) > PIECE_BODY_MAX:
            raise InvalidRequest(f"piece {number}: larger than a piece may be")
        received = io.BytesIO(body)
        try:
            piece = block_wire.read(received, size, (cache.chunk_sectors or 8) * SECTOR)
        except block_wire.WireError as error:
            raise InvalidRequest(f"piece {number}: {error}") from None
        if not isinstance(piece, block_wire.Piece) or received.read(1):
            raise InvalidRequest(f"piece {number}: one piece per request")
        # kept as it came (checked: its sha256 names it), not packed again
        partial = spool / f"{number:08d}.partial"
        partial.write_bytes(body)
        partial.rename(spool / f"{number:08d}-{piece.sha256}.piece")

    def uploaded(self, node_uuid: str, token: str | None, address: str, session_uuid: str,
                 pieces: int, digest: str, saves: list[str] | None = None) -> None:
        """The seat says it sent ``pieces`` pieces with this chain: checked against the
        spool, then written to the student's store; the session is then stopped (if it
        was ending) and the seat may drop its copy. ``saves``: save points the student
        asked for from inside the session OS, made from this upload (after a queued one)."""
        with self.db.read() as session:
            node, cache = self.check(session, node_uuid, token, address)
            ses = self._uploader(session, node, cache, session_uuid)
            size, chunk = ses.template_version.size, (cache.chunk_sectors or 8) * SECTOR
        spool = self._spool(session_uuid) / "up"
        files = sorted(spool.glob("*.piece")) if spool.exists() else []
        chain = block_wire.Digest()
        for path in files:  # each one's sha256 was checked as it came
            chain.add(path.stem.split("-", 1)[1])
        if chain.pieces != pieces or chain.value != digest:
            raise Conflict(f"the upload does not match: labmetal holds {chain.pieces} pieces "
                           f"of the {pieces} the seat sent; upload again")
        written = 0
        with self.store.backend() as backend:
            with backend.blocks(session_uuid) as io:
                for path in files:
                    with open(path, "rb") as stream:
                        piece = block_wire.read(stream, size, chunk)
                    assert isinstance(piece, block_wire.Piece)
                    for offset, data in piece.blocks():
                        io.write(offset, data)
                        written += len(data)
            with self.db.write() as session:
                stored = session.scalar(select(StudentSession).where(
                    StudentSession.uuid == session_uuid))
                held = _cache(session, node.id)
                assert stored is not None and held is not None
                stored.synced_at, stored.last_error = utcnow(), None
                refresh_used(backend, stored)
                if stored.state == SESSION_SYNCING:
                    stored.state, stored.seat_node_id = SESSION_STOPPED, None
                held.overlay_uploaded = True
                queued = [(stored.pending_save, stored.pending_save_by or "unknown")] \
                    if stored.pending_save else []
                stored.pending_save = stored.pending_save_by = None
                # saves asked for in the seat's OS: by the session's student, at that seat
                student = session.get(User, stored.user_id)
                at_seat = (f"{student.name if student else 'the student'} "
                           f"at {node.name or node.uuid}")
                for asked, by in queued + [(label, at_seat) for label in list(saves or [])[:16]]:
                    _save(session, backend, stored, asked, by)
        shutil.rmtree(spool, ignore_errors=True)
        (spool.parent / "hashes").unlink(missing_ok=True)  # the store changed
        LOG.info("session %s: %d bytes uploaded from seat %s, verified and stored",
                 session_uuid, written, node_uuid)

    def ready(self, node_uuid: str, token: str | None, address: str, session_uuid: str,
              report: dict[str, Any]) -> None:
        """The seat holds the template and the student's overlay: the session runs, its
        next boot is the session's (api/boot.py)."""
        self.record(node_uuid, token, address, report)
        with self.db.write() as session:
            node, cache = self.check(session, node_uuid, token, address)
            ses = self._session_on(session, node, session_uuid,
                                   (SESSION_STARTING, SESSION_RUNNING))
            if cache.overlay_session_id != ses.id:
                raise Conflict("the session's blocks were not sent to this seat")
            cache.origin_version_id, cache.origin_complete = ses.template_version_id, True
            cache.overlay_uploaded = False
            cache.token = None  # this boot's work is done
            ses.state, ses.started_at, ses.last_error = SESSION_RUNNING, utcnow(), None
        LOG.info("session %s ready on seat %s's disk", session_uuid, node_uuid)

    def failed(self, node_uuid: str, token: str | None, address: str, message: str) -> None:
        with self.db.write() as session:
            node, cache = self.check(session, node_uuid, token, address)
            seat = _fill_job(session, node.id, cache)
            if seat is not None and seat.state == SEAT_WRITING:
                seat.state, seat.error = SEAT_FAILED, message[:1000]
            for ses in session.scalars(select(StudentSession).where(
                    StudentSession.seat_node_id == node.id, StudentSession.mode == "local")):
                ses.last_error = f"Seat {node.name or node.uuid}: {message}"[:1000]
        LOG.warning("seat %s's session work failed: %s", node_uuid, message)

    # -- helpers ----------------------------------------------------------------------------
    def _session_on(self, session: Session, node: Node, session_uuid: str,
                    states: tuple[str, ...]) -> StudentSession:
        ses = session.scalar(select(StudentSession).where(StudentSession.uuid == session_uuid))
        if ses is None or ses.seat_node_id != node.id or ses.mode != "local" \
                or ses.state not in states:
            raise Forbidden(f"session {session_uuid} is not this seat's")
        return ses

    def _uploader(self, session: Session, node: Node, cache: SeatCache,
                  session_uuid: str) -> StudentSession:
        """The session a seat may upload: the one labmetal put in its cache."""
        ses = session.scalar(select(StudentSession).where(StudentSession.uuid == session_uuid))
        if ses is None or cache.overlay_session_id != ses.id or ses.mode != "local":
            raise Forbidden(f"this seat holds no overlay of session {session_uuid} that "
                            "labmetal gave it")
        return ses

    def _spool(self, session_uuid: str) -> Path:
        path = self.spool / session_uuid
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return path


def _save(session: Session, backend: Any, ses: StudentSession, label: str, by: str) -> None:
    """The save point asked for while the seat held the newest state."""
    try:
        point = backend.save(ses.uuid, label)
    except OverlayError as error:
        ses.last_error = f"The queued save {label!r} could not be made: {error}"
        return
    session.add(SessionSave(session_id=ses.id, number=point.number, label=label,
                            backend_save_id=point.save_id, created_by=by,
                            created_at=point.created_at.astimezone(UTC).replace(tzinfo=None)))
    ses.last_saved_at = utcnow()


def _fill_job(session: Session, node_id: int, cache: SeatCache | None) -> RoomJobSeat | None:
    """The seat's place in a running job of its room opening a TP, if its cache does not
    hold that TP's template yet (conductor/roomjobs.py, action cache)."""
    seat = session.scalar(select(RoomJobSeat).join(RoomJob, RoomJob.id == RoomJobSeat.job_id)
                          .where(RoomJobSeat.node_id == node_id, RoomJob.action == CACHE,
                                 RoomJob.state == JOB_RUNNING,
                                 RoomJobSeat.state.not_in(SEAT_FINISHED))
                          .order_by(RoomJob.id.desc()))
    if seat is None or (cache is not None and cache.origin_complete
                        and cache.origin_version_id == seat.job.template_version_id):
        return None
    return seat


def _cache(session: Session, node_id: int) -> SeatCache | None:
    return session.scalar(select(SeatCache).where(SeatCache.node_id == node_id))


def _new_cache(session: Session, node_id: int) -> SeatCache:
    cache = SeatCache(node_id=node_id, origin_complete=False, overlay_uploaded=True)
    session.add(cache)
    session.flush()
    return cache


def _whole_chunks(io: Any, extents: list[tuple[int, int]], chunk: int,
                  size: int) -> Iterator[tuple[int, bytes]]:
    """The bytes of every chunk the extents touch, once each, in order."""
    last = -1
    for offset, length in extents:
        first = max(offset // chunk, last + 1)
        end = min(-(-(offset + length) // chunk), -(-size // chunk))
        for index in range(first, end):
            start = index * chunk
            yield start, io.read(start, min(chunk, size - start))
            last = index


def _stream(path: Path) -> Iterator[bytes]:
    """The spooled file, removed once sent (or the seat went away)."""
    try:
        with open(path, "rb") as source:
            while True:
                data = source.read(MiB)
                if not data:
                    return
                yield data
    finally:
        path.unlink(missing_ok=True)


