"""Benchmark: real room PCs' firmware paths and the deploy ramdisk's kernel.

1. The ramdisk, Debian's generic kernel (the default: real PCs' drivers, signed) against
   the cloud kernel (the former default, VMs only) as the baseline: kernel and initramfs
   sizes, and QEMU (TCG) power-on to the agent's first request (direct kernel boot, user
   networking: the ramdisk alone, no firmware).
2. Per QEMU seat profile (bios, uefi, secureboot), 1 and 3 seats deployed at once with a
   whole-disk image (the UEFI one with its signed boot chain for uefi and secureboot):
   the deploy request until the OS's marker, split by what each seat's serial console
   shows: firmware + PXE (until the boot loader loads the ramdisk), ramdisk boot (until
   the agent starts), write (until the seat is sent to its disk) and reboot to the OS.
   Ratios against the bios profile of the same run.

    .venv/bin/python -m bench.firmware [--profiles bios uefi secureboot] [--seats 1 3]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from labmetal.images.ramdisk import RECORD, Recipe, build_ramdisk
from labmetal.lab.osimage import build_whole_disk, marker_line
from labmetal.lab.served import served_room
from labmetal.lab.harness import wait_for

RAMDISK_CACHE = Path("/var/cache/labmetal/ramdisk")
# What each seat's console shows at the end of each phase, in order.
PHASES = (("firmware+PXE", "labmetal: loading the deploy ramdisk"),
          ("ramdisk boot", "labmetal-ramdisk: starting agent"),
          ("write", "labmetal: booting the local disk"))


def time_to_agent(kernel: Path, initramfs: Path) -> float:
    """QEMU power-on until the agent's first HTTP request (its lookup)."""
    asked = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.set()
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    started = time.monotonic()
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-accel", "tcg", "-m", "1024", "-nographic", "-no-reboot",
         "-kernel", str(kernel), "-initrd", str(initramfs), "-append",
         f"console=ttyS0 labmetal.api=http://10.0.2.2:{server.server_port}",
         "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not asked.wait(600):
            raise RuntimeError("the agent never asked")
        return time.monotonic() - started
    finally:
        qemu.kill()
        qemu.wait()
        server.shutdown()
        server.server_close()


def ramdisks() -> None:
    print("deploy ramdisk: generic kernel (default) vs cloud kernel (baseline)")
    results = {}
    for label, package in (("cloud", "linux-image-cloud-amd64"),
                           ("generic", Recipe.kernel_package)):
        build = build_ramdisk(RAMDISK_CACHE, recipe=Recipe(kernel_package=package),
                              progress=lambda line: None)
        record = json.loads((build.kernel.parent / RECORD).read_text())
        seconds = sorted(time_to_agent(build.kernel, build.initramfs) for _ in range(3))[1]
        results[label] = (record["kernel_size"], record["initramfs_size"], seconds)
        print(f"  {label:<8} {record['kernel_version']:<18} "
              f"kernel {record['kernel_size'] / 2**20:5.1f}"
              f" MiB, initramfs {record['initramfs_size'] / 2**20:5.1f} MiB, power-on to the "
              f"agent {seconds:5.1f} s (median of 3); missing drivers: "
              f"{', '.join(record['modules']['missing']) or 'none'}", flush=True)
    (kc, ic, tc), (kg, ig, tg) = results["cloud"], results["generic"]
    print(f"  generic / cloud: download {(kg + ig) / (kc + ic):.2f}, time to agent {tg / tc:.2f}")


def profile_room(work: Path, profile: str, seats: int, index: int, ramdisk, images
                 ) -> list[dict[str, float]]:
    with served_room(work, f"f{index}", f"10.99.{170 + index}.0/24", ramdisk, "--qemu",
                     str(seats), "--profile", profile, callback_timeout=1800) as (room, api):
        image = images["bios" if profile == "bios" else "uefi"]
        api.upload("os", "whole-disk", image.path)
        for seat in room.state["seats"]:
            api.enroll(room, seat)
            api.call("PATCH", f"/v1/nodes/{seat['name']}", json=[
                {"op": "add", "path": "/instance_info/image_source", "value": "os"}])
        offsets = {seat["name"]: len(room.console(seat)) for seat in room.state["seats"]}
        started = time.monotonic()
        for seat in room.state["seats"]:
            api.call("PUT", f"/v1/nodes/{seat['name']}/states/provision",
                     json={"target": "active"}).raise_for_status()
        seen: dict[str, dict[str, float]] = {seat["name"]: {} for seat in room.state["seats"]}
        wanted = [*(text for _, text in PHASES)]

        def look() -> bool:
            now = time.monotonic() - started
            for seat in room.state["seats"]:
                console = room.console(seat)[offsets[seat["name"]]:]
                marks = seen[seat["name"]]
                for text in (*wanted, marker_line("os", seat["mac"])):
                    if text not in marks and text in console:
                        marks[text] = now
            return all(len(marks) == len(wanted) + 1 for marks in seen.values())

        wait_for(look, 1800, "every seat's OS", interval=0.2)
        rows = []
        for seat in room.state["seats"]:
            marks, previous, row = seen[seat["name"]], 0.0, {}
            for phase, text in PHASES:
                row[phase] = marks[text] - previous
                previous = marks[text]
            row["reboot to OS"] = marks[marker_line("os", seat["mac"])] - previous
            row["total"] = marks[marker_line("os", seat["mac"])]
            rows.append(row)
        return rows


def profiles(names: list[str], counts: list[int]) -> None:
    ramdisk = build_ramdisk(RAMDISK_CACHE, progress=lambda line: None)
    images = {"bios": build_whole_disk("os", progress=lambda line: None),
              "uefi": build_whole_disk("os", firmware="uefi", progress=lambda line: None)}
    columns = [phase for phase, _ in PHASES] + ["reboot to OS", "total"]
    print("QEMU seats (TCG): deploy request -> the deployed OS's marker, per phase "
          "(seconds; the slowest seat)")
    print(f"  {'profile':<11} {'seats':>5} " + " ".join(f"{c:>13}" for c in columns)
          + "  total / bios")
    work = Path(tempfile.mkdtemp(prefix="labmetal-bench-fw-", dir="/var/tmp"))
    baseline: dict[int, float] = {}
    try:
        for index, (name, seats) in enumerate((n, s) for s in counts for n in names):
            rows = profile_room(work / f"{name}-{seats}", name, seats, index, ramdisk, images)
            worst = max(rows, key=lambda row: row["total"])
            if name == "bios":
                baseline[seats] = worst["total"]
            ratio = (f"{worst['total'] / baseline[seats]:.2f}" if seats in baseline else "-")
            print(f"  {name:<11} {seats:>5} " + " ".join(f"{worst[c]:13.1f}" for c in columns)
                  + f"  {ratio:>12}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", nargs="*", default=["bios", "uefi", "secureboot"])
    parser.add_argument("--seats", type=int, nargs="*", default=[1, 3])
    parser.add_argument("--no-ramdisk", action="store_true", help="skip the kernel comparison")
    args = parser.parse_args()
    if not args.no_ramdisk:
        ramdisks()
    if args.profiles and args.seats:
        profiles(args.profiles, args.seats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
