"""TFTP for the small boot files (iPXE binaries, per-MAC configs), with tftpy.

tftpy opens files itself, following symlinks out of its root, and anything it did not
expect (a directory, a permission error, an undecodable packet, a failing cleanup) kills
its ``listen()``. So tftpy gets an empty private root and finds nothing there: every read
goes through :meth:`TftpService.open_for_client`, which refuses ``..``, directories and
symlinks that leave the real root, and asks ``render`` for files made per request; the
listener runs under a supervisor that starts it again if it dies anyway. Uploads are
refused (tftpy allows them by default).

    python -m labmetal.pxe.tftp --root DIR --listen IP:PORT   # e.g. inside a room's netns
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import BinaryIO, Callable

import tftpy

from labmetal.config import split_host_port

LOG = logging.getLogger(__name__)

IPXE_DIR = Path("/usr/lib/ipxe")
IPXE_BINARIES = ("undionly.kpxe", "ipxe.efi", "snponly.efi")
# The Secure Boot chain (Debian packages shim-signed, grub-efi-amd64-signed) under the names
# it is loaded by: the PC's firmware loads shimx64.efi, which loads grubx64.efi from the
# same folder.
SECURE_BOOT_LOADERS = {
    "shimx64.efi": Path("/usr/lib/shim/shimx64.efi.signed"),
    "grubx64.efi": Path("/usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed"),
}
# tftpy's default is 5 s, a long stall per lost packet on a LAN; tftpd-hpa starts at 1 s.
RETRANSMIT_TIMEOUT = 1.0
RETRIES = 5  # consecutive timeouts before a transfer is dropped (a client that went away)
RESTART_DELAY = 0.2
READ_BUFFER = 1 << 20  # one read() per 128 blocks of 8 KiB instead of one per block

# render(path, client_ip) -> the file's bytes, or a file to serve, or None if it is not a
# rendered file.
Render = Callable[[str, str], bytes | Path | None]


def install_ipxe_binaries(root: Path, source: Path = IPXE_DIR,
                          names: tuple[str, ...] = IPXE_BINARIES) -> list[Path]:
    """Copy the iPXE binaries PXE ROMs chain-load (Debian package ``ipxe``) into ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in names:
        target = root / name
        shutil.copyfile(source / name, target)
        copied.append(target)
    return copied


def install_secure_boot_loaders(root: Path,
                                loaders: dict[str, Path] = SECURE_BOOT_LOADERS) -> list[str]:
    """Copy Debian's signed shim and network GRUB into ``root``; returns the names of those
    missing on this machine (UEFI PCs with Secure Boot on cannot boot without them)."""
    root.mkdir(parents=True, exist_ok=True)
    missing = []
    for name, source in loaders.items():
        if source.is_file():
            shutil.copyfile(source, root / name)
        else:
            missing.append(f"{name} ({source})")
    return missing


def requested_path(filename: str) -> str | None:
    """The path below the root a client asked for, or None if it tries to leave the root.
    Leading slashes are dropped: PXE ROMs ask for ``/undionly.kpxe`` as often as not."""
    parts = [part for part in filename.replace("\\", "/").split("/") if part not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def _memory_file(data: bytes) -> BinaryIO:
    """A real file (tftpy locks and names what it serves; BytesIO makes it crash)."""
    fd = os.memfd_create("labmetal-tftp", 0)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return os.fdopen(fd, "rb")


class _Transfers(dict):
    """tftpy's table of transfers in progress (``TftpServer.sessions``), putting each new
    transfer's socket in blocking mode. tftpy gives it a timeout, which makes CPython
    poll() before every send and receive: two more system calls per block, and ~1.4x
    less throughput. Blocking is safe: tftpy's server reads a transfer's socket only when
    select() said a packet is waiting, and times transfers out itself."""

    def __setitem__(self, key: str, context: tftpy.TftpContexts.TftpContextServer) -> None:
        context.sock.setblocking(True)
        super().__setitem__(key, context)


class _Server(tftpy.TftpServer):
    def __init__(self, *args: object, **kwargs: object):
        super().__init__(*args, **kwargs)
        self.sessions = _Transfers()


class TftpService:
    """Serves ``root`` (and what ``render`` makes) read-only on ``address:port``."""

    def __init__(self, root: Path, render: Render | None = None, address: str = "0.0.0.0",
                 port: int = 69, retransmit_timeout: float = RETRANSMIT_TIMEOUT,
                 retries: int = RETRIES):
        self.root = Path(root).resolve()
        self.render = render
        self.address = address
        self.port = port
        self.retransmit_timeout = retransmit_timeout
        self.retries = retries
        self.restarts = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._start_error: BaseException | None = None
        self._empty_root: str | None = None

    def open_for_client(self, filename: str, raddress: str = "", rport: int = 0,
                        **_: object) -> BinaryIO | None:
        """tftpy's ``dyn_file_func``: a regular file inside the root (symlinks allowed if
        they stay inside), else what ``render`` makes of the path, else None (not found)."""
        path = requested_path(filename)
        if path is None:
            LOG.warning("refused %r from %s: outside the TFTP root", filename, raddress)
            return None
        try:
            real = (self.root / path).resolve()
            if not real.is_relative_to(self.root):
                LOG.warning("refused %r from %s: a link out of the TFTP root", filename,
                            raddress)
                return None
            if real.is_file():
                return open(real, "rb", buffering=READ_BUFFER)
            if real.exists():  # a directory, a device
                return None
            data = self.render(path, raddress) if self.render else None
        except Exception:  # a failing render or file must not reach tftpy's loop
            LOG.exception("serving %r to %s failed", filename, raddress)
            return None
        if isinstance(data, Path):
            return open(data, "rb", buffering=READ_BUFFER)
        return None if data is None else _memory_file(data)

    @property
    def listening(self) -> bool:
        server = self._server
        return server is not None and server.is_running.is_set()

    @property
    def transfers(self) -> int:
        """Transfers in progress, including those waiting for a client that went away."""
        server = self._server
        return len(server.sessions) if server is not None else 0

    @staticmethod
    def _refuse_upload(path: str, context: object) -> None:
        LOG.warning("refused an upload to %s", path)
        return None

    def start(self) -> TftpService:
        """Listen in a background thread; returns once the socket is bound (``port`` 0
        becomes the port actually bound) or raises what binding raised."""
        logging.getLogger("tftpy").setLevel(logging.WARNING)  # INFO is per session
        self._empty_root = tempfile.mkdtemp(prefix="labmetal-tftp-empty-")
        self._thread = threading.Thread(target=self._supervise, name="tftp", daemon=True)
        self._thread.start()
        while not self.listening:
            if not self._thread.is_alive():
                self._remove_empty_root()
                raise self._start_error or RuntimeError("the TFTP server did not start")
            time.sleep(0.01)
        self.port = self._server.listenport
        return self

    def _supervise(self) -> None:
        first = True
        while not self._stopping.is_set():
            server = _Server(self._empty_root, dyn_file_func=self.open_for_client,
                             upload_open=self._refuse_upload)
            self._server = server
            try:
                server.listen(self.address, self.port, timeout=self.retransmit_timeout,
                              retries=self.retries)
            except Exception as error:
                if first and server.listenport is None:
                    self._start_error = error  # could not bind: start() raises it
                    return
                LOG.exception("the TFTP server died; starting it again")
                self.restarts += 1
                _close_server(server)
                time.sleep(RESTART_DELAY)
            if server.listenport:
                self.port = server.listenport  # the same port again after a restart
            first = False

    def stop(self) -> None:
        """Drop the transfers in progress and stop listening (within the retransmit
        timeout: tftpy looks at its stop flag between packets and timeouts)."""
        self._stopping.set()
        if self._server is not None:
            self._server.stop(now=True)
        if self._thread is not None:
            self._thread.join(timeout=self.retransmit_timeout + 5)
        self._remove_empty_root()

    def _remove_empty_root(self) -> None:
        if self._empty_root:
            shutil.rmtree(self._empty_root, ignore_errors=True)
            self._empty_root = None

    def __enter__(self) -> TftpService:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _close_server(server: _Server) -> None:
    """What a dead listen() leaves open: its socket and its sessions' sockets and files."""
    for context in list(server.sessions.values()):
        try:
            context.end()
        except Exception:
            LOG.debug("closing a session of the dead TFTP server failed", exc_info=True)
    server.sessions.clear()
    if server.sock is not None:
        server.sock.close()
    server.is_running.clear()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labmetal.pxe.tftp",
                                     description="Serve a directory read-only over TFTP.")
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--listen", default="0.0.0.0:69", help="IP:PORT (default 0.0.0.0:69)")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s tftp %(message)s")
    address, port = split_host_port(args.listen)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    service = TftpService(args.root, address=address, port=port).start()
    print(f"serving {service.root} over TFTP on {address}:{service.port}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        service.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
