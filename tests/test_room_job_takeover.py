"""Issue 17's fault scenarios for room jobs, kept as tests: the conductor that runs a
multicast room job is SIGKILLed while the seats are receiving; another conductor on the
hash ring takes the job over and finishes it, and every seat ends verified.

Two conductor processes and an API process on a real PostgreSQL; light seats (the agent
from this checkout in each seat's namespace, a file as disk, virtual BMCs over UDP);
tests/test_firmware_boots.py runs a multicast room job on QEMU seats booting the built
ramdisk.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from labmetal.lab.harness import start_conductor, wait_for
from labmetal.lab.light_room import make_whole_disk, open_room, sha256_of
from labmetal.secrets import SecretBox
from tests.room import lab  # noqa: F401 (fixture)
from tests.test_room_jobs import csv_of, wait_job

LATEST = {"X-OpenStack-Ironic-API-Version": "latest"}


def disk_image_path(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    return make_whole_disk(tmp_path / "images", size_mib=40)


def room_with_conductors(lab, procs, tmp_path, postgres, index: int, rate: int):
    """A room of 6 light seats whose API runs alone on the uplink, two conductors beside it
    on one PostgreSQL, and a multicast room job started; returns (room, job uuid, conductor
    processes by name, image)."""
    database = postgres.new_database(f"jobs{index}")
    key = tmp_path / "secret.key"
    SecretBox.from_file(key)
    # the API on the room's uplink; the seats' boot scripts, images and agent API are its
    room = open_room(lab, procs, tmp_path, index=index, seats=6, command="api",
                     database=database, secret_key_file=key)
    service = room.service
    # one host: the conductors read the API's image store (several hosts: issue 17)
    settings = {"seat_url": service.url, "image_dir": str(service.state_dir / "images"),
                "multicast_groups": f"239.255.{index}.0/28", "multicast_rate": rate,
                "callback_timeout": 60, "agent_timeout": 15}
    conductors = {name: start_conductor(procs, name, database, key, **settings)
                  for name in ("c1", "c2")}
    wait_for(lambda: sum(c["alive"] for c in service.get(
        "/v1/conductors", headers=LATEST).json()["conductors"]) == 2, 30, "two conductors")
    room.upload_deploy_ramdisk()
    image = room.upload("debian12-reseaux", "whole-disk", disk_image_path(tmp_path))
    assert service.post("/v1/rooms", {"name": "TPR-9"}).status_code == 201
    imported = service.post("/v1/rooms/TPR-9/import", None,
                            data=csv_of(room, room.seats).encode(),
                            headers={"Content-Type": "text/csv"})
    assert imported.ok, imported.text
    job = service.post("/v1/rooms/TPR-9/jobs", {"image": "debian12-reseaux",
                                                "transport": "multicast"})
    assert job.status_code == 201, job.text
    return room, job.json()["uuid"], conductors, image


def all_receiving(room, uuid: str) -> dict:
    return wait_for(lambda: (lambda j: j if j["conductor"] and j["counts"].get("writing")
                             == len(room.seats) else None)(
        room.service.get(f"/v1/room-jobs/{uuid}").json()), 180, "every seat receiving",
        interval=0.2)


def assert_every_seat_verified(room, image: dict) -> None:
    for seat in room.seats:
        assert sha256_of(Path(seat.disk), image["virtual_size"]) == image["raw_sha256"]
        node = room.service.node(seat.name)
        assert (node["provision_state"], node["last_error"]) == ("active", None)


@pytest.mark.postgres
def test_a_conductor_killed_mid_multicast_job_is_taken_over_and_every_seat_ends_verified(
        lab, procs, tmp_path, postgres):
    # slow enough to be caught in the middle: ~4 s for the packed image
    room, uuid, conductors, image = room_with_conductors(lab, procs, tmp_path, postgres,
                                                         85, 8_000_000)
    owner = all_receiving(room, uuid)["conductor"]
    conductors[owner].kill()
    survivor = ({"c1", "c2"} - {owner}).pop()

    finished = wait_job(room.service, uuid, timeout=300)
    assert finished["state"] == "done", finished
    assert finished["conductor"] == survivor and finished["chosen_transport"] == "multicast"
    assert_every_seat_verified(room, image)
    log = (procs.workdir / f"{survivor}.service.log").read_text(errors="replace")
    assert f"room job {uuid}: conductor {owner} is gone; {survivor} carries it on" in log
    assert "multicast sender on 239.255.85." in log  # the survivor's own sender
    print("attempts per seat:", [(s["label"], s["attempts"]) for s in finished["seats"]])


@pytest.mark.postgres
def test_a_database_outage_mid_multicast_job_moves_nothing_and_every_seat_ends_verified(
        lab, procs, tmp_path, postgres):
    """PostgreSQL stopped for longer than conductor_dead_after while the seats receive:
    the job's conductor keeps it (nobody is taken for dead), and it ends with every seat
    verified."""
    room, uuid, conductors, image = room_with_conductors(lab, procs, tmp_path, postgres,
                                                         86, 2_000_000)
    owner = all_receiving(room, uuid)["conductor"]
    postgres.halt()
    try:
        time.sleep(12)  # the outage itself: conductor_dead_after is 10 s
    finally:
        postgres.resume()
    finished = wait_job(room.service, uuid, timeout=300)
    assert finished["state"] == "done", finished
    assert finished["conductor"] == owner
    assert_every_seat_verified(room, image)
    for name in conductors:
        log = (procs.workdir / f"{name}.service.log").read_text(errors="replace")
        assert "is gone" not in log, name
    print("attempts per seat:", [(s["label"], s["attempts"]) for s in finished["seats"]])
