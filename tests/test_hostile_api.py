"""The API against hostile callers (issue 14, DESIGN §11): students on the seat network and
pages of other sites in the lab's browsers, against `labmetal serve --auth http_basic`.

Most stories run against a real service. Those that must see what the application itself
reads of a body before it answers run the application over real HTTP on Werkzeug's server
in a thread, which hands a request over as soon as its head has come: in front of the
application `labmetal serve` has waitress, which reads a whole body first, or nginx, which
bounds it first (labmetal/front.py), and either hides what the application would have done.
"""
from __future__ import annotations

import base64
import hashlib
import json
import socket
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from cryptography.fernet import Fernet
from werkzeug.serving import make_server

from labmetal.api.app import Services, create_app
from labmetal.config import Settings
from labmetal.db import Database
from labmetal.policy import Policy, Verdict
from labmetal.secrets import SecretBox
from labmetal.users import set_user
from labmetal.lab.harness import LABMETAL, Processes, Service, error_text, start_service, wait_for
from tests.test_sessions import TEMPLATE_BYTE, make_lab  # noqa: F401 (fixture)

MiB = 2**20
ROLES = {"ada": "admin", "tom": "teacher", "sue": "student", "una": "student"}
PASSWORDS = {name: f"{name}'s long pass phrase" for name in ROLES}
SEAT_MAC = "52:54:00:14:00:01"
NO_SESSION = "00000000-0000-4000-8000-000000000000"


def auth(name: str) -> tuple[str, str]:
    return name, PASSWORDS[name]


def add_user(state_dir: Path, name: str, password: str | None = None) -> None:
    subprocess.run([LABMETAL, "user", "set", name, "--role", ROLES[name], "--password-stdin",
                    "--state-dir", str(state_dir)], input=(password or PASSWORDS[name]) + "\n",
                   check=True, capture_output=True, text=True)


def hostile_service(procs: Processes, name: str) -> Service:
    """A real service with an admin, a teacher and two students, and one enrolled seat."""
    state_dir = procs.workdir / f"{name}-state"
    for user in ROLES:
        add_user(state_dir, user)
    service = start_service(procs, name, auth="http_basic", state_dir=state_dir)
    node = service.post("/v1/nodes", {"name": "pc1", "driver": "wol"}, auth=auth("ada"))
    assert node.status_code == 201, node.text
    port = service.post("/v1/ports", {"address": SEAT_MAC, "node_uuid": node.json()["uuid"]},
                        auth=auth("ada"))
    assert port.status_code == 201, port.text
    return service


def service_log(procs: Processes, name: str) -> str:
    return (procs.workdir / f"{name}.service.log").read_text()


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Iterator[tuple[Service, Processes]]:
    """One service for the stories that neither guess passwords nor delete accounts."""
    procs = Processes(tmp_path_factory.mktemp("hostile"))
    try:
        yield hostile_service(procs, "shared"), procs
    finally:
        procs.stop_all()


def web_login(service_url: str, user: str) -> requests.Session:
    browser = requests.Session()
    csrf = browser.get(service_url + "/v1/auth/session", timeout=30).json()["csrf_token"]
    logged = browser.post(service_url + "/login", json={"user": user, "password":
                                                        PASSWORDS[user]},
                          headers={"X-CSRF-Token": csrf}, timeout=30)
    assert logged.status_code == 200, logged.text
    browser.headers["X-CSRF-Token"] = logged.json()["csrf_token"]
    return browser


# -- the application over real HTTP, on a server that does not read bodies ahead ----------
@dataclass
class AppServer:
    url: str
    image_dir: Path

    def raw(self, head: str, body: bytes = b"") -> tuple[int, str]:
        """Send a request's head and only ``body`` of its body, then wait for the answer:
        the status and text a server gives before the rest of the body comes (or, if it
        waits for it, a timeout)."""
        address = urlsplit(self.url)
        with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
            sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
            reader = sock.makefile("rb")
            status = int(reader.readline().split()[1])
            length = 0
            while (line := reader.readline().strip()):
                key, _, value = line.decode().partition(":")
                if key.lower() == "content-length":
                    length = int(value)
            return status, reader.read(length).decode(errors="replace")


@pytest.fixture
def app_server(tmp_path: Path) -> Iterator[AppServer]:
    db = Database(f"sqlite:///{tmp_path / 'labmetal.db'}")
    db.upgrade()
    for name, role in ROLES.items():
        set_user(db, name, PASSWORDS[name], role)
    settings = Settings(auth="http_basic", state_dir=tmp_path, max_image_size=64 * MiB)
    app = create_app(Services(settings, db, None, None, {}, SecretBox(Fernet.generate_key())))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield AppServer(f"http://127.0.0.1:{server.server_port}", settings.image_path)
    finally:
        server.shutdown()
        thread.join()
        db.dispose()


def basic(name: str) -> str:
    """An Authorization header's value, for requests written by hand."""
    return "Basic " + base64.b64encode(f"{name}:{PASSWORDS[name]}".encode()).decode()


# -- 1. open redirects --------------------------------------------------------------------
def test_the_login_sends_a_browser_only_to_a_path_of_this_site(shared):
    service, _ = shared
    hostile = ["/\t/evil.example", "/\n/evil.example", "//evil.example", "/\\evil.example",
               "/\\/evil.example", "https://evil.example/", " //evil.example",
               "/\r\nSet-Cookie: x=1", "/ /evil.example", "/\x7f/evil.example"]
    for target in hostile:
        browser = requests.Session()
        csrf = browser.get(service.url + "/v1/auth/session", timeout=30).json()["csrf_token"]
        logged = browser.post(service.url + "/login", params={"next": target},
                              data={"user": "tom", "password": PASSWORDS["tom"],
                                    "csrf_token": csrf}, allow_redirects=False, timeout=30)
        assert logged.status_code == 303, (target, logged.text)
        assert logged.headers["Location"] == "/login", target
        # the pages' login form: a logged-in caller is not sent there either
        shown = browser.get(service.url + "/login", params={"next": target},
                            allow_redirects=False, timeout=30)
        assert shown.status_code == 200 and "evil" not in shown.text, target
        anonymous = requests.get(service.url + "/login", params={"next": target}, timeout=30)
        assert anonymous.status_code == 200 and "evil" not in anonymous.text, target
    browser = requests.Session()
    csrf = browser.get(service.url + "/v1/auth/session", timeout=30).json()["csrf_token"]
    logged = browser.post(service.url + "/login", params={"next": "/ui/nodes?x=1"},
                          data={"user": "tom", "password": PASSWORDS["tom"],
                                "csrf_token": csrf}, allow_redirects=False, timeout=30)
    assert logged.headers["Location"] == "/ui/nodes?x=1"


# -- 2. what used to be 500s ---------------------------------------------------------------
def test_malformed_requests_get_a_clear_400_not_a_500(shared):
    service, procs = shared
    headers = {"Content-Type": "application/json"}
    for number in ("NaN", "Infinity", "-Infinity", "1e999"):
        refused = requests.post(service.url + "/v1/auth/tokens", auth=auth("sue"),
                                data=f'{{"expires_in": {number}}}', headers=headers, timeout=30)
        assert refused.status_code == 400, (number, refused.text)
        assert "not valid JSON" in error_text(refused)
    for deep in ("[" * 1000 + "]" * 1000, '{"a":' * 1000 + "1" + "}" * 1000,
                 json.dumps({"driver": "wol", "extra": _nested(33)})):
        refused = requests.post(service.url + "/v1/nodes", auth=auth("ada"), data=deep,
                                headers=headers, timeout=30)
        assert refused.status_code == 400, refused.text
        assert "nested deeper than 32 levels" in error_text(refused)
    kept = service.post("/v1/nodes", {"driver": "wol", "extra": _nested(32)}, auth=auth("ada"))
    assert kept.status_code == 201, kept.text

    # the seat login's ticket: a number of 5,000 digits
    ticket = "1" * 5000 + "." + "0" * 64
    refused = service.post(f"/v1/seat-login/{SEAT_MAC.replace(':', '-')}/start",
                           {"choice": f"s-{NO_SESSION}", "ticket": ticket}, auth=auth("sue"))
    assert refused.status_code == 400, refused.text
    assert "ticket" in error_text(refused)
    assert "Traceback" not in service_log(procs, "shared")


def test_json_strings_with_half_a_surrogate_pair_get_a_400_not_a_500(shared):
    # JSON, but not text: the database could not store it (UnicodeEncodeError, a 500)
    service, procs = shared
    for body in (b'{"name": "tpr-u", "description": "\\ud800"}',  # escaped
                 b'{"name": "tpr-u", "description": "\xed\xa0\x80"}'):  # as UTF-8 bytes
        refused = requests.post(service.url + "/v1/rooms", auth=auth("ada"), data=body,
                                headers={"Content-Type": "application/json"}, timeout=30)
        assert refused.status_code == 400, (body, refused.text)
        assert "lone UTF-16 surrogate" in error_text(refused)
    paired = requests.post(service.url + "/v1/rooms", auth=auth("ada"),  # a whole pair: one
                           data=b'{"name": "tpr-u", "description": "\\ud83d\\ude00"}',
                           headers={"Content-Type": "application/json"}, timeout=30)
    assert paired.status_code == 201 and paired.json()["description"] == "\U0001f600"
    assert "Traceback" not in service_log(procs, "shared")


def test_a_heartbeat_python_cannot_read_gets_a_4xx_not_a_500(shared):
    service, procs = shared
    node = service.post("/v1/nodes", {"driver": "wol"}, auth=auth("ada")).json()["uuid"]
    box = SecretBox.from_file(service.state_dir / "secret.key")
    with sqlite3.connect(service.state_dir / "labmetal.db") as db:  # a deploy waits for it
        db.execute("UPDATE nodes SET provision_state = 'wait call-back', agent_token = ? "
                   "WHERE uuid = ?", (box.seal("the deploy's token"), node))
    beat = f"/v1/heartbeat/{node}"
    # hosts the pattern lets through that urlsplit refuses (ValueError, a 500)
    for callback in ("http://[", "http://]:9999", "http://[not-v6]:9999"):
        refused = service.post(beat, {"callback_url": callback, "agent_token": "x"})
        assert refused.status_code == 400, (callback, refused.text)
        assert "callback_url has no valid host or port" in error_text(refused)
    # tokens of any characters (compare_digest refuses str outside ASCII: a 500)
    for token in ("caf\u00e9", "\u00ff" * 43, "the deploy's token\u2019"):
        refused = service.post(beat, {"callback_url": "http://10.0.0.7:9999",
                                      "agent_token": token})
        assert refused.status_code == 401, (token, refused.text)
        assert error_text(refused) == "Invalid or missing agent token received"
    assert "Traceback" not in service_log(procs, "shared")


def _nested(levels: int) -> Any:
    """A node's ``extra`` that makes its body ``levels`` objects deep."""
    value: Any = "bottom"
    for _ in range(levels - 1):  # the body is the outermost object
        value = {"in": value}
    return value


def test_a_second_upload_of_an_image_while_the_first_is_read_is_refused(app_server):
    created = requests.post(app_server.url + "/v1/images", json={"name": "vmlinuz",
                                                                 "kind": "kernel"},
                            auth=auth("ada"), timeout=30)
    assert created.status_code == 201, created.text
    url = f"{app_server.url}/v1/images/vmlinuz/data"
    first = bytes([1]) * 8 * MiB
    second = (f"PUT /v1/images/vmlinuz/data HTTP/1.1\nHost: x\nAuthorization: {basic('ada')}\n"
              f"Content-Length: {8 * MiB}\n")  # its body is not sent: it must not be read
    release = threading.Event()
    answers: list[requests.Response] = []

    def first_body() -> Iterator[bytes]:
        yield first[:MiB]
        release.wait(60)
        yield first[MiB:]

    uploading = threading.Thread(target=lambda: answers.append(
        requests.put(url, data=first_body(), auth=auth("ada"), timeout=120)))
    uploading.start()
    try:
        wait_for(lambda: any(part.stat().st_size >= MiB
                             for part in app_server.image_dir.rglob("upload")), 30,
                 "the first upload to be received")
        status, text = app_server.raw(second)
        assert status == 409 and "being uploaded by another request" in text, text
    finally:
        release.set()
        uploading.join()
    assert answers[0].status_code == 200, answers[0].text
    assert answers[0].json()["sha256"] == hashlib.sha256(first).hexdigest()
    served = requests.get(answers[0].json()["file_url"], timeout=30)
    assert served.content == first
    status, text = app_server.raw(second)
    assert status == 409 and "already has its data" in text, text


# -- 2, 3. accounts that change under a remembered login -------------------------------
def test_a_new_password_or_a_deleted_account_stops_working_at_once(procs):
    service = hostile_service(procs, "accounts")
    state_dir = service.state_dir
    assert service.get("/v1/users/sue", auth=auth("sue")).ok  # remembered from now on
    add_user(state_dir, "sue", "sue's second phrase")  # another process: labmetal user set
    old = service.get("/v1/users/sue", auth=auth("sue"))
    assert old.status_code == 401, old.text
    assert service.get("/v1/users/sue", auth=("sue", "sue's second phrase")).ok

    # a new role counts at once too
    assert service.get("/v1/nodes", auth=auth("tom")).ok
    assert service.patch("/v1/users/tom", {"role": "student"}, auth=auth("ada")).ok
    assert service.get("/v1/nodes", auth=auth("tom")).status_code == 403

    # disabled, then deleted by another process, while the login is remembered
    assert service.get("/v1/users/una", auth=auth("una")).ok
    assert service.patch("/v1/users/una", {"disabled": True}, auth=auth("ada")).ok
    assert service.get("/v1/users/una", auth=auth("una")).status_code == 401
    assert service.get("/v1/users/sue", auth=("sue", "sue's second phrase")).ok
    subprocess.run([LABMETAL, "user", "delete", "sue", "--state-dir", str(state_dir)],
                   check=True, capture_output=True)
    token = service.post("/v1/auth/tokens", {}, auth=("sue", "sue's second phrase"))
    assert token.status_code == 401, token.text
    assert service.get("/v1/users/sue", auth=("sue", "sue's second phrase")).status_code \
        == 401
    assert "Traceback" not in service_log(procs, "accounts")


# -- 4. password guessing --------------------------------------------------------------
def test_password_guesses_get_429_before_any_bcrypt_per_user_and_per_address(procs):
    """The first wait is 1 s: the right passwords below are tried within it, just after
    the failure that started it (a few requests, no bcrypt). Guesses that come after a wait
    has ended are checked again, one each time the wait (doubled) ends."""
    service = hostile_service(procs, "guesses")
    http = requests.Session()  # one connection: waitress holds at most 100
    seat_login = f"/v1/seat-login/{SEAT_MAC.replace(':', '-')}"

    def get(path: str, user: str, password: str) -> requests.Response:
        return http.get(service.url + path, auth=(user, password), timeout=30)

    def post(path: str, user: str, password: str) -> requests.Response:
        return http.post(service.url + path, json={}, auth=(user, password), timeout=30)

    def checked() -> int:
        return service_log(procs, "guesses").count("failed authentication for user")

    answers = [get("/v1/nodes", "tom", f"guess {n}") for n in range(5)]
    assert [a.status_code for a in answers] == [401] * 5
    # now the right password, by every way in: refused without a check
    right = get("/v1/nodes", *auth("tom"))
    assert right.status_code == 429 and int(right.headers["Retry-After"]) >= 1
    assert "Too many failed logins for user 'tom'" in error_text(right)
    assert post(seat_login, *auth("tom")).status_code == 429  # the seat's login (ramdisk)
    csrf = http.get(service.url + "/v1/auth/session", timeout=30).json()["csrf_token"]
    web = http.post(service.url + "/login", json={"user": "tom",
                                                  "password": PASSWORDS["tom"]},
                    headers={"X-CSRF-Token": csrf}, timeout=30)
    assert web.status_code == 429 and web.headers["Retry-After"]
    assert checked() == 5
    # 95 more guesses: only those that come after a wait has ended are checked
    answers += [get("/v1/nodes", "tom", f"guess {n}") for n in range(5, 100)]
    statuses = [a.status_code for a in answers]
    assert set(statuses) == {401, 429} and statuses.count(401) <= 8, statuses
    assert checked() == statuses.count(401)  # a bcrypt for each 401, none for a 429
    form = http.post(service.url + "/login", data={"user": "tom", "password": "x",
                                                   "csrf_token": csrf}, timeout=30)
    assert form.status_code in (401, 429)
    assert form.status_code == 401 or "Too many failed logins" in form.text

    # one address cycling through user names: 20 checks in all, then every name waits
    failed_here = checked()
    cycled = [get("/v1/nodes", f"nobody{n}", "guess").status_code
              for n in range(20 - failed_here)]
    assert cycled == [401] * (20 - failed_here)
    refused = get("/v1/nodes", *auth("ada"))
    assert refused.status_code == 429 and "from 127.0.0.1" in error_text(refused)
    cycled = [get("/v1/nodes", f"nobody{n}", "guess").status_code for n in range(100, 200)]
    assert checked() == 20 + cycled.count(401) and cycled.count(401) <= 3, cycled


# -- 5. other sites' pages ---------------------------------------------------------------
def test_another_sites_page_cannot_change_anything_with_remembered_credentials(shared):
    service, _ = shared
    ada = auth("ada")
    assert service.post("/v1/rooms", {"name": "tpr-x"}, auth=ada).status_code == 201
    csv = "seat,mac\nA1,52:54:00:14:00:21\n"
    # what a form (or a "simple" fetch) can send: the CSV import read any body before
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        refused = requests.post(service.url + "/v1/rooms/tpr-x/import", data=csv, auth=ada,
                                headers={"Content-Type": kind}, timeout=30)
        assert refused.status_code == 415, (kind, refused.text)
    no_type = requests.post(service.url + "/v1/rooms/tpr-x/import", data=csv.encode(),
                            auth=ada, timeout=30)
    assert no_type.status_code == 415, no_type.text
    assert service.get("/v1/rooms/tpr-x", auth=ada).json()["seats"] == []
    form = requests.post(service.url + "/v1/nodes", data={"driver": "wol", "name": "forged"},
                         auth=ada, timeout=30)
    assert form.status_code == 415
    empty = requests.post(service.url + "/v1/auth/tokens", data=b"", auth=ada,
                          headers={"Content-Type": "text/plain"}, timeout=30)
    assert empty.status_code == 415  # an optional body, read as {} before

    # a body-less POST needs no type: what the browser says about its origin decides
    for header in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                   {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}):
        refused = requests.post(service.url + "/v1/auth/tokens", auth=ada, headers=header,
                                timeout=30)
        assert refused.status_code == 403, (header, refused.text)
        assert "another site's page" in error_text(refused)
    tokens = service.get("/v1/auth/tokens", auth=ada).json()["tokens"]
    assert tokens == []

    # the same requests from the site itself, or from a client that is not a browser
    same = requests.post(service.url + "/v1/auth/tokens", auth=ada, timeout=30,
                         headers={"Origin": service.url, "Sec-Fetch-Site": "same-origin"})
    assert same.status_code == 201, same.text
    imported = requests.post(service.url + "/v1/rooms/tpr-x/import", data=csv, auth=ada,
                             headers={"Content-Type": "text/csv"}, timeout=30)
    assert imported.status_code == 200 and imported.json()["created"] == 1, imported.text
    # the pages: the login cookie and its CSRF token, JSON
    browser = web_login(service.url, "ada")
    assert browser.post(service.url + "/v1/rooms", json={"name": "tpr-y"},
                        timeout=30).status_code == 201


# -- 6. names that URLs fold away ---------------------------------------------------------
def test_dot_names_are_refused_for_anything_named_in_a_url(shared):
    service, _ = shared
    ada = auth("ada")
    for name in (".", ".."):
        for path, body in (("/v1/nodes", {"driver": "wol", "name": name}),
                           ("/v1/images", {"name": name, "kind": "kernel"}),
                           ("/v1/rooms", {"name": name}),
                           ("/v1/templates", {"name": name, "image": "x"}),
                           ("/v1/users", {"name": name, "role": "student",
                                          "password": "a long pass phrase"})):
            refused = service.post(path, body, auth=ada)
            assert refused.status_code == 400, (path, name, refused.text)
        patched = service.patch("/v1/nodes/pc1", [{"op": "replace", "path": "/name",
                                                   "value": name}], auth=ada)
        assert patched.status_code == 400, patched.text
        assert service.post("/v1/rooms", {"name": f"dots{len(name)}"}, auth=ada).ok
        seat = requests.post(f"{service.url}/v1/rooms/dots{len(name)}/import", auth=ada,
                             data=f"seat,mac\n{name},52:54:00:14:00:3{len(name)}\n",
                             headers={"Content-Type": "text/csv"}, timeout=30)
        assert seat.status_code == 400 and "invalid seat label" in error_text(seat)
    assert service.get("/v1/nodes/pc1", auth=ada).json()["name"] == "pc1"


# -- 7. the policy says what the README says -------------------------------------------------
def test_teachers_see_and_copy_sessions_but_only_students_reset_theirs(shared):
    policy = Policy.defaults()
    for action in ("session:reset", "session:create", "session:resume", "session:save",
                   "session:delete"):
        assert policy.verdict(action, "teacher") is Verdict.REFUSED, action
        assert policy.verdict(action, "student") is Verdict.OWN_ONLY, action
    for action in ("session:get", "session:export"):
        assert policy.verdict(action, "teacher") is Verdict.ALLOWED, action

    service, _ = shared
    path = f"/v1/sessions/{NO_SESSION}"
    for refused in (service.post(f"{path}/reset", None, auth=auth("tom")),
                    service.post(f"{path}/revert", {"save": 1}, auth=auth("tom"))):
        assert refused.status_code == 403, refused.text
        assert "session:reset is disallowed by policy for user tom (role teacher)" \
            in error_text(refused)
    assert service.get(f"{path}/disk", auth=auth("tom")).status_code == 404  # allowed


# -- 8. where a student may start a session -------------------------------------------------
def test_a_student_starts_a_session_only_on_a_free_seat_of_a_room(make_lab):
    lab = make_lab("local")  # nodes a01 and a02, seats of room tpr
    lab.upload("tp-v1", TEMPLATE_BYTE)
    lab.ok("tom", "POST", "/v1/templates", {"name": "tp", "image": "tp-v1"}, status=201)
    ses = lab.ok("sam", "POST", "/v1/sessions", {"template": "tp"}, status=201)
    start = f"/v1/sessions/{ses['uuid']}/start"
    lab.ok("ada", "POST", "/v1/nodes", {"name": "pc9", "driver": "wol"}, status=201)

    refused = lab.call("sam", "POST", start, {"seat": "pc9"})  # in no room
    assert refused.status_code == 403 and "not a seat of a room" in error_text(refused)
    lab.ok("ada", "PUT", "/v1/nodes/a01/maintenance", {"reason": "broken keyboard"},
           status=202)
    refused = lab.call("sam", "POST", start, {"seat": "a01"})
    assert refused.status_code == 409 and "in maintenance" in error_text(refused)
    with sqlite3.connect(lab.service.state_dir / "labmetal.db") as db:  # being deployed
        db.execute("UPDATE nodes SET provision_state = 'wait call-back', "
                   "target_provision_state = 'active' WHERE name = 'a02'")
    refused = lab.call("sam", "POST", start, {"seat": "a02"})
    assert refused.status_code == 409 and "wait call-back" in error_text(refused)
    assert lab.ok("sam", "GET", f"/v1/sessions/{ses['uuid']}")["state"] == "stopped"

    with sqlite3.connect(lab.service.state_dir / "labmetal.db") as db:
        db.execute("UPDATE nodes SET provision_state = 'available', "
                   "target_provision_state = NULL WHERE name = 'a02'")
    running = lab.ok("sam", "POST", start, {"seat": "a02", "boot": False})
    assert (running["state"], running["seat"]) == ("running", "a02")
    lab.ok("sam", "POST", f"/v1/sessions/{ses['uuid']}/stop")
    # an admin, who may power any node, starts it anywhere
    anywhere = lab.ok("ada", "POST", start, {"seat": "pc9", "boot": False})
    assert anywhere["seat"] == "pc9"
    lab.ok("ada", "POST", f"/v1/sessions/{ses['uuid']}/stop")


# -- 9. bodies bounded before they are read -------------------------------------------------
def test_json_bodies_are_bounded_before_they_are_read(app_server):
    # a Content-Length past the limit: refused at once, the body never sent
    status, text = app_server.raw(
        f"POST /v1/nodes HTTP/1.1\nHost: x\nAuthorization: {basic('ada')}\n"
        f"Content-Type: application/json\nContent-Length: {64 * 2**30}\n")
    assert status == 413 and "larger than the 1 MiB" in text, text
    # no Content-Length: read up to the limit and one byte, then refused, the rest unsent
    chunk = b" " * (64 * 1024)
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(16)) + b"1\r\n \r\n"
    status, text = app_server.raw(
        f"POST /v1/nodes HTTP/1.1\nHost: x\nAuthorization: {basic('ada')}\n"
        "Content-Type: application/json\nTransfer-Encoding: chunked\n", body)
    assert status == 413 and "larger than the 1 MiB" in text, text
    # up to the limit is read and checked as before
    fits = json.dumps({"name": "tpr-1", "description": "x" * (MiB - 100)})
    made = requests.post(app_server.url + "/v1/rooms", data=fits, auth=auth("ada"),
                         headers={"Content-Type": "application/json"}, timeout=30)
    assert made.status_code == 201, made.text


def test_an_upload_is_authorized_before_any_of_its_body_is_read(app_server):
    created = requests.post(app_server.url + "/v1/images", json={"name": "disk",
                                                                 "kind": "kernel"},
                            auth=auth("ada"), timeout=30)
    assert created.status_code == 201, created.text
    head = "PUT /v1/images/disk/data HTTP/1.1\nHost: x\nContent-Length: 60000000\n"
    status, _ = app_server.raw(head)
    assert status == 401
    status, text = app_server.raw(head + f"Authorization: {basic('tom')}\n")
    assert status == 403 and "image:upload is disallowed" in text
    # a login cookie with a form's type: before, the form was read for its CSRF token
    browser = web_login(app_server.url, "tom")
    cookie = "; ".join(f"{c.name}={c.value}" for c in browser.cookies)
    status, text = app_server.raw(
        head + f"Cookie: {cookie}\nContent-Type: multipart/form-data; boundary=x\n")
    assert status == 415, text
    status, text = app_server.raw(
        "PUT /v1/images/disk/data HTTP/1.1\nHost: x\n"
        f"Authorization: {basic('ada')}\nContent-Length: {65 * MiB}\n")
    assert status == 413 and "(max_image_size)" in text, text


def test_the_service_refuses_a_large_json_body_sent_whole_or_chunked(shared):
    service, _ = shared
    big = json.dumps({"driver": "wol", "description": "x" * 2 * MiB}).encode()
    whole = requests.post(service.url + "/v1/nodes", data=big, auth=auth("ada"),
                          headers={"Content-Type": "application/json"}, timeout=60)
    assert whole.status_code == 413, whole.text[:300]

    def pieces() -> Iterator[bytes]:
        for start in range(0, len(big), 256 * 1024):
            yield big[start:start + 256 * 1024]

    chunked = requests.post(service.url + "/v1/nodes", data=pieces(), auth=auth("ada"),
                            headers={"Content-Type": "application/json"}, timeout=60)
    assert chunked.status_code == 413, chunked.text[:300]
    names = [node["name"] for node in service.get("/v1/nodes", auth=auth("ada")).json()["nodes"]]
    assert all(name in ("pc1", None) for name in names), names
