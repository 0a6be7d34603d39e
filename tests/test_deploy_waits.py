"""A PC that never runs the agent: the deploy waits, can be aborted, and times out."""
from __future__ import annotations

import os

import pytest

from labmetal.lab.harness import start_bmcs, start_service

LATEST = {"X-OpenStack-Ironic-API-Version": "latest"}


@pytest.fixture
def waiting_node(procs, tmp_path):
    """A node whose BMC powers a machine that boots nothing (no agent will ever call)."""
    service = start_service(procs, "waits", callback_timeout=4)
    bmc = start_bmcs(procs, 1)
    for name, kind, size in (("dk", "kernel", 4096), ("dr", "ramdisk", 4096),
                             ("img", "whole-disk", 1024 * 1024)):
        path = tmp_path / name
        path.write_bytes(os.urandom(size))
        assert service.post("/v1/images", {"name": name, "kind": kind}).status_code == 201
        assert service.put(f"/v1/images/{name}/data", None, data=path.read_bytes()).ok
    node = service.post("/v1/nodes", {"driver": "ipmi", "name": "pc1", "driver_info": {
        "ipmi_address": "127.0.0.1", "ipmi_port": bmc, "ipmi_username": "admin",
        "ipmi_password": "s3cret", "deploy_kernel": "dk", "deploy_ramdisk": "dr"},
        "instance_info": {"image_source": "img"}}).json()
    service.post("/v1/ports", {"address": "52:54:00:40:00:01", "node_uuid": node["uuid"]})
    for verb, goal in (("manage", "manageable"), ("provide", "available")):
        service.put("/v1/nodes/pc1/states/provision", {"target": verb})
        service.wait_node("pc1", lambda n: n["provision_state"] == goal and not n["reservation"])  # noqa: B023 (called in this iteration)
    return service


def test_a_deploy_waiting_for_its_agent_can_be_aborted(waiting_node):
    service = waiting_node
    assert service.put("/v1/nodes/pc1/states/provision", {"target": "active"}).status_code == 202
    node = service.wait_node("pc1", lambda n: n["provision_state"] == "wait call-back")
    assert node["power_state"] == "power on" and node["target_provision_state"] == "active"
    script = service.get("/boot/52-54-00-40-00-01.ipxe").text
    assert "labmetal.mode=deploy" in script and "/files/images/" in script
    assert service.put("/v1/nodes/pc1/states/provision", {"target": "abort"}).status_code == 202
    node = service.node("pc1")
    assert node["provision_state"] == "deploy failed"
    assert node["last_error"] == "wait call-back aborted by a user"
    assert "nothing to do" in service.get("/boot/52-54-00-40-00-01.ipxe").text


def test_an_agent_that_never_calls_back_times_the_deploy_out(waiting_node):
    service = waiting_node
    service.put("/v1/nodes/pc1/states/provision", {"target": "active"})
    node = service.wait_node("pc1", lambda n: n["provision_state"] == "deploy failed",
                             timeout=30)
    assert node["last_error"].startswith("Timeout reached while waiting for the deploy agent")
    events = [e["event"] for e in service.history("pc1")]
    assert "wait call-back -> deploy failed" in events
