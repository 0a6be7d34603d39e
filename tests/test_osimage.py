"""The lab's test OS images: a seat boots each kind the way labmetal deploys it and says on its
serial port which image it is, its MAC address and (partition image) the root it mounted.

The images are built once per module, in LABMETAL_OSIMAGE_CACHE if set (kept across runs),
else in a temporary cache removed afterwards. Seats boot copies, never the cache's files.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
import requests

from labmetal.agent import bootloader
from labmetal.agent.disk import as_block_device
from labmetal.agent.partition import START, disk_needed, make_root_partition
from labmetal.lab.osimage import (MissingToolError, PartitionImage, WholeDiskImage,
                                  build_partition, build_whole_disk, marker_line)

MAC = "52:54:00:aa:bb:cc"
WHOLE_DISK_NAME, PARTITION_NAME = "lab-whole", "lab-part"
SIGNATURE = 0x1ABE1ED0  # the test disk's msdos signature: root=PARTUUID=1abe1ed0-01
# seconds; only so that a broken image fails instead of hanging (OVMF, shim and GRUB under
# TCG on a loaded machine)
BOOT_DEADLINE = 300


@pytest.fixture(scope="module")
def cache() -> Iterator[Path]:
    configured = os.environ.get("LABMETAL_OSIMAGE_CACHE")
    if configured:
        yield Path(configured)
        return
    with tempfile.TemporaryDirectory(prefix="labmetal-osimage-cache-") as directory:
        yield Path(directory)


@pytest.fixture(scope="module")
def whole_disk(cache: Path) -> WholeDiskImage:
    return build_whole_disk(WHOLE_DISK_NAME, cache)


@pytest.fixture(scope="module")
def partition(cache: Path) -> PartitionImage:
    return build_partition(PARTITION_NAME, cache)


@pytest.fixture
def scratch() -> Iterator[Path]:
    """Seat disks and serial logs, removed after the test whatever happened."""
    with tempfile.TemporaryDirectory(prefix="labmetal-osimage-") as directory:
        yield Path(directory)


ESCAPES = re.compile(r"\x1b\[[0-9;=?]*[A-Za-z]")  # OVMF and GRUB draw on the serial console


def boot_console(scratch: Path, nic: str, *qemu_args: str, mac: str = MAC
                 ) -> tuple[str, str]:
    """Power a seat on (``nic``: its -device, e.g. ``virtio-net-pci`` or ``e1000e,romfile=``)
    and return the first complete ``labmetal-os:`` line on its serial port and everything
    before it. QEMU is killed by its PID as soon as the line is there, or on failure."""
    log = scratch / "serial.log"
    started = time.monotonic()
    name, _, options = nic.partition(",")
    with open(log, "wb") as output:
        qemu = subprocess.Popen(
            ["qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-nographic", "-no-reboot",
             "-netdev", "user,id=n0,restrict=on",
             "-device", ",".join(filter(None, (name, "netdev=n0", f"mac={mac}", options))),
             *qemu_args],
            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        while True:
            text = ESCAPES.sub("", log.read_text(errors="replace")).replace("\r", "")
            complete = text.split("\n")[:-1]
            for number, line in enumerate(complete):
                if "labmetal-os:" in line:
                    print(f"power-on to marker: {time.monotonic() - started:.1f} s: {line}")
                    return line[line.index("labmetal-os:"):], "\n".join(complete[:number])
            if qemu.poll() is not None or time.monotonic() - started > BOOT_DEADLINE:
                pytest.fail("the seat never said it booted:\n" + "\n".join(complete[-40:]))
            time.sleep(0.1)
    finally:
        if qemu.poll() is None:
            os.killpg(qemu.pid, signal.SIGKILL)
        qemu.wait()


def boot(scratch: Path, *qemu_args: str) -> str:
    """A BIOS seat with a virtio NIC: its marker line."""
    return boot_console(scratch, "virtio-net-pci", *qemu_args)[0]


def test_a_seat_boots_the_whole_disk_image_and_says_its_mac(whole_disk, scratch):
    disk = scratch / "seat-disk.img"
    shutil.copyfile(whole_disk.path, disk)
    line = boot(scratch, "-drive", f"file={disk},format=raw,if=virtio", "-boot", "c")
    assert line == marker_line(WHOLE_DISK_NAME, MAC)
    assert line.startswith(whole_disk.marker)


@pytest.mark.parametrize("root", [f"PARTUUID={SIGNATURE:08x}-01", "/dev/vda1"])
def test_the_partition_images_initrd_mounts_the_root_it_is_given(partition, scratch, root):
    """Partition 1 as the agent lays it out; the kernel and initrd given to QEMU directly."""
    size = partition.rootfs.stat().st_size
    disk = scratch / "seat-disk.img"
    with open(disk, "wb") as stream:
        stream.truncate(disk_needed(size))
    subprocess.run(["parted", "--script", "--align", "none", str(disk), "unit", "B",
                    "mklabel", "msdos", "mkpart", "primary", f"{START}B",
                    f"{START + size - 1}B", "set", "1", "boot", "on"],
                   check=True, capture_output=True)
    with open(disk, "r+b") as stream, open(partition.rootfs, "rb") as rootfs:
        stream.seek(440)
        stream.write(SIGNATURE.to_bytes(4, "little"))
        stream.seek(START)
        shutil.copyfileobj(rootfs, stream)
    line = boot(scratch, "-drive", f"file={disk},format=raw,if=virtio",
                "-kernel", str(partition.kernel), "-initrd", str(partition.initrd),
                "-append", f"console=ttyS0 root={root}")
    assert line == marker_line(PARTITION_NAME, MAC, root="/dev/vda1")


def test_a_seat_boots_the_partition_image_through_the_agents_extlinux(partition, scratch):
    """The agent's own steps on a loop device: partition, root filesystem, then kernel, initrd,
    extlinux and MBR code (it downloads the kernel and initrd, so they are served here)."""
    handler = functools.partial(QuietFiles, directory=str(partition.kernel.parent))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    files = f"http://127.0.0.1:{server.server_port}"
    size = partition.rootfs.stat().st_size
    disk = scratch / "seat-disk.img"
    with open(disk, "wb") as stream:
        stream.truncate(disk_needed(size))
    try:
        with as_block_device(str(disk)) as device, requests.Session() as session:
            root = make_root_partition(device, size)
            with open(root.node, "r+b") as target, open(partition.rootfs, "rb") as rootfs:
                shutil.copyfileobj(rootfs, target)
                os.fsync(target.fileno())
            installed = bootloader.install(session, device, root, f"{files}/vmlinuz",
                                           f"{files}/initrd.img", kernel_cmdline="")
    finally:
        server.shutdown()
        server.server_close()
    assert installed["root"] == f"PARTUUID={root.partuuid}"
    line = boot(scratch, "-drive", f"file={disk},format=raw,if=virtio", "-boot", "c")
    assert line == marker_line(PARTITION_NAME, MAC, root="/dev/vda1")


class QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_a_second_build_returns_the_cached_images(cache, whole_disk, partition):
    files = [whole_disk.path, partition.rootfs, partition.kernel, partition.initrd]
    before = [path.stat().st_mtime_ns for path in files]
    messages: list[str] = []
    assert build_whole_disk(WHOLE_DISK_NAME, cache, progress=messages.append) == whole_disk
    assert build_partition(PARTITION_NAME, cache, progress=messages.append) == partition
    assert [path.stat().st_mtime_ns for path in files] == before
    assert len(messages) == 2 and all(": reusing " in message for message in messages)
    assert not list(cache.glob(".build-*"))


def test_bad_names_and_missing_tools_fail_before_building(monkeypatch, scratch):
    with pytest.raises(ValueError, match="image name"):
        build_whole_disk("../escape", scratch / "cache")
    monkeypatch.setenv("PATH", str(scratch / "empty"))
    with pytest.raises(MissingToolError, match=r"apt-get install .*\bmtools\b.*\bsyslinux\b"):
        build_whole_disk(WHOLE_DISK_NAME, scratch / "cache")
    with pytest.raises(MissingToolError, match=r"apt-get install .*\be2fsprogs\b"):
        build_partition(PARTITION_NAME, scratch / "cache")
    assert not (scratch / "cache").exists()
