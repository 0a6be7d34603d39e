"""The ``ceph`` session store (for scale): templates and sessions are RBD images in one pool,
used through python3-rbd; sessions are served by tgtd's rbd backing store (Debian tgt-rbd;
LIO on a krbd device is the real-server alternative, not available on this kernel).

Names in the pool::

    tpl.<template>            one image per template, its content = the latest version
    tpl.<template>@v<N>       a protected snapshot per version: what sessions clone
    ses.<session>             an RBD clone of tpl.<template>@v<N> (copy-on-write)
    ses.<session>@save.<n>.<label>   a save point

A new template version overwrites the template image's head and snapshots it: the older
versions live on in their snapshots, and their clones never see the change. A save is one
RBD snapshot (made atomically by the OSD holding the image header; while tgtd has the image
open with its exclusive lock, librbd has the lock owner flush its cache and make the
snapshot). A revert is a rollback of the head, a reset a new clone swapped in by renames.
A copy to a file is ``qemu-img convert`` reading the clone (or one of its snapshots) through
qemu's rbd driver (Debian qemu-block-extra), parent data included: the copy stands alone.

A clone's first write into one of its objects copies that whole object up from the
template, so the clones' object size (``object_order``, the setting ``ceph_object_order``)
is what scattered changes cost; templates keep RBD's 4 MiB objects. Measured by
``bench.sessions --backend ceph --seats 5 --template-mib 512`` (2 cores shared with other
jobs; two runs, low-high; 50 MiB written as 800 x 64 KiB writes 640 KiB apart)::

    order (objects)   spread writes cost   1 seat reads    5 seats read    start, median
    16 (64 KiB)       1.00 x               432-561 MiB/s   618-730 MiB/s   71-83 ms
    18 (256 KiB)      4.0 x                651-861         679-976         72-121
    20 (1 MiB)        10 x                 668-812         801-883         79-87
    22 (4 MiB)        10 x (20 x on 1 GiB) 918-1100        878-1031        88-95

The default is 16 (qcow2's cluster size): the only one that keeps a student's scattered
changes at their size (a larger object costs 2**(order-16) x per 64 KiB change, up to the
image size). Reads pay for it: one seat reads 40-60 %, five seats together 70 %, of what
they do at 4 MiB (librbd splits each of a seat's reads into 64 KiB reads of the template,
in a CPU-bound tgtd); five seats still read more than their five 1 Gb/s links carry.
Starts do not change (their spread is noise).

python3-rbd / python3-rados are built for Debian's /usr/bin/python3 (3.11); a virtualenv
on another 3.11 uses them once the two extension modules are linked into its
site-packages: ``python -m labmetal.images.overlays.ceph link-debian-modules``.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

from labmetal.agent.iscsi import Chap, Export, ExportError
from labmetal.images.overlays.base import (BlockIO, OverlayBackend, OverlayError, Quota, Reason,
                                           SavePoint, SessionDisk, TemplateVersion,
                                           check_raw_image, parse_save_name)
from labmetal.images.overlays.tgt import SessionTargets

LOG = logging.getLogger(__name__)

DEBIAN_DIST_PACKAGES = Path("/usr/lib/python3/dist-packages")
MODULES = ("rados", "rbd")
CHUNK = 4 * 2**20  # RBD's default object size (the templates')
OBJECT_ORDER = 16  # sessions' clones: 64 KiB objects (see the module's docstring)


def link_debian_modules(site_packages: str | os.PathLike | None = None) -> list[Path]:
    """Link Debian's rados and rbd extension modules into this interpreter's site-packages
    (the virtualenv's); returns the links made."""
    target = Path(site_packages or sysconfig.get_paths()["platlib"])
    suffix = sysconfig.get_config_var("EXT_SUFFIX")  # .cpython-311-x86_64-linux-gnu.so
    links = []
    for module in MODULES:
        source = DEBIAN_DIST_PACKAGES / f"{module}{suffix}"
        if not source.exists():
            raise OverlayError(f"{source} is missing: install the Debian package python3-rbd "
                               f"(built for Python {sys.version_info.major}."
                               f"{sys.version_info.minor} as this one must be)",
                               Reason.UNAVAILABLE)
        link = target / source.name
        link.unlink(missing_ok=True)
        link.symlink_to(source)
        links.append(link)
    return links


def _libraries() -> tuple[Any, Any]:
    try:
        import rados
        import rbd
    except ImportError as error:
        raise OverlayError(f"the ceph session store needs python3-rbd ({error}); install the "
                           "Debian package python3-rbd, then run `python -m labmetal.images."
                           "overlays.ceph link-debian-modules` with the service's Python",
                           Reason.UNAVAILABLE) from None
    return rados, rbd


def _template_image(name: str) -> str:
    return f"tpl.{name}"


def _session_image(session_id: str) -> str:
    return f"ses.{session_id}"


class CephOverlays(OverlayBackend):
    name = "ceph"

    def __init__(self, conf_path: str | os.PathLike, pool: str, targets: SessionTargets,
                 client_id: str = "admin", quota: Quota | None = None, timeout: float = 10.0,
                 object_order: int = OBJECT_ORDER, bulk_timeout: float = 600.0):
        super().__init__(quota)
        self.conf_path = Path(conf_path)
        self.pool = pool
        self.targets = targets
        self.client_id = client_id
        self.timeout = timeout
        # A bulk copy's writes and reads (a template's import, a session's copy or blocks)
        # each get this long: a busy server at 08:00 is slow, not down. Reaching the
        # cluster (its monitors) is still bounded by ``timeout``.
        self.bulk_timeout = max(bulk_timeout, timeout)
        self.object_order = object_order  # a session clone's objects are 2**order bytes
        self._clusters: dict[bool, Any] = {}  # bulk or not -> a connected cluster

    # -- the cluster --

    def validate(self) -> None:
        with self._ioctx("reach the pool"):
            pass
        if not Path("/usr/lib/tgt/backing-store/bs_rbd.so").exists():
            raise OverlayError("tgtd cannot serve RBD images: install the Debian package "
                               "tgt-rbd", Reason.UNAVAILABLE)

    def _connect(self, bulk: bool = False) -> Any:
        rados, _ = _libraries()
        if bulk in self._clusters:
            return self._clusters[bulk]
        cluster = rados.Rados(conffile=str(self.conf_path), rados_id=self.client_id,
                              conf=self._timeouts(bulk))
        try:
            cluster.connect(timeout=int(self.timeout))
        except rados.Error as error:
            cluster.shutdown()
            raise OverlayError(self._unreachable(f"connect ({error})"), Reason.UNAVAILABLE) \
                from None
        self._clusters[bulk] = cluster
        return cluster

    def _timeouts(self, bulk: bool) -> dict[str, str]:
        """Ceph's client timeouts: the monitors within ``timeout``; each OSD operation
        within ``timeout``, or ``bulk_timeout`` for the steps of a bulk copy."""
        timeout = str(int(self.timeout))
        return {"client_mount_timeout": timeout, "rados_mon_op_timeout": timeout,
                "rados_osd_op_timeout": str(int(self.bulk_timeout if bulk else self.timeout))}

    def _unreachable(self, what: str) -> str:
        return (f"Ceph is unavailable: could not {what} within {self.timeout:g} s (config "
                f"{self.conf_path}, client {self.client_id}, pool {self.pool}); is the "
                "cluster running?")

    @contextlib.contextmanager
    def _ioctx(self, what: str, bulk: bool = False) -> Iterator[Any]:
        """An I/O context on the pool, every librados/librbd error turned into an
        OverlayError that says what was being done. ``bulk``: for a copy of many objects,
        each operation given ``bulk_timeout``."""
        rados, rbd = _libraries()
        try:
            with self._connect(bulk).open_ioctx(self.pool) as ioctx:
                yield ioctx
        except OverlayError:
            raise
        except (rados.TimedOut, rbd.Timeout, rados.ConnectionShutdown,
                rbd.ConnectionShutdown, rados.NotConnected):
            self._disconnect()
            raise OverlayError(self._unreachable(what), Reason.UNAVAILABLE) from None
        except (rbd.ImageNotFound, rados.ObjectNotFound) as error:
            if "open_ioctx" in str(error) or "pool" in str(error):
                raise OverlayError(f"cannot {what}: the pool {self.pool} does not exist",
                                   Reason.UNAVAILABLE) from None
            raise OverlayError(f"cannot {what}: not found ({error})", Reason.NOT_FOUND) \
                from None
        except (rbd.ImageExists, rbd.ImageBusy, rbd.ImageHasSnapshots) as error:
            raise OverlayError(f"cannot {what}: {error}", Reason.BUSY) from None
        except (rbd.DiskQuotaExceeded, rbd.NoSpace, rados.NoSpace) as error:
            raise OverlayError(f"cannot {what}: the pool {self.pool} is full or over its "
                               f"quota ({error})", Reason.QUOTA) from None
        except (rados.Error, rbd.Error) as error:
            raise OverlayError(f"cannot {what}: {error}") from None

    def _disconnect(self) -> None:
        clusters, self._clusters = self._clusters, {}
        for cluster in clusters.values():
            with contextlib.suppress(Exception):
                cluster.shutdown()

    def _image(self, ioctx: Any, name: str, snapshot: str | None = None) -> Any:
        _, rbd = _libraries()
        return rbd.Image(ioctx, name, snapshot=snapshot, read_only=snapshot is not None)

    # -- templates --

    def _make_template(self, name, version, raw_image_path) -> TemplateVersion:
        _, rbd = _libraries()
        size = check_raw_image(raw_image_path)
        image_name, snap = _template_image(name), f"v{version}"
        with self._ioctx(f"import template {name} version {version}", bulk=True) as ioctx:
            if image_name not in rbd.RBD().list(ioctx):
                rbd.RBD().create(ioctx, image_name, size, old_format=False)
            with self._image(ioctx, image_name) as image:
                if any(s["name"] == snap for s in image.list_snaps()):
                    raise OverlayError(f"template {name} version {version} exists and is "
                                       "frozen; make a new version", Reason.BUSY)
                if image.size() != size:
                    image.resize(size)
                # The head is rewritten whole; the earlier versions are in their snapshots.
                # An import that dies here leaves no snapshot: run it again.
                image.discard(0, size)
                with open(raw_image_path, "rb") as source:
                    for offset, data in _data_chunks(source, size):
                        image.write(data, offset)
                image.flush()
                image.create_snap(snap)
                image.protect_snap(snap)
        LOG.info("template %s version %d imported into %s/%s@%s (%d bytes)", name, version,
                 self.pool, image_name, snap, size)
        return TemplateVersion(name, version, size)

    def templates(self) -> list[TemplateVersion]:
        _, rbd = _libraries()
        found = []
        with self._ioctx("list the templates") as ioctx:
            for image_name in rbd.RBD().list(ioctx):
                if not image_name.startswith("tpl."):
                    continue
                with self._image(ioctx, image_name) as image:
                    for snap in image.list_snaps():
                        if snap["name"][:1] == "v" and snap["name"][1:].isdigit():
                            found.append(TemplateVersion(image_name[4:], int(snap["name"][1:]),
                                                         snap["size"]))
        return sorted(found, key=lambda t: (t.name, t.version))

    # -- sessions --

    def sessions(self) -> list[str]:
        _, rbd = _libraries()
        with self._ioctx("list the sessions") as ioctx:
            names = set(rbd.RBD().list(ioctx))
            for name in sorted(names):
                if name.startswith("ses.") and name.endswith(".old"):
                    self._finish_reset(ioctx, name[4:-4], names)
            names = set(rbd.RBD().list(ioctx))
        return sorted(n[4:] for n in names if n.startswith("ses.") and n.count(".") == 1)

    def describe(self, session_id: str) -> SessionDisk:
        with self._ioctx(f"describe session {session_id}") as ioctx:
            with self._image(ioctx, _session_image(session_id)) as image:
                _, parent, snap = image.parent_info()
                size = image.size()
        return SessionDisk(session_id, self.name, parent[4:], int(snap[1:]), size,
                           self.used_bytes(session_id))

    def _create_session(self, session_id, template, version) -> SessionDisk:
        _, rbd = _libraries()
        with self._ioctx(f"create session {session_id}") as ioctx:
            self._require_template(ioctx, template, version)
            if _session_image(session_id) in rbd.RBD().list(ioctx):
                raise OverlayError(f"session {session_id} exists already", Reason.BUSY)
            self._clone(ioctx, template, version, _session_image(session_id))
        LOG.info("session %s cloned from %s/%s@v%d", session_id, self.pool,
                 _template_image(template), version)
        return self.describe(session_id)

    def _clone(self, ioctx: Any, template: str, version: int, name: str) -> None:
        """A clone with objects of 2**object_order bytes. Its stripe unit is said too: a
        clone inherits its parent's (the template's 4 MiB), which must divide the object
        size; one object per stripe unit is RBD's plain layout (no striping feature)."""
        _, rbd = _libraries()
        rbd.RBD().clone(ioctx, _template_image(template), f"v{version}", ioctx, name,
                        order=self.object_order, stripe_unit=2**self.object_order,
                        stripe_count=1)

    def _require_template(self, ioctx: Any, template: str, version: int) -> None:
        _, rbd = _libraries()
        try:
            with self._image(ioctx, _template_image(template)) as image:
                if any(s["name"] == f"v{version}" for s in image.list_snaps()):
                    return
        except rbd.ImageNotFound:
            pass
        raise OverlayError(f"no template {template} version {version}", Reason.NOT_FOUND)

    def used_bytes(self, session_id: str) -> int:
        """The clone's own objects, at the head and in each save point, without the
        template's (RBD's object granularity: 2**object_order bytes per touched object)."""
        _, rbd = _libraries()
        total = 0

        def count(offset: int, length: int, exists: bool) -> None:
            nonlocal total
            if exists:
                total += length

        with self._ioctx(f"measure session {session_id}") as ioctx:
            name = _session_image(session_id)
            try:
                with self._image(ioctx, name) as image:
                    snaps = sorted(image.list_snaps(), key=lambda s: s["id"])
                    size = image.size()
            except rbd.ImageNotFound:
                raise OverlayError(f"no session {session_id} in the ceph store",
                                   Reason.NOT_FOUND) from None
            previous = None
            for snap in [s["name"] for s in snaps] + [None]:
                with self._image(ioctx, name, snapshot=snap) as image:
                    image.diff_iterate(0, size, previous, count, include_parent=False,
                                       whole_object=True)
                previous = snap
        return total

    # -- serving --

    def is_exported(self, session_id: str) -> bool:
        return self.targets.is_exported(session_id)

    def connected(self) -> set[str]:
        return self.targets.connected()

    def _export(self, session_id, iqn, chap: Chap, allowed) -> Export:
        name = _session_image(session_id)
        self._break_stale_locks(session_id)
        try:
            return self.targets.export_rbd(session_id, self.pool, name, self.conf_path,
                                           self.client_id, iqn, chap, allowed)
        except ExportError as error:
            raise OverlayError(f"cannot export session {session_id}: {error}",
                               Reason.BUSY if "already exported" in str(error)
                               else Reason.FAILED) from None

    def _break_stale_locks(self, session_id: str) -> None:
        """The exclusive lock of a tgtd that was killed while serving the session stays
        until its watch times out (``osd_client_watch_timeout``, 30 s by default), and
        writes through the next tgtd wait for it: it is broken (and that client
        blocklisted) first. Only for a session whose tgtd is known dead: a live owner is
        never fenced."""
        if session_id not in self.targets.orphaned:
            return
        with self._ioctx(f"check session {session_id}'s lock") as ioctx:
            with self._image(ioctx, _session_image(session_id)) as image:
                for owner in image.lock_get_owners():
                    LOG.warning("session %s: breaking the stale lock of %s", session_id,
                                owner["owner"])
                    image.lock_break(owner["mode"], owner["owner"])
        self.targets.orphaned.discard(session_id)

    def _unexport(self, session_id) -> None:
        try:
            self.targets.unexport(session_id)
        except ExportError as error:
            LOG.warning("removing session %s's target: %s", session_id, error)

    def close(self) -> None:
        """tgtd first (it has the images open), then the cluster connection."""
        self.targets.close()
        self._disconnect()

    # -- save points --

    def list_saves(self, session_id: str) -> list[SavePoint]:
        with self._ioctx(f"list session {session_id}'s save points") as ioctx:
            with self._image(ioctx, _session_image(session_id)) as image:
                saves = []
                for snap in image.list_snaps():
                    parsed = parse_save_name(snap["name"])
                    if parsed:
                        created = image.get_snap_timestamp(snap["id"])
                        saves.append(SavePoint(session_id, snap["name"], parsed[1],
                                               created.replace(tzinfo=UTC)))
        return sorted(saves, key=lambda s: s.number)

    def _save(self, session_id, save_id) -> SavePoint:
        _, rbd = _libraries()
        with self._ioctx(f"save session {session_id}") as ioctx:
            with self._image(ioctx, _session_image(session_id)) as image:
                # No quiesce round (a notify every watcher must answer, for rbd-nbd's
                # freeze hooks): tgtd has none, and a watcher that died mid-save would hold
                # the image's I/O until its watch times out (30 s). The lock owner still
                # flushes its cache and blocks writes for the snapshot.
                image.create_snap(save_id, flags=rbd.RBD_SNAP_CREATE_SKIP_QUIESCE)
        LOG.info("session %s saved as %s", session_id, save_id)
        return next(s for s in self.list_saves(session_id) if s.save_id == save_id)

    def _revert(self, session_id, save_id) -> None:
        self._break_stale_locks(session_id)
        with self._ioctx(f"revert session {session_id}") as ioctx:
            with self._image(ioctx, _session_image(session_id)) as image:
                image.rollback_to_snap(save_id)
        LOG.info("session %s reverted to %s", session_id, save_id)

    def _reset(self, session_id) -> SessionDisk:
        """A new clone, swapped in by two renames (``.old`` marks a swap in progress, which
        ``sessions()`` finishes if this one is interrupted)."""
        _, rbd = _libraries()
        disk = self.describe(session_id)
        name = _session_image(session_id)
        self._break_stale_locks(session_id)
        with self._ioctx(f"reset session {session_id}") as ioctx:
            self._remove(ioctx, f"{name}.new")
            self._clone(ioctx, disk.template, disk.version, f"{name}.new")
            rbd.RBD().rename(ioctx, name, f"{name}.old")
            rbd.RBD().rename(ioctx, f"{name}.new", name)
            self._remove(ioctx, f"{name}.old")
        LOG.info("session %s reset to template %s version %d", session_id, disk.template,
                 disk.version)
        return self.describe(session_id)

    def _finish_reset(self, ioctx: Any, session_id: str, names: set[str]) -> None:
        _, rbd = _libraries()
        name = _session_image(session_id)
        if name not in names:
            rbd.RBD().rename(ioctx, f"{name}.new" if f"{name}.new" in names
                             else f"{name}.old", name)
        self._remove(ioctx, f"{name}.old")
        self._remove(ioctx, f"{name}.new")

    def _delete(self, session_id) -> None:
        self._break_stale_locks(session_id)
        with self._ioctx(f"delete session {session_id}") as ioctx:
            self._remove(ioctx, _session_image(session_id))
        LOG.info("session %s deleted", session_id)

    def _export_disk(self, session_id, dest, fmt, save_id, compress) -> None:
        """The image is opened here first: Ceph down or the image gone is then said as
        for every other step, within ``timeout``, rather than by qemu's rbd driver."""
        name = _session_image(session_id)
        with self._ioctx(f"copy session {session_id}") as ioctx:
            with self._image(ioctx, name, snapshot=save_id):
                pass
        options = {"id": self.client_id, "conf": str(self.conf_path.absolute()),
                   **self._timeouts(bulk=True)}
        source = f"rbd:{_rbd_escape(self.pool)}/{_rbd_escape(name)}" \
            + (f"@{_rbd_escape(save_id)}" if save_id else "") \
            + "".join(f":{key}={_rbd_escape(value)}" for key, value in options.items())
        argv = ["qemu-img", "convert", "-f", "raw", "-O", fmt, *(["-c"] if compress else []),
                source, str(dest.absolute())]
        try:
            result = subprocess.run(argv, capture_output=True, text=True)
        except FileNotFoundError:
            raise OverlayError(f"cannot copy session {session_id}: qemu-img is not "
                               "installed (qemu-utils)", Reason.UNAVAILABLE) from None
        if result.returncode != 0:
            said = (result.stderr or result.stdout).strip().splitlines()
            last = said[-1] if said else "qemu-img failed"
            unknown = "Unknown protocol 'rbd'" in last or "Unknown driver" in last
            raise OverlayError(f"cannot copy session {session_id}: {last}"
                               + ("; install the Debian package qemu-block-extra (qemu's rbd "
                                  "driver)" if unknown else ""),
                               Reason.UNAVAILABLE if unknown else Reason.FAILED)
        LOG.info("session %s%s copied to %s (%s)", session_id,
                 f" at {save_id}" if save_id else "", dest, fmt)

    def _changed_extents(self, session_id: str) -> list[tuple[int, int]]:
        """The clone's own extents (diff against nothing, without its parent)."""
        extents: list[tuple[int, int]] = []

        def add(offset: int, length: int, exists: bool) -> None:
            if extents and extents[-1][0] + extents[-1][1] == offset:
                extents[-1] = (extents[-1][0], extents[-1][1] + length)
            else:
                extents.append((offset, length))

        with self._ioctx(f"map session {session_id}", bulk=True) as ioctx:
            with self._image(ioctx, _session_image(session_id)) as image:
                image.diff_iterate(0, image.size(), None, add, include_parent=False)
        return sorted(extents)

    @contextlib.contextmanager
    def _blocks(self, session_id: str) -> Iterator[BlockIO]:
        with self._ioctx(f"read or write session {session_id}", bulk=True) as ioctx:
            with self._image(ioctx, _session_image(session_id)) as image:
                yield _RbdBlocks(image)

    def _remove(self, ioctx: Any, name: str) -> None:
        """Remove an image and its snapshots (save points are never protected)."""
        _, rbd = _libraries()
        try:
            with self._image(ioctx, name) as image:
                for snap in list(image.list_snaps()):
                    image.remove_snap(snap["name"])
        except rbd.ImageNotFound:
            return
        rbd.RBD().remove(ioctx, name)


def _rbd_escape(value: str) -> str:
    """A value in qemu's ``rbd:`` file name, where ':', '@' and '=' separate fields."""
    for special in "\\:@=":
        value = value.replace(special, "\\" + special)
    return value


def _data_chunks(source, size: int) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) of the file's chunks that hold anything but zeros: holes are skipped
    with SEEK_DATA/SEEK_HOLE, all-zero chunks are not sent."""
    fd = source.fileno()
    offset = 0
    while offset < size:
        try:
            offset = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: nothing but a hole up to the end
            return
        end = min(os.lseek(fd, offset, os.SEEK_HOLE), size)
        while offset < end:
            length = min(CHUNK - offset % CHUNK, end - offset)
            data = os.pread(fd, length, offset)
            if data.count(0) != len(data):
                yield offset, data
            offset += length


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labmetal.images.overlays.ceph")
    parser.add_argument("command", choices=["link-debian-modules"])
    parser.add_argument("--site-packages", help="default: this interpreter's")
    args = parser.parse_args(argv)
    for link in link_debian_modules(args.site_packages):
        print(f"{link} -> {os.readlink(link)}")
    _libraries()
    return 0


if __name__ == "__main__":
    sys.exit(main())


class _RbdBlocks:
    """An RBD image's bytes by offset (BlockIO)."""

    def __init__(self, image: Any) -> None:
        self.image = image

    def read(self, offset: int, length: int) -> bytes:
        data = self.image.read(offset, length)
        if len(data) != length:
            raise OverlayError(f"the session image ends at {offset + len(data)}")
        return data

    def write(self, offset: int, data: bytes) -> None:
        self.image.write(data, offset)

    def flush(self) -> None:
        self.image.flush()
