"""Real boots end to end: QEMU seats of a `labmetal lab up` room PXE-boot from labmetal's
dnsmasq and iPXE scripts, run the real deploy ramdisk (images/ramdisk.py), and after the
deploy boot the OS image the agent wrote (lab/osimage.py), which says so on the serial
console with the image's name and the seat's MAC. Power goes through virtual BMCs (IPMI
over UDP) or Wake-on-LAN magic packets."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import wakeonlan

from labmetal.images.ramdisk import build_ramdisk
from labmetal.lab.osimage import build_partition, build_whole_disk, marker_line
from labmetal.lab.served import BOOT_TIMEOUT, Labmetal, UpRoom, served_room
from labmetal.lab.harness import LABMETAL, wait_for

pytestmark = pytest.mark.ramdisk

RAMDISK_CACHE = Path(os.environ.get("LABMETAL_RAMDISK_CACHE", "/var/cache/labmetal/ramdisk"))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Any]:
    """The deploy ramdisk and the two test OS images, built once (cached across runs)."""
    ramdisk = build_ramdisk(RAMDISK_CACHE)
    return {"ramdisk": ramdisk, "whole": build_whole_disk("lab-whole"),
            "partition": build_partition("lab-part")}


def open_room(tmp_path: Path, name: str, subnet: str, images: dict[str, Any],
              *options: str, **settings: Any) -> Iterator[tuple[UpRoom, Labmetal]]:
    with served_room(tmp_path, name, subnet, images["ramdisk"], *options,
                     **{"callback_timeout": 600, "agent_timeout": 60, **settings}) as (room, api):
        whole, partition = images["whole"], images["partition"]
        api.upload("lab-whole", "whole-disk", whole.path)
        api.upload("lab-part-kernel", "kernel", partition.kernel)
        api.upload("lab-part-initrd", "ramdisk", partition.initrd)
        api.upload("lab-part", "partition", partition.rootfs, kernel="lab-part-kernel",
                   ramdisk="lab-part-initrd")
        yield room, api


@pytest.fixture(scope="module")
def ipmi_room(tmp_path_factory, images):
    yield from open_room(tmp_path_factory.mktemp("ipmi-room"), "r70", "10.99.70.0/24", images,
                         "--qemu", "3", "--power", "ipmi")


@pytest.fixture(scope="module")
def wol_room(tmp_path_factory, images):
    yield from open_room(tmp_path_factory.mktemp("wol-room"), "r71", "10.99.71.0/24", images,
                         "--qemu", "2", "--power", "wol", self_registration=True)


def wait_console(room: UpRoom, seat: dict[str, Any], text: str, after: int = 0,
                 timeout: float = 120) -> str:
    return wait_for(lambda: text in room.console(seat)[after:] and room.console(seat), timeout,
                    f"{text!r} on {seat['name']}'s console", interval=0.5)


def seat_named(room: UpRoom, index: int) -> dict[str, Any]:
    return room.state["seats"][index]


def assert_deployed(api: Labmetal, room: UpRoom, seat: dict[str, Any], node: dict[str, Any],
                    marker: str) -> None:
    assert node["provision_state"] == "active", node["last_error"]
    assert node["last_error"] is None
    console = wait_console(room, seat, marker)
    assert "labmetal-agent" in console or "labmetal: loading the deploy ramdisk" in console


def test_an_ipmi_seat_netboots_the_ramdisk_and_boots_the_whole_disk_image(ipmi_room):
    room, api = ipmi_room
    seat = seat_named(room, 0)
    api.enroll(room, seat)
    node = api.deploy(seat["name"], "lab-whole")
    assert_deployed(api, room, seat, node, marker_line("lab-whole", seat["mac"]))
    assert node["power_state"] == "power on"


def test_a_partition_image_boots_through_the_bootloader_the_agent_installed(ipmi_room):
    room, api = ipmi_room
    seat = seat_named(room, 1)
    api.enroll(room, seat)
    node = api.deploy(seat["name"], "lab-part")
    assert_deployed(api, room, seat, node, marker_line("lab-part", seat["mac"], root="/dev/vda1"))


def test_the_iscsi_deploy_writes_through_the_seats_export_and_the_os_boots(ipmi_room):
    room, api = ipmi_room
    seat = seat_named(room, 2)
    api.enroll(room, seat)
    node = api.deploy(seat["name"], "lab-whole", interface="iscsi")
    assert_deployed(api, room, seat, node, marker_line("lab-whole", seat["mac"]))
    events = [e["event"] for e in api.call("GET", f"/v1/nodes/{seat['name']}/history").json()[
        "history"]]
    assert any(e.startswith("image lab-whole written and verified") for e in events)


def test_undeploy_returns_the_seat_and_its_next_boot_finds_no_os(ipmi_room):
    room, api = ipmi_room
    seat = seat_named(room, 0)
    if api.node(seat["name"])["provision_state"] != "active":
        pytest.skip("needs the deploy of the first test")
    marker = marker_line("lab-whole", seat["mac"])
    node = api.provision(seat["name"], "deleted", "available", "clean failed",
                         timeout=BOOT_TIMEOUT)
    assert node["provision_state"] == "available", node["last_error"]
    assert node["power_state"] == "power off"
    since = len(room.console(seat))
    response = api.call("PUT", f"/v1/nodes/{seat['name']}/states/power",
                        json={"target": "power on"})
    assert response.status_code == 202, response.text
    wait_console(room, seat, "No bootable device", after=since, timeout=180)
    assert "nothing to do" in room.console(seat)[since:]
    assert marker not in room.console(seat)[since:]


def test_a_wol_seat_is_inspected_and_deployed_with_power_off_and_reboot_in_band(wol_room):
    room, api = wol_room
    seat = seat_named(room, 0)
    api.enroll(room, seat, provide=False)
    node = api.provision(seat["name"], "inspect", "manageable", "inspect failed",
                         timeout=BOOT_TIMEOUT)
    assert node["provision_state"] == "manageable", node["last_error"]
    assert node["properties"]["cpus"] >= 1 and node["properties"]["memory_mb"] >= 512
    # powered off in-band: the agent switched the guest off, so its QEMU process ended
    wait_for(lambda: not seat_running(room, seat), 120, "the seat to switch itself off")
    api.provision(seat["name"], "provide", "available")
    node = api.deploy(seat["name"], "lab-whole")  # WoL cannot reboot: the agent does
    assert_deployed(api, room, seat, node, marker_line("lab-whole", seat["mac"]))


def test_an_unknown_seat_that_pxe_boots_registers_itself(wol_room):
    room, api = wol_room
    seat = seat_named(room, 1)  # not enrolled: someone presses its power button
    wakeonlan.wake(seat["mac"], host=room.state["broadcast"], port=9,
                   interface=room.state["host_address"])
    def registered() -> dict[str, Any] | None:
        for node in api.call("GET", "/v1/nodes/detail").json()["nodes"]:
            ports = api.call("GET", f"/v1/nodes/{node['uuid']}/ports").json()["ports"]
            if seat["mac"] in [port["address"] for port in ports]:
                return node
        return None
    node = wait_for(registered, BOOT_TIMEOUT, "the seat to register itself", interval=1)
    assert node["provision_state"] == "enroll" and node["driver"] == "wol"
    assert node["name"] == "seat-" + seat["mac"].replace(":", "")
    assert node["properties"]["cpus"] >= 1


def seat_running(room: UpRoom, seat: dict[str, Any]) -> bool:
    """What `labmetal lab status` says about the seat's power."""
    report = subprocess.run([LABMETAL, "lab", "status", "--state-dir", str(room.state_dir),
                             "--json"], capture_output=True, text=True, timeout=60, check=True)
    return next(s for s in json.loads(report.stdout)["seats"]
                if s["name"] == seat["name"])["power"] == "on"
