"""The seat login in labmetal's ramdisk (agent/seat_login.py, api/seat_login.py), against a
real service (`--auth http_basic`, its nginx front with HTTPS) and the local store: the
agent runs in ``login`` mode with the kernel arguments the seat's ``login.ipxe`` gives, a
pseudo-terminal for the seat's screen, and loopback sniffed all along: the password never
crosses the network in clear. The QEMU test that boots the built ramdisk for the same path
is tests/test_diskless.py::test_a_student_logs_in_at_the_seat_and_resumes_their_session.
"""
from __future__ import annotations

import base64
import os
import re
import select
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests

from labmetal.config import Settings
from labmetal.lab.harness import wait_for
from tests.test_sessions import (PASSWORDS, TEMPLATE_BYTE, Lab, auth,  # noqa: F401 (fixtures)
                                 make_lab, storage_tools)

MAC = "52:54:00:5e:00:21"
FOLDER = f"boot/{MAC.replace(':', '-')}"


class Sniffer:
    """Every frame on loopback, from start to stop (a raw AF_PACKET socket)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
        self.sock.bind(("lo", 0))
        self.sock.settimeout(0.2)
        self.frames = bytearray()
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            try:
                self.frames += self.sock.recv(65535)
            except socket.timeout:
                continue

    def stop(self) -> bytes:
        self.running = False
        self.thread.join(timeout=10)
        self.sock.close()
        return bytes(self.frames)


class SeatScreen:
    """The login ramdisk's agent, its screen a pseudo-terminal this test reads and types
    on; its reboot command leaves a file behind."""

    def __init__(self, lab: Lab, kernel: dict[str, str], work: Path, idle: float = 120):
        self.master, slave = os.openpty()
        self.rebooted = work / "rebooted"
        self.rebooted.unlink(missing_ok=True)
        self.text = ""
        self.seen = 0  # where the next expect starts looking
        argv = [sys.executable, "-m", "labmetal.agent", "--api", kernel["labmetal.api"],
                "--mode", kernel["labmetal.mode"], "--tls", kernel["labmetal.tls"],
                "--mac", MAC, "--screen", os.ttyname(slave), "--idle", str(idle),
                "--reboot-cmd", f"touch {self.rebooted}"]
        if "labmetal.ca" in kernel:
            argv += ["--ca", kernel["labmetal.ca"]]
        self.log = open(work / "login-agent.log", "ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=self.log, start_new_session=True)
        os.close(slave)

    def read(self) -> str:
        while select.select([self.master], [], [], 0)[0]:
            try:
                self.text += os.read(self.master, 4096).decode(errors="replace")
            except OSError:
                break
        return self.text

    def expect(self, text: str, timeout: float = 60) -> None:
        """Wait for ``text`` after what the last expect found."""
        try:
            found = wait_for(lambda: self.read().find(text, self.seen) + 1, timeout,
                             f"{text!r} on the screen", interval=0.05)
        except AssertionError as error:
            raise AssertionError(f"{error}; the screen: {self.text[-800:]!r}") from None
        self.seen = found - 1 + len(text)

    def type(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self) -> int:
        code = self.proc.wait(timeout=60)
        os.close(self.master)
        self.log.close()
        return code


def login_kernel(lab: Lab) -> dict[str, str]:
    """The kernel arguments of the seat's login ramdisk, as iPXE would boot it."""
    menu = requests.get(f"{lab.service.url}/{FOLDER}.ipxe", timeout=30).text
    assert "[L] Log in to my TP session" in menu and f"{FOLDER}/login.ipxe" in menu, menu
    script = requests.get(f"{lab.service.url}/{FOLDER}/login.ipxe", timeout=30).text
    kernel = next(line for line in script.splitlines() if line.startswith("kernel "))
    return dict(word.split("=", 1) for word in kernel.split() if word.startswith("labmetal."))


@pytest.fixture
def lab(make_lab, tmp_path) -> Lab:
    """A service with a template ``tp-login`` and seat a01 (MAC ``MAC``), which boots
    labmetal's ramdisk (any files do: nothing boots them here)."""
    made = make_lab("local", deploy_kernel="deploy-kernel", deploy_ramdisk="deploy-ramdisk")
    for kind in ("kernel", "ramdisk"):
        path = tmp_path / f"deploy.{kind}"
        path.write_bytes(os.urandom(4096))
        made.ok("ada", "POST", "/v1/images", {"name": f"deploy-{kind}", "kind": kind},
                status=201)
        with open(path, "rb") as data:
            assert requests.put(f"{made.service.url}/v1/images/deploy-{kind}/data", data=data,
                                auth=auth("ada"), timeout=60).ok
    made.upload("tp-login-v1", TEMPLATE_BYTE)
    made.ok("tom", "POST", "/v1/templates", {"name": "tp-login", "image": "tp-login-v1"},
            status=201)
    made.ok("ada", "POST", "/v1/ports", {"address": MAC, "node_uuid": made.seats["a01"]},
            status=201)
    return made


def test_a_student_logs_in_on_the_seats_screen_over_https_and_the_seat_boots_the_session(
        lab, tmp_path):
    """sam types a wrong password (refused), then the right one; picks "new session";
    the seat reboots into it: its next script sanboots the session. Loopback carried the
    CA over plain HTTP and the login over TLS: the password is nowhere in clear."""
    kernel = login_kernel(lab)
    assert kernel["labmetal.mode"] == "login" and kernel["labmetal.tls"].startswith("https://")
    assert re.fullmatch(r"[0-9a-f]{64}", kernel["labmetal.ca"])
    sniffer = Sniffer()
    seat = SeatScreen(lab, kernel, tmp_path)
    try:
        seat.expect("Username: ")
        seat.type("sam")
        seat.expect("Password: ")
        seat.type("not sam's password")
        seat.expect("login refused")
        seat.expect("Username: ")
        seat.type("sam")
        seat.expect("Password: ")
        seat.type(PASSWORDS["sam"])
        seat.expect("TP sessions of sam:")
        seat.expect("[1] tp-login: new session")
        seat.type("1")
        seat.expect("starting sam's session of tp-login; this seat restarts into it")
        wait_for(seat.rebooted.exists, 60, "the seat's reboot")
    finally:
        frames = sniffer.stop()
    assert seat.close() == 0
    assert b"GET /ca.crt" in frames  # the sniffer saw the seat's traffic
    for password in (PASSWORDS["sam"], "not sam's password"):  # as typed, as HTTP basic
        assert password.encode() not in frames
        assert base64.b64encode(f"sam:{password}".encode()) not in frames
    assert "not sam's password" not in seat.text and PASSWORDS["sam"] not in seat.text
    sessions = lab.ok("sam", "GET", "/v1/sessions")["sessions"]
    assert [(s["template"], s["state"], s["seat"]) for s in sessions] == \
        [("tp-login", "running", "a01")]
    script = requests.get(f"{lab.service.url}/{FOLDER}.ipxe", timeout=30).text
    assert "sanboot" in script, script


def test_a_ca_that_is_not_the_pinned_one_gets_no_password(lab, tmp_path):
    """Told another CA's fingerprint (as a seat would be by whoever served it a ramdisk
    and a CA of their own), the ramdisk asks for nothing and the seat restarts."""
    kernel = {**login_kernel(lab), "labmetal.ca": "00" * 32}
    seat = SeatScreen(lab, kernel, tmp_path)
    seat.expect("is not the one this ramdisk was told to trust: not sending any password")
    wait_for(seat.rebooted.exists, 60, "the seat's reboot")
    assert seat.close() == 1
    assert "Username" not in seat.text


def test_nobody_at_the_seat_sends_it_back_to_its_menu_and_a_choice_needs_ones_own_ticket(
        lab, tmp_path):
    """Nobody types: after ``idle`` seconds the seat restarts to its menu. The login API
    refuses a choice with an expired ticket or another user's, and a caller without
    credentials (tests/test_front.py: and credentials on plain HTTP from a seat)."""
    seat = SeatScreen(lab, login_kernel(lab), tmp_path, idle=1)
    seat.expect("nobody typed anything; back to the seat's menu")
    wait_for(seat.rebooted.exists, 60, "the seat's reboot")
    assert seat.close() == 1

    login = f"/v1/seat-login/{MAC.replace(':', '-')}"
    menu = lab.ok("una", "POST", login, {})
    assert [c["choice"] for c in menu["choices"]] == ["t-tp-login"]
    for ticket in ("1900000000." + "0" * 64, menu["ticket"]):  # too old; una's, not sam's
        refused = lab.call("sam", "POST", f"{login}/start",
                           {"choice": "t-tp-login", "ticket": ticket})
        assert refused.status_code == 409 and "log in again" in refused.text
    assert lab.ok("sam", "GET", "/v1/sessions")["sessions"] == []
    anonymous = requests.post(lab.service.url + login, json={}, timeout=30)
    assert anonymous.status_code == 401 and "Basic" in anonymous.headers["WWW-Authenticate"]


def test_seats_send_the_login_to_the_tls_listener_or_on_every_address_to_the_seat_urls_host():
    assert Settings(listen="10.99.1.2:6385", tls_listen="6443").seat_https_url == \
        "https://10.99.1.2:6443"
    assert Settings(listen="0.0.0.0:6385",
                    seat_url="http://10.99.1.2:6385").seat_https_url == "https://10.99.1.2:6443"
    assert Settings(listen="0.0.0.0:6385", seat_url="http://10.99.1.2:6385",
                    tls_listen="10.99.1.3:8443").seat_https_url == "https://10.99.1.3:8443"
    assert Settings(listen="10.99.1.2:6385", front="none").seat_https_url is None
