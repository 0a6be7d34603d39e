"""Students' sessions booted diskless (issue 7), end to end on real QEMU seats: a TP template
made from the session OS image (lab/osimage.build_session_disk), a session per student, and
seats that PXE-boot, get their per-MAC iPXE script, ``sanboot`` the session's iSCSI target
with CHAP (tgtd, served by labmetal's local or ceph store) and run an OS whose initramfs
logs in again from the iBFT (open-iscsi's iscsistart) and mounts its root from that disk.

The OS keeps a counter in a file of its root filesystem and adds one at every boot; a
session ends when its seat is powered off (the BMC, through labmetal's API). So: student A
writes 1 on seat 1; resumed on seat 2 reads 1 and writes 2; student B's session of the
same template reads 0; a revert to A's save point and a reset to the template are seen by
the next boot.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from labmetal.images.ramdisk import build_ramdisk
from labmetal.lab.osimage import build_session_disk, session_counter_line
from labmetal.lab.qemu_seat import type_text
from labmetal.lab.ceph import CephCluster, missing_tools
from labmetal.lab.served import (BOOT_TIMEOUT, Labmetal, UpRoom, lab_up, stand_in, start_labmetal,
                                 tear_down)
from labmetal.lab.harness import LABMETAL, Processes, free_port, wait_for

pytestmark = pytest.mark.ramdisk
RAMDISK_CACHE = Path(os.environ.get("LABMETAL_RAMDISK_CACHE", "/var/cache/labmetal/ramdisk"))
IMAGE = "tp-counter"
PASSWORDS = {"ada": "ada-admin-pass", "ann": "ann-pass-1", "bob": "bob-pass-2"}


class AdminApi(Labmetal):
    """The room's API as the admin ada (the service runs with accounts: the seat menu's
    login needs them)."""

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return super().call(method, path, auth=("ada", PASSWORDS["ada"]), **kwargs)


@pytest.fixture(scope="module")
def session_disk():
    return build_session_disk(IMAGE)


@pytest.fixture(scope="module")
def ramdisk():
    return build_ramdisk(RAMDISK_CACHE)


@pytest.fixture(scope="module", params=["local", "ceph"])
def classroom(request, tmp_path_factory, session_disk,
              ramdisk) -> Iterator[tuple[UpRoom, Labmetal]]:
    """A room of 2 QEMU seats behind virtual BMCs, labmetal serving it with the given
    store, the TP template ``net-tp`` and its two students; the seat login boots the
    built ramdisk."""
    backend = request.param
    work = tmp_path_factory.mktemp(f"diskless-{backend}")
    procs = Processes(work)
    room = cluster = None
    try:
        settings: dict[str, Any] = {}
        if backend == "ceph":
            if missing_tools():
                pytest.fail(f"missing {', '.join(missing_tools())}: install ceph-mon "
                            "ceph-osd ceph-common python3-rbd tgt-rbd")
            cluster = CephCluster(Path(tempfile.mkdtemp(prefix="lm-ceph-"))).__enter__()
            settings.update(ceph_conf=cluster.conf_path, ceph_pool=cluster.pool)
        index = 73 if backend == "ceph" else 72
        room = lab_up(procs, work / "room", f"r{index}", f"10.99.{index}.0/24",
                      "--port", str(free_port()), "--qemu", "2", "--power", "ipmi")
        host = room.state["settings"]["listen"].rsplit(":", 1)[0]
        subprocess.run([LABMETAL, "user", "set", "ada", "--role", "admin", "--password-stdin",
                        "--state-dir", str(work / "labmetal")], input=PASSWORDS["ada"] + "\n",
                       check=True, capture_output=True, text=True)
        start_labmetal(procs, work, {
            **room.state["settings"], "auth": "http_basic", "power_sync_interval": 2,
            "seat_menu_timeout": 20, "overlay_backend": backend,
            "overlay_run_dir": tempfile.mkdtemp(prefix="lm-dl-"),  # short: socket paths
            "iscsi_portal": f"{host}:{free_port()}", "deploy_kernel": "deploy-kernel",
            "deploy_ramdisk": "deploy-ramdisk", **settings})
        api = AdminApi(f"http://{room.state['settings']['listen']}")
        api.upload("deploy-kernel", "kernel", ramdisk.kernel)
        api.upload("deploy-ramdisk", "ramdisk", ramdisk.initramfs)
        api.upload(IMAGE, "whole-disk", session_disk.path)
        for student in ("ann", "bob"):
            made = api.call("POST", "/v1/users", json={"name": student, "role": "student",
                                                       "password": PASSWORDS[student]})
            assert made.status_code == 201, made.text
        template = api.call("POST", "/v1/templates", json={"name": "net-tp", "image": IMAGE})
        assert template.status_code == 201, template.text
        for seat in room.state["seats"]:
            api.enroll(room, seat)
        yield room, api
    finally:
        if room is not None:
            tear_down(room)
        procs.stop_all()  # labmetal stops its tgtd before Ceph goes
        if cluster is not None:
            cluster.__exit__(None, None, None)


def ok(api: Labmetal, method: str, path: str, body: Any = None, status: int = 200) -> Any:
    response = api.call(method, path, json=body)
    assert response.status_code == status, response.text
    return response.json() if response.content else None


def boot_session(room: UpRoom, api: Labmetal, session: dict[str, Any], seat_index: int,
                 expected: int) -> None:
    """Start the session on the seat (labmetal powers it on), see its OS read ``expected``
    and save ``expected + 1``, power the seat off and see the session end."""
    seat = room.state["seats"][seat_index]
    before = len(room.console(seat))
    started = ok(api, "POST", f"/v1/sessions/{session['uuid']}/start", {"seat": seat["name"]})
    assert started["state"] == "running" and started["last_error"] is None, started
    line = session_counter_line(IMAGE, seat["mac"], expected)
    saved = f"counter={expected + 1} saved on /dev/sda2"
    try:
        wait_for(lambda: saved in room.console(seat)[before:], BOOT_TIMEOUT,
                 f"{saved!r} on {seat['name']}'s console", interval=0.5)
    except AssertionError as error:
        raise AssertionError(f"{error}; the screen ends with "
                             f"{room.console(seat)[-1500:]!r}") from None
    console = room.console(seat)[before:]
    assert line in console, console[-2000:]
    assert "labmetal: booting the session of" in console
    assert "error" not in console.split(line)[1].split(saved)[0]
    powered = api.call("PUT", f"/v1/nodes/{seat['name']}/states/power",
                       json={"target": "power off"})
    assert powered.status_code == 202, powered.text
    def stopped() -> dict[str, Any] | None:
        view = ok(api, "GET", f"/v1/sessions/{session['uuid']}")
        return view if view["state"] == "stopped" else None
    ended = wait_for(stopped, 60, f"session {session['uuid']} to end once {seat['name']} "
                     "is off", interval=0.5)
    assert ended["seat"] is None and ended["last_error"] is None, ended


def test_a_students_disk_follows_them_across_seats_and_only_them(classroom):
    room, api = classroom
    ann = ok(api, "POST", "/v1/sessions", {"template": "net-tp", "student": "ann"}, 201)
    bob = ok(api, "POST", "/v1/sessions", {"template": "net-tp", "student": "bob"}, 201)

    boot_session(room, api, ann, 0, expected=0)
    ok(api, "POST", f"/v1/sessions/{ann['uuid']}/save", {"label": "after-one"}, 201)
    boot_session(room, api, ann, 1, expected=1)  # another seat, the same disk
    boot_session(room, api, bob, 0, expected=0)  # the template, untouched by ann

    ok(api, "POST", f"/v1/sessions/{ann['uuid']}/revert", {"save": "after-one"})
    boot_session(room, api, ann, 0, expected=1)
    ok(api, "POST", f"/v1/sessions/{ann['uuid']}/reset")
    boot_session(room, api, ann, 1, expected=0)


def test_a_seat_without_a_session_gets_no_target(classroom):
    """The per-MAC script of a seat whose session ended sanboots nothing: it carries no
    CHAP account any more."""
    room, api = classroom
    seat = room.state["seats"][0]
    script = api.call("GET", f"/boot/{seat['mac'].replace(':', '-')}.ipxe").text
    assert "sanboot iscsi:" not in script and "set password" not in script, script


def seat_https(api: Labmetal, mac: str, work: Path) -> tuple[str, str]:
    """Where the seat's login ramdisk sends the login (from its kernel command line in
    ``login.ipxe``) and labmetal's CA certificate (from ``/ca.crt``), in a file."""
    script = requests.get(f"{api.url}/boot/{mac.replace(':', '-')}/login.ipxe", timeout=30)
    https = script.text.split("labmetal.tls=", 1)[1].split()[0]
    ca = work / "labmetal-ca.pem"
    ca.write_bytes(requests.get(f"{api.url}/ca.crt", timeout=30).content)
    return https, str(ca)


def test_the_seat_login_shows_a_student_their_own_sessions_only(classroom, tmp_path):
    """What the login ramdisk sends, as HTTPS from the seat's leased address: bob's menu
    lists his session only, and neither a guessed ticket nor his own one starts ann's
    session. From any other address (here this host's) the login is refused."""
    room, api = classroom
    mac = room.state["seats"][0]["mac"]
    login = f"/v1/seat-login/{mac.replace(':', '-')}"
    https, ca = seat_https(api, mac, tmp_path)
    sessions = {s["student"]: s["uuid"] for s in ok(api, "GET", "/v1/sessions")["sessions"]}
    bob = ("bob", PASSWORDS["bob"])
    elsewhere = requests.post(https + login, json={}, auth=bob, verify=ca, timeout=30)
    assert elsewhere.status_code == 403 and "is not the address of seat" in elsewhere.text
    with stand_in(room, room.state["seats"][0]) as seat:
        anonymous = seat.request("POST", https + login, json_body={}, verify=ca)
        assert anonymous.status_code == 401
        assert "Basic" in anonymous.headers["WWW-Authenticate"]
        menu = seat.request("POST", https + login, bob, {}, ca).json()
        choices = [choice["choice"] for choice in menu["choices"]]
        assert f"s-{sessions['bob']}" in choices and f"s-{sessions['ann']}" not in choices
        for guess, status, why in ((menu["ticket"], 404, "could not be found"),
                                   ("1900000000." + "0" * 64, 409, "too old")):
            refused = seat.request("POST", f"{https}{login}/start", bob,
                                   {"choice": f"s-{sessions['ann']}", "ticket": guess}, ca)
            assert refused.status_code == status and why in refused.text, refused.text
    assert ok(api, "GET", f"/v1/sessions/{sessions['ann']}")["state"] == "stopped"


def test_in_a_room_open_for_a_tp_the_login_starts_that_tps_session_at_once(classroom,
                                                                            tmp_path):
    """A teacher opens the room for net-tp: bob's login at a seat gets no menu, his
    session starts there and the seat's next script sanboots it; the room's grid shows
    him on that seat."""
    room, api = classroom
    seat = room.state["seats"][0]
    ok(api, "POST", "/v1/rooms", {"name": "tpr-1"}, 201)
    for index, each in enumerate(room.state["seats"]):
        ok(api, "PUT", f"/v1/rooms/tpr-1/seats/a{index + 1}", {"node": each["name"]})
    opened = ok(api, "PUT", "/v1/rooms/tpr-1/tp", {"template": "net-tp", "power_on": False})
    assert opened["tp"]["template"] == "net-tp" and opened["tp"]["started_by"] == "ada"
    assert opened["powered_on"] == [] and opened["not_powered"] == {}
    https, ca = seat_https(api, seat["mac"], tmp_path)
    with stand_in(room, seat) as stand:
        login = stand.request("POST", f"{https}/v1/seat-login/{seat['mac'].replace(':', '-')}",
                              ("bob", PASSWORDS["bob"]), {}, ca)
        assert login.status_code == 200, login.text
        assert "choices" not in login.json()
        assert login.json()["started"]["template"] == "net-tp"
        # the seat restarts: its script now boots bob's session
        script = stand.get(f"{api.url}/boot/{seat['mac'].replace(':', '-')}.ipxe").text
    assert "sanboot iscsi:" in script, script
    grid = ok(api, "GET", "/v1/rooms/tpr-1")
    assert grid["seats"][0]["student"] == "bob" and grid["seats"][1]["student"] is None
    bob = next(s for s in ok(api, "GET", "/v1/sessions")["sessions"] if s["student"] == "bob")
    assert bob["state"] == "running" and bob["seat"] == seat["name"]
    ok(api, "POST", f"/v1/sessions/{bob['uuid']}/stop")
    assert api.call("DELETE", "/v1/rooms/tpr-1/tp").status_code == 204
    assert ok(api, "GET", "/v1/rooms/tpr-1")["tp"] is None
    ok(api, "DELETE", "/v1/rooms/tpr-1", status=204)


def test_a_student_logs_in_at_the_seat_and_resumes_their_session(classroom):
    """At the seat's menu, ann presses L: the seat boots labmetal's ramdisk, which asks for
    her name and password (a wrong one is refused, she tries again), lists her sessions,
    and she picks hers (key 1): the seat restarts into her disk (a reset made it 0, one
    boot since made it 1)."""
    room, api = classroom
    seat = room.state["seats"][1]
    ann = next(s for s in ok(api, "GET", "/v1/sessions")["sessions"] if s["student"] == "ann")
    ok(api, "POST", "/v1/rooms", {"name": "tpr-2"}, 201)  # a student starts on a room's seat
    ok(api, "PUT", "/v1/rooms/tpr-2/seats/b1", {"node": seat["name"]})
    before = len(room.console(seat))

    def screen(text: str, timeout: float = BOOT_TIMEOUT) -> None:
        """Wait for ``text`` on the seat's screen after what the last wait found."""
        nonlocal before
        try:
            found = wait_for(lambda: room.console(seat).find(text, before) + 1, timeout,
                             f"{text!r} on {seat['name']}'s screen", interval=0.2)
        except AssertionError as error:
            raise AssertionError(f"{error}; the screen ends with "
                                 f"{room.console(seat)[-1500:]!r}") from None
        before = found - 1 + len(text)

    powered = api.call("PUT", f"/v1/nodes/{seat['name']}/states/power",
                       json={"target": "power on"})
    assert powered.status_code == 202, powered.text
    screen("Log in to my TP session")
    type_text(seat["state_dir"], "l")
    screen("loading the login ramdisk")
    screen("Username: ")
    type_text(seat["state_dir"], "ann\n")
    screen("Password: ")
    type_text(seat["state_dir"], "wrong-password\n")
    screen("login refused")
    screen("Username: ")
    type_text(seat["state_dir"], "ann\n")
    screen("Password: ")
    type_text(seat["state_dir"], f"{PASSWORDS['ann']}\n")
    screen("TP sessions of ann:")
    screen("Your choice")
    type_text(seat["state_dir"], "1\n")
    screen("this seat restarts into it")
    console = room.console(seat)  # the serial line: the ramdisk echoes no password there
    assert PASSWORDS["ann"] not in console and "wrong-password" not in console
    restarted = before
    screen("counter=2 saved on /dev/sda2")
    assert session_counter_line(IMAGE, seat["mac"], 1) in room.console(seat)[restarted:]
    running = ok(api, "GET", f"/v1/sessions/{ann['uuid']}")
    assert running["state"] == "running" and running["seat"] == seat["name"], running
    powered = api.call("PUT", f"/v1/nodes/{seat['name']}/states/power",
                       json={"target": "power off"})
    assert powered.status_code == 202, powered.text
    wait_for(lambda: ok(api, "GET", f"/v1/sessions/{ann['uuid']}")["state"] == "stopped", 60,
             "ann's session to end")
    ok(api, "DELETE", "/v1/rooms/tpr-2", status=204)
