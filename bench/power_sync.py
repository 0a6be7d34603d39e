"""Benchmark: nodes per conductor with power sync, and API latency of `node list`.

For each N: N virtual BMCs (IPMI over UDP on loopback), one all-in-one labmetal, N nodes
enrolled and made available; then the conductor's power sync cycles are timed and reported
as a ratio of Ironic's default 60 s interval (goal: 3000 nodes at <= 0.5), and `node list`
latency is reported against GET /v1 (no database) in the same run.

    .venv/bin/python -m bench.power_sync 300 1000 3000
"""
from __future__ import annotations

import argparse
import os
import concurrent.futures
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

from labmetal.lab.harness import Processes, free_udp_range, start_bmcs, start_service, wait_for

BMCS_PER_PROCESS = 500
INTERVAL = 60.0
LATEST = {"X-OpenStack-Ironic-API-Version": "latest"}


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def latency(url: str, count: int) -> list[float]:
    session = requests.Session()
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        session.get(url, headers=LATEST, timeout=60).raise_for_status()
        samples.append(time.perf_counter() - started)
    return samples


def enroll(service, first_port: int, count: int) -> None:
    session = requests.Session()

    def one(i: int) -> None:
        name = f"pc{i:05d}"
        session.post(f"{service.url}/v1/nodes", json={
            "driver": "ipmi", "name": name,
            "driver_info": {"ipmi_address": "127.0.0.1", "ipmi_port": first_port + i,
                            "ipmi_username": "admin", "ipmi_password": "s3cret"}},
            timeout=60).raise_for_status()
        session.put(f"{service.url}/v1/nodes/{name}/states/provision", json={"target": "manage"},
                    timeout=60).raise_for_status()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(count)))
    wait_for(lambda: _count(service, "manageable") == count, 600, "all nodes manageable", 1)


def _count(service, state: str) -> int:
    with sqlite3.connect(service.state_dir / "labmetal.db") as db:
        return db.execute("SELECT count(*) FROM nodes WHERE provision_state=? AND reservation "
                          "IS NULL", (state,)).fetchone()[0]


def wake_url(service) -> str:
    with sqlite3.connect(service.state_dir / "labmetal.db") as db:
        return db.execute("SELECT wake_url FROM conductors").fetchone()[0]


def run(count: int, workdir: Path) -> dict[str, float]:
    procs = Processes(workdir)
    try:
        first_port = free_udp_range(count)
        for offset in range(0, count, BMCS_PER_PROCESS):
            start_bmcs(procs, min(BMCS_PER_PROCESS, count - offset), first_port=first_port + offset,
                       name=f"bmc-{offset}")
        service = start_service(procs, f"bench-{count}", power_sync_interval=5,
                                log_level=os.environ.get("BENCH_LOG_LEVEL", "WARNING"))
        started = time.monotonic()
        enroll(service, first_port, count)
        enroll_seconds = time.monotonic() - started
        status_url = wake_url(service).replace("/wake", "/status")
        cycles = []
        seen = 0
        while len(cycles) < 3:
            stats = requests.get(status_url, timeout=10).json()["power_sync"]
            if stats["cycles"] > seen and stats["nodes"] == count:
                cycles.append(stats["seconds"])
                if stats["failures"]:
                    print(f"  warning: {stats['failures']} BMC reads failed", file=sys.stderr)
            seen = stats["cycles"]
            time.sleep(0.5)
        baseline = latency(f"{service.url}/v1", 50)
        page = latency(f"{service.url}/v1/nodes", 50)
        detail = latency(f"{service.url}/v1/nodes/detail?limit=100", 50)
        sync = statistics.median(cycles)
        return {"nodes": count, "enroll_s": enroll_seconds, "sync_s": sync,
                "sync_ratio": sync / INTERVAL,
                "v1_p50_ms": percentile(baseline, 0.5) * 1000,
                "list_p50_ms": percentile(page, 0.5) * 1000,
                "list_p99_ms": percentile(page, 0.99) * 1000,
                "list_p50_vs_v1": percentile(page, 0.5) / percentile(baseline, 0.5),
                "detail100_p99_ms": percentile(detail, 0.99) * 1000}
    finally:
        procs.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("counts", nargs="*", type=int, default=[300, 1000, 3000])
    parser.add_argument("--keep", help="keep the logs in this directory")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="labmetal-bench-") as tmp:
        tmp = args.keep or tmp
        for count in args.counts:
            print(f"N={count}: starting BMCs, enrolling, timing power sync ...", flush=True)
            rows.append(run(count, Path(tmp) / str(count)))
            print("  " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in rows[-1].items()), flush=True)
    print("\nnodes  sync cycle  ratio to 60 s  node list p50 / p99 (ms)  p50 vs GET /v1")
    for row in rows:
        print(f"{row['nodes']:>5}  {row['sync_s']:>8.2f} s  {row['sync_ratio']:>12.3f}  "
              f"{row['list_p50_ms']:>10.1f} / {row['list_p99_ms']:<10.1f}  "
              f"{row['list_p50_vs_v1']:>8.1f}x")


if __name__ == "__main__":
    main()
