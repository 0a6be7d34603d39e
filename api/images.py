"""/v1/images: register images, upload their data, list, show and delete them; and the
public /files/images/... that seats download (HTTP ranges, so one chunk can be fetched)."""
from __future__ import annotations

import logging
import re
import threading
import uuid as uuidlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flask import Blueprint, request, send_file
from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from labmetal.api.services import services
from labmetal.api.auth import authorize, public
from labmetal.api.common import base_url, isotime, links, page
from labmetal.api.errors import ApiError, bad_request, conflict, not_found
from labmetal.api.validation import (Field, accepts, body, name_check, obj, paging, produces,
                                     query, streams)
from labmetal.images.inspect import FORMATS, ImageRejected
from labmetal.images.registry import  ACTIVE, DISK_KINDS, QUEUED, AlreadyActive, ImageGone, ingest
from labmetal.images.store import ImageStore, StoreFull, UploadTooLarge
from labmetal.lookup import (ImageUnusable, NOT_ACTIVE, WRONG_KIND, find_image,
                             usable_image)
from labmetal.models import Image, Node

LOG = logging.getLogger(__name__)
blueprint = Blueprint("images", __name__)

KINDS = ("whole-disk", "partition", "kernel", "ramdisk")
SORT_KEYS = ("id", "uuid", "name", "kind", "status", "size", "created_at", "updated_at")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._~-]{1,255}$")
SHA256_PATTERN = re.compile(r"^[0-9a-fA-F]{64}$")
# Where nodes name the images they boot or deploy.
NODE_REFERENCES = (("instance_info", "image_source"), ("driver_info", "deploy_kernel"),
                   ("driver_info", "deploy_ramdisk"))
FILE_TYPES = {"raw": "application/octet-stream", "packed": "application/octet-stream",
              "manifest": "application/json", "file": "application/octet-stream"}


def image_store() -> ImageStore:
    settings = services().settings
    return ImageStore(settings.image_path, settings.max_image_size)


def image_view(image: Image, uuids: dict[int, str]) -> dict[str, Any]:
    """``uuids`` maps the ids of linked kernels and ramdisks to their UUIDs."""
    files = f"{base_url()}/files/images/{image.uuid}"
    disk = image.kind in DISK_KINDS
    active = image.status == ACTIVE
    return {
        "uuid": image.uuid, "name": image.name, "kind": image.kind, "status": image.status,
        "disk_format": image.disk_format, "size": image.size, "sha256": image.sha256,
        "virtual_size": image.virtual_size, "raw_sha256": image.raw_sha256,
        "chunk_size": image.chunk_size, "chunk_count": image.chunk_count,
        "packed_size": image.packed_size,
        "kernel": uuids.get(image.kernel_id) if image.kernel_id is not None else None,
        "ramdisk": uuids.get(image.ramdisk_id) if image.ramdisk_id is not None else None,
        "description": image.description,
        "created_at": isotime(image.created_at), "updated_at": isotime(image.updated_at),
        "links": links("images", image.uuid),
        "raw_url": f"{files}/raw" if active and disk else None,
        "packed_url": f"{files}/packed" if active and disk else None,
        "manifest_url": f"{files}/manifest" if active and disk else None,
        "file_url": f"{files}/file" if active and not disk else None,
    }


def linked_uuids(session: Session, images: list[Image]) -> dict[int, str]:
    ids = {i for image in images for i in (image.kernel_id, image.ramdisk_id) if i is not None}
    if not ids:
        return {}
    return dict(session.execute(select(Image.id, Image.uuid).where(Image.id.in_(ids))).all())


# -- validation --------------------------------------------------------------------------
_NAME_RULE = ("an image name uses letters, digits and '-._~' only (at most 255), is not '.' "
              "or '..' and must not look like a UUID")
_BAD_NAME = "Invalid name {value!r}: " + _NAME_RULE + " (field: name)"


NEW_IMAGE = obj(
    "a new image",
    Field("name", str, required=True, pattern=NAME_PATTERN.pattern, description=_NAME_RULE,
          example="debian-12", error=_BAD_NAME, check=name_check(_BAD_NAME)),
    Field("kind", str, required=True, enum=KINDS,
          error=f"Unknown kind {{value!r}}; kinds: {', '.join(KINDS)} (field: kind)"),
    Field("disk_format", str | None, enum=FORMATS,
          description=f"{' and '.join(DISK_KINDS)} images only; found from the data if not given",
          error=f"Unknown disk_format {{value!r}}; accepted: {', '.join(FORMATS)} "
                "(field: disk_format)"),
    Field("sha256", str | None, pattern=SHA256_PATTERN.pattern,
          description="the checksum the upload must have", example="0" * 64,
          error="Invalid sha256: expected 64 hexadecimal digits (field: sha256)"),
    Field("kernel", str | None, description="partition images only: an active kernel image"),
    Field("ramdisk", str | None, description="partition images only: an active ramdisk image"),
    Field("description", str | None,
          error="Invalid description: expected a string (field: description)"))


def check_new_image(body: dict[str, Any]) -> None:
    """What NEW_IMAGE cannot say: which attributes go with which kind."""
    kind = body["kind"]
    if body.get("disk_format") is not None and kind not in DISK_KINDS:
        raise bad_request(f"disk_format applies to {' and '.join(DISK_KINDS)} images, not "
                          f"{kind} (field: disk_format)")
    for link in ("kernel", "ramdisk"):
        if kind == "partition" and not isinstance(body.get(link), str):
            raise bad_request(f"A partition image needs a {link}: the name or UUID of an "
                              f"active {link} image (field: {link})")
        if kind != "partition" and body.get(link) is not None:
            raise bad_request(f"Only partition images link a {link} (field: {link})")


def linked_image(session: Session, ident: str, kind: str) -> Image:
    try:
        return usable_image(session, ident, (kind,))
    except ImageUnusable as error:
        if error.problem == WRONG_KIND:
            raise bad_request(f"Image {ident} is a {error.kind} image, not a {kind} "
                              f"(field: {kind})") from None
        if error.problem == NOT_ACTIVE:
            raise bad_request(f"{kind.capitalize()} image {ident} has no data yet (status "
                              f"{error.status}); upload it first (field: {kind})") from None
        raise bad_request(f"{kind.capitalize()} image {ident} could not be found "
                          f"(field: {kind})") from None


def users_of(session: Session, image: Image) -> list[str]:
    """Nodes and partition images that name the image, as "node pc1 (instance_info...)"."""
    def names_it(value: Any) -> bool:
        return isinstance(value, str) and (value == image.name or image.uuid in value.lower())

    users = []
    for name, node_uuid, *fields in session.execute(
            select(Node.name, Node.uuid, Node.instance_info, Node.driver_info)):
        values = dict(zip(("instance_info", "driver_info"), fields))
        users += [f"node {name or node_uuid} ({field}.{key})" for field, key in NODE_REFERENCES
                  if names_it((values[field] or {}).get(key))]
    for linker in session.scalars(select(Image).where(
            or_(Image.kernel_id == image.id, Image.ramdisk_id == image.id))):
        link = "kernel" if linker.kernel_id == image.id else "ramdisk"
        users.append(f"partition image {linker.name} ({link})")
    settings = services().settings
    users += [f"the service's {key} setting" for key in ("deploy_kernel", "deploy_ramdisk")
              if names_it(getattr(settings, key))]
    return users


# -- endpoints ---------------------------------------------------------------------------
@blueprint.get("/v1/images")
@authorize("image:get")
@query(Field("kind", str, enum=KINDS, description="only images of this kind",
             error=f"Unknown kind {{value!r}}; kinds: {', '.join(KINDS)}"), *paging(SORT_KEYS))
def list_images(query: dict[str, Any]):
    statement = select(Image)
    if "kind" in query:
        statement = statement.where(Image.kind == query["kind"])
    with services().db.read() as session:
        rows, extra = page(session, statement, Image, query)
        uuids = linked_uuids(session, rows)
    return {"images": [image_view(image, uuids) for image in rows], **extra}


@blueprint.get("/v1/images/<ident>")
@authorize("image:get")
def show_image(ident: str):
    with services().db.read() as session:
        image = find_image(session, ident)
        return image_view(image, linked_uuids(session, [image]))


@blueprint.post("/v1/images")
@authorize("image:create")
@body(NEW_IMAGE)
def create_image(body: dict[str, Any]):
    check_new_image(body)
    name = body["name"]
    try:
        with services().db.write() as session:
            if session.scalar(select(Image.id).where(Image.name == name)):
                raise conflict(f"An image with name {name} already exists (field: name).")
            linked_ids = {f"{link}_id": linked_image(session, body[link], link).id
                      for link in ("kernel", "ramdisk") if body.get(link) is not None}
            image = Image(name=name, kind=body["kind"], status=QUEUED,
                          disk_format=body.get("disk_format"),
                          sha256=(body.get("sha256") or "").lower() or None,
                          description=body.get("description"), **linked_ids)
            session.add(image)
            session.flush()
            view = image_view(image, linked_uuids(session, [image]))
    except IntegrityError:
        raise conflict(f"An image with name {name} already exists (field: name).") from None
    LOG.info("image %s (%s) registered as %s", name, view["uuid"], view["kind"])
    return view, 201, {"Location": view["links"][0]["href"]}


@blueprint.put("/v1/images/<ident>/data")
@authorize("image:upload")
@streams(lambda: services().settings.max_image_size)
@accepts("application/octet-stream", "the image file (raw, qcow2, a kernel or a ramdisk), "
                                     "streamed; at most max_image_size bytes")
def upload_image_data(ident: str):
    """The body is the image itself, read from the stream in pieces, once the caller is
    known and allowed (nothing reads it before). The image's sha256, when given at
    creation, is the checksum the upload must have. One upload of an image at a time: a
    second one while the first is read is refused at once (409)."""
    svc = services()
    store = image_store()
    with svc.db.read() as session:
        image = find_image(session, ident)
    if image.status == ACTIVE:
        raise _already_active(image)
    if (request.content_length or 0) > store.max_size:
        raise ApiError(413, f"Image {image.name} rejected: the upload is larger than the "
                            f"limit of {store.max_size} bytes (max_image_size)")
    with _receiving(image):
        try:
            current = ingest(svc.db, store, image, request.stream, request.content_length)
        except ImageGone:
            raise not_found(f"Image {ident} was deleted during its upload.") from None
        except AlreadyActive:  # another process's upload of it finished first
            raise _already_active(image) from None
        except UploadTooLarge as error:
            raise ApiError(413, f"Image {image.name} rejected: {error}") from None
        except StoreFull as error:  # 507 Insufficient Storage: nothing wrong with the image
            LOG.warning("upload of image %s: %s", image.name, error)
            raise ApiError(507, f"Image {image.name} not stored: {error}") from None
        except ImageRejected as error:
            LOG.info("upload of image %s (%s) rejected: %s", image.name, image.uuid, error)
            raise bad_request(f"Image {image.name} rejected: {error}") from None
    with svc.db.read() as session:
        view = image_view(current, linked_uuids(session, [current]))
    LOG.info("image %s (%s) active: %s, %s bytes", image.name, image.uuid,
             view["disk_format"] or image.kind, view["size"])
    return view


_uploads_lock = threading.Lock()
_uploads: set[str] = set()  # the images this process is receiving now


@contextmanager
def _receiving(image: Image) -> Iterator[None]:
    """This process's claim on an image's upload, or 409 if another request holds it. A
    second upload would otherwise be read and converted in full only to be refused at the
    end (by ``ingest``, which also refuses one that another process finished first)."""
    with _uploads_lock:
        if image.uuid in _uploads:
            raise conflict(f"Image {image.name} is being uploaded by another request; wait "
                           "for it to end")
        _uploads.add(image.uuid)
    try:
        yield
    finally:
        with _uploads_lock:
            _uploads.discard(image.uuid)


def _already_active(image: Image) -> ApiError:
    return conflict(f"Image {image.name} already has its data (status active); delete it and "
                    "register it again to replace it.")


@blueprint.delete("/v1/images/<ident>")
@authorize("image:delete")
def delete_image(ident: str):
    with services().db.write() as session:
        image = find_image(session, ident)
        users = users_of(session, image)
        if users:
            raise conflict(f"Image {image.name} is in use by {', '.join(users)}; it cannot be "
                           "deleted.")
        session.delete(image)
    image_store().delete(image.uuid)
    LOG.info("image %s (%s) deleted", image.name, image.uuid)
    return "", 204


@blueprint.get("/v1/images/<ident>/manifest")
@authorize("image:get")
def show_manifest(ident: str):
    with services().db.read() as session:
        image = find_image(session, ident)
    if image.kind not in DISK_KINDS:
        raise not_found(f"Image {image.name} is a {image.kind}: it is stored as a file and has "
                        "no manifest.")
    if image.status != ACTIVE:
        raise conflict(f"Image {image.name} has no data yet (status {image.status}).")
    return _send(image_store().manifest_path(image.uuid), "manifest")


@blueprint.get("/files/images/<uuid:image_uuid>/<any(raw, packed, manifest, file):name>")
@public("seats download images without credentials")
@produces("application/octet-stream", "application/json")
def image_file(image_uuid: uuidlib.UUID, name: str):
    """Public, like the boot files: seats fetch these without credentials. Only published
    (complete) files exist under these paths."""
    store = image_store()
    path = {"raw": store.raw_path, "packed": store.packed_path, "manifest": store.manifest_path,
            "file": store.file_path}[name](str(image_uuid))
    return _send(path, name)


def _send(path, name: str):
    try:
        return send_file(path, mimetype=FILE_TYPES[name], conditional=True)
    except FileNotFoundError:
        raise not_found(f"No {name} file here: the image does not exist, has no data yet, "
                        "or is not stored that way.") from None
