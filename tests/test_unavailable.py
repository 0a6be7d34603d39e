"""What a client is told when labmetal's database or image store cannot serve it (issue 17):
a database outage is a 503 that says so, with Retry-After, and the service answers again
once the database is back; a full image store is a 507 that says how much was needed and
how much is free, and keeps nothing of the upload. Real PostgreSQL stopped and started
again; a real small file system (tmpfs) as the image store."""
from __future__ import annotations

import io
import os
import subprocess

import pytest
import requests

from labmetal.images.store import ImageStore, StoreFull
from labmetal.lab.harness import error_text, start_service, wait_for

MiB = 2**20


@pytest.mark.postgres
def test_a_database_outage_is_a_503_with_retry_after_and_the_service_comes_back(
        postgres, procs):
    service = start_service(procs, "outage", database=postgres.new_database("outage"))
    assert service.post("/v1/rooms", {"name": "tpr-1"}).status_code == 201
    postgres.halt()
    try:
        for answer in (service.get("/v1/rooms"), service.post("/v1/rooms", {"name": "tpr-2"})):
            assert answer.status_code == 503, answer.text
            assert answer.headers["Retry-After"] == "5"
            assert "The database is unavailable for now" in error_text(answer), answer.text
            assert "try again in 5 s" in error_text(answer)
    finally:
        postgres.resume()
    rooms = wait_for(lambda: (lambda got: got.ok and got.json()["rooms"])(
        service.get("/v1/rooms")), 60, "the service answering again")
    assert [room["name"] for room in rooms] == ["tpr-1"]
    assert service.post("/v1/rooms", {"name": "tpr-2"}).status_code == 201
    log = (procs.workdir / "outage.service.log").read_text()
    assert "the database is unavailable" in log and "Traceback" not in log


@pytest.fixture
def small_store(tmp_path):
    """A 48 MiB file system as the image store."""
    store = tmp_path / "images"
    store.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", "tmpfs", str(store)],
                   check=True)
    try:
        yield store
    finally:
        subprocess.run(["umount", "-l", str(store)], check=False)


def test_a_full_image_store_is_a_507_saying_what_is_needed_and_free(procs, small_store):
    service = start_service(procs, "full", image_dir=small_store)

    def register(name: str) -> None:
        made = service.post("/v1/images", {"name": name, "kind": "whole-disk",
                                           "disk_format": "raw"})
        assert made.status_code == 201, made.text

    # the upload's length is known: refused for the room it needs
    register("too-big")
    data = os.urandom(64 * MiB)
    answer = requests.put(f"{service.url}/v1/images/too-big/data", data=data, timeout=120)
    assert answer.status_code == 507, answer.text
    said = error_text(answer)
    assert f"the upload needs {64 * MiB} bytes" in said and "bytes to give" in said, said
    # a stream of no known length (the front gives the API a length; the store's own
    # door takes streams without one): the disk fills up while it is written
    store = ImageStore(small_store, 1 << 30)
    with pytest.raises(StoreFull, match="the image store's disk filled up after") as full:
        with store.receive(io.BytesIO(data)):
            pass
    assert full.value.needed > full.value.free
    # nothing of either is kept; an image that fits goes in
    assert not any((small_store / ".incoming").iterdir())
    assert service.get("/v1/images/too-big").json()["status"] == "queued"
    register("fits")
    answer = requests.put(f"{service.url}/v1/images/fits/data", data=data[:8 * MiB],
                          timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "active"
