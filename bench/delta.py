"""Benchmark: re-imaging a seat that still holds the image (delta) against a full write.

One light seat's write stage, as the agent runs it: ``write_image`` in the seat's network
namespace, its disk a sparse file, the image (an msdos disk holding an ext4 file system
filled from /usr/lib/python3.11, as bench/lab_boot.py's) served over HTTP by labmetal's own
file endpoint from the host, through the room's switch. For each seat link (unshaped, and
shaped like a teaching room's, 20 Mbit/s by default), in one run:

* full: ``delta`` off, every chunk fetched and written (what a re-image cost before);
* over other data: ``delta`` on, but no chunk matches (another image): the scan's cost;
* delta 0 %: the disk holds the image as it was written;
* delta 5 % anywhere: 5 % of the chunks, spread evenly over the whole image, were changed
  (those that are zeros in the image just get zeroed again);
* delta 5 % in data: as many chunks, all non-zero ones (the worst case for the network:
  with a mostly empty file system they are a larger share of the packed bytes).

The disk file is dropped from the page cache before each write (a PC's disk is read from
the medium). Reported: median seconds, and the ratio delta / full (goal: <= 0.15 at 5 %).

    .venv/bin/python -m bench.delta [--size-mib 256] [--runs 3] [--rate-mbit 20]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import requests

from bench.deploy import make_image
from labmetal.agent.manifest import Chunk, Manifest
from labmetal.lab.network import Lab, in_namespace
from labmetal.lab.harness import Processes, start_service

MIB = 1024 * 1024
FILL_FROM = Path("/usr/lib/python3.11")


def seat_write(manifest_url: str, packed_url: str, disk: str, delta: bool) -> None:
    """Inside the seat: one write_image, its result and wall time as JSON on stdout."""
    from labmetal.agent import fetch, writer
    session = requests.Session()
    started = time.perf_counter()
    manifest = fetch.manifest(session, manifest_url)
    result = writer.write_image(session, manifest, packed_url, disk, writer.Progress(),
                                delta=delta)
    print(json.dumps({"seconds": time.perf_counter() - started, **asdict(result)}))


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


INVERT = bytes(255 - b for b in range(256))


def change_chunks(disk: Path, manifest: Manifest, percent: float, among: list[Chunk]) -> int:
    """Invert the bytes of ``percent`` % of the image's chunks, spread evenly over ``among``."""
    count = round(len(manifest.chunks) * percent / 100)
    chosen = [among[i * len(among) // count + len(among) // (2 * count)] for i in range(count)]
    invert(disk, chosen)
    return count


def invert(disk: Path, chunks: list[Chunk]) -> None:
    with open(disk, "r+b") as out:
        for chunk in chunks:
            out.seek(chunk.offset)
            old = out.read(chunk.length)
            out.seek(chunk.offset)
            out.write(old.translate(INVERT))


def timed(namespace: str, urls: dict[str, str], disk: Path, delta: bool) -> dict:
    drop_cache(disk)
    argv = [sys.executable, "-m", "bench.delta", "--seat-write", urls["manifest_url"],
            urls["packed_url"], str(disk)] + ([] if delta else ["--no-delta"])
    done = subprocess.run(in_namespace(namespace, argv), capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        raise SystemExit(f"seat write failed: {done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def bench_link(namespace: str, label: str, urls: dict[str, str], manifest: Manifest,
               disk: Path, runs: int) -> None:
    with open(disk, "wb") as out:
        out.truncate(manifest.raw_size + 64 * MIB)
    timed(namespace, urls, disk, delta=True)  # the seat's first deploy: it now holds the image
    cases = {"full (delta off)": None, "over other data": 100.0, "delta 0 %": 0.0,
             "delta 5 % anywhere": 5.0, "delta 5 % in data": 5.0}
    rows: dict[str, list[dict]] = {name: [] for name in cases}
    for _ in range(runs):
        for name, percent in cases.items():
            if percent is None:
                rows[name].append(timed(namespace, urls, disk, delta=False))
                continue
            if percent == 100.0:  # another image: every byte differs from this one
                invert(disk, manifest.chunks)
                changed = len(manifest.chunks)
            elif percent:
                among = manifest.data_chunks if name.endswith("in data") else manifest.chunks
                changed = change_chunks(disk, manifest, percent, among)
            else:
                changed = 0
            result = timed(namespace, urls, disk, delta=True)
            assert result["chunks_written"] == changed, (name, result)
            rows[name].append(result)
    full = statistics.median(r["seconds"] for r in rows["full (delta off)"])
    print(f"{label}:")
    for name, results in rows.items():
        seconds = statistics.median(r["seconds"] for r in results)
        scan = statistics.median(r["scan_seconds"] for r in results)
        last = results[-1]
        print(f"  {name:>18}: {seconds:6.2f} s (scan {scan:5.2f} s), "
              f"{last['chunks_written']:3d}/{last['chunks_total']} chunks written, "
              f"delta/full {seconds / full:.3f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate-mbit", type=int, default=20, help="the shaped seat link; 0: none")
    parser.add_argument("--seat-write", nargs=3, metavar=("MANIFEST", "PACKED", "DISK"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--no-delta", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.seat_write:
        seat_write(*args.seat_write, delta=not args.no_delta)
        return 0

    work = Path(tempfile.mkdtemp(prefix="labmetal-bench-delta-", dir="/var/tmp"))
    procs = Processes(work)
    try:
        image = make_image(work, args.size_mib, FILL_FROM)
        with Lab() as lab:
            room = lab.add_room("d1", server="10.99.95.1/24")
            lab.add_uplink(room, "10.99.95.2/24")
            service = start_service(procs, "bench-delta", host="10.99.95.2")
            headers = {"X-OpenStack-Ironic-API-Version": "latest"}
            created = requests.post(f"{service.url}/v1/images", headers=headers, timeout=60,
                                    json={"name": "os", "kind": "whole-disk"})
            created.raise_for_status()
            with open(image, "rb") as data:
                uploaded = requests.put(f"{service.url}/v1/images/os/data", data=data,
                                        headers=headers, timeout=600)
            uploaded.raise_for_status()
            urls = {key: uploaded.json()[key] for key in ("manifest_url", "packed_url")}
            manifest = Manifest.from_json(requests.get(urls["manifest_url"], timeout=60).content)
            print(f"{args.size_mib} MiB image, {len(manifest.chunks)} chunks "
                  f"({len(manifest.data_chunks)} non-zero), packed {manifest.packed_size / MIB:.0f}"
                  f" MiB; one light seat, median of {args.runs}", flush=True)
            links = [("unshaped link", None)]
            if args.rate_mbit:
                links.append((f"seat link {args.rate_mbit} Mbit/s", f"{args.rate_mbit}mbit"))
            for index, (label, rate) in enumerate(links):
                seat = lab.add_seat(room, f"s{index + 1}", f"52:54:00:99:95:{index + 1:02x}",
                                    address=f"10.99.95.{11 + index}/24", rate=rate)
                bench_link(seat.namespace, label, urls, manifest, work / f"seat{index + 1}.disk",
                           args.runs)
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
