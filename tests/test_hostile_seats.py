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
import subprocess
import sys
import tempfile
from pathlib import Path

from labmetal.lab.network import in_namespace, run_in
from labmetal.lab.served import StandIn
from tests.room import disk_image, lab  # noqa: F401 (fixtures)
from labmetal.lab.light_room import TestRoom, open_room, sha256_of
from labmetal.lab.harness import Proc, free_port, free_udp_range, wait_for

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


def test_during_a_session_a_neighbour_with_its_sniffed_values_gets_nothing_and_floods_stop_no_one(
        lab, procs, tmp_path):
    """A student's session runs on a seat that got its address from labmetal's DHCP. The
    attacker (another PC of the room) holds everything the seat's boot script carried, as
    if sniffed off the wire: initiator name, CHAP account, target; its iSCSI login is
    refused, as the target now lets in the seat's address alone. It asks for the seat's
    script itself: no secret. It floods the API (300 connections that never finish a
    request, the seat's script in a loop) and TFTP (missing files, bad options, garbage,
    transfers never acknowledged). Meanwhile the seat gets its script, logs in to its disk
    and writes to it, and downloads its first file over TFTP."""
    tftp_port = free_udp_range(1)
    room = open_room(lab, procs, tmp_path, index=78, seats=2, dhcp=True, power="wol",
                     overlay_backend="local", overlay_run_dir=tempfile.mkdtemp(prefix="lm-hs-"),
                     iscsi_portal=f"10.99.78.2:{free_port()}",
                     tftp_listen=f"10.99.78.2:{tftp_port}")
    seat, spy = room.seats
    run_in(spy.namespace, ["ip", "addr", "add", "10.99.78.50/24", "dev", "eth0"])
    image = tmp_path / "tp.raw"
    with open(image, "wb") as out:
        out.write(b"\x54" * 2**20)
        out.truncate(16 * 2**20)
    room.upload("tp-v1", "whole-disk", image)
    for path, body in (("/v1/users", {"name": "sam", "role": "student", "password": "x" * 12}),
                       ("/v1/templates", {"name": "net-tp", "image": "tp-v1"})):
        made = room.api("POST", path, json=body)
        assert made.status_code == 201, made.text
    room.enroll(seat, manage_and_provide=False)
    ses = room.api("POST", "/v1/sessions", json={"template": "net-tp", "student": "sam"})
    assert ses.status_code == 201, ses.text
    started = room.api("POST", f"/v1/sessions/{ses.json()['uuid']}/start",
                       json={"seat": seat.name, "boot": False})
    assert started.status_code == 200, started.text
    run_in(seat.namespace, [sys.executable, "-c", "import pathlib, tempfile\n"
                            "from labmetal.lab.firmware import dhcp\n"
                            "dhcp('eth0', pathlib.Path(tempfile.mkdtemp()))\n"], timeout=180)
    flooder = room.procs.start(in_namespace(spy.namespace, [
        sys.executable, "-m", "tests.hostile_seat", "--api", room.service.url, "--mac",
        seat.mac, "--mode", "flood", "--tftp", f"10.99.78.2:{tftp_port}"]), "attacker-flood")
    try:
        flooder.wait_for_output("holding 300 connections", timeout=120)
        flooder.wait_for_output("tftp 10000", timeout=120)
        as_seat = StandIn(seat.namespace, "")
        script = as_seat.get(f"{room.service.url}/boot/{seat.mac.replace(':', '-')}.ipxe").text
        assert "sanboot iscsi:" in script, script
        sniffed = dict(line.split(" ", 2)[1:] for line in script.splitlines()
                       if line.startswith("set ") and len(line.split(" ", 2)) == 3)
        target = script.split("sanboot iscsi:", 1)[1].split()[0]
        host, _, port, lun, iqn = target.split(":", 4)
        secret = tmp_path / "chap-secret"
        secret.write_text(sniffed["password"])

        def iscsi(namespace: str, command: str) -> subprocess.CompletedProcess:
            opts = ",".join(["driver=iscsi", "transport=tcp", f"portal={host}:{port}",
                             f"target={iqn}", f"lun={lun}", f"user={sniffed['username']}",
                             "password-secret=chap",
                             f"initiator-name={sniffed['initiator-iqn']}"])
            return run_in(namespace, ["qemu-io", "--object", f"secret,id=chap,file={secret}",
                                      "--image-opts", opts, "-c", command], timeout=120,
                          check=False)

        stolen = iscsi(spy.namespace, "read 0 4096")
        assert stolen.returncode != 0, stolen.stdout
        mine = iscsi(seat.namespace, "write -P 0x61 0 4096")
        assert mine.returncode == 0 and "wrote 4096/4096" in mine.stdout, mine.stderr
        assert iscsi(seat.namespace, "read -P 0x61 0 4096").returncode == 0
        first_file = tmp_path / "undionly.kpxe"
        run_in(seat.namespace, ["tftp", "-m", "binary", "10.99.78.2", str(tftp_port), "-c",
                                "get", "undionly.kpxe", str(first_file)], timeout=120)
        assert first_file.read_bytes() == Path("/usr/lib/ipxe/undionly.kpxe").read_bytes()
        wait_for(lambda: "scripts 100" in flooder.output(), 120, "the attacker's requests")
    finally:
        flooder.stop()
    assert "script sanboot" not in flooder.output()
    assert flooder.output().count("connection refused") == 0
    assert room.service.proc.popen.poll() is None, "the service died"
    log = (procs.workdir / "room78.service.log").read_text()
    assert log.count("tftpy.") < 200, "the TFTP flood went into the log line by line"
