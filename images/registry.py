"""Turning received bytes into an active image: one path for uploads (API) and captures
(conductor), so both are checked, stored and recorded the same way."""
from __future__ import annotations

from typing import IO

from sqlalchemy import select

from labmetal.db import Database
from labmetal.images.store import ImageStore
from labmetal.lifecycles import IMAGE, IMAGE_ACTIVE, IMAGE_QUEUED
from labmetal.models import Image

DISK_KINDS = ("whole-disk", "partition")
QUEUED, ACTIVE = IMAGE_QUEUED, IMAGE_ACTIVE  # the image lifecycle (labmetal/lifecycles.py)


class ImageGone(Exception):
    """The image record was deleted while its data arrived."""


class AlreadyActive(Exception):
    def __init__(self, image: Image):
        super().__init__(image.name)
        self.image = image


def ingest(db: Database, store: ImageStore, image: Image, stream: IO[bytes],
           expected_size: int | None = None) -> Image:
    """Receive, check (images.inspect), store and activate ``image``'s data. Raises
    ImageRejected (or UploadTooLarge, or StoreFull when the store's disk has not the room
    for the raw form) with the reason; nothing is kept then."""
    with store.receive(stream, image.sha256, expected_size) as upload:
        values: dict[str, object] = {"size": upload.size, "sha256": upload.sha256}
        if image.kind in DISK_KINDS:
            disk = store.add_disk_image(upload, image.disk_format)
            values |= {"disk_format": disk.info.format, "virtual_size": disk.info.virtual_size,
                       "raw_sha256": disk.manifest.raw_sha256,
                       "chunk_size": disk.manifest.chunk_size,
                       "chunk_count": len(disk.manifest.chunks),
                       "packed_size": disk.manifest.packed_size}
        else:
            store.add_file(upload)
        with db.write() as session:
            current = session.scalar(select(Image).where(Image.id == image.id).with_for_update())
            if current is None:
                raise ImageGone(image.name)
            if not IMAGE.allows(current.status, ACTIVE):
                raise AlreadyActive(current)
            store.publish(upload, current.uuid)
            for key, value in values.items():
                setattr(current, key, value)
            current.status = ACTIVE
        return current
