"""`labmetal node ...` and `labmetal conductors`: an admin's node work from the real CLI against
a real service and virtual IPMI BMCs on loopback, without OpenStack's `baremetal` client."""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from labmetal.lab.harness import LABMETAL, ipmitool_power, start_bmcs, start_service

PASSWORD = "Bmc-Pa55-4d9e2a"  # distinctive, so a leak in any output is found by a plain search
ADMIN_PASSWORD = "ada's long pass phrase"
TEACHER_PASSWORD = "tom's long pass phrase"


@dataclass
class Cli:
    """The labmetal command with a private home (no stray profile) and the API's URL."""
    env: dict[str, str]
    outputs: list[str] = field(default_factory=list)

    def __call__(self, *args: str, stdin: str | None = None,
                 ok: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([LABMETAL, *args], env=self.env, input=stdin,
                                capture_output=True, text=True, timeout=120)
        self.outputs += [result.stdout, result.stderr]
        if ok:
            assert result.returncode == 0, f"labmetal {' '.join(args)}:\n{result.stderr}"
        return result

    def json(self, *args: str, stdin: str | None = None) -> Any:
        return json.loads(self(*args, "--json", stdin=stdin).stdout)

    def fails(self, *args: str) -> str:
        """The one line a refused command prints; it must exit non-zero."""
        result = self(*args, ok=False)
        assert result.returncode != 0, result.stdout
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        return lines[0]


def make_cli(tmp_path: Path, name: str, url: str | None, **env: str) -> Cli:
    home = tmp_path / f"home-{name}"
    base = {key: value for key, value in os.environ.items()
            if key not in ("LABMETAL_URL", "LABMETAL_USER", "LABMETAL_PASSWORD")}
    base.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), **env)
    if url:
        base["LABMETAL_URL"] = url
    return Cli(base)


@pytest.fixture
def service(procs):
    return start_service(procs, "nodecli", ipmi_deadline=4, ipmi_packet_timeout=1,
                         power_sync_interval=3600)


@pytest.fixture
def cli(service, tmp_path):
    return make_cli(tmp_path, "admin", service.url)


def test_admin_enrolls_a_pc_checks_its_bmc_powers_it_and_makes_it_available(service, procs,
                                                                           cli):
    bmc = start_bmcs(procs, 1, password=PASSWORD)
    created = cli.json("node", "create", "pc1", "--driver", "ipmi",
                       "--driver-info", "ipmi_address=127.0.0.1",
                       "--driver-info", f"ipmi_port={bmc}", "--driver-info", "ipmi_username=admin",
                       "--driver-info", "ipmi_password=not-the-password",
                       "--mac", "52:54:00:AA:00:01", "--property", "cpus=4")
    assert (created["name"], created["provision_state"]) == ("pc1", "enroll")
    assert created["driver_info"]["ipmi_password"] == "******"
    assert created["properties"] == {"cpus": "4"}
    ports = service.get(f"/v1/nodes/{created['uuid']}/ports").json()["ports"]
    assert [port["address"] for port in ports] == ["52:54:00:aa:00:01"]

    # a wrong BMC password: manage --wait fails with the node's reason, exit status 1
    refused = cli("node", "provision", "pc1", "manage", "--wait", "60", ok=False)
    assert refused.returncode == 1
    assert "node pc1 is enroll: Failed to verify the node's power credentials" in refused.stderr
    assert "authentication failed" in refused.stderr
    # the right one from standard input, then manage succeeds, with a line per change
    cli("node", "set", "pc1", "--bmc-password-stdin", stdin=PASSWORD + "\n")
    managed = cli("node", "provision", "pc1", "manage", "--wait", "60")
    assert managed.stdout.strip() == "node pc1: manageable, power off"
    # how many lines depends on how soon the BMC answered; each is the state and the event
    assert all(line.startswith(("pc1: verifying -> manageable — ", "pc1: manageable — "))
               for line in managed.stderr.splitlines()), managed.stderr
    assert "pc1: manageable — verifying -> manageable (power credentials checked)" in \
        managed.stderr

    listed = cli("node", "list").stdout.splitlines()
    assert listed[0].split() == ["NAME", "UUID", "POWER", "PROVISION", "STATE", "CONDUCTOR",
                                 "MAINT", "LAST", "ERROR"]
    assert listed[1].split() == ["pc1", created["uuid"], "power", "off", "manageable", "nodecli"]
    shown = cli("node", "show", "pc1").stdout
    assert "ipmi_password=******" in shown
    assert any(line.split() == ["ports", "52:54:00:aa:00:01"] for line in shown.splitlines())
    assert cli.json("node", "show", created["uuid"])["name"] == "pc1"

    # power, seen by the BMC itself (ipmitool, not labmetal's IPMI code)
    powered = cli("node", "power", "pc1", "on", "--wait", "60")
    assert powered.stdout.strip() == "node pc1: manageable, power on"
    assert ipmitool_power(bmc, password=PASSWORD) == "Chassis Power is on"
    off = cli.json("node", "power", "pc1", "off", "--wait", "60")
    assert (off["power_state"], off["target_power_state"], off["last_error"]) == (
        "power off", None, None)
    assert ipmitool_power(bmc, password=PASSWORD) == "Chassis Power is off"

    available = cli.json("node", "provision", "pc1", "provide", "--wait", "60")
    assert (available["provision_state"], available["target_provision_state"]) == (
        "available", None)

    events = [entry["event"] for entry in cli.json("node", "history", "pc1")]
    assert events[0] == "node enrolled with driver 'ipmi'"
    for event in ("port 52:54:00:aa:00:01 added", "'manage' requested: enroll -> verifying",
                  "power state is now 'power on' after 'power on'",
                  "'provide' requested: manageable -> cleaning"):
        assert event in events
    history = cli("node", "history", "pc1").stdout.splitlines()
    assert history[0].split() == ["TIME", "SEVERITY", "TYPE", "USER", "EVENT"]
    assert any(line.endswith("power state is now 'power off' after 'power off'")
               for line in history)

    conductors = cli("conductors").stdout.splitlines()
    assert conductors[1].split()[:3] == ["nodecli", "yes", "ipmi,wol"]
    assert [c["hostname"] for c in cli.json("conductors")] == ["nodecli"]
    assert not any(secret in text for text in cli.outputs
                   for secret in (PASSWORD, "not-the-password"))


def test_admin_edits_a_seat_its_ports_and_maintenance_then_retires_it(service, cli):
    node = cli.json("node", "create", "pc2", "--driver", "wol", "--mac", "52-54-00-aa-00-02",
                    "--description", "spare")
    changed = cli.json("node", "set", "pc2", "--name", "a01", "--property", "cpus=8",
                       "--property", "ram=4096", "--driver-info", "wol_host=10.0.0.255",
                       "--description", "front row")
    assert (changed["uuid"], changed["name"], changed["description"]) == (
        node["uuid"], "a01", "front row")
    assert changed["properties"] == {"cpus": "8", "ram": "4096"}
    assert changed["driver_info"] == {"wol_host": "10.0.0.255"}
    unset = cli.json("node", "set", "a01", "--unset", "properties/ram",
                     "--unset", "description")
    assert (unset["properties"], unset["description"]) == ({"cpus": "8"}, None)

    created = cli("node", "port", "create", "a01", "52:54:00:AA:00:03").stdout
    assert created.startswith("port 52:54:00:aa:00:03 (")
    assert [p["address"] for p in cli.json("node", "port", "list", "a01")] == [
        "52:54:00:aa:00:02", "52:54:00:aa:00:03"]
    ports = cli("node", "port", "list").stdout.splitlines()
    assert ports[0].split() == ["UUID", "ADDRESS", "NODE", "PXE"]
    assert ports[2].split()[1:] == ["52:54:00:aa:00:03", "a01", "yes"]
    assert cli("node", "port", "delete", "52:54:00:aa:00:02").stdout.strip() == \
        "port 52:54:00:aa:00:02 deleted"
    assert [p["address"] for p in cli.json("node", "port", "list")] == ["52:54:00:aa:00:03"]

    on = cli("node", "maintenance", "a01", "on", "--reason", "fan broken").stdout.strip()
    assert on == "node a01: enroll, unknown, maintenance: fan broken"
    assert [n["name"] for n in cli.json("node", "list", "--maintenance")] == ["a01"]
    assert cli.json("node", "list", "--no-maintenance") == []
    assert "yes" in cli("node", "list", "--maintenance").stdout.splitlines()[1].split()
    assert cli.json("node", "maintenance", "a01", "off")["maintenance"] is False
    assert [n["name"] for n in cli.json("node", "list", "--provision-state", "enroll")] == ["a01"]
    assert cli.json("node", "list", "--provision-state", "available") == []

    # a room's seats, by seat label
    other = cli.json("node", "create", "pc3", "--driver", "wol")
    assert service.post("/v1/rooms", {"name": "TPR-2"}).status_code == 201
    assert service.put("/v1/rooms/TPR-2/seats/A01", {"node": "a01"}).ok
    in_room = cli("node", "list", "--room", "TPR-2").stdout.splitlines()
    assert in_room[0].split()[:2] == ["SEAT", "NAME"]
    assert [line.split()[:2] for line in in_room[1:]] == [["A01", "a01"]]
    assert [n["uuid"] for n in cli.json("node", "list")] == [node["uuid"], other["uuid"]]

    # deploy takes its image as instance_info/image_source; an enrolled node is refused
    refused = cli.fails("node", "provision", "a01", "deploy", "--image", "debian12")
    assert refused.startswith('labmetal node provision: The requested action "deploy" can not '
                              'be performed on node')
    assert refused.endswith("Allowed verbs in this state: manage.")
    assert cli.json("node", "show", "a01")["instance_info"] == {"image_source": "debian12"}

    assert cli("node", "delete", "a01", "pc3").stdout.splitlines() == [
        "node a01 deleted", "node pc3 deleted"]
    assert cli.json("node", "list") == []
    assert cli.json("node", "port", "list") == []


def test_mistakes_get_one_clear_line_and_a_failing_exit(service, cli, tmp_path):
    bad_mac = cli.fails("node", "create", "pc1", "--driver", "ipmi",
                        "--driver-info", "ipmi_address=127.0.0.1",
                        "--driver-info", f"ipmi_password={PASSWORD}", "--mac", "52:54:00:zz")
    assert bad_mac == ("labmetal node create: node not created: Expected a MAC address but "
                       "received '52:54:00:zz' (field: address).")
    assert cli.json("node", "list") == []  # all or nothing: no node without its port

    cli("node", "create", "pc1", "--driver", "wol")
    assert cli.fails("node", "create", "pc1", "--driver", "wol") == \
        "labmetal node create: A node with name pc1 already exists (field: name)."
    cli("node", "create", "pc2", "--driver", "wol")
    assert cli.fails("node", "set", "pc2", "--name", "pc1") == \
        "labmetal node set: A node with name pc1 already exists (field: name)."
    assert cli.fails("node", "create", "pc3", "--driver", "idrac") == \
        "labmetal node create: Unknown driver 'idrac'; available drivers: ipmi, wol"
    assert cli.fails("node", "create", "pc3", "--driver", "ipmi", "--driver-info",
                     "ipmi_port") == "labmetal node create: expected KEY=VALUE, got 'ipmi_port'"
    assert cli.fails("node", "show", "ghost") == \
        "labmetal node show: Node ghost could not be found."
    assert cli.fails("node", "provision", "pc1", "provide").endswith(
        "Allowed verbs in this state: manage.")
    assert cli.fails("node", "set", "pc1", "--unset", "properties/cpus") == \
        "labmetal node set: Invalid patch: can't remove a non-existent object 'cpus'"
    assert cli.fails("node", "port", "create", "pc1", "not-a-mac") == \
        "labmetal node port: Expected a MAC address but received 'not-a-mac' (field: address)."
    unreachable = make_cli(tmp_path, "nowhere", "http://127.0.0.1:9")
    assert unreachable.fails("node", "list").startswith(
        "labmetal node list: cannot reach the labmetal API at http://127.0.0.1:9")
    assert not any(PASSWORD in text for text in cli.outputs)


def add_user(state_dir: Path, name: str, role: str, password: str) -> None:
    subprocess.run([LABMETAL, "user", "set", name, "--role", role, "--password-stdin",
                    "--state-dir", str(state_dir)], input=password + "\n", check=True,
                   capture_output=True, text=True)


def test_the_cli_uses_the_login_profile_or_basic_credentials(procs, tmp_path):
    state_dir = tmp_path / "nodeauth-state"
    add_user(state_dir, "ada", "admin", ADMIN_PASSWORD)
    add_user(state_dir, "tom", "teacher", TEACHER_PASSWORD)
    service = start_service(procs, "nodeauth", auth="http_basic", state_dir=state_dir)

    ada = make_cli(tmp_path, "ada", None)  # the URL comes from the profile
    assert "Authentication required" in ada.fails("node", "list", "--url", service.url)
    ada("login", "--url", service.url, "--user", "ada", "--password-stdin",
        stdin=ADMIN_PASSWORD + "\n")
    node = ada.json("node", "create", "pc1", "--driver", "wol", "--mac", "52:54:00:aa:00:09",
                    "--driver-info", "wol_host=127.0.0.1")  # magic packets stay on loopback
    assert ada.json("node", "history", "pc1")[0]["user"] == "ada"
    assert ada.json("conductors")[0]["alive"] is True

    tom = make_cli(tmp_path, "tom", service.url, LABMETAL_USER="tom",
                   LABMETAL_PASSWORD=TEACHER_PASSWORD)
    assert [n["uuid"] for n in tom.json("node", "list")] == [node["uuid"]]
    assert tom.fails("node", "create", "pc2", "--driver", "wol") == (
        "labmetal node create: Access was denied to this resource: node:create is disallowed "
        "by policy for user tom (role teacher)")
    assert tom.fails("node", "maintenance", "pc1", "on").endswith(
        "node:set_maintenance is disallowed by policy for user tom (role teacher)")
    assert tom.fails("conductors").endswith(
        "conductor:get is disallowed by policy for user tom (role teacher)")
    assert tom("node", "power", "pc1", "on").stdout.startswith("node pc1: enroll, ")
    ada("logout")
    assert "Authentication required" in ada.fails("node", "list", "--url", service.url)
