"""Local-first sessions (issue 16), the trips between a seat and the student's store, against
a real service with the local store (qcow2 overlays) and the Ceph store (RBD clones): the
seat here is the agent's own session code (agent/session_sync.py) in this process with a
sparse file as its disk, as a light seat runs it.

What the session OS does to the overlay is played by writing the device-mapper snapshot
store the way the kernel does (agent/cow.py): this machine's kernel has no device-mapper.
tests/test_local_session_boots.py proves the same path on QEMU seats booting the built
ramdisk and the template's own kernel, where the guest's kernel writes the store.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from labmetal.agent import block_wire, cow, seat_cache, session_sync
from labmetal.agent.writer import Progress
from labmetal.lab.ceph import CephCluster, missing_tools
from labmetal.lab.osimage import build_local_tp_disk
from tests.test_seat_cache import os_save
from tests.test_sessions import Lab, make_lab  # noqa: F401 (fixture)

MiB = 2**20
DISK_SIZE = 1024 * MiB
CACHE_MIB = 256
MACS = {"a01": "52:54:00:16:00:01", "a02": "52:54:00:16:00:02"}


@pytest.fixture(scope="module")
def tp_image():
    return build_local_tp_disk("tp-local")


@pytest.fixture(scope="module")
def ceph_cluster():
    if missing_tools():
        pytest.fail(f"missing {', '.join(missing_tools())}")
    with CephCluster(Path(tempfile.mkdtemp(prefix="lm-ceph-"))) as cluster:
        yield cluster


@pytest.fixture(params=["local", "ceph"])
def lab(request, make_lab, tp_image) -> Iterator[Lab]:  # noqa: F811
    ceph = request.getfixturevalue("ceph_cluster") if request.param == "ceph" else None
    made = make_lab(request.param, ceph, seat_cache_mib=CACHE_MIB, deploy_kernel="deploy-k",
                    deploy_ramdisk="deploy-r")
    for name, kind in (("deploy-k", "kernel"), ("deploy-r", "ramdisk")):
        made.ok("ada", "POST", "/v1/images", {"name": name, "kind": kind}, status=201)
        assert requests.put(f"{made.service.url}/v1/images/{name}/data", data=b"boot file",
                            auth=("ada", "ada's long pass phrase"), timeout=60).ok
    for seat, mac in MACS.items():
        made.ok("ada", "POST", "/v1/ports", {"address": mac, "node_uuid": made.seats[seat]},
                status=201)
    made.ok("ada", "POST", "/v1/images", {"name": "tp-local", "kind": "whole-disk",
                                          "disk_format": "raw"}, status=201)
    with open(tp_image.path, "rb") as data:
        assert requests.put(f"{made.service.url}/v1/images/tp-local/data", data=data,
                            auth=("ada", "ada's long pass phrase"), timeout=120).ok
    template = made.ok("tom", "POST", "/v1/templates", {"name": "reseaux", "image": "tp-local"},
                       status=201)
    assert template["versions"][0]["local"], template["versions"][0]["local_error"]
    yield made


class Seat:
    """A seat's disk and what its ramdisk does with it, in this process."""

    def __init__(self, lab: Lab, name: str, work: Path) -> None:
        self.lab, self.name, self.mac = lab, name, MACS[name]
        self.disk = str(work / f"{name}.disk")
        with open(self.disk, "wb") as disk:
            disk.truncate(DISK_SIZE)
        self.said: list[str] = []

    def client(self) -> session_sync.SeatClient:
        client = session_sync.SeatClient(self.lab.service.url)
        client.lookup([self.mac])
        return client

    def boot_script(self) -> str:
        answer = requests.get(f"{self.lab.service.url}/boot/{self.mac.replace(':', '-')}.ipxe",
                              timeout=30)
        assert answer.ok, answer.text
        return answer.text

    def ramdisk(self) -> session_sync.Plan:
        """What the session ramdisk does at a boot: upload, prepare, report ready."""
        client = self.client()
        plan = client.plan()
        cache = seat_cache.ensure(self.disk, plan.cache_size, plan.cache_hint)
        client.report(cache)
        held = cache.state.overlay
        if held is not None and not held.uploaded:
            cache = session_sync.upload(client, cache, held.session, self.said.append)
            client.report(cache)
        if plan.prepare and plan.template is not None:
            cache = session_sync.prepare(client, cache, plan.prepare, plan.template,
                                         plan.chunk_sectors, Progress(), self.said.append)
            client.ready(plan.prepare, cache)
        return plan

    def cache(self) -> seat_cache.Cache:
        found = seat_cache.find(self.disk)
        assert found is not None
        return found

    def os_writes(self, writes: dict[int, bytes]) -> None:
        """The session OS writes whole chunks at these origin offsets, through the snapshot:
        the kernel adds (or rewrites) their exceptions in the store."""
        cache = self.cache()
        origin = cache.state.origin
        assert origin is not None and cache.state.overlay is not None
        with session_sync.overlay_region(cache, origin.size, writable=True) as region:
            store = cow.read_store(region, region.size, origin.size)
            chunks = dict(cow.read_chunks(region, store)) if store else {}
            chunks.update(writes)
            cow.write_store(region, region.size, cache.state.overlay.chunk_sectors,
                            sorted(chunks.items()))

    def overlay_chunks(self) -> dict[int, bytes]:
        cache = self.cache()
        origin = cache.state.origin
        assert origin is not None
        with session_sync.overlay_region(cache, origin.size, writable=False) as region:
            store = cow.read_store(region, region.size, origin.size)
            return dict(cow.read_chunks(region, store)) if store else {}


def chunk(text: str, size: int = 64 * 1024) -> bytes:
    return text.encode().ljust(size, b"\0")


def start(lab: Lab, student: str, seat: str) -> dict[str, Any]:
    ses = lab.ok("ada", "POST", "/v1/sessions", {"template": "reseaux", "student": student},
                 status=201)
    return lab.ok(student, "POST", f"/v1/sessions/{ses['uuid']}/start",
                  {"seat": seat, "boot": False})


def test_a_students_work_goes_from_one_seats_disk_to_their_store_and_to_the_next_seat(
        lab, tmp_path):
    a01, a02 = Seat(lab, "a01", tmp_path), Seat(lab, "a02", tmp_path)
    ses = start(lab, "sam", "a01")
    path = f"/v1/sessions/{ses['uuid']}"
    assert (ses["mode"], ses["state"], ses["target"]) == ("local", "starting", None)
    # the seat's next boot is labmetal's ramdisk in session mode: it fetches the template
    assert "labmetal.mode=session" in a01.boot_script()
    a01.ramdisk()
    assert a01.cache().state.origin.complete
    assert lab.ok("sam", "GET", path)["state"] == "running"
    # then it boots the template's own kernel with labmetal's session initramfs, from its disk
    script = a01.boot_script()
    cache = a01.cache()
    assert f"labmetal.cache={cache.cache_id}@{cache.start // 512}" in script
    assert "labmetal.root=2048+" in script and "labmetal.mode" not in script

    # what does not compress (a student's tarball): pieces of megabytes through the front
    binary = {20 * MiB + n * 64 * 1024: os.urandom(64 * 1024) for n in range(48)}
    a01.os_writes({0: chunk("mbr by sam"), 40 * MiB: chunk("sam's notes"), **binary})
    # the student leaves: the seat uploads at its next boot, then powers off
    assert lab.call("sam", "POST", f"{path}/stop").ok
    assert lab.ok("sam", "GET", path)["state"] == "syncing"
    assert "labmetal.mode=session" in a01.boot_script()
    assert a01.ramdisk().then == "poweroff"
    after = lab.ok("sam", "GET", path)
    assert (after["state"], after["seat"]) == ("stopped", None) and after["synced_at"]
    assert a01.cache().state.overlay.uploaded
    assert a01.overlay_chunks() == {}, "the seat zeroes what it uploaded"

    # resumed on a02: the template and sam's chunks come down, only sam's
    lab.ok("sam", "POST", f"{path}/start", {"seat": "a02", "boot": False})
    a02.ramdisk()
    got = a02.overlay_chunks()
    assert got[0] == chunk("mbr by sam") and got[40 * MiB] == chunk("sam's notes")
    assert all(got[offset] == data for offset, data in binary.items())
    assert set(got) == {0, 40 * MiB, *binary}

    # sam changes one chunk on a02: only that one goes up, the others stay in the store
    a02.os_writes({40 * MiB: chunk("sam's notes, v2")})
    assert lab.call("sam", "POST", f"{path}/stop").ok
    a02.said.clear()
    assert a02.ramdisk().then == "poweroff"
    said = next(line for line in a02.said if "session uploaded" in line)
    assert "0.1 MiB in 1 pieces" in said and f"{len(binary) + 1} unchanged chunk" in said, said
    lab.ok("sam", "POST", f"{path}/start", {"seat": "a01", "boot": False})
    a01.ramdisk()
    got = a01.overlay_chunks()
    assert got[40 * MiB] == chunk("sam's notes, v2") and got[0] == chunk("mbr by sam")
    assert all(got[offset] == data for offset, data in binary.items())


def test_a_seat_switched_off_before_its_upload_keeps_the_only_copy_and_uploads_first(
        lab, tmp_path):
    a01, a02 = Seat(lab, "a01", tmp_path), Seat(lab, "a02", tmp_path)
    ses = start(lab, "sam", "a01")
    path = f"/v1/sessions/{ses['uuid']}"
    a01.ramdisk()
    a01.os_writes({8 * MiB: chunk("unsaved work")})
    # power cut: nothing uploaded. The student sits at a02: labmetal says where the newest
    # state is and brings it back from a01 (which it would power on) before resuming
    refused = lab.call("sam", "POST", f"{path}/start", {"seat": "a02", "boot": False})
    assert refused.status_code == 409 and "a01" in refused.text and "upload" in refused.text
    assert lab.ok("sam", "GET", path)["state"] == "syncing"
    a01.ramdisk()  # a01's next boot uploads it
    assert lab.ok("sam", "GET", path)["state"] == "stopped"
    lab.ok("sam", "POST", f"{path}/start", {"seat": "a02", "boot": False})
    a02.ramdisk()
    assert a02.overlay_chunks()[8 * MiB] == chunk("unsaved work")


def test_a_seat_never_uploads_into_another_students_store(lab, tmp_path):
    a01, a02 = Seat(lab, "a01", tmp_path), Seat(lab, "a02", tmp_path)
    sams = start(lab, "sam", "a01")
    unas = start(lab, "una", "a02")
    a01.ramdisk()
    a02.ramdisk()
    a02.os_writes({0: chunk("una was here")})
    lab.call("una", "POST", f"/v1/sessions/{unas['uuid']}/stop")
    # a02's ramdisk claims sam's session (its disk can say anything: the student is root)
    client = a02.client()
    piece, _ = block_wire.encode([(0, 64 * 1024)], chunk("into sam's store"))
    for target in (sams["uuid"],):
        answer = client.http.post(client._url(f"/sessions/{target}/pieces/0"), data=piece)
        assert answer.status_code == 403, answer.text
    # a wrong token, or the right token from another seat's claim, is refused
    other = session_sync.SeatClient(lab.service.url)
    other.node, other.token = a02.lab.seats["a02"], "x" * 43
    other.http.headers["X-Labmetal-Seat-Token"] = other.token
    with pytest.raises(session_sync.SyncError, match="403"):
        other.plan()
    # a piece whose bytes do not match its hash is refused; so is an upload whose chain
    # does not match what arrived, and nothing of it reaches the store
    bad = bytearray(block_wire.encode([(0, 64 * 1024)], chunk("x"))[0])
    bad[-1] ^= 0xFF
    answer = client.http.post(client._url(f"/sessions/{unas['uuid']}/pieces/0"), data=bytes(bad))
    assert answer.status_code == 400, answer.text
    client.upload(unas["uuid"], 0, block_wire.encode([(0, 64 * 1024)], chunk("una v2"))[0])
    with pytest.raises(session_sync.SyncError, match="409"):
        client.uploaded(unas["uuid"], block_wire.Digest())
    assert lab.ok("una", "GET", f"/v1/sessions/{unas['uuid']}")["state"] == "syncing"
    # the real upload goes through; sam's session saw none of it
    a02.ramdisk()
    assert lab.ok("una", "GET", f"/v1/sessions/{unas['uuid']}")["state"] == "stopped"
    lab.call("sam", "POST", f"/v1/sessions/{sams['uuid']}/stop")
    a01.ramdisk()
    lab.ok("sam", "POST", f"/v1/sessions/{sams['uuid']}/start", {"seat": "a02", "boot": False})
    a02.ramdisk()
    assert a02.overlay_chunks() == {}, "sam's store holds nothing of una's"
    assert os.path.getsize(a02.disk) == DISK_SIZE


def beyond_template(chunks: dict[int, bytes], image: Path) -> dict[int, bytes]:
    """The chunks that differ from the template's (a store may hold the template's own
    bytes where a revert copied them back)."""
    def template_at(offset: int, length: int) -> bytes:
        with open(image, "rb") as template:
            template.seek(offset)
            return template.read(length)

    return {offset: data for offset, data in chunks.items()
            if template_at(offset, len(data)) != data}


def test_a_local_sessions_save_points_revert_and_start_over(lab, tmp_path, tp_image):
    a01, a02 = Seat(lab, "a01", tmp_path), Seat(lab, "a02", tmp_path)
    ses = start(lab, "sam", "a01")
    path = f"/v1/sessions/{ses['uuid']}"
    a01.ramdisk()
    a01.os_writes({8 * MiB: chunk("routes v1")})
    # while it runs, the newest state is on the seat: the save is queued, and made from
    # the seat's upload once it is verified
    queued = lab.call("sam", "POST", f"{path}/save", {"label": "before-firewall"})
    assert queued.status_code == 202 and queued.json()["queued"] == "before-firewall"
    assert lab.ok("sam", "GET", f"{path}/saves")["saves"] == []
    # and one asked from inside the session OS, the network down: kept on the seat's disk
    asked = os_save(a01.cache(), tmp_path, "asked in the OS")
    assert asked.returncode == 0, asked.stderr
    assert lab.call("sam", "POST", f"{path}/stop").ok
    a01.ramdisk()
    saves = lab.ok("sam", "GET", f"{path}/saves")["saves"]
    assert [(save["label"], save["created_by"]) for save in saves] == [
        ("before-firewall", "sam"), ("asked in the OS", "sam at a01")]
    # more work, then back to the save point: the next seat gets what was saved
    lab.ok("sam", "POST", f"{path}/start", {"seat": "a02", "boot": False})
    a02.ramdisk()
    a02.os_writes({8 * MiB: chunk("routes v2, firewall broke it"), 16 * MiB: chunk("x")})
    assert lab.call("sam", "POST", f"{path}/stop").ok
    a02.ramdisk()
    refused = lab.call("sam", "POST", f"{path}/revert", {"save": "nothing-like-that"})
    assert refused.status_code == 404, refused.text
    lab.ok("sam", "POST", f"{path}/revert", {"save": "before-firewall"})
    lab.ok("sam", "POST", f"{path}/start", {"seat": "a01", "boot": False})
    a01.ramdisk()
    assert beyond_template(a01.overlay_chunks(), tp_image.path) == \
        {8 * MiB: chunk("routes v1")}
    # a revert is refused while the session runs: its newest state is on the seat
    busy = lab.call("sam", "POST", f"{path}/revert", {"save": "before-firewall"})
    assert busy.status_code == 409, busy.text
    assert lab.call("sam", "POST", f"{path}/stop").ok
    a01.ramdisk()
    # start over: the template alone
    lab.ok("sam", "POST", f"{path}/reset")
    assert lab.ok("sam", "GET", f"{path}/saves")["saves"] == []
    lab.ok("sam", "POST", f"{path}/start", {"seat": "a02", "boot": False})
    a02.ramdisk()
    assert beyond_template(a02.overlay_chunks(), tp_image.path) == {}
