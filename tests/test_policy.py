"""The policy on a real service: every role gets what the policy says on every endpoint, and
a policy file is checked at start-up (the rules alone: tests/test_policy_rules.py)."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import requests
from cryptography.fernet import Fernet

from labmetal.api.app import Services, create_app
from labmetal.config import Settings
from labmetal.db import Database
from labmetal.policy import Policy, Verdict
from labmetal.secrets import SecretBox
from labmetal.lab.harness import LABMETAL, error_text, service_env, start_service

# Reachable without a labmetal user, each for its reason (see @public in the views). A new
# public endpoint must be added here, on purpose.
PUBLIC_ENDPOINTS = {
    "root.root", "root.v1", "root.openapi",  # version discovery, as Ironic's; the API's doc
    "agent.lookup", "agent.heartbeat", "agent.discovery",  # the agent token protects them
    "boot.chain", "boot.per_mac", "images.image_file",  # what seats boot and download
    "seat_login.login", "seat_login.start",  # a seat's login: the views check the student
    "seat_login.login_script",  # boots the login ramdisk, which asks for the password
    # a seat's local session work (issue 16): the seat's token for this boot protects them
    "seat_sessions.lookup", "seat_sessions.plan", "seat_sessions.cache",
    "seat_sessions.blocks", "seat_sessions.piece", "seat_sessions.uploaded",
    "seat_sessions.ready", "seat_sessions.failed", "seat_sessions.progress",
    "seat_sessions.filled", "seat_sessions.hashes",
    "login.login_form", "login.login", "login.logout", "login.session_info",
    # page shells (they check the caller themselves; data comes from the API) and their CSS/JS
    "pages.home", "pages.page", "pages.detail", "pages.static_file",
}
# Public views that ask an anonymous caller for credentials (the login ramdisk's).
CHALLENGING = {"seat_login.login", "seat_login.start"}
# Own-only rules where the caller's own is implied: a collection that lists only the
# caller's own, a session made for the caller.
OWN_IMPLIED = {"sessions.list_sessions", "sessions.create_session"}
USERS = {"ada": "admin", "tom": "teacher", "sue": "student"}
PASSWORDS = {name: f"{name} pass phrase" for name in USERS}


def url_map_app(tmp_path: Path):
    settings = Settings(auth="http_basic", state_dir=tmp_path)
    svc = Services(settings, Database(f"sqlite:///{tmp_path / 'map.db'}"), None, None, {},
                   SecretBox(Fernet.generate_key()))
    return create_app(svc)


def endpoints(tmp_path: Path) -> list[tuple[str, str, str]]:
    """(endpoint, method, rule) for every route of the application."""
    app = url_map_app(tmp_path)
    return [(rule.endpoint, method, rule.rule) for rule in app.url_map.iter_rules()
            for method in sorted(rule.methods - {"HEAD", "OPTIONS"})], app


# Which endpoints are checked, and the default rules: tests/test_policy_rules.py (fast).


def test_a_policy_file_replaces_rules_and_its_mistakes_stop_the_start(tmp_path):
    good = tmp_path / "policy.toml"
    good.write_text('"node:create" = ["admin", "teacher"]\n"image:get" = []\n')
    policy = Policy.load(good)
    assert policy.verdict("node:create", "teacher") is Verdict.ALLOWED
    assert policy.verdict("image:get", "admin") is Verdict.REFUSED
    assert policy.verdict("node:delete", "teacher") is Verdict.REFUSED  # default kept

    bad = tmp_path / "policy.json"
    bad.write_text(json.dumps({"node:craete": ["admin"], "node:get": ["admin", "janitor"],
                               "image:delete": ["teacher:owner"]}))
    with pytest.raises(ValueError) as refused:
        Policy.load(bad)
    for mistake in ("node:craete", "janitor", "image:delete"):
        assert mistake in str(refused.value)

    started = subprocess.run([LABMETAL, "serve"], capture_output=True, text=True, timeout=60,
                             env=service_env(state_dir=tmp_path / "state", policy_file=bad,
                                             listen="127.0.0.1:0", auth="http_basic"))
    assert started.returncode != 0
    assert "unknown action 'node:craete'" in started.stderr
    assert "unknown role 'janitor'" in started.stderr


def _concrete(rule: str, name_arg: str) -> str:
    """A URL for the rule: arguments that name nothing, so allowed calls change nothing."""
    def value(match: re.Match) -> str:
        converter, arg = match.group(1) or "", match.group(2)
        if converter.startswith("uuid"):
            return "00000000-0000-4000-8000-000000000000"
        if converter.startswith("any"):
            return converter[4:].split(",")[0]
        if converter.startswith("int"):
            return "0"
        return name_arg if arg == "name" else "no-such-thing"
    return re.sub(r"<(?:([^:>]+):)?([^>]+)>", value, rule)


def test_every_role_is_allowed_and_refused_as_the_policy_says_on_every_endpoint(procs,
                                                                                tmp_path):
    state_dir = tmp_path / "policy-state"
    for name, role in USERS.items():
        subprocess.run([LABMETAL, "user", "set", name, "--role", role, "--password-stdin",
                        "--state-dir", str(state_dir)], input=PASSWORDS[name] + "\n",
                       check=True, capture_output=True, text=True)
    service = start_service(procs, "policy", auth="http_basic", state_dir=state_dir)
    policy = Policy.defaults()
    routes, app = endpoints(tmp_path)
    checked = 0
    for endpoint, method, rule in routes:
        url = service.url + _concrete(rule, "nobody-here")
        anonymous = requests.request(method, url, json={}, timeout=30)
        if endpoint in CHALLENGING:
            assert anonymous.status_code == 401, f"{method} {rule}"
            assert anonymous.headers["WWW-Authenticate"].startswith("Basic ")
            continue
        if endpoint in PUBLIC_ENDPOINTS:
            assert anonymous.status_code != 401, f"{method} {rule}"
            continue
        assert anonymous.status_code == 401, f"{method} {rule} without credentials"
        action = app.view_functions[endpoint].policy_action
        for name, role in USERS.items():
            response = requests.request(method, url, json={}, timeout=30,
                                        auth=(name, PASSWORDS[name]))
            verdict = policy.verdict(action, role)
            # Own-only rules concern users and tokens; the URL names none that exists, so
            # nothing is the caller's own: teachers and students are refused.
            expected_refusal = verdict is not Verdict.ALLOWED
            if verdict is Verdict.OWN_ONLY and endpoint in OWN_IMPLIED:
                expected_refusal = False
            what = f"{name} ({role}) {method} {rule} [{action}]: {response.status_code}"
            if expected_refusal:
                assert response.status_code == 403, what
                assert f"{action} is disallowed by policy for user {name} (role {role})" \
                    in error_text(response), what
            else:
                assert response.status_code not in (401, 403), what + response.text
            checked += 1
    assert checked >= 3 * 40


def test_teacher_runs_seats_student_sees_nothing_with_the_baremetal_cli(procs, baremetal_for,
                                                                        tmp_path):
    state_dir = tmp_path / "cli-state"
    for name, role in USERS.items():
        subprocess.run([LABMETAL, "user", "set", name, "--role", role, "--password-stdin",
                        "--state-dir", str(state_dir)], input=PASSWORDS[name] + "\n",
                       check=True, capture_output=True, text=True)
    service = start_service(procs, "policy-cli", auth="http_basic", state_dir=state_dir)
    ada, tom, sue = (baremetal_for(service.url, name, PASSWORDS[name]) for name in USERS)

    ada("node", "create", "--driver", "wol", "--name", "pc1")
    assert [n["name"] for n in tom.json("node", "list")] == ["pc1"]
    tom("node", "manage", "pc1", "--wait", "30", check=False)  # allowed (fails: no port)
    refused = tom("node", "create", "--driver", "wol", "--name", "pc2", check=False)
    assert refused.returncode != 0
    assert "node:create is disallowed by policy for user tom (role teacher)" in refused.stderr
    refused = tom("node", "delete", "pc1", check=False)
    assert "node:delete is disallowed by policy" in refused.stderr
    refused = sue("node", "list", check=False)
    assert refused.returncode != 0 and "node:get is disallowed by policy" in refused.stderr
    assert "HTTP 403" in refused.stderr or "403" in refused.stderr
