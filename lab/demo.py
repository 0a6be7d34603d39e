"""`labmetal demo`: a simulated room provisioned end to end, the main job on a fresh machine.

It builds (or takes from the cache) the deploy ramdisk and a small demo OS image, brings up
a room with `labmetal lab up` (QEMU seats that really PXE-boot, and light seats: the agent
as a process with a sparse file as its disk), starts the all-in-one service serving the
room's DHCP and boot files, enrolls the seats and makes them available. Then it does what a
teacher does: a room ("demo") of those seats, and a room job deploying the OS to all of
them (multicast by default), showing each seat's state and progress from the room's grid,
the data the room's web page shows; then each QEMU seat booting what was written. It keeps
running until stopped.

Stopping removes everything, however the demo is stopped: SIGINT (Ctrl-C), SIGTERM and
SIGHUP are handled from its first line; once its stdout is gone (`labmetal demo | tee log`
and tee was stopped) it goes on without printing; and if it dies without cleaning up
(SIGKILL) the kernel sends its children SIGTERM, on which `lab up` removes the room.
"""
from __future__ import annotations

import functools
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import requests

from labmetal.lab.room import STATE_FILE, die_with_parent, recover

LATEST = {"X-OpenStack-Ironic-API-Version": "latest"}
OS_IMAGE = "demo-os"
ROOM = "demo"  # the teacher's room in labmetal, as `lab up --name` is the simulated one
LABMETAL = str(Path(sys.executable).parent / "labmetal")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
FINISHED_JOB_STATES = ("done", "failed", "cancelled")
_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)$")
_RATE_UNITS = {"bit": 1, "kbit": 10 ** 3, "mbit": 10 ** 6, "gbit": 10 ** 9}


@dataclass
class DemoOptions:
    state_dir: Path
    qemu: int = 2
    light: int = 2
    power: str = "ipmi"
    subnet: str = "10.99.200.0/24"
    port: int = 6385
    seat_rate: str = "100mbit"
    transport: str = "multicast"  # the room job's: unicast | multicast | auto
    # The QEMU seats' firmware, `lab up --profile`: bios | uefi | secureboot. Secure Boot
    # on is what a teaching room's PCs have today.
    profile: str = "secureboot"
    keep_running: bool = True


# -- stopping ----------------------------------------------------------------------------

class Stopped(Exception):
    """SIGINT, SIGTERM or SIGHUP asked the demo to stop."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP raise :class:`Stopped` in the demo, once: one more while
    it stops is ignored, so that the cleanup runs to its end (SIGKILL still ends the demo,
    and its children with it). A signal that comes while a child is being started waits
    until the child is recorded, so that it is stopped with the others."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.raised = False
        self.held = 0

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.received is None:
            self.received = signum
        if not self.held:
            self._raise()

    def _raise(self) -> None:
        if self.received is not None and not self.raised:
            self.raised = True
            raise Stopped(self.received)

    @contextmanager
    def holding(self) -> Iterator[None]:
        self.held += 1
        try:
            yield
        finally:
            self.held -= 1
        if not self.held:
            self._raise()

    def stopping(self) -> None:
        """The demo stops now anyway: signals are only noted from here on."""
        self.raised = True


class Output:
    """The demo's stdout. Once it is gone (EPIPE: `labmetal demo | tee log` and tee was
    stopped; EIO: the terminal was closed) the demo goes on without printing: a failed
    print must not skip the cleanup."""

    def __init__(self) -> None:
        self.gone = False

    @property
    def tty(self) -> bool:
        return not self.gone and sys.stdout.isatty()

    def write(self, text: str) -> None:
        if self.gone:
            return
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except OSError:
            self.gone = True
            self._to_devnull()

    @staticmethod
    def _to_devnull() -> None:
        """Later writes, and the interpreter's last flush of what is still buffered, go to
        /dev/null instead of failing again."""
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass


OUT = Output()


def _say(text: str) -> None:
    OUT.write(text + "\n")


def _die_with_demo(demo_pid: int) -> None:
    """In a child before exec: SIGTERM when the demo dies, even by SIGKILL (lab/room.py's
    PR_SET_PDEATHSIG); if the demo is already gone, no start at all."""
    die_with_parent()
    if os.getppid() != demo_pid:
        os._exit(1)


class Children:
    """The processes the demo started, stopped in reverse order (the room last: it tears
    its namespaces, guests and BMCs down on SIGTERM). Each runs in its own session, away
    from the terminal's signals, and dies with the demo."""

    def __init__(self, signals: StopSignals) -> None:
        self.signals = signals
        self.started: list[tuple[str, subprocess.Popen, Path]] = []

    def start(self, name: str, argv: list[str], log: Path, env: dict | None = None
              ) -> subprocess.Popen:
        with self.signals.holding(), open(log, "ab") as out:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True,
                                       preexec_fn=functools.partial(_die_with_demo, os.getpid()))
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
                _signal_group(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=90)
                except subprocess.TimeoutExpired:
                    _signal_group(process.pid, signal.SIGKILL)
                    process.wait()


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass


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


# -- the demo ----------------------------------------------------------------------------

def build_images(profile: str) -> tuple[Any, Any]:
    """The deploy ramdisk and the demo OS image for the seats' firmware (a GPT disk with
    Debian's signed shim, GRUB and kernel for UEFI seats, Secure Boot or not), from their
    caches when built before."""
    from labmetal.images.ramdisk import build_ramdisk
    from labmetal.lab.osimage import build_whole_disk
    cache = Path(os.environ.get("LABMETAL_RAMDISK_CACHE", "/var/cache/labmetal/ramdisk"))
    _say("deploy ramdisk: from the cache, or built from Debian packages (a few minutes)")
    ramdisk = build_ramdisk(cache, progress=lambda line: _say(f"  {line}"))
    os_image = build_whole_disk(OS_IMAGE, progress=lambda line: _say(f"  {line}"),
                                firmware="bios" if profile == "bios" else "uefi")
    return ramdisk, os_image


def upload(url: str, name: str, kind: str, path: Path) -> None:
    _call("POST", url, "/v1/images", {"name": name, "kind": kind})
    with open(path, "rb") as data:
        requests.put(f"{url}/v1/images/{name}/data", data=data, headers=LATEST,
                     timeout=600).raise_for_status()


def run(options: DemoOptions) -> int:
    """The demo; 0 when it did all it had to (and was then stopped, or --once), 1 on an
    error or a seat not deployed, 128 + the signal's number when stopped before the end."""
    state_dir = options.state_dir.resolve()
    room_dir = state_dir / "room"
    finished = room_started = False
    signals = StopSignals()
    children = Children(signals)
    try:
        signals.install()  # first: from here on a stop request cleans up what exists
        ramdisk, os_image = build_images(options.profile)
        recover(room_dir, _say)  # what the `lab up` of a demo killed outright left here
        # a fresh service and room each run: the demo shows the whole path, enrollment included
        for part in ("labmetal", "room"):
            shutil.rmtree(state_dir / part, ignore_errors=True)
        state_dir.mkdir(parents=True, exist_ok=True)
        host = ipaddress.IPv4Network(options.subnet).network_address + 2  # lab up's uplink
        children.start("lab up", [
            LABMETAL, "lab", "up", "--name", "demo", "--subnet", options.subnet,
            "--qemu", str(options.qemu), "--light", str(options.light), "--power",
            options.power, "--port", str(options.port), "--seat-rate", options.seat_rate,
            "--profile", options.profile, "--state-dir", str(room_dir),
            "--api", f"http://{host}:{options.port}"],
            state_dir / "room.log")
        room_started = True
        state = _wait("the room", lambda: _room_state(room_dir), children, 120)
        settings = state["settings"]
        url = f"http://{settings['listen']}"
        env = {**os.environ, **{f"LABMETAL_{key.upper()}": str(value)
                                for key, value in settings.items()},
               "LABMETAL_STATE_DIR": str(state_dir / "labmetal"),
               # no accounts in the demo, on the room's own network: said explicitly
               "LABMETAL_AUTH": "noauth", "LABMETAL_ALLOW_NOAUTH": "true",
               "LABMETAL_DEPLOY_KERNEL": "deploy-kernel",
               "LABMETAL_DEPLOY_RAMDISK": "deploy-ramdisk",
               "LABMETAL_CALLBACK_TIMEOUT": "900"}
        multicast_rate = _multicast_rate(options.seat_rate)
        if multicast_rate:
            env["LABMETAL_MULTICAST_RATE"] = str(multicast_rate)
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
                n["provision_state"] == goal and not n["reservation"]  # noqa: B023 (called in this iteration)
                for n in _nodes(url, names)), children, 120)
        by_label = make_room(url, seats)
        _say(f"{len(names)} seats available, in room {ROOM} as {', '.join(by_label)}")
        job = _call("POST", url, f"/v1/rooms/{ROOM}/jobs",
                    {"image": OS_IMAGE, "transport": options.transport})
        _say(f"room job {job['uuid']}: deploying {OS_IMAGE} to every seat of room {ROOM} "
             f"({options.transport})")
        started = time.monotonic()
        view = RoomView(by_label, job["uuid"])
        room = _wait("the room job to finish", lambda: view.show(_call("GET", url,
                                                                       f"/v1/rooms/{ROOM}")),
                     children, 1500, interval=1)
        done = [seat["label"] for seat in room["seats"] if seat["state"] == "done"]
        _say(f"{len(done)}/{len(by_label)} seats deployed in {time.monotonic() - started:.0f} s "
             f"(room job {room['job']['state']}, {room['job']['chosen_transport']})")
        for label in done:
            seat = by_label[label]
            if seat["kind"] == "qemu":
                line = _wait(f"{seat['name']} to boot {OS_IMAGE}",
                             lambda: _console_marker(seat), children, 180)  # noqa: B023 (called in this iteration)
                _say(f"  {seat['name']} (QEMU) booted the deployed OS: {line}")
        _say(f"The room's page: {url}/ui/rooms/{ROOM}")
        _say(f"Try: LABMETAL_URL={url} labmetal room show {ROOM}; "
             f"baremetal --os-auth-type none --os-endpoint {url} node list")
        finished = True
        if not options.keep_running:
            return 0 if len(done) == len(by_label) else 1
        _say("The service and the room keep running; Ctrl-C (or SIGTERM) stops both and "
             "removes the room.")
        while True:
            children.check()
            time.sleep(2)
    except Stopped as stop:
        return 0 if finished else 128 + stop.signum
    except (RuntimeError, requests.RequestException) as error:
        _say(f"labmetal demo: error: {error}")
        return 1
    finally:
        signals.stopping()
        _say("stopping the service and the room")
        children.stop_all()
        if room_started:
            try:
                recover(room_dir, _say)  # if `lab up` itself had to be killed
            except RuntimeError as error:
                _say(f"labmetal demo: error: {error}")
        _say("stopped: the room, its seats and the service are gone")


def make_room(url: str, seats: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Room ROOM with a seat A01, A02, ... per seat of the simulated room, as a teacher's
    room is labelled; returns the seats by label."""
    _call("POST", url, "/v1/rooms", {"name": ROOM,
                                     "description": "the simulated room of `labmetal demo`"})
    by_label = {}
    for number, seat in enumerate(seats, 1):
        label = f"A{number:02d}"
        _call("PUT", url, f"/v1/rooms/{ROOM}/seats/{label}", {"node": seat["name"]})
        by_label[label] = seat
    return by_label


def _call(method: str, url: str, path: str, body: Any = None) -> Any:
    response = requests.request(method, url + path, json=body, headers=LATEST, timeout=30)
    if not response.ok:
        raise RuntimeError(f"{method} {path}: HTTP {response.status_code} "
                           f"{response.text[:300]}")
    return response.json() if response.content else None


def _multicast_rate(seat_rate: str) -> int | None:
    """Bit/s just below a seat's link (90 %), as `multicast_rate` wants; None if unshaped."""
    found = _RATE.match(seat_rate)
    return int(float(found.group(1)) * _RATE_UNITS[found.group(2)] * 0.9) if found else None


def _room_state(room_dir: Path) -> dict[str, Any] | None:
    """The room's state file once `lab up` has built the room (its seats are listed) and
    started its BMC or WoL process."""
    path = room_dir / STATE_FILE
    try:
        state = json.loads(path.read_text()) if path.exists() else None
    except ValueError:
        return None
    return state if state and state["seats"] and state["processes"] else None


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


class RoomView:
    """The room job as the room's grid (`GET /v1/rooms/<room>`) has it: a line for the job,
    one per seat (its state in the job, a bar); redrawn in place on a terminal, printed
    when a line changes otherwise (logs, CI)."""
    WIDTH = 24

    def __init__(self, by_label: dict[str, dict[str, Any]], job_uuid: str,
                 out: Output = OUT):
        self.by_label = by_label
        self.job_uuid = job_uuid
        self.out = out
        self.drawn = 0
        self.last: list[str] = []

    def job_line(self, job: dict[str, Any] | None) -> str:
        if job is None or job["uuid"] != self.job_uuid:
            return "  room job scheduled: waiting for the conductor"
        counts = ", ".join(f"{count} {state}" for state, count in sorted(job["counts"].items()))
        via = f" via {job['chosen_transport']}" if job["chosen_transport"] else ""
        return f"  room job {job['state']}{via}: {counts}"

    def seat_line(self, seat: dict[str, Any]) -> str:
        kind = self.by_label.get(seat["label"], {}).get("kind", "")
        state, progress = seat["state"], seat["progress"] or 0
        bar = "#" * (self.WIDTH * progress // 100)
        line = (f"  {seat['label']:<4} {seat['node_name'] or seat['node_uuid']:<10} {kind:<5} "
                f"{state:<10} [{bar:<{self.WIDTH}}] {progress:3d}%")
        if seat["attempts"] > 1:
            line += f" try {seat['attempts']}"
        if seat["error"] and state != "done":
            line += f"  {seat['error'][:70]}"
        return line

    def show(self, room: dict[str, Any]) -> dict[str, Any] | None:
        """Draws the room; returns it once our job has finished."""
        job = room["job"]
        lines = [self.job_line(job)] + [self.seat_line(seat) for seat in room["seats"]]
        if self.out.tty:
            text = f"\x1b[{self.drawn}F" if self.drawn else ""
            self.out.write(text + "".join(f"\x1b[2K{line}\n" for line in lines))
            self.drawn = len(lines)
        else:
            self.out.write("".join(f"{line}\n" for line in lines if line not in self.last))
        self.last = lines
        mine = job is not None and job["uuid"] == self.job_uuid
        return room if mine and job["state"] in FINISHED_JOB_STATES else None
