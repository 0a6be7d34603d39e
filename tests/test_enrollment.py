"""An admin enrolls PCs with the real `baremetal` CLI, and bad input gets clear errors."""
from __future__ import annotations

import pytest

from labmetal.lab.harness import error_text, start_bmcs, start_service

LATEST = {"X-OpenStack-Ironic-API-Version": "latest"}


@pytest.fixture
def service(procs):
    return start_service(procs, "enroll")


@pytest.fixture
def cli(service, baremetal_for):
    return baremetal_for(service.url)


def test_admin_enrolls_a_pc_and_its_port_with_the_baremetal_cli(service, cli, procs):
    bmc = start_bmcs(procs, 1)
    node = cli.json("node", "create", "--driver", "ipmi", "--name", "tpr2-a01",
                    "--driver-info", "ipmi_address=127.0.0.1", "--driver-info", f"ipmi_port={bmc}",
                    "--driver-info", "ipmi_username=admin", "--driver-info", "ipmi_password=s3cret",
                    "--property", "cpus=4")
    assert node["provision_state"] == "enroll"
    assert node["driver_info"]["ipmi_password"] == "******"
    port = cli.json("port", "create", "52-54-00-AB-CD-01", "--node", node["uuid"])
    assert port["address"] == "52:54:00:ab:cd:01"

    listed = cli.json("node", "list")
    assert [(n["name"], n["provision_state"]) for n in listed] == [("tpr2-a01", "enroll")]
    assert cli.json("node", "list", "--fields", "uuid", "name") == [
        {"uuid": node["uuid"], "name": "tpr2-a01"}]
    assert cli.json("port", "list", "--node", "tpr2-a01")[0]["address"] == "52:54:00:ab:cd:01"

    cli("node", "set", "tpr2-a01", "--name", "tpr2-a02", "--description", "front row",
        "--property", "memory_mb=8192")
    cli("node", "unset", "tpr2-a02", "--property", "cpus")
    shown = cli.json("node", "show", "tpr2-a02", "--fields", "name", "description", "properties")
    assert shown == {"name": "tpr2-a02", "description": "front row",
                     "properties": {"memory_mb": 8192}}

    cli("node", "manage", "tpr2-a02", "--wait", "30")
    cli("node", "provide", "tpr2-a02", "--wait", "30")
    assert cli.json("node", "show", "tpr2-a02")["provision_state"] == "available"

    cli("node", "maintenance", "set", "tpr2-a02", "--reason", "keyboard missing")
    shown = cli.json("node", "show", "tpr2-a02", "--fields", "maintenance", "maintenance_reason")
    assert shown == {"maintenance": True, "maintenance_reason": "keyboard missing"}
    cli("node", "maintenance", "unset", "tpr2-a02")
    assert cli.json("node", "show", "tpr2-a02")["maintenance"] is False

    events = [entry["event"] for entry in cli.json("node", "history", "list", "tpr2-a02")]
    assert events[0] == "node enrolled with driver 'ipmi'"
    assert "verifying -> manageable (power credentials checked)" in events
    assert "maintenance set: keyboard missing" in events

    drivers = {d["name"] for d in cli.json("driver", "list")}
    assert drivers == {"ipmi", "wol"}
    assert cli.json("conductor", "list") == [{"hostname": "enroll", "conductor_group": "",
                                              "alive": True}]

    cli("port", "delete", port["uuid"])
    assert cli.json("port", "list") == []
    cli("node", "delete", "tpr2-a02")
    assert cli.json("node", "list") == []


def test_invalid_and_duplicate_input_is_refused_with_the_field_named(service, cli):
    result = cli("node", "create", "--driver", "redfish", check=False)
    assert result.returncode != 0 and "Unknown driver 'redfish'" in result.stderr
    assert "ipmi, wol" in result.stderr

    result = cli("node", "create", "--driver", "ipmi", "--driver-info", "ipmi_port=abc",
                 "--driver-info", "ipmi_address=not a host", check=False)
    assert result.returncode != 0
    assert "malformed ipmi_address" in result.stderr and "ipmi_port" in result.stderr

    cli("node", "create", "--driver", "ipmi", "--name", "pc1")
    result = cli("node", "create", "--driver", "ipmi", "--name", "pc1", check=False)
    assert "A node with name pc1 already exists (field: name)" in result.stderr
    result = cli("node", "create", "--driver", "ipmi", "--name", "bad name!", check=False)
    assert "Invalid name" in result.stderr

    cli("port", "create", "52:54:00:00:00:01", "--node", "pc1")
    result = cli("port", "create", "52:54:00:00:00:01", "--node", "pc1", check=False)
    assert "MAC address 52:54:00:00:00:01 already exists (field: address)" in result.stderr
    for bad in ("52:54:00:00:00", "zz:54:00:00:00:01", "52:54:00-00:00:01"):
        response = service.post("/v1/ports", {"address": bad, "node_uuid": "pc1"})
        assert response.status_code == 400
        assert "Expected a MAC address" in error_text(response) and \
            "(field: address)" in error_text(response)

    # A node may be enrolled without BMC details; manage then lists what is missing.
    result = cli("node", "manage", "pc1", check=False)
    assert result.returncode != 0 and "missing ipmi_address" in result.stderr
    assert cli.json("node", "show", "pc1")["provision_state"] == "enroll"


def test_verbs_that_do_not_apply_name_the_allowed_ones(service, cli):
    cli("node", "create", "--driver", "ipmi", "--name", "pc1")
    response = service.put("/v1/nodes/pc1/states/provision", {"target": "provide"})
    assert response.status_code == 400
    assert error_text(response).endswith('while it is in state "enroll". Allowed verbs in this '
                                         'state: manage.')
    response = service.put("/v1/nodes/pc1/states/power", {"target": "explode"})
    assert response.status_code == 400 and "power off, power on, rebooting" in error_text(response)
    response = service.put("/v1/nodes/pc1/states/power", {"target": "power on"})
    assert response.status_code == 400 and "missing ipmi_address" in error_text(response)


def test_ironic_rest_contract(service):
    root = service.get("/")
    assert root.status_code == 200
    assert root.json()["default_version"]["min_version"] == "1.1"
    assert root.headers["X-OpenStack-Ironic-API-Minimum-Version"] == "1.1"
    assert root.headers["X-OpenStack-Ironic-API-Maximum-Version"] == "1.78"
    v1 = service.get("/v1")
    assert v1.json()["nodes"][0]["href"] == f"{service.url}/v1/nodes/"

    too_new = service.get("/v1/nodes", headers={"X-OpenStack-Ironic-API-Version": "1.200"})
    assert too_new.status_code == 406
    assert "maximum supported versions are 1.1 and 1.78" in error_text(too_new)
    assert too_new.headers["X-OpenStack-Ironic-API-Maximum-Version"] == "1.78"
    assert service.get("/v1/nodes", headers={"X-OpenStack-Ironic-API-Version": "one"}
                       ).status_code == 400
    assert service.get("/v1/nodes", headers={"OpenStack-API-Version": "baremetal 1.50"}
                       ).headers["X-OpenStack-Ironic-API-Version"] == "1.50"
    assert service.get("/v1/conductors").status_code == 404  # needs 1.49; default is 1.1
    assert service.get("/v1/conductors", headers=LATEST).status_code == 200

    missing = service.get("/v1/nodes/no-such-node")
    assert missing.status_code == 404 and \
        error_text(missing) == "Node no-such-node could not be found."

    uuids = [service.post("/v1/nodes", {"driver": "wol", "name": f"pc{i}"}).json()["uuid"]
             for i in range(5)]
    first = service.get("/v1/nodes?limit=2").json()
    assert [n["uuid"] for n in first["nodes"]] == uuids[:2]
    assert first["next"] == f"{service.url}/v1/nodes?limit=2&marker={uuids[1]}"
    second = service.get(first["next"].replace(service.url, "")).json()
    assert [n["uuid"] for n in second["nodes"]] == uuids[2:4]
    last = service.get(second["next"].replace(service.url, "")).json()
    assert [n["uuid"] for n in last["nodes"]] == uuids[4:] and "next" not in last
    newest = service.get("/v1/nodes?sort_key=created_at&sort_dir=desc&limit=1").json()
    assert newest["nodes"][0]["uuid"] == uuids[-1]
    assert service.get("/v1/nodes?sort_key=driver_info").status_code == 400
    assert service.get("/v1/nodes?fields=uuid,secret").status_code == 400

    accepted = service.put("/v1/nodes/pc0/states/power", {"target": "power on"})
    assert accepted.status_code == 400  # a wol node without a port: nothing to wake
    service.post("/v1/ports", {"address": "52:54:00:00:00:10", "node_uuid": uuids[0]})
    accepted = service.put("/v1/nodes/pc0/states/power", {"target": "power on"})
    assert accepted.status_code == 202 and accepted.text == ""
    assert accepted.headers["Location"].endswith(f"/v1/nodes/{uuids[0]}/states")
