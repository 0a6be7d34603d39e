"""A simulated room as a user runs it: ``labmetal lab up|down|status``.

``lab up`` builds the room (lab/network.py: namespace, bridge, an uplink to this host,
shaped links), its seats (QEMU guests on taps, light seats in namespaces), starts their
virtual BMCs or a Wake-on-LAN listener as child processes, optionally enrolls the seats
into a running labmetal, and stays in the foreground supervising its children until
SIGINT/SIGTERM. What it made is listed in a state file, so that ``lab down``, ``lab status``
and the next ``lab up`` after a crash know about it.

Addresses in the room's network (a /24 or larger): .1 the room's own side (the bridge,
which also has an IPv6 ULA), .2 this host's side of the uplink (where labmetal listens),
and the DHCP pool from .100 for every seat: QEMU seats' firmware and light seats alike ask
labmetal's dnsmasq for their address at each power-on, as PCs do, and labmetal binds a
seat's secrets to that lease (labmetal/leases.py).
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import requests

from labmetal.lab.network import Lab, in_namespace, remove_leftovers, remove_namespace
from labmetal.lab.qemu_seat import PROFILES, QemuSeatSpec
from labmetal.lab.seat import LightSeatSpec, SeatSpec, save_seats, seat_kind

STATE_FILE = "room.json"
SEATS_FILE = "seats.json"
MIB = 1024 * 1024
_RATE = re.compile(r"^(\d+(?:\.\d+)?)([a-z]+)$")
_ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|[@-Z\\-_])")
READY = {"bmc": "virtual BMC(s) on", "wol": "listening for magic packets"}
Out = Callable[[str], None]


@dataclass(frozen=True)
class RoomPlan:
    """What the user asked for."""
    name: str
    state_dir: Path
    qemu_seats: int = 0
    light_seats: int = 0
    power: str = "ipmi"  # ipmi | wol
    subnet: str = "10.99.1.0/24"
    seat_rate: str | None = "100mbit"
    uplink_rate: str | None = None  # default: 10 x seat_rate, a teaching room's ratio
    labmetal_port: int = 6385
    disk_mib: int = 8192  # sparse; the agent installs to disks of 4 GiB or more
    memory_mib: int = 1024
    profile: str = "bios"  # the QEMU seats' firmware: bios | uefi | secureboot
    keep_disks: bool = False
    bmc_user: str = "admin"
    bmc_password: str = field(default_factory=lambda: secrets.token_urlsafe(9))

    def __post_init__(self) -> None:
        if self.power not in ("ipmi", "wol"):
            raise ValueError(f"power must be ipmi or wol, not {self.power!r}")
        if self.qemu_seats < 0 or self.light_seats < 0 or self.qemu_seats + self.light_seats < 1:
            raise ValueError("a room needs at least one seat")
        if self.network.prefixlen > 24:
            raise ValueError(f"the room's subnet must be a /24 or larger, not {self.subnet}")
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {', '.join(PROFILES)}, not {self.profile!r}")
        pool = self.network.num_addresses - 101  # .100 up to the broadcast address
        if self.qemu_seats + self.light_seats > pool:
            raise ValueError(f"at most {pool} seats in a {self.subnet} room (the DHCP pool "
                             "from .100)")
        for rate in (self.seat_rate, self.uplink_rate):
            if rate and not _RATE.match(rate):
                raise ValueError(f"a rate looks like 100mbit or 1gbit, not {rate!r}")

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    def address(self, host: int) -> ipaddress.IPv4Address:
        return self.network.network_address + host

    @property
    def uplink(self) -> str | None:
        if self.uplink_rate or not self.seat_rate:
            return self.uplink_rate
        number, unit = _RATE.match(self.seat_rate).groups()  # type: ignore[union-attr]
        return f"{float(number) * 10:g}{unit}"

    @property
    def address6(self) -> str:
        """A ULA on the bridge, from which dnsmasq can construct router advertisements:
        without them iPXE waits ~16 s for IPv6 at every boot."""
        octets = self.network.network_address.packed
        return f"fd99:{octets[1]:x}:{octets[2]:x}::1/64"

    def mac(self, seat: int) -> str:
        """52:54:00 (QEMU's prefix), the subnet's 2nd and 3rd octets, the seat's number."""
        octets = self.network.network_address.packed
        return f"52:54:00:{octets[1]:02x}:{octets[2]:02x}:{seat:02x}"


@dataclass
class RoomState:
    """The state file (``<state_dir>/room.json``)."""
    room: str
    pid: int  # the `lab up` process, and its start time (pids get reused)
    pid_start: int
    state_dir: str
    namespace: str
    bridge: str
    uplink: str  # this host's side of the uplink
    host_address: str
    network: str
    broadcast: str
    power: str
    bmc_user: str
    bmc_password: str
    keep_disks: bool
    seats: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)  # for `labmetal serve`
    namespaces: list[str] = field(default_factory=list)
    processes: dict[str, list[int]] = field(default_factory=dict)  # name: [pid, start]
    created_disks: list[str] = field(default_factory=list)

    def save(self) -> None:
        path = Path(self.state_dir) / STATE_FILE
        partial = path.with_name(STATE_FILE + ".new")
        partial.write_text(json.dumps(asdict(self), indent=1))
        partial.chmod(0o600)  # holds the BMC password
        os.replace(partial, path)

    @staticmethod
    def load(state_dir: Path) -> RoomState:
        path = Path(state_dir) / STATE_FILE
        if not path.exists():
            raise FileNotFoundError(f"no room in {state_dir} (no {STATE_FILE})")
        return RoomState(**json.loads(path.read_text()))


def serve_command(settings: dict[str, str]) -> str:
    return "labmetal serve " + " ".join(f"--{key.replace('_', '-')} {value}"
                                        for key, value in settings.items())


# -- lab up ---------------------------------------------------------------------------------

class RoomRunner:
    """One `lab up`: build, start, supervise, tear down."""

    def __init__(self, plan: RoomPlan, out: Out = print):
        self.plan = plan
        self.out = out
        self.lab = Lab()
        self.stop = threading.Event()
        self.children: dict[str, subprocess.Popen] = {}
        self.state: RoomState | None = None

    def build(self) -> RoomState:
        plan, lab = self.plan, self.lab
        state_dir = plan.state_dir.resolve()
        prefix = plan.network.prefixlen
        room = lab.add_room(plan.name, server=f"{plan.address(1)}/{prefix}",
                            server6=plan.address6)
        host = str(plan.address(2))
        uplink = lab.add_uplink(room, f"{host}/{prefix}", rate=plan.uplink)
        seat_url = f"http://{host}:{plan.labmetal_port}"
        self.state = state = RoomState(
            room=plan.name, pid=os.getpid(), pid_start=start_time(os.getpid()) or 0,
            state_dir=str(state_dir), namespace=room.namespace, bridge=room.bridge,
            uplink=uplink, host_address=host, network=str(plan.network),
            broadcast=str(plan.network.broadcast_address), power=plan.power,
            bmc_user=plan.bmc_user, bmc_password=plan.bmc_password, keep_disks=plan.keep_disks,
            settings={"listen": f"{host}:{plan.labmetal_port}", "seat_url": seat_url,
                      "tftp_listen": f"{host}:69", "dhcp_namespace": room.namespace,
                      "dhcp_interface": room.bridge, "dhcp_network": str(plan.network),
                      "dhcp_pool": f"{plan.address(100)},"
                                   f"{plan.network.broadcast_address - 1}"},
            namespaces=lab.made)  # the Lab's own list: saved as it grows
        count = plan.qemu_seats + plan.light_seats
        ports = _free_udp_ports(count) if plan.power == "ipmi" else [None] * count
        specs: list[SeatSpec] = []
        for number in range(1, count + 1):
            name, mac = f"{plan.name}-pc{number}", plan.mac(number)
            seat_dir = state_dir / "seats" / name
            seat_dir.mkdir(parents=True, exist_ok=True)
            disk = seat_dir / "disk.img"
            if not disk.exists():  # a disk kept from an earlier run is used again
                state.created_disks.append(str(disk))
                state.save()
                with open(disk, "wb") as sparse:
                    sparse.truncate(plan.disk_mib * MIB)
            port = ports[number - 1]
            if number <= plan.qemu_seats:
                tap = lab.add_tap(room, f"q{number}", rate=plan.seat_rate)
                specs.append(QemuSeatSpec(name, room.namespace, tap, mac, str(disk),
                                          str(seat_dir), plan.memory_mib, port, plan.profile))
            else:
                seat = lab.add_seat(room, f"s{number}", mac, rate=plan.seat_rate)
                specs.append(LightSeatSpec(name, seat.namespace, mac, str(disk), seat_url,
                                           str(seat_dir), bmc_port=port, dhcp=True))
        save_seats(state_dir / SEATS_FILE, specs)
        state.seats = [{"name": spec.name, "kind": seat_kind(spec), "mac": spec.mac,
                        "bmc_port": spec.bmc_port, "disk": spec.disk,
                        "console_log": str(Path(spec.state_dir) / "console.log"),
                        "state_dir": spec.state_dir, "namespace": spec.namespace}
                       for spec in specs]
        state.save()
        return state

    def start_child(self, name: str) -> None:
        state = self.state
        assert state is not None
        seats = str(Path(state.state_dir) / SEATS_FILE)
        labmetal = [sys.executable, "-m", "labmetal.cli", "lab"]
        if name == "bmc":
            argv = [*labmetal, "bmc", "--seats", seats, "--address", "127.0.0.1",
                    f"--user={state.bmc_user}", f"--password={state.bmc_password}"]
        else:  # the room's broadcasts reach the bridge, in the room's namespace
            argv = in_namespace(state.namespace, [*labmetal, "wol", "--address", "0.0.0.0",
                                                  "--port", "9", "--seats", seats])
        log_path = Path(state.state_dir) / f"{name}.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as log:
            child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=die_with_parent)
        self.children[name] = child
        state.processes[name] = [child.pid, start_time(child.pid) or 0]
        state.save()
        deadline = time.monotonic() + 30
        while READY[name] not in _read_from(log_path, offset):
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the {name} process did not start; see {log_path}:\n"
                                   f"{_read_from(log_path, offset)[-2000:]}")
            time.sleep(0.1)

    def supervise(self) -> None:
        """Until asked to stop: a BMC or WoL process that dies is started again, after the
        seats it powered are switched off (the new one would not know them)."""
        while not self.stop.wait(1.0):
            for name, child in list(self.children.items()):
                if child.poll() is None:
                    continue
                self.out(f"the {name} process (pid {child.pid}) exited with {child.returncode};"
                         " switching the seats off and starting it again")
                self.power_off_seats()
                self.start_child(name)

    def power_off_seats(self) -> None:
        state = self.state
        assert state is not None
        for seat in state.seats:
            for pid in seat_pids(seat):
                _kill(pid)

    def teardown(self) -> None:
        """Stop the children (they switch their seats off), then remove the namespaces
        (and whatever still runs in them) and the files this run created."""
        for child in self.children.values():
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM)
        for child in self.children.values():
            try:
                child.wait(timeout=45)  # a light seat's agent may take 30 s to stop
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait(timeout=10)
        self.lab.close()
        if self.state is not None:
            remove_files(self.state)


def up(plan: RoomPlan, api: str | None = None, deploy_kernel: str | None = None,
       deploy_ramdisk: str | None = None, api_wait: float = 300, out: Out = print) -> int:
    runner = RoomRunner(plan, out)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: runner.stop.set())
    plan.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        recover(plan.state_dir, out)
    except RuntimeError as error:
        out(f"labmetal lab up: error: {error}")
        return 1
    remove_leftovers()  # of crashed runs elsewhere: their subnets may be ours
    try:
        state = runner.build()
        runner.start_child("bmc" if plan.power == "ipmi" else "wol")
        report_up(state, out)
        if api and not runner.stop.is_set():
            errors = enroll(api, state, deploy_kernel, deploy_ramdisk, runner.stop,
                            api_wait, out)
            for problem in errors:
                out(f"enroll: error: {problem}")
        runner.supervise()
        return 0
    except (RuntimeError, ValueError, OSError) as error:
        out(f"labmetal lab up: error: {error}")
        return 1
    finally:
        out(f"room {plan.name}: stopping")
        runner.teardown()
        out(f"room {plan.name} is down")


def report_up(state: RoomState, out: Out) -> None:
    out(f"room {state.room} is up: namespace {state.namespace}, bridge {state.bridge}, "
        f"network {state.network}; this host is {state.host_address} (uplink {state.uplink})")
    for seat in state.seats:
        power = (f"BMC 127.0.0.1:{seat['bmc_port']} ({state.bmc_user})" if seat["bmc_port"]
                 else f"WoL {state.broadcast}:9")
        out(f"  {seat['name']:<10} {seat['kind']:<6} {seat['mac']}  {power}")
    out("serve this room with:")
    out(f"  {serve_command(state.settings)}")
    out("  (enrolled seats get DHCP; LABMETAL_SELF_REGISTRATION=true answers unknown ones;")
    out("   it has accounts: `labmetal user set NAME --password-stdin --local` first,")
    out("   and LABMETAL_USER/LABMETAL_PASSWORD for `lab up --api`)")
    out(f"state file: {Path(state.state_dir) / STATE_FILE}; stop with Ctrl-C or "
        f"`labmetal lab down --state-dir {state.state_dir}`")


# -- enrollment -----------------------------------------------------------------------------

def enroll(api: str, state: RoomState, deploy_kernel: str | None, deploy_ramdisk: str | None,
           stop: threading.Event, wait: float = 300, out: Out = print) -> list[str]:
    """Enroll every seat not enrolled yet (by MAC) into the labmetal at ``api``, waiting up
    to ``wait`` seconds for it to answer. Returns the errors, one line each."""
    api = api.rstrip("/")
    session = requests.Session()
    session.headers["X-OpenStack-Ironic-API-Version"] = "latest"
    user = os.environ.get("LABMETAL_USER")
    if user:  # a service with accounts (the default): an admin's, from the environment
        session.auth = (user, os.environ.get("LABMETAL_PASSWORD", ""))
    deadline = time.monotonic() + wait
    waiting_said = False
    while True:
        try:
            session.get(f"{api}/v1", timeout=5).raise_for_status()
            break
        except requests.RequestException as error:
            if stop.is_set():
                return []
            if time.monotonic() > deadline:
                return [f"labmetal did not answer at {api} within {wait:g} s "
                        f"({type(error).__name__}); no seat enrolled"]
            if not waiting_said:
                out(f"waiting for labmetal at {api} to enroll the seats")
                waiting_said = True
            stop.wait(1.0)
    errors = []
    for seat in state.seats:
        try:
            errors += _enroll_seat(session, api, state, seat, deploy_kernel, deploy_ramdisk, out)
        except requests.RequestException as error:
            errors.append(f"{seat['name']}: {error}")
    return errors


def _enroll_seat(session: requests.Session, api: str, state: RoomState, seat: dict[str, Any],
                 deploy_kernel: str | None, deploy_ramdisk: str | None, out: Out) -> list[str]:
    name, mac = seat["name"], seat["mac"]
    ports = session.get(f"{api}/v1/ports", params={"address": mac}, timeout=30)
    if not ports.ok:
        return [f"{name}: listing ports: {_api_error(ports)}"]
    if ports.json()["ports"]:
        out(f"{name} ({mac}) is already enrolled")
        return []
    if seat["bmc_port"]:
        driver, info = "ipmi", {"ipmi_address": "127.0.0.1", "ipmi_port": seat["bmc_port"],
                                "ipmi_username": state.bmc_user,
                                "ipmi_password": state.bmc_password}
    else:
        driver, info = "wol", {"wol_host": state.broadcast, "wol_port": 9}
    info.update({key: value for key, value in (("deploy_kernel", deploy_kernel),
                                               ("deploy_ramdisk", deploy_ramdisk)) if value})
    node = session.post(f"{api}/v1/nodes", timeout=30,
                        json={"name": name, "driver": driver, "driver_info": info})
    if node.status_code != 201:
        return [f"{name}: creating the node: {_api_error(node)}"]
    uuid = node.json()["uuid"]
    port = session.post(f"{api}/v1/ports", json={"address": mac, "node_uuid": uuid}, timeout=30)
    if port.status_code != 201:
        session.delete(f"{api}/v1/nodes/{uuid}", timeout=30)  # no half-enrolled seat
        return [f"{name}: adding port {mac}: {_api_error(port)}"]
    out(f"enrolled {name} ({mac}, {driver}) as node {uuid}")
    return []


def _api_error(response: requests.Response) -> str:
    try:
        fault = json.loads(response.json()["error_message"])["faultstring"]
        return f"{response.status_code} {fault}"
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code} {response.text[:200]}"


# -- lab down, recovery ---------------------------------------------------------------------

def down(state_dir: Path, timeout: float = 90, out: Out = print) -> int:
    state = RoomState.load(state_dir)
    if _running(state.pid, state.pid_start):
        os.kill(state.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _running(state.pid, state.pid_start):
            if time.monotonic() > deadline:
                out(f"room {state.room}: `lab up` (pid {state.pid}) still runs after "
                    f"{timeout:g} s")
                return 1
            time.sleep(0.2)
        if not (Path(state_dir) / STATE_FILE).exists():
            out(f"room {state.room} is down")
            return 0
    recover(state_dir, out)
    return 0


def recover(state_dir: Path, out: Out = print) -> None:
    """Remove what a `lab up` that is gone (killed, crashed) left in ``state_dir``: its
    processes, namespaces (with the taps, veths, QEMU and seat processes in them), uplink
    and files. A room still up there is an error."""
    try:
        state = RoomState.load(state_dir)
    except FileNotFoundError:
        return
    if _running(state.pid, state.pid_start):
        raise RuntimeError(f"room {state.room} is up in {state_dir} (pid {state.pid}); "
                           f"`labmetal lab down --state-dir {state_dir}` first")
    for pid, start in state.processes.values():
        if _running(pid, start):
            _kill(pid)
    for namespace in state.namespaces:
        remove_namespace(namespace)
    subprocess.run(["ip", "link", "del", state.uplink], capture_output=True, timeout=30)
    remove_files(state)
    out(f"room {state.room}: removed what the run of pid {state.pid} left")


def remove_files(state: RoomState) -> None:
    """Everything this room wrote under its state dir, but the seat disks it did not
    create, or all of them with ``keep_disks``."""
    state_dir = Path(state.state_dir)
    for seat in state.seats:
        seat_dir = Path(seat["state_dir"])
        keep = state.keep_disks or seat["disk"] not in state.created_disks
        for path in seat_dir.iterdir() if seat_dir.is_dir() else ():
            if keep and str(path) == seat["disk"]:
                continue
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        if seat_dir.is_dir() and not any(seat_dir.iterdir()):
            seat_dir.rmdir()
    if not state.keep_disks:
        for disk in state.created_disks:  # of seats a crash left unrecorded
            Path(disk).unlink(missing_ok=True)
    seats_dir = state_dir / "seats"
    if seats_dir.is_dir() and not any(seats_dir.iterdir()):
        seats_dir.rmdir()
    for name in (SEATS_FILE, "bmc.log", "wol.log", STATE_FILE + ".new", STATE_FILE):
        (state_dir / name).unlink(missing_ok=True)


# -- lab status -----------------------------------------------------------------------------

def status(state_dir: Path) -> dict[str, Any]:
    state = RoomState.load(state_dir)
    seats = [{"name": seat["name"], "kind": seat["kind"], "mac": seat["mac"],
              "power": "on" if seat_pids(seat) else "off", "bmc_port": seat["bmc_port"],
              "console": last_console_line(Path(seat["console_log"]))}
             for seat in state.seats]
    return {"room": state.room, "up": _running(state.pid, state.pid_start), "pid": state.pid,
            "network": state.network, "power": state.power, "settings": state.settings,
            "seats": seats}


def format_status(report: dict[str, Any]) -> str:
    lines = [f"room {report['room']}: {'up' if report['up'] else 'NOT RUNNING'} "
             f"(pid {report['pid']}), {report['network']}, power {report['power']}",
             f"{'SEAT':<10} {'KIND':<6} {'MAC':<18} {'POWER':<6} {'BMC':<6} CONSOLE"]
    for seat in report["seats"]:
        lines.append(f"{seat['name']:<10} {seat['kind']:<6} {seat['mac']:<18} "
                     f"{seat['power']:<6} {seat['bmc_port'] or '-'!s:<6} {seat['console']}")
    return "\n".join(lines)


def seat_pids(seat: dict[str, Any]) -> list[int]:
    """The processes that make a seat "on": its QEMU (found by ``-name`` in the room's
    namespace), or whatever runs in a light seat's own namespace."""
    pids = namespace_pids(seat["namespace"])
    if seat["kind"] != "qemu":
        return pids
    wanted = f"\0-name\0{seat['name']}\0".encode()
    found = []
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if wanted in b"\0" + cmdline:
            found.append(pid)
    return found


def last_console_line(path: Path) -> str:
    """The console's last line of text, without terminal escapes."""
    try:
        with open(path, "rb") as console:
            console.seek(max(0, console.seek(0, os.SEEK_END) - 4096))
            tail = console.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", _ANSI.sub("", line)).strip()
             for line in re.split(r"[\r\n]", tail)]
    return next((line for line in reversed(lines) if line), "")


# -- processes ------------------------------------------------------------------------------

def namespace_pids(namespace: str) -> list[int]:
    result = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True,
                            timeout=30)
    return [int(pid) for pid in result.stdout.split()] if result.returncode == 0 else []


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot) if it is alive and not a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[19])


def _running(pid: int, start: int) -> bool:
    return start_time(pid) == start


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def die_with_parent() -> None:
    """In the child before exec: SIGTERM when `lab up` dies, even by SIGKILL, so its BMCs
    switch their seats off and stop."""
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")
    except OSError:
        return ""


def _free_udp_ports(count: int) -> list[int]:
    """``count`` UDP ports free on 127.0.0.1 for the virtual BMCs."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
