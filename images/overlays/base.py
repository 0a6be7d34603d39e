"""Students' session disks: one interface, two storage backends (DESIGN §5, issue 7).

A teacher's TP template is a frozen raw image, one per (name, version): a new version never
changes the sessions made from an older one. A student's session is a copy-on-write overlay
of one template version; every write of the session lands in it, so the storage a session
uses follows the student's changes, not the image size. Within a session: save points
(flush + snapshot), revert to one, reset to the template, delete. An exported session is an
iSCSI target (LUN 1) with its own CHAP account, which only the seat's initiator may reach.
A session that no seat is using can also be copied to a file (``export_disk``): a standalone
image of its disk or of one of its save points, for a teacher to keep or grade.

Backends (hardware types in Ironic's sense, a choice of implementation behind this class):
``local`` (qcow2 overlay + qemu-storage-daemon + tgtd, the embedded default) and ``ceph``
(RBD clone of a protected snapshot, served by tgtd's rbd backing store).

The public methods here are the whole contract and do the checks every backend shares
(names, labels, quotas, busy sessions); the backends implement the ``_``-prefixed steps.
Every refusal or failure is an ``OverlayError`` whose ``reason`` says which kind it is.
"""
from __future__ import annotations

import abc
import enum
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from labmetal.agent.iscsi import Chap, Export, ExportError

if TYPE_CHECKING:
    from labmetal.images.overlays.tgt import SessionTargets

__all__ = ["BlockIO", "Chap", "DISK_FORMATS", "Export", "OverlayBackend", "OverlayError", "Quota",
           "Reason", "SavePoint", "SessionDisk", "TemplateVersion", "mib"]

_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_LABEL = re.compile(r"[\w .:+-]{1,64}")
SAVE_PREFIX = "save"
DISK_FORMATS = ("qcow2", "raw")  # what export_disk writes


class Reason(str, enum.Enum):
    UNAVAILABLE = "backend unavailable"  # Ceph down, a tool missing: retry later
    QUOTA = "quota exceeded"
    NOT_FOUND = "not found"
    BUSY = "busy"  # exported to a seat, or an existing name
    INVALID = "invalid"  # a malformed name, label or image
    FAILED = "failed"  # a step failed; the message has the tool's own words


class OverlayError(Exception):
    """Refused or failed; ``str()`` is a message for the user, without secrets."""

    def __init__(self, message: str, reason: Reason = Reason.FAILED):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class TemplateVersion:
    name: str
    version: int
    size: int  # bytes, the virtual size every session of it has


@dataclass(frozen=True)
class SessionDisk:
    session_id: str
    backend: str
    template: str
    version: int
    size: int  # virtual size (the template's)
    used_bytes: int  # what the session's own data takes, save points included


@dataclass(frozen=True)
class SavePoint:
    session_id: str
    save_id: str  # the backend's snapshot name: "save.<n>.<label>"
    label: str
    created_at: datetime = field(compare=False)

    @property
    def number(self) -> int:
        return int(self.save_id.split(".", 2)[1])


class BlockIO(Protocol):
    """A session disk's bytes, by offset (OverlayBackend.blocks)."""

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...

    def flush(self) -> None: ...


@dataclass(frozen=True)
class Quota:
    """``per_session``: the bytes one session may use (checked when it is saved and when it
    is exported again); ``total``: the bytes every session of the backend may use together
    (checked when a session is created). None: no limit."""
    per_session: int | None = None
    total: int | None = None


def mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise OverlayError(f"{kind} {name!r} is not a valid name (lower-case letters, digits "
                           "and '-', at most 63, starting with a letter or digit)",
                           Reason.INVALID)
    return name


def check_version(version: int) -> int:
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise OverlayError(f"template version {version!r} is not a positive integer",
                           Reason.INVALID)
    return version


def check_raw_image(path) -> int:
    """The template's source must be a raw image (the image store keeps every disk image as
    raw); its size in bytes."""
    from labmetal.images.inspect import ImageRejected, inspect
    try:
        info = inspect(Path(path), "raw")
    except FileNotFoundError:
        raise OverlayError(f"no image file {path}", Reason.NOT_FOUND) from None
    except ImageRejected as error:
        raise OverlayError(f"{path} cannot be a template: {error}", Reason.INVALID) from None
    if info.virtual_size <= 0:
        raise OverlayError(f"{path} cannot be a template: it is empty", Reason.INVALID)
    return info.virtual_size


def save_name(number: int, label: str) -> str:
    return f"{SAVE_PREFIX}.{number}.{label}"


def parse_save_name(name: str) -> tuple[int, str] | None:
    """(number, label) of a snapshot labmetal made as a save point, else None."""
    prefix, _, rest = name.partition(".")
    number, _, label = rest.partition(".")
    if prefix != SAVE_PREFIX or not number.isdigit() or not label:
        return None
    return int(number), label


class OverlayBackend(abc.ABC):
    """A storage backend for session disks. Not thread-safe: one caller per backend object
    (the conductor owning the session holds its lock)."""
    name: str
    targets: SessionTargets  # the iSCSI side: one target per exported session

    def __init__(self, quota: Quota | None = None):
        self.quota = quota or Quota()

    # -- the contract --

    @abc.abstractmethod
    def validate(self) -> None:
        """Raise ``OverlayError(UNAVAILABLE)`` with the reason if this backend cannot work
        here now (a tool or library missing, the cluster unreachable)."""

    def make_template(self, name: str, version: int, raw_image_path) -> TemplateVersion:
        """Freeze a raw image as template ``name`` version ``version``. A version is never
        changed once made: making it again is refused."""
        check_name("template", name)
        check_version(version)
        return self._make_template(name, version, raw_image_path)

    @abc.abstractmethod
    def templates(self) -> list[TemplateVersion]: ...

    def create_session(self, session_id: str, template: str, version: int) -> SessionDisk:
        """A new session disk: an empty overlay of the template version."""
        check_name("session", session_id)
        check_name("template", template)
        check_version(version)
        if self.quota.total is not None:
            used = sum(self.used_bytes(s) for s in self.sessions())
            if used >= self.quota.total:
                raise OverlayError(f"cannot create session {session_id}: the sessions of "
                                   f"this {self.name} store use {mib(used)} ({used} bytes) of "
                                   f"their {mib(self.quota.total)} ({self.quota.total} bytes)"
                                   " quota", Reason.QUOTA)
        return self._create_session(session_id, template, version)

    @abc.abstractmethod
    def sessions(self) -> list[str]: ...

    @abc.abstractmethod
    def describe(self, session_id: str) -> SessionDisk: ...

    def export(self, session_id: str, iqn: str, chap_user: str, chap_password: str,
               allowed_initiator: str | Iterable[str]) -> Export:
        """Serve the session as ``iqn`` LUN 1 on this backend's portal, to the initiator(s)
        named (iSCSI name or address/network) logging in with this CHAP account only.
        A session already exported is refused; one whose target server died is exported
        again with its data."""
        self._require_session(session_id)
        if self.is_exported(session_id):
            raise OverlayError(f"session {session_id} is already exported; unexport it first",
                               Reason.BUSY)
        if not chap_user or not chap_password:
            raise OverlayError("a session is exported with CHAP only: user and password "
                               "are required", Reason.INVALID)
        self._check_session_quota(session_id, "exported")
        allowed = [allowed_initiator] if isinstance(allowed_initiator, str) \
            else list(allowed_initiator)
        if not allowed:
            raise OverlayError("name the seat's initiator (iSCSI name or address): a session "
                               "is never exported to every initiator", Reason.INVALID)
        return self._export(session_id, iqn, Chap(chap_user, chap_password), allowed)

    def unexport(self, session_id: str) -> None:
        """Stop serving the session (flushing it); a session not exported is left as is."""
        self._require_session(session_id)
        self._unexport(session_id)

    def admit_only(self, session_id: str, address: str) -> None:
        """From now on the session's target lets in the seat's ``address`` alone (with the
        CHAP account): called once the seat's boot script, which carries the account, went
        to that address (api/boot.py). Before, the target knows the seat by its initiator
        name, which any seat can claim."""
        self._require_session(session_id)
        try:
            self.targets.admit_only(session_id, address)
        except ExportError as error:
            raise OverlayError(f"session {session_id}'s target: {error}",
                               Reason.INVALID) from None

    @abc.abstractmethod
    def is_exported(self, session_id: str) -> bool: ...

    @abc.abstractmethod
    def connected(self) -> set[str]:
        """The exported sessions a seat is logged in to now."""

    def save(self, session_id: str, label: str) -> SavePoint:
        """Flush what the seat wrote and snapshot it, exported or not. Crash-safe: if
        anything dies mid-save, every earlier save point is still there and intact."""
        self._require_session(session_id)
        if not isinstance(label, str) or not _LABEL.fullmatch(label):
            raise OverlayError(f"save label {label!r}: 1 to 64 letters, digits, spaces or "
                               "._:+-", Reason.INVALID)
        self._check_session_quota(session_id, "saved")
        number = max((s.number for s in self.list_saves(session_id)), default=0) + 1
        return self._save(session_id, save_name(number, label))

    @abc.abstractmethod
    def list_saves(self, session_id: str) -> list[SavePoint]:
        """Oldest first."""

    def revert(self, session_id: str, save_point: SavePoint | str) -> None:
        """Back to a save point (the changes since are lost; later save points stay)."""
        save_id = save_point.save_id if isinstance(save_point, SavePoint) else save_point
        self._require_idle(session_id, "reverted")
        if save_id not in {s.save_id for s in self.list_saves(session_id)}:
            raise OverlayError(f"session {session_id} has no save point {save_id}",
                               Reason.NOT_FOUND)
        self._revert(session_id, save_id)

    def reset(self, session_id: str) -> SessionDisk:
        """Back to the template version the session was made from: the session's changes
        and save points are dropped."""
        self._require_idle(session_id, "reset")
        return self._reset(session_id)

    def delete(self, session_id: str) -> None:
        self._require_idle(session_id, "deleted")
        self._delete(session_id)

    def export_disk(self, session_id: str, dest: str | os.PathLike, fmt: str = "qcow2",
                    save_id: str | None = None, compress: bool = False) -> int:
        """Write a standalone copy (no backing file: the template's data is in it) of the
        session's disk, or of its save point ``save_id``, to the file ``dest`` (replaced);
        its size in bytes. ``fmt``: ``qcow2`` (sparse; ``compress`` for zlib clusters) or
        ``raw``. Refused while the session is exported: the seat could write it under the
        copy, which would then be neither the disk before nor after. A failed copy leaves
        no file."""
        self._require_session(session_id)
        if self.is_exported(session_id):
            raise OverlayError(f"session {session_id} is exported to a seat, which could "
                               "write it during the copy: unexport it first", Reason.BUSY)
        if fmt not in DISK_FORMATS:
            raise OverlayError(f"disk format {fmt!r}: {' or '.join(DISK_FORMATS)}",
                               Reason.INVALID)
        if compress and fmt != "qcow2":
            raise OverlayError("only a qcow2 copy can be compressed", Reason.INVALID)
        if save_id is not None and \
                save_id not in {s.save_id for s in self.list_saves(session_id)}:
            raise OverlayError(f"session {session_id} has no save point {save_id}",
                               Reason.NOT_FOUND)
        dest = Path(dest)
        try:
            self._export_disk(session_id, dest, fmt, save_id, compress)
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        return dest.stat().st_size

    def changed_extents(self, session_id: str) -> list[tuple[int, int]]:
        """(offset, length) of what the session holds of its own (written since its
        template version, in its current state), in increasing offsets: what a seat
        downloads into its overlay to resume the session locally (issue 16)."""
        self._require_idle(session_id, "read for a seat")
        return self._changed_extents(session_id)

    @contextmanager
    def blocks(self, session_id: str) -> Iterator[BlockIO]:
        """The session's disk for positioned reads and writes (a seat's upload of a local
        session's changed chunks, or its download), flushed at the end. Refused while the
        session is exported: a seat could write it at the same time."""
        self._require_idle(session_id, "read or written for a seat")
        with self._blocks(session_id) as io:
            yield io
            io.flush()

    @abc.abstractmethod
    def used_bytes(self, session_id: str) -> int:
        """Bytes the session's own data takes (its overlay and save points, not the
        template it shares)."""

    def close(self) -> None:  # noqa: B027 (optional: most backends start nothing)
        """Stop whatever this backend started to serve sessions (not the data)."""

    # -- shared checks --

    def _require_session(self, session_id: str) -> None:
        check_name("session", session_id)
        if session_id not in self.sessions():
            raise OverlayError(f"no session {session_id} in the {self.name} store",
                               Reason.NOT_FOUND)

    def _require_idle(self, session_id: str, what: str) -> None:
        self._require_session(session_id)
        if self.is_exported(session_id):
            raise OverlayError(f"session {session_id} is exported to a seat and cannot be "
                               f"{what}; unexport it first", Reason.BUSY)

    def _check_session_quota(self, session_id: str, what: str) -> None:
        limit = self.quota.per_session
        if limit is None:
            return
        used = self.used_bytes(session_id)
        if used > limit:
            raise OverlayError(f"session {session_id} cannot be {what}: it uses {mib(used)} "
                               f"({used} bytes), over its quota of {mib(limit)} ({limit} "
                               "bytes); revert, reset or delete to free space", Reason.QUOTA)

    # -- the steps each backend implements --

    @abc.abstractmethod
    def _make_template(self, name: str, version: int, raw_image_path) -> TemplateVersion: ...

    @abc.abstractmethod
    def _create_session(self, session_id: str, template: str, version: int) -> SessionDisk: ...

    @abc.abstractmethod
    def _export(self, session_id: str, iqn: str, chap: Chap, allowed: list[str]) -> Export: ...

    @abc.abstractmethod
    def _unexport(self, session_id: str) -> None: ...

    @abc.abstractmethod
    def _save(self, session_id: str, save_id: str) -> SavePoint: ...

    @abc.abstractmethod
    def _revert(self, session_id: str, save_id: str) -> None: ...

    @abc.abstractmethod
    def _reset(self, session_id: str) -> SessionDisk: ...

    @abc.abstractmethod
    def _delete(self, session_id: str) -> None: ...

    @abc.abstractmethod
    def _export_disk(self, session_id: str, dest: Path, fmt: str, save_id: str | None,
                     compress: bool) -> None: ...

    @abc.abstractmethod
    def _changed_extents(self, session_id: str) -> list[tuple[int, int]]: ...

    @abc.abstractmethod
    def _blocks(self, session_id: str) -> AbstractContextManager[BlockIO]: ...

    def __enter__(self) -> OverlayBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
