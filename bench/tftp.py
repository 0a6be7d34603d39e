"""Benchmark: labmetal's TFTP (tftpy) against tftpd-hpa on the same file and client.

Both servers serve one random file on loopback, each as its own process; busybox's TFTP
client (C, negotiates blksize; tftp-hpa's client cannot) fetches it at each block size,
alternating servers, and the median of the runs is reported with the ratio
labmetal / tftpd-hpa (goal: >= 0.8). tftpd-hpa's binary is taken from its Debian package
without installing it (the package would start a daemon on 0.0.0.0:69).

    .venv/bin/python -m bench.tftp [--size-mib 64] [--runs 3] [--blksize 512 1468 8192]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from labmetal.lab.harness import Processes, free_port

CACHE = Path(__file__).resolve().parents[1] / "var" / "cache" / "bench"
IN_TFTPD = CACHE / "tftpd-hpa" / "usr" / "sbin" / "in.tftpd"


def tftpd_hpa() -> Path:
    """in.tftpd from the tftpd-hpa package, unpacked once into var/cache/bench."""
    if not IN_TFTPD.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", "tftpd-hpa"], cwd=CACHE, check=True)
        package = max(CACHE.glob("tftpd-hpa_*.deb"), key=lambda p: p.stat().st_mtime)
        subprocess.run(["dpkg-deb", "-x", str(package), str(CACHE / "tftpd-hpa")], check=True)
    return IN_TFTPD


def fetch(port: int, blksize: int, name: str, out: str) -> float:
    """Seconds busybox's client takes to fetch ``name``."""
    started = time.perf_counter()
    subprocess.run(["busybox", "tftp", "-g", "-b", str(blksize), "-r", name, "-l", out,
                    "127.0.0.1", str(port)], check=True, timeout=600)
    return time.perf_counter() - started


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--blksize", type=int, nargs="+", default=[512, 1468, 8192])
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="labmetal-bench-tftp-"))
    root = workdir / "root"
    root.mkdir()
    for path in (workdir, root):  # tftpd-hpa reads as nobody
        path.chmod(0o755)
    payload = root / "payload.bin"
    with open(payload, "wb") as handle:
        for _ in range(args.size_mib):
            handle.write(os.urandom(1 << 20))
    payload.chmod(0o644)
    size = payload.stat().st_size

    procs = Processes(workdir)
    try:
        servers = {"tftpd-hpa": free_port(), "labmetal": free_port()}
        procs.start([str(tftpd_hpa()), "-L", "-s", str(root), "-a",
                     f"127.0.0.1:{servers['tftpd-hpa']}"], "tftpd-hpa")
        procs.start([sys.executable, "-m", "labmetal.pxe.tftp", "--root", str(root), "--listen",
                     f"127.0.0.1:{servers['labmetal']}"], "labmetal").wait_for_output("over TFTP")
        time.sleep(0.5)
        for name, port in servers.items():  # byte-exact, before timing anything
            copy = workdir / f"{name}.copy"
            fetch(port, 1468, payload.name, str(copy))
            assert sha256(copy) == sha256(payload), f"{name} served a different file"
            copy.unlink()

        print(f"{args.size_mib} MiB file, busybox tftp client, loopback, median of {args.runs}")
        print(f"{'blksize':>8} {'tftpd-hpa MB/s':>15} {'labmetal MB/s':>14} {'ratio':>6}")
        for blksize in args.blksize:
            seconds: dict[str, list[float]] = {name: [] for name in servers}
            for _ in range(args.runs):
                for name, port in servers.items():
                    seconds[name].append(fetch(port, blksize, payload.name, "/dev/null"))
            rate = {name: size / statistics.median(times) / 1e6
                    for name, times in seconds.items()}
            print(f"{blksize:>8} {rate['tftpd-hpa']:>15.1f} {rate['labmetal']:>14.1f} "
                  f"{rate['labmetal'] / rate['tftpd-hpa']:>6.2f}", flush=True)
    finally:
        procs.stop_all()
        shutil.rmtree(workdir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
