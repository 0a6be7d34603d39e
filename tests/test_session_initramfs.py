"""labmetal's session initramfs boots a TP template from a seat's cache region (issue 16).

The template is lab/osimage's local TP disk (an ordinary Debian-like install); the
session boot (its own kernel, labmetal's initramfs) comes from images/session_initramfs.
A seat disk file holds the cache region at its end: the header, the template copy (the
origin) and an empty persistent-snapshot COW store. QEMU boots the kernel directly with
the command line labmetal's boot scripts give; the tests talk to the template's shell on
the serial line (a unix socket) and read the seat disk afterwards.

Slow tier: QEMU under TCG, each boot about 10-20 s. The template build reuses
$LABMETAL_OSIMAGE_CACHE if set (else a temporary cache, downloading the kernel package).
"""
from __future__ import annotations

import hashlib
import secrets
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from labmetal.images.session_initramfs import (SessionBoot, SessionBootError, build,
                                               parse_modules_dep, resolve)
from labmetal.lab.osimage import LocalTpImage, build_local_tp_disk, local_tp_marker
from tests.test_osimage import cache  # noqa: F401  (the same module-wide cache fixture)

QEMU = "qemu-system-x86_64"
MIB = 1024 * 1024
SECTOR = 512
SEAT_SIZE = 512 * MIB
CACHE_START = 256 * MIB  # the cache region: the seat disk's last 256 MiB
ORIGIN_OFFSET = MIB  # from the cache start
COW_SIZE = 64 * MIB
CHUNK = 16  # sectors: 8 KiB chunks
BOOT_TIMEOUT = 180  # TCG on 2 shared cores: a boot takes 10-20 s when the machine is idle
NAME = "tp-local-session"

needs_qemu = pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"no {QEMU}")


@pytest.fixture(scope="module")
def template(cache: Path) -> LocalTpImage:  # noqa: F811
    return build_local_tp_disk(NAME, cache)


@pytest.fixture(scope="module")
def session_boot(template: LocalTpImage, tmp_path_factory) -> SessionBoot:
    return build(template.path, tmp_path_factory.mktemp("session-boot"))


class Seat:
    """A seat disk file with a labmetal cache region: header, origin, COW store."""

    def __init__(self, path: Path, template: Path, boot: SessionBoot):
        self.path = path
        self.cache_id = secrets.token_hex(16)
        self.template_size = template.stat().st_size
        self.origin = ORIGIN_OFFSET // SECTOR, self.template_size // SECTOR
        self.cow = self.origin[0] + self.origin[1], COW_SIZE // SECTOR
        self.root = boot.root_offset // SECTOR, boot.root_size // SECTOR
        with open(path, "wb") as disk:
            disk.truncate(SEAT_SIZE)
            disk.seek(CACHE_START)
            disk.write(b"LABMETAL-CACHE01" + self.cache_id.encode())
            disk.seek(CACHE_START + ORIGIN_OFFSET)
            with open(template, "rb") as source:
                shutil.copyfileobj(source, disk, MIB)
            disk.seek(CACHE_START + self.cow[0] * SECTOR)
            disk.write(bytes(2 * CHUNK * SECTOR))  # a new store: the kernel writes its header

    def cmdline(self, cache_id: str | None = None) -> str:
        return (f"console=ttyS0 panic=-1 labmetal.cache={cache_id or self.cache_id}"
                f"@{CACHE_START // SECTOR} labmetal.origin={self.origin[0]}+{self.origin[1]} "
                f"labmetal.cow={self.cow[0]}+{self.cow[1]} labmetal.chunk={CHUNK} "
                f"labmetal.root={self.root[0]}+{self.root[1]} labmetal.fstype=ext4 ro")

    def read(self, sector: int, count: int) -> bytes:
        with open(self.path, "rb") as disk:
            disk.seek(CACHE_START + sector * SECTOR)
            return disk.read(count * SECTOR)


class Guest:
    """QEMU booting the session kernel directly, its serial line on a unix socket (QEMU
    waits for us to connect, so nothing it prints is lost); everything read is kept."""

    def __init__(self, workdir: Path, boot: SessionBoot, seat: Seat, cmdline: str):
        self.socket_path = workdir / f"serial-{secrets.token_hex(4)}.sock"
        self.output = bytearray()
        self._lock = threading.Condition()
        self.process = subprocess.Popen(
            [QEMU, "-accel", "tcg", "-m", "1024", "-display", "none", "-monitor", "none",
             "-no-reboot", "-nodefaults", "-kernel", str(boot.kernel),
             "-initrd", str(boot.initramfs), "-append", cmdline,
             "-drive", f"file={seat.path},format=raw,if=virtio",
             "-chardev", f"socket,id=serial,path={self.socket_path},server=on,wait=on",
             "-serial", "chardev:serial"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.started = time.monotonic()
        deadline = time.monotonic() + 30
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(self.socket_path))
                break
            except OSError as error:
                self.sock.close()
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.kill()
                    raise RuntimeError(f"QEMU's serial socket never came: "
                                       f"{self._qemu_log()}") from error
                time.sleep(0.05)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                data = b""
            with self._lock:
                if not data:
                    self.output += b"\n[serial closed]\n"
                    self._lock.notify_all()
                    return
                self.output += data
                self._lock.notify_all()

    def text(self) -> str:
        with self._lock:
            return self.output.decode(errors="replace")

    def wait_for(self, wanted: str, timeout: float = BOOT_TIMEOUT) -> float:
        """Seconds since QEMU started when ``wanted`` appeared on the serial line."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while wanted.encode() not in self.output:
                if b"[serial closed]" in self.output[-20:] or time.monotonic() > deadline:
                    raise AssertionError(f"{wanted!r} never appeared; serial:\n"
                                         + self.output.decode(errors="replace")[-3000:])
                self._lock.wait(0.5)
        return time.monotonic() - self.started

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\n")

    def shell(self, timeout: float = 60) -> None:
        """Wait until the template's shell on ttyS0 answers."""
        deadline = time.monotonic() + timeout
        while True:
            self.send('echo shell-""ready')
            try:
                self.wait_for("shell-ready", 2)
                return
            except AssertionError:
                if time.monotonic() > deadline:
                    raise

    def wait_exit(self, timeout: float = 60) -> int:
        return self.process.wait(timeout)

    def _qemu_log(self) -> str:
        if self.process.poll() is None:
            return "(QEMU running)"
        assert self.process.stdout is not None
        return self.process.stdout.read().decode(errors="replace")[-2000:]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.sock.close()
        self.socket_path.unlink(missing_ok=True)


def _sha256_range(path: Path, offset: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        stream.seek(offset)
        left = size
        while left:
            block = stream.read(min(MIB, left))
            assert block, "short read"
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


@needs_qemu
def test_a_session_writes_to_its_cow_store_only_and_keeps_it_across_boots(
        template: LocalTpImage, session_boot: SessionBoot, tmp_path: Path):
    seat = Seat(tmp_path / "seat.img", template.path, session_boot)
    token = f"hello-{secrets.token_hex(6)}"
    marker = local_tp_marker(NAME, "/dev/mapper/lm-root")

    first = Guest(tmp_path, session_boot, seat, seat.cmdline())
    try:
        assembled = first.wait_for("labmetal-session: root assembled on /dev/vda")
        booted = first.wait_for(marker)
        first.shell()
        first.send(f"echo {token} > /home/f; sync; echo writ\"\"ten; poweroff -f")
        first.wait_for("written")
        assert first.wait_exit() == 0
    finally:
        first.kill()
    print(f"first boot: root assembled at {assembled:.1f} s, template marker at {booted:.1f} s")

    origin_offset = CACHE_START + seat.origin[0] * SECTOR
    assert _sha256_range(seat.path, origin_offset, seat.template_size) \
        == _sha256_range(template.path, 0, seat.template_size)
    assert seat.read(seat.cow[0], 1)[:4] == b"SnAp"

    second = Guest(tmp_path, session_boot, seat, seat.cmdline())
    try:
        second.wait_for(marker)
        second.shell()
        second.send("cat /home/f")
        again = second.wait_for(token)
        second.send("poweroff -f")
        assert second.wait_exit() == 0
    finally:
        second.kill()
    print(f"second boot: the file read back at {again:.1f} s")
    assert _sha256_range(seat.path, origin_offset, seat.template_size) \
        == _sha256_range(template.path, 0, seat.template_size)


@needs_qemu
def test_a_cache_id_that_no_disk_has_is_said_on_the_console(
        template: LocalTpImage, session_boot: SessionBoot, tmp_path: Path):
    seat = Seat(tmp_path / "seat.img", template.path, session_boot)
    guest = Guest(tmp_path, session_boot, seat,
                  seat.cmdline(cache_id="0" * 32) + " labmetal.wait=3")
    try:
        guest.wait_for(f"labmetal-session: no disk has the labmetal cache {'0' * 32} "
                       f"at sector {CACHE_START // SECTOR}")
    finally:
        guest.kill()
    assert "root assembled" not in guest.text()
    assert seat.read(seat.cow[0], 1)[:4] == bytes(4)  # no snapshot was made


def test_the_session_boot_is_the_templates_kernel_and_its_root_partition(
        template: LocalTpImage, session_boot: SessionBoot):
    assert session_boot.fstype == "ext4"
    assert (session_boot.root_offset, session_boot.root_size) == (MIB, 63 * MIB)
    assert session_boot.kernel.name == f"vmlinuz-{session_boot.version}"
    assert session_boot.initramfs.read_bytes()[:2] == b"\x1f\x8b"  # gzip: any kernel reads it


def test_a_template_without_modules_cannot_boot_a_session(tmp_path: Path,
                                                          template: LocalTpImage):
    broken = tmp_path / "broken.img"
    shutil.copyfile(template.path, broken)
    version = build(template.path, tmp_path / "ok").version
    # unlink the modules directory's tables: the template then has a kernel and no modules
    for table in ("modules.dep", "modules.builtin"):
        subprocess.run(["debugfs", "-w", "-R", f"rm /lib/modules/{version}/{table}",
                        f"{broken}?offset={MIB}"], check=True, capture_output=True)
    with pytest.raises(SessionBootError, match=f"no /lib/modules/{version} in the template"):
        build(broken, tmp_path / "out")


@pytest.mark.fast
def test_modules_dep_paths_from_the_image_are_checked_and_dependencies_come_first():
    dep = parse_modules_dep(
        "kernel/drivers/md/dm-snapshot.ko.xz: kernel/drivers/md/dm-bufio.ko.xz "
        "kernel/drivers/md/dm-mod.ko.xz\n"
        "kernel/drivers/md/dm-mod.ko.xz:\n"
        "kernel/drivers/md/dm-bufio.ko.xz: kernel/drivers/md/dm-mod.ko.xz\n"
        "kernel/evil.ko: ../../../etc/shadow.ko\n"
        "/etc/passwd.ko:\n"
        "kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/lib/crc16.ko\n")
    assert "evil" not in dep and "passwd" not in dep
    order = [module.name for module in
             resolve(dep, {"virtio_blk"}, ("dm_snapshot", "ext4", "virtio_blk", "nvme"))]
    assert order == ["dm_mod", "dm_bufio", "dm_snapshot", "crc16", "jbd2", "ext4"]
