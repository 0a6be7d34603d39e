"""A hostile seat in the room (DESIGN §11; issue 14): a student who is root on a PC of the
room tries to take over another PC's deploy. The room is real (namespaces, a bridge, the
real service on its uplink, labmetal's dnsmasq where said); the attacker is
tests/hostile_seat.py, run in its own PC's namespace.

The victim of the first tests is a Wake-on-LAN PC that never boots (switched off at the
wall): whatever answers for it is the attacker, so each defence is seen on its own. The
last test deploys a real light seat that gets its address from labmetal's DHCP while the
attacker asks with its MAC the whole time.
"""
from __future__ import annotations

import sqlite3
import sys

from labmetal.lab.network import in_namespace, run_in
from tests.room import disk_image, lab  # noqa: F401 (fixtures)
from tests.room import TestRoom, open_room, sha256_of
from tests.support import Proc, wait_for

VICTIM_MAC = "52:54:00:66:00:01"


def victim(room: TestRoom, image: str) -> str:
    """A WoL node with ``image`` chosen and a deploy asked for; its name."""
    node = room.api("POST", "/v1/nodes", json={
        "driver": "wol", "name": "victim", "driver_info": {
            "wol_host": room.broadcast, "wol_port": 9, "deploy_kernel": "deploy-kernel",
            "deploy_ramdisk": "deploy-ramdisk"}})
    assert node.status_code == 201, node.text
    port = room.api("POST", "/v1/ports", json={"address": VICTIM_MAC,
                                               "node_uuid": node.json()["uuid"]})
    assert port.status_code == 201, port.text
    for verb, goal in (("manage", "manageable"), ("provide", "available")):
        assert room.provision("victim", verb).status_code == 202
        room.wait_state("victim", goal)
    patched = room.api("PATCH", "/v1/nodes/victim", json=[
        {"op": "add", "path": "/instance_info/image_source", "value": image}])
    assert patched.status_code == 200, patched.text
    return "victim"


def attacker(room: TestRoom, mode: str, *extra: str) -> Proc:
    """The hostile seat's program in the first seat's namespace (that PC is the
    attacker's: it is never enrolled)."""
    seat = room.seats[0]
    return room.procs.start(in_namespace(seat.namespace, [
        sys.executable, "-m", "tests.hostile_seat", "--api",
        room.service.url, "--mac", VICTIM_MAC, "--mode", mode, *extra]), f"attacker-{mode}")


def history(room: TestRoom, name: str) -> list[str]:
    answer = room.api("GET", f"/v1/nodes/{name}/history")
    assert answer.status_code == 200, answer.text
    return [event["event"] for event in answer.json()["history"]]


def test_a_stolen_token_cannot_fake_a_verified_deploy(lab, procs, tmp_path, disk_image):
    """The image's sha256 is public (its manifest): a fake agent that claims it wrote the
    image and quotes it gets no further than the receipt challenge, which needs the disk's
    bytes."""
    room = open_room(lab, procs, tmp_path, index=71, seats=1)
    room.upload_deploy_ramdisk()
    room.upload("img", "whole-disk", disk_image)
    name = victim(room, "img")
    thief = attacker(room, "fake-receipt", "--sha256", sha256_of(disk_image),
                     "--callback", "http://10.99.71.11:9999")
    assert room.provision(name, "active").status_code == 202
    thief.wait_for_output("token ", timeout=60)
    node = room.wait_state(name, "active", "deploy failed")
    assert node["provision_state"] == "deploy failed", history(room, name)
    assert "receipt challenge does not match" in node["last_error"]
    assert "command prove_disk" in thief.output()
    assert not any("written and verified" in event for event in history(room, name))


def test_the_conductor_calls_back_only_the_heartbeats_address_and_quotes_nothing(
        lab, procs, tmp_path, disk_image):
    """A heartbeat naming another host (here the service's own address, where its API
    listens) makes the conductor call the seat that sent it, and what that seat answers
    does not land in last_error."""
    room = open_room(lab, procs, tmp_path, index=72, seats=1)
    room.upload_deploy_ramdisk()
    room.upload("img", "whole-disk", disk_image)
    name = victim(room, "img")
    api_port = room.service.url.rsplit(":", 1)[1]
    # Its own agent listens on the same port number, at its own address.
    thief = attacker(room, "reflect", "--port", api_port,
                     "--callback", f"http://10.99.72.2:{api_port}/v1/nodes")
    assert room.provision(name, "active").status_code == 202
    node = room.wait_state(name, "active", "deploy failed")
    assert node["provision_state"] == "deploy failed"
    assert "HTTP 400" in node["last_error"], node["last_error"]
    assert "REFLECTED" not in node["last_error"]
    assert not any("REFLECTED" in event for event in history(room, name))
    assert "command write_image" in thief.output()  # it went to the seat that sent it
    events = history(room, name)
    assert any(f"called back from http://10.99.72.11:{api_port}" in event for event in events)
    assert not any("10.99.72.2" in event for event in events)


def test_a_second_lookup_fails_the_deploy_and_the_token_works_only_where_it_went(
        lab, procs, tmp_path, disk_image):
    room = open_room(lab, procs, tmp_path, index=73, seats=1)
    room.upload_deploy_ramdisk()
    room.upload("img", "whole-disk", disk_image)
    name = victim(room, "img")
    thief = attacker(room, "steal")
    assert room.provision(name, "active").status_code == 202
    thief.wait_for_output("token ", timeout=60)
    uuid = next(line.split()[1] for line in thief.output().splitlines()
                if line.startswith("token "))
    assert room.service.node(name)["provision_state"] == "wait call-back"
    # The seat that really boots (here: from the server's side of the room) asks too.
    lookup = room.api("GET", f"/v1/lookup?addresses={VICTIM_MAC}")
    assert lookup.status_code == 409, lookup.text
    assert "second lookup" in lookup.text
    node = room.wait_state(name, "deploy failed")
    assert "second lookup of the agent token from 10.99.73.2" in node["last_error"]
    assert "given to 10.99.73.11" in node["last_error"]
    assert uuid == node["uuid"]
    events = history(room, name)
    assert any("token handed out" in event and "10.99.73.11" in event for event in events)


def test_a_heartbeat_with_the_token_from_another_address_is_refused(lab, procs, tmp_path,
                                                                    disk_image):
    room = open_room(lab, procs, tmp_path, index=74, seats=1)
    room.upload_deploy_ramdisk()
    room.upload("img", "whole-disk", disk_image)
    name = victim(room, "img")
    assert room.provision(name, "active").status_code == 202
    uuid = room.service.node(name)["uuid"]
    # The seat at .11 looks up first and keeps the token; the server's side tries it.
    script = ("import requests,sys;"
              f"r=requests.get('{room.service.url}/v1/lookup',params={{'addresses':"
              f"'{VICTIM_MAC}'}},timeout=10);print(r.status_code);"
              "print(r.json()['config']['agent_token'] if r.ok else '')")
    answer = wait_for(lambda: (lambda out: out if out.startswith("200") else None)(
        run_in(room.seats[0].namespace, [sys.executable, "-c",
                                         script]).stdout), 60, "the seat's lookup")
    token = answer.split()[1]
    beat = room.api("POST", f"/v1/heartbeat/{uuid}", json={
        "callback_url": "http://10.99.74.11:9999", "agent_token": token})
    assert beat.status_code == 403, beat.text
    assert "bound to another address" in beat.text


def test_a_lookup_names_a_few_macs_at_most(lab, procs, tmp_path):
    room = open_room(lab, procs, tmp_path, index=75, seats=1)
    macs = ",".join(f"52:54:00:77:00:{i:02x}" for i in range(17))
    answer = room.api("GET", f"/v1/lookup?addresses={macs}")
    assert answer.status_code == 400
    assert "at most 16" in answer.text


def test_with_labmetals_dhcp_only_the_leased_address_gets_the_token(lab, procs, tmp_path,
                                                                   disk_image):
    """A real light seat gets its address from labmetal's dnsmasq and is deployed while
    the attacker (another PC of the room) asks with its MAC all along: refused each time;
    the seat ends active, its disk verified by the receipt."""
    room = open_room(lab, procs, tmp_path, index=76, seats=2, dhcp=True)
    room.upload_deploy_ramdisk()
    room.upload("img", "whole-disk", disk_image)
    seat, spy = room.seats
    run_in(spy.namespace, ["ip", "addr", "add", "10.99.76.50/24", "dev", "eth0"])
    room.enroll(seat)
    room.choose_image(seat, "img")
    thief = room.procs.start(in_namespace(spy.namespace, [
        sys.executable, "-m", "tests.hostile_seat", "--api",
        room.service.url, "--mac", seat.mac, "--mode", "steal"]), "attacker-dhcp")
    assert room.provision(seat.name, "active").status_code == 202
    node = room.wait_state(seat.name, "active", "deploy failed")
    assert node["provision_state"] == "active", node["last_error"]
    assert "lookup 403" in thief.output()
    assert "token " not in thief.output()
    events = history(room, seat.name)
    handed = [event for event in events if "token handed out" in event]
    # the seat's lease as labmetal recorded it from dnsmasq (the seat itself may be
    # rebooting by now, without an address)
    with sqlite3.connect(room.service.database.removeprefix("sqlite:///")) as db:
        leases = db.execute("SELECT address FROM dhcp_leases WHERE mac = ?",
                            (seat.mac,)).fetchall()
    assert len(leases) == 1, leases
    address = leases[0][0]
    assert address.startswith("10.99.76.1")  # from the pool, .100-.200
    assert handed == [f"deploy agent looked up from {address}; token handed out"]
    assert any("written and verified" in event for event in events)
    with open(seat.disk, "rb") as disk, open(disk_image, "rb") as image:
        size = image.seek(0, 2)
        image.seek(0)
        assert disk.read(size) == image.read()
