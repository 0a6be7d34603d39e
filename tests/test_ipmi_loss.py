"""IPMI on a lossy network (issue 17): 24 virtual BMCs behind a link that drops 20 % of the
UDP datagrams each way (nftables in their network namespace, the kernel drops them), a
labmetal syncing their power every 2 s. Every power action completes, no node goes to
maintenance; a BMC that really stops answering does, and comes back as soon as it answers.
bench/ipmi_loss.py puts figures on the same network beside ipmitool's."""
from __future__ import annotations

from pathlib import Path

from labmetal.lab.harness import LABMETAL, Proc, Processes, ipmitool_power, start_service
from labmetal.lab.network import Lab, add_udp_loss, in_namespace, remove_udp_loss
from tests.room import lab  # noqa: F401 (fixture)

NODES = 24
BMC_ADDRESS = "10.99.96.1"
FIRST_PORT = 7000
LONER_PORT = 7100  # a BMC of its own process, to be killed
PASSWORD = "s3cret"


def start_bmcs_in(procs: Processes, namespace: str, port: int, count: int, name: str) -> Proc:
    proc = procs.start(in_namespace(namespace, [
        LABMETAL, "lab", "bmc", "--address", BMC_ADDRESS, "--port", str(port), "--count",
        str(count), "--user", "admin", "--password", PASSWORD]), name)
    proc.wait_for_output("virtual BMC(s) on", timeout=30)
    return proc


def sync_cycles(log: Path) -> int:
    return log.read_text(errors="replace").count("power sync: ") if log.exists() else 0


def test_power_survives_20_percent_loss_each_way_and_only_a_silent_bmc_goes_to_maintenance(
        lab: Lab, procs: Processes) -> None:
    room = lab.add_room("ipmi", server=f"{BMC_ADDRESS}/24")
    lab.add_uplink(room, "10.99.96.2/24")
    start_bmcs_in(procs, room.namespace, FIRST_PORT, NODES, "bmcs")
    loner = start_bmcs_in(procs, room.namespace, LONER_PORT, 1, "loner")
    service = start_service(procs, "ipmiloss", power_sync_interval=2)
    seats = {f"pc{i:02d}": FIRST_PORT + i for i in range(NODES)}
    names = seats | {"loner": LONER_PORT}
    for name, port in names.items():
        assert service.post("/v1/nodes", {"driver": "ipmi", "name": name, "driver_info": {
            "ipmi_address": BMC_ADDRESS, "ipmi_port": port, "ipmi_username": "admin",
            "ipmi_password": PASSWORD}}).status_code == 201

    add_udp_loss(room.namespace, 20)
    # every BMC's credentials verified at once
    for name in names:
        assert service.put(f"/v1/nodes/{name}/states/provision",
                           {"target": "manage"}).status_code == 202
    for name in names:
        node = service.wait_node(name, lambda n: n["provision_state"] != "verifying"
                                 and not n["reservation"], timeout=120)
        assert (node["provision_state"], node["last_error"]) == ("manageable", None), name

    # a BMC stops answering: while the others are switched, the syncs go on
    first = sync_cycles(procs.workdir / "ipmiloss.service.log")
    loner.kill()
    for target in ("power on", "power off"):  # every other machine at once
        for name in seats:
            assert service.put(f"/v1/nodes/{name}/states/power",
                               {"target": target}).status_code == 202
        done = [service.wait_node(name, lambda n: n["target_power_state"] is None
                                  and not n["reservation"], timeout=120) for name in seats]
        assert [(n["name"], n["power_state"], n["last_error"]) for n in done] == [
            (name, target, None) for name in seats]

    # the silent BMC is put in maintenance after 3 syncs, and nobody else
    node = service.wait_node("loner", lambda n: n["maintenance"], timeout=180)
    assert node["fault"] == "power failure"
    assert "did not answer any of" in node["maintenance_reason"]
    assert sync_cycles(procs.workdir / "ipmiloss.service.log") >= first + 3
    nodes = {n["name"]: n for n in service.get("/v1/nodes/detail").json()["nodes"]}
    assert [name for name, n in nodes.items() if n["maintenance"]] == ["loner"]
    assert {n["power_state"] for name, n in nodes.items() if name != "loner"} == {"power off"}
    # it is taken out as soon as it answers again (the next sync)
    start_bmcs_in(procs, room.namespace, LONER_PORT, 1, "loner-again")
    node = service.wait_node("loner", lambda n: not n["maintenance"], timeout=60)
    assert node["fault"] is None
    nodes = service.get("/v1/nodes/detail").json()["nodes"]
    assert [n["name"] for n in nodes if n["maintenance"]] == []

    remove_udp_loss(room.namespace)
    assert ipmitool_power(FIRST_PORT, password=PASSWORD, host=BMC_ADDRESS) == \
        "Chassis Power is off"  # an independent client agrees
