"""The image store on disk: uploads received as streams, checked, converted once, and put in
place by a rename, so a seat never downloads a half-written file.

Layout under the root::

    <uuid>/raw, <uuid>/packed, <uuid>/manifest.json   disk images (whole-disk, partition)
    <uuid>/file                                        kernels and ramdisks
    .incoming/<random>/                                uploads being received or converted

The store is private (0700): seats get images over HTTP from the service, not from disk.
A small upload can stand for a large disk (a qcow2 of compressed clusters: 1.6 MB for
1.1 GiB of raw), so before anything is written that is bigger than the upload, the store's
disk is checked for the room, keeping a reserve: the database and the students' overlays
often share that disk, and a full disk stops them too.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, Iterator

from labmetal.images.inspect import ImageInfo, ImageRejected, convert_to_raw, inspect
from labmetal.agent.manifest import Manifest, build, is_zero, read_chunks
from labmetal.names import is_uuid

READ_SIZE = 1024 * 1024
HOLE_SIZE = 4096  # zero blocks this large are left as holes, as qemu-img convert does
RAW, PACKED, MANIFEST, FILE = "raw", "packed", "manifest.json", "file"
RESERVE_MAX = 1024 ** 3  # free space kept on the store's disk: 5% of it, at most this


class UploadTooLarge(ImageRejected):
    """The upload is past the store's size limit (HTTP 413 rather than 400)."""


class StoreFull(ImageRejected):
    """The store's disk has not the room for what the upload would become (HTTP 507):
    ``needed`` bytes, ``free`` to give."""

    def __init__(self, message: str, needed: int, free: int) -> None:
        super().__init__(message)
        self.needed, self.free = needed, free


@dataclass(frozen=True)
class Upload:
    """A received upload in its own work directory, which is removed when it is done with."""
    workdir: Path
    size: int
    sha256: str

    @property
    def path(self) -> Path:
        return self.workdir / "upload"

    @property
    def content(self) -> Path:
        """What ``ImageStore.publish`` moves into place."""
        return self.workdir / "content"


@dataclass(frozen=True)
class DiskImage:
    info: ImageInfo
    manifest: Manifest


class ImageStore:
    def __init__(self, root: Path, max_size: int):
        self.root = Path(root)
        self.max_size = max_size
        self._lock = threading.Lock()
        self._promised = 0  # bytes that conversions under way will still write

    def raw_path(self, uuid: str) -> Path:
        return self._dir(uuid) / RAW

    def packed_path(self, uuid: str) -> Path:
        return self._dir(uuid) / PACKED

    def manifest_path(self, uuid: str) -> Path:
        return self._dir(uuid) / MANIFEST

    def file_path(self, uuid: str) -> Path:
        return self._dir(uuid) / FILE

    @contextlib.contextmanager
    def receive(self, stream: IO[bytes], expected_sha256: str | None = None,
                expected_size: int | None = None) -> Iterator[Upload]:
        """Read the stream to a sparse file, hashing it on the way; whatever is not
        published when the block ends is removed, so a rejected upload leaves nothing.
        ``expected_size`` (the request's length, when it has one) is asked of the store's
        disk before anything is read: a full store says so at once (StoreFull), not after
        the client sent gigabytes."""
        workdir = Path(tempfile.mkdtemp(dir=self._incoming()))
        try:
            with self._room_for(expected_size or 0, "the upload"):
                upload = self._write(stream, workdir, expected_sha256, expected_size)
            yield upload
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def add_disk_image(self, upload: Upload, declared_format: str | None) -> DiskImage:
        """Inspect, convert to a sparse raw file, build the chunks and manifest: ready to
        publish. The raw form is bounded by ``max_size`` (its virtual size is checked before
        conversion) and by the room on the store's disk; what was made is removed with the
        upload's work directory when this fails."""
        info = inspect(upload.path, declared_format, max_virtual_size=self.max_size)
        upload.content.mkdir()
        raw = upload.content / RAW
        if info.format == "raw":
            upload.path.rename(raw)  # received sparse already
        else:
            with self._room_for(info.virtual_size, f"the {info.format} image's raw form "
                                f"(its virtual size)"):
                convert_to_raw(upload.path, info.format, raw, max_size=info.virtual_size)
            upload.path.unlink()
        # The packed copy holds the raw file's data, compressed: at most about what the
        # raw file has allocated.
        with self._room_for(os.stat(raw).st_blocks * 512, "the image's packed copy"):
            manifest = build(raw, upload.content / PACKED)
        (upload.content / MANIFEST).write_text(manifest.to_json())
        return DiskImage(info, manifest)

    def add_file(self, upload: Upload) -> None:
        """Kernels and ramdisks are served as uploaded."""
        upload.content.mkdir()
        upload.path.rename(upload.content / FILE)

    def publish(self, upload: Upload, uuid: str) -> None:
        """Move the prepared files into place in one rename. The caller holds the image's
        row lock with the image still queued, so anything already there is a leftover of an
        upload whose record was never committed."""
        self.delete(uuid)
        upload.content.rename(self._dir(uuid))

    def delete(self, uuid: str) -> None:
        """Take the image's files out of sight in one rename, then remove them."""
        directory = self._dir(uuid)
        if not directory.exists():
            return
        doomed = Path(tempfile.mkdtemp(dir=self._incoming())) / uuid
        directory.rename(doomed)
        shutil.rmtree(doomed.parent, ignore_errors=True)

    def _incoming(self) -> Path:
        """The work area, made with the store (0700) if need be."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        incoming = self.root / ".incoming"
        incoming.mkdir(mode=0o700, exist_ok=True)
        return incoming

    @contextlib.contextmanager
    def _room_for(self, size: int, what: str) -> Iterator[None]:
        """Promise ``size`` bytes of the store's disk while the block runs, or raise
        StoreFull. Concurrent uploads count each other's promises (and, while they write,
        their bytes twice: on the safe side)."""
        with self._lock:
            usage = shutil.disk_usage(self.root)
            reserve = min(RESERVE_MAX, usage.total // 20)
            room = usage.free - reserve - self._promised
            if size > room:
                raise StoreFull(f"{what} needs {size} bytes, and the image store's disk has "
                                f"{max(room, 0)} bytes to give (keeping {reserve} free): "
                                "free space there, or upload a smaller image",
                                size, max(room, 0))
            self._promised += size
        try:
            yield
        finally:
            with self._lock:
                self._promised -= size

    def _dir(self, uuid: str) -> Path:
        if not is_uuid(uuid) or uuid != uuid.lower():  # canonical: no path tricks
            raise ValueError(f"not a canonical UUID: {uuid!r}")
        return self.root / uuid

    def _write(self, stream: IO[bytes], workdir: Path, expected_sha256: str | None,
               expected_size: int | None = None) -> Upload:
        digest = hashlib.sha256()
        size = 0
        try:
            with open(workdir / "upload", "wb") as out:
                for data in read_chunks(stream, READ_SIZE):
                    size += len(data)
                    if size > self.max_size:
                        raise UploadTooLarge(f"the upload is larger than the limit of "
                                             f"{self.max_size} bytes (max_image_size)")
                    digest.update(data)
                    _write_sparse(out, data)
                out.truncate(size)  # a hole at the end still counts
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            free = shutil.disk_usage(self.root).free
            needed = max(expected_size or 0, size)
            raise StoreFull(f"the image store's disk filled up after {size} bytes of the "
                            f"upload ({needed} needed at least, {free} free): free space "
                            "there, or upload a smaller image", needed, free) from None
        if size == 0:
            raise ImageRejected("the upload is empty")
        upload = Upload(workdir, size, digest.hexdigest())
        if expected_sha256 and upload.sha256 != expected_sha256.lower():
            raise ImageRejected(f"sha256 mismatch: expected {expected_sha256.lower()}, "
                                f"the upload is {upload.sha256}")
        return upload


def _write_sparse(out: BinaryIO, data: bytes) -> None:
    """Write runs of data and seek over zero blocks, so the file keeps holes there."""
    view = memoryview(data)
    run_start: int | None = None
    for offset in range(0, len(data), HOLE_SIZE):
        if not is_zero(data[offset:offset + HOLE_SIZE]):
            if run_start is None:
                run_start = offset
            continue
        if run_start is not None:
            out.write(view[run_start:offset])
            run_start = None
        out.seek(min(HOLE_SIZE, len(data) - offset), os.SEEK_CUR)
    if run_start is not None:
        out.write(view[run_start:])
