"""Multicast room deploy against its physical limit: N light seats (receiver processes in
their own namespaces, a sparse file each as disk) on a switch whose seat links are shaped
to ``--rate``, optional random loss on the switch, optional late joiners; the sender runs
here, in the host's namespace, behind an uplink. Prints time ÷ (packed bytes ÷ seat rate).

    python -m bench.multicast --seats 10 20 --rate 20 --loss 0 5 [--late 3]

"limit" is packed bytes ÷ seat rate; "all complete" is when the sender has heard every seat
say it holds every chunk, "receipts" when every receiver has also read its disk back and
exited. BENCH_DEBUG=1 prints progress, BENCH_PROFILE=<dir> profiles the receivers.
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from labmetal.conductor.multicast import MulticastConfig, MulticastSender
from labmetal.agent.manifest import Manifest, build
from labmetal.lab.network import Lab, add_loss, in_namespace

MIB = 1024 * 1024
SUBNET = "10.99.141"
# Each seat's disk is its own, as in a room, not one host disk shared by all seats.
DISKS = os.environ.get("BENCH_DISKS", "/dev/shm")
DEBUG = bool(os.environ.get("BENCH_DEBUG"))  # progress lines, the first seat's log
PROFILE = os.environ.get("BENCH_PROFILE")  # a directory: cProfile output of each receiver


def mixed_image(path: Path, size_mib: int) -> Path:
    """Like a disk: runs of zeros, incompressible data, and binaries from /usr/lib."""
    files = sorted(p for p in Path("/usr/lib/x86_64-linux-gnu").rglob("*.so*") if p.is_file())
    feed = (p.read_bytes() for p in files)
    with open(path, "wb") as out:
        for block in range(size_mib):
            kind = block % 8
            if kind in (2, 3):
                out.write(bytes(MIB))
            elif kind == 5:
                out.write(os.urandom(MIB))
            else:
                data = b""
                while len(data) < MIB:
                    data += next(feed, b"\xa5" * MIB)
                out.write(data[:MIB])
    return path


def receiver_argv(manifest_path: Path, config: MulticastConfig, target: Path,
                  job: int) -> list[str]:
    profile = ["-m", "cProfile", "-o", f"{PROFILE}/{target.name}.prof"] if PROFILE else []
    return [sys.executable, *profile, "-m", "labmetal.agent.multicast", "--manifest",
            str(manifest_path), "--group", config.group, "--port", str(config.port), "--sender",
            f"{config.interface_ip}:{config.control_port}", "--target", str(target),
            "--job", str(job), "--timeout", "60"]


def run(work: Path, disks: Path, manifest: Manifest, manifest_path: Path, packed: Path, seats: int,
        rate_mbit: float, loss: float, late: int, job: int) -> dict[str, float]:
    with Lab() as lab:
        room = lab.add_room("mcb", server=f"{SUBNET}.1/24")
        lab.add_uplink(room, f"{SUBNET}.254/24")
        if loss:
            add_loss(room.namespace, loss)
        config = MulticastConfig(group="239.192.77.9", port=47100, control_port=47101,
                                 interface_ip=f"{SUBNET}.254",
                                 rate_ceiling=int(rate_mbit * 1e6))
        namespaces = []
        for number in range(seats):
            seat = lab.add_seat(room, f"s{number}", f"02:00:00:00:01:{number:02x}",
                                f"{SUBNET}.{10 + number}/24", rate=f"{rate_mbit}mbit")
            namespaces.append(seat.namespace)
        procs: list[subprocess.Popen] = []

        def launch(number: int) -> None:
            target = disks / f"disk{number}"
            with open(target, "wb") as disk:
                disk.truncate(manifest.raw_size)
            log = open(work / f"seat{number}.log", "wb")
            procs.append(subprocess.Popen(
                in_namespace(namespaces[number], receiver_argv(manifest_path, config, target,
                                                               job)),
                stdout=log, stderr=subprocess.STDOUT))

        for number in range(seats - late):
            launch(number)
        deadline = time.monotonic() + 60
        while not all("listening on" in (work / f"seat{number}.log").read_text()
                      for number in range(seats - late)):  # started and joined
            if time.monotonic() > deadline:
                raise RuntimeError("receivers did not start")
            time.sleep(0.1)
        time.sleep(0.5)
        sender = MulticastSender(manifest, packed, config, job)
        started = time.monotonic()
        sender.start()
        try:
            limit = manifest.packed_size * 8 / (rate_mbit * 1e6)
            late_started = False
            while sender.status().receivers_complete < seats:
                if late and not late_started and sender.status().bytes_sent > \
                        manifest.packed_size / 3:
                    for number in range(seats - late, seats):
                        launch(number)
                    late_started = True
                if time.monotonic() - started > 5 * limit + 30:
                    for seat in sender.status().seats:
                        if seat.state != "complete":
                            number = int(seat.address.split(":")[0].rsplit(".", 1)[1]) - 10
                            print(seat, (work / f"seat{number}.log").read_text()[-3000:])
                    raise RuntimeError(f"not done: {sender.status()}")
                if DEBUG and int((time.monotonic() - started) * 50) % 25 == 0:
                    status = sender.status()
                    print(f"{time.monotonic() - started:5.2f} s: sent {status.packets_sent} "
                          f"(repairs {status.repair_packets}) rate {status.rate / 1e6:.1f} "
                          f"complete {status.receivers_complete} active {status.receivers_active}")
                time.sleep(0.02)
            complete = time.monotonic() - started
            status = sender.status()
        finally:
            sender.stop()
        cpu = user = 0.0
        codes = []
        for proc in procs:
            _, code, usage = os.wait4(proc.pid, 0)
            proc.returncode = code
            codes.append(code)
            cpu += usage.ru_utime + usage.ru_stime
            user += usage.ru_utime
        receipts = time.monotonic() - started
        drops = sum(_udp_drops(namespace) for namespace in namespaces)
        if DEBUG:
            print((work / "seat0.log").read_text())
        if any(codes):
            raise RuntimeError(f"receivers failed: {codes}")
        return {"limit": limit, "complete": complete, "receipts": receipts,
                "packets": status.packets_sent, "repairs": status.repair_packets,
                "receiver_cpu": cpu, "socket_drops": drops, "receiver_user": user}


def _udp_drops(namespace: str) -> int:
    """Datagrams a seat's kernel dropped for want of room in a socket buffer."""
    snmp = subprocess.run(in_namespace(namespace, ["cat", "/proc/net/snmp"]),
                          capture_output=True, text=True).stdout
    udp = [line.split() for line in snmp.splitlines() if line.startswith("Udp:")]
    return int(dict(zip(udp[0], udp[1]))["RcvbufErrors"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seats", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--rate", type=float, default=20, help="seat link, Mbit/s")
    parser.add_argument("--loss", type=float, nargs="+", default=[0, 5], help="percent")
    parser.add_argument("--late", type=int, default=0, help="seats that join a third in")
    parser.add_argument("--image-mib", type=int, default=48)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if DEBUG else logging.WARNING,
                        format="%(relativeCreated)d %(message)s")
    with tempfile.TemporaryDirectory(prefix="labmetal-mcbench-") as tmp, \
            tempfile.TemporaryDirectory(prefix="labmetal-mcbench-", dir=DISKS) as disks:
        work = Path(tmp)
        raw = mixed_image(work / "image.raw", args.image_mib)
        manifest = build(raw, work / "image.packed")
        manifest_path = work / "manifest.json"
        manifest_path.write_text(manifest.to_json())
        print(f"image {manifest.raw_size / MIB:.0f} MiB raw, {manifest.packed_size / MIB:.1f} "
              f"MiB packed; seats at {args.rate} Mbit/s")
        job = 1
        for seats in args.seats:
            for loss in args.loss:
                job += 1
                result = run(work, Path(disks), manifest, manifest_path, work / "image.packed",
                             seats, args.rate, loss, args.late, job)
                blocks = result["packets"] - result["repairs"]
                print(f"{seats:3d} seats, {loss:4.1f} % loss, {args.late} late: "
                      f"all complete {result['complete']:.1f} s = "
                      f"{result['complete'] / result['limit']:.2f} x limit "
                      f"({result['limit']:.1f} s), receipts {result['receipts']:.1f} s = "
                      f"{result['receipts'] / result['limit']:.2f} x; "
                      f"repairs {result['repairs'] / max(1, blocks) * 100:.1f} % of "
                      f"{blocks} blocks; receivers' CPU {result['receiver_cpu']:.1f} s "
                      f"({result['receiver_user']:.1f} user), "
                      f"socket drops {result['socket_drops']}",
                      flush=True)


if __name__ == "__main__":
    main()
