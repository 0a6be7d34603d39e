"""A template version's local-session boot (issue 16), made when the version is made: its
own kernel and labmetal's session initramfs for it (images/session_initramfs.py), kept in
the image store as a ``kernel`` and a ``ramdisk`` image that seats download like any boot
file, and where its root filesystem lies in the image.

A template that cannot boot that way (no kernel in /boot, no device-mapper modules, not an
ext root) is kept all the same: the reason is recorded with the version, its sessions run
diskless over iSCSI, and the page and ``labmetal template show`` say why.
"""
from __future__ import annotations

import logging
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from labmetal.db import Database
from labmetal.images.boot_files import BootFilesError
from labmetal.images.inspect import ImageRejected
from labmetal.images.registry import QUEUED, ingest
from labmetal.images.session_initramfs import SessionBootError, build
from labmetal.images.store import ImageStore
from labmetal.models import Image

LOG = logging.getLogger(__name__)
NONE: dict[str, Any] = {"session_kernel": None, "session_initramfs": None,
                        "root_offset": None, "root_size": None, "root_fstype": None}


def register(db: Database, store: ImageStore, raw: Path, name: str) -> dict[str, Any]:
    """TemplateVersion's columns for its local boot: the images' UUIDs and the root's
    place, or ``local_boot_error`` saying why it has none."""
    with tempfile.TemporaryDirectory(prefix="labmetal-session-boot-") as work:
        try:
            boot = build(raw, Path(work))
        except (SessionBootError, BootFilesError, OSError,
                subprocess.SubprocessError) as error:
            LOG.warning("%s: no local session boot: %s", name, error)
            return {**NONE, "local_boot_error": str(error)[:1000]}
        uuids = []
        for kind, path, suffix in (("kernel", boot.kernel, "session-kernel"),
                                   ("ramdisk", boot.initramfs, "session-initramfs")):
            with db.write() as session:
                made = Image(name=f"{name}-{suffix}", kind=kind, status=QUEUED,
                             description=f"{path.name} for {name}'s local sessions")
                session.add(made)
                session.flush()
                image_id = made.id
            with db.read() as session:
                image = session.get(Image, image_id)
            if image is None:  # deleted in between by an admin
                return {**NONE, "local_boot_error": f"its {suffix} image was deleted"}
            try:
                with open(path, "rb") as stream:
                    uuids.append(ingest(db, store, image, stream).uuid)
            except ImageRejected as error:
                return {**NONE, "local_boot_error": f"its {suffix} was refused: {error}"}
    LOG.info("%s: local sessions boot kernel %s (root %s at byte %d)", name, boot.version,
             boot.fstype, boot.root_offset)
    return {"session_kernel": uuids[0], "session_initramfs": uuids[1],
            "root_offset": boot.root_offset, "root_size": boot.root_size,
            "root_fstype": boot.fstype, "local_boot_error": None}
