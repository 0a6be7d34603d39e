"""GET /v1/sessions/<ident>/disk: a student's session disk, or one of its save points, as a
standalone image file to download (qcow2 or raw), for a teacher to keep or grade. Policy
``session:export``: admins, teachers (anyone's: a copy changes nothing), a student their
own; resetting or reverting a session stays its student's (``session:reset``, README).

The storage backend writes the copy (``export_disk``) into a directory beside the sessions'
data, under the store's lock: nothing can start, revert or reset the session meanwhile, and
other session requests wait for the copy (the time to read the student's disk; longer with
``compress``). The file is then unlinked while open and the response streams from the open
file, so nothing is left on disk however the download ends (done, the client gone, the
process killed): its space is freed when the response closes the file.

A session in use on a seat (``starting`` or ``running``) is refused with 409: the seat could
write it during the copy, which would then be neither the disk before nor after. Its save
points too wait until it is stopped: one rule, the same in both stores.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from datetime import date
from pathlib import Path
from typing import Any, BinaryIO

from flask import Blueprint, g, send_file

from labmetal.api.services import services
from labmetal.api.auth import authorize
from labmetal.api.errors import bad_request
from labmetal.api.sessions import session_owner, storage
from labmetal.conductor.session_door import find_save, refuse_if_busy
from labmetal.lookup import find_session
from labmetal.api.validation import Field, produces, query
from labmetal.images.overlays.base import DISK_FORMATS
from labmetal.models import SessionSave, StudentSession

LOG = logging.getLogger(__name__)
blueprint = Blueprint("session_export", __name__)

DISK_QUERY = (Field("format", str, enum=DISK_FORMATS, default="qcow2",
                    error=f"Unknown format {{value!r}}: {' or '.join(DISK_FORMATS)}"),
              Field("save", str, description="a save point's UUID, number or label; "
                    "default: the session as it is"),
              Field("compress", bool, default=False, description="a compressed qcow2"))


def file_name(ses: StudentSession, save: SessionSave | None, fmt: str) -> str:
    """``<template>-<student>-<date>[-save<n>].<fmt>``, safe as a file name anywhere."""
    parts = [ses.template_version.template.name, ses.user.name, date.today().isoformat()]
    if save is not None:
        parts.append(f"save{save.number}")
    return re.sub(r"[^\w.@-]", "_", "-".join(parts)) + f".{fmt}"


def copy_disk(session_uuid: str, name: str, fmt: str, save_id: str | None,
              compress: bool) -> BinaryIO:
    """The backend's copy, open, its file already unlinked."""
    exports = services().settings.session_store.overlay_path / ".exports"
    exports.mkdir(parents=True, exist_ok=True)
    with services().sessions.backend() as backend:
        for left in exports.iterdir():  # a process that died mid-copy: no copy runs now
            shutil.rmtree(left, ignore_errors=True)
        work = Path(tempfile.mkdtemp(dir=exports))
        try:
            backend.export_disk(session_uuid, work / name, fmt, save_id, compress)
            return open(work / name, "rb")
        finally:
            shutil.rmtree(work, ignore_errors=True)


@blueprint.get("/v1/sessions/<ident>/disk")
@authorize("session:export", owner=session_owner)
@query(*DISK_QUERY)
@produces("application/octet-stream")
def download_disk(ident: str, query: dict[str, Any]):
    """A standalone copy of a stopped session's disk (or of one of its save points)."""
    fmt, compress, wanted = query["format"], query["compress"], query.get("save")
    if compress and fmt != "qcow2":
        raise bad_request("Only a qcow2 copy can be compressed")
    storage().reconcile()
    with services().db.read() as session:
        ses = find_session(session, ident)
        refuse_if_busy(ses, "exported")
        save = find_save(ses, wanted) if wanted is not None else None
        name = file_name(ses, save, fmt)
        session_uuid, save_id = ses.uuid, save.backend_save_id if save else None
    disk = copy_disk(session_uuid, name, fmt, save_id, compress)
    size = os.fstat(disk.fileno()).st_size
    LOG.info("session %s%s exported as %s (%d bytes) by %s", session_uuid,
             f" at {save_id}" if save_id else "", name, size, g.caller.name)
    response = send_file(disk, mimetype="application/octet-stream", as_attachment=True,
                         download_name=name, conditional=False, etag=False, max_age=0)
    response.content_length = size
    return response
