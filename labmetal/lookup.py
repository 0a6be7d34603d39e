"""Finding a row by what a person typed, decided once for every caller.

A node, room, template or image is named by its name or its UUID (names are never UUIDs);
a room job or a student's session by its UUID. ``find_<kind>`` returns the row or raises
NotFound (labmetal/errors.py), whose words the API returns with a 404.
An image is usable only when its data has arrived (active) and it is of a kind the caller
can use; what is wrong with it is one error, which says so, and the callers that owe their
users other words (an HTTP status, a field) read its ``problem``.
"""
from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from labmetal.errors import NotFound
from labmetal.lifecycles import IMAGE_ACTIVE, SESSION_DELETED
from labmetal.models import Image, Node, Room, RoomJob, StudentSession, Template
from labmetal.names import is_uuid

Row = TypeVar("Row")

MISSING, WRONG_KIND, NOT_ACTIVE = "missing", "wrong kind", "not active"


def by_name_or_uuid(session: Session, model: type[Row], ident: str) -> Row | None:
    """The row of ``model`` (with ``uuid`` and ``name`` columns) that ``ident`` names."""
    table: Any = model
    column, value = (table.uuid, ident.lower()) if is_uuid(ident) else (table.name, ident)
    return session.scalar(select(model).where(column == value))


def find_node(session: Session, ident: str) -> Node:
    return _found(by_name_or_uuid(session, Node, ident), f"Node {ident}")


def find_room(session: Session, ident: str) -> Room:
    return _found(by_name_or_uuid(session, Room, ident), f"Room {ident}")


def find_image(session: Session, ident: str) -> Image:
    return _found(by_name_or_uuid(session, Image, ident), f"Image {ident}")


def find_template(session: Session, ident: str) -> Template:
    # Template names are lower case (api/sessions.py): any case finds them.
    return _found(by_name_or_uuid(session, Template, ident.lower()), f"Template {ident}")


def find_job(session: Session, ident: str) -> RoomJob:
    """Room jobs have no name: by UUID only."""
    job = session.scalar(select(RoomJob).where(RoomJob.uuid == ident.lower())) \
        if is_uuid(ident) else None
    return _found(job, f"Room job {ident}")


def find_session(session: Session, ident: str) -> StudentSession:
    """Students' sessions have no name: by UUID only; a deleted one is not found."""
    ses = session.scalar(select(StudentSession).where(StudentSession.uuid == ident.lower())) \
        if is_uuid(ident) else None
    return _found(ses if ses is None or ses.state != SESSION_DELETED else None,
                  f"Session {ident}")


def _found(row: Row | None, what: str) -> Row:
    if row is None:
        raise NotFound(f"{what} could not be found.")
    return row


class ImageUnusable(Exception):
    """The image named is missing, of a kind the caller cannot use, or has no data yet
    (checked in that order: a kind never changes, data may still come)."""

    def __init__(self, ident: str, image: Image | None, kinds: tuple[str, ...] | None,
                 problem: str, field: str | None = None):
        self.ident, self.image, self.kinds, self.problem = ident, image, kinds, problem
        # The image's own, for the callers' messages; None when it is missing.
        self.name = image.name if image is not None else None
        self.kind = image.kind if image is not None else None
        self.status = image.status if image is not None else None
        if image is None:
            message = f"no image {ident!r} in the image store"
        else:
            wanted = " or ".join(kinds) if kinds else "any kind of"
            message = (f"image {image.name} is a {image.status} {image.kind} image; "
                       f"expected an active {wanted} image")
        super().__init__(f"{field}: {message}" if field else message[0].upper() + message[1:])


def usable_image(session: Session, ident: str, kinds: tuple[str, ...] | None = None,
                 field: str | None = None) -> Image:
    """The active image ``ident`` names, of one of ``kinds`` (None: any kind); else
    ImageUnusable, its message prefixed with ``field`` when given."""
    image = by_name_or_uuid(session, Image, ident)
    if image is None:
        raise ImageUnusable(ident, None, kinds, MISSING, field)
    if kinds is not None and image.kind not in kinds:
        raise ImageUnusable(ident, image, kinds, WRONG_KIND, field)
    if image.status != IMAGE_ACTIVE:
        raise ImageUnusable(ident, image, kinds, NOT_ACTIVE, field)
    return image
