"""The install target as the kernel sees it: its size, its partitions, and a block device for it.

A seat's disk is a block device on a PC and a plain file on a light test seat; partitioning,
mounting and the bootloader need a block device, so a file is attached to a loop device
(with partition scanning) for as long as they need it, and detached afterwards, also on
failure.
"""
from __future__ import annotations

import fcntl
import logging
import os
import stat
import struct
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from labmetal.agent.tools import run

LOG = logging.getLogger(__name__)

BLKGETSIZE64 = 0x80081272
MIB = 1024 * 1024


def is_block_device(path: str) -> bool:
    return stat.S_ISBLK(os.stat(path).st_mode)


def size_of(path: str) -> int:
    if not is_block_device(path):
        return os.stat(path).st_size
    with open(path, "rb") as device:
        return struct.unpack("Q", fcntl.ioctl(device, BLKGETSIZE64, b"\0" * 8))[0]


@contextmanager
def as_block_device(path: str) -> Iterator[str]:
    """``path`` itself if it is a block device, else a loop device over the file."""
    if is_block_device(path):
        yield path
        return
    loop = run(["losetup", "--find", "--show", "--partscan", path]).strip()
    LOG.info("attached %s to %s", path, loop)
    try:
        # The kernel does not always scan a table that is already there at attach time.
        subprocess.run(["partx", "--update", loop], capture_output=True)
        yield loop
    finally:
        result = subprocess.run(["losetup", "--detach", loop], capture_output=True, text=True)
        if result.returncode != 0:
            LOG.error("could not detach %s: %s", loop, result.stderr.strip())


def partitions(device: str) -> list[str]:
    """Device nodes of the partitions the kernel knows on ``device``."""
    name = Path(os.path.realpath(device)).name
    sysfs = Path("/sys/class/block") / name
    return sorted(f"/dev/{child.name}" for child in sysfs.iterdir()
                  if (child / "partition").exists())


def partition_node(device: str, number: int) -> str:
    """sda -> sda1, but nvme0n1 -> nvme0n1p1 and loop0 -> loop0p1 (the kernel's naming rule)."""
    return f"{device}p{number}" if device[-1].isdigit() else f"{device}{number}"


def wait_for_node(path: str, timeout: float = 10) -> None:
    """Without udevd the node comes from devtmpfs, shortly after the kernel learns of it."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear within {timeout:.0f} s")
        time.sleep(0.05)
