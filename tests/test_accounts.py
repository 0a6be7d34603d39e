"""Accounts against a real service: API tokens (and the CLIs that use them), the web login
with its cookie, CSRF token and idle expiry, the users API and CLI, noauth as before."""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import time
from pathlib import Path

import requests

from labmetal.lab.harness import BAREMETAL, LABMETAL, error_text, start_service, wait_for

ADMIN_PASSWORD = "ada's long pass phrase"
TEACHER_PASSWORD = "tom's long pass phrase"


def add_user(state_dir: Path, name: str, role: str, password: str) -> None:
    subprocess.run([LABMETAL, "user", "set", name, "--role", role, "--password-stdin",
                    "--state-dir", str(state_dir)], input=password + "\n", check=True,
                   capture_output=True, text=True)


def accounts_service(procs, tmp_path: Path, name: str, **settings):
    state_dir = tmp_path / f"{name}-state"
    add_user(state_dir, "ada", "admin", ADMIN_PASSWORD)
    add_user(state_dir, "tom", "teacher", TEACHER_PASSWORD)
    return start_service(procs, name, auth="http_basic", state_dir=state_dir, **settings)


def test_api_tokens_are_issued_once_used_listed_revoked_and_expire(procs, tmp_path):
    service = accounts_service(procs, tmp_path, "tokens")
    issued = service.post("/v1/auth/tokens", {"description": "laptop"},
                          auth=("tom", TEACHER_PASSWORD))
    assert issued.status_code == 201 and issued.headers["Cache-Control"] == "no-store"
    token = issued.json()["token"]
    assert service.get("/v1/nodes", headers={"X-Auth-Token": token}).status_code == 200
    assert service.get("/v1/nodes", headers={"Authorization": f"Bearer {token}"}).ok
    refused = service.post("/v1/nodes", {"driver": "wol"}, headers={"X-Auth-Token": token})
    assert refused.status_code == 403 and "role teacher" in error_text(refused)

    listed = service.get("/v1/auth/tokens", headers={"X-Auth-Token": token}).json()["tokens"]
    assert [(t["uuid"], t["description"]) for t in listed] == [(issued.json()["uuid"], "laptop")]
    assert token not in json.dumps(listed)  # shown once, at issue
    assert "token" not in listed[0]
    minted = service.post("/v1/auth/tokens", {}, headers={"X-Auth-Token": token})
    assert minted.status_code == 403  # a token never extends itself

    # another user cannot revoke it; its owner can; then it is refused everywhere
    other = service.post("/v1/auth/tokens", {}, auth=("ada", ADMIN_PASSWORD)).json()
    assert service.delete(f"/v1/auth/tokens/{other['uuid']}",
                          headers={"X-Auth-Token": token}).status_code == 403
    assert service.delete(f"/v1/auth/tokens/{issued.json()['uuid']}",
                          headers={"X-Auth-Token": token}).status_code == 204
    gone = service.get("/v1/nodes", headers={"X-Auth-Token": token})
    assert gone.status_code == 401 and "unknown, expired or revoked" in error_text(gone)
    assert service.get("/v1/nodes", headers={"X-Auth-Token": "lmt_made-up"}).status_code == 401

    short = service.post("/v1/auth/tokens", {"expires_in": 2}, auth=("tom", TEACHER_PASSWORD))
    short_token = short.json()["token"]
    assert service.get("/v1/nodes", headers={"X-Auth-Token": short_token}).ok
    wait_for(lambda: service.get("/v1/nodes", headers={"X-Auth-Token": short_token})
             .status_code == 401, 15, "the short token to expire")
    too_long = service.post("/v1/auth/tokens", {"expires_in": 10 ** 9},
                            auth=("tom", TEACHER_PASSWORD))
    assert too_long.status_code == 400 and "token_lifetime" in error_text(too_long)


def test_labmetal_login_saves_a_private_profile_that_the_cli_and_baremetal_use(procs,
                                                                               tmp_path):
    service = accounts_service(procs, tmp_path, "login-cli")
    home = tmp_path / "home"
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
    env.pop("LABMETAL_USER", None)
    logged = subprocess.run([LABMETAL, "login", "--url", service.url, "--user", "ada",
                             "--password-stdin"], input=ADMIN_PASSWORD + "\n", env=env,
                            capture_output=True, text=True, timeout=60)
    assert logged.returncode == 0, logged.stderr
    profile = home / ".config/labmetal/profile.toml"
    assert stat.S_IMODE(profile.stat().st_mode) == 0o600
    assert ADMIN_PASSWORD not in profile.read_text()
    token = re.search(r'token = "([^"]+)"', profile.read_text()).group(1)

    listed = subprocess.run([LABMETAL, "images", "list", "--json"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []

    # the baremetal CLI sends the same token as X-Auth-Token (keystoneauth's admin_token)
    bm_env = {key: value for key, value in env.items() if not key.startswith("OS_")}
    nodes = subprocess.run([BAREMETAL, "--os-auth-type", "admin_token", "--os-token", token,
                            "--os-endpoint", service.url, "node", "list", "-f", "json"],
                           env=bm_env, capture_output=True, text=True, timeout=120)
    assert nodes.returncode == 0, nodes.stderr
    assert json.loads(nodes.stdout) == []

    out = subprocess.run([LABMETAL, "logout"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and not profile.exists()
    assert service.get("/v1/nodes", headers={"X-Auth-Token": token}).status_code == 401
    refused = subprocess.run([LABMETAL, "images", "list", "--url", service.url], env=env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "Authentication required" in refused.stderr


def _login(service, browser: requests.Session, user: str, password: str) -> requests.Response:
    csrf = browser.get(service.url + "/v1/auth/session").json()["csrf_token"]
    return browser.post(service.url + "/login", data={"user": user, "password": password,
                                                      "csrf_token": csrf},
                        allow_redirects=False, timeout=30)


def test_web_login_cookie_needs_the_csrf_token_and_ends_when_idle_or_logged_out(procs,
                                                                               tmp_path):
    service = accounts_service(procs, tmp_path, "web", session_idle_timeout=3)
    browser = requests.Session()
    form = browser.get(service.url + "/login")
    assert form.status_code == 200
    assert '<label for="password">' in form.text and 'type="password"' in form.text

    # the login form itself needs the anonymous session's CSRF token
    forged = requests.post(service.url + "/login", data={"user": "tom",
                                                         "password": TEACHER_PASSWORD})
    assert forged.status_code == 403 and "CSRF" in error_text(forged)
    wrong = _login(service, browser, "tom", "not the password")
    assert wrong.status_code == 401 and "Wrong user name or password" in wrong.text

    logged = _login(service, browser, "tom", TEACHER_PASSWORD)
    assert logged.status_code == 303
    cookie = logged.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
    me = browser.get(service.url + "/v1/auth/session").json()
    assert (me["user"], me["role"], me["via"]) == ("tom", "teacher", "session")
    assert browser.get(service.url + "/v1/nodes").status_code == 200

    # state changes through the cookie: refused without the CSRF token, done with it
    change = {"password": "tom's new pass phrase", "old_password": TEACHER_PASSWORD}
    no_csrf = browser.patch(service.url + "/v1/users/tom", json=change)
    assert no_csrf.status_code == 403 and "CSRF" in error_text(no_csrf)
    wrong_csrf = browser.patch(service.url + "/v1/users/tom", json=change,
                               headers={"X-CSRF-Token": "guessed"})
    assert wrong_csrf.status_code == 403
    done = browser.patch(service.url + "/v1/users/tom", json=change,
                         headers={"X-CSRF-Token": me["csrf_token"]})
    assert done.status_code == 200, done.text
    assert browser.get(service.url + "/v1/nodes").status_code == 200  # still logged in
    # basic and token requests need no CSRF token
    assert service.get("/v1/users/tom", auth=("tom", "tom's new pass phrase")).ok

    # logout ends the session on the server: a copy of the old cookie is refused
    stolen = browser.cookies.copy()
    assert browser.post(service.url + "/logout", data={"csrf_token": me["csrf_token"]},
                        allow_redirects=False).status_code == 303
    replayed = requests.get(service.url + "/v1/nodes", cookies=stolen)
    assert replayed.status_code == 401 and "session has ended" in error_text(replayed)

    # idle expiry: used within the timeout it lives on, left alone it ends
    browser = requests.Session()
    assert _login(service, browser, "tom", "tom's new pass phrase").status_code == 303
    for _ in range(3):
        time.sleep(1.5)
        assert browser.get(service.url + "/v1/nodes").status_code == 200
    time.sleep(3 + 1.5)  # left alone longer than session_idle_timeout
    expired = browser.get(service.url + "/v1/nodes")
    assert expired.status_code == 401
    assert "session has ended" in error_text(expired)


def app_client(tmp_path: Path):
    """The application in this process (Flask's test client), with the teacher tom."""
    from cryptography.fernet import Fernet

    from labmetal.api.app import Services, create_app
    from labmetal.config import Settings
    from labmetal.db import Database
    from labmetal.secrets import SecretBox
    from labmetal.users import set_user
    db = Database(f"sqlite:///{tmp_path / 'app.db'}")
    db.upgrade()
    set_user(db, "tom", TEACHER_PASSWORD, "teacher")
    app = create_app(Services(Settings(auth="http_basic", state_dir=tmp_path), db, None, None,
                              {}, SecretBox(Fernet.generate_key())))
    return app.test_client()


def test_session_cookie_is_secure_over_https(tmp_path):
    client = app_client(tmp_path)
    csrf = client.get("/v1/auth/session", base_url="https://lab.example").json["csrf_token"]
    logged = client.post("/login", base_url="https://lab.example",
                         data={"user": "tom", "password": TEACHER_PASSWORD, "csrf_token": csrf})
    assert logged.status_code == 303
    assert "Secure" in logged.headers["Set-Cookie"]


def test_a_forged_csrf_token_of_any_characters_is_refused(tmp_path):
    # a token with characters outside ASCII was a 500 (hmac.compare_digest refuses such str)
    client = app_client(tmp_path)
    assert client.get("/v1/auth/session").status_code == 200  # the anonymous session's token
    login = {"user": "tom", "password": TEACHER_PASSWORD}
    for forged in ({"data": {**login, "csrf_token": "\u00db\x0e\u00a5"}},
                   {"data": login, "headers": {"X-CSRF-Token": "caf\u00e9"}},
                   {"json": login, "headers": {"X-CSRF-Token": "\u00ff" * 43}}):
        refused = client.post("/login", **forged)
        assert refused.status_code == 403, (forged, refused.text)
        assert "CSRF token missing or wrong" in refused.text


def test_admin_manages_users_and_nobody_sees_a_password(procs, tmp_path):
    service = accounts_service(procs, tmp_path, "users")
    ada, tom = ("ada", ADMIN_PASSWORD), ("tom", TEACHER_PASSWORD)
    student_password = "sue's long pass phrase"
    created = service.post("/v1/users", {"name": "sue", "role": "student",
                                         "password": student_password}, auth=ada)
    assert created.status_code == 201, created.text
    assert service.post("/v1/users", {"name": "sue", "role": "student", "password": "x"},
                        auth=ada).status_code == 409
    assert service.post("/v1/users", {"name": "eve", "role": "root", "password": "x"},
                        auth=ada).status_code == 400
    assert service.post("/v1/users", {"name": "eve", "role": "student", "password": "x"},
                        auth=tom).status_code == 403
    sue = ("sue", student_password)
    responses = [created, service.get("/v1/users", auth=ada), service.get("/v1/users/sue",
                                                                          auth=sue)]
    assert [u["name"] for u in responses[1].json()["users"]] == ["ada", "sue", "tom"]
    assert responses[2].json()["role"] == "student"
    assert service.get("/v1/users", auth=sue).status_code == 403
    assert service.get("/v1/users/tom", auth=sue).status_code == 403

    # a student changes their own password, with the old one, and nothing else
    assert service.patch("/v1/users/sue", {"role": "admin"}, auth=sue).status_code == 403
    assert service.patch("/v1/users/sue", {"password": "new one"}, auth=sue).status_code == 403
    assert service.patch("/v1/users/tom", {"password": "new one", "old_password": "x"},
                         auth=sue).status_code == 403
    token = service.post("/v1/auth/tokens", {}, auth=sue).json()["token"]
    changed = service.patch("/v1/users/sue", {"password": "sue's second phrase",
                                              "old_password": student_password}, auth=sue)
    assert changed.status_code == 200
    responses.append(changed)
    assert service.get("/v1/users/sue", auth=sue).status_code == 401
    sue = ("sue", "sue's second phrase")
    assert service.get("/v1/users/sue", auth=sue).ok
    assert service.get("/v1/nodes", headers={"X-Auth-Token": token}).status_code == 401

    # the admin promotes, disables, deletes; the last admin stays
    assert service.patch("/v1/users/sue", {"role": "teacher"}, auth=ada).json()["role"] \
        == "teacher"
    assert service.get("/v1/nodes", auth=sue).ok  # the new role applies at once
    assert service.patch("/v1/users/sue", {"disabled": True}, auth=ada).ok
    assert service.get("/v1/users/sue", auth=sue).status_code == 401
    last = service.patch("/v1/users/ada", {"role": "teacher"}, auth=ada)
    assert last.status_code == 400 and "last enabled admin" in error_text(last)
    assert service.delete("/v1/users/ada", auth=ada).status_code == 409
    assert service.delete("/v1/users/sue", auth=ada).status_code == 204
    assert service.get("/v1/users/sue", auth=ada).status_code == 404

    listed = subprocess.run([LABMETAL, "user", "list", "--json", "--state-dir",
                             str(service.state_dir)], capture_output=True, text=True, check=True)
    assert [(u["name"], u["role"]) for u in json.loads(listed.stdout)] == [
        ("ada", "admin"), ("tom", "teacher")]
    subprocess.run([LABMETAL, "user", "delete", "tom", "--state-dir", str(service.state_dir)],
                   check=True, capture_output=True)
    assert service.get("/v1/users/tom", auth=ada).status_code == 404

    everything = " ".join(response.text for response in responses)
    assert "password" not in everything and "$2b$" not in everything
    log = (procs.workdir / "users.service.log").read_text()
    assert "user sue (student) created by ada" in log
    for secret in (ADMIN_PASSWORD, TEACHER_PASSWORD, student_password, "sue's second phrase",
                   token):
        assert secret not in log


def test_noauth_keeps_everybody_an_admin(procs):
    service = start_service(procs, "noauth")
    assert service.get("/v1/nodes").status_code == 200
    assert service.get("/v1/users").json() == {"users": []}
    refused = service.post("/v1/auth/tokens", {})
    assert refused.status_code == 400 and "noauth" in error_text(refused)
    assert service.get("/v1/auth/session").json()["role"] == "admin"
