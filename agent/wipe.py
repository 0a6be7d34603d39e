"""Erase what identifies old partitions and filesystems, as Ironic's erase_devices_metadata does:
every signature wipefs knows on each partition and on the disk, then the first and last MiB
(boot code, a GPT's backup header, RAID superblocks at the end).

Without this, a new partition table that starts where an old one did brings the old
filesystem back to life.
"""
from __future__ import annotations

from labmetal.agent.disk import MIB, partitions, size_of
from labmetal.agent.tools import run
from labmetal.agent.writer import DiskSink


def wipe_metadata(device: str) -> list[str]:
    """Wipe ``device`` (a block device); returns what wipefs reported erasing."""
    erased = []
    for node in [*partitions(device), device]:
        erased += run(["wipefs", "--all", "--force", node]).splitlines()
    size = size_of(device)
    with DiskSink(device) as sink:
        sink.zero(0, min(MIB, size))
        sink.zero(max(0, size - MIB), min(MIB, size))
        sink.sync()
    return erased
