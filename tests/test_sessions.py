"""Students' sessions of TP templates through the REST API and the CLI (issue 7), against a
real service (`--auth http_basic`) and real storage: the local store (qcow2 overlays,
qemu-storage-daemon, tgtd) and the ceph store (RBD clones on a single-node cluster).

Seats are qemu-io over iSCSI (libiscsi, in userspace) logging in with the seat's initiator
name and the session's CHAP account, read from the database and unsealed with the
service's key as the seat's boot script will be (the API never returns the secret).
Teardown stops the service (which stops its tgtd and every qemu-storage-daemon) and
checks that none is left.
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from labmetal.secrets import SecretBox
from labmetal.lab.ceph import CephCluster, missing_tools
from labmetal.lab.iscsi_seat import IscsiSeat
from tests.iscsi_seat import storage_tools  # noqa: F401 (autouse fixture)
from labmetal.lab.harness import LABMETAL, Service, error_text, free_port, start_service, wait_for

MiB = 2**20
TEMPLATE_BYTE = 0x54  # the first 8 MiB of image v1
V2_BYTE = 0x32
PASSWORDS = {"ada": "ada's long pass phrase", "tom": "tom's long pass phrase",
             "sam": "sam's long pass phrase", "una": "una's long pass phrase"}
ROLES = {"ada": "admin", "tom": "teacher", "sam": "student", "una": "student"}


def auth(name: str) -> tuple[str, str]:
    return name, PASSWORDS[name]


@pytest.fixture(scope="module")
def ceph_cluster():
    if missing_tools():
        pytest.fail(f"missing {', '.join(missing_tools())}: install the Debian packages "
                    "ceph-mon ceph-osd ceph-common python3-rbd tgt-rbd")
    with CephCluster(Path(tempfile.mkdtemp(prefix="lm-ceph-"))) as cluster:
        yield cluster


# -- the lab: a service, its users, an image, seats --------------------------------------
@dataclass
class Lab:
    service: Service
    run_dir: Path
    work: Path
    seats: dict[str, str]  # node name -> node uuid

    def call(self, user: str, method: str, path: str, body: Any = None) -> requests.Response:
        return requests.request(method, self.service.url + path, auth=auth(user),
                                json=body, timeout=120)

    def ok(self, user: str, method: str, path: str, body: Any = None,
           status: int = 200) -> Any:
        response = self.call(user, method, path, body)
        assert response.status_code == status, response.text
        return response.json() if response.content else None

    def upload(self, name: str, byte: int, size: int = 32 * MiB) -> None:
        raw = self.work / f"{name}.raw"
        with open(raw, "wb") as image:
            image.write(bytes([byte]) * 8 * MiB)
            image.truncate(size)
        self.ok("ada", "POST", "/v1/images", {"name": name, "kind": "whole-disk",
                                              "disk_format": "raw"}, status=201)
        with open(raw, "rb") as data:
            uploaded = requests.put(f"{self.service.url}/v1/images/{name}/data", data=data,
                                    auth=auth("ada"), timeout=120)
        assert uploaded.ok, uploaded.text

    def chap(self, session_uuid: str) -> tuple[str, str]:
        """What the seat's boot script will be given: the session's CHAP account."""
        with sqlite3.connect(self.service.state_dir / "labmetal.db") as db:
            user, sealed = db.execute("SELECT chap_user, chap_secret FROM student_sessions "
                                      "WHERE uuid = ?", (session_uuid,)).fetchone()
        box = SecretBox.from_file(self.service.state_dir / "secret.key")
        return user, box.open(sealed)

    def sams_session_on_a01(self, template: str) -> tuple[str, dict[str, Any]]:
        """A template of its own, sam's session of it started on a01: its path and view."""
        self.upload(f"{template}-v1", TEMPLATE_BYTE)
        self.ok("tom", "POST", "/v1/templates", {"name": template, "image": f"{template}-v1"},
                status=201)
        ses = self.ok("ada", "POST", "/v1/sessions", {"template": template, "student": "sam"},
                      status=201)
        path = f"/v1/sessions/{ses['uuid']}"
        return path, self.ok("sam", "POST", f"{path}/start", {"seat": "a01", "boot": False})

    def seat(self, ses: dict[str, Any], seat: str, secret: str | None = None) -> IscsiSeat:
        user, real_secret = self.chap(ses["uuid"])
        secret_file = self.work / f"secret-{ses['uuid']}-{seat}{'-given' if secret else ''}"
        secret_file.write_text(secret or real_secret)
        target = ses["target"]
        return IscsiSeat(f"iqn.2026-11.org.labmetal:{self.seats[seat]}", target["portal"],
                    target["iqn"], user, secret_file)


def add_user(state_dir: Path, name: str) -> None:
    subprocess.run([LABMETAL, "user", "set", name, "--role", ROLES[name], "--password-stdin",
                    "--state-dir", str(state_dir)], input=PASSWORDS[name] + "\n", check=True,
                   capture_output=True, text=True)


def our_processes(run_dir: Path) -> list[int]:
    """tgtd (found by its TGT_IPC_SOCKET) and qemu-storage-daemons of this run dir."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes() if b"tgtd" in cmdline[:64] else b""
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X") and str(run_dir).encode() in cmdline + environ:
            found.append(int(proc.name))
    return found


def tgtd_pid(run_dir: Path) -> int:
    pids = [pid for pid in our_processes(run_dir)
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"tgtd")]
    assert len(pids) == 1, pids
    return pids[0]


@pytest.fixture
def make_lab(procs, tmp_path, request):
    """Starts a service with the given store and settings, its four users, two seats (nodes
    a01 and a02 of room tpr); stops it at teardown and checks it left no storage process
    behind."""
    made: list[Lab] = []

    def make(backend: str = "local", ceph: CephCluster | None = None, **settings: Any) -> Lab:
        name = f"svc{len(made)}"
        state_dir = tmp_path / f"{name}-state"
        for user in PASSWORDS:
            add_user(state_dir, user)
        run_dir = Path(tempfile.mkdtemp(prefix="lm-ses-"))  # short: unix socket paths
        if ceph is not None:
            settings.update(ceph_conf=ceph.conf_path, ceph_pool=ceph.pool, ceph_timeout=5)
        service = start_service(procs, name, auth="http_basic", state_dir=state_dir,
                                overlay_backend=backend, overlay_run_dir=run_dir,
                                iscsi_portal=f"127.0.0.4:{free_port()}", **settings)
        lab = Lab(service, run_dir, tmp_path, {})
        made.append(lab)
        for seat in ("a01", "a02"):  # nodes with no power: starts here say "boot": False
            node = lab.ok("ada", "POST", "/v1/nodes", {"name": seat, "driver": "wol"},
                          status=201)
            lab.seats[seat] = node["uuid"]
        lab.ok("ada", "POST", "/v1/rooms", {"name": "tpr"}, status=201)
        for seat in lab.seats:  # students start sessions on a room's seats only
            lab.ok("ada", "PUT", f"/v1/rooms/tpr/seats/{seat.upper()}", {"node": seat})
        return lab

    yield make
    for lab in made:
        lab.service.proc.stop()
        left = our_processes(lab.run_dir)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"the service left storage processes running: {left}"
        assert str(lab.run_dir) not in Path("/proc/self/mountinfo").read_text()
        shutil.rmtree(lab.run_dir, ignore_errors=True)


@pytest.fixture(params=["local", "ceph"])
def lab(request, make_lab) -> Lab:
    ceph = request.getfixturevalue("ceph_cluster") if request.param == "ceph" else None
    made = make_lab(request.param, ceph)
    made.upload("tp3-v1", TEMPLATE_BYTE)
    return made


# -- the stories -------------------------------------------------------------------------
def test_student_resumes_their_own_session_on_any_seat_and_only_there(lab):
    # a teacher makes the template: a frozen copy of the image
    template = lab.ok("tom", "POST", "/v1/templates", {"name": "tp3-reseaux",
                                                       "image": "tp3-v1"}, status=201)
    assert (template["owner"], template["latest_version"]) == ("tom", 1)
    assert lab.call("sam", "POST", "/v1/templates", {"name": "mine", "image": "tp3-v1"}) \
        .status_code == 403

    # a student makes their session; nobody else sees or touches it
    ses = lab.ok("sam", "POST", "/v1/sessions", {"template": "tp3-reseaux"}, status=201)
    assert (ses["student"], ses["state"], ses["template_version"]) == ("sam", "stopped", 1)
    chap_user, secret = lab.chap(ses["uuid"])
    assert secret not in json.dumps(ses) and "chap" not in json.dumps(ses)
    path = f"/v1/sessions/{ses['uuid']}"
    assert lab.call("una", "GET", path).status_code == 403
    assert lab.call("una", "POST", f"{path}/start",
                    {"seat": "a02", "boot": False}).status_code == 403
    assert lab.call("una", "POST", f"{path}/save", {"label": "x"}).status_code == 403
    assert lab.call("una", "DELETE", path).status_code == 403
    assert lab.call("una", "POST", "/v1/sessions", {"template": "tp3-reseaux",
                                                    "student": "sam"}).status_code == 403
    assert lab.ok("una", "GET", "/v1/sessions")["sessions"] == []
    assert [s["uuid"] for s in lab.ok("tom", "GET", "/v1/sessions")["sessions"]] == \
        [ses["uuid"]]
    again = lab.call("sam", "POST", "/v1/sessions", {"template": "tp3-reseaux"})
    assert again.status_code == 409 and ses["uuid"] in error_text(again)

    # started on seat a01: only that seat's initiator, with the session's CHAP account
    running = lab.ok("sam", "POST", f"{path}/start", {"seat": "a01", "boot": False})
    assert (running["state"], running["seat"]) == ("running", "a01")
    assert secret not in json.dumps(running)
    a01 = lab.seat(running, "a01")
    a01.write(0xA1, 0, MiB)
    assert a01.holds(0xA1, 0, MiB) and a01.holds(TEMPLATE_BYTE, MiB, 7 * MiB)
    assert lab.seat(running, "a02").io("read 0 512").returncode != 0  # another seat
    wrong = lab.seat(running, "a01", secret="not-the-secret-0")
    assert "Authentication failure" in wrong.io("read 0 512").stderr
    second = lab.call("sam", "POST", f"{path}/start", {"seat": "a02", "boot": False})
    assert second.status_code == 409 and "on seat a01" in error_text(second)

    # save points, revert, resumed on another seat
    saved = lab.ok("sam", "POST", f"{path}/save", {"label": "exercise 1"}, status=201)
    assert (saved["number"], saved["label"]) == (1, "exercise 1")
    a01.write(0xB2, 0, MiB)
    busy = lab.call("sam", "POST", f"{path}/revert", {"save": "exercise 1"})
    assert busy.status_code == 409 and "stop it first" in error_text(busy)
    assert lab.ok("sam", "POST", f"{path}/stop")["state"] == "stopped"
    assert a01.io("read 0 512").returncode != 0  # the target is gone with the session
    lab.ok("sam", "POST", f"{path}/revert", {"save": "exercise 1"})
    resumed = lab.ok("sam", "POST", f"{path}/start", {"seat": "a02", "boot": False})
    a02 = lab.seat(resumed, "a02")
    assert a02.holds(0xA1, 0, MiB)
    assert [s["label"] for s in lab.ok("sam", "GET", f"{path}/saves")["saves"]] == \
        ["exercise 1"]

    # reset to the template: the changes and save points go
    lab.ok("sam", "POST", f"{path}/stop")
    reset = lab.ok("sam", "POST", f"{path}/reset")
    assert reset["last_saved_at"] is None
    assert lab.ok("sam", "GET", f"{path}/saves")["saves"] == []
    a02 = lab.seat(lab.ok("sam", "POST", f"{path}/start", {"seat": "a02", "boot": False}), "a02")
    assert a02.holds(TEMPLATE_BYTE, 0, 8 * MiB)
    a02.write(0xC3, 0, MiB)

    # a new template version changes no existing session; new sessions get it
    lab.upload("tp3-v2", V2_BYTE)
    updated = lab.ok("tom", "POST", "/v1/templates/tp3-reseaux/versions",
                     {"image": "tp3-v2"}, status=201)
    assert [v["version"] for v in updated["versions"]] == [1, 2]
    assert a02.holds(0xC3, 0, MiB) and a02.holds(TEMPLATE_BYTE, MiB, 7 * MiB)
    una = lab.ok("una", "POST", "/v1/sessions", {"template": "tp3-reseaux"}, status=201)
    assert una["template_version"] == 2
    taken = lab.call("una", "POST", f"/v1/sessions/{una['uuid']}/start",
                     {"seat": "a02", "boot": False})
    assert taken.status_code == 409 and "in use by another session" in error_text(taken)
    una_seat = lab.seat(lab.ok("una", "POST", f"/v1/sessions/{una['uuid']}/start",
                               {"seat": "a01", "boot": False}), "a01")
    assert una_seat.holds(V2_BYTE, 0, 8 * MiB)

    # deleting: not while it runs; the template not while it has sessions
    assert lab.call("sam", "DELETE", path).status_code == 409
    lab.ok("sam", "POST", f"{path}/stop")
    assert lab.call("sam", "DELETE", path).status_code == 204
    assert lab.call("sam", "GET", path).status_code == 404
    blocked = lab.call("tom", "DELETE", "/v1/templates/tp3-reseaux")
    assert blocked.status_code == 409 and "1 session" in error_text(blocked)
    logs = [lab.work / f"{lab.service.proc.log_path.stem}{suffix}"
            for suffix in (".log", ".service.log")]
    assert "session store" in logs[1].read_text()
    assert all(secret not in log.read_text() for log in logs)  # never logged


def test_killed_target_server_fails_the_session_which_resumes_with_its_data(make_lab):
    lab = make_lab("local")
    path, started = lab.sams_session_on_a01("tp2")
    lab.seat(started, "a01").write(0x44, 4 * MiB, 2 * MiB)
    os.kill(tgtd_pid(lab.run_dir), signal.SIGKILL)

    failed = wait_for(lambda: (lambda s: s if s["state"] == "failed" else None)(
        lab.ok("sam", "GET", path)), 15, "the session to be marked failed")
    assert "a01 stopped" in failed["last_error"] and failed["seat"] is None
    assert "with its data" in failed["last_error"]
    seat = lab.seat(lab.ok("sam", "POST", f"{path}/start", {"seat": "a02", "boot": False}), "a02")
    assert seat.holds(0x44, 4 * MiB, 2 * MiB) and seat.holds(TEMPLATE_BYTE, 0, 4 * MiB)
    assert lab.ok("sam", "GET", path)["last_error"] is None


def test_a_killed_services_target_server_gives_way_to_the_next_start(make_lab, procs):
    """labmetal killed with SIGKILL leaves its tgtd on the portal; the next start stops it,
    marks the session failed and starts it again with its data."""
    lab = make_lab("local")
    path, started = lab.sams_session_on_a01("tp6")
    lab.seat(started, "a01").write(0x66, 2 * MiB, MiB)
    left = tgtd_pid(lab.run_dir)
    lab.service.proc.kill(signal.SIGKILL)
    lab.service.proc.popen.wait(timeout=10)
    assert Path(f"/proc/{left}").exists()  # still holding the portal
    lab.service = start_service(
        procs, "ses-again", auth="http_basic", state_dir=lab.service.state_dir,
        port=int(lab.service.url.rsplit(":", 1)[1]), overlay_backend="local",
        overlay_run_dir=lab.run_dir, iscsi_portal=started["target"]["portal"])
    failed = wait_for(lambda: (lambda s: s if s["state"] == "failed" else None)(
        lab.ok("sam", "GET", path)), 15, "the session to be marked failed")
    assert "labmetal restarted" in failed["last_error"]
    seat = lab.seat(lab.ok("sam", "POST", f"{path}/start", {"seat": "a02", "boot": False}), "a02")
    assert seat.holds(0x66, 2 * MiB, MiB) and seat.holds(TEMPLATE_BYTE, 0, 2 * MiB)
    assert tgtd_pid(lab.run_dir) != left
    log = (procs.workdir / "ses-again.service.log").read_text()
    assert f"stopping tgtd (pid {left}) left running" in log


def test_a_session_ends_once_its_seat_has_been_gone_from_its_disk_for_a_while(make_lab):
    """A seat switched off by hand (no power state says so): tgtd's NOP pings drop its
    login, and after session_disconnect_end the session ends. One never logged in into
    (the seat is still booting) is left running."""
    lab = make_lab("local", session_disconnect_end=4)
    path, started = lab.sams_session_on_a01("tp7")
    seat = lab.seat(started, "a01")
    time.sleep(10)  # more than session_disconnect_end and two watcher rounds
    assert lab.ok("sam", "GET", path)["state"] == "running"
    frozen = subprocess.Popen(seat.argv("read 0 4096", "sleep 600000"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: "Initiator: " in subprocess.run(
            ["tgtadm", "--lld", "iscsi", "--mode", "target", "--op", "show"],
            env={**os.environ, "TGT_IPC_SOCKET": str(lab.run_dir / "tgt" / "socket")},
            capture_output=True, text=True).stdout, 20, "the seat's login")
        os.kill(frozen.pid, signal.SIGSTOP)  # gone without a word, as a PC switched off
        ended = wait_for(lambda: (lambda s: s if s["state"] == "stopped" else None)(
            lab.ok("sam", "GET", path)), 60, "the session to end")
        assert ended["seat"] is None and ended["last_error"] is None
        log = (lab.work / "svc0.service.log").read_text()
        assert "has not been logged in to its disk for 4 s" in log
    finally:
        frozen.kill()
        frozen.wait()


def test_quota_refusals_say_the_numbers(make_lab):
    lab = make_lab("local", session_quota_mib=8, class_quota_mib=16)
    lab.upload("tp5-v1", TEMPLATE_BYTE)
    lab.ok("tom", "POST", "/v1/templates", {"name": "tp5", "image": "tp5-v1"}, status=201)
    ses = lab.ok("sam", "POST", "/v1/sessions", {"template": "tp5"}, status=201)
    path = f"/v1/sessions/{ses['uuid']}"
    seat = lab.seat(lab.ok("sam", "POST", f"{path}/start", {"seat": "a01", "boot": False}), "a01")
    seat.write(0x55, 0, 18 * MiB)

    refused = lab.call("sam", "POST", f"{path}/save", {"label": "too big"})
    assert refused.status_code == 413, refused.text
    assert "over its quota of 8.0 MiB" in error_text(refused)
    assert lab.ok("sam", "GET", f"{path}/saves")["saves"] == []
    stopped = lab.ok("sam", "POST", f"{path}/stop")
    assert stopped["used_bytes"] > 16 * MiB
    again = lab.call("sam", "POST", f"{path}/start", {"seat": "a01", "boot": False})
    assert again.status_code == 413 and "MiB" in error_text(again)
    shown = lab.ok("sam", "GET", path)
    assert (shown["state"], shown["seat"]) == ("stopped", None)
    assert "quota" in shown["last_error"]

    crowded = lab.call("una", "POST", "/v1/sessions", {"template": "tp5"})
    assert crowded.status_code == 413
    assert "of their class quota of 16.0 MiB" in error_text(crowded)
    lab.ok("sam", "POST", f"{path}/reset")
    lab.ok("una", "POST", "/v1/sessions", {"template": "tp5"}, status=201)


def test_ceph_stopped_then_start_fails_clearly_and_nothing_changes(make_lab):
    if missing_tools():
        pytest.fail("missing Ceph tools (ceph-mon ceph-osd ceph-common python3-rbd)")
    with CephCluster(Path(tempfile.mkdtemp(prefix="lm-ceph-down-"))) as ceph:
        lab = make_lab("ceph", ceph)
        lab.upload("tp7-v1", TEMPLATE_BYTE)
        lab.ok("tom", "POST", "/v1/templates", {"name": "tp7", "image": "tp7-v1"},
               status=201)
        ses = lab.ok("sam", "POST", "/v1/sessions", {"template": "tp7"}, status=201)
        ceph.kill()
        started = time.monotonic()
        refused = lab.call("sam", "POST", f"/v1/sessions/{ses['uuid']}/start",
                           {"seat": "a01", "boot": False})
        assert refused.status_code == 503, refused.text
        assert "Ceph is unavailable" in error_text(refused)
        assert "is the cluster running" in error_text(refused)
        assert time.monotonic() - started < 30
        shown = lab.ok("sam", "GET", f"/v1/sessions/{ses['uuid']}")
        assert (shown["state"], shown["seat"], shown["target"]) == ("stopped", None, None)
        assert lab.call("una", "POST", "/v1/sessions", {"template": "tp7"}).status_code == 503
        assert [s["student"] for s in lab.ok("tom", "GET", "/v1/sessions")["sessions"]] == \
            ["sam"]
        lab.service.proc.stop()  # tgtd before Ceph


def test_the_cli_starts_saves_and_lists_a_students_session(make_lab):
    lab = make_lab("local")
    lab.upload("tp1-v1", TEMPLATE_BYTE)

    def cli(user: str, *args: str) -> Any:
        env = {**os.environ, "LABMETAL_URL": lab.service.url, "LABMETAL_USER": user,
               "LABMETAL_PASSWORD": PASSWORDS[user]}
        result = subprocess.run([LABMETAL, *args, "--json"], env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout) if result.stdout.strip() else None

    template = cli("tom", "template", "create", "tp1", "--image", "tp1-v1")
    assert template["latest_version"] == 1
    assert [t["name"] for t in cli("sam", "template", "list")] == ["tp1"]
    started = cli("sam", "session", "start", "tp1", "--seat", "a01")  # made, then started
    assert (started["state"], started["seat"]) == ("running", "a01")
    lab.seat(started, "a01").write(0x71, 0, MiB)
    assert cli("sam", "session", "save", "tp1", "step one")["label"] == "step one"
    assert [s["number"] for s in cli("sam", "session", "saves", "tp1")] == [1]
    assert cli("sam", "session", "stop", "tp1")["state"] == "stopped"
    assert cli("sam", "session", "revert", "tp1", "1")["state"] == "stopped"
    assert cli("sam", "session", "reset", "tp1")["state"] == "stopped"
    listed = cli("tom", "session", "list", "--template", "tp1")
    assert [(s["student"], s["state"]) for s in listed] == [("sam", "stopped")]
    cli("sam", "session", "delete", "tp1")
    assert cli("sam", "session", "list") == []


def boot_script(lab: Lab, mac: str, source: str) -> str:
    """The seat's per-MAC script as a PC at ``source`` gets it (the service sees that
    address: loopback has all of 127/8)."""
    host, port = lab.service.url.split("//", 1)[1].rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=60,
                                            source_address=(source, 0))
    try:
        connection.request("GET", f"/boot/{mac.replace(':', '-')}.ipxe")
        answer = connection.getresponse()
        assert answer.status == 200
        return answer.read().decode()
    finally:
        connection.close()


def test_a_running_sessions_boot_script_goes_to_one_address_only(make_lab):
    """Without labmetal's DHCP (as in a proxy-DHCP room) the first address to fetch the
    script after a start holds the session's CHAP secret; another PC asking with the
    seat's MAC gets an idle script. The target then lets in that address alone: the
    seat's initiator name and CHAP account, sniffed, are worth nothing from another
    address (tgtd lets in an initiator matching any binding, so the name binding goes).
    The next start binds again, with a new secret."""
    lab = make_lab("local")
    mac = "52:54:00:5e:00:01"
    lab.ok("ada", "POST", "/v1/ports", {"address": mac, "node_uuid": lab.seats["a01"]},
           status=201)
    path, ses = lab.sams_session_on_a01("tp-bind")
    _, secret = lab.chap(ses["uuid"])
    here = lab.seat(ses, "a01")  # qemu-io connects from 127.0.0.1
    here.write(0x61, 0, 4096)  # before the script went anywhere: the name and CHAP do
    seat = boot_script(lab, mac, "127.0.0.2")
    result = here.io("read 0 4096")  # all the seat's values, but not its address
    assert result.returncode != 0, result.stdout
    assert "sanboot" in seat and secret in seat
    neighbour = boot_script(lab, mac, "127.0.0.3")
    assert "sanboot" not in neighbour and secret not in neighbour
    assert "127.0.0.3" in neighbour  # says whose address it is not
    assert secret in boot_script(lab, mac, "127.0.0.2")  # the seat again, after a reboot
    lab.ok("sam", "POST", f"{path}/stop")
    again = lab.ok("sam", "POST", f"{path}/start", {"seat": "a01", "boot": False})
    _, new_secret = lab.chap(again["uuid"])
    assert new_secret != secret
    assert new_secret in boot_script(lab, mac, "127.0.0.1")
    assert new_secret not in boot_script(lab, mac, "127.0.0.2")
    assert lab.seat(again, "a01").holds(0x61, 0, 4096)  # from the address it went to
