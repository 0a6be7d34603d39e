"""Benchmark: a deploy of a 1 GiB whole-disk image to one light seat, ``direct`` and
``iscsi``, against a local ``qemu-img convert`` of the same image to a raw file (the
fastest this machine can write those bytes, with no network, agent or verification).

The seat is the real agent in its own network namespace writing a sparse file, as in
tests/test_deploy.py; the link is not shaped. The image is an msdos disk holding an ext4
file system filled from /usr/bin (a real mix of binaries and zeros, as OS images are).
Reported per run: the time from the deploy request to ``active``, the time from the
agent's lookup to ``active`` (the writing, verifying and reboot), and their ratios to
the local convert (1.0 would be as fast as a local copy).

    .venv/bin/python -m bench.deploy [--size-mib 1024] [--runs 2]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path

from labmetal.lab.network import Lab
from labmetal.lab.light_room import MIB, TestRoom, open_room
from labmetal.lab.harness import Processes

FILL_FROM = Path("/usr/bin")


def make_image(work: Path, size_mib: int, fill_from: Path = FILL_FROM) -> Path:
    """msdos label + one ext4 partition holding a copy of ``fill_from``."""
    rootfs = work / "rootfs.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(fill_from), str(rootfs),
                    f"{size_mib - 2}M"], check=True, capture_output=True)
    disk = work / "bench.disk.img"
    with open(disk, "wb") as out:
        out.truncate(size_mib * MIB)
    subprocess.run(["parted", "-s", str(disk), "mklabel", "msdos", "mkpart", "primary", "ext4",
                    "1MiB", f"{size_mib - 1}MiB"], check=True, capture_output=True)
    with open(disk, "r+b") as out, open(rootfs, "rb") as fs:
        out.seek(MIB)
        shutil.copyfileobj(fs, out, MIB)
    rootfs.unlink()
    return disk


def local_convert(image: Path, work: Path) -> float:
    target = work / "convert.raw"
    started = time.perf_counter()
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", "-t", "writeback",
                    str(image), str(target)], check=True)
    subprocess.run(["sync", str(target)], check=True)
    seconds = time.perf_counter() - started
    target.unlink()
    return seconds


def _event_time(history: list[dict], prefix: str) -> float:
    stamps = [e["created_at"] for e in history if e["event"].startswith(prefix)]
    return datetime.fromisoformat(stamps[-1]).timestamp()


def deploy(room: TestRoom, seat_index: int, interface: str,
           show_events: bool = False) -> tuple[float, float]:
    """(request to active, agent lookup to active) in seconds."""
    seat = room.seats[seat_index]
    room.api("PATCH", f"/v1/nodes/{seat.name}", json=[
        {"op": "add", "path": "/instance_info/image_source", "value": "bench"},
        {"op": "replace", "path": "/deploy_interface", "value": interface}])
    started = time.time()
    response = room.provision(seat.name, "active")
    assert response.status_code == 202, response.text
    node = room.wait_state(seat.name, "active", "deploy failed", timeout=900)
    total = time.time() - started
    if node["provision_state"] != "active":
        raise SystemExit(f"{interface} deploy failed: {node['last_error']}")
    history = room.service.history(seat.name)
    writing = (_event_time(history, "deploying -> active")
               - _event_time(history, "deploy agent looked up"))
    if show_events:
        for event in history:
            at = datetime.fromisoformat(event["created_at"]).timestamp() - started
            print(f"    {at:7.2f} s  {event['event']}")
    room.provision(seat.name, "deleted")
    room.wait_state(seat.name, "available", "clean failed", timeout=300)
    return total, writing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--events", action="store_true", help="print each deploy's history")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="labmetal-bench-deploy-", dir="/var/tmp"))
    procs = Processes(work)
    try:
        image = make_image(work, args.size_mib)
        used = int(subprocess.run(["du", "-m", str(image)], capture_output=True, text=True,
                                  check=True).stdout.split()[0])
        converts = [local_convert(image, work) for _ in range(args.runs)]
        baseline = statistics.median(converts)
        with Lab() as lab:
            room = open_room(lab, procs, work, index=90, seats=2, disk_mib=args.size_mib + 64,
                             callback_timeout=900)
            room.upload_deploy_ramdisk()
            room.upload("bench", "whole-disk", image)
            print(f"{args.size_mib} MiB image ({used} MiB allocated), one light seat on "
                  f"loopback veths, median of {args.runs}")
            print(f"local qemu-img convert to a raw file: {baseline:6.2f} s (1.00)")
            for index, interface in enumerate(("direct", "iscsi")):
                room.enroll(room.seats[index])
                runs = [deploy(room, index, interface, args.events) for _ in range(args.runs)]
                total = statistics.median(run[0] for run in runs)
                writing = statistics.median(run[1] for run in runs)
                print(f"{interface:>6} deploy: request to active {total:6.2f} s "
                      f"(local/this {baseline / total:.2f}); agent lookup to active "
                      f"{writing:6.2f} s (local/this {baseline / writing:.2f})", flush=True)
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
