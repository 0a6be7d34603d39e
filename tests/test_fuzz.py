"""Fuzzing the API from its own OpenAPI document (issue 14): a real `labmetal serve --auth
http_basic` (nginx in front of waitress, as in a lab; `LABMETAL_FRONT=none` runs it on
waitress alone), schemathesis reading the live `/v1/openapi.json`, and every operation
called as each role (anonymous, a student, a teacher, an admin, with HTTP basic) with
requests made from the document: valid ones and ones that break it (wrong types, missing
or unknown fields, values out of range, strings of any characters).

The checks: no answer is a server error (5xx) or missing; after each operation a plain
`GET /v1` still answers; each status is one the document lists for the operation, and an
error's body is the documented Ironic error. (The document gives every operation a
`default` response, so the status check only refuses what no operation could answer. The
content-type check is left out: it flags 204s and redirects, whose empty bodies carry
Flask's default text/html type, and the iPXE routes' text/plain errors; those are where
the document is approximate, not service errors.)

The service holds some of everything, so that identifiers in paths reach real code: half
of the requests to a path with identifiers name the fixture's objects (with an API version
the service takes), the others are generated whole. The objects: nodes with ports, an
image with data, rooms with seats, each with a room job scheduled far ahead, a template, a
student's session, an API token, a user of its own, a node's history event.

No operation is left out. The order keeps the fixture usable to the end:
1. everything but deletions and the actions below;
2. the actions that start or stop work on machines (power and provision states, captures,
   room jobs, a room's TP, a room job's cancel and retry), against objects of their own
   (node `pc2`, room `tpr-actions` and its job), so that what the conductor does to them
   cannot change what phase 1 meets;
3. deletions, by the admin last, the only role that may delete most of it.
In each phase the callers come in the order anonymous, student, teacher, admin. The admin
changes and deletes only the user `vic`, never a caller; the requests carry no generated
credentials (a wrong password is a failed login, and failed logins slow every caller from
the address down).

The budget: LABMETAL_FUZZ_EXAMPLES examples per operation and caller (default 15: 95
operations x 4 callers, 5,328 requests; 3 to 4 minutes on a 2-core machine shared with
other jobs). Hypothesis is derandomized: each run sends the same requests. Nothing
waits on a clock (the time bounds only stop a request that hangs, and report it). A
deeper run: `LABMETAL_FUZZ_EXAMPLES=200 .venv/bin/pytest tests/test_fuzz.py -q -s` (-s
prints the statuses each phase got).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, strategies as st
from schemathesis import GenerationMode
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import response_schema_conformance, \
    status_code_conformance

from labmetal.lab.harness import LABMETAL, Processes, Service, free_port, start_service
from tests.test_sessions import our_processes

EXAMPLES = int(os.environ.get("LABMETAL_FUZZ_EXAMPLES", "15"))
pytestmark = pytest.mark.timeout(max(600, 40 * EXAMPLES))  # a bound on a hang, not a wait

MiB = 2**20
ROLES = {"ada": "admin", "tom": "teacher", "sue": "student", "vic": "student"}
PASSWORDS = {name: f"{name}'s long pass phrase" for name in ROLES}
CALLERS = (None, "sue", "tom", "ada")  # None: anonymous
PC1_MAC, PC2_MAC = "52:54:00:15:00:01", "52:54:00:15:00:02"
VERSION = {"X-OpenStack-Ironic-API-Version": "latest"}
CHECKS = [schemathesis.checks.not_a_server_error, status_code_conformance,
          response_schema_conformance]

# phase 2: what starts or stops work on machines, on objects of its own
ACTIONS = {("PUT", "/v1/nodes/{ident}/states/power"),
           ("PUT", "/v1/nodes/{ident}/states/provision"),
           ("POST", "/v1/nodes/{ident}/capture"),
           ("POST", "/v1/rooms/{ident}/jobs"),
           ("PUT", "/v1/rooms/{ident}/tp"), ("DELETE", "/v1/rooms/{ident}/tp"),
           ("POST", "/v1/room-jobs/{ident}/cancel"),
           ("POST", "/v1/room-jobs/{ident}/seats/{label}/retry")}


def phase_of(operation) -> int:
    key = (operation.method.upper(), operation.path)
    return 2 if key in ACTIONS else 3 if key[0] == "DELETE" else 1


def auth(name: str) -> tuple[str, str]:
    return name, PASSWORDS[name]


def add_user(state_dir: Path, name: str) -> None:
    subprocess.run([LABMETAL, "user", "set", name, "--role", ROLES[name], "--password-stdin",
                    "--state-dir", str(state_dir)], input=PASSWORDS[name] + "\n", check=True,
                   capture_output=True, text=True)


@dataclass
class Lab:
    """The service and the identifiers of what it holds."""
    service: Service
    log: Path
    ids: dict[str, str] = field(default_factory=dict)

    def ok(self, user: str, method: str, path: str, body: Any = None, status: int = 200,
           **kwargs: Any) -> Any:
        response = requests.request(method, self.service.url + path, auth=auth(user),
                                    json=body, timeout=120, **kwargs)
        assert response.status_code == status, (method, path, response.text)
        return response.json() if response.content else None

    def known(self, method: str, path: str, caller: str | None) -> list[dict[str, str]]:
        """Path parameters that name the fixture's objects: one dict per choice, none for a
        path without parameters."""
        ids, action = self.ids, (method, path) in ACTIONS
        seat = PC1_MAC.replace(":", "-")
        own = [caller] if caller in ("sue", "tom") else []  # the admin's own: never
        first = {  # the values of the first parameter under each path
            "/v1/nodes/{ident}": [ids["pc2"]] if action else [ids["pc1"], "pc1"],
            "/v1/ports/{ident}": [ids["port"]],
            "/v1/images/{ident}": ["disk", ids["disk"]],
            "/v1/rooms/{ident}": ["tpr-actions"] if action else ["tpr"],
            "/v1/room-jobs/{ident}": [ids["job-actions"] if action else ids["job"]],
            "/v1/templates/{ident}": ["tp"],
            "/v1/sessions/{ident}": [ids["session"]],
            "/v1/users/{name}": ["vic", *own],
            "/v1/auth/tokens/{token_uuid}": [ids["token"]],
            "/v1/conductors/{hostname}": ["fuzz"],
            "/v1/drivers/{name}": ["wol", "ipmi"],
            "/v1/heartbeat/{node_uuid}": [ids["pc1"]],
            "/files/images/{image_uuid}": [ids["disk"]],
            "/boot/{name}": [f"{seat}.ipxe" if path == "/boot/{name}" else seat],
            "/ui/{name}": ["nodes", "rooms"],
            "/static/{filename}": ["api.js"],
        }
        others = {"event": ids["event"], "label": "B01" if action else "A01", "ident": "pc1"}
        for prefix, values in first.items():
            if path == prefix or path.startswith(prefix + "/"):
                name, *rest = re.findall(r"{(\w+)}", path)
                return [{name: value, **{p: others[p] for p in rest if p in others}}
                        for value in values]
        return []


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[Lab]:
    procs = Processes(tmp_path_factory.mktemp("fuzz"))
    run_dir = Path(tempfile.mkdtemp(prefix="lm-fuzz-"))  # short: unix socket paths
    state_dir = procs.workdir / "fuzz-state"
    for user in ROLES:
        add_user(state_dir, user)
    try:
        service = start_service(procs, "fuzz", auth="http_basic", state_dir=state_dir,
                                overlay_run_dir=run_dir,
                                iscsi_portal=f"127.0.0.5:{free_port()}")
        lab = Lab(service, procs.workdir / "fuzz.service.log")
        make_data(lab, procs.workdir)
        yield lab
    finally:
        procs.stop_all()
        left = our_processes(run_dir)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(run_dir, ignore_errors=True)
        assert not left, f"the service left storage processes running: {left}"


def make_data(lab: Lab, work: Path) -> None:
    ids = lab.ids
    wol = {"wol_host": "127.0.0.1", "wol_port": free_port(kind=2)}  # a UDP port nobody reads
    for name, mac in (("pc1", PC1_MAC), ("pc2", PC2_MAC)):
        node = lab.ok("ada", "POST", "/v1/nodes", {"name": name, "driver": "wol",
                                                   "driver_info": wol}, status=201)
        ids[name] = node["uuid"]
        port = lab.ok("ada", "POST", "/v1/ports", {"address": mac, "node_uuid": node["uuid"]},
                      status=201)
        ids.setdefault("port", port["uuid"])
    raw = work / "disk.raw"
    with open(raw, "wb") as image:
        image.write(b"\x54" * MiB)
        image.truncate(4 * MiB)
    ids["disk"] = lab.ok("ada", "POST", "/v1/images", {"name": "disk", "kind": "whole-disk",
                                                       "disk_format": "raw"}, status=201)["uuid"]
    with open(raw, "rb") as data:
        lab.ok("ada", "PUT", "/v1/images/disk/data", data=data,
               headers={"Content-Type": "application/octet-stream"})
    for room, seat, node, job in (("tpr", "A01", "pc1", "job"),
                                  ("tpr-actions", "B01", "pc2", "job-actions")):
        lab.ok("ada", "POST", "/v1/rooms", {"name": room}, status=201)
        lab.ok("ada", "PUT", f"/v1/rooms/{room}/seats/{seat}", {"node": node})
        ids[job] = lab.ok("ada", "POST", f"/v1/rooms/{room}/jobs",  # never due in the test
                          {"action": "power-off", "at": "2099-01-05T08:00"}, status=201)["uuid"]
    lab.ok("tom", "POST", "/v1/templates", {"name": "tp", "image": "disk"}, status=201)
    ids["session"] = lab.ok("sue", "POST", "/v1/sessions", {"template": "tp"},
                            status=201)["uuid"]
    ids["token"] = lab.ok("vic", "POST", "/v1/auth/tokens", {}, status=201)["uuid"]
    ids["event"] = lab.ok("ada", "GET", "/v1/nodes/pc1/history",
                          headers=VERSION)["history"][0]["uuid"]


@pytest.fixture(scope="module")
def api(lab: Lab):
    config = schemathesis.Config.from_dict({
        "base-url": lab.service.url,
        "generation": {"with-security-parameters": False},  # each caller's own credentials
    })
    return schemathesis.openapi.from_url(lab.service.url + "/v1/openapi.json", config=config,
                                         timeout=30)


@dataclass
class Run:
    """What one phase found: problems, and how many answers each operation gave."""
    problems: list[str] = field(default_factory=list)
    sent: Counter = field(default_factory=Counter)  # (operation, caller) -> requests
    statuses: Counter = field(default_factory=Counter)


def fuzz(lab: Lab, api, phase: int) -> Run:
    run = Run()
    operations = [result.ok() for result in api.get_all_operations()]
    operations = [operation for operation in operations if phase_of(operation) == phase]
    assert operations
    for caller in CALLERS:
        session = requests.Session()  # keeps the cookies the service sets, as a browser
        if caller is not None:
            session.auth = auth(caller)
        for operation in operations:
            fuzz_operation(lab, operation, caller, session, run)
            try:
                alive = requests.get(lab.service.url + "/v1", timeout=60).status_code
            except requests.RequestException as error:
                alive = error
            if alive != 200:
                run.problems.append(f"after {operation.label} as {caller or 'anonymous'}: "
                                    f"GET /v1 gives {alive}")
        session.close()
        for operation in operations:
            if not run.sent[operation.label, caller]:
                run.problems.append(f"{operation.label} as {caller or 'anonymous'}: no "
                                    "request sent")
    print(f"phase {phase}: {sum(run.statuses.values())} requests, statuses "
          f"{dict(sorted(run.statuses.items()))}")
    return run


def fuzz_operation(lab: Lab, operation, caller: str | None, session: requests.Session,
                   run: Run) -> None:
    who = caller or "anonymous"
    known = lab.known(operation.method.upper(), operation.path, caller)
    # half named and with a version the service takes (they reach the views), half generated
    branches = [(values, VERSION) for values in known or [None]]
    branches += [(None, None)] * len(branches)
    strategies = [operation.as_strategy(mode, path_parameters=values, headers=headers)
                  for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
                  for values, headers in branches]

    @hypothesis.settings(max_examples=EXAMPLES, derandomize=True, database=None,
                         deadline=None, phases=[Phase.explicit, Phase.generate],
                         suppress_health_check=list(HealthCheck), print_blob=False)
    @hypothesis.given(case=st.one_of(strategies))
    def send(case) -> None:
        try:
            response = case.call(session=session, timeout=60, allow_redirects=False)
        except requests.RequestException as error:
            run.problems.append(f"{who}: {operation.label}: no answer ({error})\n"
                                f"{case.as_curl_command()}")
            return
        run.sent[operation.label, caller] += 1
        run.statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=CHECKS)
        except FailureGroup as failures:  # recorded, not raised: every operation runs
            run.problems.append(f"as {who}: {failures}")

    send()


def check(lab: Lab, run: Run) -> None:
    if run.problems:
        log = lab.log.read_text(errors="replace")
        first = log.find("unhandled error")
        pytest.fail(f"{len(run.problems)} problem(s):\n" + "\n\n".join(run.problems[:30]) +
                    ("\n\nthe service's log from its first unhandled error:\n" +
                     log[first:first + 6000] if first >= 0 else ""), pytrace=False)
    assert lab.ok("ada", "GET", "/v1/nodes/pc2")["uuid"] == lab.ids["pc2"]


def test_every_operation_but_actions_and_deletions_as_every_role(lab, api):
    check(lab, fuzz(lab, api, 1))


def test_power_provision_and_room_actions_as_every_role(lab, api):
    check(lab, fuzz(lab, api, 2))


def test_deletions_as_every_role_the_admin_last(lab, api):
    check(lab, fuzz(lab, api, 3))
