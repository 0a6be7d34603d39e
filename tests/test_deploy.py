"""Deploys end to end in a simulated room: PXE script over HTTP, the real agent in each seat's
namespace, chunks over HTTP, verified writes to the seat's disk, and every failure the
issue lists. The same deploys from the built ramdisk on QEMU seats: tests/test_lab_boots.py
and tests/test_firmware_boots.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from labmetal.lab.network import run_in, shape
from labmetal.lab.room import namespace_pids
from tests.room import disk_image, lab  # noqa: F401 (fixtures)
from labmetal.lab.light_room import MIB, make_rootfs, make_whole_disk, open_room, sha256_of
from labmetal.agent.manifest import Manifest
from labmetal.lab.harness import LABMETAL, error_text, start_service, wait_for


def test_teacher_deploys_a_whole_disk_image_and_the_seat_boots_it(lab, procs, tmp_path,
                                                                   disk_image, baremetal_for):
    room = open_room(lab, procs, tmp_path, index=11, seats=2)
    room.upload_deploy_ramdisk()
    image = room.upload("debian12-reseaux", "whole-disk", disk_image)
    cli = baremetal_for(room.service.url)
    for seat in room.seats:
        room.enroll(seat)
        cli("node", "set", seat.name, "--instance-info", "image_source=debian12-reseaux")
        cli("node", "deploy", seat.name)
    for seat in room.seats:
        node = room.wait_state(seat.name, "active", "deploy failed")
        assert node["provision_state"] == "active", node["last_error"]
        assert node["last_error"] is None and node["deploy_step"] == {}
        assert sha256_of(Path(seat.disk), image["virtual_size"]) == image["raw_sha256"]
        wait_for(lambda: "booted from disk: mbr=bootable" in room.console(seat), 180,  # noqa: B023 (called in this iteration)
                 "the seat booting its disk")
    events = [e["event"] for e in room.service.history(room.seats[0].name)]
    assert "deploy agent looked up from 10.99.11.11; token handed out" in events
    assert any(e.startswith("image debian12-reseaux written and verified") for e in events)
    assert events[-1] == "deploying -> active"


def test_checksum_mismatch_fails_the_deploy_and_a_redeploy_succeeds(lab, procs, tmp_path,
                                                                     disk_image):
    room = open_room(lab, procs, tmp_path, index=12, seats=1)
    room.upload_deploy_ramdisk()
    image = room.upload("img", "whole-disk", disk_image)
    seat = room.seats[0]
    room.enroll(seat)
    room.choose_image(seat, "img")
    packed = room.service.state_dir / "images" / image["uuid"] / "packed"
    original = packed.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF  # a bit flipped on the server's disk, not in the DB
    packed.write_bytes(bytes(damaged))
    assert room.provision(seat.name, "active").status_code == 202
    node = room.wait_state(seat.name, "active", "deploy failed")
    assert node["provision_state"] == "deploy failed"
    assert "Deploy failed" in node["last_error"] and "sha256" in node["last_error"]
    assert "chunk" in node["last_error"]

    packed.write_bytes(original)
    assert room.provision(seat.name, "active").status_code == 202
    node = room.wait_state(seat.name, "active", "deploy failed")
    assert node["provision_state"] == "active", node["last_error"]
    assert sha256_of(Path(seat.disk), image["virtual_size"]) == image["raw_sha256"]


def test_a_disk_smaller_than_the_image_fails_before_writing(lab, procs, tmp_path, disk_image):
    room = open_room(lab, procs, tmp_path, index=13, seats=1, disk_mib=16)
    room.upload_deploy_ramdisk()
    room.upload("img", "whole-disk", disk_image)
    seat = room.seats[0]
    before = sha256_of(Path(seat.disk))
    room.enroll(seat)
    room.choose_image(seat, "img")
    room.provision(seat.name, "active")
    node = room.wait_state(seat.name, "active", "deploy failed")
    assert node["provision_state"] == "deploy failed"
    assert "the image needs" in node["last_error"]
    assert sha256_of(Path(seat.disk)) == before


def test_an_agent_killed_mid_write_fails_the_deploy_never_active(lab, procs, tmp_path):
    big = make_whole_disk(tmp_path, size_mib=96, marker="big", random_mib=48)
    room = open_room(lab, procs, tmp_path, index=14, seats=1, disk_mib=128, agent_timeout=5)
    seat = room.seats[0]
    shape(room.room.namespace, "lmt-s1", "40mbit")  # what the seat receives: ~10 s of writing
    room.upload_deploy_ramdisk()
    room.upload("big", "whole-disk", big)
    room.enroll(seat)
    room.choose_image(seat, "big")
    room.provision(seat.name, "active")
    room.service.wait_node(seat.name, lambda n: (n["deploy_step"] or {}).get("done", 0) > 0,
                           timeout=60, what="the write under way")
    for pid in namespace_pids(seat.namespace):  # by PID: pkill -f would hit other rooms' agents
        if b"labmetal.agent" in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGKILL)
    node = room.wait_state(seat.name, "active", "deploy failed", timeout=90)
    assert node["provision_state"] == "deploy failed"
    assert "the agent vanished during write_image" in node["last_error"]


def test_agent_endpoints_refuse_a_wrong_or_missing_token(lab, procs, tmp_path, disk_image):
    room = open_room(lab, procs, tmp_path, index=15, seats=1)
    room.upload_deploy_ramdisk()
    room.upload("img", "whole-disk", disk_image)
    seat = room.seats[0]
    node = room.enroll(seat)
    for token in (None, "guessed-token"):
        body = {"callback_url": "http://10.99.15.66:9999"}
        if token:
            body["agent_token"] = token
        response = room.api("POST", f"/v1/heartbeat/{node['uuid']}", json=body)
        assert response.status_code == 401
        assert error_text(response) == "Invalid or missing agent token received"
    after = room.service.node(seat.name)
    assert (after["provision_state"], after["reservation"]) == ("available", None)
    lookup = room.api("GET", f"/v1/lookup?addresses={seat.mac}")
    assert lookup.status_code == 404  # no agent is expected while available


def test_undeploy_erases_the_disk_and_returns_the_seat(lab, procs, tmp_path, disk_image):
    room = open_room(lab, procs, tmp_path, index=16, seats=1)
    room.upload_deploy_ramdisk()
    room.upload("img", "whole-disk", disk_image)
    seat = room.seats[0]
    room.enroll(seat)
    room.choose_image(seat, "img")
    room.provision(seat.name, "active")
    assert room.wait_state(seat.name, "active", "deploy failed")["provision_state"] == "active"
    assert room.provision(seat.name, "deleted").status_code == 202
    node = room.wait_state(seat.name, "available", "clean failed")
    assert node["provision_state"] == "available", node["last_error"]
    assert node["power_state"] == "power off" and node["instance_info"] == {}
    with open(seat.disk, "rb") as disk:
        assert disk.read(MIB) == bytes(MIB)  # partition table and boot code gone


def test_a_partition_image_gets_a_bootloader(lab, procs, tmp_path):
    room = open_room(lab, procs, tmp_path, index=17, seats=1)
    room.upload_deploy_ramdisk()
    rootfs = make_rootfs(tmp_path, 24, "tp-part")
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(b"\x00kernel" * 4096)
    initrd.write_bytes(b"\x00initrd" * 4096)
    room.upload("tp-kernel", "kernel", kernel)
    room.upload("tp-initrd", "ramdisk", initrd)
    room.upload("tp-part", "partition", rootfs, kernel="tp-kernel", ramdisk="tp-initrd")
    seat = room.seats[0]
    room.enroll(seat)
    room.choose_image(seat, "tp-part")
    room.provision(seat.name, "active")
    node = room.wait_state(seat.name, "active", "deploy failed")
    assert node["provision_state"] == "active", node["last_error"]
    table = subprocess.run(["parted", "-s", "-m", seat.disk, "unit", "B", "print"],
                           capture_output=True, text=True, check=True).stdout
    assert "boot" in table.splitlines()[-1].split(":")[-1]
    start = int(table.splitlines()[-1].split(":")[1].rstrip("B"))
    # debugfs reads a file system, not a disk: copy the partition out
    part = tmp_path / "part.img"
    subprocess.run(["dd", f"if={seat.disk}", f"of={part}", "bs=1M", f"skip={start // MIB}",
                    "status=none"], check=True)
    listing = subprocess.run(["debugfs", "-R", "ls /boot", str(part)], capture_output=True,
                             text=True).stdout
    assert "vmlinuz" in listing and "initrd.img" in listing and "extlinux" in listing


def test_iscsi_deploy_writes_the_image_through_the_seats_export(lab, procs, tmp_path,
                                                                 disk_image):
    room = open_room(lab, procs, tmp_path, index=18, seats=1)
    room.upload_deploy_ramdisk()
    image = room.upload("img", "whole-disk", disk_image)
    seat = room.seats[0]
    room.enroll(seat)
    room.choose_image(seat, "img", deploy_interface="iscsi")
    room.provision(seat.name, "active")
    node = room.wait_state(seat.name, "active", "deploy failed")
    assert node["provision_state"] == "active", node["last_error"]
    assert sha256_of(Path(seat.disk), image["virtual_size"]) == image["raw_sha256"]
    def tgtd_in_seat() -> bool:
        pids = run_in(seat.namespace, ["ip", "netns", "pids", seat.namespace]).stdout.split()
        return any(Path(f"/proc/{pid}/comm").read_text().strip() == "tgtd" for pid in pids
                   if Path(f"/proc/{pid}/comm").exists())
    wait_for(lambda: not tgtd_in_seat(), 20, "the export to end when the seat reboots")


def test_inspection_records_the_seats_hardware(lab, procs, tmp_path):
    room = open_room(lab, procs, tmp_path, index=19, seats=1, disk_mib=256)
    room.upload_deploy_ramdisk()
    seat = room.seats[0]
    room.enroll(seat, manage_and_provide=False)
    room.provision(seat.name, "manage")
    room.wait_state(seat.name, "manageable")
    assert room.provision(seat.name, "inspect").status_code == 202
    node = room.wait_state(seat.name, "manageable", "inspect failed")
    assert node["last_error"] is None, node["last_error"]
    assert node["properties"]["local_gb"] == 0 and node["properties"]["cpus"] >= 1
    assert node["properties"]["memory_mb"] > 0 and node["power_state"] == "power off"


def test_an_unknown_pc_that_pxe_boots_registers_itself(lab, procs, tmp_path):
    from labmetal.lab.seat import LightSeat
    room = open_room(lab, procs, tmp_path, index=20, seats=1, self_registration=True,
                     deploy_kernel="deploy-kernel", deploy_ramdisk="deploy-ramdisk")
    room.upload_deploy_ramdisk()
    seat = room.seats[0]
    pc = LightSeat(seat)  # someone presses the power button of a PC labmetal does not know
    try:
        pc.power_on()
        node = wait_for(lambda: next((n for n in room.api("GET", "/v1/nodes/detail").json()[
            "nodes"]), None), 60, "the PC to register itself")
        ports = room.api("GET", f"/v1/nodes/{node['uuid']}/ports").json()["ports"]
        assert [p["address"] for p in ports] == [seat.mac]
        assert node["provision_state"] == "enroll" and node["driver"] == "wol"
        assert node["properties"]["cpus"] >= 1
        assert "self-registered at PXE boot" in room.service.history(node["uuid"])[0]["event"]
    finally:
        pc.shutdown()


def test_a_wake_on_lan_seat_is_deployed_and_rebooted_in_band(lab, procs, tmp_path,
                                                               disk_image):
    room = open_room(lab, procs, tmp_path, index=21, seats=1, power="wol")
    room.upload_deploy_ramdisk()
    image = room.upload("img", "whole-disk", disk_image)
    seat = room.seats[0]
    room.enroll(seat)
    room.choose_image(seat, "img")
    room.provision(seat.name, "active")
    node = room.wait_state(seat.name, "active", "deploy failed")
    assert node["provision_state"] == "active", node["last_error"]
    assert sha256_of(Path(seat.disk), image["virtual_size"]) == image["raw_sha256"]
    wait_for(lambda: "booted from disk: mbr=bootable" in room.console(seat), 180,
             "the seat rebooting into its disk")
    assert "labmetal-seat: rebooting" in room.console(seat)


def test_a_teacher_captures_a_reference_pc_and_deploys_it_elsewhere(lab, procs, tmp_path,
                                                                    disk_image):
    room = open_room(lab, procs, tmp_path, index=22, seats=2, disk_mib=48)
    room.upload_deploy_ramdisk()
    reference, student = room.seats
    with open(disk_image, "rb") as image, open(reference.disk, "r+b") as disk:
        disk.write(image.read())  # the teacher prepared this PC by hand
    room.enroll(reference, manage_and_provide=False)
    room.provision(reference.name, "manage")
    room.wait_state(reference.name, "manageable")
    captured = subprocess.run(
        [LABMETAL, "images", "capture", reference.name, "tp3-reference", "--json"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "LABMETAL_URL": room.service.url})
    assert captured.returncode == 0, captured.stderr
    image = json.loads(captured.stdout)
    assert image["status"] == "active" and image["virtual_size"] == 48 * MIB
    assert image["raw_sha256"] == sha256_of(Path(reference.disk))
    assert "captured tp3-reference" in captured.stderr
    node = room.service.node(reference.name)
    assert node["provision_state"] == "manageable" and node["power_state"] == "power off"
    manifest = Manifest.from_json(room.api("GET", f"/v1/images/{image['uuid']}/manifest").text)
    assert manifest.raw_sha256 == image["raw_sha256"]

    room.enroll(student)
    room.choose_image(student, "tp3-reference")
    room.provision(student.name, "active")
    assert room.wait_state(student.name, "active", "deploy failed")["provision_state"] == "active"
    assert sha256_of(Path(student.disk)) == sha256_of(Path(reference.disk))


def test_a_seat_that_boots_while_labmetal_is_stopped_is_deployed_once_it_is_back(
        lab, procs, tmp_path, disk_image):
    """labmetal stopped (an upgrade) right after it switched a seat on to deploy it, for
    longer than callback_timeout and than the seat's firmware asks for its boot script
    (the firmware gives up; a PC would boot its disk). Once labmetal is back, the seat's
    conductor switches it on again after missed_boot_after, and the deploy goes on: its
    wait for the agent counts from the return, not from the first power-on."""
    room = open_room(lab, procs, tmp_path, index=84, seats=1, script_attempts=3,
                     post_seconds=5, callback_timeout=15, missed_boot_after=5)
    room.upload_deploy_ramdisk()
    room.upload("img", "whole-disk", disk_image)
    seat = room.seats[0]
    room.enroll(seat)
    room.choose_image(seat, "img")
    assert room.provision(seat.name, "active").status_code == 202
    room.service.wait_node(seat.name, lambda n: n["provision_state"] == "wait call-back")
    host, port = room.service.url.rsplit("//", 1)[1].split(":")
    room.service.proc.stop()
    wait_for(lambda: "no boot script" in room.console(seat), 60, "the seat giving up")
    time.sleep(6)  # the rest of the outage: past callback_timeout since the power-on
    room.service = start_service(procs, "room84-again", state_dir=room.service.state_dir,
                                 host=host, port=int(port), hostname="room84",
                                 callback_timeout=15, agent_timeout=15, missed_boot_after=5)
    node = room.wait_state(seat.name, "active", "deploy failed")
    assert (node["provision_state"], node["last_error"]) == ("active", None)
    wait_for(lambda: "booted from disk: mbr=bootable" in room.console(seat), 180,
             "the seat booting its disk")
    assert any("labmetal was away when the seat was switched on" in e["event"]
               for e in room.service.history(seat.name))
