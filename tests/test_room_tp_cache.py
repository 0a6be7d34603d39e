"""A room opening a TP whose sessions run from the seats' disks (issue 16): a room job sends
the template into every seat's cache before anyone logs in, by multicast, once for the whole
room. Twenty light seats (the agent's session mode from the checkout, a sparse file as the
disk) behind virtual BMCs, in a room of network namespaces; what a QEMU seat booting the
built ramdisk does with the same cache is proven by tests/test_local_session_boots.py.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess

from labmetal.agent import seat_cache
from labmetal.lab.harness import LABMETAL, wait_for
from labmetal.lab.light_room import MIB, open_room
from labmetal.lab.osimage import build_local_tp_disk
from tests.room import lab  # noqa: F401 (fixture)
from tests.test_room_jobs import csv_of, wait_job

SEATS = 20
CACHE_MIB = 192


def origin_sha256(disk: str, size: int) -> str:
    """The bytes in the seat's cache origin slot, as the session initramfs maps them."""
    cache = seat_cache.find(disk)
    assert cache is not None, f"{disk} has no labmetal cache"
    digest = hashlib.sha256()
    with open(disk, "rb") as data:
        data.seek(cache.start + seat_cache.ORIGIN_OFFSET)
        left = size
        while left:
            block = data.read(min(4 * MIB, left))
            assert block, "the disk ends inside the origin slot"
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def test_a_room_opening_a_tp_gets_the_template_into_every_seats_cache_by_multicast_once(
        lab, procs, tmp_path):  # noqa: F811
    room = open_room(lab, procs, tmp_path, index=82, seats=SEATS, disk_mib=320,
                     multicast_groups="239.255.82.0/28", seat_cache_mib=CACHE_MIB)
    service = room.service
    room.upload_deploy_ramdisk()
    image = room.upload("tp-local", "whole-disk", build_local_tp_disk("tp-local").path)
    template = service.post("/v1/templates", {"name": "reseaux", "image": "tp-local"})
    assert template.status_code == 201, template.text
    assert template.json()["versions"][0]["local"], template.json()["versions"][0]
    assert service.post("/v1/rooms", {"name": "TPR-6"}).status_code == 201
    imported = service.post("/v1/rooms/TPR-6/import", None,
                            data=csv_of(room, room.seats).encode(),
                            headers={"Content-Type": "text/csv"})
    assert imported.status_code == 200, imported.text

    # the teacher opens the room for the TP from the command line
    cli = subprocess.run([LABMETAL, "room", "tp", "TPR-6", "--template", "reseaux"],
                         env={**os.environ, "LABMETAL_URL": service.url}, capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert f"{SEATS} seats powering on" in cli.stdout, cli.stdout
    said = re.search(r"the template goes into the seats' caches first: room job (\S+) ",
                     cli.stdout)
    assert said, cli.stdout
    answer = {"cache_job": said.group(1)}
    # the teacher's grid follows the seats as they fetch it
    wait_for(lambda: any(seat["state"] in ("writing", "done") for seat in
                         service.get("/v1/rooms/TPR-6").json()["seats"]), 300,
             "a seat fetching the template")
    job = wait_job(service, answer["cache_job"], timeout=900)
    assert job["state"] == "done", job
    assert (job["action"], job["chosen_transport"]) == ("cache", "multicast")
    assert [(seat["state"], seat["progress"]) for seat in job["seats"]] == [("done", 100)] * SEATS
    # once for the room: the sender sent about the image's packed bytes, not one per seat
    assert job["multicast_sent_bytes"] < 2 * image["packed_size"], \
        (job["multicast_sent_bytes"], image["packed_size"])
    for seat in room.seats:
        assert origin_sha256(seat.disk, image["virtual_size"]) == image["raw_sha256"], seat.name
    log = (procs.workdir / "room82.service.log").read_text()
    assert f"room job {answer['cache_job']}: multicast sender on 239.255.82.1" in log

    # every seat holds it: opening the room again sends nothing; closing it is quiet
    assert service.delete("/v1/rooms/TPR-6/tp").status_code == 204
    again = service.put("/v1/rooms/TPR-6/tp", {"template": "reseaux", "power_on": False})
    assert again.status_code == 200 and again.json()["cache_job"] is None, again.text
