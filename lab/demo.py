"""`labmetal demo`: a simulated room provisioned end to end, the main job on a fresh machine.

It builds (or takes from the cache) the deploy ramdisk and a small demo OS image, brings up
a room with `labmetal lab up` (QEMU seats that really PXE-boot, and light seats: the agent
as a process with a sparse file as its disk), starts the all-in-one service serving the
room's DHCP and boot files, enrolls the seats, deploys the OS to every seat with per-seat
progress, shows each QEMU seat booting what was written, and keeps running until Ctrl-C.
"""
from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import requests

from labmetal.lab.room import STATE_FILE

LATEST = {"X-OpenStack-Ironic-API-Version": "latest"}
OS_IMAGE = "demo-os"
LABMETAL = str(Path(sys.executable).parent / "labmetal")


@dataclass
class DemoOptions:
    state_dir: Path
    qemu: int = 2
    light: int = 2
    power: str = "ipmi"
    subnet: str = "10.99.200.0/24"
    port: int = 6385
    seat_rate: str = "100mbit"
    keep_running: bool = True


class Children:
    """The processes the demo started, stopped in reverse order (the room last but one:
    it tears its namespaces, guests and BMCs down on SIGTERM)."""

    def __init__(self) -> None:
        self.started: list[tuple[str, subprocess.Popen, Path]] = []

    def start(self, name: str, argv: list[str], log: Path, env: dict | None = None
              ) -> subprocess.Popen:
        with open(log, "ab") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True)
        self.started.append((name, process, log))
        return process

    def check(self) -> None:
        for name, process, log in self.started:
            if process.poll() is not None:
                tail = log.read_text(errors="replace")[-1500:]
                raise RuntimeError(f"{name} exited ({process.returncode}); see {log}:\n{tail}")

    def stop_all(self) -> None:
        for _, process, _ in reversed(self.started):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=90)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


def _wait(what: str, condition: Callable[[], Any], children: Children, timeout: float,
          interval: float = 0.5) -> Any:
    give_up = time.monotonic() + timeout
    while True:
        children.check()
        try:
            value = condition()
        except requests.RequestException:
            value = None
        if value:
            return value
        if time.monotonic() > give_up:
            raise RuntimeError(f"gave up waiting for {what} after {timeout:g} s")
        time.sleep(interval)


def _say(text: str) -> None:
    print(text, flush=True)


def build_images() -> tuple[Any, Any]:
    """The deploy ramdisk and the demo OS image, from their caches when built before."""
    from labmetal.images.ramdisk import build_ramdisk
    from labmetal.lab.osimage import build_whole_disk
    cache = Path(os.environ.get("LABMETAL_RAMDISK_CACHE", "/var/cache/labmetal/ramdisk"))
    _say("deploy ramdisk: from the cache, or built from Debian packages (a few minutes)")
    ramdisk = build_ramdisk(cache, progress=lambda line: _say(f"  {line}"))
    os_image = build_whole_disk(OS_IMAGE, progress=lambda line: _say(f"  {line}"))
    return ramdisk, os_image


def upload(url: str, name: str, kind: str, path: Path) -> None:
    created = requests.post(f"{url}/v1/images", json={"name": name, "kind": kind},
                            headers=LATEST, timeout=30)
    created.raise_for_status()
    with open(path, "rb") as data:
        requests.put(f"{url}/v1/images/{name}/data", data=data, headers=LATEST,
                     timeout=600).raise_for_status()


def run(options: DemoOptions) -> int:
    state_dir = options.state_dir.resolve()
    ramdisk, os_image = build_images()
    # a fresh service and room each run: the demo shows the whole path, enrollment included
    for part in ("labmetal", "room"):
        shutil.rmtree(state_dir / part, ignore_errors=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    host = ipaddress.IPv4Network(options.subnet).network_address + 2  # lab up's uplink
    children = Children()
    try:
        room_dir = state_dir / "room"
        children.start("lab up", [
            LABMETAL, "lab", "up", "--name", "demo", "--subnet", options.subnet,
            "--qemu", str(options.qemu), "--light", str(options.light), "--power",
            options.power, "--port", str(options.port), "--seat-rate", options.seat_rate,
            "--state-dir", str(room_dir), "--api", f"http://{host}:{options.port}"],
            state_dir / "room.log")
        state = _wait("the room", lambda: _room_state(room_dir), children, 120)
        settings = state["settings"]
        url = f"http://{settings['listen']}"
        env = {**os.environ, **{f"LABMETAL_{key.upper()}": str(value)
                                for key, value in settings.items()},
               "LABMETAL_STATE_DIR": str(state_dir / "labmetal"),
               "LABMETAL_DEPLOY_KERNEL": "deploy-kernel",
               "LABMETAL_DEPLOY_RAMDISK": "deploy-ramdisk",
               "LABMETAL_CALLBACK_TIMEOUT": "900"}
        children.start("labmetal serve", [LABMETAL, "serve"], state_dir / "service.log", env)
        _wait(f"labmetal at {url}", lambda: requests.get(url + "/", timeout=2).ok, children, 60)
        _say(f"labmetal is running at {url} (log: {state_dir / 'service.log'})")
        _say(f"room demo: {options.qemu} QEMU + {options.light} light seats, {options.power} "
             f"power, seats at {options.seat_rate} (`labmetal lab status --state-dir "
             f"{room_dir}`)")
        upload(url, "deploy-kernel", "kernel", ramdisk.kernel)
        upload(url, "deploy-ramdisk", "ramdisk", ramdisk.initramfs)
        upload(url, OS_IMAGE, "whole-disk", os_image.path)
        _say(f"images uploaded: the deploy ramdisk ({ramdisk.version_key[:12]}) and {OS_IMAGE}")
        seats = state["seats"]
        names = [seat["name"] for seat in seats]
        _wait("the room's seats to be enrolled", lambda: len(_nodes(url, names)) == len(names),
              children, 300)
        for verb, goal in (("manage", "manageable"), ("provide", "available")):
            for name in names:
                _provision(url, name, verb)
            _wait(f"every seat {goal}", lambda: all(
                n["provision_state"] == goal and not n["reservation"]
                for n in _nodes(url, names)), children, 120)
        _say(f"{len(names)} seats available; deploying {OS_IMAGE} to all of them")
        for name in names:
            requests.patch(f"{url}/v1/nodes/{name}", headers=LATEST, timeout=30, json=[
                {"op": "add", "path": "/instance_info/image_source", "value": OS_IMAGE}]
                ).raise_for_status()
            _provision(url, name, "active")
        started = time.monotonic()
        view = ProgressView(names)
        nodes = _wait("every seat to finish", lambda: view.show(_nodes(url, names)),
                      children, 1200, interval=1)
        active = [n["name"] for n in nodes if n["provision_state"] == "active"]
        _say(f"{len(active)}/{len(names)} seats deployed in {time.monotonic() - started:.0f} s")
        for seat in seats:
            if seat["kind"] == "qemu" and seat["name"] in active:
                line = _wait(f"{seat['name']} to boot {OS_IMAGE}",
                             lambda: _console_marker(seat), children, 180)
                _say(f"  {seat['name']} (QEMU) booted the deployed OS: {line}")
        _say(f"Try: baremetal --os-auth-type none --os-endpoint {url} node list")
        if not options.keep_running:
            return 0 if len(active) == len(names) else 1
        _say("The service and the room keep running; Ctrl-C stops both.")
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        while True:
            children.check()
            time.sleep(2)
    except KeyboardInterrupt:
        return 0
    except RuntimeError as error:
        _say(f"labmetal demo: error: {error}")
        return 1
    finally:
        _say("stopping the service and the room")
        children.stop_all()


def _room_state(room_dir: Path) -> dict[str, Any] | None:
    path = room_dir / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _nodes(url: str, names: list[str]) -> list[dict[str, Any]]:
    response = requests.get(f"{url}/v1/nodes/detail", headers=LATEST, timeout=10)
    response.raise_for_status()
    wanted = set(names)
    return sorted((n for n in response.json()["nodes"] if n["name"] in wanted),
                  key=lambda n: names.index(n["name"]))


def _provision(url: str, name: str, verb: str) -> None:
    response = requests.put(f"{url}/v1/nodes/{name}/states/provision", json={"target": verb},
                            headers=LATEST, timeout=30)
    if response.status_code != 202:
        raise RuntimeError(f"{verb} {name}: HTTP {response.status_code} {response.text[:300]}")


def _console_marker(seat: dict[str, Any]) -> str | None:
    path = Path(seat["console_log"])
    text = path.read_text(errors="replace") if path.exists() else ""
    lines = [line.strip() for line in text.splitlines() if "labmetal-os: image=" in line]
    return lines[-1] if lines else None


class ProgressView:
    """One line per seat (state, step, a bar); redrawn in place on a terminal, printed
    when it changes otherwise (logs, CI)."""
    WIDTH = 24

    def __init__(self, names: list[str]):
        self.names = names
        self.tty = sys.stdout.isatty()
        self.drawn = 0
        self.last: dict[str, str] = {}

    def line(self, node: dict[str, Any]) -> str:
        step = node.get("deploy_step") or {}
        state = node["provision_state"]
        if step.get("total"):
            share = step["done"] / step["total"]
            bar = "#" * int(share * self.WIDTH)
            detail = f"{step.get('step', ''):<12} [{bar:<{self.WIDTH}}] {share:4.0%}"
        elif state == "wait call-back":
            detail = "booting the deploy ramdisk"
        else:
            detail = ""
        if node["last_error"]:
            detail = f"error: {node['last_error']}"
        return f"  {node['name']:<10} {state:<15} {detail}"

    def show(self, nodes: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        lines = {node["name"]: self.line(node) for node in nodes}
        if self.tty:
            if self.drawn:
                sys.stdout.write(f"\x1b[{self.drawn}F")
            for name in self.names:
                sys.stdout.write("\x1b[2K" + lines.get(name, f"  {name}") + "\n")
            self.drawn = len(self.names)
        else:
            for name in self.names:
                if name in lines and self.last.get(name) != lines[name]:
                    sys.stdout.write(lines[name] + "\n")
            self.last = lines
        sys.stdout.flush()
        done = all(n["provision_state"] in ("active", "deploy failed") and not n["reservation"]
                   for n in nodes)
        return nodes if done and len(nodes) == len(self.names) else None
