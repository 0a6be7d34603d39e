"""A room for deploy tests: namespaces and a bridge, light seats (agent processes with a
disk file) behind virtual BMCs or a Wake-on-LAN listener, and labmetal cabled into the room
through an uplink. Everything is real but the PCs' firmware (lab/firmware.py)."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from labmetal.lab.network import Lab, Room, in_namespace
from labmetal.lab.seat import LightSeatSpec
from labmetal.lab.harness import (LABMETAL, Processes, Service, free_udp_range, start_service,
                                  wait_for)

MIB = 1024 * 1024
BMC_PASSWORD = "room-bmc-pw"


def sha256_of(path: Path, length: int | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as data:
        remaining = length if length is not None else os.path.getsize(path)
        while remaining > 0:
            block = data.read(min(MIB, remaining))
            if not block:
                break
            digest.update(block)
            remaining -= len(block)
    return digest.hexdigest()


def make_rootfs(work: Path, size_mib: int = 24, marker: str = "tp-reseaux",
                random_mib: int = 2) -> Path:
    """An ext4 file system with real files (text, a binary, random data)."""
    tree = work / f"tree-{marker}"
    (tree / "etc").mkdir(parents=True, exist_ok=True)
    (tree / "etc/hostname").write_text(marker + "\n")
    shutil.copy("/etc/os-release", tree / "etc/os-release")
    (tree / "usr/bin").mkdir(parents=True, exist_ok=True)
    shutil.copy(sys.executable, tree / "usr/bin/python3")
    (tree / "srv").mkdir(exist_ok=True)
    (tree / "srv/course.bin").write_bytes(os.urandom(random_mib * MIB))
    rootfs = work / f"{marker}.rootfs.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", marker[:16], "-d", str(tree), str(rootfs),
                    f"{size_mib}M"], check=True, capture_output=True)
    return rootfs


def make_whole_disk(work: Path, size_mib: int = 40, marker: str = "tp-reseaux",
                    random_mib: int = 2) -> Path:
    """A whole-disk image: msdos label, one partition holding make_rootfs()'s file system."""
    rootfs = make_rootfs(work, size_mib - 16, marker, random_mib)
    disk = work / f"{marker}.disk.img"
    with open(disk, "wb") as out:
        out.truncate(size_mib * MIB)
    subprocess.run(["parted", "-s", str(disk), "mklabel", "msdos", "mkpart", "primary", "ext4",
                    "1MiB", f"{size_mib - 15}MiB", "set", "1", "boot", "on"], check=True,
                   capture_output=True)
    with open(disk, "r+b") as out, open(rootfs, "rb") as fs:
        out.seek(MIB)
        shutil.copyfileobj(fs, out)
    return disk


@dataclass
class TestRoom:
    __test__ = False  # a helper whose name starts with "Test", not a test class
    lab: Lab
    room: Room
    service: Service
    procs: Processes
    workdir: Path
    seats: list[LightSeatSpec] = field(default_factory=list)
    power: str = "ipmi"

    @property
    def broadcast(self) -> str:
        return str(self.room.network.broadcast_address)

    def api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return requests.request(method, self.service.url + path, timeout=60,
                                headers={"X-OpenStack-Ironic-API-Version": "latest"}, **kwargs)

    def upload(self, name: str, kind: str, path: Path, **fields: Any) -> dict:
        created = self.api("POST", "/v1/images", json={"name": name, "kind": kind, **fields})
        assert created.status_code == 201, created.text
        with open(path, "rb") as data:
            uploaded = self.api("PUT", f"/v1/images/{name}/data", data=data)
        assert uploaded.status_code == 200, uploaded.text
        return uploaded.json()

    def upload_deploy_ramdisk(self) -> None:
        """Light seats do not boot a kernel; any files do as the deploy kernel and ramdisk
        the boot scripts point at (real ones are built by images/ramdisk.py)."""
        for kind in ("kernel", "ramdisk"):
            path = self.workdir / f"deploy.{kind}"
            path.write_bytes(os.urandom(4096))
            self.upload(f"deploy-{kind}", kind, path)

    def enroll(self, spec: LightSeatSpec, manage_and_provide: bool = True) -> dict:
        if self.power == "ipmi":
            driver, info = "ipmi", {"ipmi_address": "127.0.0.1", "ipmi_port": spec.bmc_port,
                                    "ipmi_username": "admin", "ipmi_password": BMC_PASSWORD}
        else:
            driver, info = "wol", {"wol_host": self.broadcast, "wol_port": 9}
        info.update(deploy_kernel="deploy-kernel", deploy_ramdisk="deploy-ramdisk")
        node = self.api("POST", "/v1/nodes", json={"driver": driver, "name": spec.name,
                                                    "driver_info": info})
        assert node.status_code == 201, node.text
        port = self.api("POST", "/v1/ports", json={"address": spec.mac,
                                                    "node_uuid": node.json()["uuid"]})
        assert port.status_code == 201, port.text
        if manage_and_provide:
            for verb, goal in (("manage", "manageable"), ("provide", "available")):
                response = self.api("PUT", f"/v1/nodes/{spec.name}/states/provision",
                                    json={"target": verb})
                assert response.status_code == 202, response.text
                self.service.wait_node(spec.name, lambda n: n["provision_state"] == goal  # noqa: B023 (called in this iteration)
                                       and not n["reservation"], timeout=30, what=goal)
        return self.service.node(spec.name)

    def choose_image(self, seat: LightSeatSpec, image: str, deploy_interface: str | None = None
                     ) -> None:
        """What the next deploy of ``seat`` writes (and how)."""
        patch = [{"op": "add", "path": "/instance_info/image_source", "value": image}]
        if deploy_interface:
            patch.append({"op": "replace", "path": "/deploy_interface",
                          "value": deploy_interface})
        response = self.api("PATCH", f"/v1/nodes/{seat.name}", json=patch)
        assert response.status_code == 200, response.text

    def provision(self, name: str, verb: str, **body: Any) -> requests.Response:
        return self.api("PUT", f"/v1/nodes/{name}/states/provision", json={"target": verb, **body})

    def wait_state(self, name: str, *goals: str, timeout: float = 120) -> dict:
        return self.service.wait_node(
            name, lambda n: n["provision_state"] in goals and not n["reservation"],
            timeout=timeout, what=" or ".join(goals))

    def console(self, spec: LightSeatSpec) -> str:
        path = Path(spec.state_dir) / "console.log"
        return path.read_text(errors="replace") if path.exists() else ""


def open_room(lab: Lab, procs: Processes, workdir: Path, index: int, seats: int,
              power: str = "ipmi", disk_mib: int = 64, dhcp: bool = False,
              script_attempts: int = 30, post_seconds: float = 0.0,
              **settings: Any) -> TestRoom:
    """Room 10.99.<index>.0/24: labmetal at .2 (the uplink), seats from .11; with ``dhcp``,
    labmetal's dnsmasq serves the room (pool .100-.200) and the seats ask it for their
    address at each network boot, as PCs do."""
    room = lab.add_room(f"r{index}", server=f"10.99.{index}.1/24")
    host = f"10.99.{index}.2"
    lab.add_uplink(room, f"{host}/24")
    settings = {"callback_timeout": 60, "agent_timeout": 15, **settings}
    if dhcp:
        settings.update(dhcp_interface=room.bridge, dhcp_namespace=room.namespace,
                        dhcp_network=f"10.99.{index}.0/24",
                        dhcp_pool=f"10.99.{index}.100,10.99.{index}.200")
    service = start_service(procs, f"room{index}", host=host, **settings)
    test_room = TestRoom(lab, room, service, procs, workdir, power=power)
    first_port = free_udp_range(seats)
    for i in range(seats):
        mac = f"52:54:00:99:{index:02x}:{i + 1:02x}"
        seat = lab.add_seat(room, f"s{i + 1}", mac,
                            address=None if dhcp else f"10.99.{index}.{11 + i}/24")
        disk = workdir / f"seat{i + 1}.disk"
        with open(disk, "wb") as out:
            out.truncate(disk_mib * MIB)
        test_room.seats.append(LightSeatSpec(
            name=f"pc{index}-{i + 1}", namespace=seat.namespace, mac=mac, disk=str(disk),
            boot_url=service.url, state_dir=str(workdir / f"seat{i + 1}"),
            bmc_port=first_port + i, dhcp=dhcp, script_attempts=script_attempts,
            post_seconds=post_seconds))
    specs = workdir / "seats.json"
    LightSeatSpec.save_all(specs, test_room.seats)
    if power == "ipmi":
        bmc = procs.start([LABMETAL, "lab", "bmc", "--seats", str(specs), "--user", "admin",
                           "--password", BMC_PASSWORD], f"bmcs{index}")
        bmc.wait_for_output("virtual BMC(s) on", timeout=30)
    else:
        listener = procs.start(in_namespace(room.namespace, [
            LABMETAL, "lab", "wol", "--address", "0.0.0.0", "--port", "9", "--seats",
            str(specs)]), f"wol{index}")
        listener.wait_for_output("listening for magic packets", timeout=30)
    wait_for(lambda: requests.get(service.url + "/", timeout=5).ok, 10, "the API")
    return test_room
