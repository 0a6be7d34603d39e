"""Local-first sessions on QEMU seats (issue 16): what a PC of the room runs. The seats boot
labmetal's built ramdisk in ``session`` mode, which puts the TP template and the student's
blocks in the cache region of the seat's own disk, then the template's own kernel (Debian's
signed generic kernel, from the template image's /boot) with labmetal's session initramfs,
which assembles the root with device-mapper from that disk: the guest's own kernel writes
the snapshot store the ramdisk uploads later.

The template (lab/osimage.build_local_tp_disk) is an ordinary Debian-like image: labmetal
changes nothing in it. Its /sbin/init prints a marker and keeps a shell on the keyboard's
console, where the test types as a student would.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from labmetal.images.ramdisk import build_ramdisk
from labmetal.lab.harness import LABMETAL, Proc, Processes, free_port, wait_for
from labmetal.lab.network import PREFIX, run_in
from labmetal.lab.osimage import build_local_tp_disk
from labmetal.lab.qemu_seat import type_text
from labmetal.lab.served import BOOT_TIMEOUT, Labmetal, UpRoom, lab_up, start_labmetal, tear_down

# A bound on a hang, not a wait: the story boots seats six times under TCG, after building
# the ramdisk when its inputs changed.
pytestmark = [pytest.mark.ramdisk, pytest.mark.timeout(1800)]
RAMDISK_CACHE = Path(os.environ.get("LABMETAL_RAMDISK_CACHE", "/var/cache/labmetal/ramdisk"))
IMAGE = "tp-local"
PASSWORDS = {"ada": "ada-admin-pass", "ann": "ann-pass-1"}


class AdminApi(Labmetal):
    def call(self, method: str, path: str, **kwargs: Any):
        return super().call(method, path, auth=("ada", PASSWORDS["ada"]), **kwargs)


class Classroom:
    def __init__(self, room: UpRoom, api: AdminApi, procs: Processes, work: Path,
                 settings: dict[str, Any], service: Proc) -> None:
        self.room, self.api, self.procs, self.work = room, api, procs, work
        self.settings, self.service = settings, service

    def seat(self, index: int) -> dict[str, Any]:
        return self.room.state["seats"][index]

    def screen(self, seat: dict[str, Any], text: str, after: int = 0) -> int:
        """Wait for ``text`` on the seat's console after position ``after``; where it ends."""
        def seen() -> int | None:
            console = self.room.console(seat)
            at = console.find(text, after)
            return at + len(text) if at >= 0 else None
        try:
            return wait_for(seen, BOOT_TIMEOUT, f"{text!r} on {seat['name']}'s console",
                            interval=0.5)
        except AssertionError as error:
            raise AssertionError(f"{error}; the console ends with "
                                 f"{self.room.console(seat)[-2500:]!r}") from None

    def type(self, seat: dict[str, Any], command: str) -> None:
        type_text(seat["state_dir"], command + "\n", pause=0.05)

    def session(self, uuid: str) -> dict[str, Any]:
        answer = self.api.call("GET", f"/v1/sessions/{uuid}")
        assert answer.ok, answer.text
        return answer.json()

    def until(self, uuid: str, state: str, timeout: float = BOOT_TIMEOUT) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            view = self.session(uuid)
            return view if view["state"] == state else None
        return wait_for(reached, timeout, f"session {uuid} {state}", interval=1)

    def restart_service(self) -> None:
        self.service = start_labmetal(self.procs, self.work, self.settings)


@pytest.fixture(scope="module")
def classroom(tmp_path_factory) -> Iterator[Classroom]:
    template = build_local_tp_disk(IMAGE)
    ramdisk = build_ramdisk(RAMDISK_CACHE)
    work = tmp_path_factory.mktemp("local-sessions")
    procs = Processes(work)
    room = None
    try:
        room = lab_up(procs, work / "room", "r80", "10.99.80.0/24", "--port", str(free_port()),
                      "--qemu", "2", "--power", "ipmi")
        subprocess.run([LABMETAL, "user", "set", "ada", "--role", "admin", "--password-stdin",
                        "--state-dir", str(work / "labmetal")], input=PASSWORDS["ada"] + "\n",
                       check=True, capture_output=True, text=True)
        settings = {**room.state["settings"], "auth": "http_basic", "power_sync_interval": 2,
                    "seat_menu_timeout": 0, "overlay_backend": "local",
                    "overlay_run_dir": tempfile.mkdtemp(prefix="lm-ls-"),
                    "seat_cache_mib": 512, "deploy_kernel": "deploy-kernel",
                    "deploy_ramdisk": "deploy-ramdisk"}
        service = start_labmetal(procs, work, settings)
        api = AdminApi(f"http://{room.state['settings']['listen']}")
        api.upload("deploy-kernel", "kernel", ramdisk.kernel)
        api.upload("deploy-ramdisk", "ramdisk", ramdisk.initramfs)
        api.upload(IMAGE, "whole-disk", template.path)
        made = api.call("POST", "/v1/users", json={"name": "ann", "role": "student",
                                                   "password": PASSWORDS["ann"]})
        assert made.status_code == 201, made.text
        made = api.call("POST", "/v1/templates", json={"name": "net-tp", "image": IMAGE})
        assert made.status_code == 201, made.text
        assert made.json()["versions"][0]["local"], made.json()["versions"][0]
        for seat in room.state["seats"]:
            api.enroll(room, seat)
        yield Classroom(room, api, procs, work, settings, service)
    finally:
        if room is not None:
            tear_down(room)
        procs.stop_all()


def test_a_network_tp_cannot_freeze_a_local_session_and_the_work_follows_the_student(
        classroom):
    room, api = classroom.room, classroom.api
    one, two = classroom.seat(0), classroom.seat(1)
    made = api.call("POST", "/v1/sessions", json={"template": "net-tp", "student": "ann"})
    assert made.status_code == 201, made.text
    uuid = made.json()["uuid"]
    started = api.call("POST", f"/v1/sessions/{uuid}/start", json={"seat": one["name"]})
    assert started.status_code == 200, started.text
    assert (started.json()["mode"], started.json()["state"]) == ("local", "starting")

    # labmetal's ramdisk puts the template on the seat's disk, then the seat reboots into
    # the template's own kernel with labmetal's session initramfs
    at = classroom.screen(one, "labmetal: template ready")
    at = classroom.screen(one, "labmetal-session: root assembled on /dev/vda", at)
    at = classroom.screen(one, f"labmetal-tp: image={IMAGE} root=/dev/mapper/lm-root booted",
                          at)
    assert classroom.session(uuid)["state"] == "running"

    # the student's network TP: the NIC goes down and its address goes; the room's switch
    # port goes down (a cable pulled); labmetal itself stops. The OS writes and reads its
    # disk all the same.
    run_in(one["namespace"], ["ip", "link", "set", f"{PREFIX}q1", "down"])
    classroom.service.stop()
    classroom.type(one, "modprobe virtio_net; ip link set eth0 up; "
                        "ip addr add 192.0.2.9/24 dev eth0; ip link set eth0 down; "
                        "ip addr flush dev eth0")
    classroom.type(one, "mkdir -p /root; echo ann-work-1 > /root/notes; sync; "
                        "echo read-back-$(cat /root/notes) > /dev/ttyS0")
    at = classroom.screen(one, "read-back-ann-work-1", at)
    classroom.restart_service()
    run_in(one["namespace"], ["ip", "link", "set", f"{PREFIX}q1", "up"])
    classroom.type(one, "ip link set eth0 up; echo net-back > /dev/ttyS0")
    at = classroom.screen(one, "net-back", at)

    # a save point asked from inside the OS, the network down again: kept on the seat's
    # disk until the upload carries it
    classroom.type(one, "ip link set eth0 down; sh /run/labmetal/save after-the-tp "
                        "> /dev/ttyS0 2>&1")
    at = classroom.screen(one, 'labmetal: save "after-the-tp" queued on this seat\'s disk', at)

    # the student powers the OS off: labmetal sees the seat off, powers it on to upload the
    # session, checks it, and the seat powers itself off again
    classroom.type(one, "sync; poweroff -f")
    ended = classroom.until(uuid, "stopped")
    assert ended["synced_at"] and ended["seat"] is None and ended["last_error"] is None, ended
    assert "labmetal: session uploaded" in room.console(one)[at:]
    saves = api.call("GET", f"/v1/sessions/{uuid}/saves").json()["saves"]
    assert [save["label"] for save in saves] == ["after-the-tp"], saves

    # ann sits at the other seat of the room, open for the TP: the seat boots straight to
    # the login (no menu), and the login's own ramdisk brings down the template and her
    # blocks, then the seat restarts into her session; her file is there
    for body in ({"name": "tpr"},):
        assert api.call("POST", "/v1/rooms", json=body).status_code == 201
    for label, seat in (("a1", one), ("a2", two)):
        placed = api.call("PUT", f"/v1/rooms/tpr/seats/{label}", json={"node": seat["name"]})
        assert placed.ok, placed.text
    opened = api.call("PUT", "/v1/rooms/tpr/tp", json={"template": "net-tp",
                                                        "power_on": False})
    assert opened.ok, opened.text
    powered = api.call("PUT", f"/v1/nodes/{two['name']}/states/power",
                       json={"target": "power on"})
    assert powered.status_code == 202, powered.text
    at2 = classroom.screen(two, "Username: ")
    classroom.type(two, "ann")
    at2 = classroom.screen(two, "Password: ", at2)
    classroom.type(two, PASSWORDS["ann"])
    at2 = classroom.screen(two, "labmetal: template ready", at2)
    at2 = classroom.screen(two, f"labmetal-tp: image={IMAGE} root=/dev/mapper/lm-root booted",
                           at2)
    assert PASSWORDS["ann"] not in room.console(two)
    classroom.type(two, "echo resumed-$(cat /root/notes) > /dev/ttyS0")
    classroom.screen(two, "resumed-ann-work-1", at2)

    # power cut on seat two before any upload: the session's end is only on its disk.
    # Resuming elsewhere is told so; labmetal powers seat two on to upload; nothing is lost.
    classroom.type(two, "echo ann-work-2 > /root/notes; sync; echo cut-ready > /dev/ttyS0")
    classroom.screen(two, "cut-ready", at2)
    cut = api.call("PUT", f"/v1/nodes/{two['name']}/states/power", json={"target": "power off"})
    assert cut.status_code == 202, cut.text
    refused = api.call("POST", f"/v1/sessions/{uuid}/start", json={"seat": one["name"]})
    assert refused.status_code in (200, 409), refused.text
    if refused.status_code == 409:
        assert "upload" in refused.text, refused.text
        classroom.until(uuid, "stopped")
        started = api.call("POST", f"/v1/sessions/{uuid}/start", json={"seat": one["name"]})
        assert started.status_code == 200, started.text
    at = classroom.screen(one, f"labmetal-tp: image={IMAGE} root=/dev/mapper/lm-root booted",
                          len(room.console(one)))
    classroom.type(one, "echo again-$(cat /root/notes) > /dev/ttyS0")
    classroom.screen(one, "again-ann-work-2", at)
