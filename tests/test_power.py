"""Power over IPMI against virtual BMCs (real UDP), checked with ipmitool; faults included."""
from __future__ import annotations

import concurrent.futures
import socket
import time

import pytest
import requests

from labmetal.lab.harness import error_text, ipmitool_power, start_bmcs, start_service

PASSWORD = "Bmc-Pa55-7f3e1c"  # distinctive, so a leak anywhere is found by a plain search


def enroll(service, name: str, port: int, password: str = PASSWORD, manage: bool = True) -> str:
    response = service.post("/v1/nodes", {
        "driver": "ipmi", "name": name,
        "driver_info": {"ipmi_address": "127.0.0.1", "ipmi_port": port,
                        "ipmi_username": "admin", "ipmi_password": password}})
    assert response.status_code == 201, response.text
    if manage:
        assert service.put(f"/v1/nodes/{name}/states/provision",
                           {"target": "manage"}).status_code == 202
        service.wait_node(name, lambda n: n["provision_state"] == "manageable", what="manageable")
    return response.json()["uuid"]


@pytest.fixture
def service(procs):
    return start_service(procs, "power", ipmi_deadline=4, ipmi_packet_timeout=1,
                         power_sync_interval=3600)


def test_manage_checks_the_bmc_password_and_succeeds_once_it_is_fixed(service, procs,
                                                                        baremetal_for):
    cli = baremetal_for(service.url)
    bmc = start_bmcs(procs, 1, password=PASSWORD)
    enroll(service, "pc1", bmc, password="wrong-password", manage=False)
    result = cli("node", "manage", "pc1", "--wait", "30", check=False)
    assert result.returncode != 0
    node = service.node("pc1")
    assert node["provision_state"] == "enroll"
    assert "authentication failed" in node["last_error"]
    assert "Incorrect password" in node["last_error"]

    cli("node", "set", "pc1", "--driver-info", f"ipmi_password={PASSWORD}")
    cli("node", "manage", "pc1", "--wait", "30")
    node = service.node("pc1")
    assert (node["provision_state"], node["last_error"], node["power_state"]) == (
        "manageable", None, "power off")


def test_unknown_bmc_user_is_an_authentication_error(service, procs):
    bmc = start_bmcs(procs, 1, user="root")
    enroll(service, "pc1", bmc, manage=False)
    service.put("/v1/nodes/pc1/states/provision", {"target": "manage"})
    node = service.wait_node("pc1", lambda n: n["provision_state"] == "enroll")
    assert "authentication failed" in node["last_error"] and \
        "unauthorized name (user 'admin')" in node["last_error"]


def test_teacher_powers_a_pc_on_off_and_reboots_it(service, procs, baremetal_for):
    cli = baremetal_for(service.url)
    bmc = start_bmcs(procs, 1, password=PASSWORD, power_delay=0.5)
    enroll(service, "pc1", bmc)
    cli("node", "power", "on", "pc1")
    service.wait_node("pc1",
                      lambda n: n["power_state"] == "power on" and not n["target_power_state"])
    assert ipmitool_power(bmc, password=PASSWORD) == "Chassis Power is on"
    cli("node", "reboot", "pc1")
    service.wait_node("pc1", lambda n: not n["reservation"])
    assert ipmitool_power(bmc, password=PASSWORD) == "Chassis Power is on"
    cli("node", "power", "off", "pc1")
    node = service.wait_node("pc1",
                             lambda n: n["power_state"] == "power off" and not n["reservation"])
    assert node["last_error"] is None
    assert ipmitool_power(bmc, password=PASSWORD) == "Chassis Power is off"
    events = [entry["event"] for entry in service.history("pc1")]
    assert "power state is now 'power on' after 'rebooting'" in events
    assert "power state is now 'power off' after 'power off'" in events


def test_a_silent_bmc_fails_within_the_deadline_and_blocks_no_one(service, procs):
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # receives, never answers
    silent.bind(("127.0.0.1", 0))
    try:
        bmc = start_bmcs(procs, 1, password=PASSWORD)
        enroll(service, "healthy", bmc)
        enroll(service, "silent", silent.getsockname()[1], manage=False)
        asked = time.monotonic()
        service.put("/v1/nodes/silent/states/provision", {"target": "manage"})
        service.put("/v1/nodes/healthy/states/power", {"target": "power on"})
        # the healthy node is served while the silent one is still being waited for
        service.wait_node("healthy", lambda n: n["power_state"] == "power on", timeout=3)
        assert service.node("silent")["provision_state"] == "verifying"
        node = service.wait_node("silent", lambda n: n["provision_state"] == "enroll", timeout=20)
        assert time.monotonic() - asked < 4 + 6  # the 4 s deadline, plus polling slack
        assert "did not answer" in node["last_error"]
        # and the next call to it fails the same way instead of piling up stuck threads
        service.put("/v1/nodes/silent/states/provision", {"target": "manage"})
        node = service.wait_node("silent", lambda n: n["provision_state"] == "enroll", timeout=20)
        assert "did not answer" in node["last_error"]
        service.put("/v1/nodes/healthy/states/power", {"target": "power off"})
        service.wait_node("healthy", lambda n: n["power_state"] == "power off", timeout=3)
    finally:
        silent.close()


def test_twenty_concurrent_power_requests_on_one_node(service, procs):
    bmc = start_bmcs(procs, 1, password=PASSWORD, power_delay=0.2)
    enroll(service, "pc1", bmc)
    targets = ["power on" if i % 2 else "power off" for i in range(20)]

    def ask(target: str) -> int:
        return service.put("/v1/nodes/pc1/states/power", {"target": target}).status_code

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        codes = list(pool.map(ask, targets, timeout=60))
    assert set(codes) <= {202, 409}, codes
    assert 202 in codes
    node = service.wait_node("pc1", lambda n: not n["reservation"] and not n["target_power_state"])
    requested = [e["event"] for e in service.history("pc1") if e["event"].endswith("' requested")
                 and e["event_type"] == "power"]
    assert len(requested) == codes.count(202)
    last = requested[-1].split("'")[1]
    assert node["power_state"] == last
    assert ipmitool_power(bmc, password=PASSWORD) == f"Chassis Power is {last.split()[1]}"


def test_the_ipmi_password_never_leaves_the_service(service, procs, baremetal_for):
    cli = baremetal_for(service.url)
    bmc = start_bmcs(procs, 1, password=PASSWORD)
    uuid = enroll(service, "pc1", bmc)
    service.patch("/v1/nodes/pc1", [{"op": "replace", "path": "/driver_info/ipmi_password",
                                     "value": "wrong-" + PASSWORD}])
    service.put("/v1/nodes/pc1/states/power", {"target": "power on"})
    service.wait_node("pc1", lambda n: n["last_error"] and not n["reservation"])
    service.patch("/v1/nodes/pc1", [{"op": "replace", "path": "/driver_info/ipmi_password",
                                     "value": PASSWORD}])
    latest = {"X-OpenStack-Ironic-API-Version": "latest"}
    seen = []
    for path in ("/v1/nodes", "/v1/nodes/detail", "/v1/nodes/pc1", f"/v1/nodes/{uuid}/history",
                 f"/v1/nodes/{uuid}/history?detail=true", "/v1/nodes/pc1/states",
                 "/v1/nodes/pc1/validate", "/v1/ports/detail", "/v1/drivers",
                 "/v1/drivers/ipmi/properties", "/v1/conductors?detail=true"):
        response = service.get(path, headers=latest)
        assert response.status_code == 200, path
        seen.append(response.text)
    seen.append(cli("node", "show", "pc1", "-f", "json").stdout)
    seen.append(cli("node", "history", "list", "pc1", "--long", "-f", "json").stdout)
    for text in seen:
        assert PASSWORD not in text
    assert service.node("pc1")["driver_info"]["ipmi_password"] == "******"
    service.proc.stop()
    logs = service.proc.output() + (procs.workdir / "power.service.log").read_text()
    assert "power state" in logs or "conductor" in logs  # the logs are there, and clean:
    assert PASSWORD not in logs
    database = (service.state_dir / "labmetal.db").read_bytes()
    assert PASSWORD.encode() not in database  # sealed at rest too


def test_power_sync_records_changes_and_failures_of_a_bmc(procs):
    service = start_service(procs, "sync", power_sync_interval=1, ipmi_deadline=2,
                            ipmi_packet_timeout=1)
    bmc = start_bmcs(procs, 1, password=PASSWORD, name="bmc-a")
    enroll(service, "pc1", bmc)
    ipmitool_power(bmc, password=PASSWORD, action="on")  # someone pressed the button
    service.wait_node("pc1", lambda n: n["power_state"] == "power on", timeout=15)
    assert "power state changed outside labmetal: 'power off' -> 'power on'" in [
        e["event"] for e in service.history("pc1")]

    procs.started[-1].kill()  # the BMC dies
    node = service.wait_node("pc1", lambda n: n["maintenance"], timeout=30)
    assert node["fault"] == "power failure"
    assert "power sync failed 3 times in a row" in node["maintenance_reason"]

    start_bmcs(procs, 1, password=PASSWORD, first_port=bmc, name="bmc-b")  # back (and off)
    node = service.wait_node("pc1", lambda n: not n["maintenance"], timeout=30)
    assert (node["fault"], node["power_state"]) == (None, "power off")
    assert requests.get(service.url + "/").ok
    assert any("power failure cleared" in e["event"] for e in service.history("pc1"))


def test_wrong_answers_are_errors_not_hangs(service):
    response = service.put("/v1/nodes/nope/states/power", {"target": "power on"})
    assert response.status_code == 404
    response = service.post("/v1/nodes", {"driver": "ipmi", "name": "pc1",
                                          "driver_info": {"ipmi_port": 70000}})
    assert response.status_code == 400 and "port 70000 is out of range" in error_text(response)
