"""The production front (labmetal/front.py): a real `labmetal serve`, nginx in front of
waitress, as on a lab's server. What a seat can do to it (DESIGN §11) and what must still
hold: idle and slow connections by the thousand, gigabytes streamed without credentials,
JSON bodies past the limit, passwords over plain HTTP from the seat network; and what the
service gives in return: HTTPS with labmetal's own CA, the seat's real address in the API,
units to install it with."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import pwd
import resource
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from labmetal.lab.network import run_in
from tests.room import lab  # noqa: F401 (fixture)
from labmetal.lab.harness import LABMETAL, Processes, Service, free_port, start_service, wait_for

MiB = 2**20
GiB = 2**30
PASSWORD = "Lovelace-1815"
ADA = ("ada", PASSWORD)
REPO = Path(__file__).resolve().parent.parent
ANSWER_WAIT = 30  # seconds a test waits for an answer before it counts as none


@dataclass
class Front:
    """A running service with its front: ``url`` plain HTTP, ``https`` the TLS listener."""
    service: Service
    https: str
    ca: Path

    @property
    def url(self) -> str:
        return self.service.url

    def log(self) -> str:
        path = self.service.proc.log_path.with_name("front.service.log")
        return path.read_text(errors="replace") if path.exists() else ""


def add_admin(state_dir: Path) -> None:
    subprocess.run([LABMETAL, "user", "set", "ada", "--role", "admin", "--password-stdin",
                    "--state-dir", str(state_dir)], input=PASSWORD + "\n", check=True,
                   capture_output=True, text=True)


def start_front(procs: Processes, name: str, host: str = "127.0.0.1") -> Front:
    state_dir = procs.workdir / f"{name}-state"
    add_admin(state_dir)
    tls_port = free_port()
    # Nothing in these tests may be cut off for slowness while it checks something else.
    service = start_service(procs, name, state_dir=state_dir, host=host, auth="http_basic",
                            tls_listen=str(tls_port), client_timeout=600)
    return Front(service, f"https://{host}:{tls_port}", state_dir / "tls" / "ca.crt")


@pytest.fixture(scope="module")
def front(tmp_path_factory) -> Iterator[Front]:
    procs = Processes(tmp_path_factory.mktemp("front"))
    try:
        yield start_front(procs, "front")
    finally:
        procs.stop_all()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def send_head(url: str, head: str, body: bytes = b"", source: str | None = None,
              ca: Path | None = None) -> tuple[int, dict[str, str], str]:
    """Send a request's head and only ``body`` of its body (from ``source``, over TLS if
    ``ca``), then read the answer: what a server says before the rest of the body comes.
    A server that waits for the rest gives no answer: socket.timeout."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=ANSWER_WAIT,
                                    source_address=(source, 0) if source else None)
    if ca is not None:
        sock = ssl.create_default_context(cafile=str(ca)).wrap_socket(sock,
                                                                       server_hostname=host)
    with sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        reader = sock.makefile("rb")
        status = int(reader.readline().split()[1])
        headers = {}
        while (line := reader.readline().strip()):
            key, _, value = line.decode().partition(":")
            headers[key.strip().lower()] = value.strip()
        text = reader.read(int(headers.get("content-length", 0))).decode(errors="replace")
        return status, headers, text


def fault(text: str) -> str:
    return json.loads(json.loads(text)["error_message"])["faultstring"]


def is_open(sock: socket.socket) -> bool:
    """The server has not closed this connection (nothing to read, no end of stream)."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


# -- 0. what the front is told (no nginx, no root): tests/test_front_config.py (fast).


# -- 1. idle and slow connections ------------------------------------------------------------
def test_the_api_answers_while_a_seat_holds_1000_idle_and_200_slow_connections(front):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    host, port = front.url.split("//")[1].rsplit(":", 1)
    idle: list[socket.socket] = []
    slow: list[socket.socket] = []
    stop = threading.Event()

    def slowloris() -> None:
        """A request head that never ends: one more header byte every 2 s."""
        while not stop.wait(2):
            for sock in slow:
                try:
                    sock.sendall(b"a")
                except OSError:
                    pass

    sender = threading.Thread(target=slowloris, daemon=True)
    try:
        for _ in range(1000):
            idle.append(socket.create_connection((host, int(port)), timeout=ANSWER_WAIT))
        for _ in range(200):
            slow.append(socket.create_connection((host, int(port)), timeout=ANSWER_WAIT))
            slow[-1].sendall(b"GET /v1 HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        sender.start()
        version = requests.get(front.url + "/v1", timeout=ANSWER_WAIT)
        assert version.status_code == 200 and version.json()["id"] == "v1"
        nodes = requests.get(front.url + "/v1/nodes", auth=ADA, timeout=ANSWER_WAIT)
        assert nodes.status_code == 200, nodes.text
        # ... and all of them were held open meanwhile, not dropped to make room
        assert all(map(is_open, idle + slow))
    finally:
        stop.set()
        if sender.is_alive():
            sender.join()
        for sock in idle + slow:
            sock.close()


# -- 2. bodies bounded and authorized before they are read -----------------------------------
def test_an_anonymous_1_gib_upload_is_refused_before_its_body_is_read(front):
    created = requests.post(front.url + "/v1/images", json={"name": "anon", "kind": "kernel"},
                            auth=ADA, timeout=ANSWER_WAIT)
    assert created.status_code == 201, created.text
    status, headers, text = send_head(
        front.url, f"PUT /v1/images/anon/data HTTP/1.1\nHost: x\nContent-Length: {GiB}\n",
        os.urandom(4096))  # 4 KiB of the 1 GiB: the answer comes without the rest
    assert status == 401, text
    assert fault(text).startswith("Authentication required")
    assert headers["www-authenticate"] == 'Basic realm="labmetal"'
    assert requests.get(front.url + "/v1/images/anon", auth=ADA,
                        timeout=ANSWER_WAIT).json()["status"] == "queued"


def test_a_json_body_over_1_mib_is_refused_before_anything_reads_it(front):
    status, headers, text = send_head(
        front.url, f"POST /v1/nodes HTTP/1.1\nHost: x\nAuthorization: {basic(*ADA)}\n"
                   f"Content-Type: application/json\nContent-Length: {2 * MiB}\n",
        b'{"driver": "wol", "description": "' + b"x" * 4096)
    assert status == 413, text
    assert fault(text) == "The request body is larger than the 1 MiB this request may have"
    # the front's own answer: the API adds its version headers to every answer it gives
    assert "x-openstack-ironic-api-maximum-version" not in headers
    assert requests.get(front.url + "/v1/nodes", auth=ADA,
                        timeout=ANSWER_WAIT).json()["nodes"] == []
    # one under 1 MiB but past nginx's memory buffer goes through a temporary file, which
    # the unprivileged workers must be able to write: it reaches the API, which answers
    big = requests.post(front.url + "/v1/nodes", auth=ADA, timeout=ANSWER_WAIT,
                        json={"driver": "no-such-driver", "description": "x" * 600_000})
    assert big.status_code == 400, big.text[:300]
    assert "x-openstack-ironic-api-maximum-version" in big.headers


def test_an_admins_large_upload_streams_over_https_while_others_are_answered(front):
    created = requests.post(front.https + "/v1/images", json={"name": "big", "kind": "kernel"},
                            auth=ADA, verify=front.ca, timeout=ANSWER_WAIT)
    assert created.status_code == 201, created.text
    piece = os.urandom(MiB)
    pieces = 256
    half_sent, go_on = threading.Event(), threading.Event()
    digest = hashlib.sha256()

    def body() -> Iterator[bytes]:
        for number in range(pieces):
            if number == pieces // 2:
                half_sent.set()
                assert go_on.wait(120), "the test did not let the upload go on"
            digest.update(piece)
            yield piece

    result: dict[str, Any] = {}

    def upload() -> None:
        try:
            result["response"] = requests.put(front.https + "/v1/images/big/data", data=body(),
                                              auth=ADA, verify=front.ca, timeout=600)
        except Exception as error:  # noqa: BLE001 - shown by the assertion below
            result["error"] = error

    uploader = threading.Thread(target=upload, daemon=True)
    uploader.start()
    try:
        assert half_sent.wait(ANSWER_WAIT), result
        # 128 MiB in, the rest still to come: the API answers everybody else
        assert requests.get(front.url + "/v1", timeout=ANSWER_WAIT).status_code == 200
        shown = requests.get(front.https + "/v1/images/big", auth=ADA, verify=front.ca,
                             timeout=ANSWER_WAIT)
        assert shown.status_code == 200 and shown.json()["status"] == "queued"
    finally:
        go_on.set()
        uploader.join(600)
    response = result.get("response")
    assert response is not None and response.status_code == 200, result
    image = response.json()
    assert (image["status"], image["size"]) == ("active", pieces * MiB)
    assert image["sha256"] == digest.hexdigest()


# -- 3. HTTPS with labmetal's own CA ----------------------------------------------------------
def test_https_works_with_labmetals_ca_whose_certificate_names_the_listen_address(front):
    version = requests.get(front.https + "/v1", verify=front.ca, timeout=ANSWER_WAIT)
    assert version.status_code == 200
    # the API knows the request came over https (its links say so)
    assert version.json()["links"][0]["href"] == front.https + "/v1/"
    page = requests.get(front.https + "/login", verify=front.ca, timeout=ANSWER_WAIT)
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    assert "Secure" in page.headers["Set-Cookie"]  # the login cookie never goes back in clear
    with pytest.raises(requests.exceptions.SSLError):  # no public CA vouches for it
        requests.get(front.https + "/v1", timeout=ANSWER_WAIT)

    host, port = front.https.split("//")[1].rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(front.ca))
    with socket.create_connection((host, int(port)), timeout=ANSWER_WAIT) as raw, \
            context.wrap_socket(raw, server_hostname=host) as tls:  # checks the name too
        names = tls.getpeercert()["subjectAltName"]
    assert ("IP Address", "127.0.0.1") in names

    # the CA's certificate, for browsers and the ramdisk: public, on the plain listener
    published = requests.get(front.url + "/ca.crt", timeout=ANSWER_WAIT)
    assert published.status_code == 200 and published.content == front.ca.read_bytes()
    assert "SHA-256" in front.service.proc.output()  # its fingerprint, to compare
    tls_dir = front.ca.parent
    assert stat.S_IMODE(tls_dir.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(path.stat().st_mode) == 0o600 for path in tls_dir.iterdir())

    # the CLI over https: the CA from the state directory (on the server), or --ca-file
    env = {**os.environ, "LABMETAL_USER": "ada", "LABMETAL_PASSWORD": PASSWORD,
           "LABMETAL_STATE_DIR": str(front.service.state_dir)}
    env.pop("LABMETAL_CA_FILE", None)
    listed = subprocess.run([LABMETAL, "node", "list", "--json", "--url", front.https],
                            env=env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stderr
    elsewhere = {**env, "LABMETAL_STATE_DIR": str(front.service.state_dir / "nowhere")}
    refused = subprocess.run([LABMETAL, "node", "list", "--url", front.https], env=elsewhere,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "--ca-file" in refused.stderr
    given = subprocess.run([LABMETAL, "node", "list", "--json", "--url", front.https,
                            "--ca-file", str(front.ca)], env=elsewhere, capture_output=True,
                           text=True, timeout=60)
    assert given.returncode == 0, given.stderr


# -- 4. the seat's own address reaches the API ------------------------------------------------
def test_the_fronts_workers_parse_requests_as_labmetal_front_not_root(front):
    """nginx's master (root: it holds the ports and the key) runs its workers as the
    system user labmetal-front, which reaches waitress's socket through its group alone."""
    worker_user = pwd.getpwnam("labmetal-front")
    children = {int(pid) for pid in Path(f"/proc/{front.service.proc.pid}/task/"
                f"{front.service.proc.pid}/children").read_text().split()}
    masters = [pid for pid in children
               if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"nginx: master")]
    assert len(masters) == 1, children
    workers = Path(f"/proc/{masters[0]}/task/{masters[0]}/children").read_text().split()
    assert workers
    for pid in workers:
        status = Path(f"/proc/{pid}/status").read_text()
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()
        assert set(uids[1:]) == {str(worker_user.pw_uid)}, (pid, uids)
    sockets = list(Path("/run/labmetal-front").glob("*/app.sock"))
    assert sockets
    for sock in sockets:
        info = sock.stat()
        assert (info.st_uid, info.st_gid) == (0, worker_user.pw_gid)
        assert stat.S_IMODE(info.st_mode) == 0o660
        folder = sock.parent.stat()
        assert stat.S_IMODE(folder.st_mode) == 0o710 and folder.st_gid == worker_user.pw_gid
    assert requests.get(front.service.url + "/v1", timeout=30).ok  # through those workers


def test_the_api_sees_the_clients_own_address_through_the_front(front):
    """The API binds seats' secrets to their address (api/seat_address.py): through the
    front it must still be the client's, never the front's, nor one the client claims."""
    for user, source, over_tls in (("ghost-plain", "127.0.0.2", False),
                                   ("ghost-tls", "127.0.0.3", True)):
        base = front.https if over_tls else front.url
        status, _, _ = send_head(
            base, f"GET /v1/nodes HTTP/1.1\nHost: x\nConnection: close\n"
                  f"X-Forwarded-For: 10.6.6.6\nAuthorization: {basic(user, 'wrong')}\n",
            source=source, ca=front.ca if over_tls else None)
        assert status == 401
        line = f"failed authentication for user '{user}' from {source}"
        wait_for(lambda: line in front.log(), ANSWER_WAIT, f"'{line}' in the log")  # noqa: B023 (called in this iteration)
    assert "10.6.6.6" not in front.log()


# -- 5. no password over plain HTTP from the seat network -------------------------------------
def test_a_seat_sending_credentials_over_plain_http_is_told_to_use_https(lab, tmp_path):
    room = lab.add_room("fr", server="10.99.184.1/24")
    lab.add_uplink(room, "10.99.184.2/24")
    seat = lab.add_seat(room, "s1", "52:54:00:99:b8:01", address="10.99.184.11/24")
    procs = Processes(tmp_path)
    try:
        front = start_front(procs, "front", host="10.99.184.2")
        https = front.https
        plain = front.url

        def from_seat(method: str, url: str, **kwargs: Any) -> dict[str, Any]:
            """One request made by a program on the seat."""
            script = ("import json, sys, requests\n"
                      "method, url, kwargs = json.loads(sys.argv[1])\n"
                      "if 'auth' in kwargs: kwargs['auth'] = tuple(kwargs['auth'])\n"
                      "r = requests.request(method, url, allow_redirects=False, timeout=30,"
                      " **kwargs)\n"
                      "print(json.dumps({'status': r.status_code, 'text': r.text,"
                      " 'location': r.headers.get('Location')}))\n")
            done = run_in(seat.namespace, [sys.executable, "-c", script,
                                           json.dumps([method, url, kwargs])], timeout=60)
            return json.loads(done.stdout)

        assert from_seat("GET", plain + "/v1")["status"] == 200  # anonymous: fine
        told = f"Use {https} (labmetal's CA certificate: /ca.crt)"
        for credentials in ({"auth": list(ADA)}, {"headers": {"X-Auth-Token": "x" * 40}},
                            {"cookies": {"labmetal_session": "x" * 40}}):
            refused = from_seat("GET", plain + "/v1/nodes", **credentials)
            assert refused["status"] == 403, (credentials, refused)
            assert told in fault(refused["text"])
        login = from_seat("POST", plain + "/login", data={"user": "ada", "password": PASSWORD})
        assert login["status"] == 403 and told in fault(login["text"])
        for page in ("/ui/rooms", "/login?next=/ui/"):
            sent = from_seat("GET", plain + page)
            assert (sent["status"], sent["location"]) == (301, https + page)
        # the seat login too: labmetal's ramdisk sends it over HTTPS
        seat_login = from_seat("POST", plain + "/v1/seat-login/52-54-00-00-00-01",
                               auth=list(ADA))
        assert seat_login["status"] == 403 and told in fault(seat_login["text"])

        over_tls = from_seat("GET", https + "/v1/nodes", auth=list(ADA), verify=str(front.ca))
        assert over_tls["status"] == 200, over_tls
        wrong = from_seat("GET", https + "/v1/nodes", auth=["ghost-seat", "x"],
                          verify=str(front.ca))
        assert wrong["status"] == 401
        line = "failed authentication for user 'ghost-seat' from 10.99.184.11"
        wait_for(lambda: line in front.log(), ANSWER_WAIT, f"'{line}' in the log")
        # this machine itself, on the same address: plain HTTP keeps working
        local = requests.get(plain + "/v1/nodes", auth=ADA, timeout=ANSWER_WAIT)
        assert local.status_code == 200, local.text
    finally:
        procs.stop_all()


# -- 6. installing on the lab's server ---------------------------------------------------------
UNITS = ("labmetal.service", "labmetal-api.service", "labmetal-conductor.service")


def test_the_installer_writes_hardened_units_and_a_private_settings_file(tmp_path):
    root = tmp_path / "root"
    done = subprocess.run(["bash", str(REPO / "deploy" / "install.sh"), "--root", str(root),
                           "--listen", "10.99.184.2:6385", "--dhcp-interface", "eno2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    settings = root / "etc/labmetal/labmetal.env"
    assert stat.S_IMODE(settings.stat().st_mode) == 0o600
    assert stat.S_IMODE(settings.parent.stat().st_mode) == 0o700
    text = settings.read_text()
    assert "LABMETAL_LISTEN=10.99.184.2:6385" in text
    assert "LABMETAL_DHCP_INTERFACE=eno2" in text
    # a second run keeps the settings an admin edited
    settings.write_text(text + "LABMETAL_LOG_LEVEL=DEBUG\n")
    again = subprocess.run(["bash", str(REPO / "deploy" / "install.sh"), "--root", str(root)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "LOG_LEVEL=DEBUG" in settings.read_text(), again.stderr

    checked = tmp_path / "checked"
    checked.mkdir()
    for name in UNITS:
        unit = (root / "etc/systemd/system" / name).read_text()
        for setting in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
                        "PrivateTmp=yes", "RuntimeDirectory=labmetal", "StateDirectory=labmetal",
                        "CapabilityBoundingSet=", "UMask=0077",
                        "EnvironmentFile=/etc/labmetal/labmetal.env"):
            assert setting in unit, (name, setting)
        # systemd checks that the command exists: this checkout's instead of /opt/labmetal's
        (checked / name).write_text(unit.replace("/opt/labmetal/bin/labmetal", LABMETAL))
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    for name in UNITS:
        verified = subprocess.run(["systemd-analyze", "verify", str(checked / name)],
                                  capture_output=True, text=True, timeout=60)
        assert (verified.returncode, verified.stderr) == (0, ""), name
