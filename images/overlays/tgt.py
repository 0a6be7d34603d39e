"""The iSCSI side of session disks: one private tgtd per storage server, one target per
exported session, each with its own CHAP account and its seat's initiator as the only one
allowed in. The daemon itself is agent/iscsi.py's ``TgtExporter`` (start, portal checks,
the stop dance: tgtd ignores SIGTERM).

What is added here: sessions by id (a second export of one is refused), a tgtd that died is
noticed (the next export starts a new one; the session's data is in its overlay, not in
tgtd), and LUNs backed by an RBD image (tgt's ``rbd`` backing store, Debian tgt-rbd).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from labmetal.agent.iscsi import Chap, Export, ExportError, TgtExporter
from labmetal.rundir import private_dir

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Served:
    iqn: str
    what: str  # for messages: the file or pool/image


class SessionTargets:
    """Targets for sessions on one portal (``portal_ip``:``port``)."""

    def __init__(self, run_dir: str | os.PathLike, portal_ip: str = "0.0.0.0",
                 port: int = 3260, stop_timeout: float = 15.0):
        self.run_dir = Path(run_dir)
        self.portal_ip = portal_ip
        self.port = port
        self.stop_timeout = stop_timeout
        self._exporter: TgtExporter | None = None
        self._served: dict[str, _Served] = {}
        self.orphaned: set[str] = set()  # served by a tgtd that died, not exported since

    @property
    def pid(self) -> int | None:
        return self._exporter.pid if self._exporter else None

    def is_exported(self, session_id: str) -> bool:
        self._forget_dead_tgtd()
        return session_id in self._served

    def exported(self) -> list[str]:
        self._forget_dead_tgtd()
        return list(self._served)

    def export_file(self, session_id: str, path: str | os.PathLike, iqn: str, chap: Chap,
                    allowed: list[str]) -> Export:
        """A file (or block device) as LUN 1, tgt's ``rdwr`` backing store."""
        return self._export(session_id, iqn, str(path),
                            lambda: self._export_file(self._exporter_started(), path, iqn,
                                                      allowed, chap))

    def export_rbd(self, session_id: str, pool: str, image: str, conf_path: str | os.PathLike,
                   client_id: str, iqn: str, chap: Chap, allowed: list[str]) -> Export:
        """An RBD image as LUN 1, through tgt's ``rbd`` backing store (bs_rbd.so, which
        tgtd loads from /usr/lib/tgt/backing-store/)."""
        if not Path("/usr/lib/tgt/backing-store/bs_rbd.so").exists():
            raise ExportError("tgtd has no rbd backing store: install the Debian package "
                              "tgt-rbd")
        return self._export(session_id, iqn, f"{pool}/{image}",
                            lambda: self._exporter_started().export(
                                f"{pool}/{image}", iqn, self.portal_ip, self.port,
                                allowed_initiators=allowed, chap=chap, bstype="rbd",
                                bsopts=f"conf={conf_path};id={client_id}"))

    def admit_only(self, session_id: str, address: str) -> None:
        """The session's target lets in ``address`` alone from now on (TgtExporter)."""
        self._forget_dead_tgtd()
        served = self._served.get(session_id)
        if served is None or self._exporter is None:
            raise ExportError(f"session {session_id} is not exported")
        self._exporter.admit_only(served.iqn, address)

    def connected(self) -> set[str]:
        """The sessions a seat is logged in to now."""
        self._forget_dead_tgtd()
        if self._exporter is None:
            return set()
        logged_in = {iqn for iqn, initiators in self._exporter.connected().items()
                     if initiators}
        return {session for session, served in self._served.items()
                if served.iqn in logged_in}

    def unexport(self, session_id: str) -> None:
        """Remove the session's target (and its CHAP account); nothing if not exported."""
        self._forget_dead_tgtd()
        served = self._served.get(session_id)
        if served is None or self._exporter is None:
            self._served.pop(session_id, None)
            return
        self._exporter.unexport(served.iqn)  # raises if tgtd did not remove it: still served
        del self._served[session_id]
        LOG.info("session %s is no longer exported (%s)", session_id, served.iqn)

    def close(self) -> None:
        """Stop tgtd (every target with it). Call before stopping what backs the LUNs."""
        exporter, self._exporter = self._exporter, None
        self._served.clear()
        if exporter is not None:
            exporter.close()

    # -- internals --

    def _export(self, session_id: str, iqn: str, what: str,
                make: Callable[[], Export]) -> Export:
        self._forget_dead_tgtd()
        if session_id in self._served:
            raise ExportError(f"session {session_id} is already exported as "
                              f"{self._served[session_id].iqn}")
        export = make()
        self._served[session_id] = _Served(iqn, what)
        self.orphaned.discard(session_id)
        LOG.info("session %s (%s) exported as %s on %s, LUN %d", session_id, what, iqn,
                 export.portal, export.lun)
        return export

    def _export_file(self, exporter: TgtExporter, path: str | os.PathLike, iqn: str,
                     allowed: list[str], chap: Chap) -> Export:
        return exporter.export(path, iqn, self.portal_ip, self.port,
                               allowed_initiators=allowed, chap=chap)

    def _exporter_started(self) -> TgtExporter:
        if self._exporter is None:
            # tgtd's control socket, pid file and log: a private run directory, as
            # root kills the pid it finds there and writes where the log path leads.
            self.run_dir = private_dir(self.run_dir)
            self._exporter = TgtExporter(self.run_dir, stop_timeout=self.stop_timeout)
        return self._exporter

    def _forget_dead_tgtd(self) -> None:
        """tgtd killed or crashed: its targets are gone. Forget them, so the sessions can be
        exported again (by a new tgtd: TgtExporter starts one at the next export)."""
        exporter = self._exporter
        if exporter is None or exporter.pid is None or process_alive(exporter.pid):
            return
        LOG.warning("tgtd (pid %d) is gone; sessions %s are no longer exported", exporter.pid,
                    ", ".join(self._served) or "(none)")
        self.orphaned.update(self._served)
        self._served.clear()
        self._exporter = None
        exporter.close()  # reaps it, removes its socket files


def process_alive(pid: int) -> bool:
    """Running, not a zombie (a killed child stays in /proc until reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
