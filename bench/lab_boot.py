"""Benchmark: rooms of the simulated lab deployed end to end.

1. QEMU seats (real PXE boots, the real deploy ramdisk, TCG): time from the deploy request
   (labmetal powers the seat on through its BMC) to the deployed OS's marker on the serial
   console, for 1 and for 4 seats at once.
2. Light seats (the agent in its own namespace, a sparse file as its disk), unicast HTTP
   deploys of a realistic image (an ext4 file system holding Debian's
   /usr/lib/python3.11) to 20 and 40 seats, each seat link shaped to R and the
   uplink to 10 R: the time to `active` on every seat against the physical limit of the
   uplink, N x (bytes each seat must receive) / uplink rate. The bytes are the image's
   packed size (its non-zero chunks, zstd-compressed): what crosses the wire.

    .venv/bin/python -m bench.lab_boot [--qemu 1 4] [--light 20 40] [--rate-mbit 20]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from bench.deploy import make_image
from labmetal.images.ramdisk import build_ramdisk
from labmetal.lab.osimage import build_whole_disk, marker_line
from labmetal.lab.served import Labmetal, UpRoom, lab_up, start_labmetal, tear_down
from labmetal.lab.harness import Processes, free_port, wait_for

RAMDISK_CACHE = Path("/var/cache/labmetal/ramdisk")


def open_room(work: Path, procs: Processes, name: str, subnet: str, *options: str
              ) -> tuple[UpRoom, Labmetal]:
    port = free_port()
    room = lab_up(procs, work / name, name, subnet, "--port", str(port), *options,
                  log_name=f"lab-{name}")
    start_labmetal(procs, work, {**room.state["settings"], "callback_timeout": 1800,
                                 "agent_timeout": 120, "deploy_kernel": "deploy-kernel",
                                 "deploy_ramdisk": "deploy-ramdisk"}, name=f"labmetal-{name}")
    return room, Labmetal(f"http://{room.state['settings']['listen']}")


def deploy_all(room: UpRoom, api: Labmetal, image: str) -> float:
    """Enroll every seat, then deploy all at once; seconds from the first request."""
    for seat in room.state["seats"]:
        api.enroll(room, seat)
        api.call("PATCH", f"/v1/nodes/{seat['name']}", json=[
            {"op": "add", "path": "/instance_info/image_source", "value": image}])
    started = time.monotonic()
    for seat in room.state["seats"]:
        response = api.call("PUT", f"/v1/nodes/{seat['name']}/states/provision",
                            json={"target": "active"})
        assert response.status_code == 202, response.text
    return started


def qemu_room(work: Path, seats: int, ramdisk, os_image, index: int) -> list[float]:
    procs = Processes(work)
    room = None
    try:
        room, api = open_room(work, procs, f"q{seats}", f"10.99.{150 + index}.0/24",
                              "--qemu", str(seats), "--power", "ipmi")
        api.upload("deploy-kernel", "kernel", ramdisk.kernel)
        api.upload("deploy-ramdisk", "ramdisk", ramdisk.initramfs)
        api.upload("os", "whole-disk", os_image.path)
        started = deploy_all(room, api, "os")
        times = []
        for seat in room.state["seats"]:
            marker = marker_line(os_image.name, seat["mac"])
            wait_for(lambda: marker in room.console(seat), 1800, f"{seat['name']}'s OS",  # noqa: B023 (called in this iteration)
                     interval=0.2)
            times.append(time.monotonic() - started)
        return times
    finally:
        if room is not None:
            tear_down(room)
        procs.stop_all()


def light_room(work: Path, seats: int, rate_mbit: int, image: Path, index: int
               ) -> tuple[float, int]:
    procs = Processes(work)
    room = None
    try:
        room, api = open_room(work, procs, f"l{seats}", f"10.99.{160 + index}.0/24",
                              "--light", str(seats), "--power", "ipmi", "--seat-rate",
                              f"{rate_mbit}mbit", "--disk-mib", "512")
        for kind in ("kernel", "ramdisk"):  # light seats boot no kernel: any file does
            path = work / f"deploy.{kind}"
            path.write_bytes(b"light seats do not boot this")
            api.upload(f"deploy-{kind}", kind, path)
        api.upload("os", "whole-disk", image)
        packed = api.call("GET", "/v1/images/os").json()["packed_size"]
        started = deploy_all(room, api, "os")
        for seat in room.state["seats"]:
            node = api.wait(seat["name"], "active", "deploy failed", timeout=3600)
            assert node["provision_state"] == "active", node["last_error"]
        return time.monotonic() - started, packed
    finally:
        if room is not None:
            tear_down(room)
        procs.stop_all()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qemu", type=int, nargs="*", default=[1, 4])
    parser.add_argument("--light", type=int, nargs="*", default=[20, 40])
    parser.add_argument("--rate-mbit", type=int, default=20, help="seat link R (uplink 10 R)")
    parser.add_argument("--image-mib", type=int, default=256)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="labmetal-bench-lab-", dir="/var/tmp"))
    try:
        if args.qemu:
            ramdisk = build_ramdisk(RAMDISK_CACHE, progress=lambda line: None)
            os_image = build_whole_disk("bench-os", progress=lambda line: None)
            print("QEMU seats (TCG), deploy request -> deployed OS's marker on the console")
            for index, seats in enumerate(args.qemu):
                times = qemu_room(work / f"q{seats}", seats, ramdisk, os_image, index)
                print(f"  {seats} seat(s): first {min(times):6.1f} s, last {max(times):6.1f} s,"
                      f" per seat {max(times) / seats:6.1f} s", flush=True)
        if args.light:
            image = make_image(work, args.image_mib, Path("/usr/lib/python3.11"))
            uplink = args.rate_mbit * 10 * 1e6 / 8  # bytes/s
            print(f"light seats, unicast HTTP, {args.image_mib} MiB image, seat links "
                  f"{args.rate_mbit} Mbit/s, uplink {args.rate_mbit * 10} Mbit/s")
            for index, seats in enumerate(args.light):
                seconds, packed = light_room(work / f"l{seats}", seats, args.rate_mbit, image,
                                             index)
                limit = seats * packed / uplink
                print(f"  {seats} seats: {seconds:6.1f} s; limit N x {packed / 2**20:.0f} MiB "
                      f"packed / uplink = {limit:6.1f} s; time / limit {seconds / limit:.2f}",
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
