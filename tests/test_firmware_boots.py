"""Real room PCs' firmware, end to end on QEMU seats that boot the built deploy ramdisk:

* ``secureboot`` seats (OVMF with Secure Boot on and Microsoft's keys, the firmware's own
  PXE client, an NVMe disk): DHCP hands them Debian's signed shim, which loads Debian's
  signed network GRUB, which loads the per-MAC config labmetal renders, then Debian's
  signed generic kernel and labmetal's initramfs over TFTP. The kernel says Secure Boot is
  on and locks itself down; the agent finds the NVMe disk with the generic kernel's
  drivers; the deployed GPT image (signed shim, GRUB and kernel on its EFI system
  partition) boots from the disk with Secure Boot still on, the PC's boot order still
  network first.
* ``uefi`` seats (OVMF without Secure Boot, an Intel e1000e NIC, an AHCI disk): the same
  decision through iPXE, and the real drivers of a PC's NIC and SATA controller.
* a multicast room job on three QEMU seats: every seat runs the agent from the built
  ramdisk (the regression the light seats, which run the agent from the checkout, could
  not see).
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest

from labmetal.images.ramdisk import build_ramdisk
from labmetal.lab.osimage import (build_local_tp_disk, build_partition, build_session_disk,
                                  build_whole_disk, marker_line, session_counter_line)
from labmetal.lab.qemu_seat import type_text
from labmetal.lab.served import BOOT_TIMEOUT, Labmetal, UpRoom, served_room
from labmetal.lab.harness import free_port, wait_for

pytestmark = pytest.mark.ramdisk

RAMDISK_CACHE = Path(os.environ.get("LABMETAL_RAMDISK_CACHE", "/var/cache/labmetal/ramdisk"))
SECURE_BOOT_ON = "Secure boot enabled"  # the kernel's own words (arch/x86 efi)
LOCKED_DOWN = "Kernel is locked down from EFI Secure Boot"
ADMIN = ("ada", "ada-admin-pass")
ANN = ("ann", "ann-pass-1234")


@pytest.fixture(scope="module")
def ramdisk():
    return build_ramdisk(RAMDISK_CACHE)


@pytest.fixture(scope="module")
def uefi_image():
    """A GPT disk whose EFI system partition holds Debian's signed shim, GRUB and kernel."""
    return build_whole_disk("lab-uefi", firmware="uefi")


@pytest.fixture(scope="module")
def secureboot_room(tmp_path_factory, ramdisk):
    """One Secure Boot seat; labmetal also serves students' sessions (the local store)."""
    with served_room(tmp_path_factory.mktemp("sb-room"), "r79", "10.99.79.0/24", ramdisk,
                     "--qemu", "1", "--profile", "secureboot", admin=ADMIN,
                     overlay_backend="local", seat_menu_timeout=30, seat_cache_mib=1024,
                     overlay_run_dir=tempfile.mkdtemp(prefix="lm-sb-"),  # short: sockets
                     iscsi_portal=f"10.99.79.2:{free_port()}") as served:
        yield served


@pytest.fixture  # one test: its room goes as soon as it is done (idle TCG guests cost CPU)
def uefi_room(tmp_path, ramdisk):
    with served_room(tmp_path, "r75", "10.99.75.0/24", ramdisk,
                     "--qemu", "1", "--profile", "uefi") as served:
        yield served


def wait_console(room: UpRoom, seat: dict[str, Any], text: str, after: int = 0,
                 timeout: float = 300) -> str:
    return wait_for(lambda: text in room.console(seat)[after:] and room.console(seat), timeout,
                    f"{text!r} on {seat['name']}'s console", interval=0.5)


def test_a_secure_boot_seat_boots_the_ramdisk_through_shim_and_grub_and_is_inspected(
        secureboot_room):
    room, api = secureboot_room
    seat = room.state["seats"][0]
    api.enroll(room, seat, provide=False)
    node = api.provision(seat["name"], "inspect", "manageable", "inspect failed",
                         timeout=BOOT_TIMEOUT)
    assert node["provision_state"] == "manageable", node["last_error"]
    console = room.console(seat)
    assert "NBP filename is shimx64.efi" in console
    assert "labmetal: loading the inspect ramdisk" in console
    assert SECURE_BOOT_ON in console and LOCKED_DOWN in console
    assert "nvme" in console  # the generic kernel's NVMe driver, loaded by the disk's alias
    assert node["properties"]["local_gb"] == 8  # the seat's 8 GiB NVMe disk, seen by the agent


def test_a_secure_boot_seat_is_deployed_and_boots_its_disk_with_secure_boot_on(
        secureboot_room, uefi_image):
    room, api = secureboot_room
    seat = room.state["seats"][0]
    api.upload("lab-uefi", "whole-disk", uefi_image.path)
    api.provision(seat["name"], "provide", "available")
    before = len(room.console(seat))
    node = api.deploy(seat["name"], "lab-uefi")
    assert node["provision_state"] == "active", node["last_error"]
    booted = wait_console(room, seat, marker_line("lab-uefi", seat["mac"]), after=before)
    after_deploy = booted[before:]
    assert "labmetal: booting the local disk" in after_deploy  # network first, sent to disk
    assert after_deploy.count(SECURE_BOOT_ON) >= 2  # the ramdisk's kernel, then the OS's


def test_a_secure_boot_seat_is_rebuilt_with_a_partition_image_and_boots_its_own_loaders(
        secureboot_room):
    """The agent lays out GPT + an EFI system partition + root and copies the image's own
    signed shim and GRUB there; the image's signed kernel boots with Secure Boot on."""
    room, api = secureboot_room
    seat = room.state["seats"][0]
    image = build_partition("lab-uefi-part", firmware="uefi")
    api.upload("lab-uefi-part-kernel", "kernel", image.kernel)
    api.upload("lab-uefi-part-initrd", "ramdisk", image.initrd)
    api.upload("lab-uefi-part", "partition", image.rootfs, kernel="lab-uefi-part-kernel",
               ramdisk="lab-uefi-part-initrd")
    if api.node(seat["name"])["provision_state"] != "active":  # run alone: deploy first
        api.provision(seat["name"], "provide", "available")
    patched = api.call("PATCH", f"/v1/nodes/{seat['name']}", json=[
        {"op": "add", "path": "/instance_info/image_source", "value": "lab-uefi-part"}])
    assert patched.status_code == 200, patched.text
    before = len(room.console(seat))
    verb = "rebuild" if api.node(seat["name"])["provision_state"] == "active" else "active"
    node = api.provision(seat["name"], verb, "active", "deploy failed", timeout=BOOT_TIMEOUT)
    assert node["provision_state"] == "active", node["last_error"]
    booted = wait_console(room, seat, marker_line("lab-uefi-part", seat["mac"],
                                                  root="/dev/nvme0n1p2"), after=before)
    assert booted[before:].count(SECURE_BOOT_ON) >= 2  # the ramdisk's kernel, then the OS's
    events = [event["event"] for event in
              api.call("GET", f"/v1/nodes/{seat['name']}/history").json()["history"]]
    assert any("image lab-uefi-part written and verified" in event for event in events)
    api.call("PUT", f"/v1/nodes/{seat['name']}/states/power", json={"target": "power off"})


def anns_session(api: Labmetal, room: UpRoom, seat: dict[str, Any]) -> tuple[str, int]:
    """ann's session of the Secure Boot template (made if need be) and the counter its
    disk holds now (0 when made here)."""
    sessions = api.call("GET", "/v1/sessions").json()["sessions"]
    if sessions:
        return sessions[0]["uuid"], 1
    disk = build_session_disk("tp-counter", firmware="uefi")
    api.upload("tp-sb", "whole-disk", disk.path)
    student = api.call("POST", "/v1/users", json={"name": ANN[0], "role": "student",
                                                  "password": ANN[1]})
    assert student.status_code == 201, student.text
    template = api.call("POST", "/v1/templates", json={"name": "sb-tp", "image": "tp-sb"})
    assert template.status_code == 201, template.text
    assert template.json()["versions"][0]["secure_boot"] is True
    ses = api.call("POST", "/v1/sessions", json={"template": "sb-tp", "student": ANN[0]})
    assert ses.status_code == 201, ses.text
    if api.call("GET", f"/v1/nodes/{seat['name']}").status_code == 404:  # run alone
        api.enroll(room, seat)
    for method, path, body in (("POST", "/v1/rooms", {"name": "sb-room"}),  # students
                               ("PUT", "/v1/rooms/sb-room/seats/a1", {"node": seat["name"]})):
        made = api.call(method, path, json=body)  # start sessions on a room's seats only
        assert made.status_code in (200, 201), made.text
    return ses.json()["uuid"], 0


def power(api: Labmetal, seat: dict[str, Any], target: str) -> None:
    asked = api.call("PUT", f"/v1/nodes/{seat['name']}/states/power", json={"target": target})
    assert asked.status_code == 202, asked.text


def test_a_secure_boot_seat_boots_a_students_session_through_the_templates_own_kernel(
        secureboot_room):
    """Under Secure Boot GRUB cannot sanboot: labmetal found the template's own signed
    kernel and initrd in its /boot when the template was made, and GRUB boots them with the
    session's target and CHAP account on the kernel command line (Debian open-iscsi's
    parameters). GRUB asks the conductor's TFTP, which relays the seat's address to the
    API (signed): the target is bound to it. The session OS counts its boot on its disk."""
    room, api = secureboot_room
    seat = room.state["seats"][0]
    uuid, counter = anns_session(api, room, seat)
    before = len(room.console(seat))
    started = api.call("POST", f"/v1/sessions/{uuid}/start", json={"seat": seat["name"]})
    assert started.status_code == 200 and started.json()["last_error"] is None, started.text
    booted = wait_console(room, seat, f"counter={counter + 1} saved on /dev/sda1",
                          after=before, timeout=BOOT_TIMEOUT)[before:]
    assert session_counter_line("tp-counter", seat["mac"], counter) in booted
    assert "booting the session of ann over iSCSI (its own kernel)" in booted
    assert SECURE_BOOT_ON in booted and LOCKED_DOWN in booted
    power(api, seat, "power off")
    wait_for(lambda: api.call("GET", f"/v1/sessions/{uuid}").json()["state"] == "stopped",
             60, "ann's session to end")


def test_a_student_logs_in_at_a_secure_boot_seats_grub_menu_and_her_local_session_boots(
        secureboot_room):
    """GRUB's seat menu: L boots labmetal's login ramdisk (Debian's signed kernel), ann
    types her name and password on the keyboard (a wrong one first), the login goes over
    HTTPS with labmetal's CA pinned, she picks her session of a local TP (issue 16): the
    login's ramdisk puts the template in the seat's cache, and the seat restarts, through
    shim and GRUB, into the template's own signed kernel with labmetal's session initramfs,
    Secure Boot on: the root is assembled from the seat's disk. (The same session on BIOS
    seats, with the network taken down under it: tests/test_local_session_boots.py.)"""
    room, api = secureboot_room
    seat = room.state["seats"][0]
    anns_session(api, room, seat)  # ann, and the room she logs in at
    api.upload("tp-local", "whole-disk", build_local_tp_disk("tp-local").path)
    template = api.call("POST", "/v1/templates", json={"name": "sb-local", "image": "tp-local",
                                                       "session_mode": "local"})
    assert template.status_code == 201, template.text
    assert template.json()["versions"][0]["local"], template.json()["versions"][0]
    made = api.call("POST", "/v1/sessions", json={"template": "sb-local", "student": ANN[0]})
    assert made.status_code == 201, made.text
    uuid = made.json()["uuid"]
    before = len(room.console(seat))

    def screen(text: str) -> None:
        nonlocal before
        try:
            found = wait_console(room, seat, text, after=before, timeout=BOOT_TIMEOUT)
        except AssertionError as error:
            raise AssertionError(f"{error}; the screen ends with "
                                 f"{room.console(seat)[-2500:]!r}") from None
        before = found.index(text, before) + len(text)

    power(api, seat, "power on")
    screen("Log in to my TP session")
    type_text(seat["state_dir"], "l")
    screen("loading the login ramdisk")
    for password in ("not-her-password", ANN[1]):
        screen("Username: ")
        type_text(seat["state_dir"], f"{ANN[0]}\n")
        screen("Password: ")
        type_text(seat["state_dir"], f"{password}\n")
        if password != ANN[1]:
            screen("login refused")
    listed = before
    screen("Your choice")
    menu = room.console(seat)[listed:before]
    number = re.search(r"\[(\d+)\] sb-local \(", menu)
    assert number, menu
    type_text(seat["state_dir"], f"{number.group(1)}\n")
    screen("labmetal: template ready")
    restarted = before
    screen("labmetal-session: root assembled on")
    screen("labmetal-tp: image=tp-local root=/dev/mapper/lm-root booted")
    console = room.console(seat)
    assert SECURE_BOOT_ON in console[restarted:] and LOCKED_DOWN in console[restarted:]
    assert ANN[1] not in console and "not-her-password" not in console
    ses = api.call("GET", f"/v1/sessions/{uuid}").json()
    assert (ses["mode"], ses["state"], ses["seat"]) == ("local", "running", seat["name"]), ses
    power(api, seat, "power off")


def deploy_uefi_image(room: UpRoom, api: Labmetal, image: Any) -> str:
    """The room's one seat enrolled, deployed with the UEFI whole-disk image and booted
    into it: its console."""
    seat = room.state["seats"][0]
    api.upload("lab-uefi", "whole-disk", image.path)
    api.enroll(room, seat)
    node = api.deploy(seat["name"], "lab-uefi")
    assert node["provision_state"] == "active", node["last_error"]
    return wait_console(room, seat, marker_line("lab-uefi", seat["mac"]))


def test_a_uefi_seat_with_an_intel_nic_and_a_sata_disk_is_deployed(uefi_room, uefi_image):
    console = deploy_uefi_image(*uefi_room, uefi_image)
    assert "e1000e" in console and "ahci" in console  # the ramdisk's drivers, found by alias
    assert SECURE_BOOT_ON not in console


@pytest.fixture  # one test, as uefi_room
def ipxe_uefi_room(tmp_path, ramdisk):
    """A UEFI seat whose first file is iPXE's snponly.efi (``uefi_loader = ipxe``), for
    firmware that shim does not suit: the iPXE path of BIOS seats, on UEFI."""
    with served_room(tmp_path, "r77", "10.99.77.0/24", ramdisk, "--qemu", "1",
                     "--profile", "uefi", uefi_loader="ipxe") as served:
        yield served


def test_a_uefi_seat_on_ipxes_snponly_is_deployed_and_boots_its_disk(ipxe_uefi_room,
                                                                      uefi_image):
    console = deploy_uefi_image(*ipxe_uefi_room, uefi_image)
    assert "NBP filename is snponly.efi" in console and "iPXE" in console
    assert "labmetal: loading the deploy ramdisk" in console
    assert "NBP filename is shimx64.efi" not in console


@pytest.fixture
def bios_room(tmp_path, ramdisk):
    with served_room(tmp_path, "r76", "10.99.76.0/24", ramdisk,
                     "--qemu", "3", "--profile", "bios") as served:
        yield served


def test_a_multicast_room_job_images_three_qemu_seats_from_the_built_ramdisk(bios_room):
    room, api = bios_room
    seats = room.state["seats"]
    api.upload("lab-whole", "whole-disk", build_whole_disk("lab-whole").path)
    assert api.call("POST", "/v1/rooms", json={"name": "tpr-3"}).status_code == 201
    for index, seat in enumerate(seats, start=1):
        api.enroll(room, seat)
        assert api.call("PUT", f"/v1/rooms/tpr-3/seats/A{index:02}",
                        json={"node": seat["name"]}).status_code == 200
    # One retry: a seat whose ramdisk cannot run the agent fails every attempt, and a
    # loaded machine may slow one past the sender's patience once.
    created = api.call("POST", "/v1/rooms/tpr-3/jobs", json={
        "image": "lab-whole", "transport": "multicast", "retries": 1})
    assert created.status_code in (201, 202), created.text
    job = created.json()["uuid"]
    finished = wait_for(lambda: (lambda j: j if j["state"] in ("done", "failed") else None)(
        api.call("GET", f"/v1/room-jobs/{job}").json()), BOOT_TIMEOUT,
        "the room job to finish", interval=1)
    assert finished["state"] == "done", finished["seats"]
    assert finished["chosen_transport"] == "multicast"
    print("attempts per seat:", [(seat["label"], seat["attempts"], seat["error"])
                                 for seat in finished["seats"]])
    for seat in seats:
        wait_console(room, seat, marker_line("lab-whole", seat["mac"]))
        history = api.call("GET", f"/v1/nodes/{seat['name']}/history").json()["history"]
        assert any("from multicast" in event["event"] for event in history), history

    # The teacher re-images seat A01 from the job: a delta re-image, from the ramdisk again,
    # writes none of the chunks the disk already holds, and the OS boots once more.
    seat = seats[0]
    before = len(room.console(seat))
    retried = api.call("POST", f"/v1/room-jobs/{job}/seats/A01/retry")
    assert retried.status_code == 200, retried.text
    again = wait_for(lambda: (lambda j: j if j["state"] in ("done", "failed") else None)(
        api.call("GET", f"/v1/room-jobs/{job}").json()), BOOT_TIMEOUT,
        "the re-image to finish", interval=1)
    assert again["state"] == "done", again["seats"]
    wait_console(room, seat, marker_line("lab-whole", seat["mac"]), after=before)
    assert "labmetal-ramdisk: starting agent" in room.console(seat)[before:]
    events = [event["event"] for event in
              api.call("GET", f"/v1/nodes/{seat['name']}/history").json()["history"]]
    assert any(" 0 of " in event and "chunks written" in event for event in events), events
