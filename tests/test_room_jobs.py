"""Rooms and room jobs end to end: CSV import with its errors, a room deploy of light seats
with automatic retries and a re-imaged seat, the CLI's live view, and a scheduled job that
fires after the service restarted. A room job on QEMU seats booting the built ramdisk:
tests/test_firmware_boots.py."""
from __future__ import annotations

import json
import os
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path


from labmetal.lab.network import add_loss
from tests.room import disk_image, lab  # noqa: F401 (fixtures)
from labmetal.lab.light_room import BMC_PASSWORD, MIB, open_room, sha256_of
from labmetal.lab.harness import LABMETAL, error_text, start_service, wait_for

HEADER = "seat,name,mac,driver,ipmi_address,ipmi_port,ipmi_username,ipmi_password," \
         "deploy_kernel,deploy_ramdisk\n"


def csv_of(room, seats) -> str:
    return HEADER + "".join(
        f"A{i + 1:02d},{seat.name},{seat.mac},ipmi,127.0.0.1,{seat.bmc_port},admin,"
        f"{BMC_PASSWORD},deploy-kernel,deploy-ramdisk\n" for i, seat in enumerate(seats))


def wait_job(service, uuid: str, timeout: float = 180) -> dict:
    return wait_for(lambda: (lambda job: job if job["state"] in ("done", "failed", "cancelled")
                             else None)(service.get(f"/v1/room-jobs/{uuid}").json()),
                    timeout, f"room job {uuid} to end", interval=0.5)


def test_a_room_is_imported_from_csv_all_rows_or_none(procs):
    service = start_service(procs, "rooms")
    assert service.post("/v1/rooms", {"name": "TPR-2", "description": "réseaux"}).status_code == 201
    duplicate = service.post("/v1/rooms", {"name": "TPR-2"})
    assert duplicate.status_code == 409 and "already exists" in error_text(duplicate)

    def import_(text: str):
        return service.post("/v1/rooms/TPR-2/import", None, data=text.encode(),
                            headers={"Content-Type": "text/csv"})

    bad = import_("seat,mac,driver,wol_host\nA01,52:54:00:aa:00:01,wol,10.99.5.255\n"
                  "A02,not-a-mac,wol,10.99.5.255\nA03,52:54:00:aa:00:01,wol,10.99.5.255\n"
                  "A01,52:54:00:aa:00:04,teleport,10.99.5.255\n")
    assert bad.status_code == 400
    message = error_text(bad)
    assert "line 3" in message and "MAC address" in message
    assert "line 4: MAC 52:54:00:aa:00:01 is also on line 2" in message
    assert "line 5" in message and "teleport" in message
    assert service.get("/v1/nodes").json()["nodes"] == []  # nothing half-imported

    assert import_("bogus,mac\n").status_code == 400
    good = import_("seat,name,mac,wol_host\nA01,pc-a01,52:54:00:aa:00:01,10.99.5.255\n"
                   "A02,pc-a02,52-54-00-AA-00-02,10.99.5.255\n")
    assert good.status_code == 200, good.text
    assert good.json() == {"created": 2, "updated": 0, "errors": []}
    again = import_("seat,mac\nB01,52:54:00:aa:00:02\n")  # a known PC moved to seat B01
    assert again.json() == {"created": 0, "updated": 1, "errors": []}
    room = service.get("/v1/rooms/TPR-2").json()
    assert [(seat["label"], seat["node_name"], seat["state"]) for seat in room["seats"]] == \
        [("A01", "pc-a01", "idle"), ("B01", "pc-a02", "idle")]
    node = service.node("pc-a01")
    assert node["driver"] == "wol" and node["provision_state"] == "enroll"
    assert service.get("/v1/rooms").json()["rooms"][0]["seat_count"] == 2

    taken = service.put("/v1/rooms/TPR-2/seats/A01", {"node": "pc-a02"})
    assert taken.status_code == 409 and "taken by node pc-a01" in error_text(taken)
    no_image = service.post("/v1/rooms/TPR-2/jobs", {"image": "nothing"})
    assert no_image.status_code == 400 and "No image 'nothing'" in error_text(no_image)
    bad_time = service.post("/v1/rooms/TPR-2/jobs", {"action": "power-off", "at": "8h"})
    assert bad_time.status_code == 400 and "HH:MM" in error_text(bad_time)
    bad_seat = service.post("/v1/rooms/TPR-2/jobs", {"action": "power-off", "seats": ["Z9"]})
    assert bad_seat.status_code == 400 and "no seat(s) Z9" in error_text(bad_seat)


def test_a_room_deploy_retries_failed_seats_then_flags_them_and_reimages_one(
        lab, procs, tmp_path, disk_image):
    room = open_room(lab, procs, tmp_path, index=31, seats=3)
    room.upload_deploy_ramdisk()
    image = room.upload("debian12-reseaux", "whole-disk", disk_image)
    service = room.service
    assert service.post("/v1/rooms", {"name": "TPR-2"}).status_code == 201
    imported = service.post("/v1/rooms/TPR-2/import", None,
                            data=csv_of(room, room.seats).encode(),
                            headers={"Content-Type": "text/csv"})
    assert imported.json()["created"] == 3, imported.text
    small = Path(room.seats[2].disk)
    os.truncate(small, 16 * MIB)  # seat A03's disk cannot hold the image: it fails each time

    # the seats are still "enroll": the job brings them to available, then deploys them
    env = {**os.environ, "LABMETAL_URL": service.url}
    cli = subprocess.run([LABMETAL, "room", "deploy", "TPR-2", "--image", "debian12-reseaux",
                          "--retries", "1", "--watch"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert cli.returncode == 1, cli.stdout + cli.stderr
    assert "room job failed: 1 of 3 seats failed" in cli.stderr
    assert "A01      done" in cli.stdout and "A03      failed" in cli.stdout
    job_uuid = cli.stdout.split()[2].rstrip(":")
    job = service.get(f"/v1/room-jobs/{job_uuid}").json()
    seats = {seat["label"]: seat for seat in job["seats"]}
    assert seats["A01"]["state"] == seats["A02"]["state"] == "done"
    assert seats["A03"]["state"] == "failed" and seats["A03"]["attempts"] == 2
    assert "the image needs" in seats["A03"]["error"]
    assert job["chosen_transport"] == "unicast"
    for seat in room.seats[:2]:
        assert sha256_of(Path(seat.disk), image["virtual_size"]) == image["raw_sha256"]

    # the teacher fixes the PC (a bigger disk) and re-images that seat alone
    os.truncate(small, 64 * MIB)
    retried = service.post(f"/v1/room-jobs/{job_uuid}/seats/A03/retry", None)
    assert retried.status_code == 200, retried.text
    assert wait_job(service, job_uuid)["state"] == "done"
    assert sha256_of(small, image["virtual_size"]) == image["raw_sha256"]

    # a seat whose disk got damaged since is re-imaged from the same job
    with open(room.seats[0].disk, "r+b") as disk:
        disk.seek(5 * MIB)
        disk.write(os.urandom(MIB))
    assert service.post(f"/v1/room-jobs/{job_uuid}/seats/A01/retry", None).status_code == 200
    finished = wait_job(service, job_uuid)
    assert finished["state"] == "done", finished
    assert sha256_of(Path(room.seats[0].disk), image["virtual_size"]) == image["raw_sha256"]
    busy = service.post(f"/v1/room-jobs/{job_uuid}/seats/A01/retry", None)
    assert busy.status_code == 200  # finished seats may be re-imaged again ...
    again = service.post(f"/v1/room-jobs/{job_uuid}/seats/A01/retry", None)
    assert again.status_code == 409  # ... but not while they are being re-imaged
    wait_job(service, job_uuid)

    shown = subprocess.run([LABMETAL, "room", "show", "TPR-2"], env=env, capture_output=True,
                           text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "room TPR-2: 3 seats" in shown.stdout and "A03      done" in shown.stdout


def test_a_scheduled_power_off_fires_after_the_service_restarts(lab, procs, tmp_path):
    room = open_room(lab, procs, tmp_path, index=32, seats=2)
    service = room.service
    service.post("/v1/rooms", {"name": "TPR-3"})
    service.post("/v1/rooms/TPR-3/import", None, data=csv_of(room, room.seats).encode(),
                 headers={"Content-Type": "text/csv"})
    for seat in room.seats:  # verified and powered on (the light seats' agents start)
        room.provision(seat.name, "manage")
        room.wait_state(seat.name, "manageable")
        assert service.put(f"/v1/nodes/{seat.name}/states/power",
                           {"target": "power on"}).status_code == 202
        service.wait_node(seat.name, lambda n: n["power_state"] == "power on", 30, "power on")
    at = (datetime.now(timezone.utc) + timedelta(seconds=8)).isoformat()
    job = service.post("/v1/rooms/TPR-3/jobs", {"action": "power-off", "at": at})
    assert job.status_code == 201, job.text
    assert job.json()["state"] == "scheduled"
    assert service.get("/v1/rooms/TPR-3").json()["scheduled"][0]["uuid"] == job.json()["uuid"]

    service.proc.stop()  # the whole service goes away before the job is due
    port = int(service.url.rsplit(":", 1)[1])
    host = service.url.split("//")[1].rsplit(":", 1)[0]
    restarted = start_service(procs, "room32-again", state_dir=service.state_dir, host=host,
                              port=port, database=service.database, hostname="room32")
    assert restarted.url == service.url
    finished = wait_job(restarted, job.json()["uuid"], timeout=60)
    assert finished["state"] == "done", finished
    for seat in room.seats:
        assert restarted.node(seat.name)["power_state"] == "power off"
    started = datetime.fromisoformat(finished["started_at"])
    assert started >= datetime.fromisoformat(at) - timedelta(seconds=1)


def test_a_cancelled_job_stops_its_waiting_seats(procs):
    service = start_service(procs, "cancel")
    service.post("/v1/rooms", {"name": "R1"})
    service.post("/v1/rooms/R1/import", None, headers={"Content-Type": "text/csv"},
                 data=b"seat,mac,wol_host\nA01,52:54:00:ab:00:01,10.99.5.255\n")
    job = service.post("/v1/rooms/R1/jobs", {"action": "power-off", "at": "23:59",
                                             "repeat": "weekly"}).json()
    assert job["state"] == "scheduled" and job["repeat"] == "weekly"
    cancelled = service.post(f"/v1/room-jobs/{job['uuid']}/cancel", None)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert cancelled.json()["seats"][0]["state"] == "cancelled"
    twice = service.post(f"/v1/room-jobs/{job['uuid']}/cancel", None)
    assert twice.status_code == 409
    listed = service.get("/v1/rooms/R1/jobs").json()["jobs"]
    assert [each["state"] for each in listed] == ["cancelled"]
    print(json.dumps(listed[0]))


def test_a_room_deploy_over_multicast_with_loss_and_a_delta_reimage(lab, procs, tmp_path,
                                                                     disk_image):
    room = open_room(lab, procs, tmp_path, index=33, seats=10, multicast_groups="239.255.33.0/28")
    add_loss(room.room.namespace, 5)  # every frame the switch forwards, 1 in 20 is lost
    room.upload_deploy_ramdisk()
    image = room.upload("debian12-reseaux", "whole-disk", disk_image)
    service = room.service
    service.post("/v1/rooms", {"name": "TPR-4"})
    service.post("/v1/rooms/TPR-4/import", None, data=csv_of(room, room.seats).encode(),
                 headers={"Content-Type": "text/csv"})
    job = service.post("/v1/rooms/TPR-4/jobs", {"image": "debian12-reseaux",
                                                "transport": "multicast"})
    assert job.status_code == 201, job.text
    finished = wait_job(service, job.json()["uuid"])
    assert finished["state"] == "done", finished
    assert finished["chosen_transport"] == "multicast"
    for seat in room.seats:
        assert sha256_of(Path(seat.disk), image["virtual_size"]) == image["raw_sha256"]
    log = (room.procs.workdir / "room33.service.log").read_text()
    assert "multicast sender on 239.255.33.1" in log and "multicast sender stopped" in log

    # between two classes: a seat's disk changed in places; re-imaging it rewrites only those
    damaged = Path(room.seats[1].disk)
    with open(damaged, "r+b") as disk:
        disk.seek(9 * MIB)
        disk.write(os.urandom(MIB))
    retried = service.post(f"/v1/room-jobs/{finished['uuid']}/seats/A02/retry", None)
    assert retried.status_code == 200, retried.text
    assert wait_job(service, finished["uuid"])["state"] == "done"
    assert sha256_of(damaged, image["virtual_size"]) == image["raw_sha256"]
    events = [event["event"] for event in service.history(room.seats[1].name)
              if "written and verified" in event["event"]]
    total = -(-image["virtual_size"] // (4 * MIB))
    assert f"of {total} chunks written from multicast" in events[0]  # the first deploy
    assert f"; 1 of {total} chunks written from multicast" in events[-1], events[-1]
