"""The conductor's side of the `iscsi` deploy path (DESIGN §4): write an image onto a seat's
exported disk, or capture a reference seat's disk as a new image, with qemu-img's userspace
iSCSI initiator (libiscsi) — no kernel session, no device node on the conductor.

Every problem that can be found before writing is found first (image unreadable or with a
backing file, portal unreachable, login refused, disk too small), so a refused write leaves
the seat's disk untouched. A CHAP secret reaches qemu-img through a pipe as a secret object,
never on its command line: the `iscsi://user%secret@...` URL form would show it to `ps`, and
qemu-img echoes it back in its own messages.
"""
from __future__ import annotations

import json
import logging
import os
import re
import select
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from labmetal.agent.iscsi import Chap

LOG = logging.getLogger(__name__)

# (bytes done, bytes in all), as the deploy step records it; from qemu-img's 1 % steps
ProgressCallback = Callable[[int, int], None]
_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")
_SECRET_ID = "chap"


class IscsiWriteError(Exception):
    """The write or capture did not happen or did not finish; the message says why."""


@dataclass(frozen=True)
class IscsiTarget:
    """One LUN of an iSCSI target, as qemu-img's iscsi block driver addresses it."""
    portal: str  # "host:port" or "[v6]:port"
    iqn: str
    lun: int
    chap: Chap | None = None

    @property
    def url(self) -> str:
        """For messages and logs: the user, never the secret."""
        user = f"{self.chap.user}@" if self.chap else ""
        return f"iscsi://{user}{self.portal}/{self.iqn}/{self.lun}"

    def image_opts(self) -> str:
        opts = {"driver": "iscsi", "transport": "tcp", "portal": self.portal,
                "target": self.iqn, "lun": str(self.lun)}
        if self.chap:
            opts.update({"user": self.chap.user, "password-secret": _SECRET_ID})
        return ",".join(f"{key}={value.replace(',', ',,')}" for key, value in opts.items())

    def check_reachable(self, timeout: float = 10.0) -> None:
        host, _, port = self.portal.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
        except OSError as error:
            raise IscsiWriteError(f"cannot reach the iSCSI portal {self.portal} "
                                  f"({error.strerror or error}); is the seat's export "
                                  "running?") from None


@dataclass(frozen=True)
class Transfer:
    size: int  # bytes of the image (write) or of the disk (capture)
    seconds: float

    @property
    def mib_per_second(self) -> float:
        return self.size / 2**20 / self.seconds if self.seconds else 0.0


def write_image_over_iscsi(image_path: str | os.PathLike, image_format: str, portal: str,
                           iqn: str, lun: int, target_is_zero: bool,
                           progress_callback: ProgressCallback | None = None,
                           chap: Chap | None = None, stall_timeout: float = 300.0) -> Transfer:
    """Write the image's raw content to the start of the LUN.

    ``target_is_zero``: the disk is known to read as zeros (a fresh or wiped disk), so
    qemu-img skips the image's zero blocks instead of writing them over the network.
    Success is reported only after the target has flushed (``-t writeback``).
    ``stall_timeout``: the longest wait for the login or for one percent of progress.
    """
    target = IscsiTarget(portal, iqn, lun, chap)
    image = _image_info(Path(image_path), image_format)
    size = image["virtual-size"]
    disk_size = _lun_size(target, stall_timeout)
    if disk_size < size:
        raise IscsiWriteError(f"the disk behind {target.url} ({disk_size} bytes) is smaller "
                              f"than the image {Path(image_path).name} ({size} bytes); "
                              "nothing was written")
    argv = ["qemu-img", "convert", "-p", "-n", "-t", "writeback", "-f", image_format,
            *(["--target-is-zero"] if target_is_zero else []), str(image_path),
            "--target-image-opts", target.image_opts()]
    LOG.info("writing %s (%s, %d bytes) to %s%s", image_path, image_format, size, target.url,
             ", skipping zeros" if target_is_zero else "")
    seconds = _run_qemu_img(argv, chap, progress_callback, size, stall_timeout,
                            f"writing to {target.url}")
    LOG.info("wrote %d bytes to %s in %.1f s", size, target.url, seconds)
    return Transfer(size, seconds)


def capture_over_iscsi(portal: str, iqn: str, lun: int, dest_path: str | os.PathLike,
                       progress_callback: ProgressCallback | None = None,
                       chap: Chap | None = None, stall_timeout: float = 300.0) -> Transfer:
    """Read the whole LUN into a raw file, sparse where the disk holds runs of zeros."""
    target = IscsiTarget(portal, iqn, lun, chap)
    size = _lun_size(target, stall_timeout)
    argv = ["qemu-img", "convert", "-p", "-t", "writeback", "-O", "raw", "-S", "4k",
            "--image-opts", target.image_opts(), str(dest_path)]
    LOG.info("capturing %s (%d bytes) into %s", target.url, size, dest_path)
    seconds = _run_qemu_img(argv, chap, progress_callback, size, stall_timeout,
                            f"reading {target.url}")
    LOG.info("captured %d bytes from %s in %.1f s", size, target.url, seconds)
    return Transfer(size, seconds)


def _image_info(path: Path, image_format: str) -> dict:
    """The image's own description, with its format pinned (no probing) and no external
    files: a qcow2 naming a backing or data file would make qemu-img read it."""
    result = subprocess.run(["qemu-img", "info", "--output=json", "-f", image_format, str(path)],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise IscsiWriteError(f"cannot read the image {path} as {image_format}: "
                              f"{_last_line(result.stderr)}")
    info = json.loads(result.stdout)
    data_file = info.get("format-specific", {}).get("data", {}).get("data-file")
    if info.get("backing-filename") or data_file:
        raise IscsiWriteError(f"the image {path} refers to another file "
                              f"({info.get('backing-filename') or data_file}); refusing it")
    return info


def _lun_size(target: IscsiTarget, timeout: float) -> int:
    target.check_reachable()
    argv = ["qemu-img", "info", "--output=json", "--image-opts", target.image_opts()]
    with _secret_object(target.chap) as (secret_args, secret_fds):
        try:
            result = subprocess.run(argv[:2] + secret_args + argv[2:], pass_fds=secret_fds,
                                    capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise IscsiWriteError(f"{target.url} did not answer the login within {timeout:g} "
                                  "s; is the seat still up?") from None
    if result.returncode != 0:
        raise IscsiWriteError(_explain(result.stderr, target))
    return json.loads(result.stdout)["virtual-size"]


def _explain(stderr: str, target: IscsiTarget) -> str:
    if "Authentication failure" in stderr:
        return (f"login to {target.url} refused: "
                + ("wrong CHAP user or secret" if target.chap else "the target requires CHAP"))
    if "Target not found" in stderr:
        return (f"no target {target.iqn} on {target.portal}, or this initiator is not in "
                "its allowed initiators")
    if "Can not reconnect" in stderr:  # libiscsi, when the target closes the login
        return (f"{target.portal} closed the connection at login: no target exported "
                "there (tgtd with no target does this), or the link failed")
    if "LOGICAL_UNIT_NOT_SUPPORTED" in stderr:
        return f"target {target.iqn} has no LUN {target.lun}"
    if "Authorization failure" in stderr:
        return f"{target.url} does not allow this initiator (ACL)"
    return f"cannot open {target.url}: {_last_line(stderr)}"


def _run_qemu_img(argv: list[str], chap: Chap | None, progress: ProgressCallback | None,
                  total: int, stall_timeout: float, what: str) -> float:
    """Run a qemu-img convert, passing its -p percentages on to ``progress`` as bytes of
    ``total``, and kill it when no step (1 %) comes for ``stall_timeout`` seconds: a seat
    that stops answering leaves libiscsi waiting forever."""
    started = time.monotonic()
    with _secret_object(chap) as (secret_args, secret_fds), tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(argv[:2] + secret_args + argv[2:], pass_fds=secret_fds,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=errors)
        assert process.stdout is not None
        output, last, buffer = process.stdout.fileno(), -1, b""
        try:
            while chunk := _read_within(output, stall_timeout, what):
                *lines, buffer = re.split(rb"[\r\n]", buffer + chunk)
                for match in filter(None, map(_PROGRESS.search, lines)):
                    done = round(total * float(match[1]) / 100)
                    if progress and done != last:
                        last = done
                        progress(done, total)
        except BaseException:
            process.kill()
            raise
        finally:
            returncode = process.wait()
            process.stdout.close()
        errors.seek(0)
        stderr = errors.read().decode(errors="replace")
    if returncode != 0:
        raise IscsiWriteError(f"qemu-img failed {what}: {_last_line(stderr)}")
    return time.monotonic() - started


def _read_within(fd: int, timeout: float, what: str) -> bytes:
    if not select.select([fd], [], [], timeout)[0]:
        raise IscsiWriteError(f"no progress for {timeout:g} s {what}; is the seat still up?")
    return os.read(fd, 4096)


@contextmanager
def _secret_object(chap: Chap | None) -> Iterator[tuple[list[str], tuple[int, ...]]]:
    """qemu-img arguments and the fd to pass for a secret object read from a pipe: the
    secret is in no argv and no file."""
    if chap is None:
        yield [], ()
        return
    read_fd, write_fd = os.pipe()
    try:
        with os.fdopen(write_fd, "w") as writer:  # far below the pipe's buffer
            writer.write(chap.secret)
        yield ["--object", f"secret,id={_SECRET_ID},file=/dev/fd/{read_fd}"], (read_fd,)
    finally:
        os.close(read_fd)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"
