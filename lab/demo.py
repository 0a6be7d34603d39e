"""`labmetal demo`: a simulated room brought under labmetal's control, end to end.

Today the room's PCs are virtual BMCs (IPMI over UDP on loopback); the demo starts the
all-in-one service, enrolls every seat with its BMC, verifies the credentials (manage),
makes the seats available, powers them on, and leaves the service running for you to try
the `baremetal` CLI against. QEMU seats and deploys join when the boot-and-deploy work lands.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

LATEST = {"X-OpenStack-Ironic-API-Version": "latest"}


def _free_udp_range(count: int) -> int:
    for first in range(16230, 60000, count + 7):
        socks = []
        try:
            for port in range(first, first + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free UDP ports for the virtual BMCs")


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        if proc.poll() is not None:
            raise RuntimeError(f"labmetal exited early; see {log}:\n{log.read_text()[-2000:]}")
        try:
            if requests.get(url, timeout=1).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"labmetal did not answer at {url}; see {log}")


def _show(nodes: list[dict], previous: dict[str, str]) -> dict[str, str]:
    now = {}
    for node in nodes:
        state = f"{node['provision_state']:<11} {node['power_state'] or '-':<9}"
        if node["last_error"]:
            state += f" error: {node['last_error']}"
        now[node["name"]] = state
        if previous.get(node["name"]) != state:
            print(f"  seat {node['name']:<10} {state}", flush=True)
    return now


def run(seats: int, listen: str, state_dir: Path, keep_running: bool = True) -> int:
    state_dir.mkdir(parents=True, exist_ok=True)
    executable = str(Path(sys.executable).parent / "labmetal")
    url = f"http://{listen}"
    env = {**os.environ, "LABMETAL_STATE_DIR": str(state_dir), "LABMETAL_LISTEN": listen,
           "LABMETAL_POWER_SYNC_INTERVAL": "10"}
    service_log, bmc_log = state_dir / "service.log", state_dir / "bmcs.log"
    first_port = _free_udp_range(seats)
    children: list[subprocess.Popen] = []
    try:
        with open(bmc_log, "ab") as out:
            children.append(subprocess.Popen(
                [executable, "lab", "bmc", "--port", str(first_port), "--count", str(seats),
                 "--user", "admin", "--password", "demo-bmc-password", "--power-delay", "1"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        with open(service_log, "ab") as out:
            children.append(subprocess.Popen([executable, "serve"], env=env, stdout=out,
                                             stderr=subprocess.STDOUT, start_new_session=True))
        _wait_http(url + "/", children[-1], service_log)
        print(f"labmetal is running at {url} (log: {service_log})")
        print(f"room: {seats} PCs behind virtual BMCs on udp/127.0.0.1:{first_port}-"
              f"{first_port + seats - 1}", flush=True)
        names = [f"demo-{chr(ord('A') + i // 10)}{i % 10 + 1:02d}" for i in range(seats)]
        for index, name in enumerate(names):
            response = requests.get(f"{url}/v1/nodes/{name}", headers=LATEST, timeout=10)
            if response.status_code == 404:
                requests.post(f"{url}/v1/nodes", json={
                    "driver": "ipmi", "name": name,
                    "driver_info": {"ipmi_address": "127.0.0.1", "ipmi_port": first_port + index,
                                    "ipmi_username": "admin",
                                    "ipmi_password": "demo-bmc-password"}},
                    timeout=10).raise_for_status()
            else:  # a previous demo's seat: point it at this run's BMC
                requests.patch(f"{url}/v1/nodes/{name}", json=[
                    {"op": "replace", "path": "/driver_info/ipmi_port",
                     "value": first_port + index}], timeout=10).raise_for_status()
        shown: dict[str, str] = {}
        for verb, goal in (("manage", "manageable"), ("provide", "available")):
            print(f"{verb}: {'verifying BMC credentials' if verb == 'manage' else 'cleaning'}",
                  flush=True)
            for name in names:
                requests.put(f"{url}/v1/nodes/{name}/states/provision", json={"target": verb},
                             timeout=10)
            shown = _until(url, names, lambda n: n["provision_state"] in (goal, "enroll")
                           and not n["reservation"], shown)
        print("power on", flush=True)
        for name in names:
            requests.put(f"{url}/v1/nodes/{name}/states/power", json={"target": "power on"},
                         timeout=10)
        shown = _until(url, names, lambda n: n["power_state"] == "power on" or n["last_error"],
                       shown)
        ready = sum(1 for state in shown.values() if state.startswith("available"))
        print(f"{ready}/{seats} seats available and powered on.")
        print(f"Try: baremetal --os-auth-type none --os-endpoint {url} node list")
        if not keep_running:
            return 0 if ready == seats else 1
        print("The service keeps running; Ctrl-C stops it and the room.", flush=True)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0
    finally:
        for child in reversed(children):
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM)
                try:
                    child.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(child.pid, signal.SIGKILL)


def _until(url: str, names: list[str], done, shown: dict[str, str], timeout: float = 120):
    give_up = time.monotonic() + timeout
    wanted = set(names)
    while True:
        nodes = [n for n in requests.get(f"{url}/v1/nodes/detail", headers=LATEST,
                                         timeout=10).json()["nodes"] if n["name"] in wanted]
        shown = _show(nodes, shown)
        if all(done(n) for n in nodes) or time.monotonic() > give_up:
            return shown
        time.sleep(0.5)
