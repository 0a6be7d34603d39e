"""Rooms made by `labmetal lab up` for tests, and a labmetal service started with the
settings the room printed (DHCP in the room, listening on its uplink)."""
from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import requests

from labmetal.lab.network import Lab, Room, in_namespace, namespaces, remove_namespace, run_in
from labmetal.lab.room import STATE_FILE, recover
from labmetal.lab.harness import LABMETAL, Proc, Processes, free_port, service_env, wait_for

BMC_PASSWORD = "room-pw"
LATEST = {"X-OpenStack-Ironic-API-Version": "latest"}
BOOT_TIMEOUT = 420  # TCG on 2 shared cores; most boots take under a minute


@dataclass
class UpRoom:
    proc: Proc
    state_dir: Path
    state: dict[str, Any]

    def seat(self, kind: str) -> dict[str, Any]:
        return next(seat for seat in self.state["seats"] if seat["kind"] == kind)

    def console(self, seat: dict[str, Any]) -> str:
        path = Path(seat["console_log"])
        return path.read_text(errors="replace") if path.exists() else ""


def lab_up(procs: Processes, state_dir: Path, name: str, subnet: str, *options: str,
           log_name: str = "lab-up") -> UpRoom:
    proc = procs.start([LABMETAL, "lab", "up", "--name", name, "--subnet", subnet,
                        "--state-dir", str(state_dir), "--bmc-password", BMC_PASSWORD,
                        *options], log_name)
    proc.wait_for_output(f"room {name} is up", timeout=60)
    return UpRoom(proc, state_dir, json.loads((state_dir / STATE_FILE).read_text()))


def tear_down(room: UpRoom) -> None:
    """SIGTERM to `lab up` (it tears its room down), then whatever a crash left: the
    processes it recorded and its namespaces (named after its PID)."""
    room.proc.stop(timeout=60)
    if (room.state_dir / STATE_FILE).exists():
        recover(room.state_dir, out=lambda line: None)
    for namespace in namespaces():
        if namespace.startswith(f"lmt-{room.state['pid']}-"):
            remove_namespace(namespace)


def start_labmetal(procs: Processes, workdir: Path, settings: dict[str, Any],
                   name: str = "labmetal") -> Proc:
    """`labmetal serve` with the settings `lab up` printed (listen, DHCP in the room)."""
    env = service_env(state_dir=workdir / name, log_file=workdir / f"{name}.log",
                      hostname=f"{name}-service",
                      **{"auth": "noauth", "allow_noauth": "true", **settings})
    proc = procs.start([LABMETAL, "serve"], name, env)
    proc.wait_for_output("listening on http://", timeout=60)
    return proc


class StandIn:
    """HTTP as a seat of the room sends it: from a namespace on the room's switch with the
    seat's MAC and the address labmetal's DHCP leased to it (the service gives a seat's
    secrets and its login only to that address, api/seat_address.py)."""

    def __init__(self, namespace: str, address: str):
        self.namespace = namespace
        self.address = address

    def get(self, url: str, auth: tuple[str, str] | None = None) -> requests.Response:
        return self.request("GET", url, auth)

    def request(self, method: str, url: str, auth: tuple[str, str] | None = None,
                json_body: Any = None, verify: str | bool = True) -> requests.Response:
        """The request made from the seat's address; the answer's status, headers, text."""
        code = ("import json, sys, requests\n"
                "args = json.load(sys.stdin)\n"
                "r = requests.request(args['method'], args['url'], json=args['json'],"
                " auth=args['auth'] and tuple(args['auth']), verify=args['verify'],"
                " timeout=60)\n"
                "print(json.dumps({'status': r.status_code, 'headers': dict(r.headers),"
                " 'text': r.text}))\n")
        done = subprocess.run(in_namespace(self.namespace, [sys.executable, "-c", code]),
                              input=json.dumps({"method": method, "url": url, "auth": auth,
                                                "json": json_body, "verify": verify}),
                              text=True, capture_output=True, timeout=120, check=True)
        answer = json.loads(done.stdout)
        response = requests.Response()
        response.status_code = answer["status"]
        response.headers.update(answer["headers"])
        response._content = answer["text"].encode()  # a Response as requests would give
        response.encoding = "utf-8"
        return response


@contextmanager
def stand_in(room: UpRoom, seat: dict[str, Any]) -> Iterator[StandIn]:
    """The seat, powered off, stood in for by a namespace cabled to the room's switch with
    its MAC, which asks labmetal's DHCP for its address as the seat's firmware does. Only
    while the seat is off: two ports with one MAC on a switch would confuse it."""
    network = ipaddress.IPv4Network(room.state["network"])
    switch = Room(room.state["room"], room.state["namespace"], room.state["bridge"],
                  ipaddress.IPv4Interface(f"{network.network_address + 1}/{network.prefixlen}"))
    with Lab() as lab:
        double = lab.add_seat(switch, "standin", seat["mac"])
        run_in(double.namespace, [sys.executable, "-c",
                                  "import sys, pathlib, tempfile\n"
                                  "from labmetal.lab.firmware import dhcp\n"
                                  "dhcp('eth0', pathlib.Path(tempfile.mkdtemp()))\n"],
               timeout=180)
        shown = run_in(double.namespace, ["ip", "-4", "-o", "addr", "show", "eth0"]).stdout
        address = shown.split(" inet ", 1)[1].split("/", 1)[0]
        yield StandIn(double.namespace, address)


class Labmetal:
    """The API of the service serving one room (as ``auth``, where it has accounts)."""

    def __init__(self, url: str, auth: tuple[str, str] | None = None):
        self.url = url
        self.auth = auth

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("auth", self.auth)
        return requests.request(method, self.url + path, headers=LATEST, timeout=60, **kwargs)

    def node(self, name: str) -> dict[str, Any]:
        response = self.call("GET", f"/v1/nodes/{name}")
        assert response.status_code == 200, response.text
        return response.json()

    def upload(self, name: str, kind: str, path: Path, **links: str) -> None:
        created = self.call("POST", "/v1/images", json={"name": name, "kind": kind, **links})
        assert created.status_code == 201, created.text
        with open(path, "rb") as data:
            uploaded = self.call("PUT", f"/v1/images/{name}/data", data=data)
        assert uploaded.status_code == 200, uploaded.text

    def enroll(self, room: UpRoom, seat: dict[str, Any], provide: bool = True) -> None:
        if room.state["power"] == "ipmi":
            driver, info = "ipmi", {"ipmi_address": "127.0.0.1", "ipmi_port": seat["bmc_port"],
                                    "ipmi_username": "admin", "ipmi_password": BMC_PASSWORD}
        else:
            driver, info = "wol", {"wol_host": room.state["broadcast"], "wol_port": 9}
        node = self.call("POST", "/v1/nodes", json={"driver": driver, "name": seat["name"],
                                                     "driver_info": info})
        assert node.status_code == 201, node.text
        port = self.call("POST", "/v1/ports", json={"address": seat["mac"],
                                                    "node_uuid": node.json()["uuid"]})
        assert port.status_code == 201, port.text
        self.provision(seat["name"], "manage", "manageable")
        if provide:
            self.provision(seat["name"], "provide", "available")

    def provision(self, name: str, verb: str, *goals: str, timeout: float = 60,
                  **body: Any) -> dict[str, Any]:
        response = self.call("PUT", f"/v1/nodes/{name}/states/provision",
                             json={"target": verb, **body})
        assert response.status_code == 202, response.text
        return self.wait(name, *goals, timeout=timeout)

    def wait(self, name: str, *goals: str, timeout: float = BOOT_TIMEOUT) -> dict[str, Any]:
        node = wait_for(lambda: (lambda n: n if n["provision_state"] in goals and not
                                 n["reservation"] else None)(self.node(name)),
                        timeout, f"{name} to reach {' or '.join(goals)}", interval=0.5)
        return node

    def deploy(self, name: str, image: str, interface: str = "direct") -> dict[str, Any]:
        patched = self.call("PATCH", f"/v1/nodes/{name}", json=[
            {"op": "add", "path": "/instance_info/image_source", "value": image},
            {"op": "replace", "path": "/deploy_interface", "value": interface}])
        assert patched.status_code == 200, patched.text
        return self.provision(name, "active", "active", "deploy failed", timeout=BOOT_TIMEOUT)


@contextmanager
def served_room(tmp_path: Path, name: str, subnet: str, ramdisk: Any, *options: str,
                admin: tuple[str, str] | None = None,
                **settings: Any) -> Iterator[tuple[UpRoom, Labmetal]]:
    """A `lab up` room, `labmetal serve` for it (long waits: TCG seats are slow) with the
    deploy ramdisk uploaded as its default; everything stopped and removed after. With
    ``admin`` (name, password), the service has accounts (``http_basic``: what the seat
    login needs) and the API is called as that admin."""
    procs = Processes(tmp_path)
    room = None
    try:
        port = free_port()
        room = lab_up(procs, tmp_path / "room", name, subnet, "--port", str(port), *options)
        if admin is not None:
            subprocess.run([LABMETAL, "user", "set", admin[0], "--role", "admin",
                            "--password-stdin", "--state-dir", str(tmp_path / "labmetal")],
                           input=admin[1] + "\n", check=True, capture_output=True, text=True)
            settings = {"auth": "http_basic", **settings}
        start_labmetal(procs, tmp_path, {**room.state["settings"], "callback_timeout": 900,
                                         "agent_timeout": 120, "deploy_kernel": "deploy-kernel",
                                         "deploy_ramdisk": "deploy-ramdisk", **settings})
        api = Labmetal(f"http://{room.state['settings']['listen']}", admin)
        api.upload("deploy-kernel", "kernel", ramdisk.kernel)
        api.upload("deploy-ramdisk", "ramdisk", ramdisk.initramfs)
        yield room, api
    finally:
        if room is not None:
            tear_down(room)
        procs.stop_all()
